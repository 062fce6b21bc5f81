"""SAE recipes: feature activations, top-activating positions, attribution, ablation.

Every recipe splices the SAE through the graph (``sae_splice``), so the SAE runs where
the model runs (any backend, remote included). Prompts may have different lengths (or be
any iterable of prompts, e.g. a ``datasets`` column): each runs unpadded, and metrics are
read at each prompt's own ``metric_pos`` (``-1``: its last token).

>>> import torch, interventions as iv
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20)).eval()
>>> sae = iv.StandardSAE(W_enc=torch.randn(8, 12), b_enc=torch.zeros(12),
...                      W_dec=torch.randn(12, 8), b_dec=torch.zeros(8))
>>> feature_activations(model, torch.tensor([[1, 2, 3]]), sae, layer=0).shape
torch.Size([1, 3, 12])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interventions.errors import SAEErrorGradientWarning
from interventions.execute import run
from interventions.graph import Graph
from interventions.ops import ErrorTerm, FeatureEdit
from interventions.recipes.inputs import (
    Tokens,
    _model,
    as_prompts,
    materialize,
    n_prompts,
    prompt_rows,
)
from interventions.recipes.metrics import Metric
from interventions.sae import SAE


def feature_activations(
    model: nn.Module | str,
    tokens: Tokens,
    sae: SAE,
    *,
    site: str = "resid_post",
    layer: int | None = None,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> torch.Tensor:
    """SAE feature activations ``[batch, pos, d_sae]`` at a site (the model is unchanged).

    Prompts of different lengths give rows padded with zeros on the right to the longest
    prompt: row ``i``'s first ``len(prompt i)`` positions are its features.
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_prompts(tokens, tokenizer, "tokens")
    g = Graph()
    g.run("a", tokens=ids, padding_side="right").sae_splice(
        site, layer=layer, sae=sae, error="keep", features="features"
    )
    return run(g, model, backend=backend, tokenizer=tokenizer, **run_options)["features"]


@dataclass(frozen=True)
class Activation:
    """One position where a feature fires: prompt index (in order over all prompts),
    position (in the prompt's own tokens), value."""

    prompt: int
    position: int
    value: float


def top_activating(
    model: nn.Module | str,
    prompts: Iterable[Tokens],
    sae: SAE,
    feature: int,
    *,
    k: int = 10,
    site: str = "resid_post",
    layer: int | None = None,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> list[Activation]:
    """The ``k`` positions over ``prompts`` where ``feature`` is most active (one run).

    ``prompts``: texts or token lists of any lengths, a ``[n, seq]`` tensor, or any
    iterable of prompts (a ``datasets`` column); an element may itself be a batch
    ``[b, seq]``. :attr:`Activation.prompt` counts every prompt in order (each row of a
    batch element is a prompt). Only real tokens count, never padding.
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    rows: list[list[int]] = []
    items = materialize(prompts, "prompts")
    if (isinstance(items, torch.Tensor) and items.ndim == 1) or isinstance(items, str):
        items = [items]
    for i, prompt in enumerate(items):
        rows.extend(prompt_rows(as_prompts(prompt, tokenizer, f"prompt {i}")))
    g = Graph()
    g.run("prompts", tokens=rows, padding_side="right").sae_splice(
        site, layer=layer, sae=sae, error="keep", features="f"
    )
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    acts = res["f"][..., feature].float().cpu()  # [prompts, pos], right-padded
    found: list[Activation] = []
    for row, ids in enumerate(rows):
        for p, v in enumerate(acts[row, : len(ids)].tolist()):
            found.append(Activation(row, p, v))
    return sorted(found, key=lambda a: -a.value)[:k]


def warn_if_error_kept(error: str, recipe: str) -> None:
    """Warn once when a gradient recipe is asked to keep an SAE's error term."""
    if error == "keep":
        warnings.warn(
            f"{recipe}: error='keep' lets gradient flow through the SAE error term, so "
            "feature gradients cancel and differ from SAELens's; the default "
            "error='detach' gives SAELens's gradients (forward values are the same)",
            SAEErrorGradientWarning,
            stacklevel=3,
        )


def feature_attribution(
    model: nn.Module,
    tokens: Tokens,
    sae: SAE,
    metric: Metric,
    *,
    site: str = "resid_post",
    layer: int | None = None,
    metric_pos: int = -1,
    error: ErrorTerm = "detach",
    batch_size: int = 64,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> torch.Tensor:
    """Each feature's linear attribution to ``metric``: ``sum_pos f * d metric / d f``.

    By default the SAE is spliced with its error term detached (``error="detach"``, as
    SAELens does), so outputs are unchanged and the gradient flows only through the
    features. ``error="keep"`` gives the same outputs but lets gradient through the
    error term, which cancels the features' own gradient (all zero with no edits); it
    warns with :class:`~interventions.errors.SAEErrorGradientWarning`. Returns
    ``[d_sae]`` (batch mean). Prompts of different lengths run in groups of one length
    (the gradient needs the tensors the forward pass used); ``batch_size`` bounds a group.
    """
    from interventions.recipes._dataset import batches
    from interventions.recipes.attribution import _metric_rows

    warn_if_error_kept(error, "feature_attribution")
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_prompts(tokens, tokenizer, "tokens")
    n = n_prompts(ids)
    total: torch.Tensor | None = None
    for batch in batches(prompt_rows(ids), batch_size=batch_size):
        g = Graph()
        r = batch.add_run(g, "a")
        r.sae_splice(site, layer=layer, sae=sae, error=error, features="features")
        r.read("logits", pos=metric_pos, name="logits")
        res = run(g, model, backend=backend, tokenizer=tokenizer, grad=True, **run_options)
        feats = res["features"]
        m = _metric_rows(metric, batch.indices, n)
        (grad,) = torch.autograd.grad(m(res["logits"]).sum(), [feats])
        part = (feats * grad).detach().float().sum(dim=tuple(range(0, feats.ndim - 1)))
        total = part if total is None else total + part
    assert total is not None
    return total / n


def feature_ablation(
    model: nn.Module | str,
    tokens: Tokens,
    sae: SAE,
    features: Sequence[int],
    metric: Metric,
    *,
    site: str = "resid_post",
    layer: int | None = None,
    metric_pos: int = -1,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> torch.Tensor:
    """Change of ``metric`` when each feature is zeroed (error term kept): ``[len(features)]``
    (batch mean)."""
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_prompts(tokens, tokenizer, "tokens")
    g = Graph()
    g.run("base", tokens=ids).read("logits", pos=metric_pos, name="base")
    for f in features:
        r = g.run(f"ablate.{f}", tokens=ids)
        r.sae_splice(site, layer=layer, sae=sae, edits=[FeatureEdit.set(f, 0.0)], error="keep")
        r.read("logits", pos=metric_pos, name=f"ablate.{f}")
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    base = metric(res["base"], reference=res["base"])
    return torch.stack(
        [(metric(res[f"ablate.{f}"], reference=res["base"]) - base).mean() for f in features]
    )
