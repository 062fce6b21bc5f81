"""The data of the IOI reference model: names, templates, vocabulary, prompt pairs.

Re-exported by :mod:`interventions.reference_models.ioi` (see its docstring); import
from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interventions.sites import PerPrompt, per_prompt

# --------------------------------------------------------------------------- vocabulary

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "Sarah", "James", "Emma",
    "David", "Lucy", "Paul", "Anna", "Mark", "Kate", "Peter", "Laura",
    "Sam", "Julia", "Ben", "Rose", "Dan", "Nina", "Max", "Eva",
)  # fmt: skip


@dataclass(frozen=True)
class Template:
    """A prompt with three name slots; ``text`` uses ``{N1}``, ``{N2}``, ``{S2}``.

    Positions count ``<bos>`` as position 0.
    """

    text: str

    @property
    def words(self) -> tuple[str, ...]:
        return (BOS, *self.text.split())

    def _pos(self, slot: str) -> int:
        return self.words.index("{" + slot + "}")

    @property
    def n1(self) -> int:
        """Position of the first name (IO in ABB order, S1 in BAB order)."""
        return self._pos("N1")

    @property
    def n2(self) -> int:
        """Position of the second name."""
        return self._pos("N2")

    @property
    def s2(self) -> int:
        """Position of the repeated name (the only position where clean and corrupt differ)."""
        return self._pos("S2")

    @property
    def end(self) -> int:
        """The last position, whose next-token prediction is the answer."""
        return len(self.words) - 1

    @property
    def length(self) -> int:
        """Tokens in a prompt, ``<bos>`` included."""
        return len(self.words)

    def fill(self, n1: str, n2: str, s2: str) -> str:
        """The prompt text (without ``<bos>``)."""
        return self.text.format(N1=n1, N2=n2, S2=s2)


TEMPLATES: tuple[Template, ...] = (
    Template("when {N1} and {N2} went to the store , {S2} gave a drink to"),
    Template("then , {N1} and {N2} had a long and loud argument , afterwards {S2} said to"),
    Template("{N1} and {N2} went to the park . {S2} waved to"),
    Template("while {N1} and {N2} were at the office after a long day , {S2} sent an email to"),
    Template("{N1} and {N2} were talking . later , {S2} gave a gift to"),
)
"""The five templates: 15, 17, 12, 19 and 14 tokens long with ``<bos>``."""


def _vocab() -> tuple[str, ...]:
    words: list[str] = [PAD, BOS, UNK, *NAMES]
    for template in TEMPLATES:
        for word in template.words[1:]:
            if not word.startswith("{") and word not in words:
                words.append(word)
    return tuple(words)


VOCAB: tuple[str, ...] = _vocab()
_ID = {w: i for i, w in enumerate(VOCAB)}
_NAME_IDS = torch.tensor([_ID[n] for n in NAMES])

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class IOIBatch:
    """Names behind :func:`ioi_batch` or :func:`ioi_dataset` prompts (each ``[n]`` token ids)."""

    io: torch.Tensor
    s: torch.Tensor
    c: torch.Tensor
    abb: torch.Tensor
    """True where the order is ``IO .. S .. S`` (else ``S .. IO .. S``)."""
    template: torch.Tensor
    """Index into :data:`TEMPLATES` of each row."""


Prompts = tuple[tuple[int, ...], ...]


def _sample(
    n: int, generator: torch.Generator, tpl: torch.Tensor
) -> tuple[Prompts, Prompts, IOIBatch]:
    names = torch.stack([torch.randperm(len(NAMES), generator=generator)[:3] for _ in range(n)])
    io, s, c = (_NAME_IDS[names[:, k]] for k in range(3))
    abb = torch.rand(n, generator=generator) < 0.5
    clean, corrupt = [], []
    for row in range(n):
        t = TEMPLATES[int(tpl[row])]
        ids = [_ID.get(w, -1) for w in t.words]
        first, second = (io[row], s[row]) if abb[row] else (s[row], io[row])
        ids[t.n1], ids[t.n2], ids[t.s2] = int(first), int(second), int(s[row])
        clean.append(tuple(ids))
        ids[t.s2] = int(c[row])
        corrupt.append(tuple(ids))
    return tuple(clean), tuple(corrupt), IOIBatch(io, s, c, abb, tpl)


def _check_template(template: int) -> int:
    if isinstance(template, bool) or not isinstance(template, int):
        raise ValueError(f"template must be an int in 0..{len(TEMPLATES) - 1}, got {template!r}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}")
    return template


def ioi_batch(
    n: int, generator: torch.Generator, template: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(clean_ids, corrupt_ids, answer_ids, wrong_ids)`` for ``n`` prompts of one template.

    ``clean_ids`` and ``corrupt_ids`` are ``[n, TEMPLATES[template].length]`` and differ
    only at the template's ``s2`` position (the repeated name S in the clean prompt, a
    third name C in the corrupted one); ``answer_ids`` is IO and ``wrong_ids`` S, each
    ``[n]``.  Three distinct names per row and a random order (ABB or BAB).  The templates
    differ in length, so prompts of several templates come from :func:`ioi_dataset`.
    The output is a function of ``generator``'s state.

    >>> clean, corrupt, answer, wrong = ioi_batch(4, torch.Generator().manual_seed(0), 2)
    >>> clean.shape, answer.shape
    (torch.Size([4, 12]), torch.Size([4]))
    """
    tpl = torch.full((n,), _check_template(template), dtype=torch.long)
    clean, corrupt, info = _sample(n, generator, tpl)
    shape = (n, TEMPLATES[template].length)
    return (
        torch.tensor(clean, dtype=torch.long).reshape(shape),
        torch.tensor(corrupt, dtype=torch.long).reshape(shape),
        info.io,
        info.s,
    )


