"""The nnsight backend gives the torch reference's numbers, and leaves models as it found them.

Every graph here runs on both backends; every result must agree at fp32 atol/rtol 1e-5
(generated tokens exactly). ``batch=False`` keeps the graph's runs apart, so nnsight sees
many invokes in one trace; the default lets the planner merge runs first, so nnsight
sees batch selectors on merged runs.
"""

from __future__ import annotations

import ast
import doctest
import gc
import importlib
import inspect
import pkgutil
import subprocess
import sys
import weakref
import zlib
from typing import Any

import pytest
import torch
from torch import nn

import interventions as iv
from interventions.architectures import describe
from interventions.attention import QKV_VIEWS, SPLIT_VIEWS
from interventions.ops import Read
from interventions.sites import Site
from tests.tiny_models import (
    ALL_FAMILIES,
    HF_FAMILIES,
    MOE_FAMILIES,
    VOCAB,
    _cfg,
    fails_on_real_data,
    hf_model,
    hook_count,
    input_shapes,
    toy_net,
)

pytest.importorskip("nnsight")

from interventions.adapters import nnsight as nns

TOL = {"atol": 1e-5, "rtol": 1e-5}
GEN = torch.Generator().manual_seed(1234)


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=GEN)


T1, T2, T3, T4 = _ids(2, 6), _ids(2, 6), _ids(2, 8), _ids(3, 6)
PROMPT, PROMPT2 = _ids(1, 5), _ids(2, 5)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@pytest.fixture(autouse=True)
def _reseed(request: pytest.FixtureRequest) -> None:
    """Each test draws the same directions and weights however the tests are selected."""
    GEN.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def assert_clean(model: nn.Module, patched: frozenset[int] = frozenset()) -> None:
    """No hooks, no nnsight state, no instance ``forward`` (but the test's own)."""
    assert hook_count(model) == 0
    for module in model.modules():
        assert "__nnsight__" not in module.__dict__
        if id(module) not in patched:
            assert "forward" not in module.__dict__


def _state(model: nn.Module) -> list[Any]:
    """What a run must not change: every module's attributes, parameters and buffers."""
    return [
        (name, sorted(m.__dict__), [id(t) for t in m._parameters.values()], sorted(m._buffers))
        for name, m in model.named_modules()
    ]


def agree(graph: iv.Graph, model: nn.Module, *, batch: bool = True, **options: Any) -> Any:
    """Run on both backends, compare every result, check hygiene; return the reference."""
    ref = iv.run(graph, model, backend="torch", batch=batch)
    before = _state(model)
    got = iv.run(graph, model, backend="nnsight", batch=batch, **options)
    assert _state(model) == before
    assert sorted(got) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(
            got[name], ref[name], **TOL, msg=lambda m, n=name: f"result {n!r}: {m}"
        )
    assert_clean(model)
    return ref


def _sae(kind: str, d_in: int, d_sae: int = 8, b_dec_in: bool = False) -> Any:
    parts = {
        "W_enc": _randn(d_in, d_sae) * 0.5,
        "b_enc": _randn(d_sae) * 0.1,
        "W_dec": _randn(d_sae, d_in) * 0.5,
        "b_dec": _randn(d_in) * 0.1,
        "apply_b_dec_to_input": b_dec_in,
    }
    if kind == "relu":
        return iv.StandardSAE(**parts)
    if kind == "jumprelu":
        return iv.JumpReLUSAE(**parts, threshold=torch.rand(d_sae, generator=GEN) * 0.2)
    return iv.TopKSAE(**parts, k=3)


# ---------------------------------------------------------------------------------------
# every op x every selector kind, on every family

