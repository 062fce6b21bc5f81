"""Edge patches against a hand-written split forward (tests/circuits/split_forward.py) on
GPT-2 and Llama with grouped-query attention: patching one edge substitutes one term of
one downstream input, and nothing else."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from interventions.architectures import describe
from interventions.circuits.edges import Edge, Node, all_edges, edge_patch_op, parse_edge
from interventions.errors import SpecError, ValidationError
from interventions.sites import Span
from tests.adapters.torch.hand import FP32, IDS
from tests.circuits.split_forward import split_forward, strong_model
from tests.tiny_models import hook_count

FAMILIES = ("gpt2", "llama")
CORRUPT = torch.tensor([[1, 9, 4, 13, 11, 8], [2, 6, 14, 3, 10, 5]])


def _key(node: Node, head_input: str | None = None) -> tuple:
    if node.kind in ("embed", "logits"):
        return (node.kind,)
    if head_input is not None:
        return (head_input, node.layer, node.head)
    return (node.kind, node.layer) if node.kind == "mlp" else ("head", node.layer, node.head)


def _run(
    family: str, edges: list[Edge], method: str = "patch", backend: str = "torch"
) -> torch.Tensor:
    model = strong_model(family)
    info = describe(model)
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT)
    g.run("patched", tokens=IDS).read("logits", name="logits")
    for e in edges:
        source = None if method == "zero" else "corrupt"
        g.add(edge_patch_op(info, e, "patched", method=method, source=source))  # type: ignore[arg-type]
    return iv.run(g, model, backend=backend)["logits"]


# one edge into each kind of downstream input, from each kind of upstream node
EDGES = (
    "embed -> a1.h2<q>",
    "a0.h1 -> a1.h0<k>",
    "a0.h3 -> a1.h1<v>",
    "m0 -> a1.h3<q>",
    "a1.h2 -> m1",
    "embed -> m0",
    "a0.h0 -> logits",
    "m1 -> logits",
)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_forward_is_the_model(family: str) -> None:
    model = strong_model(family)
    logits, _, _ = split_forward(model, IDS)
    with torch.no_grad():
        assert_close(logits, model(IDS).logits, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", EDGES)
def test_one_edge_patch_substitutes_one_term(family: str, name: str) -> None:
    model = strong_model(family)
    edge = parse_edge(name)
    _, corrupt_outs, _ = split_forward(model, CORRUPT)
    up = _key(edge.upstream)
    down = _key(edge.downstream, edge.input)
    want, _, _ = split_forward(model, IDS, {(up, down): corrupt_outs[up]})
    clean, _, _ = split_forward(model, IDS)
    got = _run(family, [edge])
    assert_close(got, want, **FP32)
    assert (got - clean).abs().max() > 1e-4  # the edge mattered, so the check can fail


@pytest.mark.parametrize("family", FAMILIES)
def test_edges_compose_with_the_upstream_value_of_this_run(family: str) -> None:
    """a0.h1 -> logits takes a0.h1's output in the patched run, which embed -> a0.h1<v>
    has changed: the delta is corrupt minus *that*, not minus the clean output."""
    model = strong_model(family)
    kv = 1 if family == "gpt2" else 0  # the key-value head query head 1 reads
    edges = [parse_edge(f"embed -> a0.h{kv}<v>"), parse_edge("a0.h1 -> logits")]
    _, corrupt_outs, _ = split_forward(model, CORRUPT)
    e, h = ("embed",), ("head", 0, 1)
    want, _, _ = split_forward(
        model, IDS, {(e, ("v", 0, kv)): corrupt_outs[e], (h, ("logits",)): corrupt_outs[h]}
    )
    single, _, _ = split_forward(model, IDS, {(h, ("logits",)): corrupt_outs[h]})
    assert (want - single).abs().max() > 1e-3  # the first edge does change a0.h1's output
    assert_close(_run(family, edges), want, **FP32)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_and_mean_edge_ablation(family: str) -> None:
    model = strong_model(family)
    edge = parse_edge("a0.h2 -> m1")
    up, down = ("head", 0, 2), ("mlp", 1)
    want_zero, _, _ = split_forward(model, IDS, {(up, down): None})
    assert_close(_run(family, [edge], "zero"), want_zero, **FP32)
    _, corrupt_outs, _ = split_forward(model, CORRUPT)
    mean = corrupt_outs[up].mean(dim=(0, 1), keepdim=True).expand_as(corrupt_outs[up])
    want_mean, _, _ = split_forward(model, IDS, {(up, down): mean})
    assert_close(_run(family, [edge], "mean"), want_mean, **FP32)


def test_patching_every_edge_gives_the_corrupt_run() -> None:
    """All edges from the corrupt run: every input is the corrupt one, so is the output."""
    model = strong_model("gpt2")
    with torch.no_grad():
        want = model(CORRUPT).logits
    assert_close(_run("gpt2", all_edges(describe(model))), want, **FP32)


def test_edge_patch_round_trips_and_prints() -> None:
    info = describe(strong_model("llama"))
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT)
    g.run("patched", tokens=IDS)
    g.add(edge_patch_op(info, parse_edge("a0.h1 -> a1.h1<k>"), "patched", source="corrupt"))
    g.add(edge_patch_op(info, parse_edge("m0 -> logits"), "patched", method="zero"))
    assert iv.Graph.from_json(g.to_json()) == g
    text = str(g)
    assert "edge_patch patched k_input[1] head=1 += (head[0] head=1) from corrupt" in text
    assert "edge_patch patched model.norm.input += (mlp_out[0]) zero" in text


def test_bad_edge_patches_are_refused_by_name() -> None:
    model = strong_model("gpt2")
    info = describe(model)
    with pytest.raises(SpecError, match="upstream node does not come before"):
        Edge(Node("head", 1, 0), Node("head", 1, 2), "q")
    with pytest.raises(SpecError, match="needs source="):
        edge_patch_op(info, parse_edge("m0 -> logits"), "p", method="mean")
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT[:1])
    g.run("patched", tokens=IDS)
    g.add(edge_patch_op(info, parse_edge("m0 -> logits"), "patched", source="corrupt"))
    with pytest.raises(ValidationError, match="needs runs of one shape"):
        g.validate(model)
    for backend in ("torch", "nnsight", "pyvene"):
        with pytest.raises(ValidationError, match="needs runs of one shape"):
            g.validate(model, backend=backend)


OTHER_BACKENDS = ("pyvene", "nnsight")


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_edge_patches_on_other_backends_equal_the_split_forward(family: str, backend: str) -> None:
    """In one graph: each edge of EDGES alone, a zero and a mean ablation, and many edges at
    once (every edge into the second layer and the logits), on another backend."""
    pytest.importorskip(backend)
    model = strong_model(family)
    info = describe(model)
    _, corrupt_outs, _ = split_forward(model, CORRUPT)
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT)
    wants: dict[str, torch.Tensor] = {}

    def case(name: str, edges: list[Edge], method: str, subs: dict) -> None:
        g.run(name, tokens=IDS).read("logits", name=name)
        for e in edges:
            source = None if method == "zero" else "corrupt"
            g.add(edge_patch_op(info, e, name, method=method, source=source))  # type: ignore[arg-type]
        wants[name] = split_forward(model, IDS, subs)[0]

    for i, text in enumerate(EDGES):
        edge = parse_edge(text)
        up = _key(edge.upstream)
        case(f"e{i}", [edge], "patch", {(up, _key(edge.downstream, edge.input)): corrupt_outs[up]})
    up, down = ("head", 0, 2), ("mlp", 1)
    case("zero", [parse_edge("a0.h2 -> m1")], "zero", {(up, down): None})
    mean = corrupt_outs[up].mean(dim=(0, 1), keepdim=True).expand_as(corrupt_outs[up])
    case("mean", [parse_edge("a0.h2 -> m1")], "mean", {(up, down): mean})
    many = [e for e in all_edges(info) if e.downstream.layer == 1 or e.downstream.kind == "logits"]
    case(
        "many",
        many,
        "patch",
        {
            (_key(e.upstream), _key(e.downstream, e.input)): corrupt_outs[_key(e.upstream)]
            for e in many
        },
    )
    got = iv.run(g, model, backend=backend)
    clean = split_forward(model, IDS)[0]
    for name, want in wants.items():
        assert_close(got[name], want, **FP32, msg=name)
        assert (got[name] - clean).abs().max() > 1e-4, name  # every case changes the output
    assert hook_count(model) == 0


@pytest.mark.parametrize("backend", ("torch", *OTHER_BACKENDS))
def test_an_edge_patch_on_a_block_of_rows_pairs_them_with_the_source(backend: str) -> None:
    """A run of the prompts stacked three times; one edge patched on rows 2..6 (the second
    and third copies, each paired row for row with the corrupt run), another zeroed on
    rows 4..6 alone: each copy equals its hand-written split forward."""
    if backend != "torch":
        pytest.importorskip(backend)
    model = strong_model("llama")
    info = describe(model)
    _, bad, _ = split_forward(model, CORRUPT)
    one, two = parse_edge("a0.h1 -> a1.h0<k>"), parse_edge("m0 -> logits")
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT)
    g.run("stack", tokens=IDS.repeat(3, 1)).read("logits", name="logits")
    g.add(edge_patch_op(info, one, "stack", source="corrupt", rows=(2, 6)))
    g.add(edge_patch_op(info, two, "stack", method="zero", rows=(4, 6)))
    got = iv.run(g, model, backend=backend)["logits"]
    first = {(("head", 0, 1), ("k", 1, 0)): bad[("head", 0, 1)]}
    wants = [{}, first, {**first, (("mlp", 0), ("logits",)): None}]
    for i, subs in enumerate(wants):
        assert_close(got[2 * i : 2 * i + 2], split_forward(model, IDS, subs)[0], **FP32)
    assert hook_count(model) == 0


def test_rows_of_an_edge_patch_must_be_a_block_that_fits_the_source() -> None:
    model = strong_model("gpt2")
    info = describe(model)
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT)
    g.run("stack", tokens=IDS.repeat(3, 1))
    edge = parse_edge("m0 -> logits")
    g.add(edge_patch_op(info, edge, "stack", source="corrupt", rows=(0, 6)))
    g.validate(model)  # three copies of the source's two rows
    g.ops[-1] = edge_patch_op(info, edge, "stack", source="corrupt")
    with pytest.raises(ValidationError, match="needs runs of one shape"):
        g.validate(model)  # the whole run: 6 rows against 2, no block given
    g.ops[-1] = edge_patch_op(info, edge, "stack", source="corrupt", rows=(1, 4))
    with pytest.raises(ValidationError, match="a multiple of the source's"):
        g.validate(model)
    g.ops[-1] = replace(g.ops[-1], select=replace(g.ops[-1].select, batch=Span(0, 6, 2)))
    with pytest.raises(ValidationError, match="a block of rows"):
        g.validate(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_overlapping_row_blocks_into_per_head_inputs(family: str) -> None:
    """Edges into one head's input on overlapping blocks of rows (one patched, one mean
    ablated), another head's on a third block, plus a read of that input (which takes
    the backend's general path, with every head's copy): each copy equals its hand-written
    split forward, with and without the read."""
    model = strong_model(family)
    info = describe(model)
    _, bad, _ = split_forward(model, CORRUPT)
    a, b, c = (parse_edge(n) for n in ("embed -> a1.h0<q>", "a0.h2 -> a1.h0<q>", "m0 -> a1.h1<k>"))
    mean = bad[("head", 0, 2)].mean(dim=(0, 1), keepdim=True).expand_as(bad[("head", 0, 2)])
    sub_a = {(("embed",), ("q", 1, 0)): bad[("embed",)]}
    sub_b = {(("head", 0, 2), ("q", 1, 0)): mean}
    sub_c = {(("mlp", 0), ("k", 1, 1)): bad[("mlp", 0)]}
    wants = [sub_a, {**sub_a, **sub_b}, {**sub_b, **sub_c}]
    for read in (False, True):
        g = iv.Graph()
        g.run("corrupt", tokens=CORRUPT)
        stack = g.run("stack", tokens=IDS.repeat(3, 1))
        stack.read("logits", name="logits")
        g.add(edge_patch_op(info, a, "stack", source="corrupt", rows=(0, 4)))
        g.add(edge_patch_op(info, b, "stack", method="mean", source="corrupt", rows=(2, 6)))
        g.add(edge_patch_op(info, c, "stack", source="corrupt", rows=(4, 6)))
        if read:
            stack.read("q_input", layer=1, name="q_in")
        got = iv.run(g, model)
        for i, subs in enumerate(wants):
            want = split_forward(model, IDS, subs)[0]
            assert_close(got["logits"][2 * i : 2 * i + 2], want, **FP32, msg=f"copy {i} {read}")
        assert hook_count(model) == 0


def test_edges_made_any_way_are_equal_hash_alike_and_survive_pickling() -> None:
    """all_edges makes its edges without the checks; parse_edge and Edge(...) with them;
    a pickled edge comes back with its hash (from ints alone): all are one key."""
    import pickle

    every = all_edges(describe(strong_model("llama")))
    by_name = {str(e): e for e in every}
    for e in every:
        for other in (parse_edge(str(e)), pickle.loads(pickle.dumps(e))):
            assert other == e and hash(other) == hash(e) and other in by_name.values()
    made = Edge(Node("head", 0, 1), Node("head", 1, 0), "k")
    assert {made: 1}[by_name["a0.h1 -> a1.h0<k>"]] == 1
    assert hash(Node("mlp", 0)) != hash(Node("mlp", 1)) and Node("mlp", 0) < Node("mlp", 1)
