"""A hand-written split forward of the tiny GPT-2 and Llama (grouped-query) models.

Every downstream input (each head's own q, k and v input, each MLP's input, the final
norm's input) is computed as the sum of the upstream node outputs written so far (the
embeddings, each head's ``z_h @ W_O[h]``, each MLP's output) plus the biases, and an edge
patch substitutes one term of one input. Attention is written out per head with its own
inputs; nothing here uses hooks, ``interventions`` or its attention helpers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from functools import cache

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

Key = tuple[str, ...]  # ("embed",), ("head", L, H), ("mlp", L)
# an edge: (upstream key, downstream input key) with inputs ("q", L, H), ("k", L, G),
# ("v", L, G), ("mlp", L), ("logits",)


@cache
def strong_model(family: str) -> torch.nn.Module:
    """The tiny ``family`` model with larger random weights (initializer_range 0.3), so
    that every edge moves the logits well above the fp32 tolerance."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import _cfg

    config = _cfg(family)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one head: q, k, v [b, p, d] -> [b, p, d]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = q.shape[1]
    mask = torch.ones(p, p, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def split_forward(
    model: torch.nn.Module,
    ids: torch.Tensor,
    edges: Mapping[tuple[Key, Key], torch.Tensor | None] | None = None,
    probes: Mapping[Key, torch.Tensor] | None = None,
    embed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[Key, torch.Tensor], dict[Key, torch.Tensor]]:
    """(logits, node outputs, downstream inputs). ``edges`` maps (upstream, input) to the
    upstream's replacement output for that input alone (``None``: zero). ``probes`` (zero
    tensors that require grad) are added to the inputs they name, so that the gradient of
    the output with respect to a probe is the gradient with respect to that input alone;
    gradients are off without them. ``embed`` replaces the token embeddings (GPT-2:
    before its position embeddings are added)."""
    edges = dict(edges or {})
    outs: dict[Key, torch.Tensor] = {}
    inputs: dict[Key, torch.Tensor] = {}
    gpt2 = model.config.model_type == "gpt2"

    def read(key: Key, resid: torch.Tensor) -> torch.Tensor:
        x = resid
        for (up, down), value in edges.items():
            if down == key:
                x = x + (torch.zeros_like(outs[up]) if value is None else value) - outs[up]
        if probes is not None and key in probes:
            x = x + probes[key]
        inputs[key] = x
        return x

    with torch.no_grad() if probes is None else contextlib.nullcontext():
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        if gpt2:
            blocks = model.transformer.h
            tok = model.transformer.wte(ids) if embed is None else embed
            outs[("embed",)] = tok + model.transformer.wpe(pos)
        else:
            blocks = model.model.layers
            outs[("embed",)] = model.model.embed_tokens(ids) if embed is None else embed
            cos, sin = model.model.rotary_emb(outs[("embed",)], pos)
        resid = outs[("embed",)]
        n = model.config.num_attention_heads
        n_kv = getattr(model.config, "num_key_value_heads", None) or n
        d = model.config.hidden_size
        dh = d // n
        for layer, block in enumerate(blocks):
            if gpt2:
                w_o, attn_bias = block.attn.c_proj.weight, block.attn.c_proj.bias  # [d, d]
            else:
                w_o, attn_bias = block.self_attn.o_proj.weight.T, torch.zeros(d)

            def proj(
                part: int, h: int, x: torch.Tensor, block: torch.nn.Module = block
            ) -> torch.Tensor:
                """Head (or key-value head) ``h``'s q, k or v (``part`` 0, 1, 2) of input ``x``."""
                if gpt2:
                    w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # [d, 3d]
                    cols = slice(part * d + h * dh, part * d + (h + 1) * dh)
                    return block.ln_1(x) @ w[:, cols] + b[cols]
                attn = block.self_attn
                ws = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
                return block.input_layernorm(x) @ ws[part][h * dh : (h + 1) * dh].T

            ks = [proj(1, g, read(("k", layer, g), resid)) for g in range(n_kv)]
            vs = [proj(2, g, read(("v", layer, g), resid)) for g in range(n_kv)]
            attn_out = attn_bias.expand_as(resid)
            for h in range(n):
                q = proj(0, h, read(("q", layer, h), resid))
                k, v = ks[h // (n // n_kv)], vs[h // (n // n_kv)]
                if not gpt2:  # rotary on q and k: [b, heads=1, p, dh]
                    q4, k4 = apply_rotary_pos_emb(q.unsqueeze(1), k.unsqueeze(1), cos, sin)
                    q, k = q4.squeeze(1), k4.squeeze(1)
                z = _attend(q, k, v)
                outs[("head", layer, h)] = z @ w_o[h * dh : (h + 1) * dh]
                attn_out = attn_out + outs[("head", layer, h)]
            resid = resid + attn_out
            norm = block.ln_2 if gpt2 else block.post_attention_layernorm
            outs[("mlp", layer)] = block.mlp(norm(read(("mlp", layer), resid)))
            resid = resid + outs[("mlp", layer)]
        final = model.transformer.ln_f if gpt2 else model.model.norm
        logits = model.lm_head(final(read(("logits",), resid)))
    return logits, outs, inputs
