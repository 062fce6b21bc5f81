"""Known answers on the committed (seed 0) reference models: ACDC and EAP-IG recover the
induction circuit (previous-token head L0H2 -> the induction heads' key inputs), and the
circuits they return keep the behaviour with every other edge removed (faithfulness,
:mod:`interventions.circuits.evaluate`). Prompts of three draws for the induction model;
the IOI model's ACDC run is slow (about a minute) and marked so.

Measured (resample ablation, 16 prompts; prompt draws 0/1/2, IOI 7/8/9): induction ACDC
(copying metric, threshold 1.0) 10 edges, faithfulness 0.968/0.960/0.970, L0H2 into the
keys of L1H0, L1H2, L1H3; EAP-IG (8 steps) greedy 20 edges 0.995/0.994/0.995; IOI
EAP-IG (5 steps) greedy 180 of 262 edges 0.916/0.852/0.912 (random edges made whole
alike: 0.011/-0.006/0.052); IOI ACDC (logit difference, threshold 0.1)
0.873/0.890 (82 edges)/0.850 (71 edges).

Induction over the three training seeds (0 committed, 1 and 2 trained by the slow test;
draw 0 / 1 / 2 each): previous-token head L0H2 / L0H1 / L0H3 (score 0.941 / 0.905 /
0.925, next layer-0 head <= 0.168), all four layer-1 heads inducting (>= 0.935). ACDC
edges 10,10,10 / 10,10,10 / 12,13,13, key edges from the previous-token head into 3 / 3 /
3-4 induction heads, faithfulness 0.968,0.960,0.970 / 0.975,0.980,0.975 /
0.965,0.990,0.998 (margin over 0.9: at least 0.060); EAP-IG key edges in the top 10:
2,2,2 / 2,1,1 / 2,3,2 (the thin margin: one edge for seed 1); greedy 20 edges
0.995,0.994,0.995 / 0.997,1.002,0.995 / 0.999,0.992,1.000."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest
import torch

from interventions.circuits.acdc import acdc
from interventions.circuits.circuit import Circuit
from interventions.circuits.eap import edge_attribution
from interventions.circuits.edges import Node
from interventions.circuits.evaluate import score_circuit
from interventions.circuits.tasks import task_data
from interventions.reference_models.induction import load_induction_model
from interventions.reference_models.ioi import load_ioi_model

PREV, INDUCTION = Node("head", 0, 2), [Node("head", 1, h) for h in range(4)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@cache
def _induction() -> torch.nn.Module:
    return load_induction_model()


@cache
def _ioi() -> torch.nn.Module:
    return load_ioi_model()[0]


def _key_edges(c: Circuit) -> set[Node]:
    """The induction heads that the previous-token head feeds through their key input."""
    return {e.downstream for e in c.edges if e.upstream == PREV and e.input == "k"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_acdc_finds_the_induction_circuit(seed: int) -> None:
    model = _induction()
    clean, corrupt, metric = task_data("induction", n=16, seed=seed)
    c = acdc(model, clean, corrupt, metric, threshold=1.0)
    assert len(_key_edges(c)) >= 2 and _key_edges(c) <= set(INDUCTION)
    # every head in the circuit is the previous-token head or an induction head
    heads = {n for n in c.nodes if n.kind == "head"}
    assert PREV in heads and heads <= {PREV, *INDUCTION}
    s = score_circuit(model, c, clean, corrupt, metric)
    assert s.faithfulness >= 0.9, s
    assert len(c.edges) <= 20  # of 110: a small circuit
    guided = acdc(model, clean, corrupt, metric, threshold=1.0, guide="eap_ig")
    assert guided.edges == c.edges  # the same decisions, in fewer passes (its own counted)
    assert guided.stat("passes") + guided.stat("guide_passes") < c.stat("passes")


@pytest.mark.parametrize("backend", ["nnsight", "pyvene"])
def test_acdc_on_other_backends_finds_the_torch_circuit(backend: str) -> None:
    """Four prompts (a few seconds): the same edges as the torch backend (itself held to
    the hand-written loop in test_acdc.py), scores within 1e-4, and the known answer."""
    pytest.importorskip(backend)
    model = _induction()
    clean, corrupt, metric = task_data("induction", n=4, seed=0)
    want = acdc(model, clean, corrupt, metric, threshold=1.0, batch_size=16)
    got = acdc(model, clean, corrupt, metric, threshold=1.0, batch_size=16, backend=backend)
    assert got.edges == want.edges
    assert max(abs(a - b) for a, b in zip(got.scores, want.scores, strict=True)) < 1e-4
    assert got.stat("passes") == want.stat("passes")
    assert len(_key_edges(got)) >= 2 and _key_edges(got) <= set(INDUCTION)


def test_eap_ig_ranks_the_key_edges_high_and_its_circuit_is_faithful() -> None:
    model = _induction()
    clean, corrupt, metric = task_data("induction", n=16, seed=0)
    ig = edge_attribution(model, clean, corrupt, metric, steps=8)
    top = ig.top(10)
    assert _key_edges(top), [str(e) for e in top.edges]
    s = score_circuit(model, ig.greedy(20), clean, corrupt, metric)
    assert s.faithfulness >= 0.9, s


def test_eap_ig_circuits_on_ioi_beat_random_edges() -> None:
    """EAP-IG's greedy circuits of k edges, against k random edges made whole the same way."""
    model = _ioi()
    clean, corrupt, metric = task_data("ioi", n=16, seed=7)
    ig = edge_attribution(model, clean, corrupt, metric, steps=5)
    gen = torch.Generator().manual_seed(0)
    shuffled = Circuit(ig.edges, tuple(torch.rand(len(ig.edges), generator=gen).tolist()))
    for k in (60, 120, 180):
        found = score_circuit(model, ig.greedy(k), clean, corrupt, metric).faithfulness
        chance = score_circuit(model, shuffled.greedy(k), clean, corrupt, metric).faithfulness
        assert found > chance + 0.1, (k, found, chance)
    assert found >= 0.8, found  # 180 of 262 edges


