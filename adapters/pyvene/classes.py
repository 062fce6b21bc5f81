"""The intervention classes pyvene runs, and the per-run context they share.

The classes subclass pyvene's, so they are defined when pyvene is first needed
(:func:`_classes`): importing this package does not import pyvene.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from interventions.apply import RunState, apply_op
from interventions.architectures import HookPoint
from interventions.attention import QKV_VIEWS, qkv_view
from interventions.errors import ExecutionError
from interventions.ops import Op, Read
from interventions.plan import step_select
from interventions.selection import put, put_, site_axes, take
from interventions.sites import Select


@dataclass
class _StepClock:
    """Which absolute positions the current forward call covers (generation)."""

    offset: int = 0
    length: int = 0
    calls: int = 0

    def advance(self, length: int) -> None:
        self.offset = self.offset + self.length if self.calls else 0
        self.length = length
        self.calls += 1


@dataclass
class _RunContext:
    """What the interventions of one run need besides their own tensor."""

    state: RunState
    n_heads: int | None
    generating: bool
    prompt: int
    fed: int
    grad: bool = False
    clock: _StepClock = field(default_factory=_StepClock)
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)  # SAE features, grad reads
    # (query heads, key-value heads, head width) for the q/k/v views; attention internals
    dims: tuple[int, int, int] | None = None
    internals: Any = None  # an internals._Internals when the run has per-head inputs or edges


@dataclass
class _Target:
    """One op at one hook point: how to view the tensor there and what to select."""

    op: Op
    point: HookPoint
    ctx: _RunContext
    aligned: bool = False  # patch from a whole-site read: take the same entries
    # the source value is one element (every axis selected by an int): pyvene is handed it
    # with one axis, since it indexes the first axis of every source when generating
    scalar_source: bool = False

    def select(self) -> Select | None:
        """The op's selector for the current forward step (``None``: not this step)."""
        if not self.ctx.generating:
            return self.op.select
        clock = self.ctx.clock
        return step_select(
            self.op.select, self.ctx.prompt, self.ctx.fed, clock.offset, clock.length
        )

    def view_in(self, x: torch.Tensor) -> torch.Tensor:
        return _view_in(self.point, x, self.ctx.n_heads, self.ctx.dims)

    def view_out(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.point.view in QKV_VIEWS:
            # q, k or v is a part of the projection's output: write it back into ``like``
            # (pyvene's own copy; a fresh one with gradients, which are not in-place)
            out = like.clone() if self.ctx.grad else like
            _view_in(self.point, out, self.ctx.n_heads, self.ctx.dims).copy_(x)
            return out
        return x.reshape(like.shape) if self.point.view == "heads" else x

    def axes(self, x: torch.Tensor) -> tuple[str, ...]:
        return site_axes(self.op.site.kind, x.ndim)


def _view_in(
    point: HookPoint,
    x: torch.Tensor,
    n_heads: int | None,
    dims: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    if point.view == "heads":
        assert n_heads is not None
        return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
    if point.view in QKV_VIEWS:  # a view of the projection's output: writes reach it
        assert dims is not None
        return qkv_view(x, point.view, n_heads=dims[0], n_kv_heads=dims[1], d_head=dims[2])
    return x


# ---------------------------------------------------------------------------------------
# Intervention classes (subclasses of pyvene's, defined when pyvene is first needed)


@dataclass(frozen=True)
class _Classes:
    patch: type
    op: type
    read: type
    collect: type


@functools.cache
def _classes() -> _Classes:
    import pyvene as pv

    class PatchIntervention(pv.Intervention):
        """Interchange: the selected entries take the source value.

        The source is pyvene's ``source`` argument (``source_representations``: a value
        read in another run) or, for a constant, this intervention's
        ``source_representation`` buffer, as in pyvene's ``VanillaIntervention``.
        """

        def __init__(self, target: _Target, constant: torch.Tensor | None = None) -> None:
            super().__init__(keep_last_dim=True, source_representation=constant)
            self.target = target

        def forward(
            self,
            base: torch.Tensor,
            source: torch.Tensor | None = None,
            subspaces: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            target = self.target
            select = target.select()
            if select is None:
                return base
            value = self.source_representation if source is None else source
            if value is None:
                raise ExecutionError(f"patch on {target.op.site}: pyvene passed no source value")
            x = target.view_in(base)
            axes = target.axes(x)
            value = value.to(device=x.device, dtype=x.dtype)
            if target.scalar_source:
                value = value.reshape(())
            if target.aligned:
                value = take(value, select, axes)
            if target.ctx.grad:
                return target.view_out(put(x, select, axes, value), base)
            put_(x, select, axes, value)  # ``base`` is pyvene's private copy of the site
            return target.view_out(x, base)

        def __str__(self) -> str:
            return f"PatchIntervention({self.target.op.site})"

    class OpIntervention(pv.SourcelessIntervention):
        """Ablate, add, project_out, scale or sae_splice, with the reference semantics."""

        def __init__(self, target: _Target) -> None:
            super().__init__(keep_last_dim=True)
            self.target = target

        def forward(
            self,
            base: torch.Tensor,
            source: torch.Tensor | None = None,
            subspaces: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            target = self.target
            select = target.select()
            if select is None:
                return base
            x = target.view_in(base)
            # pyvene hands every intervention its own copy of the site (without linked
            # subspaces, which this adapter never builds), so it may be written in place
            x, extra = apply_op(
                target.op, x, target.axes(x), select, target.ctx.state, inplace=not target.ctx.grad
            )
            for name, value in extra.items():
                target.ctx.recorded[name] = value if target.ctx.grad else value.detach()
            return target.view_out(x, base)

        def __str__(self) -> str:
            return f"OpIntervention({type(self.target.op).__name__} {self.target.op.site})"

    class ReadIntervention(pv.SourcelessIntervention):
        """A read that keeps gradients (``grad=True``): the forward goes on from the region.

        pyvene's ``CollectIntervention`` records a copy that nothing downstream uses, so no
        gradient could reach it. This one returns ``put(x, select, take(x, select))``, which
        pyvene writes back into the site tensor, so the model's outputs depend on the
        recorded region, as in the torch reference.
        """

        def __init__(self, target: _Target) -> None:
            super().__init__(keep_last_dim=True)
            self.target = target

        def forward(
            self,
            base: torch.Tensor,
            source: torch.Tensor | None = None,
            subspaces: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            target = self.target
            op = target.op
            assert isinstance(op, Read)
            x = target.view_in(base)
            axes = target.axes(x)
            region = take(x, op.select, axes)
            if region is not x:
                x = put(x, op.select, axes, region)
            target.ctx.recorded[op.name] = region
            return target.view_out(x, base)

        def __str__(self) -> str:
            return f"ReadIntervention({self.target.op.site})"

    return _Classes(
        patch=PatchIntervention,
        op=OpIntervention,
        read=ReadIntervention,
        collect=pv.CollectIntervention,
    )
