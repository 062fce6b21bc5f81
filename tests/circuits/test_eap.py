"""EAP and EAP-IG scores against hand-written gradients x differences, from the split
forward of tests/circuits/split_forward.py (autograd on a zero probe added to each
downstream input), on GPT-2 and Llama (grouped-query attention)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from interventions.circuits.circuit import Circuit
from interventions.circuits.eap import edge_attribution
from interventions.circuits.edges import Edge, Node
from interventions.errors import SpecError
from interventions.recipes import Metric
from tests.adapters.torch.hand import IDS
from tests.circuits.split_forward import split_forward, strong_model
from tests.circuits.test_edge_patch import CORRUPT, _key

FAMILIES = ("gpt2", "llama")
METRIC = Metric.logit_diff(torch.tensor([5, 9]), torch.tensor([7, 3]))
TOL = {"atol": 1e-4, "rtol": 1e-4}


def _hand_scores(family: str, edges: tuple[Edge, ...], alphas: list[float]) -> torch.Tensor:
    model = strong_model(family)
    _, clean, inputs = split_forward(model, IDS)
    _, bad, _ = split_forward(model, CORRUPT)
    embed = model.transformer.wte if family == "gpt2" else model.model.embed_tokens
    with torch.no_grad():
        e_clean, e_bad = embed(IDS), embed(CORRUPT)
    grads = {k: torch.zeros_like(v) for k, v in inputs.items()}
    for alpha in alphas:
        probes = {k: torch.zeros_like(v, requires_grad=True) for k, v in inputs.items()}
        point = None if alpha == 1.0 else e_bad + alpha * (e_clean - e_bad)
        logits, _, _ = split_forward(model, IDS, probes=probes, embed=point)
        metric = (logits[[0, 1], -1, [5, 9]] - logits[[0, 1], -1, [7, 3]]).mean()
        for k, g in zip(probes, torch.autograd.grad(metric, list(probes.values())), strict=True):
            grads[k] += g / len(alphas)
    out = []
    for e in edges:
        up, down = _key(e.upstream), _key(e.downstream, e.input)
        out.append(((bad[up] - clean[up]) * grads[down]).sum())
    return torch.stack(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_equals_gradient_times_difference_by_hand(family: str) -> None:
    c = edge_attribution(strong_model(family), IDS, CORRUPT, METRIC)
    assert c.method == "eap" and len(c.edges) == (110 if family == "gpt2" else 82)
    got = torch.tensor(c.scores)
    assert_close(got, _hand_scores(family, c.edges, [1.0]), **TOL)
    assert got.abs().min() < got.abs().max() / 10  # scores differ: the check can fail


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_ig_equals_the_hand_path_average_and_steps_1_is_eap(family: str) -> None:
    model = strong_model(family)
    eap = edge_attribution(model, IDS, CORRUPT, METRIC)
    assert edge_attribution(model, IDS, CORRUPT, METRIC, steps=1).scores == eap.scores
    ig = edge_attribution(model, IDS, CORRUPT, METRIC, steps=3)
    assert ig.method == "eap_ig(steps=3)"
    assert_close(
        torch.tensor(ig.scores), _hand_scores(family, ig.edges, [1 / 3, 2 / 3, 1.0]), **TOL
    )
    assert (torch.tensor(ig.scores) - torch.tensor(eap.scores)).abs().max() > 1e-3


def test_circuit_saves_loads_and_selects(tmp_path) -> None:
    c = edge_attribution(strong_model("gpt2"), IDS, CORRUPT, METRIC)
    back = Circuit.load(c.save(tmp_path / "c.json"))
    assert back == c and back.scores == c.scores
    top = c.top(5)
    assert len(top.edges) == 5
    assert min(abs(s) for s in top.scores) >= max(
        abs(s) for e, s in zip(c.edges, c.scores, strict=True) if e not in top.edges
    )
    assert c.threshold(0.0) == c and not c.threshold(1e9).edges
    assert (
        Node("logits") in c.nodes and str(c).splitlines()[0] == "Circuit(eap, 110 edges, 12 nodes)"
    )


def test_bad_inputs_are_refused_by_name() -> None:
    model = strong_model("gpt2")
    with pytest.raises(SpecError, match="must have one shape"):
        edge_attribution(model, IDS, CORRUPT[:, :4], METRIC)
    with pytest.raises(SpecError, match="steps must be a positive int"):
        edge_attribution(model, IDS, CORRUPT, METRIC, steps=0)
    with pytest.raises(SpecError, match="one score per edge"):
        Circuit((), (1.0,))
