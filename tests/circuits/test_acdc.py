"""ACDC, circuit evaluation and circuit graphs against the hand-written split forward of
tests/circuits/split_forward.py (a naive one-edge-at-a-time ACDC loop, the circuit run
computed term by term), and the planner's batching of edge-patch runs against unbatched
runs."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from interventions.architectures import describe
from interventions.batching import Budget, batch_graph
from interventions.circuits.acdc import acdc
from interventions.circuits.circuit import Circuit
from interventions.circuits.edges import Edge, all_edges, edge_patch_op, parse_edge
from interventions.circuits.evaluate import completeness, faithfulness, score_circuit
from interventions.errors import SpecError
from interventions.ops import EdgePatch
from interventions.recipes import Metric
from tests.adapters.torch.hand import FP32, IDS
from tests.circuits.split_forward import split_forward, strong_model
from tests.circuits.test_edge_patch import CORRUPT, _key

LOGIT_DIFF = Metric.logit_diff(torch.tensor([5, 9]), torch.tensor([7, 3]))


@cache
def _corrupt_outputs(family: str) -> dict:
    return split_forward(strong_model(family), CORRUPT)[1]


def _hand_logits(family: str, removed: list[Edge], ablation: str = "resample") -> torch.Tensor:
    """The model with ``removed`` edges patched from the corrupt run (or zeroed), by hand."""
    model = strong_model(family)
    bad = _corrupt_outputs(family)
    table = {}
    for e in removed:
        up = _key(e.upstream)
        table[(up, _key(e.downstream, e.input))] = None if ablation == "zero" else bad[up]
    logits, _, _ = split_forward(model, IDS, table)
    return logits[:, -1]


@cache
def _clean_logits(family: str) -> torch.Tensor:
    return _hand_logits(family, [])


def _hand_metric(family: str, metric: Metric, removed: list[Edge]) -> float:
    logits = _hand_logits(family, removed)
    if metric.kind == "kl":
        return float(metric(logits, _clean_logits(family)).mean())
    return float(metric(logits).mean())


def _candidates(family: str, every_nth: int) -> list[Edge]:
    return all_edges(describe(strong_model(family)))[::every_nth]


def _hand_acdc(
    family: str, metric: Metric, threshold: float, candidates: list[Edge]
) -> tuple[list[Edge], list[float]]:
    """Conmy et al.'s loop, one edge at a time, reverse forward order, no shortcuts."""
    every = all_edges(describe(strong_model(family)))
    removed: list[Edge] = []
    current = _hand_metric(family, metric, [])
    changes: list[float] = []
    for e in sorted(candidates, key=every.index, reverse=True):
        value = _hand_metric(family, metric, [*removed, e])
        change = value - current if metric.kind == "kl" else abs(value - current)
        changes.append(change)
        if change < threshold:
            removed.append(e)
            current = value
    return [e for e in every if e in candidates and e not in removed], changes


def test_batched_edge_patch_runs_equal_unbatched_and_the_hand_forward() -> None:
    model = strong_model("gpt2")
    info = describe(model)
    sets = [
        ["a0.h1 -> a1.h0<k>", "m0 -> logits", "embed -> m0"],
        ["a0.h1 -> a1.h0<k>", "m0 -> logits"],
        ["a0.h1 -> a1.h0<k>", "a1.h2 -> m1", "embed -> a1.h3<q>"],
    ]
    g = iv.Graph()
    g.run("corrupt", tokens=CORRUPT)
    for i in range(len(sets)):
        g.run(f"r{i}", tokens=IDS).read("logits", name=f"r{i}")
    shared = parse_edge(sets[0][0])
    for i in range(len(sets)):  # the shared edge first, run after run: merged into one op
        g.add(edge_patch_op(info, shared, f"r{i}", source="corrupt"))
    for i, names in enumerate(sets):
        for name in names[1:]:
            g.add(edge_patch_op(info, parse_edge(name), f"r{i}", source="corrupt"))
    batched = batch_graph(g, Budget(max_items=64))
    assert len(batched.graph.runs) == 2  # corrupt alone, the three runs in one pass
    edge_ops = [op for op in batched.graph.ops if isinstance(op, EdgePatch)]
    assert len(edge_ops) == 6  # 8 patches, the shared one merged over three runs' rows
    together = iv.run(g, model)
    apart = iv.run(g, model, batch=False)
    for i, names in enumerate(sets):
        removed = [parse_edge(n) for n in names]
        assert_close(together[f"r{i}"], apart[f"r{i}"], **FP32)
        assert_close(together[f"r{i}"][:, -1], _hand_logits("gpt2", removed), **FP32)


