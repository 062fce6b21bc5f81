"""grad=True: reads (selected or not, batched or not) carry gradients of later outputs."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from tests.tiny_models import hf_model

IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])


def _hand_gradient(model: torch.nn.Module, layer: int, token: int) -> torch.Tensor:
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        h = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        captured["h"] = h
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    handle = model.transformer.h[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = model(IDS).logits[:, -1, token].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(out, [captured["h"]])
    return grad


@pytest.mark.parametrize("batch", [True, False])
def test_gradients_reach_selected_reads(batch: bool) -> None:
    model = hf_model("gpt2")
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    a.read("resid_pre", layer=1, name="x", pos=[1, 3])
    a.read("logits", pos=-1, name="l")
    other = g.run("b", tokens=IDS)  # a second run so batching has something to merge
    other.read("logits", pos=-1, name="l2")
    res = iv.run(g, model, grad=True, batch=batch)
    (grad,) = torch.autograd.grad(res["l"][:, 7].sum(), [res["x"]])
    torch.testing.assert_close(grad, _hand_gradient(model, 1, 7)[:, [1, 3]])


def test_no_gradients_by_default() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("logits", name="l")
    assert not iv.run(g, hf_model("gpt2"))["l"].requires_grad
