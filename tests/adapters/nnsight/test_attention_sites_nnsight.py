"""The attention-internal sites on nnsight against the torch reference, which
tests/adapters/torch/test_attention_sites.py holds to hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from tests.adapters.internals_graphs import edits_graph, generating_graph
from tests.tiny_models import hf_model

pytest.importorskip("nnsight")

IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _graph() -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    for part in ("q", "k", "v", "resid_mid"):
        clean.read(part, layer=1, name=f"clean.{part}")
    e = g.run("edit", tokens=IDS)
    e.ablate("q", layer=1, head=1, pos=-1)
    e.patch("k", layer=1, head=1, value=torch.ones(8))
    e.add("v", layer=0, head=0, direction=torch.ones(8), scale=0.5)
    e.ablate("resid_mid", layer=0, pos=2)
    for part in ("q", "k", "resid_mid"):
        e.read(part, layer=1, name=f"edit.{part}")
    e.read("logits", name="edit.logits")
    return g


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_q_k_v_and_resid_mid_agree_with_torch(family: str) -> None:
    g = _graph()
    if family == "gpt_neox":  # no resid_mid there (parallel residual)
        g = iv.Graph()
        e = g.run("edit", tokens=IDS)
        e.ablate("q", layer=1, head=1, pos=-1)
        e.patch("k", layer=1, head=1, value=torch.ones(8))
        e.read("v", layer=1, name="edit.v")
        e.read("logits", name="edit.logits")
    model = hf_model(family)
    want = iv.run(g, model, backend="torch")
    got = iv.run(g, model, backend="nnsight")
    for name in want:
        assert_close(got[name], want[name], **FP32)
    assert not torch.allclose(want["edit.logits"], iv.run(_clean(), model)["logits"])


def _clean() -> iv.Graph:
    g = iv.Graph()
    g.run("clean", tokens=IDS).read("logits", name="logits")
    return g


def test_attn_scores_are_refused_by_name() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("attn_scores", layer=0)
    with pytest.raises(iv.UnsupportedOp, match=r"cannot reach site 'attn_scores'.*torch"):
        iv.validate(g, hf_model("llama"), backend="nnsight")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_head_inputs_agree_with_torch_and_reads_equal_the_block_input(family: str) -> None:
    """Reads of q/k/v inputs are each head's copy of the block input; patches, ablations
    and additions there (interleaved with q ops at the same projection) equal torch."""
    model = hf_model(family)
    want = iv.run(edits_graph(), model, backend="torch")
    got = iv.run(edits_graph(), model, backend="nnsight")
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], **FP32, msg=name)
    g = iv.Graph()
    r = g.run("clean", tokens=IDS)
    r.read("q_input", layer=1, name="q_input")
    r.read("resid_pre", layer=1, name="x")
    out = iv.run(g, model, backend="nnsight")
    assert torch.equal(out["q_input"], out["x"].unsqueeze(2).expand(-1, -1, 4, -1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_head_inputs_in_generation_agree_with_torch(family: str) -> None:
    model = hf_model(family)
    want = iv.run(generating_graph(), model, backend="torch")
    got = iv.run(generating_graph(), model, backend="nnsight")
    assert got["qi"].shape == (2, 8, 4, 32)
    for name in want:
        assert_close(got[name], want[name], **FP32, msg=name)
