"""Only the logits a graph touches are computed, and the numbers do not change.

A sweep that reads the last position's logits needs the unembedding at that position
only; every backend then asks a HuggingFace model for ``logits_to_keep=k``. The oracle is
the model's own full forward, sliced by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import interventions as iv
from interventions.plan import Plan
from interventions.selection import take
from interventions.sites import Span
from tests.tiny_models import VOCAB, hf_model, hook_count, input_shapes

BACKENDS = ("torch", "nnsight", "pyvene")
SEQ = 7


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def sweep(pos: object) -> iv.Graph:
    """clean, corrupted, and a patched copy of the corrupted run, each reading logits."""
    g = iv.Graph()
    clean = g.run("clean", tokens=ids(0))
    resid = clean.read("resid_pre", layer=1, pos=2, name="clean.resid")
    clean.read("logits", pos=pos, name="clean.logits")
    g.run("corrupt", tokens=ids(1)).read("logits", pos=pos, name="corrupt.logits")
    patched = g.run("patched", tokens=ids(1))
    patched.patch("resid_pre", layer=1, pos=2, value=resid)
    patched.read("logits", pos=pos, name="patched.logits")
    return g


# (pos selector, positions the unembedding must see)
CASES = [(-1, 1), ((-3, -1), 3), (Span(-2), 2), (slice(-4, -1), 4), (0, SEQ), (None, SEQ)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("pos", "kept"), CASES, ids=[repr(c[0]) for c in CASES])
def test_only_touched_logits_are_computed(
    family: str, backend: str, pos: object, kept: int
) -> None:
    model = hf_model(family)
    graph = sweep(pos)
    with input_shapes(model.get_output_embeddings()) as shapes:  # type: ignore[operator]
        got = iv.run(graph, model, backend=backend)
    seen = [shape[1] for shape in shapes]  # positions reaching the output embedding
    assert seen and set(seen) == {kept}, f"{backend} unembedded {seen} positions"

    with torch.no_grad():
        clean = model(input_ids=ids(0), use_cache=False).logits
        corrupt = model(input_ids=ids(1), use_cache=False).logits

    def cut(x: torch.Tensor) -> torch.Tensor:
        return take(x, iv.Select.make(pos=pos), ("batch", "pos", "hidden"))

    torch.testing.assert_close(got["clean.logits"], cut(clean), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["corrupt.logits"], cut(corrupt), atol=1e-5, rtol=1e-5)
    assert got["patched.logits"].shape == got["corrupt.logits"].shape
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_logits_match_full_forward(backend: str) -> None:
    """The patched run's kept logits equal a hand-patched full forward's last position."""
    model = hf_model("gpt2")
    got = iv.run(sweep(-1), model, backend=backend)
    block = model.transformer.h[1]  # type: ignore[index,union-attr]
    captured: dict[str, torch.Tensor] = {}

    def grab(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured["x"] = args[0][:, 2].clone()

    def write(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0].clone()
        x[:, 2] = captured["x"]
        return (x, *args[1:])

    with torch.no_grad():
        handle = block.register_forward_pre_hook(grab)
        try:
            model(input_ids=ids(0), use_cache=False)
        finally:
            handle.remove()
        handle = block.register_forward_pre_hook(write)
        try:
            want = model(input_ids=ids(1), use_cache=False).logits[:, -1]
        finally:
            handle.remove()
    torch.testing.assert_close(got["patched.logits"], want, atol=1e-5, rtol=1e-5)


def plan_of(graph: iv.Graph, model: nn.Module) -> Plan:
    return iv.validate(graph, model)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda g: g.run("a", tokens=ids(0)).read("logits", pos=-2), 2),
        (lambda g: g.run("a", tokens=ids(0)).read("final_norm"), 1),  # no logits op: one position
        (lambda g: g.run("a", tokens=ids(0)).read("logits", pos=range(-3, 0)), 3),
        (lambda g: g.run("a", tokens=ids(0)).read("logits", pos=slice(-3, None, -1)), None),
        (lambda g: g.run("a", tokens=ids(0)).read("logits", pos=(-1, 2)), None),
        (lambda g: g.run("a", tokens=ids(0)).read("logits", pos=-SEQ), None),  # all of them
        (lambda g: g.run("a", tokens=ids(0)).read("lm_head.output", pos=-1), None),  # raw site
        # raw sites in the blocks or the final norm see every position whatever is kept
        (lambda g: g.run("a", tokens=ids(0)).read("transformer.h.0.ln_2.input"), 1),
        (lambda g: g.run("a", tokens=ids(0)).read("transformer.ln_f.output", pos=-2), 1),
        (lambda g: g.run("a", tokens=ids(0)).read("transformer.h.output"), None),  # no block
        (lambda g: g.run("a", tokens=ids(0)).read("transformer.output"), None),  # the base model
        (lambda g: g.run("a", tokens=ids(0), max_new_tokens=2).read("logits", pos=-1), None),
    ],
    ids=[
        "neg",
        "no-logits",
        "range",
        "reversed",
        "mixed",
        "whole",
        "raw",
        "raw-block",
        "raw-final-norm",
        "raw-block-list",
        "raw-base",
        "generating",
    ],
)
def test_plan_logits_to_keep(build: object, expected: int | None) -> None:
    g = iv.Graph()
    build(g)  # type: ignore[operator]
    assert plan_of(g, hf_model("gpt2")).logits_to_keep("a") == expected


def test_plain_module_keeps_everything() -> None:
    from tests.tiny_models import toy_net

    g = iv.Graph()
    g.run("a", tokens=ids(0)).read("unembed.output", pos=-1)
    assert plan_of(g, toy_net()).logits_to_keep("a") is None
