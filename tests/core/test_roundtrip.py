"""Graphs survive JSON and save/load bit for bit; equality, fingerprints and printing agree."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interventions as iv
from interventions.graph import Run
from interventions.ops import (
    Const,
    FeatureEdit,
    Grad,
    Op,
    Read,
    Ref,
    SAESpec,
    SAESplice,
    Scale,
    op_kind,
)
from interventions.sites import Select, Site, Span
from tests.core.strategies import _ODD_NANS, GRAD_OP_KINDS, graphs

GRAPHS = graphs(op_kinds=GRAD_OP_KINDS)


def tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same_tensors(a: iv.Graph, b: iv.Graph) -> None:
    """Same keys, dtypes, shapes and bytes (so NaN payloads and -0.0 count)."""
    assert set(a.tensors) == set(b.tensors)
    for key, t in a.tensors.items():
        u = b.tensors[key]
        assert u.dtype == t.dtype, key
        assert u.shape == t.shape, key
        assert tensor_bytes(u) == tensor_bytes(t), key


def rebuilt(
    g: iv.Graph,
    *,
    runs: dict[str, Run] | None = None,
    ops: list[Op] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    saes: dict[str, SAESpec] | None = None,
) -> iv.Graph:
    """A new graph sharing ``g``'s parts except those given (no checks run)."""
    return iv.Graph(
        runs=dict(g.runs) if runs is None else runs,
        ops=list(g.ops) if ops is None else ops,
        tensors=dict(g.tensors) if tensors is None else tensors,
        saes=dict(g.saes) if saes is None else saes,
    )


# --- round trips --------------------------------------------------------------------------


@given(GRAPHS)
def test_json_round_trip(g: iv.Graph) -> None:
    text = g.to_json()
    back = iv.Graph.from_json(text)
    assert back == g
    assert_same_tensors(g, back)
    assert back.to_json() == text  # the text form is canonical
    compact = g.to_json(indent=None)
    assert iv.Graph.from_json(compact) == g
    assert iv.Graph.from_json(compact.encode()) == g


@given(GRAPHS)
def test_save_load_round_trip(g: iv.Graph) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "exp.graph.json"
        g.save(str(path))
        assert sorted(os.listdir(tmp)) == ["exp.graph.json", "exp.graph.safetensors"]
        back = iv.Graph.load(str(path))
        assert back == g
        assert_same_tensors(g, back)
        doc = json.loads(path.read_text())
        assert doc["tensor_data"] == {"file": "exp.graph.safetensors"}
        # The pair is relocatable: the sidecar is found beside the JSON, by name.
        moved = Path(tmp) / "moved"
        moved.mkdir()
        for name in ("exp.graph.json", "exp.graph.safetensors"):
            os.replace(Path(tmp) / name, moved / name)
        assert iv.Graph.load(moved / "exp.graph.json") == g
        # Saving again over the same files replaces them; nothing is left behind.
        g.save(moved / "exp.graph.json")
        assert sorted(os.listdir(moved)) == ["exp.graph.json", "exp.graph.safetensors"]


@given(GRAPHS)
def test_fingerprint_is_stable(g: iv.Graph) -> None:
    fp = g.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    once = iv.Graph.from_json(g.to_json())
    twice = iv.Graph.from_json(once.to_json(indent=None))
    assert once.fingerprint() == fp
    assert twice.fingerprint() == fp
    with tempfile.TemporaryDirectory() as tmp:
        g.save(os.path.join(tmp, "g.json"))
        assert iv.Graph.load(os.path.join(tmp, "g.json")).fingerprint() == fp
    assert copy.deepcopy(g).fingerprint() == fp


def _op_line_prefix(op: Op) -> str:
    if isinstance(op, Read):
        return f"  %{op.name} = read {op.run} {op.site}"
    if isinstance(op, SAESplice) and op.features:
        return f"  %{op.features} = sae_splice {op.run} {op.site}"
    if isinstance(op, Grad):
        return f"  %{op.name} = grad {op.run} {op.site}"
    return f"  {op_kind(op)} {op.run} {op.site}"


@given(GRAPHS)
def test_print_is_one_line_per_run_and_op(g: iv.Graph) -> None:
    lines = str(g).splitlines()
    assert len(lines) == 1 + len(g.runs) + len(g.ops)
    assert lines[0] == f"Graph({len(g.runs)} runs, {len(g.ops)} ops)"
    for line, name in zip(lines[1:], g.runs, strict=False):
        assert line.startswith(f"  run {name} ")
    for line, op in zip(lines[1 + len(g.runs) :], g.ops, strict=True):
        assert line.startswith(_op_line_prefix(op)), (line, op)
    assert str(iv.Graph.from_json(g.to_json())) == str(g)


# --- equality is sensitive to every field --------------------------------------------------


