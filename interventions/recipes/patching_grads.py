"""Attribution patching: the gradient approximation of an activation-patching sweep,
``(corrupt - clean) . d metric / d activation`` at every cell, in about three
forward-equivalents, optionally held to exact patching (:func:`attribution_patching`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError, choices_text
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.attribution import _metric_rows
from interventions.recipes.inputs import (
    Tokens,
    _lengths,
    _model,
    as_pairs,
    n_prompts,
    prompt_rows,
)
from interventions.recipes.metrics import Metric, Normalization
from interventions.recipes.patching import (
    PATCHABLE_SITES,
    Direction,
    PatchingResult,
    _check_sweep,
    _layers,
    activation_patching,
)
from interventions.results import Results


@dataclass(frozen=True, eq=False)
class AttributionResult:
    """Attribution patching scores, and (when asked) how they compare with exact patching."""

    approx: PatchingResult
    exact: PatchingResult | None = None
    correlation: float | None = None
    max_error: float | None = None


def attribution_patching(
    model: nn.Module | str,
    clean: Tokens,
    corrupt: Tokens,
    metric: Metric,
    *,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    direction: Direction = "denoise",
    normalize: bool = True,
    normalization: Normalization = "batch_mean",
    metric_pos: int = -1,
    compare_exact: bool = False,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> AttributionResult:
    """The gradient (linear) approximation of a whole layer x position patching sweep.

    One clean pass and one corrupted pass (sharing a batched forward) and one backward
    pass: the change of the metric when patching position ``p`` of layer ``l`` is
    approximated by ``(a_source - a_target) . d metric / d a_target``. With
    ``compare_exact=True`` the exact sweep also runs, and the result reports the
    Pearson correlation and the largest absolute error between the two. It splices no
    SAE; the gradient recipe that does (``feature_attribution``) defaults to
    ``error="detach"`` and warns when given ``"keep"``.

    Prompts of different lengths (lists of ids, texts, a ``datasets`` column or any
    iterable; clean and corrupted paired one to one, of equal or different lengths) run
    as one graph with a clean and a corrupted run per group of pairs of one length (a
    gradient needs the tensors the forward pass used). Positions then count from each
    prompt's own last token, as :func:`activation_patching` counts them: the columns are
    ``-k .. -1`` for the shortest prompt's ``k`` tokens, and each prompt's source and
    target positions are taken from their own ends. ``metric`` may hold one answer per
    prompt.

    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=20))
    >>> clean, corrupt = [[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 4], [5, 7]]
    >>> metric = Metric.logit_diff(torch.tensor([7, 8]), torch.tensor([8, 7]))
    >>> attribution_patching(model.eval(), clean, corrupt, metric).approx.cols
    ('-2', '-1')
    """
    from interventions.recipes._grads import require_gradients

    kl = metric.kind == "kl"  # not data: its gradient needs grad=True reads
    require_gradients(backend, "attribution patching", grad_ops=not kl)
    if site not in PATCHABLE_SITES or site == "head":
        raise SpecError(
            f"attribution patching sweeps positions of {choices_text(PATCHABLE_SITES[:-2])}"
        )
    _check_sweep(direction, normalization)
    model, tokenizer = _model(model, tokenizer, run_options)
    clean_ids, corrupt_ids = as_pairs(clean, corrupt, tokenizer)
    info = describe(model)
    rows = _layers(layers, info.n_layers, site)
    n = n_prompts(clean_ids)
    lengths = list(zip(_lengths(clean_ids), _lengths(corrupt_ids), strict=True))
    ragged = len({k for pair in lengths for k in pair}) > 1
    shortest = min(k for pair in lengths for k in pair)
    # the positions of the columns: every position, or (ragged) the shortest prompt's
    # count counted from each prompt's end
    offsets = list(range(-shortest, 0)) if ragged else list(range(shortest))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, pair in enumerate(lengths):
        groups.setdefault(pair, []).append(i)
    clean_rows, corrupt_rows = prompt_rows(clean_ids), prompt_rows(corrupt_ids)
    target = "corrupt" if direction == "denoise" else "clean"
    source = "clean" if direction == "denoise" else "corrupt"
    g = Graph()
    for k, idx in enumerate(groups.values()):
        tag = "" if len(groups) == 1 else f"{k}."
        group_metric = metric if len(groups) == 1 else _metric_rows(metric, idx, n)
        for name, ids in (("clean", clean_rows), ("corrupt", corrupt_rows)):
            r = g.run(f"{tag}{name}", tokens=torch.tensor([ids[i] for i in idx]))
            r.read("logits", pos=metric_pos, name=f"{tag}{name}.logits")
            for layer in rows:
                at = None if site == "embed" else layer
                r.read(site, layer=at, name=f"{tag}{name}.{layer}")
                if name == target and not kl:
                    r.grad(
                        site,
                        at,
                        metric=group_metric,
                        metric_pos=metric_pos,
                        name=f"{tag}grad.{layer}",
                    )
    opts: dict[str, Any] = {**run_options, "grad": True} if kl else run_options
    res = run(g, model, backend=backend, tokenizer=tokenizer, **opts)
    m_clean = torch.empty(n)
    m_corrupt = torch.empty(n)
    values = torch.empty(len(rows), len(offsets), n)  # [rows, positions, batch]
    for k, ((len_clean, len_corrupt), idx) in enumerate(groups.items()):
        tag = "" if len(groups) == 1 else f"{k}."
        group_metric = metric if len(groups) == 1 else _metric_rows(metric, idx, n)
        part = _attribution_values(
            res,
            tag,
            group_metric,
            rows,
            direction,
            kl,
            source_pos=[p % (len_clean if source == "clean" else len_corrupt) for p in offsets],
            target_pos=[p % (len_corrupt if target == "corrupt" else len_clean) for p in offsets],
        )
        m_clean[idx], m_corrupt[idx], values[:, :, idx] = part
    approx = PatchingResult.scored(
        values,
        m_clean,
        m_corrupt,
        normalize=normalize,
        normalization=normalization,
        site=site,
        rows=tuple(f"{site}[{layer}]" for layer in rows),
        cols=tuple(str(p) for p in offsets),
        direction=direction,
        graph=g,
        results=None,
    )
    if not compare_exact:
        return AttributionResult(approx)
    exact = activation_patching(
        model,
        clean_ids,
        corrupt_ids,
        metric,
        site=site,
        layers=rows,
        positions=offsets,
        direction=direction,
        normalize=normalize,
        normalization=normalization,
        metric_pos=metric_pos,
        backend=backend,
        tokenizer=tokenizer,
        **run_options,
    )
    a, e = approx.scores.flatten().double(), exact.scores.flatten().double()
    corr = (
        float(torch.corrcoef(torch.stack([a, e]))[0, 1])
        if a.std() > 0 and e.std() > 0
        else float("nan")
    )
    return AttributionResult(approx, exact, corr, float((a - e).abs().max()))


def _attribution_values(
    res: Results,
    tag: str,
    metric: Metric,
    rows: Sequence[int],
    direction: Direction,
    kl: bool,
    *,
    source_pos: list[int],
    target_pos: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group's clean and corrupted metrics ``[b]`` and its approximate patched metric
    ``[rows, positions, b]``: the target's metric plus ``(a_source - a_target) . grad``,
    the source at ``source_pos`` and the target at ``target_pos`` (one per column)."""
    target = "corrupt" if direction == "denoise" else "clean"
    source = "clean" if direction == "denoise" else "corrupt"
    clean_logits = res[f"{tag}clean.logits"].detach()
    m_clean = metric(clean_logits, reference=clean_logits)
    m_corrupt = metric(res[f"{tag}corrupt.logits"].detach(), reference=clean_logits)
    if kl:
        m_target = metric(res[f"{tag}{target}.logits"], reference=clean_logits)
        activations = [res[f"{tag}{target}.{layer}"] for layer in rows]
        grads = torch.autograd.grad(m_target.sum(), activations, allow_unused=True)
    else:
        grads = tuple(res[f"{tag}grad.{layer}"] for layer in rows)
    base = (m_corrupt if direction == "denoise" else m_clean).detach()
    values = base.expand(len(rows), len(target_pos), len(base)).clone()
    for i, (layer, grad) in enumerate(zip(rows, grads, strict=True)):
        if grad is None:
            continue
        a_source = res[f"{tag}{source}.{layer}"][:, source_pos]
        a_target = res[f"{tag}{target}.{layer}"][:, target_pos]
        delta = ((a_source - a_target).detach() * grad[:, target_pos]).sum(-1)  # [b, positions]
        values[i] += delta.T.detach().float()
    return m_clean.detach().float(), m_corrupt.detach().float(), values
