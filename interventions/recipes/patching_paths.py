"""Path patching: the effect of sender heads on receiver heads (or the logits) alone, each
sender's output patched from the corrupt run only where the receivers read it; the
rest of the model is frozen at the clean run. One graph; see :func:`path_patching`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.ops import Ref
from interventions.recipes.inputs import (
    Tokens,
    _model,
    as_pairs,
    check_twins,
    n_prompts,
)
from interventions.recipes.metrics import Metric, Normalization, check_normalization
from interventions.recipes.patching import PatchingResult


def path_patching(
    model: nn.Module | str,
    clean: Tokens,
    corrupt: Tokens,
    metric: Metric,
    *,
    receivers: Sequence[tuple[int, int]] | Literal["logits"] = "logits",
    senders: Sequence[tuple[int, int]] | None = None,
    normalize: bool = True,
    normalization: Normalization = "batch_mean",
    metric_pos: int = -1,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> PatchingResult:
    """Path patching (Wang et al. 2022): the effect of each sender head on the metric
    through the given receiver heads only (or directly on the logits).

    For each sender: a clean run with the sender's output from the corrupted run and
    every other head and MLP from the sender's layer on frozen to clean values, except
    the receivers, whose outputs are read; then a clean run with only the receivers'
    outputs replaced by those. With ``receivers="logits"`` the first run's logits are the
    answer. Scores are 0 = corrupted, 1 = clean (so a sender that matters scores below 1).
    Senders default to every head in layers below the earliest receiver.
    """
    check_normalization(normalization)
    model, tokenizer = _model(model, tokenizer, run_options)
    clean_ids, corrupt_ids = as_pairs(clean, corrupt, tokenizer)
    check_twins(clean_ids, corrupt_ids, "path_patching")
    info = describe(model)
    if info.n_layers is None or not info.n_heads:
        raise SpecError("path patching needs a model with an architecture map and heads")
    n_layers, n_heads = info.n_layers, info.n_heads
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise SpecError(f"receivers must be 'logits' or (layer, head) pairs, got {receivers!r}")
    recv = [] if isinstance(receivers, str) else [(int(lr), int(h)) for lr, h in receivers]
    for layer, head in recv:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise SpecError(
                f"receiver ({layer}, {head}) out of range: {n_layers} layers x {n_heads} heads"
            )
    top = n_layers if to_logits else min(layer for layer, _ in recv)
    if senders is None:
        senders = [(layer, head) for layer in range(top) for head in range(n_heads)]
    if not senders:
        raise SpecError("no sender heads: receivers in layer 0 have no earlier heads")

    g = Graph()
    clean_run = g.run("clean", tokens=clean_ids)
    corrupt_run = g.run("corrupt", tokens=corrupt_ids)
    clean_run.read("logits", pos=metric_pos, name="clean.logits")
    corrupt_run.read("logits", pos=metric_pos, name="corrupt.logits")
    clean_heads = {layer: clean_run.read("head", layer=layer) for layer in range(n_layers)}
    clean_mlps = {layer: clean_run.read("mlp_out", layer=layer) for layer in range(n_layers)}
    corrupt_heads: dict[int, Ref] = {}
    names: list[str] = []
    for layer, head in senders:
        if layer not in corrupt_heads:
            corrupt_heads[layer] = corrupt_run.read("head", layer=layer)
        name = f"sender.{layer}.h{head}"
        first = g.run(f"{name}.freeze", tokens=clean_ids)
        first.patch("head", layer=layer, head=head, value=corrupt_heads[layer])
        frozen_until = n_layers if to_logits else max(lr for lr, _ in recv) + 1
        for other in range(layer, frozen_until):
            keep = [
                h for h in range(n_heads) if (other, h) not in recv and (other, h) != (layer, head)
            ]
            if keep:
                first.patch("head", layer=other, head=keep, value=clean_heads[other])
            # the sender's own layer's MLP already sees the sender: freeze it too
            first.patch("mlp_out", layer=other, value=clean_mlps[other])
        if to_logits:
            first.read("logits", pos=metric_pos, name=name)
        else:
            second = g.run(f"{name}.receive", tokens=clean_ids)
            for r_layer, r_head in recv:
                value = first.read(
                    "head", layer=r_layer, head=r_head, name=f"{name}.r{r_layer}.{r_head}"
                )
                second.patch("head", layer=r_layer, head=r_head, value=value)
            second.read("logits", pos=metric_pos, name=name)
        names.append(name)
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    clean_logits = res["clean.logits"]
    m_clean = metric(clean_logits, reference=clean_logits)
    m_corrupt = metric(res["corrupt.logits"], reference=clean_logits)
    layers = sorted({layer for layer, _ in senders})
    values = torch.full((len(layers), n_heads, n_prompts(clean_ids)), float("nan"))
    for (layer, head), name in zip(senders, names, strict=True):
        values[layers.index(layer), head] = metric(res[name], reference=clean_logits)
    target = "logits" if to_logits else ", ".join(f"{lr}.{h}" for lr, h in recv)
    return PatchingResult.scored(
        values,
        m_clean,
        m_corrupt,
        normalize=normalize,
        normalization=normalization,
        site=f"head->{target}",
        rows=tuple(f"head[{layer}]" for layer in layers),
        cols=tuple(f"h{h}" for h in range(n_heads)),
        direction="noise",
        graph=g,
        results=res,
    )
