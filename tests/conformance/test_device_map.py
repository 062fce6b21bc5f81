"""Models split over devices with accelerate: every backend gives the single-device
numbers, results come back on the CPU, and no hook of ours survives a failure.

Here the split is CPU plus disk offload (accelerate keeps offloaded weights on ``meta``
and loads them in its own hooks around each module's forward); with CUDA present the
same graph runs split over CPU and GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import interventions as iv
from interventions.devices import input_device
from tests.tiny_models import hf_model, hook_count

accelerate = pytest.importorskip("accelerate")

BACKENDS = ("torch", "nnsight", "pyvene")
TOL = {"atol": 1e-5, "rtol": 1e-5}
IDS_A = torch.tensor([[5, 6, 7, 8, 9, 10]])
IDS_B = torch.tensor([[11, 6, 3, 8, 2, 10]])


def _layers(family: str) -> str:
    return {"gpt2": "transformer.h"}.get(family, "model.layers")


def _dispatched(family: str, tmp: Path, second: str = "disk") -> nn.Module:
    """A copy of the tiny model with layer 1 on ``second`` (disk offload by default) and the
    rest on the CPU."""
    model = copy.deepcopy(hf_model(family))
    layers = _layers(family)
    base = layers.rsplit(".", 1)[0]  # "model" or "transformer"
    device_map: dict[str, Any] = {name: "cpu" for name, _ in model.named_children()}
    del device_map[base]
    for name, _ in model.get_submodule(base).named_children():
        device_map[f"{base}.{name}"] = "cpu"
    del device_map[layers]
    device_map[f"{layers}.0"] = "cpu"
    device_map[f"{layers}.1"] = second
    return accelerate.dispatch_model(
        model, device_map=device_map, main_device="cpu", offload_dir=str(tmp)
    )


def _graph(d_model: int, ids_b: torch.Tensor = IDS_B) -> iv.Graph:
    g = iv.Graph()
    a = g.run("a", tokens=IDS_A)
    h = a.read("resid_post", 0)
    a.read("mlp_out", 1, name="a.mlp")
    b = g.run("b", tokens=ids_b)
    b.patch("resid_post", 0, pos=-1, value=h)
    b.add("resid_pre", 1, direction=torch.linspace(-1, 1, d_model), scale=2.0)
    b.read("attn_out", 1, name="b.attn")
    b.read("logits", pos=-1, name="b.logits")
    return g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_disk_offloaded_model_gives_single_device_results(
    family: str, backend: str, tmp_path: Path
) -> None:
    single = hf_model(family)
    model = _dispatched(family, tmp_path)
    layer1 = model.get_submodule(f"{_layers(family)}.1")
    assert all(p.device.type == "meta" for p in layer1.parameters())  # really offloaded
    assert input_device(model) == torch.device("cpu")
    g = _graph(single.config.hidden_size)
    want = iv.run(g, single, backend="torch")
    got = iv.run(g, model, backend=backend)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].device == torch.device("cpu")  # the documented device of results
        torch.testing.assert_close(got[name], want[name], **TOL)
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_offloaded_model_keeps_no_hook_after_a_failure(backend: str, tmp_path: Path) -> None:
    model = _dispatched("llama", tmp_path)
    before = model(IDS_A).logits
    # a different length keeps "b" in a forward pass of its own on every backend, so the
    # failure hits the second pass after the first has finished
    g = _graph(model.config.hidden_size, IDS_B[:, :5])

    def explode(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].shape[1] == 5:
            raise RuntimeError("injected failure")

    # a plain pre-hook (not ours: removed before counting) fails run "b"'s pass; a
    # monkeypatched forward would be bypassed by accelerate's wrapped forwards
    injected = model.model.layers[1].mlp.register_forward_pre_hook(explode)
    try:
        with pytest.raises(iv.ExecutionError):
            iv.run(g, model, backend=backend)
    finally:
        injected.remove()
    assert hook_count(model) == 0
    torch.testing.assert_close(model(IDS_A).logits, before, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_and_gpu_split_gives_single_device_results(backend: str, tmp_path: Path) -> None:
    single = hf_model("llama")
    model = accelerate.dispatch_model(
        copy.deepcopy(single),
        device_map={
            "model.embed_tokens": 0,
            "model.rotary_emb": 0,
            "model.layers.0": 0,
            "model.layers.1": "cpu",
            "model.norm": 0,
            "lm_head": 0,
        },
    )
    g = _graph(single.config.hidden_size)
    want = iv.run(g, single, backend="torch")
    got = iv.run(g, model, backend=backend)
    for name in want:
        assert got[name].device == torch.device("cpu")
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)
    assert hook_count(model) == 0
    budget = iv.Budget.for_model(model)
    free = torch.cuda.mem_get_info(0)[0]
    assert budget.max_bytes is not None and 0 < budget.max_bytes <= free
