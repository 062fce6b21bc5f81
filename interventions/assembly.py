"""What the ragged pass produces, and how results are put back together in prompt order.

The pass (:mod:`interventions.ragged`) splits runs of prompts of different lengths into
parts; each read of the original graph becomes pieces, one per part, which
:func:`assemble` scatters back into prompt order, zero-padding positions and giving a
mask when the pieces differ in length. Plain data, so a remote job carries it as JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions.errors import ValidationError
from interventions.selection import take
from interventions.sites import Select, Site
from interventions.spec import GraphSpec


@dataclass(frozen=True)
class Part:
    """Rows of one original run that share a length: one run of the split graph, or (with
    ``width``) a group of rows of one right-padded forward holding every row of the run."""

    run: str
    rows: tuple[int, ...]  # rows of the original run, ascending
    length: int
    # set when the run is merged: its forward holds all rows of the original run (in their
    # own order) right-padded to ``width`` positions; the part's rows keep their indices
    width: int | None = None

    def local(self, rows: Sequence[int]) -> list[int]:
        """Indices in the part's forward of rows of the original run."""
        return list(rows) if self.width is not None else [self.rows.index(r) for r in rows]


@dataclass(frozen=True)
class Piece:
    """One read of the split graph, and which rows of the assembled result it fills.

    ``lengths`` (a read over whole positions of a merged, right-padded forward): each
    row's real positions; entries past them are padding, zeroed (and laid out on the
    assembly's side) when the pieces are put together.
    """

    name: str
    rows: tuple[int, ...]
    lengths: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Assembly:
    """How one result of the original graph is put together from pieces."""

    name: str
    pieces: tuple[Piece, ...]
    rows: int | None  # batch size of the result; None: no batch axis (a single piece)
    side: str  # "left" or "right": where padding goes when pieces differ in positions

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pieces": [
                [p.name, list(p.rows)]
                if p.lengths is None
                else [p.name, list(p.rows), list(p.lengths)]
                for p in self.pieces
            ],
            "rows": self.rows,
            "side": self.side,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Assembly:
        pieces = tuple(
            Piece(
                str(p[0]),
                tuple(int(r) for r in p[1]),
                None if len(p) < 3 else tuple(int(n) for n in p[2]),
            )
            for p in doc["pieces"]
        )
        rows = doc["rows"]
        return cls(str(doc["name"]), pieces, None if rows is None else int(rows), str(doc["side"]))


@dataclass(frozen=True)
class MeanSlot:
    """A placeholder constant to fill with a mean over a split source run's real tokens."""

    tensor: str  # key in the split graph's tensor table
    source: str  # the original source run
    site: Site
    per_position: bool
    length: int  # positions of the target part (per-position means)
    select: Select  # the ablated region within one row (pos, head, dims)


