"""The pyvene backend against the torch reference (DESIGN law 2), plus its hygiene (law 4).

Every result must equal the reference's at fp32 ``atol=rtol=1e-5``, with the same keys.
The matrix is family x op x selector kind; each test builds one graph with one run per
selector kind, so a family/op pair costs one ``iv.run`` per backend.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from interventions.adapters import pyvene as pv_adapter
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.testing import assert_close

import interventions as iv
from interventions.architectures import describe
from interventions.attention import QKV_VIEWS, SPLIT_VIEWS
from tests.tiny_models import HF_FAMILIES, fails_on_real_data, hf_model, hook_count, toy_net

pytest.importorskip("pyvene")

IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 8, 12, 16, 20, 24]])
IDS_SRC = torch.tensor([[1, 30, 31, 32, 33, 34], [1, 40, 41, 42, 43, 44]])
IDS_REF = torch.tensor([[1, 50, 51, 52, 53, 54], [1, 6, 7, 10, 11, 14], [1, 60, 61, 62, 63, 2]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def agree(graph: iv.Graph, model: nn.Module, *, batched: bool = True) -> iv.Results:
    """Run on both backends, runs one by one and (``batched``) batched as ``iv.run`` does.

    Same keys, same numbers, no hooks left. Unbatched, every selector reaches the adapter
    as written; batched, the planner's rewritten graph (shifted batch selectors) does.
    """
    ref = iv.run(graph, model, backend="torch", batch=False)
    for batch in (False, True) if batched else (False,):
        got = iv.run(graph, model, backend="pyvene", batch=batch)
        assert list(got) == list(ref)
        for name in ref:
            assert got[name].dtype == ref[name].dtype, name
            assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=_named(name))
        assert got.provenance.backend == "pyvene"
        assert hook_count(model) == 0
    return got


def _named(name: str) -> Callable[[str], str]:
    return lambda message: f"{name}: {message}"


# --- the op x selector matrix ------------------------------------------------------------

PLAIN: dict[str, dict[str, Any]] = {
    "all": {},
    "int": {"pos": 2},
    "neg": {"pos": -1},
    "list": {"pos": [0, -2, 3]},
    "slice": {"pos": slice(1, -1)},
    "batch": {"batch": 1},
    "dims": {"dims": slice(4, 12)},
    "mixed": {"batch": [0], "pos": slice(None, None, 2), "dims": [1, 3, 5]},
}
HEADS: dict[str, dict[str, Any]] = {
    "one": {"head": 1},
    "list": {"head": [0, 2], "pos": -1},
    "slice": {"head": slice(1, None), "pos": [0, 3]},
    "neg": {"head": -1, "batch": 0, "dims": slice(0, 4)},
}
SITES = {"resid_post": (0, PLAIN), "head": (1, HEADS)}


def region_width(select: dict[str, Any], full: int) -> int:
    dims = select.get("dims")
    if dims is None:
        return full
    return len(range(full)[dims]) if isinstance(dims, slice) else len(dims)


def sae(width: int, seed: int) -> iv.StandardSAE:
    return iv.StandardSAE(
        W_enc=randn(width, 12, seed=seed),
        b_enc=randn(12, seed=seed + 1) * 0.1,
        W_dec=randn(12, width, seed=seed + 2),
        b_dec=randn(width, seed=seed + 3) * 0.1,
    )


OpBuilder = Callable[[iv.RunHandle, dict[str, iv.RunHandle], str, int, dict[str, Any], int], None]


def _patch_aligned(
    r: iv.RunHandle, runs: dict[str, iv.RunHandle], s: str, layer: int, sel: dict, w: int
) -> None:
    value = runs["src"].read(s, layer, name=f"src.{r.name}")
    r.patch(s, layer, value=value, **sel)


def _patch_explicit(
    r: iv.RunHandle, runs: dict[str, iv.RunHandle], s: str, layer: int, sel: dict, w: int
) -> None:
    value = runs["src"].read(s, layer, name=f"src.{r.name}", **sel)
    r.patch(s, layer, value=value, **sel)


OPS: dict[str, OpBuilder] = {
    "read": lambda r, runs, s, layer, sel, w: r.read(s, layer, name=f"{r.name}.sel", **sel),  # type: ignore[dict-item]
    "patch_const": lambda r, runs, s, layer, sel, w: r.patch(s, layer, value=randn(w), **sel),
    "patch_aligned": _patch_aligned,
    "patch_explicit": _patch_explicit,
    "ablate_zero": lambda r, runs, s, layer, sel, w: r.ablate(s, layer, **sel),
    "ablate_mean": lambda r, runs, s, layer, sel, w: r.ablate(
        s, layer, method="mean", source=runs["ref"], **sel
    ),
    "ablate_mean_per_pos": lambda r, runs, s, layer, sel, w: r.ablate(
        s, layer, method="mean", source=runs["ref"], per_position=True, **sel
    ),
    "ablate_resample": lambda r, runs, s, layer, sel, w: r.ablate(
        s, layer, method="resample", source=runs["ref"], seed=3, **sel
    ),
    "add": lambda r, runs, s, layer, sel, w: r.add(s, layer, direction=randn(w), scale=1.5, **sel),
    "project_out": lambda r, runs, s, layer, sel, w: r.project_out(
        s, layer, direction=randn(w, seed=1), **sel
    ),
    "project_out_2d": lambda r, runs, s, layer, sel, w: r.project_out(
        s, layer, direction=randn(2, w, seed=2), **sel
    ),
    "scale": lambda r, runs, s, layer, sel, w: r.scale(s, layer, factor=-0.5, **sel),
    "sae_keep": lambda r, runs, s, layer, sel, w: r.sae_splice(  # type: ignore[dict-item]
        s,
        layer,
        sae=sae(w, 10),
        edits=[iv.FeatureEdit.set(3, 2.0), iv.FeatureEdit.scale([0, 1], 0.5)],
        features=f"{r.name}.feats",
        **sel,
    ),
    "sae_drop": lambda r, runs, s, layer, sel, w: r.sae_splice(  # type: ignore[dict-item]
        s,
        layer,
        sae=sae(w, 20),
        edits=[iv.FeatureEdit.clamp([2, 5], low=0.1, high=0.3)],
        error="drop",
        **sel,
    ),
    "sae_detach": lambda r, runs, s, layer, sel, w: r.sae_splice(  # type: ignore[dict-item]
        s, layer, sae=sae(w, 30), error="detach", features=f"{r.name}.feats", **sel
    ),
}


def _width(model: nn.Module, site: str) -> int:
    info = describe(model)
    width = info.width(iv.Site(site, 0 if site != "logits" else None))
    assert width is not None
    return width


@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_op_and_selector_matrix(family: str, op: str, site: str) -> None:
    model = hf_model(family)
    layer, selectors = SITES[site]
    full = _width(model, site)
    g = iv.Graph()
    runs = {"src": g.run("src", tokens=IDS_SRC), "ref": g.run("ref", tokens=IDS_REF)}
    for kind, sel in selectors.items():
        r = g.run(kind, tokens=IDS)
        OPS[op](r, runs, site, layer, sel, region_width(sel, full))
        r.read(site, layer, name=f"{kind}.after")
        r.read("logits", name=f"{kind}.logits")
    agree(g, model, batched=family in ("gpt2", "llama"))  # batching: covered elsewhere too


# --- other sites, op order, values between runs -------------------------------------------


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_every_standard_site(family: str) -> None:
    model = hf_model(family)
    info = describe(model)
    assert info.d_mlp is not None and info.arch is not None
    g = iv.Graph()
    src = g.run("src", tokens=IDS_SRC)
    r = g.run("x", tokens=IDS)
    r.add("embed", direction=randn(32), pos=1)
    r.scale("resid_pre", 1, factor=0.7, pos=[-1, 0])
    r.patch("attn_out", 0, value=src.read("attn_out", 0), pos=slice(2, 5))
    r.ablate("mlp_out", 1, pos=-2)
    r.project_out("mlp_hidden", 0, direction=randn(info.d_mlp, seed=4), pos=-1)
    r.add("final_norm", direction=randn(32, seed=5), scale=0.1)
    r.scale("logits", factor=2.0, pos=-1)
    for site, layer in [
        ("embed", None),
        ("resid_pre", 1),
        ("attn_out", 0),
        ("mlp_out", 1),
        ("mlp_hidden", 0),
        ("final_norm", None),
        ("logits", None),
    ]:
        r.read(site, layer, name=f"{site}.{layer}")
    # raw module paths on a HuggingFace model, the root's output included
    r.scale(f"{info.arch.layers}.1.{info.arch.mlp}.output", factor=1.5, pos=0)
    r.read(f"{info.arch.layers}.0.{info.arch.attn_out_proj}.input", name="raw_in")
    r.read("output", name="root")
    agree(g, model)


def test_ops_on_one_site_apply_in_order_and_reads_see_earlier_ops() -> None:
    model = hf_model("llama")
    g = iv.Graph()
    r = g.run("x", tokens=IDS)
    r.read("resid_post", 0, name="r0")
    r.add("resid_post", 0, direction=randn(32), pos=-1)
    r.read("resid_post", 0, name="r1")
    r.read("resid_post", 0, pos=-1, name="r1_last")  # shares r1's collect
    r.scale("resid_post", 0, factor=3.0, pos=[0, -1])
    r.ablate("resid_post", 0, dims=slice(0, 4))
    r.read("resid_post", 0, name="r2")
    r.read("resid_pre", 1, name="next")  # the same tensor, seen from the next layer
    # one tensor, two views (two sites): like the reference, the ops of each site apply
    # together, in the order the sites were first used
    r.read("model.layers.1.self_attn.o_proj.input", name="o0")
    r.ablate("head", 1, head=0)
    r.read("model.layers.1.self_attn.o_proj.input", name="o1")
    r.read("head", 1, name="o1_heads")
    r.scale("model.layers.1.self_attn.o_proj.input", factor=2.0)
    r.read("head", 1, name="o2_heads")
    res = agree(g, model)
    assert not torch.equal(res["r0"], res["r1"])
    assert_close(res["r1"][:, -1], res["r1_last"])
    assert_close(res["r2"], res["next"])
    assert_close(res["o0"], res["o1"])  # the raw site's ops all come first
    assert_close(res["o1_heads"], res["o2_heads"])
    assert_close(res["o1_heads"][:, :, 1:], 2 * res["o1"].view(2, 6, 4, -1)[:, :, 1:])


def test_sae_features_as_a_patch_value() -> None:
    """A value recorded by ``features=`` (not a read) patches as given, never aligned."""
    square = iv.StandardSAE(
        W_enc=randn(32, 32, seed=60),
        b_enc=torch.zeros(32),
        W_dec=randn(32, 32, seed=61),
        b_dec=torch.zeros(32),
    )
    g = iv.Graph()
    feats = g.run("a", tokens=IDS_SRC).sae_splice("resid_post", 0, sae=square, features="f")
    assert feats is not None
    b = g.run("b", tokens=IDS)
    b.patch("resid_pre", 1, value=feats)
    b.read("logits", pos=-1, name="out")
    agree(g, hf_model("qwen2"))


def test_a_run_that_only_records_sae_features() -> None:
    g = iv.Graph()
    g.run("x", tokens=IDS).sae_splice("mlp_out", 0, sae=sae(32, 50), features="f")
    assert agree(g, hf_model("mistral"))["f"].shape == (2, 6, 12)


@pytest.mark.parametrize(("batch", "passes"), [(False, 4), (True, 2)])
def test_a_source_run_is_computed_once(
    monkeypatch: pytest.MonkeyPatch, batch: bool, passes: int
) -> None:
    """Patched runs take the clean activations as source_representations: no re-runs."""
    model = hf_model("gpt2")
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS_SRC)
    h = clean.read("resid_post", 0)
    for i in range(3):
        r = g.run(f"patched{i}", tokens=IDS)
        r.patch("resid_post", 0, pos=i, value=h)
        r.read("logits", pos=-1, name=f"out{i}")
    expected = iv.run(g, model, backend="torch", batch=False)
    calls = {"n": 0}
    forward = model.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    got = iv.run(g, model, backend="pyvene", batch=batch)
    monkeypatch.undo()
    assert calls["n"] == passes  # clean once, then one pass per patched run (or batch)
    for name in expected:
        assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


# --- plain modules and raw sites -----------------------------------------------------------


def test_raw_sites_on_a_plain_module() -> None:
    model = toy_net()
    g = iv.Graph()
    src = g.run("src", tokens=IDS_SRC)
    ref = g.run("ref", tokens=IDS_REF)
    r = g.run("x", tokens=IDS)
    # `x + block(x)`: a write on block.input must not leak into the residual `x`
    r.scale("blocks.0.input", factor=3.0, pos=-1)
    r.add("blocks.0.0.input", direction=randn(16), pos=[0, 2])
    r.patch("blocks.1.output", value=src.read("blocks.1.output"), pos=1)
    r.ablate("blocks.1.2.input", method="mean", source=ref, dims=slice(0, 8))
    r.read("embed.output", name="emb")
    r.read("blocks.0.output", name="b0")
    r.read("unembed.input", pos=-1, name="final")
    r.scale("output", factor=0.5, batch=0)
    r.read("output", name="out")
    agree(g, model)


def test_positional_inputs_on_a_plain_module() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = iv.Graph()
    r = g.run("x", inputs=randn(2, 5, 4))
    r.add("0.output", direction=torch.ones(8), pos=[1, 3])
    r.read("1.output", name="hidden")
    r.read("output", name="out")
    agree(g, model)


class _ByKeyword(nn.Module):
    """Calls its inner module by keywords only, the wanted tensor not first."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Gated()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(mask=torch.ones_like(h), x=h) + h


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * mask


