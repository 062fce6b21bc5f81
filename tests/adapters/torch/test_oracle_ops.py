"""Every op of the torch reference adapter against hand-written hooks (DESIGN law 2's anchor).

Expected values come from :mod:`tests.adapters.torch.hand`: plain forward hooks that edit
the tensor with ordinary indexing, module paths restated from the transformers code, and
HuggingFace's own outputs (``hidden_states``, ``attentions``, ``logits``). Nothing here
calls ``interventions.apply`` or ``interventions.sites``.
"""

from __future__ import annotations

from itertools import product
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from interventions.plan import resample_indices
from tests.adapters.torch.hand import (
    FP32,
    IDS,
    MODELS,
    PATHS,
    capture,
    clean_site,
    hand_sae,
    hooked,
    logits_with,
    model_of,
    n_heads,
    randn,
    run,
    site_of,
)
from tests.tiny_models import HF_FAMILIES

IDS_B = torch.tensor([[1, 9, 8, 7, 6, 5], [2, 13, 14, 15, 16, 17]])  # a second, "corrupt" batch
REF_SHORT = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14]])  # 3 prompts of 4
REF_SAME = torch.tensor([[1, 20, 21, 22, 23, 24], [1, 30, 31, 32, 33, 34], [1, 40, 41, 42, 43, 44]])
REF_FOUR = torch.cat([REF_SAME, torch.tensor([[1, 50, 51, 52, 53, 54]])])


def S(family: str, site: str, layer: int | None = None) -> tuple[str, int | None]:
    return site_of(family, site, layer)


def read_logits(handle: iv.RunHandle, family: str, name: str = "out") -> None:
    handle.read(*S(family, "logits"), name=name)


def width(family: str, site: str, layer: int | None = None) -> int:
    return clean_site(family, *S(family, site, layer)).shape[-1]


# --- reads ----------------------------------------------------------------------------------

STANDARD = [
    ("embed", None),
    ("resid_pre", 0),
    ("resid_pre", 1),
    ("resid_post", 0),
    ("resid_post", 1),
    ("attn_out", 0),
    ("mlp_out", 1),
    ("head", 1),
    ("mlp_hidden", 0),
    ("final_norm", None),
    ("logits", None),
]


@pytest.mark.parametrize("family", MODELS)
def test_reads_equal_hand_captures(family: str) -> None:
    model = model_of(family)
    standard = [(s, layer) for s, layer in STANDARD if family != "toy" or s != "head"]
    sites = sorted({S(family, s, layer) for s, layer in standard}, key=str)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    for i, (site, layer) in enumerate(sites):
        r.read(site, layer, name=f"r{i}")
    res = run(g, model)
    expected = capture(model, family, sites)
    for i, (site, layer) in enumerate(sites):
        want = expected[i]  # head: already [batch, pos, head, d_head]
        assert_close(res[f"r{i}"], want, **FP32, msg=lambda m, s=site, ly=layer: f"{s}[{ly}]: {m}")


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_reads_equal_huggingface_outputs(family: str) -> None:
    """Standard sites against what HF itself reports, and the block arithmetic."""
    model = model_of(family)
    p = PATHS[family]
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    for site, layer in STANDARD:
        r.read(site, layer, name=f"{site}{'' if layer is None else layer}")
    r.read("attn_out", 1, name="attn_out1")
    r.read("mlp_out", 0, name="mlp_out0")
    r.read("head", 0, name="head0")
    r.read("mlp_hidden", 1, name="mlp_hidden1")
    res = run(g, model)
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        assert len(hs) == 3
        assert_close(res["logits"], out.logits, **FP32)
        assert_close(res["resid_pre0"], hs[0], **FP32)
        assert_close(res["resid_pre1"], hs[1], **FP32)
        assert_close(res["resid_post0"], hs[1], **FP32)  # non-final layer: hidden_states[L+1]
        assert_close(res["final_norm"], hs[-1], **FP32)  # HF's last entry is after the norm
        for layer in (0, 1):  # resid_post = resid_pre + attn_out + mlp_out, in every family
            pre = res[f"resid_pre{layer}"] if layer == 1 else hs[0]
            post = res["resid_post1"] if layer == 1 else hs[1]
            assert_close(post, pre + res[f"attn_out{layer}"] + res[f"mlp_out{layer}"], **FP32)
        for layer in (0, 1):  # attn_out = o_proj(heads, flattened); mlp_out = down(mlp_hidden)
            o_proj = model.get_submodule(f"{p['layers']}.{layer}.{p['o_proj']}")
            down = model.get_submodule(f"{p['layers']}.{layer}.{p['down']}")
            heads = res[f"head{layer}"]
            assert heads.shape == (2, 6, n_heads(model), heads.shape[-1])
            assert_close(res[f"attn_out{layer}"], o_proj(heads.flatten(-2)), **FP32)
            assert_close(res[f"mlp_out{layer}"], down(res[f"mlp_hidden{layer}"]), **FP32)
        norm = model.get_submodule(p["norm"])  # the last block's output is before the norm
        assert_close(res["final_norm"], norm(res["resid_post1"]), **FP32)
        unembed = model.get_submodule(p["unembed"])
        assert_close(res["logits"], unembed(res["final_norm"]), **FP32)
        embed = model.get_submodule(p["embed"])
        assert_close(res["embed"], embed(IDS), **FP32)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_embed_is_the_raw_token_embedding(family: str) -> None:
    """sites.py: embed = the token embedding module's output: W_E[ids], which transformers 5
    scales by sqrt(d_model) inside Gemma's embedding module."""
    model = model_of(family)
    g = iv.Graph()
    g.run("x", tokens=IDS).read("embed", name="e")
    w_e = model.get_submodule(PATHS[family]["embed"]).weight
    scale = model.config.hidden_size**0.5 if family == "gemma" else 1.0
    assert_close(run(g, model)["e"], w_e[IDS] * torch.tensor(scale, dtype=w_e.dtype), **FP32)


