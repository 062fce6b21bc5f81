"""Run one graph on several backends and report how far each is from the reference.

This is how a result moved from one backend to another earns trust: per read, the
largest absolute and relative difference against the reference backend, flagged when it
exceeds the tolerance (the ``torch.testing.assert_close`` rule: ``|a - b| <= atol + rtol*|b|``).

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> _ = g.run("a", inputs=torch.ones(1, 2, 4)).read("output", name="y")
>>> report = iv.compare(g, torch.nn.Linear(4, 3), backends=["torch"])
>>> report.ok
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interventions.execute import run
from interventions.graph import Graph
from interventions.results import Results


@dataclass(frozen=True)
class Difference:
    """One read on one backend against the reference."""

    backend: str
    read: str
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    """Every backend's results and their differences from the reference backend."""

    reference: str
    atol: float
    rtol: float
    differences: tuple[Difference, ...]
    results: Mapping[str, Results]

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.differences)

    def failures(self) -> list[Difference]:
        return [d for d in self.differences if not d.ok]

    def __str__(self) -> str:
        width = max([len(d.read) for d in self.differences] + [4])
        lines = [
            f"against {self.reference!r} (atol={self.atol:g}, rtol={self.rtol:g})",
            f"{'backend':<8} {'read':<{width}} {'max abs':>10} {'max rel':>10}  ok",
        ]
        for d in self.differences:
            flag = "yes" if d.ok else "NO " + d.note
            lines.append(
                f"{d.backend:<8} {d.read:<{width}} {d.max_abs:>10.3g} {d.max_rel:>10.3g}  {flag}"
            )
        return "\n".join(lines)


def _difference(
    backend: str, name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float
) -> Difference:
    if got.shape != want.shape or got.dtype != want.dtype:
        return Difference(
            backend,
            name,
            float("inf"),
            float("inf"),
            False,
            f"(shape/dtype {list(got.shape)} {got.dtype} vs {list(want.shape)} {want.dtype})",
        )
    if not got.is_floating_point():
        same = bool(torch.equal(got, want))
        return Difference(
            backend, name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), same
        )
    a, b = got.double(), want.double()
    diff = (a - b).abs()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = diff / b.abs().clamp_min(torch.finfo(torch.float64).tiny)
    max_rel = float(rel.max()) if rel.numel() else 0.0
    ok = bool((diff <= atol + rtol * b.abs()).all()) and not bool(diff.isnan().any())
    return Difference(backend, name, max_abs, max_rel, ok)


def compare(
    graph: Graph,
    model: nn.Module | str,
    backends: Sequence[str] = ("torch", "nnsight", "pyvene"),
    *,
    reference: str = "torch",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    tokenizer: Any = None,
    **options: Any,
) -> Comparison:
    """Run ``graph`` on ``reference`` and each of ``backends``; compare every read.

    The reference runs first (and is added if not listed). Generated tokens must be equal.
    """
    names = [reference, *[b for b in backends if b != reference]]
    results: dict[str, Results] = {}
    for name in names:
        results[name] = run(graph, model, backend=name, tokenizer=tokenizer, **options)
    want = results[reference]
    differences: list[Difference] = []
    for name in names[1:]:
        got = results[name]
        for read in want:
            if read not in got:
                differences.append(
                    Difference(name, read, float("inf"), float("inf"), False, "(missing)")
                )
                continue
            differences.append(_difference(name, read, got[read], want[read], atol, rtol))
    return Comparison(reference, atol, rtol, tuple(differences), results)
