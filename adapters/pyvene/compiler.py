"""One run of a plan compiled into pyvene representations (one per op)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from interventions.architectures import HookPoint
from interventions.attention import QKV_VIEWS, SPLIT_VIEWS
from interventions.ops import Const, EdgePatch, Op, Patch, Read, Ref
from interventions.plan import Plan
from interventions.sites import Site

from .classes import _classes, _RunContext, _Target
from .internals import _Internals, _Live, internals_classes


@dataclass
class _Collect:
    """A CollectIntervention's consumers: reads (by op) and ablation captures (by site)."""

    point: HookPoint
    reads: list[Read] = field(default_factory=list)
    captures: list[Site] = field(default_factory=list)


@dataclass
class _Compiled:
    representations: list[Any] = field(default_factory=list)
    collects: dict[int, _Collect] = field(default_factory=dict)  # representation index ->
    sources: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> source value
    inputs: dict[str, bool] = field(default_factory=dict)  # input site -> private copy?
    private_outputs: list[str] = field(default_factory=list)
    blocks: set[int] = field(default_factory=set)  # layers whose block input is recorded


def _component(point: HookPoint) -> str:
    return f"model.{point.module}.{point.io}" if point.module else f"model.{point.io}"


def _segments(
    items: list[tuple[HookPoint, Op | Site | _Live]],
) -> list[tuple[HookPoint, list[Op | Site | _Live]]]:
    """Items grouped by hook point in order of first use, graph order within a point, as
    the torch reference's hooks. At a q/k/v projection (whose output holds q, k, v and the
    per-head inputs, each a view) the reference applies the ops in graph order, one run
    of consecutive ops at one view at a time: so there a point gets a new group whenever
    an op at another view of the same module came between."""
    out: list[tuple[HookPoint, list[Op | Site | _Live]]] = []
    plain: dict[HookPoint, int] = {}
    last_at: dict[str, int] = {}  # q/k/v module -> index of its latest group
    for point, item in items:
        if point.view in QKV_VIEWS or point.view in SPLIT_VIEWS:
            i = last_at.get(point.module)
            if i is None or out[i][0] != point:
                out.append((point, []))
                i = last_at[point.module] = len(out) - 1
            out[i][1].append(item)
            continue
        if point not in plain:
            out.append((point, []))
            plain[point] = len(out) - 1
        out[plain[point]][1].append(item)
    return out


def _compile(plan: Plan, run: str, ctx: _RunContext, model: nn.Module) -> _Compiled:
    """The run's representations: grouped by hook point, in graph order within each.

    Grouping follows the torch reference, which keeps one hook per hook point in order of
    first use; so two views of one tensor (``head`` and a raw ``o_proj.input``) apply in
    the same order on both backends. Reads of one point share a collect until a write.
    """
    import pyvene as pv

    classes = _classes()
    info = plan.info
    # a Site: a capture for an ablation; a _Live: an edge's upstream value of this run
    items_in_order: list[tuple[HookPoint, Op | Site | _Live]] = [
        (info.hook_point(op.site), op) for op in plan.ops_of(run)
    ]
    items_in_order += [(info.hook_point(site), site) for site in plan.captures_of(run)]
    live = {op.upstream for op in plan.ops_of(run) if isinstance(op, EdgePatch)}
    items_in_order += [(info.hook_point(site), _Live(site)) for site in sorted(live, key=str)]
    entries = _segments(items_in_order)
    if live or any(point.view in SPLIT_VIEWS for point, _ in entries):
        ctx.internals = _Internals(model, info)

    out = _Compiled()

    def add(point: HookPoint, intervention: Any) -> int:
        out.representations.append(
            pv.RepresentationConfig(component=_component(point), intervention=intervention)
        )
        return len(out.representations) - 1

    def private(point: HookPoint) -> None:
        if point.io == "input":
            out.inputs[point.module] = True
        elif point.module not in out.private_outputs:
            out.private_outputs.append(point.module)

    split, edge, live_class = internals_classes() if ctx.internals is not None else (None,) * 3
    for point, items in entries:
        if point.io == "input":
            out.inputs.setdefault(point.module, False)
        if point.view in SPLIT_VIEWS:  # every op of a per-head input in one intervention
            assert split is not None and point.layer is not None
            private(point)
            ops = [i for i in items if not isinstance(i, _Live)]
            add(point, split(point, ops, ctx, run))
            out.blocks.add(point.layer)
            continue
        shared: _Collect | None = None
        for item in items:
            if isinstance(item, _Live):
                assert live_class is not None
                add(point, live_class(item.site, point, ctx))
                continue
            if isinstance(item, EdgePatch):
                assert edge is not None
                private(point)  # a raw norm input: its caller holds the residual stream
                shared = None
                add(point, edge(item, point, ctx))
                continue
            if isinstance(item, Read) and ctx.grad and not ctx.generating:
                private(point)
                add(point, classes.read(_Target(item, point, ctx)))
                continue
            if isinstance(item, (Read, Site)):
                if shared is None:
                    shared = _Collect(point)
                    out.collects[add(point, classes.collect(keep_last_dim=True))] = shared
                if isinstance(item, Read):
                    shared.reads.append(item)
                else:
                    shared.captures.append(item)
                continue
            shared = None  # later reads must see this write
            op = item
            if (op.site.is_raw or ctx.grad) and point.view != "resid":
                # a raw tensor may be aliased by its caller; with gradients, autograd may
                # have saved it (GPT-2's o_proj input is a view of the SDPA output). The
                # resid view (resid_mid) is written into the residual stream on purpose.
                private(point)
            if isinstance(op, Patch) and isinstance(op.value, Ref):
                # a whole-site read is aligned; a selected read or SAE features are not
                value = ctx.state.results[op.value.read]
                target = _Target(
                    op,
                    point,
                    ctx,
                    aligned=plan.aligned(op.value.read),
                    scalar_source=value.ndim == 0,
                )
                # pyvene's generate reads ``source[0]`` of every source (its stateful-model
                # bookkeeping), which a 0-d tensor does not have
                out.sources[add(point, classes.patch(target))] = (
                    value.reshape(1) if value.ndim == 0 else value
                )
            elif isinstance(op, Patch):
                assert isinstance(op.value, Const)
                constant = plan.graph.tensors[op.value.tensor]
                add(point, classes.patch(_Target(op, point, ctx), constant))
            else:
                add(point, classes.op(_Target(op, point, ctx)))
    return out
