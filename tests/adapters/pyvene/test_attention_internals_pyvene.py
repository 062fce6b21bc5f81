"""The attention internals on pyvene: q, k, v (GQA: key-value heads), their per-head
inputs and resid_mid, read against values computed by hand from the weights (the oracle
of tests/adapters/torch/test_attention_sites.py), edited against the torch reference, and
patching one head's q changes that head's output only, bitwise. The sites pyvene cannot
reach (``attn_scores``, ``attn_pattern``: inside the attention module) are refused by name."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from tests.adapters.internals_graphs import edits_graph, generating_graph
from tests.adapters.torch.hand import FP32, IDS
from tests.adapters.torch.test_attention_sites import LAYER, _hand_qkv, _resid_pre
from tests.tiny_models import hf_model, hook_count

pytest.importorskip("pyvene")

FAMILIES = ("gpt2", "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_equal_the_projections_by_hand(family: str) -> None:
    model = hf_model(family)
    g = iv.Graph()
    r = g.run("clean", tokens=IDS)
    for part in ("q", "k", "v", "q_input", "k_input", "v_input", "resid_mid"):
        r.read(part, layer=LAYER, name=part)
    r.read("resid_post", layer=LAYER, name="post")
    r.read("mlp_out", layer=LAYER, name="mlp")
    out = iv.run(g, model, backend="pyvene")
    x = _resid_pre(model, LAYER)
    hand = _hand_qkv(family, x, LAYER)
    for part in ("q", "k", "v"):
        assert_close(out[part], hand[part], **FP32)
    n_kv = 4 if family == "gpt2" else 2
    assert_close(out["q_input"], x.unsqueeze(2).expand(-1, -1, 4, -1), **FP32)
    for part in ("k_input", "v_input"):
        assert_close(out[part], x.unsqueeze(2).expand(-1, -1, n_kv, -1), **FP32)
    assert_close(out["resid_mid"], out["post"] - out["mlp"], **FP32)
    assert hook_count(model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_ablate_add_agree_with_torch(family: str) -> None:
    model = hf_model(family)
    want = iv.run(edits_graph(), model, backend="torch")
    got = iv.run(edits_graph(), model, backend="pyvene")
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], **FP32, msg=name)
    g = iv.Graph()
    g.run("clean", tokens=IDS).read("logits", name="logits")
    assert not torch.allclose(want["edit.logits"], iv.run(g, model)["logits"])
    assert hook_count(model) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_one_heads_q_changes_only_that_heads_output(family: str) -> None:
    model = hf_model(family)
    g = iv.Graph()
    g.run("clean", tokens=IDS).read("head", layer=LAYER, name="clean.z")
    e = g.run("edit", tokens=IDS)
    e.patch("q", layer=LAYER, head=2, value=torch.full((8,), 3.0))
    e.read("head", layer=LAYER, name="edit.z")
    e.read("q", layer=LAYER, name="edit.q")
    out = iv.run(g, model, backend="pyvene")
    assert torch.all(out["edit.q"][:, :, 2] == 3.0)
    for h in range(4):
        assert torch.equal(out["edit.z"][:, :, h], out["clean.z"][:, :, h]) == (h != 2), h


@pytest.mark.parametrize("site", ["attn_scores", "attn_pattern"])
def test_sites_inside_attention_are_refused_by_name(site: str) -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read(site, layer=0)
    with pytest.raises(iv.UnsupportedOp, match=rf"cannot reach site '{site}'.*torch"):
        iv.validate(g, hf_model("llama"), backend="pyvene")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_head_inputs_in_generation_agree_with_torch(family: str) -> None:
    model = hf_model(family)
    want = iv.run(generating_graph(), model, backend="torch")
    got = iv.run(generating_graph(), model, backend="pyvene")
    assert got["qi"].shape == (2, 8, 4, 32)
    for name in want:
        assert_close(got[name], want[name], **FP32, msg=name)
