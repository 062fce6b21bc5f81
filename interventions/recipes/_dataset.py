"""Datasets for the diagnostic recipes, in batches of equal-length prompts.

A dataset is token rows (a ``[N, seq]`` tensor or lists of ids of any lengths), texts
(tokenized one by one with the tokenizer), any iterable of either (a ``datasets``
column, a generator: read once) or, for a plain ``nn.Module``, an input tensor
``[N, ...]``. :func:`batches` yields each batch with the dataset indices of its rows, so a
recipe can put per-example values back in dataset order. Prompts are grouped by length so
that every run is an ordinary run of equal-length prompts whose reads are the tensors the
forward pass used (what gradients need). This is the one place to switch to the shared
streaming executor once it lands.

>>> [(b.indices, b.tokens.shape[1]) for b in batches([[1, 2], [3], [4, 5]], batch_size=8)]
[((0, 2), 2), ((1,), 1)]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions.errors import SpecError
from interventions.graph import Graph
from interventions.spec import RunHandle

Dataset = (
    torch.Tensor
    | Sequence[Sequence[int]]
    | Sequence[str]
    | Sequence[int]
    | str
    | Iterable[str]
    | Iterable[Sequence[int]]
)


@dataclass(frozen=True, eq=False)
class Batch:
    """Rows of a dataset: token ids ``[b, seq]`` (one length) or plain inputs ``[b, ...]``."""

    indices: tuple[int, ...]
    tokens: torch.Tensor | None = None
    inputs: torch.Tensor | None = None

    def add_run(self, graph: Graph, name: str) -> RunHandle:
        """Add a run of these rows to ``graph``."""
        if self.tokens is not None:
            return graph.run(name, tokens=self.tokens)
        return graph.run(name, inputs=self.inputs)


def token_rows(dataset: Dataset, tokenizer: Any) -> list[list[int]]:
    """Each prompt's token ids (texts tokenized one at a time, so no padding)."""
    if isinstance(dataset, str):
        dataset = [dataset]
    if isinstance(dataset, torch.Tensor):
        ids = dataset.long()
        return (ids.unsqueeze(0) if ids.ndim == 1 else ids).tolist()
    rows: list[Any] = list(dataset)
    if rows and all(isinstance(r, int) for r in rows):
        return [[int(r) for r in rows]]
    if rows and all(isinstance(r, str) for r in rows):
        if tokenizer is None:
            raise SpecError("text prompts need a tokenizer (tokenizer=, or a model name)")
        return [list(tokenizer(str(r))["input_ids"]) for r in rows]
    out = [[int(t) for t in r] for r in rows]
    if any(not r for r in out):
        raise SpecError("every prompt needs at least one token")
    return out


def dataset_size(dataset: Dataset, tokenizer: Any, *, plain: bool) -> int:
    if plain:
        assert isinstance(dataset, torch.Tensor)
        return int(dataset.shape[0])
    return len(token_rows(dataset, tokenizer))


def batches(
    dataset: Dataset, *, batch_size: int, tokenizer: Any = None, plain: bool = False
) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` rows; token rows grouped by length, in order.

    ``plain=True``: ``dataset`` is an input tensor for a plain ``nn.Module``, cut in order.
    """
    if batch_size < 1:
        raise SpecError(f"batch_size must be at least 1, got {batch_size}")
    if plain:
        if not isinstance(dataset, torch.Tensor):
            raise SpecError("a model with no architecture map takes a dataset of input tensors")
        for start in range(0, dataset.shape[0], batch_size):
            stop = min(start + batch_size, dataset.shape[0])
            yield Batch(tuple(range(start, stop)), inputs=dataset[start:stop])
        return
    rows = token_rows(dataset, tokenizer)
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(len(row), []).append(i)
    for length in sorted(by_length, key=lambda n: by_length[n][0]):
        idx = by_length[length]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            yield Batch(tuple(chunk), tokens=torch.tensor([rows[i] for i in chunk]))
