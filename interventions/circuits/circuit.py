"""A circuit: scored edges of a model's computational graph, as a plain value.

It prints as one edge a line, best first, and saves to and loads from JSON (edges by
name, scores as numbers; no tensors, no pickle).

>>> from interventions.circuits.edges import parse_edge
>>> c = Circuit((parse_edge("embed -> m0"), parse_edge("m0 -> logits")), (0.5, -2.0), "eap")
>>> print(c)
Circuit(eap, 2 edges, 3 nodes)
  -2.0000  m0 -> logits
  +0.5000  embed -> m0
>>> Circuit.from_json(c.to_json()) == c, [str(e) for e in c.top(1).edges]
(True, ['m0 -> logits'])
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interventions.circuits.edges import Edge, Node, parse_edge
from interventions.errors import SpecError

FORMAT = "interventions.circuit/1"


@dataclass(frozen=True)
class Circuit:
    """Edges with one score each (``method``: how they were scored, e.g. ``eap``,
    ``eap_ig(steps=8)``); ``nodes`` are the nodes the edges touch, in forward order."""

    edges: tuple[Edge, ...]
    scores: tuple[float, ...]
    method: str = ""
    nodes: tuple[Node, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.scores):
            raise SpecError(
                f"a circuit needs one score per edge; got {len(self.edges)} edges and "
                f"{len(self.scores)} scores"
            )
        if len(set(self.edges)) != len(self.edges):
            raise SpecError("a circuit lists each edge once")
        for s in self.scores:
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise SpecError(f"circuit scores must be finite numbers, got {s!r}")
        touched = {n for e in self.edges for n in (e.upstream, e.downstream)}
        object.__setattr__(self, "nodes", tuple(sorted(touched, key=_forward)))

    def score(self, edge: Edge | str) -> float:
        """One edge's score."""
        key = parse_edge(edge) if isinstance(edge, str) else edge
        try:
            return self.scores[self.edges.index(key)]
        except ValueError:
            raise SpecError(f"edge {key} is not in this circuit") from None

    def ranked(self) -> list[tuple[Edge, float]]:
        """(edge, score), largest ``|score|`` first (ties in edge order)."""
        pairs = list(zip(self.edges, self.scores, strict=True))
        return sorted(pairs, key=lambda p: -abs(p[1]))

    def top(self, k: int) -> Circuit:
        """The ``k`` edges of largest ``|score|``."""
        if k < 0:
            raise SpecError(f"top(k): k must be non-negative, got {k}")
        return self._keep({e for e, _ in self.ranked()[:k]})

    def threshold(self, tau: float) -> Circuit:
        """The edges with ``|score| >= tau``."""
        return self._keep(
            {e for e, s in zip(self.edges, self.scores, strict=True) if abs(s) >= tau}
        )

    def _keep(self, keep: set[Edge]) -> Circuit:
        pairs = [(e, s) for e, s in zip(self.edges, self.scores, strict=True) if e in keep]
        return Circuit(tuple(e for e, _ in pairs), tuple(s for _, s in pairs), self.method)

    def __str__(self) -> str:
        head = f"Circuit({self.method}, {len(self.edges)} edges, {len(self.nodes)} nodes)"
        return "\n".join([head, *(f"  {s:+.4f}  {e}" for e, s in self.ranked())])

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "method": self.method,
            "edges": [[str(e), float(s)] for e, s in zip(self.edges, self.scores, strict=True)],
        }
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        doc: Any = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SpecError(f"not a circuit file: expected format {FORMAT!r}")
        rows = doc.get("edges")
        if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) for r in rows
        ):
            raise SpecError("circuit JSON: 'edges' must be a list of [edge name, score]")
        method = doc.get("method", "")
        if not isinstance(method, str):
            raise SpecError("circuit JSON: 'method' must be a string")
        return cls(tuple(parse_edge(r[0]) for r in rows), tuple(r[1] for r in rows), method)

    def save(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        out.write_text(self.to_json())
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Circuit:
        return cls.from_json(Path(path).read_text())


def _forward(node: Node) -> tuple[int, int, int]:
    rank = {"embed": 0, "head": 1, "mlp": 2, "logits": 3}[node.kind]
    if node.kind in ("embed", "logits"):
        return (-1 if node.kind == "embed" else 1 << 30, 0, 0)
    return (node.layer or 0, rank, node.head or 0)
