"""The batching pass of the planner: many small runs become a few batched forward passes.

A sweep of hundreds of patched runs over the same tokens is the common case. This pass
rewrites a graph into an equivalent one whose independent runs of equal shape share one
forward pass, each old run one block of batch rows, under a memory budget. It is a
graph-to-graph rewrite, so every backend gets it for free and the conformance suite can
hold the batched graph to the unbatched one.

What stays a run of its own: generating runs, runs that are the source of a mean or
resample ablation, runs targeted by a resample ablation (its draws depend on batch size),
and runs with raw input tensors of different shapes.

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> clean = g.run("clean", tokens=torch.tensor([[1, 2, 3]]))
>>> h = clean.read("resid_post", layer=0)
>>> for p in range(3):
...     r = g.run(f"p{p}", tokens=torch.tensor([[1, 4, 3]]))
...     r.patch("resid_post", layer=0, pos=p, value=h)
...     _ = r.read("logits", pos=-1, name=f"out{p}")
>>> batched = batch_graph(g, Budget(max_items=8)).graph
>>> list(batched.runs), batched.runs["batch1"].tokens is not None
(['clean', 'batch1'], True)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from interventions.architectures import ModelInfo
from interventions.devices import free_bytes
from interventions.ops import Ablate, EdgePatch, Grad, Op, Patch, Read, Ref, SAESplice, source_run
from interventions.sites import Index, Select, Span
from interventions.spec import GraphSpec, Run

DERIVED = "__aligned__"


@dataclass(frozen=True)
class Budget:
    """Upper bounds for one batched forward pass: batch items and estimated bytes.

    >>> Budget(max_items=64).max_items
    64
    """

    max_items: int | None = 256
    max_bytes: int | None = 2 * 1024**3

    def __post_init__(self) -> None:
        for name in ("max_items", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Budget.{name} must be a positive int or None, got {value!r}")

    @classmethod
    def for_model(cls, model: nn.Module, fraction: float = 0.5) -> Budget:
        """The default budget, with ``max_bytes`` set to ``fraction`` of the real free memory
        of the model's tightest CUDA device (:func:`interventions.devices.free_bytes`) when
        its parameters are on CUDA; the plain default otherwise.

        >>> Budget.for_model(torch.nn.Linear(2, 2)) == Budget()  # a CPU model
        True
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"Budget.for_model: fraction must be in (0, 1], got {fraction!r}")
        free = free_bytes(model)
        if free is None:
            return cls()
        return cls(max_bytes=max(1, int(free * fraction)))

    def rows(self, seq: int, info: ModelInfo | None) -> int | None:
        """How many batch items of ``seq`` positions one forward pass may hold (at least 1;
        ``None``: no bound).

        >>> Budget(max_items=64, max_bytes=None).rows(18, None)
        64
        """
        limits = []
        if self.max_items is not None:
            limits.append(self.max_items)
        if self.max_bytes is not None:
            limits.append(max(1, self.max_bytes // bytes_per_item(seq, info)))
        return min(limits) if limits else None


@dataclass(frozen=True)
class Batched:
    """A rewritten graph, and which of its results are internal to the rewrite."""

    graph: GraphSpec
    internal: frozenset[str]
    groups: tuple[tuple[str, ...], ...]  # old runs sharing each new run


def bytes_per_item(seq: int, info: ModelInfo | None) -> int:
    """A rough activation footprint of one batch item of ``seq`` positions (fp32)."""
    if info is None or not info.d_model:
        return seq * 4 * 4096
    layers = info.n_layers or 1
    per_position = info.d_model * layers * 16 + (info.vocab or 0) + (info.d_mlp or 0) * layers
    return seq * per_position * 4


def _shift(index: Index, offset: int, size: int) -> Index:
    """A batch selector of one old run, moved to rows ``offset .. offset+size``."""
    if index is None:
        return Span(offset, offset + size)
    if isinstance(index, int):
        return offset + index % size
    if isinstance(index, Span):
        return tuple(offset + i for i in index.indices(size))
    assert isinstance(index, tuple), "only pos= is chosen prompt by prompt"
    return tuple(offset + i % size for i in index)


def _dealign(graph: GraphSpec) -> tuple[list[Op], set[str]]:
    """Give every aligned patch its own explicitly selected read of the source."""
    reads = {op.name: op for op in graph.ops if isinstance(op, Read)}
    derived: dict[tuple[str, Select], str] = {}
    extra: dict[str, list[Read]] = {}  # source read -> its derived reads
    ops: list[Op] = []
    for op in graph.ops:
        if (
            isinstance(op, Patch)
            and isinstance(op.value, Ref)
            and op.value.read in reads
            and reads[op.value.read].select.is_all
        ):
            source = reads[op.value.read]
            # a batch Span over everything keeps the read non-aligned yet unchanged
            select = replace(
                op.select, batch=Span() if op.select.batch is None else op.select.batch
            )
            key = (op.value.read, select)
            if key not in derived:
                derived[key] = f"{DERIVED}{len(derived)}:{op.value.read}"
                extra.setdefault(source.name, []).append(
                    Read(source.run, source.site, select, derived[key])
                )
            op = replace(op, value=Ref(derived[key]))
        ops.append(op)
    # derived reads go right after their source read, so they see the same value
    out: list[Op] = []
    for op in ops:
        out.append(op)
        if isinstance(op, Read):
            out.extend(extra.get(op.name, []))
    return out, set(derived.values())


def _stages(graph: GraphSpec, ops: Iterable[Op]) -> list[list[str]]:
    """Runs by dependency level: a run's values and sources all come from earlier levels."""
    producer = {name: op.run for op in ops if isinstance(op, Read) for name in [op.name]}
    producer.update(
        {op.features: op.run for op in ops if isinstance(op, SAESplice) and op.features}
    )
    needs: dict[str, set[str]] = {r: set() for r in graph.runs}
    for op in ops:
        if isinstance(op, Patch) and isinstance(op.value, Ref):
            needs[op.run].add(producer[op.value.read])
        source = source_run(op)
        if source is not None:
            needs[op.run].add(source)
    level: dict[str, int] = {}
    for run in graph.run_order():
        level[run] = 1 + max((level[d] for d in needs[run]), default=-1)
    stages: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for run in graph.runs:
        stages[level[run]].append(run)
    return stages


def _solo(graph: GraphSpec, ops: list[Op]) -> set[str]:
    solo = {r.name for r in graph.runs.values() if r.generates or r.text is not None}
    for op in ops:
        if isinstance(op, Ablate) and op.source is not None:
            solo.add(op.source)
            if op.method == "resample":
                solo.add(op.run)
        if isinstance(op, EdgePatch) and op.source is not None:
            # the source keeps its own rows: each batched run's block pairs with them row
            # for row (its value 'here' is the block's own rows, see apply.edge_delta)
            solo.add(op.source)
        if isinstance(op, EdgePatch) and op.select.batch is not None:
            solo.add(op.run)  # its own blocks of rows already (ACDC's stacked candidates)
        if isinstance(op, Grad):  # its metric's token ids are the run's own, row for row
            solo.add(op.run)
    return solo


def _shape_key(
    graph: GraphSpec, run: Run, inputs: Mapping[str, torch.Tensor]
) -> tuple[object, ...]:
    t = inputs[run.name]
    return ("tokens" if run.tokens is not None else "inputs", tuple(t.shape[1:]), t.dtype)


def batch_graph(
    graph: GraphSpec,
    budget: Budget | None = None,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    info: ModelInfo | None = None,
) -> Batched:
    """Rewrite ``graph`` so that independent runs of equal shape share forward passes.

    ``inputs`` are the runs' concrete inputs (for text runs, after tokenization); by
    default the graph's own token/input tensors. The result has the same read names.
    """
    budget = budget or Budget()
    if inputs is None:
        inputs = {
            r.name: graph.tensors[r.tokens if r.tokens is not None else r.inputs]  # type: ignore[index]
            for r in graph.runs.values()
            if r.text is None
        }
    ops, internal = _dealign(graph)
    solo = _solo(graph, ops)
    groups: list[list[str]] = []
    for stage in _stages(graph, ops):
        open_groups: dict[tuple[object, ...], list[str]] = {}
        sizes: dict[tuple[object, ...], int] = {}
        for name in stage:
            run = graph.runs[name]
            if name in solo:
                groups.append([name])
                continue
            key = _shape_key(graph, run, inputs)
            n = int(inputs[name].shape[0])
            seq = int(inputs[name].shape[1]) if inputs[name].ndim > 1 else 1
            limit = budget.rows(seq, info)
            if key in open_groups and limit is not None and sizes[key] + n > limit:
                groups.append(open_groups.pop(key))
                sizes.pop(key)
            open_groups.setdefault(key, []).append(name)
            sizes[key] = sizes.get(key, 0) + n
        groups.extend(open_groups.values())

    new = type(graph)(tensors=dict(graph.tensors), saes=dict(graph.saes))
    where: dict[str, tuple[str, int, int]] = {}  # old run -> (new run, offset, size)
    for i, members in enumerate(groups):
        if len(members) == 1:
            name = members[0]
            new.runs[name] = graph.runs[name]
            where[name] = (name, 0, -1)
            continue
        new_name = f"batch{i}"
        while new_name in graph.runs:
            new_name += "_"
        first = graph.runs[members[0]]
        stacked = torch.cat([inputs[m] for m in members], dim=0)
        tensor_key = new._add_tensor(stacked)
        new.runs[new_name] = Run(
            new_name,
            tokens=tensor_key if first.tokens is not None else None,
            inputs=tensor_key if first.inputs is not None else None,
        )
        offset = 0
        for m in members:
            size = int(inputs[m].shape[0])
            where[m] = (new_name, offset, size)
            offset += size
    for op in ops:
        target, offset, size = where[op.run]
        if size < 0:
            new.ops.append(op)
            continue
        select = replace(op.select, batch=_shift(op.select.batch, offset, size))
        new.ops.append(replace(op, run=target, select=select))
    new.ops = _merge_edge_patches(new.ops)
    return Batched(new, frozenset(internal), tuple(tuple(g) for g in groups))


def _merge_edge_patches(ops: list[Op]) -> list[Op]:
    """One op for consecutive edge patches that differ only in their adjacent row blocks
    (a circuit's edges shared by every candidate run of a sweep, written edge by edge):
    an edge patch is row-local, so patching rows ``a..b`` then ``b..c`` is patching
    ``a..c``."""
    out: list[Op] = []
    for op in ops:
        last = out[-1] if out else None
        if (
            isinstance(op, EdgePatch)
            and isinstance(last, EdgePatch)
            and isinstance(op.select.batch, Span)
            and isinstance(last.select.batch, Span)
            and last.select.batch.stop is not None
            and last.select.batch.stop == op.select.batch.start
            and last.select.batch.step in (None, 1)
            and op.select.batch.step in (None, 1)
            and replace(last, select=replace(last.select, batch=op.select.batch)) == op
        ):
            batch = Span(last.select.batch.start, op.select.batch.stop)
            out[-1] = replace(last, select=replace(last.select, batch=batch))
            continue
        out.append(op)
    return out