SELECTORS: dict[str, dict[str, Any]] = {
    "all": {},
    "int": {"pos": 1},
    "neg": {"pos": -1},
    "list": {"pos": [0, 2]},
    "neg_list": {"pos": [-1, -3]},
    "slice": {"pos": slice(1, 4)},
    "neg_slice": {"pos": slice(-3, None)},
    "step": {"pos": slice(None, None, -2)},
    "batch": {"batch": 1, "pos": -2},
    "batch_list": {"batch": [1], "pos": [0, 3]},
    "dims": {"dims": slice(0, 8)},
    "outer": {"pos": [0, 2], "dims": [1, 3, 5]},
}
HEAD_SELECTORS: dict[str, dict[str, Any]] = {
    "heads": {"head": [1, 3], "pos": -1},
    "head_int": {"head": 2},
    "head_neg": {"head": -1, "dims": [0, 2], "pos": slice(0, 3)},
    "head_batch": {"batch": 0, "head": [0, 1], "pos": [1, 4]},
}
SITES: list[tuple[str, int | None]] = [
    ("resid_post", 0),
    ("resid_pre", 1),
    ("attn_out", 0),
    ("mlp_out", 1),
    ("mlp_hidden", 0),
    ("embed", None),
    ("final_norm", None),
    ("logits", None),
]
OPS = ("read", "patch", "ablate", "add", "project_out", "scale", "sae_splice")
CHANGING = {"patch", "ablate", "add", "project_out", "scale"}


def _width(info: Any, site: str, layer: int | None, sel: dict[str, Any]) -> int:
    dims = sel.get("dims")
    if isinstance(dims, slice):
        return len(range(10_000)[dims])
    if dims is not None:
        return len(dims)
    width = info.width(Site(site, layer))
    assert width is not None
    return int(width)


def _put_op(
    run: iv.RunHandle, op: str, site: str, layer: int | None, sel: dict[str, Any], w: int
) -> None:
    if op == "read":
        run.read(site, layer, name=f"{run.name}.sel", **sel)
    elif op == "patch":
        run.patch(site, layer, value=_randn(w), **sel)
    elif op == "ablate":
        run.ablate(site, layer, **sel)
    elif op == "add":
        run.add(site, layer, direction=_randn(w), scale=0.7, **sel)
    elif op == "project_out":
        run.project_out(site, layer, direction=_randn(2, w) if w > 2 else _randn(w), **sel)
    elif op == "scale":
        run.scale(site, layer, factor=-1.5, **sel)
    else:
        edits = [iv.FeatureEdit.scale([0, 3], 3.0), iv.FeatureEdit.set(5, 1.0)]
        run.sae_splice(
            site, layer, sae=_sae("relu", w), edits=edits, features=f"{run.name}.f", **sel
        )


def _selector_graph(info: Any, part: int | None = None) -> tuple[iv.Graph, list[str]]:
    """One run per (op, selector), on rotating sites; ``part`` keeps every 6th combo."""
    g = iv.Graph()
    changing = []
    combos = [
        (op, name, sel, SITES[(i + j) % len(SITES)])
        for i, op in enumerate(OPS)
        for j, (name, sel) in enumerate(SELECTORS.items())
    ]
    combos += [
        (op, name, sel, ("head", (i + j) % 2))
        for i, op in enumerate(OPS)
        for j, (name, sel) in enumerate(HEAD_SELECTORS.items())
    ]
    for k, (op, name, sel, (site, layer)) in enumerate(combos):
        if part is not None and k % len(HF_FAMILIES) != part:
            continue
        run = g.run(f"{op}-{name}", tokens=T1 if "batch" in sel else T1[:1])
        _put_op(run, op, site, layer, sel, _width(info, site, layer, sel))
        run.read(site, layer, name=f"{run.name}.site")
        run.read("logits", name=f"{run.name}.logits")
        if op in CHANGING:
            changing.append(run.name)
    return g, changing


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_every_op_and_selector(family: str) -> None:
    """All combos, merged by the planner into one run of many items (batch selectors)."""
    model = hf_model(family)
    g, changing = _selector_graph(describe(model))
    ref = agree(g, model)
    base = iv.run(_plain(g), model)  # not vacuous: the reference's edits show
    for name in changing:
        assert not torch.equal(ref[f"{name}.site"], base[f"{name}.site"]), name


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_every_op_and_selector_as_invokes(family: str) -> None:
    """The combos as written, one invoke each (a sixth of them on each family)."""
    model = hf_model(family)
    g, _ = _selector_graph(describe(model), part=HF_FAMILIES.index(family))
    agree(g, model, batch=False)


