"""A circuit as a PNG picture: nodes layered left to right, edge width by ``|score|``.

Columns: the embeddings, then per layer its heads (stacked) and its MLP, then the
logits. An edge is a line from its upstream node to its downstream node, as wide as its
share of the largest ``|score|``, coloured by the input it ends at (a head's ``q``, ``k``,
``v``, or an MLP's or the logits' input); blue for a positive score, red for a negative
one shows as a solid or dashed line. Needs matplotlib (the ``plots`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from interventions.circuits.edges import Edge, Node
from interventions.plots import _pyplot

COLORS = {"q": "tab:blue", "k": "tab:orange", "v": "tab:green", None: "tab:gray"}


def node_xy(node: Node, n_heads: int) -> tuple[float, float]:
    """Where a node sits: ``x`` by layer (heads, then the MLP), ``y`` by head.

    >>> node_xy(Node("head", 1, 2), 4), node_xy(Node("embed"), 4)
    ((3.0, 1.0), (0.0, 1.5))
    """
    middle = (n_heads - 1) / 2
    if node.kind == "embed":
        return 0.0, middle
    if node.kind == "head":
        assert node.layer is not None and node.head is not None
        return 1.0 + 2 * node.layer, float(n_heads - 1 - node.head)
    if node.kind == "mlp":
        assert node.layer is not None
        return 2.0 + 2 * node.layer, middle
    return -1.0, middle  # the logits: placed by the caller, after the last layer


def draw_circuit(
    edges: Sequence[Edge],
    scores: Sequence[float],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> Path:
    """Write the edges as a layered picture to ``path`` (PNG); return the path.

    >>> import tempfile, os
    >>> from interventions.circuits.edges import parse_edge
    >>> p = draw_circuit([parse_edge("embed -> a0.h1<k>"), parse_edge("a0.h1 -> logits")],
    ...                  [0.5, -2.0], os.path.join(tempfile.mkdtemp(), "c.png"))
    >>> p.stat().st_size > 0
    True
    """
    plt = _pyplot()
    nodes = {n for e in edges for n in (e.upstream, e.downstream)}
    layers = [n.layer for n in nodes if n.layer is not None]
    heads = [n.head for n in nodes if n.head is not None]
    n_layers = n_layers if n_layers is not None else (max(layers) + 1 if layers else 0)
    n_heads = n_heads if n_heads is not None else (max(heads) + 1 if heads else 1)
    logits_x = 1.0 + 2 * n_layers

    def xy(node: Node) -> tuple[float, float]:
        x, y = node_xy(node, n_heads)
        return (logits_x, y) if node.kind == "logits" else (x, y)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * (logits_x + 1)), max(3.0, 0.9 * n_heads + 1)))
    top = max((abs(s) for s in scores), default=1.0) or 1.0
    for e, s in sorted(zip(edges, scores, strict=True), key=lambda p: abs(p[1])):
        (x0, y0), (x1, y1) = xy(e.upstream), xy(e.downstream)
        ax.annotate(
            "",
            xy=(x1 - 0.12, y1),
            xytext=(x0 + 0.12, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "color": COLORS[e.input],
                "lw": 0.4 + 5.0 * abs(s) / top,
                "ls": "-" if s >= 0 else "--",
                "alpha": 0.85,
                "shrinkA": 0,
                "shrinkB": 0,
                "connectionstyle": "arc3,rad=0.08",
            },
        )
    for node in nodes:
        x, y = xy(node)
        ax.text(
            x,
            y,
            str(node),
            ha="center",
            va="center",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "black", "lw": 0.8},
        )
    for inp, color in COLORS.items():
        ax.plot([], [], color=color, lw=2, label=f"<{inp}>" if inp else "mlp/logits in")
    ax.legend(loc="upper left", fontsize=7, frameon=False, bbox_to_anchor=(1.0, 1.0))
    ax.set_xlim(-0.6, logits_x + 0.6)
    ax.set_ylim(-0.7, n_heads - 0.3)
    ax.set_xticks(
        [0.0, *[1.0 + 2 * layer for layer in range(n_layers)], logits_x],
        labels=["embed", *[f"layer {layer}" for layer in range(n_layers)], "logits"],
        fontsize=8,
    )
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(f"{title}: {len(edges)} edges", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
