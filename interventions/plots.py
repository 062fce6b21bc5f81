"""Pictures of results, one call each, written as PNG (needs matplotlib: the ``plots`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from interventions.errors import InterventionError


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError as exc:
        raise InterventionError(
            "pictures need matplotlib: pip install 'interventions[plots]'"
        ) from exc
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def heatmap(
    values: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    xlabel: str = "position",
    ylabel: str = "layer",
    center: float | None = 0.0,
    colorbar_label: str = "",
) -> Path:
    """Write a ``[rows, cols]`` tensor as a labelled heat map PNG; return its path.

    >>> import torch, tempfile, os
    >>> p = heatmap(torch.eye(2), os.path.join(tempfile.mkdtemp(), "h.png"),
    ...             row_labels=["a", "b"], col_labels=["x", "y"])
    >>> p.stat().st_size > 0
    True
    """
    plt = _pyplot()
    data = values.detach().float().cpu().numpy()
    if data.ndim != 2 or data.shape != (len(row_labels), len(col_labels)):
        raise InterventionError(
            f"heatmap: values {list(data.shape)} do not match {len(row_labels)} row and "
            f"{len(col_labels)} column labels"
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    width = max(4.0, 0.45 * len(col_labels) + 2.0)
    height = max(2.5, 0.4 * len(row_labels) + 1.5)
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    if center is not None:
        bound = float(max(abs(data.min() - center), abs(data.max() - center), 1e-9))
        image = ax.imshow(
            data, cmap="RdBu_r", vmin=center - bound, vmax=center + bound, aspect="auto"
        )
    else:
        image = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(
        range(len(col_labels)), labels=list(col_labels), rotation=60, ha="right", fontsize=8
    )
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def format_table(
    values: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    fmt: str = "{:+.2f}",
) -> str:
    """A ``[rows, cols]`` tensor as an aligned text table (for terminals and logs).

    >>> print(format_table(torch.tensor([[1.0, -0.5]]), ["L0"], ["a", "b"]))
          a     b
    L0 +1.00 -0.50
    """
    cells = [[fmt.format(float(v)) for v in row] for row in values.tolist()]
    width = max([len(c) for row in cells for c in row] + [len(c) for c in col_labels])
    head_width = max(len(r) for r in row_labels)
    lines = [" " * head_width + " " + " ".join(c.rjust(width) for c in col_labels)]
    for label, row in zip(row_labels, cells, strict=True):
        lines.append(label.ljust(head_width) + " " + " ".join(c.rjust(width) for c in row))
    return "\n".join(lines)