def _values(family: str, model: torch.nn.Module, layer: int) -> torch.Tensor:
    """Per-head value vectors [batch, pos, n_heads, d_head] of one layer, from its own modules."""
    p = PATHS[family]
    block = f"{p['layers']}.{layer}"
    h = n_heads(model)
    if family == "gpt2":
        (qkv,) = capture(model, family, [(f"{block}.attn.c_attn.output", None)])
        v = qkv[..., 2 * qkv.shape[-1] // 3 :]
        return v.reshape(*v.shape[:-1], h, -1)
    if family == "gpt_neox":
        (qkv,) = capture(model, family, [(f"{block}.attention.query_key_value.output", None)])
        qkv = qkv.reshape(*qkv.shape[:-1], h, -1)
        return qkv[..., 2 * qkv.shape[-1] // 3 :]
    (v,) = capture(model, family, [(f"{block}.self_attn.v_proj.output", None)])
    kv_heads = model.config.num_key_value_heads
    v = v.reshape(*v.shape[:-1], kv_heads, -1)
    return v.repeat_interleave(h // kv_heads, dim=-2)  # GQA: query head i uses kv head i // g


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_attn_pattern_and_heads(family: str) -> None:
    """attn_pattern = HF's eager attentions; head[:, q, h] = sum_k pattern[h, q, k] v_h[k]."""
    model = model_of(family)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    for layer in (0, 1):
        r.read("attn_pattern", layer, name=f"pat{layer}")
        r.read("head", layer, name=f"head{layer}")
    r.read("attn_pattern", 1, head=2, pos=-1, name="row")
    r.read("logits", name="logits")
    impl = model.config._attn_implementation
    res = run(g, model)
    assert model.config._attn_implementation == impl
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=IDS, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(impl)
    assert_close(res["logits"], out.logits, **FP32)
    for layer in (0, 1):
        pat = res[f"pat{layer}"]
        assert pat.shape == (2, n_heads(model), 6, 6)
        assert_close(pat, out.attentions[layer], **FP32)
        assert_close(pat.sum(-1), torch.ones(2, n_heads(model), 6), **FP32)
        assert torch.all(pat.triu(1) == 0)  # causal
        mixed = torch.einsum("bhqk,bkhd->bqhd", pat, _values(family, model, layer))
        assert_close(res[f"head{layer}"], mixed, atol=1e-5, rtol=1e-4)
    assert_close(res["row"], out.attentions[1][:, 2, -1, :], **FP32)


# --- writes, one op at a time ---------------------------------------------------------------


@pytest.mark.parametrize("family", MODELS)
def test_patch_aligned_from_another_run(family: str) -> None:
    """A whole-site read patched with a selector takes the same entries of the source.

    The source is shorter (4 positions): pos=-1 means each run's own last position.
    """
    model = model_of(family)
    site = S(family, "resid_post", 0)
    src_ids = IDS_B[:, 2:]
    g = iv.Graph()
    clean = g.run("clean", tokens=src_ids)
    corrupt = g.run("corrupt", tokens=IDS)
    h = clean.read(*site)
    corrupt.patch(*site, pos=-1, value=h)
    read_logits(corrupt, family)
    (c,) = capture(model, family, [site], src_ids)

    def edit(x: torch.Tensor) -> None:
        x[:, -1, :] = c[:, -1, :]

    assert_close(
        run(g, model, unbatched=True)["out"], logits_with(model, family, [(*site, edit)]), **FP32
    )


@pytest.mark.parametrize("family", MODELS)
def test_patch_with_explicit_selectors(family: str) -> None:
    """Values read with a selector are placed as they are (broadcast over the region)."""
    model = model_of(family)
    a, b = S(family, "resid_post", 0), S(family, "resid_pre", 1)
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS_B)
    corrupt = g.run("corrupt", tokens=IDS)
    one = clean.read(*b, batch=0, pos=2)  # [d], broadcast to every batch item and position
    two = clean.read(*a, pos=slice(0, 2))  # [2, 2, d] into two other positions
    corrupt.patch(*a, pos=[3, 4], value=two)
    corrupt.patch(*b, pos=[0, -1], value=one)
    read_logits(corrupt, family)
    ca, cb = capture(model, family, [a, b], IDS_B)
    assert one is not None

    def edit_a(x: torch.Tensor) -> None:
        x[:, [3, 4], :] = ca[:, 0:2, :]

    def edit_b(x: torch.Tensor) -> None:
        x[:, [0, -1], :] = cb[0, 2, :]

    want = logits_with(model, family, [(*a, edit_a), (*b, edit_b)])
    assert_close(run(g, model, unbatched=True)["out"], want, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_patch_with_constants(family: str) -> None:
    model = model_of(family)
    a, n = S(family, "attn_out", 0), S(family, "mlp_out", 1)
    d = width(family, "attn_out", 0)
    v, per_pos = randn(d, seed=1), randn(6, d, seed=2)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.patch(*a, pos=[1, 2], value=v)
    r.patch(*n, value=per_pos)  # [pos, d] over the whole site: every batch item
    read_logits(r, family)

    def edit_a(x: torch.Tensor) -> None:
        x[:, [1, 2], :] = v

    def edit_n(x: torch.Tensor) -> None:
        x[:] = per_pos

    want = logits_with(model, family, [(*a, edit_a), (*n, edit_n)])
    assert_close(run(g, model)["out"], want, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_ablate_zero(family: str) -> None:
    model = model_of(family)
    site = S(family, "mlp_hidden", 0)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.ablate(*site, pos=slice(1, 4))
    read_logits(r, family)

    def edit(x: torch.Tensor) -> None:
        x[:, 1:4, :] = 0.0

    assert_close(run(g, model)["out"], logits_with(model, family, [(*site, edit)]), **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_ablate_mean(family: str) -> None:
    """Mean over the reference run's batch and positions (a shorter run: 3 x 4)."""
    model = model_of(family)
    site = S(family, "attn_out", 1)
    g = iv.Graph()
    ref = g.run("ref", tokens=REF_SHORT)
    r = g.run("x", tokens=IDS)
    r.ablate(*site, method="mean", source=ref, pos=-1)
    read_logits(r, family)
    (src,) = capture(model, family, [site], REF_SHORT)
    mean = src.reshape(-1, src.shape[-1]).sum(0) / 12

    def edit(x: torch.Tensor) -> None:
        x[:, -1, :] = mean

    assert_close(
        run(g, model, unbatched=True)["out"], logits_with(model, family, [(*site, edit)]), **FP32
    )


@pytest.mark.parametrize("family", MODELS)
def test_ablate_mean_per_position(family: str) -> None:
    model = model_of(family)
    site = S(family, "resid_pre", 1)
    g = iv.Graph()
    ref = g.run("ref", tokens=REF_SAME)
    r = g.run("x", tokens=IDS)
    r.ablate(*site, method="mean", source=ref, per_position=True, pos=[1, 3])
    read_logits(r, family)
    (src,) = capture(model, family, [site], REF_SAME)

    def edit(x: torch.Tensor) -> None:
        for p in (1, 3):
            x[:, p, :] = (src[0, p] + src[1, p] + src[2, p]) / 3

    assert_close(
        run(g, model, unbatched=True)["out"], logits_with(model, family, [(*site, edit)]), **FP32
    )


@pytest.mark.parametrize("family", MODELS)
def test_ablate_resample(family: str) -> None:
    """Each target item takes the source item drawn by the documented resample_indices."""
    model = model_of(family)
    site, other = S(family, "mlp_out", 0), S(family, "resid_post", 1)
    g = iv.Graph()
    ref = g.run("ref", tokens=REF_FOUR)
    r = g.run("x", tokens=IDS)
    r.ablate(*site, method="resample", source=ref, seed=3)
    r.ablate(*other, method="resample", source=ref, seed=11, batch=1, pos=-1)
    read_logits(r, family)
    src_site, src_other = capture(model, family, [site, other], REF_FOUR)
    draw = resample_indices(3, 2, 4).tolist()
    draw_other = resample_indices(11, 2, 4).tolist()

    def edit(x: torch.Tensor) -> None:
        x[0] = src_site[draw[0]]
        x[1] = src_site[draw[1]]

    def edit_other(x: torch.Tensor) -> None:
        x[1, -1, :] = src_other[draw_other[1], -1, :]

    want = logits_with(model, family, [(*site, edit), (*other, edit_other)])
    assert_close(run(g, model, unbatched=True)["out"], want, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_add(family: str) -> None:
    model = model_of(family)
    site, emb = S(family, "resid_post", 1), S(family, "embed")
    d = width(family, "resid_post", 1)
    v, per_pos = randn(d, seed=3), randn(6, d, seed=4)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.add(*emb, direction=per_pos, scale=-0.5)
    r.add(*site, direction=v, scale=3.0, pos=-1)
    read_logits(r, family)

    def edit(x: torch.Tensor) -> None:
        x[:, -1, :] += 3.0 * v

    def edit_emb(x: torch.Tensor) -> None:
        x += -0.5 * per_pos

    want = logits_with(model, family, [(*emb, edit_emb), (*site, edit)])
    assert_close(run(g, model)["out"], want, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_project_out_one_direction(family: str) -> None:
    model = model_of(family)
    site = S(family, "mlp_out", 0)
    v = randn(width(family, "mlp_out", 0), seed=5) * 7.0  # not unit length
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.project_out(*site, direction=v)
    read_logits(r, family)
    u = v / v.norm()

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ u)[..., None] * u

    assert_close(run(g, model)["out"], logits_with(model, family, [(*site, edit)]), **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_project_out_two_row_subspace(family: str) -> None:
    model = model_of(family)
    site = S(family, "resid_pre", 1)
    d = width(family, "resid_pre", 1)
    v1, v2 = randn(d, seed=6), randn(d, seed=7) + randn(d, seed=6)  # not orthogonal
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.project_out(*site, direction=torch.stack([v1, v2]), pos=slice(2, None))
    read_logits(r, family)
    q1 = v1 / v1.norm()  # Gram-Schmidt
    w = v2 - (v2 @ q1) * q1
    q2 = w / w.norm()

    def edit(x: torch.Tensor) -> None:
        y = x[:, 2:, :]
        x[:, 2:, :] = y - (y @ q1)[..., None] * q1 - (y @ q2)[..., None] * q2

    assert_close(run(g, model)["out"], logits_with(model, family, [(*site, edit)]), **FP32)


@pytest.mark.parametrize("family", ["llama", "toy"])
@pytest.mark.parametrize(
    "rows",
    [
        pytest.param("dup", id="repeated-rows"),
        pytest.param("zero", id="zero-direction"),
    ],
)
def test_project_out_degenerate_directions(family: str, rows: str) -> None:
    """[v, 2v] spans only v; a zero direction spans nothing (project_out is then a no-op)."""
    model = model_of(family)
    site = S(family, "resid_post", 0)
    d = width(family, "resid_post", 0)
    v = randn(d, seed=8)
    direction = torch.stack([v, 2 * v]) if rows == "dup" else torch.zeros(d)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.project_out(*site, direction=direction)
    read_logits(r, family)
    u = v / v.norm()

    def edit(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ u)[..., None] * u if rows == "dup" else x

    assert_close(run(g, model)["out"], logits_with(model, family, [(*site, edit)]), **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_scale(family: str) -> None:
    model = model_of(family)
    site, out = S(family, "final_norm"), S(family, "logits")
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.scale(*site, factor=0.5, dims=slice(0, 8))
    r.scale(*out, factor=2.0, pos=-1)  # on the logits themselves
    read_logits(r, family)

    def edit(x: torch.Tensor) -> None:
        x[..., :8] *= 0.5

    def edit_out(x: torch.Tensor) -> None:
        x[:, -1, :] *= 2.0

    want = logits_with(model, family, [(*site, edit), (*out, edit_out)])
    assert_close(run(g, model)["out"], want, **FP32)


SAE_CASES = [
    ("keep", None),
    ("keep", iv.FeatureEdit.set([0, 3], 2.5)),
    ("drop", iv.FeatureEdit.scale([1, 2, 5], 3.0)),
    ("detach", iv.FeatureEdit.clamp([0, 1, 2, 3, 4], low=0.05, high=0.2)),
    ("drop", None),
]


def edit_by_hand(f: torch.Tensor, edit: iv.FeatureEdit | None) -> torch.Tensor:
    f = f.clone()
    if edit is None:
        return f
    for i in edit.features:
        if edit.mode == "set":
            f[..., i] = edit.value
        elif edit.mode == "scale":
            f[..., i] = f[..., i] * edit.value
        else:
            if edit.low is not None:
                f[..., i] = torch.where(f[..., i] < edit.low, edit.low, f[..., i])
            if edit.high is not None:
                f[..., i] = torch.where(f[..., i] > edit.high, edit.high, f[..., i])
    return f


def splice_by_hand(x: torch.Tensor, hs: Any, edit: iv.FeatureEdit | None, error: str):
    f = hs.encode(x)
    new = hs.decode(edit_by_hand(f, edit))
    return new if error == "drop" else new + (x - hs.decode(f))


@pytest.mark.parametrize("family", ["llama", "toy"])
@pytest.mark.parametrize(
    ("error", "edit"), SAE_CASES, ids=[f"{e}-{x.mode if x else 'none'}" for e, x in SAE_CASES]
)
def test_sae_splice_error_terms_and_edits(
    family: str, error: str, edit: iv.FeatureEdit | None
) -> None:
    model = model_of(family)
    site = S(family, "resid_post", 0)
    hs = hand_sae(width(family, "resid_post", 0), seed=9, b_dec_in=error == "drop")
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.sae_splice(
        *site, sae=hs.sae(), edits=[edit] if edit else [], error=error, features="f", pos=-1
    )
    read_logits(r, family)
    res = run(g, model)
    clean = clean_site(family, *site)

    def splice(x: torch.Tensor) -> None:
        x[:, -1, :] = splice_by_hand(x[:, -1, :], hs, edit, error)

    assert_close(res["f"], hs.encode(clean[:, -1, :]), **FP32)  # unedited features
    assert_close(res["out"], logits_with(model, family, [(*site, splice)]), **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_sae_splice(family: str) -> None:
    """Splices on several sites and selectors of one run, each with its own SAE and edit."""
    model = model_of(family)
    hidden, post, pre = (
        S(family, "mlp_hidden", 0),
        S(family, "resid_post", 0),
        S(family, "resid_pre", 1),
    )
    sae_h = hand_sae(width(family, "mlp_hidden", 0), seed=15, b_dec_in=True)
    sae_p = hand_sae(width(family, "resid_post", 0), seed=16)
    sae_q = hand_sae(width(family, "resid_pre", 1), seed=17, d_sae=20)
    e_h = iv.FeatureEdit.scale([1, 2, 5], 3.0)
    e_p = iv.FeatureEdit.set([0, 3], 2.5)
    e_q = iv.FeatureEdit.clamp(list(range(10)), high=0.1)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.sae_splice(*hidden, sae=sae_h.sae(), edits=[e_h], error="drop", pos=[0, 2], features="fh")
    r.sae_splice(*post, sae=sae_p.sae(), edits=[e_p], error="keep", pos=-1, features="fp")
    r.sae_splice(*pre, sae=sae_q.sae(), edits=[e_q], error="detach", batch=1, pos=slice(3, 5))

    def on_hidden(x: torch.Tensor) -> None:
        x[:, [0, 2], :] = splice_by_hand(x[:, [0, 2], :], sae_h, e_h, "drop")

    def on_post(x: torch.Tensor) -> None:
        x[:, -1, :] = splice_by_hand(x[:, -1, :], sae_p, e_p, "keep")

    def on_pre(x: torch.Tensor) -> None:
        x[1, 3:5, :] = splice_by_hand(x[1, 3:5, :], sae_q, e_q, "keep")  # detach: same values

    edits: list[Any] = [(*hidden, on_hidden), (*post, on_post), (*pre, on_pre)]
    if family != "toy":
        sae_o = hand_sae(width(family, "head", 1), seed=18)
        e_o = iv.FeatureEdit.scale([0], 0.0)
        r.sae_splice("head", 1, sae=sae_o.sae(), edits=[e_o], head=2, features="fo")

        def on_head(x: torch.Tensor) -> None:  # [batch, pos, head, d_head]
            x[:, :, 2, :] = splice_by_hand(x[:, :, 2, :], sae_o, e_o, "keep")

        edits.append(("head", 1, on_head))
    read_logits(r, family)
    res = run(g, model)
    assert_close(res["out"], logits_with(model, family, edits), **FP32)
    # recorded features: the unedited encodings of what reached each splice
    (h_in,) = capture(model, family, [hidden])
    (p_in,) = capture(model, family, [post], IDS, edits[:1])
    assert_close(res["fh"], sae_h.encode(h_in[:, [0, 2]]), **FP32)
    assert_close(res["fp"], sae_p.encode(p_in[:, -1]), **FP32)
    if family != "toy":
        (o_in,) = capture(model, family, [("head", 1)], IDS, edits[:3])
        assert_close(res["fo"], sae_o.encode(o_in[:, :, 2]), **FP32)


# --- heads, selectors, order ----------------------------------------------------------------


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_ops_on_heads(family: str) -> None:
    model = model_of(family)
    h = n_heads(model)
    d_head = capture(model, family, [("head", 1)])[0].shape[-1]
    v = randn(d_head, seed=10)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.add("head", 1, head=1, pos=-1, direction=v, scale=2.0)
    r.scale("head", 1, head=[0, 2], factor=-1.5)
    r.ablate("head", 0, head=-1)
    r.patch("head", 0, head=2, pos=[0, 3], value=v)
    read_logits(r, family)

    def edit1(x: torch.Tensor) -> None:  # x: [batch, pos, head, d_head]
        x[:, -1, 1, :] += 2.0 * v
        x[:, :, 0, :] *= -1.5
        x[:, :, 2, :] *= -1.5

    def edit0(x: torch.Tensor) -> None:
        x[:, :, h - 1, :] = 0.0
        x[:, 0, 2, :] = v
        x[:, 3, 2, :] = v

    want = logits_with(model, family, [("head", 1, edit1), ("head", 0, edit0)])
    assert_close(run(g, model)["out"], want, **FP32)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_patch_one_head_aligned(family: str) -> None:
    model = model_of(family)
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS_B)
    corrupt = g.run("corrupt", tokens=IDS)
    corrupt.patch("head", 1, head=2, pos=[0, 3], value=clean.read("head", 1))
    read_logits(corrupt, family)
    (c,) = capture(model, family, [("head", 1)], IDS_B)  # [batch, pos, head, d_head]

    def edit(x: torch.Tensor) -> None:
        x[:, 0, 2, :] = c[:, 0, 2, :]
        x[:, 3, 2, :] = c[:, 3, 2, :]

    assert_close(
        run(g, model, unbatched=True)["out"],
        logits_with(model, family, [("head", 1, edit)]),
        **FP32,
    )


# Selectors: (kwargs, hand read of x, which indices each axis touches for a write).
RESID_SELECTORS: list[tuple[dict[str, Any], Any, dict[int, list[int]]]] = [
    ({"pos": 2}, lambda x: x[:, 2, :], {1: [2]}),
    ({"pos": -1}, lambda x: x[:, 5, :], {1: [5]}),
    ({"pos": -6}, lambda x: x[:, 0, :], {1: [0]}),
    ({"pos": [0, 2, 5]}, lambda x: x[:, [0, 2, 5], :], {1: [0, 2, 5]}),
    ({"pos": [-1, 0]}, lambda x: x[:, [5, 0], :], {1: [5, 0]}),
    ({"pos": slice(1, None, 2)}, lambda x: x[:, 1::2, :], {1: [1, 3, 5]}),
    ({"pos": slice(-2, None)}, lambda x: x[:, 4:, :], {1: [4, 5]}),
    ({"pos": range(0, 3)}, lambda x: x[:, 0:3, :], {1: [0, 1, 2]}),
    ({"pos": torch.tensor([1, 3])}, lambda x: x[:, [1, 3], :], {1: [1, 3]}),
    ({"pos": torch.tensor(-2)}, lambda x: x[:, 4, :], {1: [4]}),
    ({"batch": 1}, lambda x: x[1], {0: [1]}),
    ({"batch": -1}, lambda x: x[1], {0: [1]}),
    ({"batch": [1]}, lambda x: x[1:2], {0: [1]}),
    ({"dims": slice(0, 8)}, lambda x: x[..., :8], {2: list(range(8))}),
    ({"dims": [0, 31]}, lambda x: x[..., [0, 31]], {2: [0, 31]}),
    ({"dims": 3}, lambda x: x[..., 3], {2: [3]}),
    (
        {"batch": 0, "pos": [1, 4], "dims": slice(4, None)},
        lambda x: x[0, [1, 4], 4:],
        {0: [0], 1: [1, 4], 2: list(range(4, 32))},
    ),
    ({"pos": [0, 3], "dims": [1, 2]}, lambda x: x[:, [0, 3]][:, :, [1, 2]], {1: [0, 3], 2: [1, 2]}),
]

HEAD_SELECTORS: list[tuple[dict[str, Any], Any, dict[int, list[int]]]] = [
    ({"head": 2}, lambda x: x[:, :, 2, :], {2: [2]}),
    ({"head": -1}, lambda x: x[:, :, 3, :], {2: [3]}),
    ({"head": [0, 3]}, lambda x: x[:, :, [0, 3], :], {2: [0, 3]}),
    (
        {"head": slice(0, 2), "dims": [0, 7]},
        lambda x: x[:, :, 0:2][..., [0, 7]],
        {2: [0, 1], 3: [0, 7]},
    ),
    ({"pos": [0, 2], "head": [1, 3]}, lambda x: x[:, [0, 2]][:, :, [1, 3]], {1: [0, 2], 2: [1, 3]}),
    ({"batch": 0, "pos": -1, "head": 1}, lambda x: x[0, 5, 1, :], {0: [0], 1: [5], 2: [1]}),
    ({"pos": -1, "head": [2], "dims": 0}, lambda x: x[:, 5, [2], 0], {1: [5], 2: [2], 3: [0]}),
]


def _mask(shape: tuple[int, ...], touched: dict[int, list[int]]) -> torch.Tensor:
    """True at every combination of the touched indices (all indices on untouched axes)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    axes = [touched.get(d, list(range(n))) for d, n in enumerate(shape)]
    for idx in product(*axes):
        mask[idx] = True
    return mask


def _selector_cases() -> list[Any]:
    cases = []
    for fam, site, table in (
        ("llama", ("resid_post", 0), RESID_SELECTORS),
        ("gpt2", ("head", 1), HEAD_SELECTORS),
        ("toy", ("blocks.0.output", None), RESID_SELECTORS[:13]),
    ):
        for kwargs, take, touched in table:
            cases.append(pytest.param(fam, site, kwargs, take, touched, id=f"{fam}-{kwargs}"))
    return cases


@pytest.mark.parametrize(("family", "site", "kwargs", "take", "touched"), _selector_cases())
def test_selectors(
    family: str, site: tuple[str, int | None], kwargs: dict[str, Any], take: Any, touched: Any
) -> None:
    """Reads (ints drop the axis, lists/slices keep it, outer products) and a scale write."""
    model = model_of(family)
    g = iv.Graph()
    plain = g.run("plain", tokens=IDS)
    plain.read(*site, **kwargs, name="sel")
    scaled = g.run("scaled", tokens=IDS)
    scaled.scale(*site, factor=-2.0, **kwargs)
    scaled.read(*site, name="after")  # the whole site, after the write
    res = run(g, model)
    x = clean_site(family, *site)  # head: [batch, pos, head, d_head]
    want = take(x)
    assert res["sel"].shape == want.shape
    assert_close(res["sel"], want, **FP32)
    mask = _mask(tuple(x.shape), touched)
    assert_close(res["after"], torch.where(mask, -2.0 * x, x), **FP32)


def test_ops_on_one_site_apply_in_order_and_reads_see_earlier_ops() -> None:
    family = "qwen2"
    model = model_of(family)
    v = randn(32, seed=12)
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.add("resid_post", 0, direction=v, pos=-1)
    r.read("resid_post", 0, name="mid")
    r.scale("resid_post", 0, factor=2.0)
    r.read("resid_post", 0, name="end")
    r.read("resid_pre", 1, name="next")  # the same tensor, seen by the next block
    r.read("logits", name="out")
    res = run(g, model)
    (x,) = capture(model, family, [("resid_post", 0)])
    mid = x.clone()
    mid[:, -1, :] += v
    assert_close(res["mid"], mid, **FP32)
    assert_close(res["end"], 2.0 * mid, **FP32)
    assert_close(res["next"], 2.0 * mid, **FP32)

    def edit(y: torch.Tensor) -> torch.Tensor:
        y[:, -1, :] += v
        return y * 2.0

    assert_close(res["out"], logits_with(model, family, [("resid_post", 0, edit)]), **FP32)


def test_sae_error_detach_blocks_the_gradient_of_the_error_term() -> None:
    """error='detach' equals 'keep' in value, but gradients flow through the SAE path only."""
    family = "llama"
    model = model_of(family)
    hs = hand_sae(32, seed=13)
    edit = iv.FeatureEdit.scale([0, 1, 2], 0.5)
    embed = model.get_submodule(PATHS[family]["embed"]).weight

    def grad_of(logits: torch.Tensor) -> torch.Tensor:
        embed.grad = None
        logits[:, -1, :].square().sum().backward()
        grad = embed.grad.clone()
        for p in model.parameters():
            p.grad = None
        return grad

    grads = {}
    for error in ("keep", "detach"):
        g = iv.Graph()
        r = g.run("x", tokens=IDS)
        r.sae_splice("resid_post", 0, sae=hs.sae(), edits=[edit], error=error)
        r.read("logits", name="out")
        grads[error] = grad_of(run(g, model, grad=True)["out"])

    def splice(detach: bool) -> Any:
        def fn(x: torch.Tensor) -> torch.Tensor:
            f = hs.encode(x)
            f2 = f.clone()
            f2[..., [0, 1, 2]] = f2[..., [0, 1, 2]] * 0.5
            err = x - hs.decode(f)
            return hs.decode(f2) + (err.detach() if detach else err)

        return fn

    for error, detach in (("keep", False), ("detach", True)):
        with hooked(model, family, [("resid_post", 0, splice(detach))]):
            want = grad_of(model(input_ids=IDS, use_cache=False).logits)
        assert_close(grads[error], want, **FP32)
    assert not torch.allclose(grads["keep"], grads["detach"])


def test_patching_from_recorded_sae_features() -> None:
    """features= is a value like any read; patching it into a same-width site should work."""
    family = "llama"
    model = model_of(family)
    hs = hand_sae(32, seed=14, d_sae=48)  # d_sae = d_mlp = 48
    g = iv.Graph()
    a = g.run("a", tokens=IDS_B)
    b = g.run("b", tokens=IDS)
    feats = a.sae_splice("resid_post", 0, sae=hs.sae(), features="f", pos=-1)  # [2, 48]
    assert feats is not None
    b.patch("mlp_hidden", 0, value=feats, pos=-1)
    b.read("logits", name="out")
    (x,) = capture(model, family, [("resid_post", 0)], IDS_B)
    f = hs.encode(x[:, -1, :])

    def edit(y: torch.Tensor) -> None:
        y[:, -1, :] = f

    res = run(g, model)
    assert_close(res["out"], logits_with(model, family, [("mlp_hidden", 0, edit)]), **FP32)
