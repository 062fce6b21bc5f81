"""Every family's map, held to the model itself: the residual identity, the MoE router
sites against hand-written hooks, proposing a map from the module tree, and half precision
on every backend at a stated tolerance."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from interventions.architectures import describe
from tests.tiny_models import ALL_FAMILIES, FALCON_FAMILIES, MOE_FAMILIES, hf_model, hook_count

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 8], [6, 6, 30, 31, 2, 9, 40]])
# half precision: every backend runs the same kernels in the same order, so they agree far
# inside one bf16/fp16 rounding step; stated per dtype
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _reads(family: str) -> dict[str, torch.Tensor]:
    g = iv.Graph()
    r = g.run("a", tokens=IDS)
    for layer in range(2):
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            r.read(site, layer=layer, name=f"{site}{layer}")
    r.read("logits", name="logits")
    return dict(iv.run(g, hf_model(family)))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_residual_identity_and_shapes(family: str) -> None:
    out = _reads(family)
    model = hf_model(family)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(IDS).logits, atol=1e-5, rtol=1e-5)
    for layer in range(2):
        parts = [out[f"{s}{layer}"] for s in ("resid_pre", "resid_post", "attn_out", "mlp_out")]
        assert {p.shape for p in parts} == {(2, 7, 32)}, family
        pre, post, attn, mlp = parts
        torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_propose_architecture_finds_the_builtin_map(family: str) -> None:
    model = hf_model(family)
    want = describe(model).arch
    assert want is not None
    got = iv.propose_architecture(model)
    for field in ("layers", "embed", "final_norm", "attn", "attn_out_proj", "mlp"):
        assert getattr(got, field) == getattr(want, field), field
    assert (got.attn_out_module, got.mlp_out_module) == (want.attn_out_module, want.mlp_out_module)
    assert (got.mlp_down_proj, got.router, got.flat_mlp) == (
        want.mlp_down_proj,
        want.router,
        want.flat_mlp,
    )


def test_check_architecture_catches_a_wrong_map() -> None:
    from dataclasses import replace

    model = hf_model("bloom")
    right = describe(model).arch
    assert right is not None
    assert iv.check_architecture(model, right).ok
    # BLOOM's attention module adds the residual itself: its output is not attn_out
    wrong = iv.check_architecture(model, replace(right, attn_out=None))
    assert not wrong.ok and "resid_post != resid_pre + attn_out + mlp_out" in wrong.problems[0]
    missing = iv.check_architecture(model, replace(right, mlp_out="nope"))
    assert missing.problems == ("no such modules: transformer.h.0.nope, transformer.h.1.nope",)


def test_a_registered_proposal_gives_standard_sites() -> None:
    model = hf_model("gptj")
    arch = iv.propose_architecture(model, name="gptj-proposed")
    saved = iv.architectures()["gptj"]
    iv.register_architecture(arch, override=True)
    try:
        g = iv.Graph()
        g.run("a", tokens=IDS).read("mlp_out", layer=1, name="m")
        got = iv.run(g, model)["m"]
    finally:
        iv.register_architecture(saved, override=True)
    with torch.no_grad():
        want = model.transformer.h[1].mlp(model.transformer.h[1].ln_1(_block_input(model, 1)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _block_input(model: torch.nn.Module, layer: int) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.transformer.h[layer].register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_sites_match_hand_written_hooks(family: str) -> None:
    model = hf_model(family)
    gate = model.model.layers[1].mlp.gate
    seen: list[tuple[torch.Tensor, ...]] = []
    handle = gate.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        handle.remove()
    logits, _, chosen = seen[0]
    g = iv.Graph()
    r = g.run("a", tokens=IDS)
    r.read("router_logits", layer=1, name="logits")
    r.read("experts_chosen", layer=1, pos=-1, name="chosen")
    out = iv.run(g, model)
    torch.testing.assert_close(out["logits"], logits.reshape(2, 7, 4), atol=0, rtol=0)
    assert torch.equal(out["chosen"], chosen.reshape(2, 7, 2)[:, -1])
    for backend in ("nnsight", "pyvene"):  # declared unsupported, by name, before running
        with pytest.raises(iv.UnsupportedOp, match="router_logits"):
            iv.validate(g, model, backend=backend)
    assert hook_count(model) == 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_mlp_hidden_is_named_missing_on_moe_families(family: str) -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("mlp_hidden", layer=0)
    with pytest.raises(iv.UnknownSite, match="no 'mlp_hidden'"):
        iv.validate(g, hf_model(family))


def test_router_sites_are_named_missing_on_dense_families() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("router_logits", layer=0)
    with pytest.raises(iv.UnknownSite, match="not a mixture-of-experts family"):
        iv.validate(g, hf_model("llama"))


def _half(family: str, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(hf_model(family)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mixtral"])
@pytest.mark.parametrize("backend", ["nnsight", "pyvene"])
def test_half_precision_agrees(family: str, dtype: torch.dtype, backend: str) -> None:
    model = _half(family, dtype)
    torch.manual_seed(3)
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    h = clean.read("resid_post", layer=0, name="h")
    b = g.run("b", tokens=IDS.flip(0))
    b.patch("resid_post", layer=0, value=h, pos=-1)
    # a float32 direction: it follows the model's dtype at the site
    b.add("mlp_out", layer=1, direction=torch.randn(32), scale=2.0)
    b.ablate("attn_out", layer=1, method="zero", pos=[1, 2])
    # a float32 SAE: it encodes and decodes in float32, and its output goes back into the
    # model in the model's dtype (the error term kept in that dtype too)
    w = torch.randn(32, 16) / 4
    sae = iv.StandardSAE(w, torch.zeros(16), w.T.contiguous(), torch.zeros(32))
    b.sae_splice("resid_pre", layer=1, sae=sae, error="drop", features="f")
    b.read("resid_pre", layer=1, name="spliced")
    b.read("logits", name="out")
    want = iv.run(g, model)
    got = iv.run(g, model, backend=backend)
    tol = HALF_TOLERANCE[dtype]
    assert want["f"].dtype == got["f"].dtype == torch.float32
    torch.testing.assert_close(got["f"], want["f"], atol=tol, rtol=tol)
    for name in ("h", "spliced", "out"):
        assert want[name].dtype == got[name].dtype == dtype
        torch.testing.assert_close(got[name], want[name], atol=tol, rtol=tol)
    # and the half model is close to the fp32 one (a sanity bound, not the contract)
    ref = iv.run(g, hf_model(family))
    torch.testing.assert_close(want["out"].float(), ref["out"], atol=0.25, rtol=0.1)


@pytest.mark.parametrize("family", FALCON_FAMILIES)
def test_falcon_mlp_out_is_read_before_the_block_adds_attention_into_it(family: str) -> None:
    """Falcon's block does ``mlp_output += attention_output`` in place after the MLP
    returns: a read of ``mlp_out`` is the MLP alone, held to the MLP run by hand on the
    input its norm gives; q/k/v are refused by name (the fused layout differs per variant)."""
    model = hf_model(family)
    layer = model.transformer.h[1]
    norm = layer.ln_mlp if family == "falcon_new" else layer.input_layernorm
    if not model.config.parallel_attn:  # sequential: the MLP reads its own norm
        norm = layer.post_attention_layernorm
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    try:
        g = iv.Graph()
        g.run("a", tokens=IDS).read("mlp_out", layer=1, name="m")
        got = iv.run(g, model)["m"]
    finally:
        handle.remove()
    with torch.no_grad():
        want = layer.mlp(seen[-1])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for backend in ("nnsight", "pyvene"):
        torch.testing.assert_close(
            iv.run(g, model, backend=backend)["m"], want, atol=1e-6, rtol=1e-6
        )
    g = iv.Graph()
    g.run("a", tokens=IDS).read("q", layer=0)
    with pytest.raises(iv.UnknownSite, match="no 'q'"):
        iv.validate(g, model)


@pytest.mark.parametrize("backend", ["torch", "nnsight", "pyvene"])
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_reads_upcast_on_request_equal_the_half_reads_upcast(family: str, backend: str) -> None:
    """``read_dtype=torch.float32``: a bf16 model's reads come back float32, bit for bit
    the bf16 reads upcast; the model stays bf16 (it runs in its own dtype); integer
    results (generated tokens, expert ids) stay integers."""
    model = _half(family, torch.bfloat16)
    g = iv.Graph()
    a = g.run("a", tokens=IDS)
    a.read("resid_post", layer=0, name="h")
    a.read("head", layer=1, head=2, pos=-1, name="head")
    b = g.run("b", tokens=IDS.flip(0))
    b.patch("mlp_out", layer=0, value=a.read("mlp_out", layer=0), pos=[1, 2])
    b.add(
        "resid_pre", layer=1, direction=torch.randn(32, generator=torch.Generator().manual_seed(4))
    )
    b.read("logits", pos=-1, name="out")
    gen = g.run("gen", tokens=IDS[:1, :5], max_new_tokens=2)
    gen.read("resid_post", layer=1, name="gen.h")
    half = iv.run(g, model, backend=backend)
    up = iv.run(g, model, backend=backend, read_dtype=torch.float32)
    assert set(up) == set(half)
    for name in half:
        if half[name].is_floating_point():
            assert half[name].dtype == torch.bfloat16 and up[name].dtype == torch.float32, name
            assert torch.equal(up[name], half[name].float()), name
        else:
            assert up[name].dtype == half[name].dtype and torch.equal(up[name], half[name])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert hook_count(model) == 0


def test_read_dtype_must_be_a_floating_dtype() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("logits", name="out")
    for bad in (torch.int64, "float32"):
        with pytest.raises(iv.InterventionError, match=r"read_dtype=.*floating-point torch dtype"):
            iv.run(g, hf_model("llama"), read_dtype=bad)  # type: ignore[arg-type]
    assert hook_count(hf_model("llama")) == 0


def _moe_input(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """The input of layer ``layer``'s sparse MoE block (a hand-written pre-hook)."""
    seen: list[torch.Tensor] = []
    block = model.model.layers[layer].mlp
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        handle.remove()
    return seen[0]


