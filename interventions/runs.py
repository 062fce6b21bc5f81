"""One run of a graph: its inputs (token rows of any lengths, text, a tensor) and how it
generates (greedy or :class:`Sampling`), checked when it is made.

>>> token_rows("r", [[1, 2, 3], [4, 5]], None)[1].tolist()  # lengths, when they differ
[3, 2]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interventions.errors import SpecError, check_name, choices_text, excerpt


@dataclass(frozen=True)
class Sampling:
    """Sampled (not greedy) generation: ``temperature``, optional ``top_k`` / ``top_p``
    filters, and the ``seed`` that makes it repeatable (the same tokens on every local
    backend for the same seed; the global random state is left as it was).

    >>> Sampling(temperature=0.7, top_p=0.9, seed=1)
    Sampling(temperature=0.7, top_k=None, top_p=0.9, seed=1)
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t <= 100:
            raise SpecError(f"sampling temperature must be a number in (0, 100], got {t!r:.40}")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise SpecError(f"sampling top_k must be a positive int, got {k!r:.40}")
        if p is not None and (
            not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1
        ):
            raise SpecError(f"sampling top_p must be in (0, 1], got {p!r:.40}")
        seed = self.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise SpecError(f"sampling seed must be an int in 0..2**63-1, got {seed!r:.40}")
        object.__setattr__(self, "temperature", float(t))
        if p is not None:
            object.__setattr__(self, "top_p", float(p))


