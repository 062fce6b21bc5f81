"""A bfloat16 model on the CPU: graph tensors (float32) are cast to the model's dtype, SAEs
run in float32 and are cast back, and results stay bfloat16. Hand hooks do the same
arithmetic in bfloat16 on a deep copy of the tiny model."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import interventions as iv
from tests.adapters.torch.hand import IDS, capture, hand_sae, logits_with, model_of, randn, run

BF16 = {"atol": 2e-2, "rtol": 2e-2}
EXACT = {"atol": 0.0, "rtol": 0.0}
FAMILIES = ("llama", "gpt2")
OTHER = torch.tensor([[1, 9, 8, 7, 6, 5], [2, 13, 14, 15, 16, 17]])


@cache
def bf16(family: str) -> nn.Module:
    return copy.deepcopy(model_of(family)).to(torch.bfloat16).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_are_bf16_and_exact(family: str) -> None:
    model = bf16(family)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.read("resid_post", 0, name="h")
    r.read("head", 1, head=2, name="head")
    r.read("logits", name="out")
    res = run(g, model)
    h, heads, out = capture(model, family, [("resid_post", 0), ("head", 1), ("logits", None)])
    for name, want in (("h", h), ("head", heads[:, :, 2]), ("out", out)):
        assert res[name].dtype == torch.bfloat16
        assert_close(res[name], want, **EXACT)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_from_a_run_and_with_a_float32_constant(family: str) -> None:
    model = bf16(family)
    v = randn(32, seed=31)  # float32 in the graph
    g = iv.Graph()
    clean = g.run("clean", tokens=OTHER)
    x = g.run("x", tokens=IDS)
    x.patch("resid_post", 0, pos=-1, value=clean.read("resid_post", 0))
    x.patch("attn_out", 1, pos=[1, 2], value=v)
    x.read("attn_out", 1, name="after")
    x.read("logits", name="out")
    res = run(g, model)
    assert all(t.dtype in (torch.long, torch.float32) for t in g.tensors.values())  # untouched
    (c,) = capture(model, family, [("resid_post", 0)], OTHER)

    def patch(x: torch.Tensor) -> None:
        x[:, -1, :] = c[:, -1, :]

    def const(x: torch.Tensor) -> None:
        x[:, [1, 2], :] = v.to(torch.bfloat16)

    edits = [("resid_post", 0, patch), ("attn_out", 1, const)]
    (after,) = capture(model, family, [("attn_out", 1)], IDS, edits)
    assert res["after"].dtype == torch.bfloat16
    assert_close(res["after"], after, **BF16)
    assert torch.equal(res["after"][:, 1], v.to(torch.bfloat16).expand(2, 32))
    assert res["out"].dtype == torch.bfloat16
    assert_close(res["out"], logits_with(model, family, edits), **BF16)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_casts_the_direction_to_bf16(family: str) -> None:
    model = bf16(family)
    v = randn(32, seed=32) / 3  # not representable in bf16
    g = iv.Graph()
    x = g.run("x", tokens=IDS)
    x.add("resid_post", 1, direction=v, scale=3.0, pos=-1)
    x.read("resid_post", 1, name="after")
    x.read("logits", name="out")
    res = run(g, model)

    def add(x: torch.Tensor) -> None:
        x[:, -1, :] += 3.0 * v.to(torch.bfloat16)

    (after,) = capture(model, family, [("resid_post", 1)], IDS, [("resid_post", 1, add)])
    assert res["after"].dtype == torch.bfloat16
    assert_close(res["after"], after, **BF16)
    assert res["out"].dtype == torch.bfloat16
    assert_close(res["out"], logits_with(model, family, [("resid_post", 1, add)]), **BF16)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("error", ["keep", "drop"])
def test_sae_splice_runs_in_float32_and_casts_back(family: str, error: str) -> None:
    model = bf16(family)
    hs = hand_sae(32, seed=33)
    edit = iv.FeatureEdit.set([1, 4], 1.5)
    g = iv.Graph()
    x = g.run("x", tokens=IDS)
    x.sae_splice("resid_post", 0, sae=hs.sae(), edits=[edit], error=error, features="f")
    x.read("resid_post", 0, name="after")
    x.read("logits", name="out")
    res = run(g, model)
    (clean,) = capture(model, family, [("resid_post", 0)])

    def splice(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        f = hs.encode(x32)
        f2 = f.clone()
        f2[..., [1, 4]] = 1.5
        new = hs.decode(f2)
        if error == "keep":
            new = new + (x32 - hs.decode(f))
        return new.to(torch.bfloat16)

    assert res["f"].dtype == torch.float32  # the SAE runs in float32
    assert_close(res["f"], hs.encode(clean.float()), atol=1e-5, rtol=1e-5)
    assert res["after"].dtype == torch.bfloat16
    assert_close(res["after"], splice(clean), **BF16)
    assert res["out"].dtype == torch.bfloat16
    assert_close(res["out"], logits_with(model, family, [("resid_post", 0, splice)]), **BF16)