@pytest.mark.slow
def test_acdc_on_ioi_is_faithful() -> None:
    model = _ioi()
    clean, corrupt, metric = task_data("ioi", n=16, seed=7)
    c = acdc(model, clean, corrupt, metric, threshold=0.1)
    s = score_circuit(model, c, clean, corrupt, metric)
    assert s.faithfulness >= 0.8, s
    assert len(c.edges) < 262 / 2


# --------------------------------------------------------------------------- trained seeds
# The IOI known answers on models trained here from scratch by the reference training
# function, seeds 1 and 2 (7-20 minutes of CPU each, so the slow profile).


@cache
def _trained_ioi(seed: int) -> torch.nn.Module:
    from interventions.reference_models import ioi

    return ioi.train_ioi_model(seed=seed).eval()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_ioi_circuits_are_faithful_trained_seeds(seed: int) -> None:
    """Seeds 1 and 2 of the IOI model (seed 0 is the committed one, tested above): ACDC's
    circuit and EAP-IG's greedy 180 edges keep >= 0.8 of the logit difference, and
    EAP-IG's edges beat as many random ones. Measured: ACDC 91 / 76 edges, faithfulness
    0.878 / 0.979; EAP-IG 180 edges 0.976 / 0.972, random 0.063 / 0.020."""
    model = _trained_ioi(seed)
    clean, corrupt, metric = task_data("ioi", n=16, seed=7)
    c = acdc(model, clean, corrupt, metric, threshold=0.1)
    s = score_circuit(model, c, clean, corrupt, metric)
    ig = edge_attribution(model, clean, corrupt, metric, steps=5)
    found = score_circuit(model, ig.greedy(180), clean, corrupt, metric).faithfulness
    gen = torch.Generator().manual_seed(0)
    shuffled = Circuit(ig.edges, tuple(torch.rand(len(ig.edges), generator=gen).tolist()))
    chance = score_circuit(model, shuffled.greedy(180), clean, corrupt, metric).faithfulness
    print(
        f"seed {seed}: ACDC {len(c.edges)} edges {s}; EAP-IG 180: {found:.3f}, random {chance:.3f}"
    )
    assert s.faithfulness >= 0.8, s
    assert len(c.edges) < 262 / 2
    assert found >= 0.8 and found > chance + 0.1, (found, chance)


# The induction known answers on seeds 1 and 2 of the induction model, trained here (a
# few minutes of CPU each). The previous-token head and the induction heads are read off
# each model's own attention scores, not assumed to be seed 0's.


@cache
def _trained_induction(seed: int) -> tuple[torch.nn.Module, Node, frozenset[Node]]:
    """The model of ``seed``, its previous-token head (layer 0, the largest
    previous-token score) and its induction heads (layer 1, induction score > 0.5)."""
    from interventions.reference_models import induction

    model = induction.train_induction_model(seed=seed).eval()
    report = induction.evaluate_induction_model(model)
    assert report.accuracy >= 0.99, induction.format_report(report)
    scores = report.previous_token[0]
    prev = int(scores.argmax())
    # a clear previous-token head: high, and well above every other layer-0 head
    assert scores[prev] > 0.8 and sorted(scores.tolist())[-2] < 0.5, scores
    heads = frozenset(
        Node("head", 1, h) for h, s in enumerate(report.induction[1].tolist()) if s > 0.5
    )
    assert heads, report.induction
    return model, Node("head", 0, prev), heads


def _key_edges_from(c: Circuit, prev: Node) -> set[Node]:
    return {e.downstream for e in c.edges if e.upstream == prev and e.input == "k"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_induction_circuits_trained_seeds(seed: int) -> None:
    """Seeds 1 and 2 (seed 0 is the committed model, tested above): ACDC (threshold 1.0)
    finds the previous-token head -> induction heads' key edges, only those heads, and a
    circuit of <= 20 edges keeping >= 0.9 of the copying metric; EAP-IG (8 steps) puts a
    key edge in its top 10 and its greedy 20 edges keep >= 0.9. Measured in the module
    docstring."""
    model, prev, induction_heads = _trained_induction(seed)
    clean, corrupt, metric = task_data("induction", n=16, seed=0)
    c = acdc(model, clean, corrupt, metric, threshold=1.0)
    keys = _key_edges_from(c, prev)
    assert len(keys) >= 2 and keys <= induction_heads, [str(e) for e in c.edges]
    heads = {n for n in c.nodes if n.kind == "head"}
    assert prev in heads and heads <= {prev, *induction_heads}, [str(e) for e in c.edges]
    s = score_circuit(model, c, clean, corrupt, metric)
    ig = edge_attribution(model, clean, corrupt, metric, steps=8)
    top = ig.top(10)
    g = score_circuit(model, ig.greedy(20), clean, corrupt, metric)
    print(
        f"seed {seed}: prev {prev}, ACDC {len(c.edges)} edges {s.faithfulness:.3f}, "
        f"EAP-IG top-10 key edges {len(_key_edges_from(top, prev))}, "
        f"greedy 20 {g.faithfulness:.3f}"
    )
    assert s.faithfulness >= 0.9, s
    assert len(c.edges) <= 20
    assert _key_edges_from(top, prev) <= induction_heads
    assert _key_edges_from(top, prev), [str(e) for e in top.edges]
    assert g.faithfulness >= 0.9, g