@pytest.mark.parametrize(
    "second", ["embed -> a0.h0<q>", "embed -> a0.h1<k>", "embed -> m0", "embed -> a0.h3<q>"]
)
def test_adjacent_row_blocks_merge_only_when_nothing_else_differs(second: str) -> None:
    """The planner merges edge patches of adjacent row blocks into one; patches that also
    differ in head, input or downstream node stay apart. Oracle: each patch run alone."""
    model = strong_model("llama")
    info = describe(model)
    specs = [("embed -> a0.h3<q>", (4, 6)), (second, (6, 8))]

    def graph(which: list[tuple[str, tuple[int, int]]]) -> iv.Graph:
        g = iv.Graph()
        g.run("corrupt", tokens=CORRUPT)
        g.run("cands", tokens=IDS.repeat(4, 1)).read("logits", name="cands")
        for name, rows in which:
            g.add(edge_patch_op(info, parse_edge(name), "cands", source="corrupt", rows=rows))
        return g

    g = graph(specs)
    merged = [op for op in batch_graph(g, Budget(max_items=64)).graph.ops]
    assert sum(isinstance(op, EdgePatch) for op in merged) == (1 if second == specs[0][0] else 2)
    together = iv.run(g, model)["cands"]
    for spec in specs:
        alone = iv.run(graph([spec]), model, batch=False)["cands"]
        rows = slice(*spec[1])
        assert_close(together[rows], alone[rows], **FP32)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    ("family", "metric", "threshold", "every_nth"),
    [
        ("gpt2", Metric.kl(), 0.05, 3),
        ("llama", LOGIT_DIFF, 0.5, 3),
        pytest.param("gpt2", Metric.kl(), 0.05, 1, marks=SLOW),
        pytest.param("gpt2", LOGIT_DIFF, 0.5, 1, marks=SLOW),
        pytest.param("llama", Metric.kl(), 0.02, 1, marks=SLOW),
    ],
)
def test_acdc_equals_the_hand_loop_and_batching_changes_nothing(
    family: str, metric: Metric, threshold: float, every_nth: int
) -> None:
    """Every third edge a candidate (the rest kept in place) by default; every edge, slow."""
    model = strong_model(family)
    candidates = _candidates(family, every_nth)
    want, changes = _hand_acdc(family, metric, threshold, candidates)
    # the decisions are not borderline, so float rounding cannot flip one
    assert min(abs(c - threshold) for c in changes) > 1e-4
    assert 0 < len(want) < len(candidates)
    kw = {"threshold": threshold, "edges": candidates}
    one = acdc(model, IDS, CORRUPT, metric, batch_size=1, **kw)  # type: ignore[arg-type]
    many = acdc(model, IDS, CORRUPT, metric, batch_size=16, **kw)  # type: ignore[arg-type]
    assert list(one.edges) == want and many.edges == one.edges
    assert_close(torch.tensor(many.scores), torch.tensor(one.scores), atol=1e-4, rtol=1e-4)
    assert many.stat("passes") < one.stat("passes")
    assert one.stat("passes") == one.stat("tested") + 1  # the clean run, then one per edge
    assert one.stat("tested") + one.stat("free") == len(candidates)
    kept_changes = [c for c in changes if c >= threshold]
    assert_close(torch.tensor(sorted(one.scores)), torch.tensor(sorted(kept_changes)), **FP32)


