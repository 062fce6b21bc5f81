"""The attention-internal sites (q, k, v, their per-head inputs, resid_mid) against values
computed by hand from each model's weights, on GPT-2 (fused [q|k|v]) and Llama (separate
projections, grouped-query attention: 4 query heads, 2 key-value heads).

The oracles use the model's own modules (norms, projections) and HuggingFace's
``hidden_states``; nothing here calls ``interventions.attention`` or the adapter.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from tests.adapters.torch.hand import FP32, IDS
from tests.tiny_models import hf_model

FAMILIES = ("gpt2", "llama")
LAYER = 1


def _block(model: torch.nn.Module, family: str, layer: int) -> torch.nn.Module:
    return model.transformer.h[layer] if family == "gpt2" else model.model.layers[layer]


def _resid_pre(model: torch.nn.Module, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, output_hidden_states=True).hidden_states[layer]


def _hand_qkv(family: str, x: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """q, k, v of ``layer`` for residual ``x`` (b, p, d) or per-head copies (b, p, h, d)."""
    model = hf_model(family)
    block = _block(model, family, layer)
    with torch.no_grad():
        if family == "gpt2":
            n = block.ln_1(x)
            qkv = n @ block.attn.c_attn.weight + block.attn.c_attn.bias
            d = model.config.n_embd
            parts = {"q": qkv[..., :d], "k": qkv[..., d : 2 * d], "v": qkv[..., 2 * d :]}
            return {p: t.unflatten(-1, (4, d // 4)) for p, t in parts.items()}
        n = block.input_layernorm(x)
        attn = block.self_attn
        return {
            "q": (n @ attn.q_proj.weight.T).unflatten(-1, (4, 8)),
            "k": (n @ attn.k_proj.weight.T).unflatten(-1, (2, 8)),
            "v": (n @ attn.v_proj.weight.T).unflatten(-1, (2, 8)),
        }


@pytest.mark.parametrize("family", FAMILIES)
def test_q_k_v_reads_equal_the_projections_by_hand(family: str) -> None:
    model = hf_model(family)
    g = iv.Graph()
    r = g.run("clean", tokens=IDS)
    for part in ("q", "k", "v", "q_input", "k_input"):
        r.read(part, layer=LAYER, name=part)
    out = iv.run(g, model)
    x = _resid_pre(model, LAYER)
    hand = _hand_qkv(family, x, LAYER)
    for part in ("q", "k", "v"):
        assert_close(out[part], hand[part], **FP32)
    assert out["k"].shape[-2] == (4 if family == "gpt2" else 2)  # key-value heads
    assert_close(out["q_input"], x.unsqueeze(2).expand(-1, -1, 4, -1), **FP32)
    assert_close(out["k_input"], x.unsqueeze(2).expand(-1, -1, out["k"].shape[-2], -1), **FP32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("part", ["q", "k"])
def test_zeroing_one_heads_q_or_k_changes_only_the_heads_that_read_it(
    family: str, part: str
) -> None:
    model = hf_model(family)
    g = iv.Graph()
    g.run("clean", tokens=IDS).read("head", layer=LAYER, name="clean.z")
    bad = g.run("edit", tokens=IDS)
    bad.ablate(part, layer=LAYER, head=1)
    bad.read("head", layer=LAYER, name="edit.z")
    bad.read(part, layer=LAYER, name="after")
    out = iv.run(g, model)
    assert torch.all(out["after"][:, :, 1] == 0)
    # GQA: key-value head 1 serves query heads 2 and 3 (4 query heads, 2 kv heads)
    touched = [1] if family == "gpt2" or part == "q" else [2, 3]
    for h in range(4):
        same = torch.allclose(out["edit.z"][:, :, h], out["clean.z"][:, :, h], atol=1e-6)
        assert same == (h not in touched), (h, touched)
    # position 0 attends only to itself: its softmax is 1 whatever q is
    if part == "q":
        assert_close(out["edit.z"][:, 0], out["clean.z"][:, 0], **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_patching_one_heads_q_input_gives_that_heads_q_from_its_own_input(family: str) -> None:
    model = hf_model(family)
    torch.manual_seed(1)
    c = torch.randn(model.config.hidden_size)
    g = iv.Graph()
    g.run("clean", tokens=IDS).read("q", layer=LAYER, name="clean.q")
    r = g.run("edit", tokens=IDS)
    r.patch("q_input", layer=LAYER, head=2, pos=-1, value=c)
    r.read("q", layer=LAYER, name="edit.q")
    out = iv.run(g, model)
    clean, edited = out["clean.q"], out["edit.q"]
    want = _hand_qkv(family, c.view(1, 1, -1), LAYER)["q"][0, 0, 2]
    assert_close(edited[:, -1, 2], want.expand(2, -1), **FP32)
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[:, -1, 2] = False
    assert torch.equal(edited[keep], clean[keep])  # exactly: other heads and positions


@pytest.mark.parametrize("family", FAMILIES)
def test_k_input_of_a_kv_head_and_self_patching_is_neutral(family: str) -> None:
    model = hf_model(family)
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    ref = clean.read("k_input", layer=LAYER)
    clean.read("logits", name="clean.logits")
    corrupt_ids = IDS.flip(-1)
    other = g.run("other", tokens=corrupt_ids)
    src = other.read("k_input", layer=LAYER)
    same = g.run("same", tokens=IDS)
    same.patch("k_input", layer=LAYER, value=ref)
    same.read("logits", name="same.logits")
    p = g.run("patched", tokens=IDS)
    p.patch("k_input", layer=LAYER, head=1, value=src)
    p.read("k", layer=LAYER, name="k")
    out = iv.run(g, model)
    assert_close(out["same.logits"], out["clean.logits"], **FP32)
    with torch.no_grad():
        h = model(corrupt_ids, output_hidden_states=True).hidden_states[LAYER]
    want = _hand_qkv(family, h, LAYER)["k"][:, :, 1]
    assert_close(out["k"][:, :, 1], want, **FP32)
    clean_k = _hand_qkv(family, _resid_pre(model, LAYER), LAYER)["k"]
    assert_close(out["k"][:, :, 0], clean_k[:, :, 0], **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_mid_is_resid_pre_plus_attn_and_a_write_reaches_the_residual(family: str) -> None:
    model = hf_model(family)
    g = iv.Graph()
    r = g.run("clean", tokens=IDS)
    r.read("resid_mid", layer=LAYER, name="mid")
    r.read("resid_post", layer=LAYER, name="clean.post")
    r.read("mlp_out", layer=LAYER, name="mlp")
    z = g.run("zero", tokens=IDS)
    z.ablate("resid_mid", layer=LAYER, pos=-1)
    z.read("resid_post", layer=LAYER, name="zero.post")
    out = iv.run(g, model)
    assert_close(out["mid"], out["clean.post"] - out["mlp"], **FP32)
    block = _block(model, family, LAYER)
    norm = block.ln_2 if family == "gpt2" else block.post_attention_layernorm
    with torch.no_grad():
        want = block.mlp(norm(torch.zeros(model.config.hidden_size)))  # 0 + mlp(norm(0))
    assert_close(out["zero.post"][:, -1], want.expand(2, -1), **FP32)
    assert_close(out["zero.post"][:, :-1], out["clean.post"][:, :-1], **FP32)


def test_k_head_counts_key_value_heads_and_neox_has_no_resid_mid() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("k", layer=0, head=2)
    with pytest.raises(iv.ValidationError, match="head"):
        iv.validate(g, hf_model("llama"))
    g = iv.Graph()
    g.run("a", tokens=IDS).read("resid_mid", layer=0)
    with pytest.raises(iv.UnknownSite, match=r"resid_mid.*same residual"):
        iv.validate(g, hf_model("gpt_neox"))


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
@pytest.mark.parametrize("family", FAMILIES)
def test_per_head_inputs_start_from_the_block_input_as_edited_in_the_run(
    family: str, backend: str
) -> None:
    """An add at resid_pre and a patch of one head's q input in the same run: that head's
    q comes from its patched copy, every other head's from the edited block input."""
    pytest.importorskip(backend)
    model = hf_model(family)
    d, c = torch.linspace(-1, 1, 32), torch.linspace(2, -2, 32)
    g = iv.Graph()
    r = g.run("e", tokens=IDS)
    r.add("resid_pre", layer=LAYER, direction=d, scale=1.0)
    r.patch("q_input", layer=LAYER, head=2, value=c)
    r.read("q", layer=LAYER, name="q")
    want = _hand_qkv(family, _resid_pre(model, LAYER) + d, LAYER)["q"]
    want[:, :, 2] = _hand_qkv(family, c.view(1, 1, -1), LAYER)["q"][0, 0, 2]
    assert_close(iv.run(g, model, backend=backend)["q"], want, **FP32)


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_per_head_input_keeps_its_edits_across_ops_at_other_views(
    family: str, backend: str
) -> None:
    """Patch head 2's q input, then ops at q (the same projection), then patch its last
    position again: the copy keeps the first patch (no double counting), so q of head 2
    is W norm(c2) at the last position and W norm(c1) elsewhere."""
    pytest.importorskip(backend)
    model = hf_model(family)
    c1, c2 = torch.linspace(-1, 1, 32), torch.linspace(2, -2, 32)
    g = iv.Graph()
    r = g.run("e", tokens=IDS)
    r.patch("q_input", layer=LAYER, head=2, value=c1)
    r.read("q", layer=LAYER, name="q_mid")
    r.read("q_input", layer=LAYER, name="qi_mid")
    r.scale("q", layer=LAYER, head=0, factor=1.0)
    r.patch("q_input", layer=LAYER, head=2, pos=-1, value=c2)
    r.read("q", layer=LAYER, name="q")
    out = iv.run(g, model, backend=backend)
    want = _hand_qkv(family, _resid_pre(model, LAYER), LAYER)["q"]
    want[:, :, 2] = _hand_qkv(family, c1.view(1, 1, -1), LAYER)["q"][0, 0, 2]
    assert_close(out["q_mid"], want, **FP32)
    assert torch.equal(out["qi_mid"][:, :, 2], c1.expand(2, 6, 32))
    want[:, -1, 2] = _hand_qkv(family, c2.view(1, 1, -1), LAYER)["q"][0, 0, 2]
    assert_close(out["q"], want, **FP32)
