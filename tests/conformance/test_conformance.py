"""Law 2, agreement: every backend gives the torch reference's numbers.

Hypothesis draws random valid graphs (several runs, values flowing between them, mixed
ops, sites and selectors) for each tiny architecture; every backend must match the
reference within fp32 tolerance (atol = rtol = 1e-5), generate identical tokens, or
refuse the graph *before running* with UnsupportedOp. Failures shrink to a minimal graph.
The long profile: ``pytest -m slow --hypothesis-profile=slow tests/conformance``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interventions as iv
from tests.core.strategies import DEFAULT_SITES, graphs
from tests.tiny_models import (
    ALL_FAMILIES,
    FALCON_FAMILIES,
    FIRST_FAMILIES,
    MOE_FAMILIES,
    WORDS,
    hf_model,
    hook_count,
    word_tokenizer,
)

BACKENDS = ("nnsight", "pyvene")
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}

RAW_SITES = {
    "gpt2": ("transformer.h.0.mlp.output", "transformer.h.1.attn.c_proj.input"),
    "gpt_neox": ("gpt_neox.layers.0.mlp.output", "gpt_neox.layers.1.attention.dense.input"),
    # Gemma's heads are wider than d_model / n_heads, so no o_proj input here
    "gemma": ("model.layers.0.mlp.output", "model.layers.1.input_layernorm.output"),
    "gptj": ("transformer.h.0.mlp.output", "transformer.h.1.attn.out_proj.input"),
    # not fc1/fc2: OPT feeds them (batch * pos, d) rows, which raw sites do not describe
    "opt": (
        "model.decoder.layers.0.self_attn.out_proj.output",
        "model.decoder.layers.1.self_attn.out_proj.input",
    ),
    "bloom": (
        "transformer.h.0.mlp.dense_4h_to_h.output",
        "transformer.h.1.self_attention.dense.input",
    ),
    **{
        f: ("transformer.h.0.mlp.output", "transformer.h.1.self_attention.dense.input")
        for f in FALCON_FAMILIES
    },
}
LLAMA_RAW = ("model.layers.0.mlp.output", "model.layers.1.self_attn.o_proj.input")
D_MLP = {"gpt2": 128, "gpt_neox": 64, "gptj": 128, "bloom": 128}
D_MLP.update(dict.fromkeys(FALCON_FAMILIES, 128))
HEAD_DIM = {"gemma": 16}
# fused experts have no mlp_hidden; the router sites are held to hand-written hooks in
# test_families.py (nnsight and pyvene refuse them by name)
NO_MLP_HIDDEN = tuple(s for s in DEFAULT_SITES if s != "mlp_hidden")
# the first six families draw 8 graphs per backend by default, the later ones 4 (each
# family's block is the same code path for every draw; the slow profile draws 200)
EXAMPLES = 8
POST_NORM = ("gemma2", "gemma3", "olmo2")


def draw_graph(data: st.DataObject, family: str) -> iv.Graph:
    return data.draw(
        graphs(
            2,
            4,
            32,
            7,
            64,
            d_mlp=D_MLP.get(family, 48),
            run_kinds=("tokens", "text"),
            raw_sites=RAW_SITES.get(family, LLAMA_RAW),
            text_words=WORDS[4:],
            nonfinite=False,
            sites=NO_MLP_HIDDEN if family in MOE_FAMILIES else None,
        ).filter(lambda g: HEAD_DIM.get(family) is None or not _uses_heads(g))
    )


def _uses_heads(g: iv.Graph) -> bool:
    # the strategy sizes head values for d_head = d_model / n_heads, which Gemma breaks
    return any(op.site.name == "head" for op in g.ops)


def assert_agree(graph: iv.Graph, family: str, backend: str) -> None:
    model, tokenizer = hf_model(family), word_tokenizer()
    reference = iv.run(graph, model, backend="torch", tokenizer=tokenizer)
    try:
        iv.validate(graph, model, tokenizer=tokenizer, backend=backend)
    except iv.UnsupportedOp as exc:
        # refusing is allowed only for what the capability table declares missing
        caps = iv.backend_capabilities()[backend]
        assert isinstance(caps, iv.Capabilities)
        assert "cannot" in str(exc)
        return
    got = iv.run(graph, model, backend=backend, tokenizer=tokenizer)
    assert set(got) == set(reference)
    for name in reference:
        want, have = reference[name], got[name]
        if not want.is_floating_point():
            assert torch.equal(have, want), f"{backend}: {name} differs"
            continue
        torch.testing.assert_close(
            have, want, equal_nan=True, msg=lambda m, n=name: f"{backend} {n}: {m}", **TOLERANCE
        )
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FIRST_FAMILIES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_random_graphs_agree(backend: str, family: str, data: st.DataObject) -> None:
    assert_agree(draw_graph(data, family), family, backend)


# Falcon's other rotary blocks (falcon-40b's, the sequential one) and the parallel block
# with ALiBi share the map and most of the code of falcon-7b's and falcon-rw's (ALiBi,
# sequential; four draws with the later families): two draws each by default
FALCON_VARIANTS = ("falcon_new", "falcon_seq", "falcon_alibi_par")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "family", [f for f in ALL_FAMILIES if f not in FIRST_FAMILIES + FALCON_VARIANTS]
)
@settings(max_examples=EXAMPLES // 2)
@given(data=st.data())
def test_random_graphs_agree_later_families(backend: str, family: str, data: st.DataObject) -> None:
    assert_agree(draw_graph(data, family), family, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FALCON_VARIANTS)
@settings(max_examples=EXAMPLES // 4)
@given(data=st.data())
def test_random_graphs_agree_falcon_variants(
    backend: str, family: str, data: st.DataObject
) -> None:
    assert_agree(draw_graph(data, family), family, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
@settings(max_examples=200)
@given(data=st.data())
def test_random_graphs_agree_long(backend: str, family: str, data: st.DataObject) -> None:
    assert_agree(draw_graph(data, family), family, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_steered_generation_gives_identical_tokens(backend: str, family: str) -> None:
    model = hf_model(family)
    torch.manual_seed(1)
    g = iv.Graph()
    prompt = torch.tensor([[5, 9, 14, 3, 22]])
    g.run("plain", tokens=prompt, max_new_tokens=6)
    steered = g.run("steered", tokens=prompt, max_new_tokens=6)
    steered.add("resid_post", layer=0, direction=torch.randn(32), scale=8.0)
    # OPT's MLP rows are flat (batch * pos, d): only the torch backend views them, and the
    # others refuse mlp_out by name before running
    scaled = "attn_out" if family == "opt" else "mlp_out"
    steered.scale(scaled, layer=1, factor=0.5, pos=-1)
    steered.read("resid_post", layer=1, pos=slice(-2, None), name="tail")
    if family == "opt":
        refused = iv.Graph()
        refused.run("r", tokens=prompt, max_new_tokens=2).scale("mlp_out", 1, factor=0.5)
        with pytest.raises(iv.UnsupportedOp, match="cannot reach site 'mlp_out'"):
            iv.validate(refused, model, backend=backend)
    reference = iv.run(g, model)
    got = iv.run(g, model, backend=backend)
    assert torch.equal(got["plain.generated"], reference["plain.generated"])
    assert torch.equal(got["steered.generated"], reference["steered.generated"])
    assert not torch.equal(reference["plain.generated"], reference["steered.generated"])
    torch.testing.assert_close(got["tail"], reference["tail"], **TOLERANCE)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_hygiene_after_a_failure_on_every_backend(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = hf_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = model(ids).logits
    g = iv.Graph()
    a = g.run("a", tokens=ids)
    h = a.read("resid_post", layer=0)
    a.read("logits", pos=-1, name="a_end")  # "a" runs the whole model (no early stop)
    # a different length keeps "b" in a forward pass of its own on every backend, so the
    # failure below hits the second pass after the first has finished
    b = g.run("b", tokens=torch.tensor([[9, 8, 7, 6, 5]]))
    b.patch("resid_post", layer=0, value=h, pos=-1)
    b.add("mlp_out", layer=1, direction=torch.ones(32))
    b.read("logits", name="out")
    mlp = model.model.layers[1].mlp
    original = mlp.forward
    calls = {"n": 0}

    def explode(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", explode)
    with pytest.raises(iv.ExecutionError):
        iv.run(g, model, backend=backend)
    monkeypatch.undo()
    assert hook_count(model) == 0
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