def test_a_guide_changes_the_passes_never_the_circuit() -> None:
    """Guessed-kept edges: a perfect guide (the hand loop's own circuit) wastes no run, so
    each pass tests a full window; the opposite guide misses often; EAP-IG's guesses lie
    between. All give the hand loop's circuit."""
    family, metric, threshold = "llama", LOGIT_DIFF, 0.5
    model = strong_model(family)
    candidates = _candidates(family, 3)
    want, _ = _hand_acdc(family, metric, threshold, candidates)
    kw = {"threshold": threshold, "edges": candidates, "batch_size": 4}
    plain = acdc(model, IDS, CORRUPT, metric, **kw)  # type: ignore[arg-type]
    perfect = Circuit(tuple(want), (1.0,) * len(want))
    others = tuple(e for e in candidates if e not in set(want))
    opposite = Circuit(others, (1.0,) * len(others))
    runs = {}
    for name, guide in [("perfect", perfect), ("opposite", opposite), ("eap_ig", "eap_ig")]:
        c = acdc(model, IDS, CORRUPT, metric, guide=guide, **kw)  # type: ignore[arg-type]
        assert list(c.edges) == want, name
        assert_close(torch.tensor(c.scores), torch.tensor(plain.scores), atol=1e-4, rtol=1e-4)
        assert c.stat("tested") == plain.stat("tested")
        runs[name] = c
    tested = plain.stat("tested")
    assert runs["perfect"].stat("misses") == 0 and runs["perfect"].stat("runs") == tested
    assert runs["perfect"].stat("passes") == 1 + -(-tested // 4)  # full windows, no waste
    assert plain.stat("misses") == len(want) and plain.stat("runs") > tested
    assert runs["opposite"].stat("misses") > plain.stat("misses")
    assert runs["eap_ig"].stat("passes") < plain.stat("passes")


@pytest.mark.parametrize("backend", ["nnsight", "pyvene"])
def test_a_guided_acdc_is_the_same_on_every_backend(backend: str) -> None:
    """EAP-IG's guesses and ACDC's checks both run on the backend: the torch circuit."""
    model = strong_model("llama")
    kw = {"threshold": 0.5, "edges": _candidates("llama", 5), "batch_size": 4}
    want = acdc(model, IDS, CORRUPT, LOGIT_DIFF, **kw)  # type: ignore[arg-type]
    got = acdc(model, IDS, CORRUPT, LOGIT_DIFF, guide="eap_ig", backend=backend, **kw)  # type: ignore[arg-type]
    assert got.edges == want.edges and want.edges
    assert_close(torch.tensor(got.scores), torch.tensor(want.scores), atol=1e-4, rtol=1e-4)


def test_bad_guides_are_refused_by_name() -> None:
    model = strong_model("gpt2")
    with pytest.raises(SpecError, match="unknown guide 'eap'; guides: eap_ig, a Circuit, or None"):
        acdc(model, IDS, CORRUPT, LOGIT_DIFF, guide="eap")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="not KL's"):
        acdc(model, IDS, CORRUPT, Metric.kl(), guide="eap_ig")
    nothing = acdc(model, IDS, CORRUPT, LOGIT_DIFF, edges=[], guide="eap_ig")
    assert nothing.edges == () and nothing.stat("passes") == 1
    assert nothing.stat("guide_passes") == 0
    with pytest.raises(SpecError, match="unknown guide \\[Edge"):
        acdc(model, IDS, CORRUPT, LOGIT_DIFF, guide=[parse_edge("m0 -> logits")])  # type: ignore[arg-type]


