"""Selectors on tensors: the fast slicing path of ``take``/``put`` equals the general one.

``take`` and ``put`` write simple selections (ints, slices, at most one list) as plain
slicing and fall back to an outer product of index tensors otherwise. The oracle is that
outer product, built here independently with numpy's ``ix_``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from interventions.selection import put, selected_shape, take
from interventions.sites import Select, Span

AXES = ("batch", "pos", "head", "hidden")
SHAPE = (3, 5, 4, 6)


def index(size: int) -> st.SearchStrategy[object]:
    bound = st.one_of(st.none(), st.integers(-size - 2, size + 2))
    return st.one_of(
        st.none(),
        st.integers(-size, size - 1),
        st.lists(st.integers(-size, size - 1), min_size=1, max_size=4).map(tuple),
        st.builds(Span, bound, bound, st.one_of(st.none(), st.sampled_from([-2, -1, 1, 2, 3]))),
    )


def oracle(select: Select) -> tuple[tuple[np.ndarray, ...], list[int]]:
    """numpy ix_ indices of the selection, and which axes an int drops."""
    lists, dropped = [], []
    for dim, (name, size) in enumerate(zip(("batch", "pos", "head", "dims"), SHAPE, strict=True)):
        value = getattr(select, name)
        if value is None:
            lists.append(list(range(size)))
        elif isinstance(value, Span):
            lists.append(list(range(size))[slice(value.start, value.stop, value.step)])
        elif isinstance(value, int):
            lists.append([value % size])
            dropped.append(dim)
        else:
            lists.append([i % size for i in value])
    return np.ix_(*lists), dropped


@given(index(3), index(5), index(4), index(6))
def test_take_put_equal_the_outer_product(b: object, p: object, h: object, d: object) -> None:
    select = Select(batch=b, pos=p, head=h, dims=d)  # type: ignore[arg-type]
    x = torch.randn(SHAPE)
    ix, dropped = oracle(select)
    want = torch.from_numpy(x.numpy()[ix])
    if dropped:
        want = want.squeeze(tuple(dropped))
    got = take(x, select, AXES)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    assert selected_shape(select, AXES, SHAPE) == tuple(want.shape)
    if got.numel() and not select.is_all:
        assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()

    value = torch.randn(want.shape)
    expected = x.numpy().copy()
    region = value.numpy()
    for dim in dropped:
        region = np.expand_dims(region, dim)
    expected[ix] = region
    assert torch.equal(put(x, select, AXES, value), torch.from_numpy(expected))


def test_out_of_range_int_is_named() -> None:
    with pytest.raises(IndexError, match="pos=7 is out of range for an axis of size 5"):
        take(torch.zeros(SHAPE), Select.make(pos=7), AXES)


def test_take_keeps_gradients() -> None:
    x = torch.randn(SHAPE, requires_grad=True)
    take(x, Select.make(pos=-1, head=[0, 2]), AXES).sum().backward()
    assert x.grad is not None
    assert float(x.grad.sum()) == 3 * 2 * 6
    assert float(x.grad[:, -1, [0, 2]].sum()) == 3 * 2 * 6