def _other_index(index: Any) -> Any:
    if index is None:
        return 0
    if isinstance(index, int):
        return index + 1
    if isinstance(index, tuple):
        return (*index, index[-1])
    assert isinstance(index, Span)
    return Span(index.start, index.stop, 2 if index.step in (None, 1) else None)


def _other(value: Any, field: str) -> Any:
    """A value of the same kind as ``value`` that is not equal to it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 1.0 if abs(value) < 1e15 else value / 2
    if isinstance(value, str):
        return value + "_x"
    if value is None and field == "wrong":  # a grad op's wrong-answer ids
        return Const("t_x")
    if value is None and field == "sampling":
        return iv.Sampling(seed=7)
    if isinstance(value, iv.Sampling):
        return dataclasses.replace(value, seed=value.seed + 1)
    if value is None:
        return {"source": "elsewhere", "features": "feats_x"}.get(field, "x")
    if isinstance(value, Site):
        return (
            Site("transformer.h.1.mlp.output")
            if value.layer is None
            else Site(value.name, value.layer + 1)
        )
    if isinstance(value, Select):
        name = "pos" if value.pos is None else "dims"
        return dataclasses.replace(value, **{name: _other_index(getattr(value, name))})
    if isinstance(value, Ref):
        return Ref(value.read + "_x")
    if isinstance(value, Const):
        return Const(value.tensor + "_x")
    if isinstance(value, tuple) and field == "edits":
        if not value:
            return (FeatureEdit.set(0, 1.0),)
        first = value[0]
        key = "value" if first.value is not None else ("low" if first.low is not None else "high")
        changed = copy.copy(first)
        object.__setattr__(changed, key, _other(getattr(first, key), key))
        return (changed, *value[1:])
    if isinstance(value, tuple):  # run text
        return (*value, "more")
    raise AssertionError(f"no mutation for {field}={value!r}")


def _with(obj: Any, field: str, value: Any) -> Any:
    """A copy of a frozen dataclass with one field set, bypassing its checks."""
    out = copy.copy(obj)
    object.__setattr__(out, field, value)
    return out


def _assert_differs(g: iv.Graph, other: iv.Graph, what: str) -> None:
    assert other != g, what
    assert g != other, what
    assert other.fingerprint() != g.fingerprint(), what


@given(GRAPHS)
def test_equality_is_sensitive_to_every_op_field(g: iv.Graph) -> None:
    same = rebuilt(g, ops=[copy.copy(op) for op in g.ops])
    assert same == g and same.fingerprint() == g.fingerprint()
    for i, op in enumerate(g.ops):
        for f in dataclasses.fields(op):
            other = _other(getattr(op, f.name), f.name)
            if isinstance(op, SAESplice) and f.name == "source" and op.source is None:
                other = Site("resid_pre", 0)  # an SAE splice's source is a site, not a run
            changed = _with(op, f.name, other)
            ops = [*g.ops[:i], changed, *g.ops[i + 1 :]]
            _assert_differs(g, rebuilt(g, ops=ops), f"ops[{i}].{f.name}")
    if len(g.ops) >= 2 and g.ops[0] != g.ops[-1]:
        swapped = [g.ops[-1], *g.ops[1:-1], g.ops[0]]
        _assert_differs(g, rebuilt(g, ops=swapped), "op order")


@given(GRAPHS)
def test_equality_is_sensitive_to_runs_saes_and_tensors(g: iv.Graph) -> None:
    for name, run in g.runs.items():
        for f in dataclasses.fields(run):
            if f.name == "name":
                continue  # the key of the run table; renaming is covered below
            value = getattr(run, f.name)
            runs = {**g.runs, name: _with(run, f.name, _other(value, f.name))}
            _assert_differs(g, rebuilt(g, runs=runs), f"runs[{name}].{f.name}")
    if len(g.runs) >= 2:
        reordered = dict(reversed(list(g.runs.items())))
        assert rebuilt(g, runs=reordered) != g
    for key, spec in g.saes.items():
        params = dict(spec.params)
        flag = "apply_b_dec_to_input"
        variants = {
            "kind": _with(spec, "kind", spec.kind + "_x"),
            "params": _with(spec, "params", tuple({**params, flag: not params[flag]}.items())),
            "tensors": _with(spec, "tensors", spec.tensors[1:]),
        }
        for what, other in variants.items():
            _assert_differs(g, rebuilt(g, saes={**g.saes, key: other}), f"saes[{key}].{what}")
    for key, t in g.tensors.items():
        if t.numel():
            flipped = t.clone()
            raw = flipped.view(-1).view(torch.uint8)
            raw[-1] ^= 1  # one bit, possibly of a NaN payload
            _assert_differs(g, rebuilt(g, tensors={**g.tensors, key: flipped}), key)
        reshaped = t.reshape(1, *t.shape)
        _assert_differs(g, rebuilt(g, tensors={**g.tensors, key: reshaped}), key)
        if t.dtype in (torch.float32, torch.int32):
            retyped = t.view(torch.int32 if t.dtype == torch.float32 else torch.float32)
            _assert_differs(g, rebuilt(g, tensors={**g.tensors, key: retyped}), key)


# --- specific cases ------------------------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
SHAPES = [(), (0,), (3,), (2, 0, 4), (1, 1, 1, 1), (2, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_tensors_of_every_dtype_and_shape(dtype: torch.dtype, shape: tuple) -> None:
    torch.manual_seed(0)
    t = (torch.randn(shape) * 50).to(dtype)
    g = iv.Graph(allow_nonfinite=True)  # float8_e4m3fn turns values over 448 into NaN
    g.run("x", inputs=t).read("output")
    meta = json.loads(g.to_json())["tensors"]["t0"]
    assert meta == {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
    back = iv.Graph.from_json(g.to_json())
    assert back == g
    assert_same_tensors(g, back)
    with tempfile.TemporaryDirectory() as tmp:
        g.save(os.path.join(tmp, "g.json"))
        assert_same_tensors(g, iv.Graph.load(os.path.join(tmp, "g.json")))
    assert back.fingerprint() == g.fingerprint()


@pytest.mark.parametrize("dtype", list(_ODD_NANS), ids=str)
def test_nan_payloads_and_signed_zeros_survive(dtype: torch.dtype) -> None:
    bits, patterns = _ODD_NANS[dtype]
    t = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.0] * 2, dtype=dtype)
    for i, p in enumerate(patterns):
        t.view(bits)[6 + i] = p
    g = iv.Graph(allow_nonfinite=True)
    r = g.run("a", text="hi")
    r.patch("resid_post", 0, pos=-1, value=t)
    r.add("resid_post", 1, direction=t, scale=-0.0)
    back = iv.Graph.from_json(g.to_json())
    assert_same_tensors(g, back)
    assert back == g
    with tempfile.TemporaryDirectory() as tmp:
        g.save(os.path.join(tmp, "g.json"))
        assert_same_tensors(g, iv.Graph.load(os.path.join(tmp, "g.json")))


def test_one_tensor_used_twice() -> None:
    """Reusing a tensor (two runs on the same ids, one direction for two ops) must serialise."""
    ids = torch.tensor([[1, 2, 3]])
    direction = torch.randn(8)
    g = iv.Graph()
    clean = g.run("clean", tokens=ids)
    corrupt = g.run("corrupt", tokens=ids)
    corrupt.add("resid_post", 0, direction=direction)
    corrupt.add("resid_post", 1, direction=direction, scale=2.0)
    clean.project_out("resid_post", 1, direction=direction)
    back = iv.Graph.from_json(g.to_json())
    assert back == g
    with tempfile.TemporaryDirectory() as tmp:
        g.save(os.path.join(tmp, "g.json"))
        assert iv.Graph.load(os.path.join(tmp, "g.json")) == g


def test_tensor_views_and_saes_with_shared_storage_serialise() -> None:
    inputs = torch.randn(1, 3, 4)
    bias = torch.zeros(4)
    sae = iv.JumpReLUSAE(torch.eye(4), bias, torch.eye(4), bias, bias)
    g = iv.Graph()
    r = g.run("x", inputs=inputs)
    r.add("output", direction=inputs[0, 0])  # a view into the inputs tensor
    r.sae_splice("output", sae=sae)
    assert iv.Graph.from_json(g.to_json()) == g


def test_reading_one_site_twice_with_default_names() -> None:
    """A read sees the ops before it, so reading a site before and after a patch is normal."""
    g = iv.Graph()
    a = g.run("a", tokens=[[1, 2, 3]])
    before = a.read("resid_post", 0)
    a.scale("resid_post", 0, factor=2.0)
    after = a.read("resid_post", 0)
    assert before != after
    assert g.reads() == [before.read, after.read]
    assert iv.Graph.from_json(g.to_json()) == g


def test_fingerprint_does_not_depend_on_int_or_float_spelling() -> None:
    """Ops built directly with ints decode with floats; the fingerprint must not change."""
    sae = iv.StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
    g = iv.Graph()
    r = g.run("a", text="hi")
    g.add(Scale("a", Site("resid_post", 0), Select(), 2))
    r.sae_splice("resid_post", 1, sae=sae, edits=[FeatureEdit((1,), "set", 4)])
    back = iv.Graph.from_json(g.to_json())
    assert back == g
    assert back.fingerprint() == g.fingerprint()


def test_docstring_graph_prints_as_documented() -> None:
    g = iv.Graph()
    clean = g.run("clean", tokens=torch.tensor([[1, 2, 3]]))
    corrupt = g.run("corrupt", tokens=torch.tensor([[1, 4, 3]]))
    corrupt.patch("resid_post", layer=0, pos=-1, value=clean.read("resid_post", layer=0))
    corrupt.read("logits", pos=-1, name="patched")
    expected = [
        "Graph(2 runs, 3 ops)",
        "  run clean   tokens=%t0 int64[1, 3]",
        "  run corrupt tokens=%t1 int64[1, 3]",
        "  %clean.resid_post.0 = read clean resid_post[0]",
        "  patch corrupt resid_post[0] pos=-1 <- %clean.resid_post.0",
        "  %patched = read corrupt logits pos=-1",
    ]
    assert str(g).splitlines() == expected
    assert str(iv.Graph.from_json(g.to_json())).splitlines() == expected


def test_save_refuses_a_safetensors_graph_path(tmp_path: Path) -> None:
    g = iv.Graph()
    g.run("a", text="hi")
    with pytest.raises(iv.SpecError, match="sidecar"):
        g.save(str(tmp_path / "g.safetensors"))
    assert list(tmp_path.iterdir()) == []


def test_graph_equality_with_other_types() -> None:
    g = iv.Graph()
    assert g == iv.Graph()
    assert g != "graph"
    assert g.__eq__(object()) is NotImplemented


@settings(max_examples=10)
@given(st.data())
def test_graphs_restricted_to_sizes_stay_in_range(data: st.DataObject) -> None:
    """The conformance suite's use: every index fits a 3-layer, 2-head, 8-wide model."""
    g = data.draw(graphs(3, 2, 8, 5, 16, batch=1, run_kinds=("tokens",), generation=False))
    for op in g.ops:
        assert op.site.layer is None or 0 <= op.site.layer < 3
        for field_name, index in op.select.items():
            size = {"batch": 1, "pos": 5, "head": 2}.get(field_name)
            if size is not None and isinstance(index, int):
                assert -size <= index < size
    for run in g.runs.values():
        assert run.tokens is not None
        ids = g.tensors[run.tokens]
        assert ids.shape == (1, 5) and int(ids.max()) < 16 and int(ids.min()) >= 0