def test_zero_ablation_acdc_and_the_circuit_graph_by_hand() -> None:
    model = strong_model("gpt2")
    c = acdc(
        model,
        IDS,
        CORRUPT,
        Metric.kl(),
        threshold=0.05,
        ablation="zero",
        edges=_candidates("gpt2", 4),
        batch_size=8,
    )
    assert c.method == "acdc(threshold=0.05, kl, zero)" and c.edges
    outside = [e for e in all_edges(describe(model)) if e not in set(c.edges)]
    for ablation in ("zero", "resample"):
        g = c.to_graph(model, IDS, CORRUPT, ablation=ablation)  # type: ignore[arg-type]
        assert iv.Graph.from_json(g.to_json()) == g
        assert_close(iv.run(g, model)["circuit"], _hand_logits("gpt2", outside, ablation), **FP32)


def test_faithfulness_and_completeness_by_hand() -> None:
    model = strong_model("gpt2")
    every = all_edges(describe(model))
    c = Circuit(tuple(every[-12:]), (1.0,) * 12, "hand")
    m = LOGIT_DIFF
    clean = _hand_metric("gpt2", m, [])
    empty = _hand_metric("gpt2", m, every)
    alone = _hand_metric("gpt2", m, every[:-12])
    without = _hand_metric("gpt2", m, every[-12:])
    s = score_circuit(model, c, IDS, CORRUPT, m)
    with torch.no_grad():  # the empty circuit under resample ablation is the corrupt run
        corrupt = float(m(model(CORRUPT).logits[:, -1]).mean())
    assert_close(
        torch.tensor([s.clean, s.circuit, s.without, s.empty]),
        torch.tensor([clean, alone, without, corrupt]),
        atol=1e-4,
        rtol=1e-5,
    )
    assert abs(empty - corrupt) < 1e-4
    assert abs(s.faithfulness - (alone - empty) / (clean - empty)) < 1e-4
    assert abs(s.completeness - (clean - without) / (clean - empty)) < 1e-4
    assert abs(s.faithfulness) > 0.05 and abs(s.faithfulness - 1) > 0.05  # a real fraction
    whole = Circuit(tuple(every), (1.0,) * len(every))
    assert abs(faithfulness(model, whole, IDS, CORRUPT, m) - 1) < 1e-5
    assert abs(completeness(model, whole, IDS, CORRUPT, m) - 1) < 1e-5
    assert abs(faithfulness(model, Circuit((), ()), IDS, CORRUPT, m)) < 1e-5


def test_circuit_stats_round_trip_print_and_draw(tmp_path) -> None:
    c = acdc(
        strong_model("gpt2"),
        IDS,
        CORRUPT,
        Metric.kl(),
        threshold=0.05,
        edges=_candidates("gpt2", 6),
    )
    back = Circuit.load(c.save(tmp_path / "c.json"))
    assert back == c and back.stats == c.stats and back.stat("passes") == c.stat("passes")
    assert "passes=" in str(c).splitlines()[1]
    pytest.importorskip("matplotlib")
    png = c.draw(tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_acdc_inputs_are_refused_by_name() -> None:
    model = strong_model("gpt2")
    with pytest.raises(SpecError, match="unknown ablation 'mode'"):
        acdc(model, IDS, CORRUPT, Metric.kl(), ablation="mode")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="threshold must be a non-negative"):
        acdc(model, IDS, CORRUPT, Metric.kl(), threshold=-1)
    with pytest.raises(SpecError, match="batch_size must be a positive int"):
        acdc(model, IDS, CORRUPT, Metric.kl(), batch_size=0)
    with pytest.raises(SpecError, match="must have one shape"):
        acdc(model, IDS, CORRUPT[:, :3], Metric.kl())
    with pytest.raises(SpecError, match="not an edge of this model"):
        acdc(model, IDS, CORRUPT, Metric.kl(), edges=[parse_edge("a5.h0 -> logits")])
    with pytest.raises(SpecError, match="edges not in this model"):
        Circuit((parse_edge("a5.h0 -> logits"),), (1.0,)).to_graph(model, IDS, CORRUPT)
    with pytest.raises(SpecError, match="needs corrupt="):
        Circuit((), ()).to_graph(model, IDS)
    with pytest.raises(SpecError, match="stats are"):
        Circuit((), (), stats=(("passes", "x"),))  # type: ignore[arg-type]
