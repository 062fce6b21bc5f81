"""Mean, resample and zero ablation of components over a dataset.

The prompts (and the reference) may have different lengths, and may be any iterable of
prompts (a ``datasets`` column, a generator): each prompt runs unpadded (see
:mod:`interventions.ragged`), the metric is read at each prompt's own ``metric_pos``
(``-1``: its last token), and a mean ablation averages over the reference's real tokens.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> from interventions.recipes import Metric
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=20)).eval()
>>> ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
>>> effects = ablate_components(model, ids, [("mlp_out", 0), ("head", 1, 0)], Metric.logit(7),
...                             method="mean", reference=ids)
>>> sorted(effects)
['head[1].h0', 'mlp_out[0]']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.inputs import Tokens, _model, as_prompts
from interventions.recipes.metrics import Metric

Component = tuple[str, int] | tuple[str, int, int]  # (site, layer) or ("head", layer, head)


def _label(component: Component) -> str:
    site, layer, *rest = component
    return f"{site}[{layer}]" + (f".h{rest[0]}" if rest else "")


def ablate_components(
    model: nn.Module | str,
    tokens: Tokens,
    components: Sequence[Component],
    metric: Metric,
    *,
    method: str = "mean",
    reference: Tokens | None = None,
    per_position: bool = False,
    seed: int = 0,
    metric_pos: int = -1,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> dict[str, float]:
    """Ablate each component on its own; return the change of the batch-mean metric.

    ``method``: ``zero``, ``mean`` (over the ``reference`` dataset's batch and, unless
    ``per_position``, its positions) or ``resample`` (each item takes a reference item's
    values, drawn with ``seed``).

    ``tokens`` and ``reference``: ids, texts, prompts of different lengths or any
    iterable of them; ``metric`` may hold one answer per prompt.
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_prompts(tokens, tokenizer, "tokens")
    if method != "zero" and reference is None:
        raise SpecError(f"{method!r} ablation needs reference= (a dataset of token ids)")
    g = Graph()
    g.run("base", tokens=ids).read("logits", pos=metric_pos, name="base")
    ref_run = (
        g.run("reference", tokens=as_prompts(reference, tokenizer, "reference"))
        if reference is not None
        else None
    )
    for component in components:
        site, layer, *rest = component
        name = _label(component)
        r = g.run("ablate." + ".".join(map(str, component)), tokens=ids)
        r.ablate(
            site,
            layer=layer,
            head=rest[0] if rest else None,
            method=method,
            source=ref_run if method != "zero" else None,
            per_position=per_position,
            seed=seed,
        )
        r.read("logits", pos=metric_pos, name=name)
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    base = metric(res["base"], reference=res["base"]).mean()
    return {
        _label(c): float(metric(res[_label(c)], reference=res["base"]).mean() - base)
        for c in components
    }
