"""Whole datasets in chunks: results equal one big run, in dataset order; reductions equal
the same reduction taken by hand; memory stays flat as the dataset grows."""

from __future__ import annotations

import gc
import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import interventions as iv
from interventions.stream import load_shards
from tests.tiny_models import hf_model

TOL = {"atol": 1e-5, "rtol": 1e-5}


def dataset(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 10, (n,), generator=g).tolist()
    return [torch.randint(3, 60, (k,), generator=g).tolist() for k in lengths]


def graph(clean: list[list[int]], corrupt: list[list[int]], direction: torch.Tensor) -> iv.Graph:
    g = iv.Graph()
    a = g.run("clean", tokens=clean)
    b = g.run("corrupt", tokens=corrupt)
    b.patch("resid_pre", layer=1, pos=-1, value=a.read("resid_pre", layer=1, pos=-1, name="v"))
    b.add("resid_post", layer=0, direction=direction)
    b.read("resid_post", layer=1, name="acts")
    b.read("logits", pos=-1, name="end")
    return g


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunks_give_the_results_of_one_run_in_dataset_order(backend: str, chunk: int) -> None:
    model = hf_model("gpt2")
    clean, corrupt = dataset(7, 1), dataset(7, 2)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    whole = iv.run(graph(clean, corrupt, direction), model)
    got = iv.run(graph(clean, corrupt, direction), model, backend=backend, chunk_size=chunk)
    assert list(got) == list(whole)
    for name in whole:
        torch.testing.assert_close(got[name], whole[name], **TOL)
        mask = whole.mask(name)
        assert (got.mask(name) is None) == (mask is None)
        if mask is not None:
            assert torch.equal(got.mask(name), mask)


def test_reductions_equal_the_same_reduction_by_hand(tmp_path: Path) -> None:
    model = hf_model("llama")
    data = dataset(9, 4)
    g = iv.Graph()
    r = g.run("data", tokens=data)
    r.read("resid_post", layer=0, name="tokens_mean")
    r.read("resid_post", layer=0, name="tokens_sum")
    r.read("resid_post", layer=1, pos=-1, name="last_mean")
    r.read("resid_post", layer=1, pos=-1, name="last_sum")
    r.read("resid_post", layer=1, name="per_position_mean")
    r.read("logits", pos=-1, name="sharded")
    reduce = {
        "tokens_mean": "token_mean",
        "tokens_sum": "token_sum",
        "last_mean": "mean",
        "last_sum": "sum",
        "per_position_mean": "mean",
        "sharded": "shards",
    }
    got = iv.run(g, model, chunk_size=4, reduce=reduce, shards=tmp_path)
    full = iv.run(g, model)  # every row, padded, to reduce by hand
    mask = full.mask("tokens_mean")
    assert mask is not None
    w = mask[..., None].float()
    torch.testing.assert_close(got["tokens_sum"], (full["tokens_sum"] * w).sum((0, 1)), **TOL)
    torch.testing.assert_close(
        got["tokens_mean"], (full["tokens_mean"] * w).sum((0, 1)) / mask.sum(), **TOL
    )
    torch.testing.assert_close(got["last_sum"], full["last_sum"].sum(0), **TOL)
    torch.testing.assert_close(got["last_mean"], full["last_mean"].mean(0), **TOL)
    per_position = (full["per_position_mean"] * w).sum(0) / mask.sum(0)[:, None]
    torch.testing.assert_close(got["per_position_mean"], per_position, **TOL)
    assert "sharded" not in got
    value, shard_mask = load_shards(tmp_path, "sharded")
    assert shard_mask is None
    torch.testing.assert_close(value, full["sharded"], **TOL)


def test_bad_stream_options_are_refused_by_name() -> None:
    model = hf_model("gpt2")
    g = iv.Graph()
    g.run("a", tokens=[[1, 2], [3, 4, 5]]).read("logits", pos=-1, name="x")
    with pytest.raises(iv.SpecError, match=r"unknown reduction 'median'; expected one of"):
        iv.run(g, model, chunk_size=1, reduce={"x": "median"})
    with pytest.raises(iv.SpecError, match=r"'y' is not a read of the graph"):
        iv.run(g, model, chunk_size=1, reduce={"y": "mean"})
    with pytest.raises(iv.SpecError, match=r"chunk_size must be a positive int"):
        iv.run(g, model, chunk_size=0)
    h = iv.Graph()
    h.run("a", tokens=[[1, 2], [3, 4, 5]]).read("logits", batch=0, name="x")
    with pytest.raises(iv.SpecError, match=r"batch= selectors are not allowed"):
        iv.run(h, model, chunk_size=1)


def live_tensor_bytes() -> int:
    """Bytes of every tensor alive in this process (storages counted once)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch objects warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError):
                continue
    return sum(seen.values())


def memory_per_chunk(monkeypatch: pytest.MonkeyPatch, n: int, reduce: dict[str, str]) -> list[int]:
    """Live tensor bytes at the start of every chunk of a streamed run over ``n`` prompts."""
    import interventions.stream as stream

    model = hf_model("gpt2")
    gen = torch.Generator().manual_seed(0)
    data = [
        torch.randint(3, 60, (int(k),), generator=gen).tolist()
        for k in torch.randint(8, 13, (n,), generator=gen)
    ]
    g = iv.Graph()
    g.run("data", tokens=data).read("resid_post", layer=1, name="acts")
    base = live_tensor_bytes()  # the model, the graph's token rows, and what tests keep
    seen: list[int] = []
    make = stream._rows_graph

    def chunk(*args: Any, **kwargs: Any) -> Any:
        seen.append(live_tensor_bytes() - base)
        return make(*args, **kwargs)

    monkeypatch.setattr(stream, "_rows_graph", chunk)
    try:
        iv.run(g, model, chunk_size=100, reduce=reduce)
    finally:
        monkeypatch.undo()
    return seen


def test_a_streamed_mean_over_2000_prompts_keeps_the_memory_of_one_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a stream holds between chunks stays flat as N grows; keeping every row (the
    same probe) grows with it, so the probe can see growth. Counted as live tensor bytes,
    which RSS would blur with the allocator's caching and the imports of the first chunk."""
    streamed = memory_per_chunk(monkeypatch, 2000, {"acts": "token_mean"})
    kept = memory_per_chunk(monkeypatch, 2000, {})
    assert len(streamed) == len(kept) == 20
    # one batch: the most that keeping one more chunk's rows adds (chunks grow with length)
    one_batch = max(b - a for a, b in itertools.pairwise(kept))
    assert one_batch > 0
    assert max(streamed) <= 1.2 * one_batch, (max(streamed), one_batch)
    # keeping rows: 19 chunks of 100 prompts x 8-12 positions x 32 floats held at the end
    assert kept[-1] > 12 * one_batch, (kept[-1], one_batch)
