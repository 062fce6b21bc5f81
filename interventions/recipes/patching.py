"""Activation patching as a graph, and what the patching recipes share (the result type,
layer and position choices). Path patching is in :mod:`interventions.recipes.patching_paths`,
attribution patching in :mod:`interventions.recipes.patching_grads`.

Each recipe builds one graph (every patched copy a run of its own), runs it with
:func:`interventions.run` on any backend (the planner batches the copies into a few
forward passes), and reduces the logits with a :class:`Metric`.

>>> import torch, interventions as iv
>>> from interventions.recipes import activation_patching, Metric
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=20)).eval()
>>> clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
>>> result = activation_patching(model, clean, corrupt, Metric.logit_diff(7, 8))
>>> result.scores.shape  # resid_pre of 2 layers x 4 positions
torch.Size([2, 4])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError, choices_text
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.inputs import (
    Prompts,
    Tokens,
    _lengths,
    _model,
    as_pairs,
)
from interventions.recipes.metrics import (
    Metric,
    Normalization,
    batch_score,
    bootstrap_interval,
    check_normalization,
    standard_error,
)
from interventions.results import Results
from interventions.sites import IndexLike

PATCHABLE_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "mlp_hidden", "head", "embed")
Direction = Literal["denoise", "noise"]


@dataclass(frozen=True, eq=False)
class PatchingResult:
    """Scores of a patching sweep: rows (layers or senders) x columns (positions or heads)."""

    scores: torch.Tensor
    site: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    clean_metric: float
    corrupt_metric: float
    normalized: bool
    direction: Direction
    graph: Graph
    results: Results | None = None
    values: torch.Tensor | None = None  # [rows, cols, batch]: each example's raw metric
    clean_values: torch.Tensor | None = None  # [batch]
    corrupt_values: torch.Tensor | None = None  # [batch]
    normalization: Normalization = "batch_mean"

    @classmethod
    def scored(
        cls,
        values: torch.Tensor,
        clean_values: torch.Tensor,
        corrupt_values: torch.Tensor,
        *,
        normalize: bool,
        normalization: Normalization,
        site: str,
        rows: tuple[str, ...],
        cols: tuple[str, ...],
        direction: Direction,
        graph: Graph,
        results: Results | None,
    ) -> PatchingResult:
        """A sweep's result from each prompt's metric: ``values`` ``[rows, cols, batch]``,
        and the clean and corrupted runs' ``[batch]``, scored by :func:`batch_score`.

        >>> v, clean, corrupt = torch.tensor([[[0.5, 1.5]]]), torch.full((2,), 2.0), torch.zeros(2)
        >>> r = PatchingResult.scored(
        ...     v, clean, corrupt, normalize=True, normalization="batch_mean", site="resid_pre",
        ...     rows=("resid_pre[0]",), cols=("0",), direction="denoise", graph=Graph(),
        ...     results=None,
        ... )
        >>> r.scores, r.clean_metric
        (tensor([[0.5000]]), 2.0)
        """
        scores = batch_score(
            values, clean_values, corrupt_values, normalize=normalize, normalization=normalization
        )
        return cls(
            scores=scores,
            site=site,
            rows=rows,
            cols=cols,
            clean_metric=float(clean_values.mean()),
            corrupt_metric=float(corrupt_values.mean()),
            normalized=normalize,
            direction=direction,
            graph=graph,
            results=results,
            values=values,
            clean_values=clean_values,
            corrupt_values=corrupt_values,
            normalization=normalization,
        )

    def _per_example(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.values is None or self.clean_values is None or self.corrupt_values is None:
            raise SpecError("this result kept no per-example values")
        return self.values, self.clean_values, self.corrupt_values

    @property
    def stderr(self) -> torch.Tensor:
        """The standard error of each score over the batch (NaN for one prompt); see
        :func:`interventions.recipes.metrics.standard_error`."""
        v, k, c = self._per_example()
        return standard_error(v, k, c, normalize=self.normalized, normalization=self.normalization)

    def bootstrap(
        self, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Percentile bootstrap interval ``(low, high)`` of each score over the prompts."""
        v, k, c = self._per_example()
        return bootstrap_interval(
            v,
            k,
            c,
            normalize=self.normalized,
            normalization=self.normalization,
            n_resamples=n_resamples,
            confidence=confidence,
            seed=seed,
        )

    def table(self, fmt: str = "{:+.2f}") -> str:
        """The scores as an aligned text table."""
        from interventions.plots import format_table

        return format_table(self.scores, self.rows, self.cols, fmt=fmt)

    def heatmap(
        self,
        path: str | os.PathLike[str],
        *,
        col_labels: Sequence[str] | None = None,
        title: str | None = None,
    ) -> Path:
        """Write the scores as a heat map PNG (token labels for position columns)."""
        from interventions.plots import heatmap

        what = "0 = corrupted, 1 = clean" if self.normalized else "metric"
        return heatmap(
            self.scores,
            path,
            row_labels=self.rows,
            col_labels=list(col_labels) if col_labels is not None else self.cols,
            title=title or f"{self.direction} patching of {self.site}",
            xlabel="head" if self.site == "head" and self.cols[0].startswith("h") else "position",
            ylabel="layer",
            colorbar_label=what,
        )


