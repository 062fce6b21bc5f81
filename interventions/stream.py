"""Whole datasets through one graph: chunks of prompts, reads reduced on the fly.

``iv.run(graph, model, chunk_size=256)`` runs the graph on 256 prompts at a time: row
``i`` of every run is example ``i`` (runs of one prompt are shared by every chunk).
Prompts are sorted by length first, so a chunk wastes no forward pass on short and long
prompts together, and every result comes back in dataset order.

``reduce={"name": how}`` keeps only a running reduction of a read instead of every row,
so memory stays flat as the dataset grows:

==============  ===============================================================
``"sum"``       sum over prompts (a read over whole positions: per position)
``"mean"``      mean over prompts (per position: over the prompts that reach it)
``"token_sum"`` sum over every real token of every prompt (reads with positions)
``"token_mean"`` mean over every real token
``"shards"``    each chunk written to ``shards/<name>-NNNNN.safetensors`` with its
                rows; :func:`load_shards` reads them back in dataset order
==============  ===============================================================

>>> import torch, transformers, interventions as iv
>>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
>>> g = iv.Graph()
>>> _ = g.run("data", tokens=[[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2]]).read(
...     "resid_post", layer=0, name="acts")
>>> res = iv.run(g, model, chunk_size=2, reduce={"acts": "token_mean"})
>>> res["acts"].shape
torch.Size([32])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from interventions.errors import InterventionError, SpecError, choices_text
from interventions.ops import Ablate, Add, Const, EdgePatch, Op, Patch
from interventions.plan import run_inputs
from interventions.results import Results
from interventions.runs import padded
from interventions.sites import PerPrompt
from interventions.spec import GraphSpec

REDUCTIONS = ("sum", "mean", "token_sum", "token_mean", "shards")


def _check(graph: GraphSpec, chunk_size: Any, reduce: Mapping[str, str]) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise SpecError(f"chunk_size must be a positive int, got {chunk_size!r:.40}")
    reads = set(graph.reads())
    for name, how in reduce.items():
        if name not in reads:
            raise SpecError(
                f"reduce: {name!r:.80} is not a read of the graph; reads: {choices_text(reads)}"
            )
        if how not in REDUCTIONS:
            raise SpecError(
                f"reduce[{name!r}]: unknown reduction {how!r:.40}; expected one of "
                f"{choices_text(REDUCTIONS)}"
            )
    for op in graph.ops:
        if op.select.batch is not None:
            raise SpecError(
                f"{type(op).__name__.lower()} on {op.run}.{op.site}: a graph run in chunks "
                "pairs prompts by row; batch= selectors are not allowed (use a run of its own)"
            )
        if isinstance(op, EdgePatch) and op.method == "mean":
            raise SpecError(
                f"edge_patch on {op.run}.{op.site}: a mean over a source run would be taken "
                "per chunk; run the graph whole"
            )
        if isinstance(op, Ablate) and op.source is not None:
            raise SpecError(
                f"ablate on {op.run}.{op.site}: a mean or resample over a source run would be "
                "taken per chunk; compute it first (e.g. reduce={name: 'token_mean'}) and "
                "patch it as a constant"
            )
    return chunk_size


@dataclass
class _Accumulator:
    how: str
    total: torch.Tensor | None = None
    count: torch.Tensor | float = 0.0

    def add(self, value: torch.Tensor, mask: torch.Tensor | None, side: str) -> None:
        value = value.detach()
        if self.how.startswith("token_"):
            if value.ndim < 2:
                raise SpecError("token reductions need a read with a position axis")
            # a masked read is zero at its padding (Results.mask), so a plain sum counts
            # real tokens only
            part = value.sum((0, 1))
            self.total = part if self.total is None else self.total + part
            real = value.shape[0] * value.shape[1] if mask is None else int(mask.sum())
            self.count = float(self.count) + float(real)
            return
        part = value.sum(0)
        if mask is not None:
            weights = mask.to(value.dtype).sum(0)
        else:
            weights = torch.full(value.shape[1:2] or (1,), float(value.shape[0]))
        if self.total is not None and part.shape != self.total.shape:
            self.total, part = _grow(self.total, part, side)
            count = self.count if isinstance(self.count, torch.Tensor) else torch.tensor([0.0])
            count, weights = _grow(count, weights, side, dims=1)
            self.count = count
        self.total = part if self.total is None else self.total + part
        self.count = weights if isinstance(self.count, float) else self.count + weights

    def result(self) -> torch.Tensor:
        assert self.total is not None
        if self.how in ("sum", "token_sum"):
            return self.total
        count = self.count
        if isinstance(count, torch.Tensor) and self.total.ndim >= 1 and count.numel() > 1:
            count = count.reshape(-1, *([1] * (self.total.ndim - 1)))
        return self.total / count


def _grow(
    a: torch.Tensor, b: torch.Tensor, side: str, dims: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad two tensors to a common shape (positions padded on ``side``)."""
    shape = [max(x, y) for x, y in zip(a.shape, b.shape, strict=True)]

    def pad(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(shape)
        index = tuple(
            slice(n - k, n) if side == "left" else slice(0, k)
            for n, k in zip(shape, t.shape, strict=True)
        )
        out[index] = t
        return out

    return pad(a), pad(b)


def _rows_graph(
    graph: GraphSpec,
    rows: Sequence[int],
    n: int,
    inputs: tuple[Mapping[str, torch.Tensor], Mapping[str, tuple[int, ...]]],
) -> GraphSpec:
    """The graph restricted to rows ``rows`` of every run of ``n`` prompts."""
    sub = type(graph)(tensors={}, saes=dict(graph.saes), allow_nonfinite=graph.allow_nonfinite)
    for key in {k for spec in graph.saes.values() for _, k in spec.tensors}:
        sub.tensors[key] = graph.tensors[key]
    ids, lengths = inputs
    for name, run in graph.runs.items():
        count = int(ids[name].shape[0])
        keep = list(rows) if count == n and n > 1 else list(range(count))
        if run.inputs is not None:
            key = sub._add_tensor(graph.tensors[run.inputs][keep])
            sub.runs[name] = replace(run, inputs=key)
            continue
        if run.text is not None:
            sub.runs[name] = replace(run, text=tuple(run.text[i] for i in keep))
            continue
        full = ids[name]
        if name in lengths:
            token_rows = [full[i, : lengths[name][i]].tolist() for i in keep]
            ids_rows, row_lengths = padded(token_rows)
            lens = None if row_lengths is None else torch.tensor(row_lengths)
        else:
            ids_rows, lens = full[keep], None
        sub.runs[name] = replace(
            run,
            tokens=sub._add_tensor(ids_rows),
            lengths=None if lens is None else sub._add_tensor(lens),
        )
    ops: list[Op] = []
    for op in graph.ops:
        count = int(ids[op.run].shape[0])
        chosen = list(rows) if count == n and count > 1 else [0]
        if isinstance(op.select.pos, PerPrompt) and count > 1:
            pos = op.select.pos
            op = replace(
                op,
                select=replace(
                    op.select, pos=PerPrompt(tuple(pos.positions[i] for i in chosen), pos.squeeze)
                ),
            )
        for attr in ("value", "direction"):
            value = getattr(op, attr, None)
            if isinstance(value, Const):
                t = graph.tensors[value.tensor]
                per_row = count > 1 and t.ndim >= 2 and t.shape[0] == count
                if isinstance(op, (Patch, Add)) and per_row:
                    t = t[chosen]
                fields: dict[str, Any] = {attr: Const(sub._add_tensor(t))}
                op = replace(op, **fields)
        ops.append(op)
    sub.ops = ops
    return sub


def run_in_chunks(
    graph: GraphSpec,
    tokenizer: Any,
    chunk_size: int,
    reduce: Mapping[str, str] | None,
    shards: str | os.PathLike[str] | None,
    run_chunk: Callable[[GraphSpec], Results],
    progress: bool | None = None,
) -> Results:
    """Run ``graph`` on chunks of its prompts with ``run_chunk`` and combine the results.

    Padded results are laid out on the runs' ``padding_side`` (the tokenizer's, else right).
    """
    from interventions.progress import progress as bar

    reduce = dict(reduce or {})
    _check(graph, chunk_size, reduce)
    if "shards" in reduce.values() and shards is None:
        raise SpecError("reduce=...'shards' needs shards= (a folder to write them to)")
    ids, lengths = run_inputs(graph, tokenizer)
    sizes = {int(t.shape[0]) for t in ids.values()} - {1}
    if len(sizes) > 1:
        raise SpecError(
            f"runs in chunks pair prompts by row: every run needs the same number of prompts "
            f"(or one), got {sorted(sizes)}"
        )
    n = sizes.pop() if sizes else 1

    def row_length(i: int) -> int:
        return max(
            lengths[name][i] if name in lengths else int(t.shape[1]) if t.ndim > 1 else 1
            for name, t in ids.items()
            if int(t.shape[0]) == n
        )

    order = sorted(range(n), key=row_length)
    chunks = [order[i : i + chunk_size] for i in range(0, n, chunk_size)]
    acc = {name: _Accumulator(how) for name, how in reduce.items() if how != "shards"}
    kept: dict[str, list[tuple[list[int], torch.Tensor, torch.Tensor | None]]] = {}
    provenance = None
    sides = {r.padding_side for r in graph.runs.values()} - {None}
    side = sides.pop() if len(sides) == 1 else getattr(tokenizer, "padding_side", "right")
    side = side if side in ("left", "right") else "right"
    for k, rows in enumerate(bar(chunks, progress, desc="chunks")):
        res = run_chunk(_rows_graph(graph, rows, n, (ids, lengths)))
        provenance = provenance or res.provenance
        for name in res:
            value, mask = res[name], res.mask(name)
            how = reduce.get(name)
            if how == "shards":
                _write_shard(Path(shards), name, k, rows, value, mask)  # type: ignore[arg-type]
            elif how is not None:
                acc[name].add(value, mask, side)
            else:
                kept.setdefault(name, []).append((rows, value, mask))
    tensors: dict[str, torch.Tensor] = {name: a.result() for name, a in acc.items()}
    masks: dict[str, torch.Tensor] = {}
    for name, parts in kept.items():
        tensors[name], mask = _combine(parts, n, side)
        if mask is not None:
            masks[name] = mask
    assert provenance is not None
    order_names = [name for name in graph.reads() if name in tensors]
    return Results({k: tensors[k] for k in order_names}, provenance, masks=masks)


def _combine(
    parts: list[tuple[list[int], torch.Tensor, torch.Tensor | None]], n: int, side: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunks' rows back in dataset order (zero-padded, with a mask, when they differ)."""
    first = parts[0][1]
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return first, parts[0][2]
    if first.ndim == 0 or any(t.ndim == 0 or t.shape[0] != len(r) for r, t, _ in parts):
        raise InterventionError("a read without a prompt axis cannot be combined over chunks")
    shape = [n, *(max(t.shape[d] for _, t, _ in parts) for d in range(1, first.ndim))]
    out = first.new_zeros(shape)
    padded = any(m is not None for _, _, m in parts) or any(
        list(t.shape[1:]) != shape[1:] for _, t, _ in parts
    )
    mask = torch.zeros(n, shape[1], dtype=torch.bool) if padded and len(shape) > 1 else None
    for rows, t, m in parts:
        index: list[Any] = [torch.tensor(rows)]
        for d in range(1, t.ndim):
            full, size = shape[d], t.shape[d]
            index.append(slice(full - size, full) if side == "left" else slice(0, size))
        out[tuple(index)] = t
        if mask is not None:
            real = m if m is not None else torch.ones(t.shape[0], t.shape[1], dtype=torch.bool)
            mask[index[0], index[1]] = real
    return out, mask


def _write_shard(
    folder: Path, name: str, k: int, rows: list[int], value: torch.Tensor, mask: torch.Tensor | None
) -> None:
    from safetensors.torch import save

    from interventions.tensorfile import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    tensors = {"value": value.detach().cpu().contiguous(), "rows": torch.tensor(rows)}
    if mask is not None:
        tensors["mask"] = mask.contiguous()
    write_atomic(folder / f"{safe}-{k:05d}.safetensors", save(tensors))


def load_shards(
    folder: str | os.PathLike[str], name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A read written as shards, in dataset order, and its mask when it is padded."""
    from safetensors.torch import load_file

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    files = sorted(Path(folder).glob(f"{safe}-[0-9][0-9][0-9][0-9][0-9].safetensors"))
    if not files:
        raise InterventionError(f"no shards of {name!r} in {str(folder)!r}")
    parts = []
    for f in files:
        t = load_file(str(f))
        parts.append((t["rows"].tolist(), t["value"], t.get("mask")))
    n = sum(len(r) for r, _, _ in parts)
    return _combine(parts, n, "right")