@dataclass(frozen=True)
class Run:
    """One forward pass (or one greedy ``generate`` call) over named inputs."""

    name: str
    tokens: str | None = None  # key of an int64 [batch, seq] tensor
    text: tuple[str, ...] | None = None  # tokenized with the model's tokenizer
    inputs: str | None = None  # key of a tensor passed positionally (plain nn.Module)
    max_new_tokens: int | None = None  # set: greedy generation of this many tokens
    # prompts of different lengths given as ids: key of an int64 [batch] tensor of each
    # prompt's length; ``tokens`` then holds them left-aligned, zero-filled on the right
    lengths: str | None = None
    # how results over whole positions of prompts of different lengths are laid out
    # ("left": padding first; "right": padding last; None: the tokenizer's side, else right)
    padding_side: str | None = None
    sampling: Sampling | None = None  # generation samples instead of decoding greedily

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or not is_name(self.name):
            raise SpecError(
                f"run name {excerpt(self.name)}: use letters, digits, '_', '-' and '.' "
                "(not empty, at most 200)"
            )
        check_name(self.tokens, f"run {self.name!r} tokens key")
        check_name(self.inputs, f"run {self.name!r} inputs key")
        check_name(self.lengths, f"run {self.name!r} lengths key")
        given = [k for k in ("tokens", "text", "inputs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SpecError(
                f"run {self.name!r} needs exactly one of tokens=, text=, inputs=; got "
                f"{choices_text(given) or 'none'}"
            )
        if self.text is not None and (
            not self.text or not all(isinstance(t, str) and t for t in self.text)
        ):
            raise SpecError(f"run {self.name!r}: text must be a non-empty string or list of them")
        if self.max_new_tokens is not None and (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or not 1 <= self.max_new_tokens <= 100_000
        ):
            raise SpecError(
                f"run {self.name!r}: max_new_tokens must be an int in 1..100000, "
                f"got {self.max_new_tokens!r}"
            )
        if self.max_new_tokens is not None and self.inputs is not None:
            raise SpecError(f"run {self.name!r}: generation needs tokens= or text=, not inputs=")
        if self.sampling is not None and (
            not isinstance(self.sampling, Sampling) or self.max_new_tokens is None
        ):
            raise SpecError(f"run {self.name!r}: sampling needs max_new_tokens= (generation)")
        if self.lengths is not None and self.tokens is None:
            raise SpecError(f"run {self.name!r}: lengths go with tokens=")
        if self.padding_side not in (None, "left", "right"):
            raise SpecError(
                f"run {self.name!r}: padding_side must be 'left' or 'right', got "
                f"{self.padding_side!r:.40}"
            )

    @property
    def generates(self) -> bool:
        return self.max_new_tokens is not None


def sampling_from(
    temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None
) -> Sampling | None:
    if temperature is None and top_k is None and top_p is None and seed is None:
        return None
    return Sampling(
        1.0 if temperature is None else temperature, top_k, top_p, 0 if seed is None else seed
    )


def token_rows(
    name: str, tokens: Any, attention_mask: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids as int64 ``[batch, seq]``, and each prompt's length when they differ
    (the rows then left-aligned and zero-filled)."""
    rows: list[list[int]] | None = None
    ids: torch.Tensor | None = None
    if isinstance(tokens, torch.Tensor):
        ids = tokens
    elif (
        isinstance(tokens, Sequence)
        and tokens
        and all(isinstance(t, (Sequence, torch.Tensor)) and not isinstance(t, str) for t in tokens)
    ):
        rows = []
        for i, row in enumerate(tokens):
            values = row.tolist() if isinstance(row, torch.Tensor) else list(row)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise SpecError(f"run {name!r}: prompt {i}: token ids must be ints")
            rows.append(values)
    else:
        try:
            ids = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(
                f"run {name!r}: tokens must be ids: [seq], [batch, seq] or a list of prompts; {exc}"
            ) from None
    if ids is not None:
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise SpecError(f"run {name!r}: tokens must be integer ids, got {ids.dtype}")
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2 or ids.numel() == 0:
            raise SpecError(
                f"run {name!r}: tokens must be [seq] or [batch, seq], got {list(ids.shape)}"
            )
        ids = ids.to(torch.long)
        if attention_mask is None:
            return ids, None
        rows = _unpad(name, ids, attention_mask)
    assert rows is not None
    for i, row in enumerate(rows):
        if not row:
            raise SpecError(f"run {name!r}: prompt {i} is empty; every prompt needs a token")
    ids, lengths = padded(rows)
    return ids, None if lengths is None else torch.tensor(lengths, dtype=torch.long)


def padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """Rows left-aligned and zero-filled, and their lengths when they differ.

    >>> padded([[1, 2, 3], [4]])
    (tensor([[1, 2, 3],
            [4, 0, 0]]), (3, 1))
    """
    lengths = tuple(len(r) for r in rows)
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, (lengths if len(set(lengths)) > 1 else None)


def _unpad(name: str, ids: torch.Tensor, attention_mask: Any) -> list[list[int]]:
    """The real tokens of each row of padded ids (left or right padding)."""
    mask = torch.as_tensor(attention_mask)
    if mask.ndim == 1:
        mask = mask.unsqueeze(0)
    if mask.shape != ids.shape:
        raise SpecError(
            f"run {name!r}: attention_mask has shape {list(mask.shape)} but tokens have "
            f"{list(ids.shape)}"
        )
    if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
        raise SpecError(f"run {name!r}: attention_mask must hold 0s and 1s")
    rows = []
    for i in range(ids.shape[0]):
        real = mask[i].nonzero().flatten()
        if real.numel() == 0:
            raise SpecError(f"run {name!r}: prompt {i} is empty (its attention_mask is all 0)")
        first, last = int(real[0]), int(real[-1])
        if last - first + 1 != real.numel():
            raise SpecError(
                f"run {name!r}: prompt {i}: attention_mask has a gap; only left or right "
                "padding is understood"
            )
        rows.append(ids[i, first : last + 1].tolist())
    return rows


def check_lengths(run: Run, ids: torch.Tensor, lengths: torch.Tensor) -> None:
    if (
        lengths.dtype != torch.long
        or lengths.ndim != 1
        or ids.ndim != 2
        or lengths.shape[0] != ids.shape[0]
    ):
        raise SpecError(
            f"run {run.name!r}: lengths must be int64 [batch] beside tokens [batch, seq]; got "
            f"{lengths.dtype} {list(lengths.shape)} and {list(ids.shape)}"
        )
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
        raise SpecError(
            f"run {run.name!r}: each prompt's length must be in 1..{ids.shape[1]}, got "
            f"{int(lengths.min())}..{int(lengths.max())}"
        )


def is_name(name: str) -> bool:
    return len(name) <= 200 and all(c.isalnum() or c in "_-.:/[]#" for c in name)
