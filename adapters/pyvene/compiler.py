"""One run of a plan compiled into pyvene representations (one per op)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from interventions.architectures import HookPoint
from interventions.ops import Const, Op, Patch, Read, Ref
from interventions.plan import Plan
from interventions.sites import Site

from .classes import _classes, _RunContext, _Target


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


def _component(point: HookPoint) -> str:
    return f"model.{point.module}.{point.io}" if point.module else f"model.{point.io}"


def _compile(plan: Plan, run: str, ctx: _RunContext) -> _Compiled:
    """The run's representations: grouped by hook point, in graph order within each.

    Grouping follows the torch reference, which keeps one hook per hook point in order of
    first use; so two views of one tensor (``head`` and a raw ``o_proj.input``) apply in
    the same order on both backends. Reads of one point share a collect until a write.
    """
    import pyvene as pv

    classes = _classes()
    info = plan.info
    entries: dict[HookPoint, list[Op | Site]] = {}  # a Site: a capture for an ablation
    for op in plan.ops_of(run):
        entries.setdefault(info.hook_point(op.site), []).append(op)
    for site in plan.captures_of(run):
        entries.setdefault(info.hook_point(site), []).append(site)

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

    for point, items in entries.items():
        if point.io == "input":
            out.inputs.setdefault(point.module, False)
        shared: _Collect | None = None
        for item in items:
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
            if op.site.is_raw or ctx.grad:
                # a raw tensor may be aliased by its caller; with gradients, autograd may
                # have saved it (GPT-2's o_proj input is a view of the SDPA output)
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
