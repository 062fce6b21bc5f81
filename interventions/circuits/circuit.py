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

:meth:`Circuit.to_graph` gives the graph that runs the circuit alone: every edge of the
model outside it ablated (``resample``: patched from the corrupt run, row by row;
``mean``: the corrupt run's mean over prompts and positions; ``zero``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from interventions.architectures import ModelInfo, describe
from interventions.circuits.edges import Edge, Node, all_edges, edge_patch_op, parse_edge
from interventions.errors import SpecError, choices_text
from interventions.graph import Graph
from interventions.ops import EdgeMethod, EdgePatch

FORMAT = "interventions.circuit/1"
Ablation = Literal["resample", "mean", "zero"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)


def ablation_op(
    info: ModelInfo, edge: Edge, run: str, ablation: str, rows: tuple[int, int] | None = None
) -> EdgePatch:
    """The op that removes ``edge`` from ``run`` (from its ``rows`` alone, when given; see
    :func:`~interventions.circuits.edges.edge_patch_op`): patched from the run ``corrupt``
    (``resample``), set to that run's mean (``mean``) or zeroed (``zero``)."""
    if ablation not in ABLATIONS:
        raise SpecError(f"unknown ablation {ablation!r}; ablations: {choices_text(ABLATIONS)}")
    if ablation == "zero":
        return edge_patch_op(info, edge, run, method="zero", rows=rows)
    method: EdgeMethod = "patch" if ablation == "resample" else "mean"
    return edge_patch_op(info, edge, run, method=method, source="corrupt", rows=rows)


@dataclass(frozen=True)
class Circuit:
    """Edges with one score each (``method``: how they were scored, e.g. ``eap``,
    ``eap_ig(steps=8)``); ``nodes`` are the nodes the edges touch, in forward order."""

    edges: tuple[Edge, ...]
    scores: tuple[float, ...]
    method: str = ""
    stats: tuple[tuple[str, float], ...] = ()  # how it was found: e.g. ACDC's pass count
    nodes: tuple[Node, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.edges) != len(self.scores):
            raise SpecError(
                f"a circuit needs one score per edge; got {len(self.edges)} edges and "
                f"{len(self.scores)} scores"
            )
        # nodes are few and shared by many edges: hash each node object once, then the
        # edges as tuples of small ints (tens of thousands of dataclass hashes otherwise)
        by_id = {id(n): n for e in self.edges for n in (e.upstream, e.downstream)}
        number: dict[Node, int] = {}
        ids = {i: number.setdefault(n, len(number)) for i, n in by_id.items()}
        keys = {(ids[id(e.upstream)], ids[id(e.downstream)], e.input) for e in self.edges}
        if len(keys) != len(self.edges):
            raise SpecError("a circuit lists each edge once")
        for s in self.scores:
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise SpecError(f"circuit scores must be finite numbers, got {s!r}")
        for pair in self.stats:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not isinstance(pair[0], str)
                or not isinstance(pair[1], (int, float))
                or isinstance(pair[1], bool)
            ):
                raise SpecError(f"circuit stats are (name, number) pairs, got {pair!r}")
        object.__setattr__(self, "nodes", tuple(sorted(number, key=_forward)))

    def score(self, edge: Edge | str) -> float:
        """One edge's score."""
        key = parse_edge(edge) if isinstance(edge, str) else edge
        try:
            return self.scores[self.edges.index(key)]
        except ValueError:
            raise SpecError(f"edge {key} is not in this circuit") from None

    def stat(self, name: str) -> float:
        """One of the ``stats`` by name."""
        for key, value in self.stats:
            if key == name:
                return value
        raise SpecError(
            f"circuit has no stat {name!r}; stats: {choices_text([k for k, _ in self.stats])}"
        )

    def ranked(self) -> list[tuple[Edge, float]]:
        """(edge, score), largest ``|score|`` first (ties in edge order)."""
        pairs = list(zip(self.edges, self.scores, strict=True))
        return sorted(pairs, key=lambda p: -abs(p[1]))

    def top(self, k: int) -> Circuit:
        """The ``k`` edges of largest ``|score|``."""
        if k < 0:
            raise SpecError(f"top(k): k must be non-negative, got {k}")
        return self._keep({e for e, _ in self.ranked()[:k]})

    def greedy(self, k: int) -> Circuit:
        """``k`` edges that form whole paths, chosen greedily from the logits back
        (Hanna et al. 2024): the edge of largest ``|score|`` whose downstream node is
        already in the circuit (the logits at first), again and again; then edges out of
        nodes that nothing in the circuit feeds are pruned (so it may hold fewer).

        >>> c = Circuit(tuple(map(parse_edge, ["embed -> m0", "m0 -> logits", "m1 -> logits"])),
        ...             (1.0, 0.5, 3.0))
        >>> [str(e) for e in c.greedy(3).edges]  # m1 -> logits has no input: pruned
        ['embed -> m0', 'm0 -> logits']
        """
        if k < 0:
            raise SpecError(f"greedy(k): k must be non-negative, got {k}")
        chosen: set[Edge] = set()
        reached = {Node("logits")}
        ranked = self.ranked()
        while len(chosen) < k:
            pick = next((e for e, _ in ranked if e not in chosen and e.downstream in reached), None)
            if pick is None:
                break
            chosen.add(pick)
            reached.add(pick.upstream)
        while True:  # prune edges out of nodes nothing feeds (embed needs no input)
            fed = {Node("embed")} | {e.downstream for e in chosen}
            unfed = {e for e in chosen if e.upstream not in fed}
            if not unfed:
                break
            chosen -= unfed
        return self._keep(chosen)

    def threshold(self, tau: float) -> Circuit:
        """The edges with ``|score| >= tau``."""
        return self._keep(
            {e for e, s in zip(self.edges, self.scores, strict=True) if abs(s) >= tau}
        )

    def _keep(self, keep: set[Edge]) -> Circuit:
        pairs = [(e, s) for e, s in zip(self.edges, self.scores, strict=True) if e in keep]
        return Circuit(tuple(e for e, _ in pairs), tuple(s for _, s in pairs), self.method)

    def to_graph(
        self,
        model: nn.Module | ModelInfo,
        clean: Any,
        corrupt: Any = None,
        *,
        ablation: Ablation = "resample",
        pos: int | None = -1,
        run: str = "circuit",
    ) -> Graph:
        """A graph whose run ``run`` (on ``clean`` token ids) keeps this circuit's edges and
        removes every other edge of the model; it reads ``logits`` (at ``pos``) as ``run``.
        ``resample`` and ``mean`` take the removed edges from a run ``corrupt`` (token ids
        of the clean run's shape).

        >>> import transformers
        >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20)
        >>> model = transformers.GPT2LMHeadModel(cfg)
        >>> c = Circuit((parse_edge("a0.h1 -> logits"),), (1.0,))
        >>> g = c.to_graph(model, [[1, 2, 3]], [[1, 4, 3]])
        >>> list(g.runs), len(g.ops)  # 13 edges, 12 removed, one read
        (['corrupt', 'circuit'], 13)
        """
        info = model if isinstance(model, ModelInfo) else describe(model)
        every = all_edges(info)
        unknown = [str(e) for e in self.edges if e not in set(every)]
        if unknown:
            raise SpecError(f"edges not in this model: {', '.join(unknown[:5])}")
        if ablation not in ABLATIONS:
            raise SpecError(f"unknown ablation {ablation!r}; ablations: {choices_text(ABLATIONS)}")
        g = Graph()
        if ablation != "zero":
            if corrupt is None:
                raise SpecError(f"ablation {ablation!r} needs corrupt= token ids")
            g.run("corrupt", tokens=torch.as_tensor(corrupt))
        g.run(run, tokens=torch.as_tensor(clean)).read("logits", pos=pos, name=run)
        keep = set(self.edges)
        for e in every:
            if e not in keep:
                g.add(ablation_op(info, e, run, ablation))
        return g

    def draw(self, path: str | os.PathLike[str], **options: Any) -> Path:
        """A PNG picture (see :func:`interventions.circuits.draw.draw_circuit`)."""
        from interventions.circuits.draw import draw_circuit

        return draw_circuit(self.edges, self.scores, path, title=self.method, **options)

    def __str__(self) -> str:
        head = f"Circuit({self.method}, {len(self.edges)} edges, {len(self.nodes)} nodes)"
        stats = ", ".join(f"{k}={v:g}" for k, v in self.stats)
        lines = [head] + ([f"  ({stats})"] if stats else [])
        return "\n".join([*lines, *(f"  {s:+.4f}  {e}" for e, s in self.ranked())])

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "method": self.method,
            "edges": [[str(e), float(s)] for e, s in zip(self.edges, self.scores, strict=True)],
        }
        if self.stats:
            doc["stats"] = {k: float(v) for k, v in self.stats}
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
        stats = doc.get("stats", {})
        if not isinstance(stats, dict):
            raise SpecError("circuit JSON: 'stats' must be an object of numbers")
        return cls(
            tuple(parse_edge(r[0]) for r in rows),
            tuple(r[1] for r in rows),
            method,
            tuple((str(k), v) for k, v in stats.items()),
        )

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