@dataclass(frozen=True, eq=False)
class IOIDataset:
    """Clean/corrupted IOI prompts of several templates (different lengths), from
    :func:`ioi_dataset`.

    ``clean[i]`` and ``corrupt[i]`` are the token ids of prompt ``i`` (``<bos>`` first),
    of the same length, different only at ``s2``; they go straight into a ragged run
    (``g.run("clean", tokens=data.clean)``).  ``s2`` and ``end`` are per-prompt position
    selectors (``pos=data.s2``), counted from each prompt's first token.
    """

    clean: Prompts
    corrupt: Prompts
    answer: torch.Tensor
    """IO, ``[n]``: the correct next token of every clean prompt."""
    wrong: torch.Tensor
    """S, ``[n]``."""
    info: IOIBatch

    @property
    def templates(self) -> tuple[Template, ...]:
        """The template of each prompt."""
        return tuple(TEMPLATES[int(t)] for t in self.info.template)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(p) for p in self.clean)

    @property
    def s2(self) -> PerPrompt:
        """Where each prompt has its repeated name (the only position that differs)."""
        return per_prompt([t.s2 for t in self.templates])

    @property
    def end(self) -> PerPrompt:
        """Each prompt's last position (the same tokens as ``pos=-1``)."""
        return per_prompt([t.end for t in self.templates])

    def subset(self, rows: Sequence[int]) -> IOIDataset:
        """The prompts ``rows``, in that order."""
        index = torch.tensor(list(rows), dtype=torch.long)
        info = IOIBatch(*(getattr(self.info, f)[index] for f in IOIBatch.__dataclass_fields__))
        return IOIDataset(
            tuple(self.clean[r] for r in rows),
            tuple(self.corrupt[r] for r in rows),
            self.answer[index],
            self.wrong[index],
            info,
        )

    def __len__(self) -> int:
        return len(self.clean)


def ioi_dataset(
    n: int, generator: torch.Generator, templates: Sequence[int] | None = None
) -> IOIDataset:
    """``n`` clean/corrupted prompt pairs spread evenly over ``templates`` (default: all),
    in a random order, with random names and name orders as in :func:`ioi_batch`.

    >>> data = ioi_dataset(5, torch.Generator().manual_seed(0))
    >>> sorted(data.lengths)
    [12, 14, 15, 17, 19]
    >>> data.s2.row(0) == data.templates[0].s2 and data.end.row(0) == data.lengths[0] - 1
    True
    """
    chosen = list(range(len(TEMPLATES))) if templates is None else list(templates)
    if not chosen:
        raise ValueError("ioi_dataset: templates= is empty")
    ids = torch.tensor([_check_template(t) for t in chosen], dtype=torch.long)
    tpl = ids[torch.randperm(n, generator=generator) % len(chosen)]
    clean, corrupt, info = _sample(n, generator, tpl)
    return IOIDataset(clean, corrupt, info.io, info.s, info)


def ioi_texts(ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
    """The prompts of ``ids`` as text (without ``<bos>``), one string per row."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return [" ".join(VOCAB[i] for i in row if VOCAB[i] != BOS) for row in rows]


def pad_right(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, last)``: ``prompts`` padded on the right with ``<pad>`` to ``[n, longest]``,
    and each prompt's last position.  A causal model without an attention mask gives every
    real token of a right-padded prompt the logits it gets alone (padding comes after it).

    >>> pad_right([[1, 5, 6], [1, 7]])
    (tensor([[1, 5, 6],
            [1, 7, 0]]), tensor([2, 1]))
    """
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), _ID[PAD], dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    return ids, torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
