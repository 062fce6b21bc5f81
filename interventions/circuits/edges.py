"""Edges of a transformer's computational graph, as data, and the ops that patch them.

A node writes into the residual stream (the embeddings, each attention head, each MLP)
or reads from it (each head's query, key and value input, each MLP's input, the logits).
Every downstream input is the sum of the outputs of the nodes before it, plus biases; an
**edge** is one term of that sum. Patching an edge replaces that one term, in that one
input: :func:`edge_patch_op` builds the :class:`~interventions.ops.EdgePatch` op that
adds ``(upstream output in the source run - upstream output here)`` there.

Names: ``embed``, ``a{L}.h{H}`` (a head), ``m{L}`` (an MLP), ``logits``; an edge is
``a0.h1 -> a1.h2<q>`` (``<q>``, ``<k>``, ``<v>`` name the head's input). For ``<k>`` and
``<v>`` the head index counts key-value heads, the way the ``k_input`` site does (with
grouped-query attention a key-value head feeds several query heads).

>>> e = Edge(Node("head", 0, 1), Node("head", 1, 2), "q")
>>> str(e), parse_edge(str(e)) == e
('a0.h1 -> a1.h2<q>', True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

from interventions.architectures import ModelInfo
from interventions.errors import SpecError, UnknownArchitecture, choices_text
from interventions.ops import EdgeMethod, EdgePatch
from interventions.sites import Select, Site, Span

NodeKind = Literal["embed", "head", "mlp", "logits"]
NODE_KINDS: tuple[str, ...] = ("embed", "head", "mlp", "logits")
HeadInput = Literal["q", "k", "v"]
HEAD_INPUTS: tuple[str, ...] = ("q", "k", "v")


@dataclass(frozen=True, order=True)
class Node:
    """A node: ``embed``, ``head`` (layer, head), ``mlp`` (layer) or ``logits``.

    >>> str(Node("mlp", 3)), str(Node("embed"))
    ('m3', 'embed')
    """

    kind: NodeKind
    layer: int | None = None
    head: int | None = None
    # hashed once, from ints alone (the same in every process): circuits hash edges by the
    # ten thousand, and a dataclass's own hash rebuilds a tuple of its fields every time
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise SpecError(f"unknown node kind {self.kind!r}; kinds: {choices_text(NODE_KINDS)}")
        wants_layer, wants_head = self.kind in ("head", "mlp"), self.kind == "head"
        for name, wanted in (("layer", wants_layer), ("head", wants_head)):
            value = getattr(self, name)
            if wanted and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SpecError(f"node {self.kind!r} needs {name}= a non-negative int")
            if not wanted and value is not None:
                raise SpecError(f"node {self.kind!r} takes no {name}=")
        key = (NODE_KINDS.index(self.kind), _int(self.layer), _int(self.head))
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}"
        if self.kind == "mlp":
            return f"m{self.layer}"
        return self.kind


@dataclass(frozen=True, order=True)
class Edge:
    """``upstream -> downstream``; ``input`` says which of a head's inputs (q, k, v) it ends
    at, and is ``None`` for an MLP or the logits."""

    upstream: Node
    downstream: Node
    input: HeadInput | None = None
    _hash: int = field(init=False, repr=False, compare=False)  # as Node's

    def __post_init__(self) -> None:
        if self.upstream.kind == "logits" or self.downstream.kind == "embed":
            raise SpecError(f"edge {self}: logits are no upstream, embed is no downstream")
        if (self.downstream.kind == "head") != (self.input is not None):
            raise SpecError(
                f"edge {self}: input= ({choices_text(HEAD_INPUTS)}) is needed for a head "
                "downstream, and only there"
            )
        if self.input is not None and self.input not in HEAD_INPUTS:
            raise SpecError(f"edge input {self.input!r}; inputs: {choices_text(HEAD_INPUTS)}")
        if _order(self.upstream) >= _order(self.downstream, self.input is not None):
            raise SpecError(f"edge {self}: the upstream node does not come before the downstream")
        object.__setattr__(self, "_hash", _edge_hash(self.upstream, self.downstream, self.input))

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        tail = f"<{self.input}>" if self.input else ""
        return f"{self.upstream} -> {self.downstream}{tail}"


def _int(value: int | None) -> int:
    return -1 if value is None else value


def _order(node: Node, head_input: bool = False) -> float:
    """Forward position: where a node writes (or, for a head's inputs, reads)."""
    if node.kind == "embed":
        return -1.0
    if node.kind == "logits":
        return float("inf")
    assert node.layer is not None
    if node.kind == "head":
        return node.layer - (0.5 if head_input else 0.0) + 0.1
    return node.layer + 0.5


_NODE = re.compile(r"^(embed|logits|a(\d+)\.h(\d+)|m(\d+))$")
_EDGE = re.compile(r"^\s*(\S+)\s*->\s*([^<\s]+)(?:<([qkv])>)?\s*$")


def parse_node(text: str) -> Node:
    """A node from its name: ``embed``, ``a1.h2``, ``m0``, ``logits``.

    >>> parse_node("a1.h2")
    Node(kind='head', layer=1, head=2)
    """
    m = _NODE.match(text.strip())
    if m is None:
        raise SpecError(f"bad node name {text!r:.60}; expected embed, a<L>.h<H>, m<L> or logits")
    if m.group(2) is not None:
        return Node("head", int(m.group(2)), int(m.group(3)))
    if m.group(4) is not None:
        return Node("mlp", int(m.group(4)))
    return Node(m.group(1))  # type: ignore[arg-type]


def parse_edge(text: str) -> Edge:
    """An edge from its name, ``up -> down`` or ``up -> a1.h2<q>``."""
    m = _EDGE.match(text)
    if m is None:
        raise SpecError(f"bad edge name {text!r:.80}; expected 'up -> down' or 'up -> aL.hH<q>'")
    return Edge(parse_node(m.group(1)), parse_node(m.group(2)), m.group(3))  # type: ignore[arg-type]


def _check_model(info: ModelInfo) -> None:
    arch = info.arch
    if arch is None:
        raise UnknownArchitecture(
            f"circuits need an architecture map; {info.class_name} has none "
            "(register one with iv.register_architecture)"
        )
    if arch.mlp_norm is None or arch.attn_norm is None:
        raise SpecError(
            f"circuits need separate attention and MLP norms (attn_norm, mlp_norm); the "
            f"{arch.name} map has {'no mlp_norm' if arch.mlp_norm is None else 'no attn_norm'}"
            " (a parallel block: attention and MLP read one stream)"
        )


def _valid_edge(upstream: Node, downstream: Node, input: HeadInput | None) -> Edge:
    """An edge known to be valid, made without :meth:`Edge.__post_init__`'s checks (four
    times faster: :func:`all_edges` makes tens of thousands)."""
    edge = object.__new__(Edge)
    edge.__dict__.update(
        upstream=upstream,
        downstream=downstream,
        input=input,
        _hash=_edge_hash(upstream, downstream, input),
    )
    return edge


def _edge_hash(upstream: Node, downstream: Node, input: str | None) -> int:
    head_input = -1 if input is None else HEAD_INPUTS.index(input)
    return hash((upstream._hash, downstream._hash, head_input))


def all_edges(info: ModelInfo) -> list[Edge]:
    """Every edge of the model, downstream inputs in forward order (each head's q, k, v
    inputs, then the MLP, layer by layer, then the logits), upstreams in forward order.

    >>> import transformers
    >>> from interventions.architectures import describe
    >>> cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=8)
    >>> len(all_edges(describe(transformers.GPT2LMHeadModel(cfg))))
    46
    """
    _check_model(info)
    assert info.n_layers is not None and info.n_heads is not None
    n_kv = info.n_kv_heads or info.n_heads
    edges: list[Edge] = []
    ups: list[Node] = [Node("embed")]
    for layer in range(info.n_layers):
        for part in HEAD_INPUTS:
            for h in range(info.n_heads if part == "q" else n_kv):
                down = Node("head", layer, h)
                edges += [_valid_edge(u, down, part) for u in ups]  # type: ignore[arg-type]
        ups += [Node("head", layer, h) for h in range(info.n_heads)]
        mlp = Node("mlp", layer)
        edges += [_valid_edge(u, mlp, None) for u in ups]
        ups.append(mlp)
    logits = Node("logits")
    edges += [_valid_edge(u, logits, None) for u in ups]
    return edges


def all_nodes(info: ModelInfo) -> list[Node]:
    """Every node, in forward order."""
    _check_model(info)
    assert info.n_layers is not None and info.n_heads is not None
    nodes = [Node("embed")]
    for layer in range(info.n_layers):
        nodes += [Node("head", layer, h) for h in range(info.n_heads)] + [Node("mlp", layer)]
    return [*nodes, Node("logits")]


def upstream_site(info: ModelInfo, node: Node) -> Site:
    """Where a node's output is read: ``resid_pre`` at 0, ``head`` or ``mlp_out``."""
    if node.kind == "embed":
        return Site("resid_pre", 0)
    if node.kind == "head":
        return Site("head", node.layer)
    if node.kind == "mlp":
        return Site("mlp_out", node.layer)
    raise SpecError(f"node {node} writes nothing; upstream nodes: embed, heads, MLPs")


def downstream_site(info: ModelInfo, edge: Edge) -> tuple[Site, Select]:
    """Where an edge's downstream input is: a per-head input and its head, or the input of
    the MLP's norm or the final norm (raw ``.input`` sites, which leave the residual
    stream itself alone)."""
    _check_model(info)
    arch = info.arch
    assert arch is not None and arch.mlp_norm is not None
    down = edge.downstream
    if down.kind == "head":
        return Site(f"{edge.input}_input", down.layer), Select.make(head=down.head)
    if down.kind == "mlp":
        return Site(f"{arch.layers}.{down.layer}.{arch.mlp_norm}.input"), Select()
    return Site(f"{arch.final_norm}.input"), Select()


def edge_patch_op(
    info: ModelInfo,
    edge: Edge,
    run: str,
    *,
    method: EdgeMethod = "patch",
    source: str | None = None,
    rows: tuple[int, int] | None = None,
) -> EdgePatch:
    """The op that patches ``edge`` in ``run`` from ``source`` (``patch``), with zero, or
    with the source run's mean (``mean``). Add it with ``graph.add(op)``.

    ``rows=(a, b)``: only the run's rows ``a .. b``, a multiple of the source's rows for
    ``patch``, paired with them in turn (row ``a + i`` with the source's row ``i mod n``):
    one op for many candidates stacked in one run (ACDC's passes)."""
    site, select = downstream_site(info, edge)
    if rows is not None:
        select = replace(select, batch=Span(*rows))
    up = edge.upstream
    return EdgePatch(
        run,
        site,
        select,
        upstream_site(info, up),
        up.head if up.kind == "head" else None,
        method,
        source,
    )
