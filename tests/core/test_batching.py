"""The batching pass: sweeps share forward passes, and the numbers do not change."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from tests.tiny_models import hf_model

CLEAN = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
CORRUPT = torch.tensor([[5, 6, 20, 8, 9, 10], [11, 12, 21, 14, 15, 16]])


def sweep(n_layers: int = 2) -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=CLEAN)
    values = {layer: clean.read("resid_pre", layer=layer) for layer in range(n_layers)}
    for layer in range(n_layers):
        for pos in range(CLEAN.shape[1]):
            run = g.run(f"p{layer}.{pos}", tokens=CORRUPT)
            run.patch("resid_pre", layer=layer, pos=pos, value=values[layer])
            run.read("logits", pos=-1, name=f"out{layer}.{pos}")
    return g


def mixed() -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=CLEAN)
    ref = g.run("ref", tokens=CORRUPT)
    h = clean.read("head", layer=1)
    h_last = clean.read("resid_post", layer=0, pos=-1, batch=0)
    a = g.run("a", tokens=CORRUPT)
    a.patch("head", layer=1, head=[0, 2], pos=slice(1, 4), value=h)
    a.read("logits", name="a.out", batch=1)
    b = g.run("b", tokens=CORRUPT)
    b.patch("resid_post", layer=0, pos=2, value=h_last)
    b.ablate("mlp_out", layer=1, method="mean", source=ref, pos=-1)
    b.read("resid_post", layer=1, name="b.r", pos=[0, -1])
    c = g.run("c", tokens=CLEAN)
    c.add("resid_pre", layer=1, direction=torch.randn(32), scale=2.0, batch=0)
    c.project_out("attn_out", layer=0, direction=torch.randn(2, 32))
    c.ablate("head", layer=0, head=1)
    c.read("logits", pos=-1, name="c.out")
    d = g.run("d", tokens=CLEAN[:1])
    d.scale("mlp_hidden", layer=0, factor=0.5, dims=slice(0, 10))
    d.read("logits", name="d.out")
    return g


def _count_forwards(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(int(kwargs["input_ids"].shape[0])), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_sweep_is_two_forward_passes_with_the_same_numbers(family: str) -> None:
    model = hf_model(family)
    g = sweep()
    calls, handle = _count_forwards(model)
    try:
        batched = iv.run(g, model)
        n_batched = list(calls)
        calls.clear()
        plain = iv.run(g, model, batch=False)
    finally:
        handle.remove()
    assert n_batched == [2, 2 * 2 * 6]  # the clean run, then every patched copy at once
    assert len(calls) == 1 + 2 * 6
    assert batched.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(batched[name], plain[name], atol=1e-5, rtol=1e-5)


def test_mixed_ops_agree_batched_and_unbatched() -> None:
    model = hf_model("llama")
    torch.manual_seed(0)
    g = mixed()
    batched, plain = iv.run(g, model), iv.run(g, model, batch=False)
    assert batched.keys() == plain.keys() == set(g.reads())
    for name in plain:
        torch.testing.assert_close(batched[name], plain[name], atol=1e-5, rtol=1e-5)


def test_budget_splits_batches() -> None:
    model = hf_model("gpt2")
    calls, handle = _count_forwards(model)
    try:
        iv.run(sweep(), model, budget=iv.Budget(max_items=10))
    finally:
        handle.remove()
    assert calls[0] == 2 and max(calls[1:]) <= 10 and sum(calls[1:]) == 24


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_items"):
        iv.Budget(max_items=0)


def test_internal_reads_do_not_leak_into_results() -> None:
    res = iv.run(sweep(), hf_model("gpt2"))
    assert set(res) == set(sweep().reads())
