"""Attention internals on pyvene: the per-head inputs of q, k and v, and edge patches.

Kept apart from the other intervention classes (:mod:`.classes`) so that the two grow
separately. Both follow the torch reference's arithmetic, from the core:

* a **per-head input** (``q_input``, ``k_input``, ``v_input``; the ``split_*`` views)
  lives at a q/k/v projection's output. Each head's copy of the block input is the block
  input itself until an op changes it; a change is written as
  ``W_h (norm(x_h') - norm(x))`` added to that head's part of the projection's output
  (:func:`interventions.attention.split_input_delta`), exactly zero for unchanged heads.
  The block input is recorded by a pre-hook on the block that the wrapper installs for
  the call (:class:`.model._Wrapped`), before pyvene's own hooks run. Every op at such a
  site runs in one :class:`SplitIntervention`, in graph order.
* an **edge patch** adds ``(upstream output in the source run - upstream output here)``
  into its downstream input (:func:`interventions.apply.apply_edge_patch`). "Here" is the
  upstream node's value in this very run, after this run's other edits, recorded by a
  :class:`LiveIntervention` at the upstream site; the source run's value is its whole-site
  capture (a pyvene ``CollectIntervention`` in that run).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from interventions.apply import apply_edge_patch, apply_op, edge_operands
from interventions.architectures import HookPoint, ModelInfo
from interventions.attention import projection_weight, qkv_view, split_input_delta
from interventions.ops import EdgePatch, Op, Read
from interventions.plan import absolute_select, step_select
from interventions.selection import put, site_axes, take
from interventions.sites import Select, Site

from .classes import _RunContext, _view_in


@dataclass(frozen=True)
class _Live:
    """Record an edge's upstream node value of this run, for its edge patches."""

    site: Site


@dataclass
class _Internals:
    """What the internals interventions of one run share: the model (norms, weights),
    the block inputs of the current call, this run's live upstream values, and the
    per-call values read at per-head inputs (concatenated at the end of the run)."""

    model: nn.Module
    info: ModelInfo
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    live: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[tuple[str, Any], list[torch.Tensor]] = field(default_factory=dict)
    copies: dict[HookPoint, tuple[int, torch.Tensor]] = field(default_factory=dict)

    def module(self, layer: int, path: str) -> nn.Module:
        arch = self.info.arch
        assert arch is not None
        return self.model.get_submodule(f"{arch.layers}.{layer}.{path}")

    def block_modules(self, layers: set[int]) -> list[tuple[nn.Module, int]]:
        arch = self.info.arch
        assert arch is not None
        return [(self.model.get_submodule(f"{arch.layers}.{n}"), n) for n in sorted(layers)]

    @property
    def dims(self) -> tuple[int, int, int]:
        info = self.info
        assert info.n_heads and info.n_kv_heads and info.d_head
        return info.n_heads, info.n_kv_heads, info.d_head


def _kept(x: torch.Tensor, ctx: _RunContext) -> torch.Tensor:
    return x if ctx.grad else x.detach()


def _edge(op: EdgePatch, x: torch.Tensor, ctx: _RunContext) -> torch.Tensor:
    """The downstream input ``x`` with the edge patch applied (the reference's arithmetic)."""
    inner: _Internals = ctx.internals
    arch = inner.info.arch
    assert arch is not None
    here, there, w_o = edge_operands(
        op,
        inner.live,
        ctx.state.captures,
        lambda layer: projection_weight(inner.module(layer, arch.attn_out_proj)),
    )
    return apply_edge_patch(op, x, site_axes(op.site.kind, x.ndim), here, there, w_o)


