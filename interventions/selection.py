"""Applying a selector to a tensor: the reference semantics every adapter must match.

:func:`take` reads the selected entries (ints drop their axis), :func:`put` / :func:`put_`
write them; several list selectors select their outer product, the way numpy's ``ix_``
does. Per-prompt positions never reach here: the ragged pass resolves them first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from interventions.errors import SpecError
from interventions.sites import _SELECT_AXIS, RESIDUAL, Index, PerPrompt, Select, SiteKind, Span


def _axis_indices(index: Index, size: int, what: str) -> tuple[list[int], bool]:
    """Concrete non-negative indices along one axis, and whether the axis is dropped."""
    if index is None:
        return list(range(size)), False
    if isinstance(index, Span):
        return index.indices(size), False
    assert not isinstance(index, PerPrompt), "the ragged pass resolves per-prompt positions"
    items = [index] if isinstance(index, int) else list(index)
    out = []
    for i in items:
        if not -size <= i < size:
            raise IndexError(f"{what}={i} is out of range for an axis of size {size}")
        out.append(i % size)
    return out, isinstance(index, int)


def selection_axes(select: Select, axes: Sequence[str]) -> dict[int, Index]:
    """Map each axis number of a site to the selector that addresses it."""
    out: dict[int, Index] = {}
    for field_name, index in select.items():
        axis = _SELECT_AXIS[field_name]
        if axis == "hidden":
            out[len(axes) - 1] = index
        elif axis in axes:
            out[list(axes).index(axis)] = index
        else:
            raise SpecError(
                f"selector {field_name}= does not apply to a site with axes {tuple(axes)}"
            )
    return out


def _plan(
    select: Select, axes: Sequence[str], shape: Sequence[int]
) -> tuple[tuple[Any, ...], list[int]]:
    per_axis = selection_axes(select, axes)
    lists: list[list[int]] = []
    dropped: list[int] = []
    for dim, size in enumerate(shape):
        index = per_axis.get(dim)
        name = axes[dim] if dim < len(axes) else f"axis {dim}"
        idx, drop = _axis_indices(index, size, name)
        lists.append(idx)
        if drop:
            dropped.append(dim)
    # ix_-style broadcast: every axis gets its own index tensor shaped to its position.
    ndim = len(shape)
    index_tensors = []
    for dim, idx in enumerate(lists):
        view = [1] * ndim
        view[dim] = len(idx)
        index_tensors.append(torch.tensor(idx, dtype=torch.long).view(view))
    return tuple(index_tensors), dropped


def _basic_index(
    select: Select, axes: Sequence[str], shape: Sequence[int]
) -> tuple[tuple[Any, ...], list[int]] | None:
    """The same selection as :func:`_plan` written as slices (and at most one index list),
    which torch applies without building an index tensor per axis; ``None`` when the
    selection needs the general outer-product form (several lists, a negative step).

    An int becomes a one-wide slice whose axis is squeezed afterwards, so it never mixes
    with a list as an advanced index (which would move the list's axis to the front).
    """
    per_axis = selection_axes(select, axes)
    if sum(isinstance(i, tuple) for i in per_axis.values()) > 1:
        return None
    parts: list[Any] = [slice(None)] * len(shape)
    dropped: list[int] = []
    for dim, index in per_axis.items():
        if dim >= len(shape):
            return None
        size = shape[dim]
        if isinstance(index, int):
            if not -size <= index < size:
                raise IndexError(f"{axes[dim]}={index} is out of range for an axis of size {size}")
            i = index % size
            parts[dim] = slice(i, i + 1)
            dropped.append(dim)
        elif isinstance(index, Span):
            if index.step is not None and index.step <= 0:
                return None
            parts[dim] = _bounded_slice(index, size)
        elif isinstance(index, tuple):
            parts[dim] = list(_axis_indices(index, size, axes[dim])[0])
    return tuple(parts), sorted(dropped)


def _bounded_slice(index: Span, size: int) -> slice:
    """A forward slice with the same entries whose bounds and step fit the axis (torch
    multiplies the step into a stride: ``step=10**20`` would overflow it).

    >>> _bounded_slice(Span(0, None, 10**20), 5), _bounded_slice(Span(-3, None, 2), 5)
    (slice(0, 1, None), slice(2, 5, 2))
    """
    r = range(size)[slice(index.start, index.stop, index.step)]
    if len(r) <= 1:
        return slice(r.start, r.start + len(r))
    return slice(r.start, min(r.stop, size), r.step)


def site_axes(kind: SiteKind, ndim: int) -> tuple[str, ...]:
    """Axis names for a tensor of ``ndim`` dims at a site (raw sites: batch, pos, ..., hidden)."""
    if len(kind.axes) == ndim:
        return kind.axes
    if kind.axes == RESIDUAL and ndim >= 1:
        names = ["batch", "pos", *[f"axis{i}" for i in range(2, ndim - 1)], "hidden"]
        return tuple(names[:ndim]) if ndim >= 3 else ("batch", "hidden")[-ndim:]
    raise SpecError(f"a tensor with {ndim} dims does not fit axes {kind.axes}")


def take(x: torch.Tensor, select: Select, axes: Sequence[str]) -> torch.Tensor:
    """Read the selected entries of ``x`` (ints drop their axis).

    >>> x = torch.arange(24).view(2, 3, 4)
    >>> take(x, Select.make(pos=-1, dims=[0, 1]), ("batch", "pos", "hidden")).tolist()
    [[8, 9], [20, 21]]
    """
    if select.is_all:
        return x
    basic = _basic_index(select, axes, x.shape)
    if basic is not None:
        index, dropped = basic
        # a copy, like advanced indexing gives: a view would keep all of ``x`` alive
        out = x[index].clone()
    else:
        index, dropped = _plan(select, axes, x.shape)
        out = x[tuple(i.to(x.device) for i in index)]
    for dim in reversed(dropped):
        out = out.squeeze(dim)
    return out


def put(x: torch.Tensor, select: Select, axes: Sequence[str], value: torch.Tensor) -> torch.Tensor:
    """Return a copy of ``x`` with the selected entries replaced by ``value`` (broadcast).

    >>> x = torch.zeros(1, 3, 2)
    >>> put(x, Select.make(pos=1), ("batch", "pos", "hidden"), torch.ones(2))[0].tolist()
    [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    """
    value = value.to(device=x.device, dtype=x.dtype)
    if select.is_all:
        return value.expand(x.shape).clone() if value.shape != x.shape else value
    out = x.clone()
    put_(out, select, axes, value)
    return out


def put_(x: torch.Tensor, select: Select, axes: Sequence[str], value: torch.Tensor) -> None:
    """:func:`put` in place: write ``value`` into the selected entries of ``x`` itself.

    For a caller that owns ``x`` (it cloned it once for several ops at one hook).

    >>> x = torch.zeros(1, 3, 2)
    >>> put_(x, Select.make(pos=-1, dims=0), ("batch", "pos", "hidden"), torch.tensor(5.0))
    >>> x[0].tolist()
    [[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]]
    """
    value = value.to(device=x.device, dtype=x.dtype)
    if select.is_all:
        x.copy_(value.expand(x.shape))
        return
    basic = _basic_index(select, axes, x.shape)
    if basic is not None:
        index, dropped = basic
        region = [
            len(range(size)[part]) if isinstance(part, slice) else len(part)
            for part, size in zip(index, x.shape, strict=True)
        ]
    else:
        index, dropped = _plan(select, axes, x.shape)
        index = tuple(i.to(x.device) for i in index)
        region = [len(i.view(-1)) for i in index]
    kept = [n for d, n in enumerate(region) if d not in dropped]
    value = value.expand(torch.broadcast_shapes(value.shape, tuple(kept)))
    for dim in dropped:
        value = value.unsqueeze(dim)
    x[index] = value


def selected_shape(select: Select, axes: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
    """The shape :func:`take` would return, computed without a tensor."""
    per_axis = selection_axes(select, axes)
    out = []
    for dim, size in enumerate(shape):
        index = per_axis.get(dim)
        if index is None:
            out.append(size)
        elif isinstance(index, Span):
            if index.step == 0:
                raise SpecError("a slice step cannot be zero")
            out.append(len(range(size)[slice(index.start, index.stop, index.step)]))
        else:
            idx, drop = _axis_indices(index, size, axes[dim] if dim < len(axes) else "axis")
            if not drop:
                out.append(len(idx))
    return tuple(out)