def _by_hand(
    model: torch.nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor | None = None,
    chosen: torch.Tensor | None = None,
    layer: int = 1,
) -> tuple[torch.Tensor, ...]:
    """Route ``x`` by hand and run every expert by hand from the fused weights: (every
    expert's output (b, t, e, d), the chosen ids (b, t, k), their weights (b, t, k)).

    ``logits`` routes by those router logits instead of the gate's own; ``chosen`` takes
    those ids and weighs them by the softmax of the logits. The rule, from each family's
    transformers router: softmax in float32, top-k, renormalised (Mixtral always, the others
    if ``config.norm_topk_prob``), weights cast to the logits' dtype (all but Mixtral)."""
    import torch.nn.functional as F

    moe, config = model.model.layers[layer].mlp, model.config
    logits = x @ moe.gate.weight.T if logits is None else logits
    probs = F.softmax(logits.float(), dim=-1)
    if chosen is None:
        weights, chosen = probs.topk(config.num_experts_per_tok, dim=-1)
    else:
        weights = probs.gather(-1, chosen)
    if config.model_type == "mixtral" or getattr(config, "norm_topk_prob", False):
        weights = weights / weights.sum(-1, keepdim=True)
    if config.model_type != "mixtral":
        weights = weights.to(logits.dtype)
    outs = []
    for e in range(moe.experts.gate_up_proj.shape[0]):
        gate, up = (x @ moe.experts.gate_up_proj[e].T).chunk(2, dim=-1)
        outs.append((F.silu(gate) * up) @ moe.experts.down_proj[e].T)
    return torch.stack(outs, dim=2), chosen, weights


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_expert_out_against_experts_run_by_hand(family: str) -> None:
    """``expert_out[L]`` is each expert's output for every token (before its routing
    weight), held to the experts computed by hand from the fused weights; the routed sum
    of the chosen ones is the block's output (Qwen-MoE: plus its shared expert); and
    patching one expert's output at one token changes ``mlp_out`` there by exactly the
    routing weight times the change, or not at all where that expert was not chosen."""
    model = hf_model(family)
    x = _moe_input(model, 1)
    every, chosen, weights = _by_hand(model, x)
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    clean.read("expert_out", layer=1, name="experts")
    clean.read("mlp_out", layer=1, name="mlp")
    clean.read("experts_chosen", layer=1, name="chosen")
    # (batch 1, pos 3): patch the first chosen expert there, and one it did not choose
    on = int(chosen[1, 3, 0])
    off = next(e for e in range(4) if e not in chosen[1, 3].tolist())
    value = torch.linspace(-2.0, 2.0, 32)
    for name, expert in (("on", on), ("off", off)):
        run = g.run(name, tokens=IDS)
        run.patch("expert_out", layer=1, head=expert, batch=1, pos=3, value=value)
        run.read("mlp_out", layer=1, name=f"{name}.mlp")
        run.read("expert_out", layer=1, head=expert, name=f"{name}.expert")
    out = iv.run(g, model)
    assert out["experts"].shape == (2, 7, 4, 32)
    torch.testing.assert_close(out["experts"], every, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["chosen"], chosen)
    routed = (every.gather(2, chosen[..., None].expand(2, 7, 2, 32)) * weights[..., None]).sum(2)
    if family == "qwen2_moe":
        moe = model.model.layers[1].mlp
        with torch.no_grad():
            routed = routed + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)
    torch.testing.assert_close(out["mlp"], routed, atol=1e-5, rtol=1e-5)
    # the patch: the read after it sees the value; mlp_out moves by weight x change
    assert torch.equal(out["on.expert"][1, 3], value)
    change = torch.zeros(2, 7, 32)
    change[1, 3] = weights[1, 3, 0] * (value - every[1, 3, on])
    torch.testing.assert_close(out["on.mlp"] - out["mlp"], change, atol=1e-5, rtol=1e-5)
    # not chosen there: nothing changes (to the rounding of a batched forward pass)
    torch.testing.assert_close(out["off.mlp"], out["mlp"], atol=1e-6, rtol=0)
    for backend in ("nnsight", "pyvene"):  # declared unsupported, by name, before running
        with pytest.raises(iv.UnsupportedOp, match="cannot reach site 'expert_out'"):
            iv.validate(g, model, backend=backend)
    assert hook_count(model) == 0


def test_expert_out_is_named_missing_on_dense_families_and_checks_the_expert_index() -> None:
    g = iv.Graph()
    g.run("a", tokens=IDS).read("expert_out", layer=0)
    with pytest.raises(iv.UnknownSite, match=r"no 'expert_out'.*not a mixture-of-experts"):
        iv.validate(g, hf_model("llama"))
    g = iv.Graph()
    g.run("a", tokens=IDS).read("expert_out", layer=0, head=4)
    with pytest.raises(iv.ValidationError, match="head"):
        iv.validate(g, hf_model("mixtral"))