def _split(
    point: HookPoint, items: list[Op | Site], x: torch.Tensor, ctx: _RunContext, run: str
) -> torch.Tensor:
    """The projection output ``x`` with the ops at a per-head input applied, in order."""
    inner: _Internals = ctx.internals
    view = point.view.removeprefix("split_")
    n_q, n_kv, d_head = inner.dims
    assert point.layer is not None
    block_input = inner.block_inputs[point.layer]
    heads = qkv_view(x, view, n_heads=n_q, n_kv_heads=n_kv, d_head=d_head).shape[-2]
    # the copies as earlier ops at this site in this forward call left them
    kept = inner.copies.get(point)
    old = kept[1] if kept is not None and kept[0] == ctx.clock.calls else None
    copies = block_input.unsqueeze(-2).expand(*block_input.shape[:-1], heads, -1)
    copies = copies if old is None else old
    cur = copies
    for item in items:
        if isinstance(item, Site):  # a whole-site capture for another run's ablation
            inner.parts.setdefault(("capture", str(item)), []).append(_kept(cur, ctx))
            continue
        op = item
        axes = site_axes(op.site.kind, cur.ndim)
        if isinstance(op, Read):
            if ctx.grad and not ctx.generating:  # the forward goes on from the region
                region = take(cur, op.select, axes)
                cur = put(cur, op.select, axes, region)
                ctx.recorded[op.name] = region
            else:
                inner.parts.setdefault(("read", op.name), []).append(_kept(cur, ctx))
            continue
        if isinstance(op, EdgePatch):
            cur = _edge(op, cur, ctx)
            continue
        select: Select | None = op.select
        if ctx.generating:
            clock = ctx.clock
            select = step_select(op.select, ctx.prompt, ctx.fed, clock.offset, clock.length)
        if select is None:
            continue
        cur, extra = apply_op(op, cur, axes, select, ctx.state)
        for name, value in extra.items():
            ctx.recorded[name] = _kept(value, ctx)
    inner.copies[point] = (ctx.clock.calls, cur)
    if cur is copies:
        return x
    delta = split_input_delta(
        inner.module(point.layer, _attn_norm(inner)),
        projection_weight(inner.model.get_submodule(point.module)),
        block_input,
        cur,
        view,
        n_heads=n_q,
        n_kv_heads=n_kv,
        d_head=d_head,
        old=old,
    )
    out = x.clone() if ctx.grad else x  # ``x`` is pyvene's own copy of the output
    qkv_view(out, view, n_heads=n_q, n_kv_heads=n_kv, d_head=d_head).add_(delta.to(out.dtype))
    return out


def _attn_norm(inner: _Internals) -> str:
    arch = inner.info.arch
    assert arch is not None and arch.attn_norm is not None
    return arch.attn_norm


def finish_internals(run: str, ctx: _RunContext) -> None:
    """Per-head-input reads and captures of the run, concatenated over forward calls and
    selected like the reference's reads (absolute positions when generating)."""
    inner: _Internals | None = ctx.internals
    if inner is None:
        return
    reads = {op.name: op for op in ctx.state.plan.ops_of(run) if isinstance(op, Read)}
    for (kind, key), parts in inner.parts.items():
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if kind == "capture":
            ctx.state.captures[(run, key)] = full
            continue
        op = reads[key]
        select = op.select
        if ctx.generating:
            select = absolute_select(select, ctx.prompt, ctx.fed)
        ctx.state.results[key] = take(full, select, site_axes(op.site.kind, full.ndim))


@functools.cache
def internals_classes() -> tuple[type, type, type]:
    """(SplitIntervention, EdgeIntervention, LiveIntervention), defined on first use."""
    import pyvene as pv

    class SplitIntervention(pv.SourcelessIntervention):
        """Every op at one per-head input site (a q/k/v projection's output), in order."""

        def __init__(
            self, point: HookPoint, items: list[Op | Site], ctx: _RunContext, run: str
        ) -> None:
            super().__init__(keep_last_dim=True)
            self.point, self.items, self.ctx, self.run = point, items, ctx, run

        def forward(
            self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kw: Any
        ) -> torch.Tensor:
            return _split(self.point, self.items, base, self.ctx, self.run)

        def __str__(self) -> str:
            return f"SplitIntervention({self.point.module})"

    class EdgeIntervention(pv.SourcelessIntervention):
        """An edge patch at a plain downstream input (a norm's raw ``.input``)."""

        def __init__(self, op: EdgePatch, point: HookPoint, ctx: _RunContext) -> None:
            super().__init__(keep_last_dim=True)
            self.op, self.point, self.ctx = op, point, ctx

        def forward(
            self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kw: Any
        ) -> torch.Tensor:
            return _edge(self.op, base, self.ctx)

        def __str__(self) -> str:
            return f"EdgeIntervention({self.op.site})"

    class LiveIntervention(pv.SourcelessIntervention):
        """Records an upstream node's value of this run; changes nothing."""

        def __init__(self, site: Site, point: HookPoint, ctx: _RunContext) -> None:
            super().__init__(keep_last_dim=True)
            self.site, self.point, self.ctx = site, point, ctx

        def forward(
            self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kw: Any
        ) -> torch.Tensor:
            ctx = self.ctx
            x = _view_in(self.point, base, ctx.n_heads, ctx.dims)
            ctx.internals.live[str(self.site)] = _kept(x, ctx)
            return base

        def __str__(self) -> str:
            return f"LiveIntervention({self.site})"

    return SplitIntervention, EdgeIntervention, LiveIntervention