@settings(max_examples=max(5, settings.default.max_examples // 4))
@given(st.data())
def test_model_sized_graphs_validate_on_tiny_gpt2(data: st.DataObject) -> None:
    """Restricted to a model's sizes, sites and tokenizer, drawn graphs pass ``validate``."""
    from tests.tiny_models import WORDS, hf_model, word_tokenizer

    g = data.draw(
        graphs(
            2,
            4,
            32,
            7,
            64,
            d_mlp=128,
            run_kinds=("tokens", "text"),
            raw_sites=("transformer.h.0.mlp.output", "transformer.h.1.attn.output"),
            text_words=WORDS[4:],
        )
    )
    iv.validate(g, hf_model("gpt2"), tokenizer=word_tokenizer())


# --- edge cases: signed zeros, odd raw names, long chains of runs ---


def test_equal_graphs_have_equal_fingerprints_with_signed_zero() -> None:
    a, b = iv.Graph(), iv.Graph()
    a.run("a", text="hi").scale("logits", factor=0.0)
    b.run("a", text="hi").scale("logits", factor=-0.0)
    assert a == b
    assert a.fingerprint() == b.fingerprint()


def test_raw_site_names_are_module_paths_so_printing_stays_one_line_per_op() -> None:
    g = iv.Graph()
    with pytest.raises(iv.SpecError, match="dotted names and indices"):
        g.run("a", text="hi").read("layer\nnorm.output", name="x")
    g2 = iv.Graph()
    g2.run("a", text="hi").read("layers.0.norm.output", name="x")
    assert len(str(g2).splitlines()) == 3


def test_long_chain_of_runs_checks() -> None:
    n = 1100  # runs r0 <- r1 <- ... <- r1099, each patched from the next
    g = iv.Graph()
    handles = [g.run(f"r{i}", tokens=[[1]]) for i in range(n)]
    value = handles[-1].read("resid_post", 0, name=f"v{n - 1}")
    for i in range(n - 2, -1, -1):
        handles[i].patch("resid_post", 0, value=value)
        value = handles[i].read("resid_post", 0, name=f"v{i}")
    g.check()
    assert iv.Graph.from_json(g.to_json()) == g


def test_fingerprint_sees_in_place_changes() -> None:
    """Tensor digests are cached per tensor; an in-place change must not reuse a stale one."""
    direction = torch.ones(8)
    g = iv.Graph()
    g.run("a", tokens=torch.tensor([[1, 2]])).add("resid_pre", layer=0, direction=direction)
    before = g.fingerprint()
    assert g.fingerprint() == before
    with torch.no_grad():
        direction[3] = 2.0
    changed = g.fingerprint()
    assert changed != before
    with torch.no_grad():
        direction[3] = 1.0
    assert g.fingerprint() == before