def _plain(g: iv.Graph) -> iv.Graph:
    """The same runs reading the same sites, with no interventions."""
    plain = iv.Graph()
    for name, run in g.runs.items():
        handle = plain.run(name, tokens=g.tensors[run.tokens])  # type: ignore[index]
        for op in g.ops:
            if op.run == name and isinstance(op, Read) and op.name.endswith(".site"):
                handle.read(op.site.name, op.site.layer, name=op.name)
    return plain


# ---------------------------------------------------------------------------------------
# values flowing between runs, and ablations from reference runs


def _flow_graph() -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=T1)
    single = g.run("single", tokens=T1[:1])
    corrupt = g.run("corrupt", tokens=T2)
    longer = g.run("longer", tokens=T3)
    chain = g.run("chain", tokens=T1.flip(1))
    # aligned (whole-site reads), at the same module: one trace, a barrier
    corrupt.patch("resid_post", 0, pos=-1, value=clean.read("resid_post", 0))
    corrupt.patch("head", 1, head=[0, 2], pos=[1, 3], value=clean.read("head", 1))
    corrupt.patch("mlp_out", 0, pos=[0, 1], value=single.read("mlp_out", 0))  # 1 -> 2 items
    # explicit selectors, another module: a later trace
    cross = g.run("cross", tokens=T2)
    cross.patch("resid_post", 1, pos=2, value=clean.read("resid_pre", 1, pos=-1))
    # a chain through one module: clean -> corrupt -> chain
    corrupt.patch("attn_out", 1, pos=0, value=clean.read("attn_out", 1))
    x = corrupt.read("attn_out", 1, name="corrupt.attn1")
    chain.patch("attn_out", 1, pos=slice(2, None), value=x)
    # different lengths
    longer.patch("resid_post", 0, pos=-1, value=clean.read("resid_post", 0, pos=-2, name="c.m2"))
    longer.patch("mlp_hidden", 1, batch=1, pos=[0, 7], value=corrupt.read("mlp_hidden", 1, pos=3))
    # SAE features of one run patched into another (same module: one trace)
    feats = clean.sae_splice("resid_post", 1, sae=_sae("topk", 32), features="clean.f")
    assert feats is not None
    corrupt.patch("resid_post", 1, dims=slice(0, 8), value=feats)
    for run in (corrupt, cross, longer, chain):
        run.read("logits", name=f"{run.name}.logits")
    # ablations from a reference run of three items
    ref = g.run("ref", tokens=T4)
    mean = g.run("mean", tokens=T2)
    mean.ablate("resid_post", 0, method="mean", source=ref)
    mean.ablate("head", 1, method="mean", source=ref, per_position=True, head=[1])
    mean.read("logits", name="mean.logits")
    resample = g.run("resample", tokens=T2)
    resample.ablate("mlp_out", 1, method="resample", source=ref, seed=3, pos=[1, 4])
    resample.ablate("attn_out", 0, method="resample", source=ref, seed=5, batch=0)
    resample.read("logits", name="resample.logits")
    mean_long = g.run("mean_long", tokens=T3)
    mean_long.ablate("resid_pre", 1, method="mean", source=ref, dims=slice(0, 16))
    mean_long.read("logits", name="mean_long.logits")
    return g