def test_inputs_passed_by_keyword() -> None:
    """pyvene would take the first keyword (`mask`); the reference takes `x`."""
    torch.manual_seed(0)
    model = _ByKeyword().eval()
    g = iv.Graph()
    r = g.run("a", inputs=randn(2, 3, 4))
    r.read("inner.input", name="in")
    r.scale("inner.input", factor=2.0, pos=1)
    r.read("inner.lin.input", name="lin_in")
    r.read("output", name="out")
    agree(g, model)


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_generation_with_steering(family: str) -> None:
    model = hf_model(family)
    prompt = IDS.shape[1]
    g = iv.Graph()
    src = g.run("src", tokens=IDS_SRC)
    plain = g.run("plain", tokens=IDS, max_new_tokens=4)
    # read positions count from the end of the prompt too: -1 is the last prompt token
    plain.read("resid_post", 1, pos=-1, name="plain.last")
    plain.read("resid_post", 1, pos=[-2, prompt + 1], name="plain.pair")
    plain.read("logits", pos=slice(-1, None), name="plain.logits")
    steer = g.run("steer", tokens=IDS, max_new_tokens=5)
    steer.add("resid_post", 0, direction=randn(32, seed=7), scale=8.0, pos=slice(-1, None))
    steer.scale("mlp_out", 1, factor=0.0, pos=-2)  # a prompt position only
    steer.ablate("resid_pre", 1, pos=prompt + 1)  # one generated position
    steer.patch("attn_out", 0, value=randn(32, seed=9), pos=prompt + 2)
    steer.patch("attn_out", 0, value=src.read("attn_out", 0, pos=-1), pos=-1)
    steer.patch("mlp_out", 0, value=src.read("mlp_out", 0, pos=[1, 2]), pos=[1, 2])
    steer.read("resid_post", 0, name="steer.all")
    steer.read("logits", pos=slice(prompt - 1, None), name="steer.logits")
    everywhere = g.run("everywhere", tokens=IDS[:1], max_new_tokens=3)
    everywhere.add("resid_pre", 0, direction=randn(32, seed=8), scale=5.0)
    res = agree(g, model)
    assert res["steer.generated"].shape == (2, 5)
    assert res["everywhere.generated"].shape == (1, 3)
    assert res["steer.all"].shape[1] == prompt + 4
    assert res["plain.logits"].shape[1] == 4
    assert not torch.equal(res["steer.generated"], res["plain.generated"])


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_generation_with_a_one_element_patch_from_another_run(family: str) -> None:
    """A patch of one element (batch, pos and dims all ints) from another run while
    generating: pyvene's generate indexes the first axis of every source value, which a
    0-d tensor lacks (IndexError in ``_tidy_stateful_activations``); the adapter hands it
    a one-element vector and views it back."""
    model = hf_model(family)
    g = iv.Graph()
    src = g.run("src", tokens=IDS_SRC)
    gen = g.run("gen", tokens=IDS, max_new_tokens=3)
    one = dict(batch=1, pos=2, dims=5)
    gen.patch("embed", value=src.read("embed", **one), **one)
    gen.patch(
        "resid_post",
        0,
        value=src.read("resid_post", 0, batch=0, pos=-1, dims=0),
        batch=0,
        pos=-1,
        dims=0,
    )
    gen.read("embed", pos=2, name="embed")
    gen.read("logits", pos=slice(-1, None), name="logits")
    res = agree(g, model)
    with torch.no_grad():
        want = model.get_input_embeddings()(IDS_SRC)[1, 2, 5]
    assert res["embed"][1, 5] == want  # the patched element, exactly
    assert res["gen.generated"].shape == (2, 3)