def _layers(layers: Sequence[int] | None, n_layers: int | None, site: str) -> list[int]:
    if site == "embed":
        return [0]
    if n_layers is None:
        raise SpecError("the model has no architecture map; patching recipes need standard sites")
    if layers is None:
        return list(range(n_layers))
    out = [layer % n_layers if -n_layers <= layer < 0 else layer for layer in layers]
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad:
        raise SpecError(f"layers {bad} out of range 0..{n_layers - 1}")
    return out


def _check_sweep(direction: str, normalization: str) -> None:
    """A sweep's ``direction`` and ``normalization`` are ones it knows."""
    if direction not in ("denoise", "noise"):
        raise SpecError(f"unknown direction {direction!r}; expected denoise, noise")
    check_normalization(normalization)


def _metric_values(
    metric: Metric, logits: torch.Tensor, clean_logits: torch.Tensor
) -> torch.Tensor:
    return metric(logits, reference=clean_logits)


def activation_patching(
    model: nn.Module | str,
    clean: Tokens,
    corrupt: Tokens,
    metric: Metric,
    *,
    site: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Mapping[str, IndexLike] | None = None,
    per_position: bool | None = None,
    direction: Direction = "denoise",
    normalize: bool = True,
    normalization: Normalization = "batch_mean",
    metric_pos: int = -1,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> PatchingResult:
    """Patch ``site`` at each layer x position (or layer x head) between two inputs.

    ``direction="denoise"`` patches clean activations into the corrupted run (what
    restores the answer); ``"noise"`` patches corrupted activations into the clean run
    (what breaks it). ``positions`` (default: all) are the positions patched, and
    ``per_position`` says whether each is a cell of its own or all are patched at once:

    ==============  ======================  ===========================================
    site            per_position            columns
    ==============  ======================  ===========================================
    residual sites  True (their default)    one per position (``"3"``)
    residual sites  False                   one, ``"all"``: every position at once
    ``head``        False (its default)     one per head (``"h2"``), at every position
    ``head``        True                    one per (position, head), ``"3.h2"``,
                                            position-major: ``scores.unflatten(1,
                                            (n_positions, n_heads))`` is TransformerLens's
                                            ``[layer, pos, head]`` by-position grid
    ==============  ======================  ===========================================

    Scores are the batch mean
    of the metric at ``metric_pos``, normalised by default to 0 = corrupted, 1 = clean
    *after* averaging: ``(mean m - mean m_corrupt) / (mean m_clean - mean m_corrupt)``,
    so one prompt whose clean and corrupted metrics nearly coincide cannot blow up the
    score, as normalising each prompt and then averaging would.

    Prompts of different lengths (lists of ids, or texts; clean and corrupted paired one to
    one, of equal or different lengths) work like any other: positions count in each
    prompt's own tokens, so ``positions`` are then negative (``-1`` is each prompt's last
    token; the default is every position the shortest prompt has, counted from the end)
    or named per-prompt positions, ``{"S2": iv.token_positions(...), "END": -1}``.
    ``normalization="per_example"`` does that instead (TransformerLens's usual
    normalised metric): ``mean((m - m_corrupt) / (m_clean - m_corrupt))``.

    The result keeps every prompt's metric (``values``, ``[rows, cols, batch]``), so
    ``result.stderr`` (standard error over the prompts) and ``result.bootstrap()`` (a
    percentile interval) report the spread of each score.
    """
    if site not in PATCHABLE_SITES:
        raise SpecError(f"cannot sweep site {site!r}; sites: {choices_text(PATCHABLE_SITES)}")
    _check_sweep(direction, normalization)
    model, tokenizer = _model(model, tokenizer, run_options)
    clean_ids, corrupt_ids = as_pairs(clean, corrupt, tokenizer)
    info = describe(model)
    rows = _layers(layers, info.n_layers, site)
    target_ids = corrupt_ids if direction == "denoise" else clean_ids

    g = Graph()
    clean_run = g.run("clean", tokens=clean_ids)
    corrupt_run = g.run("corrupt", tokens=corrupt_ids)
    clean_run.read("logits", pos=metric_pos, name="clean.logits")
    corrupt_run.read("logits", pos=metric_pos, name="corrupt.logits")
    source = clean_run if direction == "denoise" else corrupt_run
    if per_position is None:
        per_position = site != "head"
    if not isinstance(per_position, bool):
        raise SpecError(f"per_position must be True, False or None, got {per_position!r}")
    named = _cell_positions(positions, clean_ids, corrupt_ids)
    pos_list = [sel for _, sel in named]
    ragged = len(set(_lengths(clean_ids) + _lengths(corrupt_ids))) > 1
    # each cell: a label and the (pos, head) selector it patches
    cell_sels: list[tuple[str, Any, int | None]]
    if site == "head":
        heads = range(info.n_heads or 0)
        if per_position:
            cell_sels = [(f"{label}.h{h}", p, h) for label, p in named for h in heads]
        else:
            pos_sel: Any = None if positions is None and not ragged else _joint(pos_list)
            cell_sels = [(f"h{h}", pos_sel, h) for h in heads]
    elif per_position:
        cell_sels = [(label, p, None) for label, p in named]
    else:
        whole = positions is None and not ragged
        cell_sels = [("all", None if whole else _joint(pos_list), None)]
    col_labels = [label for label, _, _ in cell_sels]
    cells: list[list[str]] = []
    for layer in rows:
        lay = None if site == "embed" else layer
        value = source.read(site, layer=lay)
        row = []
        for label, pos, head in cell_sels:
            name = f"cell.{layer}.{label}"
            r = g.run(name, tokens=target_ids)
            r.patch(site, layer=lay, pos=pos, head=head, value=value)
            r.read("logits", pos=metric_pos, name=name)
            row.append(name)
        cells.append(row)
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    clean_logits = res["clean.logits"]
    m_clean = _metric_values(metric, clean_logits, clean_logits)
    m_corrupt = _metric_values(metric, res["corrupt.logits"], clean_logits)
    values = torch.stack(
        [
            torch.stack([_metric_values(metric, res[name], clean_logits) for name in row])
            for row in cells
        ]
    )  # [rows, cols, batch]
    return PatchingResult.scored(
        values,
        m_clean,
        m_corrupt,
        normalize=normalize,
        normalization=normalization,
        site=site,
        rows=tuple(f"{site}[{layer}]" if site != "embed" else "embed" for layer in rows),
        cols=tuple(col_labels),
        direction=direction,
        graph=g,
        results=res,
    )


def _cell_positions(
    positions: Sequence[int] | Mapping[str, IndexLike] | None, clean: Prompts, corrupt: Prompts
) -> list[tuple[str, Any]]:
    """The (label, selector) of every position a sweep patches."""
    lengths = _lengths(clean) + _lengths(corrupt)
    ragged = len(set(lengths)) > 1
    shortest = min(lengths)
    if isinstance(positions, Mapping):
        return [(str(label), sel) for label, sel in positions.items()]
    if positions is None:
        if ragged:  # every position the shortest prompt has, counted from each prompt's end
            return [(str(p), p) for p in range(-shortest, 0)]
        return [(str(p), p) for p in range(shortest)]
    if ragged:
        bad = [p for p in positions if not -shortest <= p < 0 and not 0 <= p < shortest]
        if bad:
            raise SpecError(
                f"positions {bad} do not exist in every prompt (the shortest has {shortest} "
                "tokens); use negative positions or named per-prompt positions"
            )
        return [(str(p), p) for p in positions]
    return [(str(p % shortest), p % shortest) for p in positions]


def _joint(selectors: Sequence[Any]) -> Any:
    """Several positions patched at once: a list of ints (per-prompt ones not joined)."""
    if all(isinstance(p, int) for p in selectors):
        return list(selectors)
    raise SpecError("per_position=False takes int positions; patch named positions one by one")
