"""The torch and nnsight backends stop a forward once everything its runs need is done:
the later layers cannot change a result. Held here by counting the calls of the last
block and by the values, which must equal a hand hook on a whole forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import interventions as iv
from tests.tiny_models import hf_model, hook_count

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def _count_calls(module: nn.Module) -> tuple[dict[str, int], torch.utils.hooks.RemovableHandle]:
    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    return calls, module.register_forward_pre_hook(count)


def _hand_block_output(model: nn.Module, layer: int) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _a: object, out: object) -> None:
        seen["x"] = (out[0] if isinstance(out, tuple) else out).detach().clone()  # type: ignore[index]

    handle = model.transformer.h[layer].register_forward_hook(keep)  # type: ignore[union-attr,index]
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        handle.remove()
    return seen["x"]


BACKENDS = ["torch", "nnsight"]


def _available(backend: str) -> None:
    if backend != "torch":
        pytest.importorskip(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_in_layer_0_skips_layer_1_and_equals_a_whole_forward(backend: str) -> None:
    _available(backend)
    model = hf_model("gpt2")
    want = _hand_block_output(model, 0)
    g = iv.Graph()
    g.run("a", tokens=IDS).read("resid_post", layer=0, name="h")
    calls, handle = _count_calls(model.transformer.h[1])
    try:
        got = iv.run(g, model, backend=backend)["h"]
    finally:
        handle.remove()
    assert calls["n"] == 0
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert hook_count(model) == 0


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_patch_from_a_stopped_run_is_the_value_a_whole_forward_gives(
    backend: str, batch: bool
) -> None:
    """Run "a" stops after layer 0 (alone, or in one forward with "b", which then goes
    on); run "b" takes a's value there and reads the logits."""
    _available(backend)
    model = hf_model("gpt2")
    other = IDS.flip(1)
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    b = g.run("b", tokens=other)
    b.patch("resid_post", layer=0, pos=-1, value=a.read("resid_post", layer=0, pos=-1))
    b.read("logits", pos=-1, name="end")
    got = iv.run(g, model, batch=batch, backend=backend)["end"]
    clean = _hand_block_output(model, 0)

    def patch(_m: nn.Module, _a: object, out: object) -> object:
        tensor = isinstance(out, torch.Tensor)
        x = (out if tensor else out[0]).clone()  # type: ignore[index]
        x[:, -1] = clean[:, -1]
        return x if tensor else (x, *out[1:])  # type: ignore[index]

    handle = model.transformer.h[0].register_forward_hook(patch)
    try:
        with torch.no_grad():
            want = model(other).logits[:, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("what", "site"),
    [("logits", ("logits", None)), ("raw site", ("transformer.h.0.output", None))],
)
def test_runs_that_need_the_rest_go_to_the_end(what: str, site: tuple[str, None]) -> None:
    """A logits read needs the whole forward; a raw module site may be called again later
    in the forward, so its run is not cut short."""
    model = hf_model("gpt2")
    g = iv.Graph()
    g.run("a", tokens=IDS).read(site[0], name="x")
    calls, handle = _count_calls(model.transformer.h[1])
    try:
        iv.run(g, model)
    finally:
        handle.remove()
    assert calls["n"] == 1, what
