"""Whole datasets in chunks: results equal one big run, in dataset order; reductions equal
the same reduction taken by hand; memory stays flat as the dataset grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch, transformers, interventions as iv

    mode, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=512, n_head=4, vocab_size=256, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(0)
    # one length, so that one chunk's forward pass is the same whatever the dataset's size
    data = torch.randint(0, 256, (n, 56), generator=gen).tolist()
    g = iv.Graph()
    g.run("data", tokens=data).read("resid_post", layer=0, name="acts")
    if mode == "stream":
        out = iv.run(g, model, chunk_size=chunk, reduce={"acts": "token_mean"})
    else:
        out = iv.run(g, model, chunk_size=chunk)  # every row kept
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": peak, "shape": list(out["acts"].shape)}))
    """
)


def _peaks(*probes: tuple[str, int, int]) -> list[int]:
    """Peak RSS (KiB) of each probe, run side by side in processes of their own."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE, mode, str(n), str(chunk)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for mode, n, chunk in probes
    ]
    peaks = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        peaks.append(int(json.loads(out.strip().splitlines()[-1])["peak_kib"]))
    return peaks


def test_a_streamed_mean_over_2000_prompts_keeps_the_memory_of_one_batch() -> None:
    # the same data with every row kept is the probe's check that it can see growth
    one_batch, streamed, kept = _peaks(
        ("stream", 100, 100), ("stream", 2000, 100), ("keep", 2000, 100)
    )
    # every row of 2000 prompts x 56 positions x 512 floats is ~230 MB more than one batch
    assert kept > 1.2 * one_batch, (kept, one_batch)
    assert streamed <= 1.2 * one_batch, (streamed, one_batch)