def test_generation_does_not_stop_at_eos() -> None:
    model = hf_model("llama")
    eos = int(getattr(model, "config").eos_token_id)  # noqa: B009 - typed as Any
    g = iv.Graph()
    r = g.run("gen", tokens=IDS, max_new_tokens=4)
    r.add("logits", direction=torch.nn.functional.one_hot(torch.tensor(eos), 64).float(), scale=1e3)
    res = agree(g, model)
    assert res["gen.generated"].tolist() == [[eos] * 4] * 2


# --- gradients ------------------------------------------------------------------------------


def _grads(res: iv.Results, names: list[str]) -> list[torch.Tensor]:
    metric = res["logits"][..., 3].sum() - res["logits"][..., 4].sum()
    return list(torch.autograd.grad(metric, [res[n] for n in names], allow_unused=False))


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_gradients_reach_the_reads(family: str) -> None:
    """``grad=True``: reads are on the path to the outputs; same values, same gradients."""
    model = hf_model(family)
    info = describe(model)
    assert info.arch is not None
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS_SRC)
    r = g.run("x", tokens=IDS)
    r.patch("resid_post", 0, pos=2, value=clean.read("resid_post", 0, name="src"))
    r.read("embed", name="embed")
    r.read("resid_pre", 1, pos=[1, -1], name="pre1")
    r.read("head", 1, head=[0, 2], name="heads")
    r.read("mlp_out", 0, pos=slice(2, 5), dims=slice(0, 8), name="mlp0")
    r.sae_splice("resid_post", 1, sae=sae(32, 40), error="detach", features="feats")
    r.read(f"{info.arch.layers}.1.{info.arch.mlp}.output", name="raw")
    r.read("logits", pos=-1, name="logits")
    names = ["src", "embed", "pre1", "heads", "mlp0", "feats", "raw"]
    ref = iv.run(g, model, backend="torch", grad=True)
    got = iv.run(g, model, backend="pyvene", grad=True)
    assert list(got) == list(ref)
    for name in ref:
        assert_close(got[name], ref[name], atol=1e-5, rtol=1e-5, msg=_named(name))
    for name, a, b in zip(names, _grads(got, names), _grads(ref, names), strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5, msg=_named(f"d metric / d {name}"))
    assert hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_attribution_patching_recipe_runs_on_pyvene() -> None:
    from interventions.recipes import Metric, attribution_patching

    model = hf_model("gpt2")
    corrupt = IDS.clone()
    corrupt[:, 2] = 40
    metric = Metric.logit_diff(answer=7, wrong=9)
    expected = attribution_patching(model, IDS, corrupt, metric, backend="torch")
    got = attribution_patching(model, IDS, corrupt, metric, backend="pyvene")
    assert_close(got.approx.scores, expected.approx.scores, atol=1e-5, rtol=1e-5)