@dataclass(frozen=True)
class Split:
    """A graph without prompts of different lengths, and how to read its results back."""

    graph: GraphSpec
    parts: Mapping[str, tuple[Part, ...]]
    assemblies: tuple[Assembly, ...]
    internal: frozenset[str]  # names of the split graph that are not results
    means: tuple[MeanSlot, ...] = ()

    def assemble(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return assemble(self.assemblies, tensors, self.internal)


def assemble(
    assemblies: Sequence[Assembly],
    tensors: Mapping[str, torch.Tensor],
    internal: frozenset[str] | set[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The original results from the split graph's (and masks of the padded ones).

    >>> a = Assembly("x", (Piece("x#0", (1,)), Piece("x#1", (0,))), rows=2, side="right")
    >>> out, masks = assemble([a], {"x#0": torch.ones(1, 2), "x#1": torch.ones(1, 3)})
    >>> out["x"].tolist(), masks["x"].tolist()
    ([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], [[True, True, True], [True, True, False]])
    """
    out: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for a in assemblies:
        parts = [(p, _trimmed(p, tensors[p.name])) for p in a.pieces if p.name in tensors]
        used.update(p.name for p in a.pieces)
        if not parts:
            continue
        if a.rows is None:
            out[a.name] = parts[0][1]
            continue
        first = parts[0][1]
        shape = [a.rows, *(max(t.shape[d] for _, t in parts) for d in range(1, first.ndim))]
        padded = any(list(t.shape[1:]) != shape[1:] for _, t in parts) or any(
            p.lengths is not None and min(p.lengths) < shape[1] for p, _ in parts
        )
        whole = parts[0][0].rows == tuple(range(a.rows)) and list(first.shape) == shape
        if len(parts) == 1 and whole:  # one piece in order (a merged forward's read)
            piece = parts[0][0]
            if piece.lengths is None or not padded:
                out[a.name] = first
                continue
            real = _real(piece.lengths, shape[1], a.side)
            out[a.name] = _laid_out(first, piece.lengths, real, a.side)
            masks[a.name] = real
            continue
        result = first.new_zeros(shape)
        mask = torch.zeros(a.rows, shape[1] if padded and len(shape) > 1 else 0, dtype=torch.bool)
        for piece, t in parts:
            region: list[slice] = []
            for d in range(1, t.ndim):
                n, full = t.shape[d], shape[d]
                region.append(slice(full - n, full) if a.side == "left" else slice(0, n))
            rows = torch.tensor(piece.rows, dtype=torch.long)
            index: tuple[Any, ...] = (rows, *region)
            if piece.lengths is None:
                result[index] = t
                if padded:
                    mask[rows, region[0]] = True
                continue
            real = _real(piece.lengths, t.shape[1], a.side)
            result[index] = _laid_out(t, piece.lengths, real, a.side)
            if padded:
                mask[rows, region[0]] = real
        out[a.name] = result
        if padded:
            masks[a.name] = mask
    for name, t in tensors.items():
        if name not in used and name not in internal:
            out[name] = t
    return out, masks


def _trimmed(piece: Piece, t: torch.Tensor) -> torch.Tensor:
    """A piece with per-row lengths cut to its longest row's positions."""
    if piece.lengths is None:
        return t
    return t[:, : max(piece.lengths)]


def _real(lengths: Sequence[int], width: int, side: str) -> torch.Tensor:
    """``[rows, width]``: which positions hold real tokens once laid out on ``side``."""
    lens = torch.tensor(lengths, dtype=torch.long)[:, None]
    at = torch.arange(width)[None, :]
    return at >= width - lens if side == "left" else at < lens


def _laid_out(
    t: torch.Tensor, lengths: Sequence[int], real: torch.Tensor, side: str
) -> torch.Tensor:
    """Rows of a right-padded ``t`` (real positions first) with padding zeroed and, for
    ``side="left"``, each row shifted so that its padding comes first."""
    if side == "left":
        width = t.shape[1]
        shift = width - torch.tensor(lengths, dtype=torch.long)[:, None]
        index = (torch.arange(width)[None, :] - shift).clamp(min=0)
        index = index.reshape(*index.shape, *([1] * (t.ndim - 2))).expand(t.shape)
        t = t.gather(1, index.to(t.device))
    weights = real.to(t.device).reshape(*real.shape, *([1] * (t.ndim - 2)))
    return torch.where(weights, t, torch.zeros((), dtype=t.dtype, device=t.device))


def fill_means(split: Split, sources: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Write the means of a first pass into the split graph's placeholder constants.

    ``sources[run][str(site)]`` is the source run's whole site ``[batch, pos, ...]`` with
    rows left-aligned (zero beyond each prompt's length); the means count real tokens only.
    """
    for slot in split.means:
        x = sources[slot.source][str(slot.site)].float()
        n, width = x.shape[0], x.shape[1]
        lens = torch.full((n,), width)
        for part in split.parts.get(slot.source, ()):
            lens[list(part.rows)] = part.length
        real = (torch.arange(width)[None, :] < lens[:, None]).to(x.dtype)  # [batch, pos]
        weights = real.reshape(*real.shape, *([1] * (x.ndim - 2)))
        if slot.per_position:
            count = weights.sum(0)
            if slot.length > width or bool((count[: slot.length] == 0).any()):
                raise ValidationError(
                    f"per-position mean from run {slot.source!r}: its prompts have at most "
                    f"{width} tokens but a target prompt has {slot.length}"
                )
            full = ((x * weights).sum(0)[: slot.length] / count[: slot.length]).unsqueeze(0)
        else:
            mean = (x * weights).sum((0, 1)) / weights.sum((0, 1))
            full = mean.reshape(1, 1, *mean.shape).expand(1, slot.length, *mean.shape)
        axes = slot.site.kind.axes
        value = take(full, slot.select, axes)
        split.graph.tensors[slot.tensor] = value.contiguous().clone()


def assemblies_from(doc: Sequence[Mapping[str, Any]]) -> tuple[Assembly, ...]:
    return tuple(Assembly.from_dict(d) for d in doc)