@pytest.mark.parametrize("batch", [False, True], ids=["invokes", "merged"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_values_flow_between_runs(family: str, batch: bool) -> None:
    agree(_flow_graph(), hf_model(family), batch=batch)


def test_flows_inside_one_trace_use_barriers() -> None:
    model = hf_model("gpt2")
    plan = iv.validate(_flow_graph(), model, backend="nnsight")
    stages = nns._Compiler(plan, model, batched=True).stages(None)
    assert [[r.name for r in s.runs] for s in stages] == [
        ["clean", "single", "corrupt", "chain", "ref", "mean", "resample"],
        ["longer", "mean_long"],  # another length
        ["cross"],  # fed from another module
    ]
    first = stages[0].barriers
    assert first["clean@transformer.h.0.output"] == 2
    assert first["clean@transformer.h.1.attn.output"] == 2  # clean -> corrupt
    assert first["corrupt@transformer.h.1.attn.output"] == 2  # corrupt -> chain
    assert first["ref@transformer.h.1.attn.c_proj.input"] == 2  # per-position mean of a head


def test_max_batch_splits_traces() -> None:
    model = hf_model("llama")
    plan = iv.validate(_flow_graph(), model, backend="nnsight")
    assert all(s.rows <= 3 for s in nns._Compiler(plan, model, True).stages(3))
    agree(_flow_graph(), model, batch=False, max_batch=3)


def test_the_planners_budget_bounds_each_trace() -> None:
    """Batched runs are not merged back into a forward the budget forbids: six patched
    one-row runs under Budget(max_items=2) reach the model at most two rows at a time."""
    model = hf_model("gpt2")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    g = iv.Graph()
    clean = g.run("clean", tokens=ids)
    value = clean.read("resid_pre", layer=1)
    for p in range(5):
        r = g.run(f"p{p}", tokens=ids.flip(1))
        r.patch("resid_pre", layer=1, pos=p, value=value)
        r.read("logits", pos=-1, name=f"out{p}")
    budget = iv.Budget(max_items=2)
    block = model.get_submodule("transformer.h.0")

    def run_counting(**options: Any) -> tuple[iv.Results, list[int]]:
        with input_shapes(block) as shapes:
            got = iv.run(g, model, backend="nnsight", budget=budget, **options)
        return got, [shape[0] for shape in shapes]  # batch rows per forward

    want = iv.run(g, model, backend="torch", batch=False)
    got, seen = run_counting()
    assert seen and max(seen) <= 2, seen
    assert sum(seen) == 6  # every run once, nothing repeated
    # an explicit max_batch= still decides: the planner's three batches share one trace
    merged, seen_merged = run_counting(max_batch=6)
    assert seen_merged == [6]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged[name], want[name], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# SAE splices: every kind, every error mode, edits, recorded features


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_sae_splice(family: str) -> None:
    model = hf_model(family)
    info = describe(model)
    d, dh = int(info.d_model or 0), int(info.d_head or 0)
    edits = [
        iv.FeatureEdit.set(1, 3.0),
        iv.FeatureEdit.scale([0, 2], 0.5),
        iv.FeatureEdit.clamp([4, 5], low=0.1, high=0.2),
    ]
    g = iv.Graph()
    for kind in ("relu", "jumprelu", "topk"):
        sae = _sae(kind, d, b_dec_in=kind == "topk")
        for error in ("keep", "drop", "detach"):
            run = g.run(f"{kind}-{error}", tokens=T1)
            run.sae_splice(
                "resid_post",
                0,
                sae=sae,
                edits=edits,
                error=error,
                features=f"{run.name}.f",
                pos=[1, 3],
            )
            run.read("resid_post", 0, name=f"{run.name}.site")
            run.read("logits", name=f"{run.name}.logits")
    heads = g.run("heads", tokens=T1)
    heads.sae_splice("head", 1, sae=_sae("topk", dh), edits=edits[:1], head=2, features="heads.f")
    heads.read("logits", name="heads.logits")
    neutral = g.run("neutral", tokens=T1)
    neutral.sae_splice("mlp_out", 1, sae=_sae("relu", d), features="neutral.f")
    neutral.read("logits", name="neutral.logits")
    base = g.run("base", tokens=T1)
    base.read("logits", name="base.logits")
    ref = agree(g, model, batch=False)
    torch.testing.assert_close(ref["neutral.logits"], ref["base.logits"], **TOL)


# ---------------------------------------------------------------------------------------
# attention patterns (eager attention for the call, restored afterwards)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_attention_patterns(family: str) -> None:
    model = hf_model(family)
    impl = model.config._attn_implementation
    g = iv.Graph()
    run = g.run("a", tokens=T1)
    run.read("attn_pattern", 0, name="p0")
    run.scale("attn_out", 1, factor=0.5)  # the same module as the next read, another view
    run.read("attn_pattern", 1, head=[1, 2], pos=-1, name="p1")
    run.ablate("head", 1, head=0)
    run.read("logits", name="a.logits")
    other = g.run("b", tokens=T2)
    other.read("attn_pattern", 1, head=0, batch=1, name="p1b")
    agree(g, model, batch=False)
    assert model.config._attn_implementation == impl


# ---------------------------------------------------------------------------------------
# generation with interventions on every step


def _generation_graph(d: int) -> iv.Graph:
    g = iv.Graph()
    g.run("plain", tokens=PROMPT, max_new_tokens=6)
    steer = g.run("steer", tokens=PROMPT, max_new_tokens=6)
    steer.add("resid_post", 0, direction=_randn(d) * 4, scale=3.0)
    steer.read("resid_post", 1, pos=-1, name="steer.last")
    steer.read("mlp_out", 0, pos=slice(-2, None), dims=[0, 1], name="steer.mlp")
    tail = g.run("tail", tokens=PROMPT2, max_new_tokens=6)
    tail.add("resid_post", 1, direction=_randn(d), scale=6.0, pos=slice(-1, None))
    tail.ablate("head", 1, head=0, pos=-1)
    absolute = g.run("absolute", tokens=PROMPT, max_new_tokens=6)
    absolute.scale("mlp_out", 0, factor=-2.0, pos=[5, 7])
    absolute.project_out("resid_pre", 1, direction=_randn(d), pos=[1, 8])
    short = g.run("short", tokens=PROMPT2, max_new_tokens=3)
    short.sae_splice("resid_post", 1, sae=_sae("jumprelu", d), error="drop", pos=2)
    src = g.run("src", tokens=T1[:1])
    h = src.read("resid_post", 0, pos=-1)
    fed = g.run("fed", tokens=PROMPT, max_new_tokens=4)
    fed.patch("resid_post", 0, pos=-1, value=h)
    return g


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_generation_with_steering(family: str) -> None:
    model = hf_model(family)
    settings = model.generation_config.to_json_string()
    ref = agree(_generation_graph(int(describe(model).d_model or 0)), model, batch=False)
    assert model.generation_config.to_json_string() == settings
    assert ref["steer.generated"].shape == (1, 6)
    assert not torch.equal(ref["steer.generated"], ref["plain.generated"])


# ---------------------------------------------------------------------------------------
# raw module paths: plain modules (one trace per run) and HuggingFace modules out of order

RAW_NORMS = {
    "gpt2": ("transformer.h.0.ln_1.output", "transformer.h.0.ln_2.input"),
    "gpt_neox": (
        "gpt_neox.layers.0.input_layernorm.output",
        "gpt_neox.layers.0.post_attention_layernorm.output",
    ),
}
LLAMA_NORMS = (
    "model.layers.0.input_layernorm.output",
    "model.layers.0.post_attention_layernorm.input",
)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_raw_sites_on_hf_models(family: str) -> None:
    model = hf_model(family)
    first, second = RAW_NORMS.get(family, LLAMA_NORMS)
    g = iv.Graph()
    a = g.run("a", tokens=T1)
    b = g.run("b", tokens=T2)
    # the norms are registered after the attention and MLP in llama-like layers
    b.scale(first, factor=2.0, pos=-1)
    b.add("attn_out", 0, direction=torch.ones(32))
    b.patch(second, value=a.read(second, pos=1), pos=1)
    b.read("logits", name="b.logits")
    agree(g, model, batch=False)


def test_plain_module() -> None:
    model = toy_net()
    g = iv.Graph()
    a = g.run("a", tokens=T1)
    b = g.run("b", tokens=T2)
    c = g.run("c", inputs=T2.flip(0))
    h = a.read("blocks.0.output")
    b.patch("blocks.0.output", pos=-1, value=h)
    b.scale("blocks.1.0.output", factor=0.5, dims=slice(0, 4))
    b.add("blocks.1.2.input", direction=torch.ones(32), pos=[0, 2])
    b.ablate("embed.output", method="mean", source=a, pos=1)
    b.read("output", pos=-1, name="b.out")
    c.ablate("blocks.0.output", method="resample", source=a, seed=1, pos=2)
    c.read("unembed.input", batch=0, name="c.x")
    agree(g, model, batch=False)
    agree(g, model)


def test_generic_envoy_on_hf_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TransformersModel (no batching): one ``NNsight`` trace per run, generation too."""
    monkeypatch.setattr(nns.backend, "_can_batch", lambda model, info: False)
    model = hf_model("qwen2")
    agree(_flow_graph(), model, batch=False)
    agree(_generation_graph(32), model, batch=False)


def test_module_order_probe_gives_execution_order_for_standard_sites() -> None:
    # oracle: a block's sites in the order a forward pass reaches them, by hand; post-norm
    # families (Gemma-2/3, OLMo-2) register their post-norms after the MLP, so registration
    # order puts attn_out after mlp_hidden there
    names = ["resid_pre", "head", "attn_out", "mlp_hidden", "mlp_out", "resid_post"]
    for family in ALL_FAMILIES:
        model = hf_model(family)
        info = describe(model)
        g = iv.Graph()
        g.run("a", tokens=T1)
        seen = nns._observed_order(model, iv.validate(g, model))
        points = [info.hook_point(Site("embed"))]
        for layer in (0, 1):
            for name in names:
                if name == "mlp_hidden" and family in MOE_FAMILIES:
                    continue  # fused experts: no mlp_hidden site
                if name == "attn_out" and family == "gptj":
                    continue  # parallel block: attention and MLP both read the normed input
                points.append(info.hook_point(Site(name, layer)))
        points += [info.hook_point(Site("final_norm")), info.hook_point(Site("logits"))]
        order = [seen[(p.module, p.io)] for p in points]
        assert order == sorted(order), (family, points)
        assert len(set(order)) == len(order), family
    gemma = hf_model("gemma2")
    static = nns._event_order(gemma)
    post, down = (
        ("model.layers.0.post_attention_layernorm", "output"),
        (
            "model.layers.0.mlp.down_proj",
            "input",
        ),
    )
    assert static[post] > static[down]  # the registration order the probe corrects


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_post_norm_sites_in_one_run_agree(family: str) -> None:
    """A run reading and patching attn_out (a post-norm, registered after the MLP) and the
    MLP's sites: the trace must touch them in execution order (nnsight OutOfOrderError)."""
    model = hf_model(family)
    g = iv.Graph()
    a = g.run("a", tokens=T1)
    a.read("mlp_hidden", 0, name="a.h")
    a.read("mlp_out", 1, name="a.mlp")
    b = g.run("b", tokens=T2)
    b.patch("attn_out", 0, pos=2, value=a.read("attn_out", 0))
    b.read("mlp_hidden", 0, name="b.h")
    b.read("attn_out", 1, name="b.attn")
    b.read("logits", name="b.logits")
    agree(g, model)
    agree(g, model, batch=False)


# ---------------------------------------------------------------------------------------
# hygiene: a failure in the middle leaves the model as it was


def _fresh(family: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_cfg(family)).eval()


@pytest.mark.parametrize("generate", [False, True], ids=["forward", "generate"])
def test_failure_midway_leaves_model_unchanged(
    generate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _fresh("llama")
    with torch.no_grad():
        before = model(T1).logits
    impl = model.config._attn_implementation
    config = model.config.to_json_string()
    mlp = model.model.layers[1].mlp
    calls = {"n": 0}
    original = mlp.forward

    def explode(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # in the second trace
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", explode)
    g = iv.Graph()
    a = g.run("a", tokens=T1)
    a.read("attn_pattern", 0, name="p")
    a.add("resid_post", 0, direction=torch.ones(32))
    b = g.run("b", tokens=PROMPT, max_new_tokens=3) if generate else g.run("b", tokens=T3)
    b.patch("resid_post", 0, pos=-1, value=a.read("resid_post", 1, pos=-1, batch=0))
    if not generate:
        b.read("logits", name="out")
    with pytest.raises(iv.ExecutionError, match=r"run 'b' failed on the nnsight backend.*injected"):
        iv.run(g, model, backend="nnsight", batch=False)
    assert calls["n"] == 2
    assert mlp.__dict__["forward"] is explode  # the user's own patch is left in place
    assert_clean(model, patched=frozenset({id(mlp)}))
    assert model.config._attn_implementation == impl
    monkeypatch.undo()
    assert_clean(model)
    assert model.config.to_json_string() == config
    with torch.no_grad():
        torch.testing.assert_close(model(T1).logits, before, atol=0, rtol=0)


def test_failure_inside_the_trace() -> None:
    model = fails_on_real_data()  # passes validation, fails on real values in the forward
    with torch.no_grad():
        before = model.blocks[1](model.embed(T1))
    g = iv.Graph()
    run = g.run("a", tokens=T1)
    run.read("blocks.0.output", name="x")
    run.add("blocks.1.output", direction=torch.ones(16))
    with pytest.raises(iv.ExecutionError, match="run 'a' failed on the nnsight backend"):
        iv.run(g, model, backend="nnsight")
    assert_clean(model)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[1](model.embed(T1)), before, atol=0, rtol=0)


def test_nothing_keeps_the_model_alive() -> None:
    model = _fresh("gpt2")
    alive = weakref.ref(model)
    iv.run(_flow_graph(), model, backend="nnsight", batch=False)
    g = iv.Graph()
    g.run("g", tokens=PROMPT, max_new_tokens=2).scale("mlp_out", 0, factor=2.0)
    iv.run(g, model, backend="nnsight")
    del model
    gc.collect()
    assert alive() is None


def test_the_trace_block_names_only_torch() -> None:
    """What nnsight would ship of the block (its source and the names it reads): the
    block's own parameters, torch, nnsight and builtins; never this package."""
    from nnsight.intervention.serialization import _referenced_names

    source = inspect.getsource(nns._run_program)
    block = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.With))
    names = _referenced_names(ast.unparse(ast.Module(body=block.body, type_ignores=[])))
    assert names & set(vars(nns.program)) == {"torch", "Any"}
    assert "interventions" not in ast.unparse(block)


# ---------------------------------------------------------------------------------------
# the backend itself


def test_capabilities() -> None:
    caps = iv.backend_capabilities()["nnsight"]
    assert isinstance(caps, iv.Capabilities)
    assert caps.ops == frozenset({*OPS, "edge_patch", "grad"})  # gradients in the trace
    # the attention internals (issue 11): q/k/v views, resid_mid and the per-head inputs;
    # attn_scores (inside the attention function) is not reachable here
    assert caps.views == frozenset(
        {"plain", "heads", "attn_weights", "logits", "resid", *QKV_VIEWS, *SPLIT_VIEWS}
    )
    assert caps.generation and caps.raw_modules and caps.remote and not caps.gradients


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("0.8.0", True),
        ("0.8.1", True),
        ("0.8.12.dev3", True),
        ("0.9.0", False),
        ("0.9.0rc1", False),
        ("0.7.4", False),
        ("1.0.0", False),
        ("0.8.0rc1", False),
        ("not a version", False),
    ],
)
def test_version_range(version: str, ok: bool) -> None:
    if ok:
        nns.check_version(version)
    else:
        with pytest.raises(iv.BackendVersionError, match=rf"nnsight {version} .*>=0\.8,<0\.9"):
            nns.check_version(version)


def test_version_checked_when_the_backend_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    import nnsight

    monkeypatch.setattr(nnsight, "__version__", "0.9.2")
    with pytest.raises(iv.BackendVersionError, match=r"0\.9\.2.*>=0\.8,<0\.9"):
        nns.NNsightBackend()


def test_docstring_examples() -> None:
    attempted = 0
    for found in pkgutil.iter_modules(nns.__path__):  # every file of the package
        module = importlib.import_module(f"{nns.__name__}.{found.name}")
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(module, optionflags=flags)
        assert result.failed == 0, module.__name__
        attempted += result.attempted
    assert attempted > 0


def test_importing_interventions_does_not_import_nnsight() -> None:
    code = "import interventions, sys; assert 'nnsight' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_options() -> None:
    g = iv.Graph()
    g.run("a", tokens=T1).read("logits")
    with pytest.raises(iv.InterventionError, match=r"keeps no autograd graph.*grad ops"):
        iv.run(g, hf_model("gpt2"), backend="nnsight", grad=True)
    with pytest.raises(iv.InterventionError, match="max_batch"):
        iv.run(g, hf_model("gpt2"), backend="nnsight", max_batch=0)