# --- capabilities, options, versions --------------------------------------------------------


def test_capabilities() -> None:
    caps = iv.backend_capabilities()["pyvene"]
    assert isinstance(caps, iv.Capabilities)
    assert caps.ops == frozenset(
        {"read", "patch", "ablate", "add", "project_out", "scale", "sae_splice", "edge_patch"}
    )
    # attention internals (issue 11): q/k/v, resid_mid, per-head inputs; no attn_pattern
    # or attn_scores (inside the attention module, which pyvene cannot reach)
    assert caps.views == frozenset({"plain", "heads", "logits", "resid", *QKV_VIEWS, *SPLIT_VIEWS})
    assert caps.generation and caps.raw_modules and caps.gradients
    assert not caps.remote and not caps.hf_only


def test_attention_patterns_are_refused_before_running() -> None:
    model = hf_model("gpt2")
    g = iv.Graph()
    g.run("x", tokens=IDS).read("attn_pattern", 0)
    with pytest.raises(iv.UnsupportedOp, match="cannot reach site 'attn_pattern'"):
        iv.run(g, model, backend="pyvene")
    assert hook_count(model) == 0


def test_unknown_options_are_refused() -> None:
    g = iv.Graph()
    g.run("x", tokens=IDS).read("logits")
    with pytest.raises(iv.InterventionError, match="unknown options"):
        iv.run(g, hf_model("gpt2"), backend="pyvene", turbo=True)


