"""The ``attn_scores`` site (pre-softmax attention scores) against scores computed by hand
from the weights, q k^T / sqrt(d_head) plus the causal mask (score + dtype min where a
key is in the future), on GPT-2 and Llama with grouped-query attention (4 query heads, 2
key-value heads; rotary applied to q and k), and on the ALiBi models (BLOOM, Falcon-RW's
sequential block and Falcon's parallel multi-query block with ALiBi: each head's slope
times the key position, written out by hand). Softmax of the scores is the existing
``attn_pattern`` site; edits at the scores reach the pattern and only the edited head.

The oracle uses the model's own norms and projections and HuggingFace's rotary helper;
nothing here calls ``interventions.attention`` or the adapter's hooks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import interventions as iv
from tests.adapters.torch.hand import FP32, IDS
from tests.circuits.split_forward import strong_model
from tests.tiny_models import hook_count

FAMILIES = ("gpt2", "llama")
LAYER = 1


def hand_scores(family: str, layer: int = LAYER) -> torch.Tensor:
    """[batch, head, query, key] scores of ``layer`` on ``IDS``, from the weights."""
    model = strong_model(family)
    with torch.no_grad():
        x = model(IDS, output_hidden_states=True).hidden_states[layer]
        n, p = model.config.num_attention_heads, IDS.shape[1]
        if family == "gpt2":
            block = model.transformer.h[layer]
            qkv = block.ln_1(x) @ block.attn.c_attn.weight + block.attn.c_attn.bias
            d = model.config.n_embd
            q, k = (qkv[..., i * d : (i + 1) * d].unflatten(-1, (n, d // n)) for i in (0, 1))
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, h, p, dh]
        else:
            block = model.model.layers[layer]
            attn, h = block.self_attn, block.input_layernorm(x)
            n_kv = model.config.num_key_value_heads
            q = (h @ attn.q_proj.weight.T).unflatten(-1, (n, -1)).transpose(1, 2)
            k = (h @ attn.k_proj.weight.T).unflatten(-1, (n_kv, -1)).transpose(1, 2)
            cos, sin = model.model.rotary_emb(x, torch.arange(p).unsqueeze(0))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(n // n_kv, dim=1)  # query head h reads kv head h // 2
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        future = torch.ones(p, p, dtype=torch.bool).triu(1)
        return scores + torch.where(future, torch.finfo(scores.dtype).min, 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_equal_q_k_by_hand_and_softmax_to_the_pattern(family: str) -> None:
    model = strong_model(family)
    g = iv.Graph()
    r = g.run("clean", tokens=IDS)
    r.read("attn_scores", layer=LAYER, name="scores")
    r.read("attn_pattern", layer=LAYER, name="pattern")
    r.read("attn_scores", layer=LAYER, head=2, pos=-1, name="one")
    out = iv.run(g, model)
    want = hand_scores(family)
    assert out["scores"].shape == (2, 4, 6, 6)
    assert_close(out["scores"], want, **FP32)
    assert (want[..., 1:, :-1].abs().max()) > 0.1  # scores of real size: the check can fail
    assert torch.all(out["scores"][0, 0, 0, 1:] == torch.finfo(torch.float32).min)
    assert_close(out["scores"].softmax(-1), out["pattern"], **FP32)
    assert_close(out["one"], want[:, 2, -1], **FP32)
    assert hook_count(model) == 0
    assert torch.overrides._get_current_function_mode_stack() == []  # the interceptor left


@pytest.mark.parametrize("family", FAMILIES)
def test_editing_one_heads_scores_changes_that_head_only(family: str) -> None:
    model = strong_model(family)
    g = iv.Graph()
    g.run("clean", tokens=IDS).read("head", layer=LAYER, name="clean.z")
    e = g.run("edit", tokens=IDS)
    e.patch("attn_scores", layer=LAYER, head=1, pos=-1, value=torch.arange(6.0))
    e.read("attn_pattern", layer=LAYER, name="pattern")
    e.read("head", layer=LAYER, name="edit.z")
    out = iv.run(g, model)
    assert_close(out["pattern"][:, 1, -1], torch.arange(6.0).softmax(-1).expand(2, -1), **FP32)
    for h in range(4):
        same = torch.equal(out["edit.z"][:, :, h], out["clean.z"][:, :, h])
        assert same == (h != 1), h
    assert torch.equal(out["edit.z"][:, :-1, 1], out["clean.z"][:, :-1, 1])  # earlier queries


def test_mean_ablated_scores_and_the_generation_refusal() -> None:
    model = strong_model("llama")
    g = iv.Graph()
    g.run("ref", tokens=IDS)
    e = g.run("edit", tokens=IDS)
    e.ablate("attn_scores", layer=0, method="mean", source="ref", per_position=True)
    e.read("attn_pattern", layer=0, name="pattern")
    out = iv.run(g, model)
    want = hand_scores("llama", 0).mean(dim=0, keepdim=True).softmax(-1).expand(2, -1, -1, -1)
    assert_close(out["pattern"], want, **FP32)
    g = iv.Graph()
    g.run("ref", tokens=IDS)
    g.run("b", tokens=IDS).ablate("attn_scores", layer=0, method="mean", source="ref")
    with pytest.raises(iv.ValidationError, match="per_position=True"):
        iv.validate(g, model)
    g = iv.Graph()
    g.run("a", tokens=IDS, max_new_tokens=2).read("attn_scores", layer=0)
    with pytest.raises(iv.ValidationError, match="generating run"):
        iv.validate(g, model)


def test_a_failed_run_leaves_no_hook_and_no_interceptor() -> None:
    model = strong_model("gpt2")
    o_proj = model.transformer.h[LAYER].attn.c_proj

    def boom(module: torch.nn.Module, args: object, output: object) -> None:
        raise RuntimeError("boom inside attention")

    handle = o_proj.register_forward_hook(boom)
    try:
        g = iv.Graph()
        g.run("a", tokens=IDS).read("attn_scores", layer=LAYER)
        with pytest.raises(iv.ExecutionError, match="boom"):
            iv.run(g, model)
    finally:
        handle.remove()
    assert hook_count(model) == 0
    assert torch.overrides._get_current_function_mode_stack() == []


ALIBI_FAMILIES = ("falcon_alibi", "falcon_alibi_par", "bloom")


def hand_alibi_scores(family: str, doubled: bool = False) -> torch.Tensor:
    """[batch, head, query, key] scores of ``LAYER`` on ``IDS`` of an ALiBi model, from the
    weights: ``q k^T / sqrt(d_head)`` plus head ``h``'s slope ``2^(-8 (h + 1) / 4)`` times
    the key's position (BLOOM adds that as is; Falcon scales it by ``1 / sqrt(d_head)``
    too), plus the causal mask. ``doubled``: ALiBi counted twice (the bug to catch)."""
    model = strong_model(family)
    with torch.no_grad():
        x = model(IDS, output_hidden_states=True).hidden_states[LAYER]
        block, n, p = model.transformer.h[LAYER], 4, IDS.shape[1]
        attn = block.self_attention
        qkv = attn.query_key_value(block.input_layernorm(x))
        if getattr(model.config, "multi_query", False):  # [q_0 .. q_3 | k | v]
            heads = qkv.unflatten(-1, (n + 2, -1))
            q, k = heads[..., :n, :], heads[..., n : n + 1, :].expand(-1, -1, n, -1)
        else:  # per head [q_h k_h v_h]
            heads = qkv.unflatten(-1, (n, 3, -1))
            q, k = heads[..., 0, :], heads[..., 1, :]
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, h, p, dh]
        d_head = q.shape[-1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)
        slopes = torch.tensor([2.0 ** (-2 * (h + 1)) for h in range(n)])
        alibi = slopes[:, None, None] * torch.arange(p, dtype=torch.float32)  # [h, 1, key]
        if family != "bloom":
            alibi = alibi / math.sqrt(d_head)
        scores = scores + (2 if doubled else 1) * alibi
        future = torch.ones(p, p, dtype=torch.bool).triu(1)
        return scores + torch.where(future, torch.finfo(scores.dtype).min, 0.0)


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
@pytest.mark.parametrize("family", ALIBI_FAMILIES)
def test_alibi_is_in_the_scores_once_and_reading_them_leaves_the_run_unchanged(
    family: str, backend: str
) -> None:
    """ALiBi models' scores by hand; reading scores or patterns (eager attention) leaves
    the logits those of the model's own forward (SDPA): transformers' eager Falcon counts
    ALiBi twice unless the adapter corrects it (``interventions.hf``)."""
    model = strong_model(family)
    assert model.config._attn_implementation == ("eager" if family == "bloom" else "sdpa")
    g = iv.Graph()
    r = g.run("clean", tokens=IDS)
    if backend == "torch":  # nnsight reads patterns, not scores
        r.read("attn_scores", layer=LAYER, name="scores")
    r.read("attn_pattern", layer=LAYER, name="pattern")
    r.read("logits", name="logits")
    out = iv.run(g, model, backend=backend)
    want = hand_alibi_scores(family)
    with torch.no_grad():
        assert_close(out["logits"], model(IDS).logits, **FP32)
    assert_close(out["pattern"], want.softmax(-1), **FP32)
    # the check can fail: ALiBi moves the pattern, and counting it twice is caught
    doubled = hand_alibi_scores(family, doubled=True).softmax(-1)
    assert (doubled - want.softmax(-1)).abs().max() > 1e-2
    if backend == "torch":
        assert_close(out["scores"], want, **FP32)
    assert hook_count(model) == 0
