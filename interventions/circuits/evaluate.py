"""How well a circuit explains a behaviour: faithfulness and completeness.

Both are fractions of the gap between the clean run and the empty circuit (every edge
removed, which under ``resample`` ablation is exactly the corrupt run), with metric
values ``m`` the batch means of ``metric`` at ``pos`` (for ``Metric.kl()``, of
``KL(clean || run)``, so ``m_clean = 0``):

* **faithfulness** ``(m_circuit - m_empty) / (m_clean - m_empty)``: the circuit alone,
  every edge outside it removed (Hanna et al. 2024's normalized faithfulness; 1: it does
  all the model does, 0: no better than nothing);
* **completeness** ``(m_clean - m_without) / (m_clean - m_empty)``: the fraction of the
  behaviour lost when the circuit's own edges are removed from the full model (the rest
  kept). 1: nothing outside the circuit carries the behaviour; near 0: the rest of the
  model does it without the circuit (backups, redundant heads), the failure that Wang et
  al. 2022's completeness criterion looks for.

>>> import torch, transformers
>>> from interventions.recipes import Metric
>>> from interventions.circuits.edges import all_edges
>>> from interventions.architectures import describe
>>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20)
>>> torch.manual_seed(0); model = transformers.GPT2LMHeadModel(cfg).eval()  # doctest: +ELLIPSIS
<...>
>>> whole = Circuit(tuple(all_edges(describe(model))), (1.0,) * 13)
>>> m = Metric.logit_diff(5, 7)
>>> round(faithfulness(model, whole, [[1, 2, 3]], [[1, 4, 3]], m), 4)
1.0
>>> round(completeness(model, whole, [[1, 2, 3]], [[1, 4, 3]], m), 4)
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interventions.architectures import describe
from interventions.circuits.acdc import check_pair, metric_value
from interventions.circuits.circuit import Ablation, Circuit, ablation_op
from interventions.circuits.edges import all_edges
from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.metrics import Metric

__all__ = ["CircuitScores", "completeness", "faithfulness", "score_circuit"]


@dataclass(frozen=True)
class CircuitScores:
    """Metric values (batch means) of the clean run, the circuit alone, the model without
    the circuit's edges and the empty circuit; the two fractions from them."""

    clean: float
    circuit: float
    without: float
    empty: float

    @property
    def faithfulness(self) -> float:
        return (self.circuit - self.empty) / self._gap()

    @property
    def completeness(self) -> float:
        return (self.clean - self.without) / self._gap()

    def _gap(self) -> float:
        gap = self.clean - self.empty
        if abs(gap) < 1e-12:
            raise SpecError(
                "the metric is the same on the clean run and with every edge removed, so "
                "no fraction of it can be taken; pick inputs that differ"
            )
        return gap


def score_circuit(
    model: nn.Module,
    circuit: Circuit,
    clean: torch.Tensor | Sequence[Sequence[int]],
    corrupt: torch.Tensor | Sequence[Sequence[int]],
    metric: Metric,
    *,
    ablation: Ablation = "resample",
    pos: int = -1,
    backend: str = "torch",
    **run_options: Any,
) -> CircuitScores:
    """The four metric values of :class:`CircuitScores`, from one graph (four runs)."""
    ids, bad = check_pair(clean, corrupt, ablation)
    info = describe(model)
    every = all_edges(info)
    keep = set(circuit.edges)
    unknown = [str(e) for e in keep if e not in set(every)]
    if unknown:
        raise SpecError(f"edges not in this model: {', '.join(sorted(unknown)[:5])}")
    g = Graph()
    g.run("corrupt", tokens=bad)
    for name in ("clean", "circuit", "without", "empty"):
        g.run(name, tokens=ids).read("logits", pos=pos, name=name)
    for e in every:
        for name, removed in (("circuit", e not in keep), ("without", e in keep), ("empty", True)):
            if removed:
                g.add(ablation_op(info, e, name, ablation))
    res = run(g, model, backend=backend, **run_options)
    ref = res["clean"]
    values = {
        n: metric_value(metric, res[n], ref) for n in ("clean", "circuit", "without", "empty")
    }
    return CircuitScores(**values)


def faithfulness(
    model: nn.Module,
    circuit: Circuit,
    clean: torch.Tensor | Sequence[Sequence[int]],
    corrupt: torch.Tensor | Sequence[Sequence[int]],
    metric: Metric,
    *,
    ablation: Ablation = "resample",
    pos: int = -1,
    backend: str = "torch",
    **run_options: Any,
) -> float:
    """``(m_circuit - m_empty) / (m_clean - m_empty)``: see the module docstring."""
    return score_circuit(
        model,
        circuit,
        clean,
        corrupt,
        metric,
        ablation=ablation,
        pos=pos,
        backend=backend,
        **run_options,
    ).faithfulness


def completeness(
    model: nn.Module,
    circuit: Circuit,
    clean: torch.Tensor | Sequence[Sequence[int]],
    corrupt: torch.Tensor | Sequence[Sequence[int]],
    metric: Metric,
    *,
    ablation: Ablation = "resample",
    pos: int = -1,
    backend: str = "torch",
    **run_options: Any,
) -> float:
    """``(m_clean - m_without) / (m_clean - m_empty)``: see the module docstring."""
    return score_circuit(
        model,
        circuit,
        clean,
        corrupt,
        metric,
        ablation=ablation,
        pos=pos,
        backend=backend,
        **run_options,
    ).completeness