@pytest.mark.parametrize("version", ["0.1.7", "0.2.0", "0.2.0rc1", "1.0", "not-a-version"])
def test_versions_out_of_range_are_refused(version: str) -> None:
    with pytest.raises(
        iv.BackendVersionError, match=rf"pyvene {version} is installed.*>=0\.1\.8,<0\.2"
    ):
        pv_adapter.check_version(version)


def test_version_checked_when_the_backend_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    for ok in ("0.1.8", "0.1.9", "0.1.10.post1"):
        assert pv_adapter.check_version(ok) == ok
    monkeypatch.setattr(pv_adapter.backend.importlib.metadata, "version", lambda name: "0.3.1")
    with pytest.raises(iv.BackendVersionError, match=r"pyvene 0\.3\.1 is installed"):
        pv_adapter.PyveneBackend()
    monkeypatch.undo()
    backend = pv_adapter.PyveneBackend()
    assert backend.versions()["pyvene"] == "0.1.8"


def test_importing_the_adapter_does_not_import_pyvene() -> None:
    code = (
        "import sys, interventions, interventions.adapters.pyvene as a; "
        "assert 'pyvene' not in sys.modules, 'pyvene imported'; "
        "assert a.PyveneBackend().name == 'pyvene'; "
        "assert 'pyvene' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- hygiene ------------------------------------------------------------------------------


def _busy_graph() -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS_SRC)
    corrupt = g.run("corrupt", tokens=IDS)
    corrupt.patch("resid_post", 0, pos=-1, value=clean.read("resid_post", 0))
    corrupt.add("mlp_out", 1, direction=torch.ones(32), scale=0.5)
    corrupt.read("head", 1, head=0, name="h")
    corrupt.read("logits", name="out")
    return g


def _state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_failure_midway_leaves_no_hooks_and_same_outputs(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = hf_model(family)
    before = model(IDS).logits
    state = _state(model)
    info = describe(model)
    assert info.arch is not None
    last_mlp = model.get_submodule(f"{info.arch.layers}.1.{info.arch.mlp}")
    calls = {"n": 0}
    original = last_mlp.forward

    def explode(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the second run, with pyvene's hooks live
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(last_mlp, "forward", explode)
    with pytest.raises(iv.ExecutionError, match=r"run 'corrupt' failed.*injected failure"):
        iv.run(_busy_graph(), model, backend="pyvene")
    monkeypatch.undo()
    assert calls["n"] == 2
    assert hook_count(model) == 0
    assert _state(model) == state
    assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_failure_inside_an_intervention_while_generating(monkeypatch: pytest.MonkeyPatch) -> None:
    model = hf_model("qwen2")
    before = model(IDS).logits

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("intervention failed")

    monkeypatch.setattr(pv_adapter.classes, "apply_op", explode)
    g = iv.Graph()
    g.run("gen", tokens=IDS, max_new_tokens=3).scale("resid_post", 0, factor=2.0, pos=7)
    with pytest.raises(iv.ExecutionError, match=r"run 'gen' failed.*intervention failed"):
        iv.run(g, model, backend="pyvene")
    assert hook_count(model) == 0
    assert_close(model(IDS).logits, before, atol=0, rtol=0)


def test_failure_on_a_raw_site_of_a_plain_module() -> None:
    model = fails_on_real_data()  # passes validation, fails on real values in the forward
    before = model.blocks[1](model.embed(IDS))
    g = iv.Graph()
    run = g.run("a", tokens=IDS)
    run.read("blocks.0.output", name="x")
    run.scale("blocks.0.input", factor=2.0)  # installs a private-copy helper hook
    run.add("blocks.1.output", direction=torch.ones(16))
    with pytest.raises(iv.ExecutionError, match="run 'a' failed"):
        iv.run(g, model, backend="pyvene")
    assert hook_count(model) == 0
    assert_close(model.blocks[1](model.embed(IDS)), before, atol=0, rtol=0)


def test_user_state_survives_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyvene would switch to eval, freeze parameters and drop every hook: not on our watch.

    The run is in eval mode on every backend (issue 13: no dropout in a run), and afterwards
    the model is as the user left it: its modes, its frozen parameters, its own hooks.
    """
    model = toy_net()
    during: list[tuple[bool, bool]] = []
    block = model.blocks[1]
    forward = block.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        if not isinstance(args[0], FakeTensor):  # validation's dry run calls it on fakes
            during.append((block.training, model.embed.weight.requires_grad))
        return forward(*args, **kwargs)

    monkeypatch.setattr(block, "forward", spy)
    seen: list[int] = []
    pre = model.blocks[0].register_forward_pre_hook(lambda m, args: None)
    post = model.unembed.register_forward_hook(lambda m, args, out: seen.append(1))
    model.blocks[1].train()
    model.embed.weight.requires_grad_(False)
    state = _state(model)
    try:
        g = iv.Graph()
        r = g.run("x", tokens=IDS)
        r.scale("blocks.1.output", factor=2.0)
        r.read("output", name="out")
        iv.run(g, model, backend="pyvene")
        assert during == [(False, False)]  # eval for the run; the mode comes back below
        assert _state(model) == state
        assert list(model.blocks[0]._forward_pre_hooks) == [pre.id]
        assert list(model.unembed._forward_hooks) == [post.id]
        seen.clear()
        model(IDS)
        assert seen == [1]  # the user's hook is live again
    finally:
        pre.remove()
        post.remove()
        model.blocks[1].eval()
        model.embed.weight.requires_grad_(True)
        monkeypatch.undo()
    assert hook_count(model) == 0


@pytest.mark.parametrize("generate", [False, True])
def test_the_models_own_hooks_run_during_the_run(generate: bool) -> None:
    """pyvene removes every hook of the model when a call starts; the adapter puts the
    model's own hooks back for the call, ahead of pyvene's, so a user's edit (here: a
    pre-hook doubling layer 1's input, a forward hook adding to layer 0's MLP output)
    changes the numbers on pyvene exactly as on the torch reference."""
    model = hf_model("llama")
    layers = model.model.layers
    pre = layers[1].register_forward_pre_hook(lambda m, args: (2 * args[0], *args[1:]))
    post = layers[0].mlp.register_forward_hook(lambda m, args, out: out + 0.5)
    try:
        g = iv.Graph()
        r = g.run("x", tokens=IDS, max_new_tokens=2 if generate else None)
        r.add("resid_post", 0, direction=randn(32, seed=5), pos=-1)
        r.read("resid_pre", 1, name="pre")
        r.read("logits", pos=-1, name="out")
        want = iv.run(g, model)
        with torch.no_grad():
            plain = model(IDS).logits[:, -1]
        assert not torch.allclose(want["out"], plain, atol=1e-2)  # the hooks matter
        got = iv.run(g, model, backend="pyvene")
        for name in want:
            if want[name].is_floating_point():
                assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(got[name], want[name])
        assert list(layers[1]._forward_pre_hooks) == [pre.id]
        assert list(layers[0].mlp._forward_hooks) == [post.id]
    finally:
        pre.remove()
        post.remove()
    assert hook_count(model) == 0
