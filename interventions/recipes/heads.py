"""Head detectors: previous-token, duplicate-token and induction scores per head.

Scores are mean attention weights read from ``attn_pattern`` (so any backend that can read
attention patterns runs them). On any token sequence, for a query at position ``i``:

* previous-token: attention to ``i - 1``;
* duplicate-token: attention to the previous occurrence ``j`` of the same token;
* induction: attention to ``j + 1``, the token that followed that occurrence.

The default input is a batch of random token sequences repeated twice, where every
second-half position has a previous occurrence.

Two conventions (``convention=``), which differ in what they count and divide by:

=====================  ==========================  ====================================
                       ``"interventions"``         ``"transformer_lens"``
                       (default)                   (``transformer_lens.head_detector``)
=====================  ==========================  ====================================
queries averaged       those with a target: every  all positions: the attention on the
                       ``i >= 1`` (previous), every  targets, summed over every query,
                       ``i`` with an earlier         divided by the pattern's total
                       occurrence (dup., ind.)       (one per query), per sequence
earlier occurrences    the last one only           every one
batch                  mean over all queries       mean of per-sequence scores
perfect induction      1.0                         (queries with a target) / seq:
head, ``2 x half``                                 0.5 (0.476 with a BOS, half=10)
=====================  ==========================  ====================================

The default reads as "how much of its attention does a head put where the mechanism
says, when it has somewhere to put it"; TransformerLens's score is lower by the share of
queries that have no target, so its numbers depend on the sequence layout.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=2,
...     hidden_size=16, intermediate_size=8, vocab_size=32)).eval()
>>> scores = head_scores(model, half=5, batch=2)
>>> scores.induction.shape
torch.Size([2, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError, choices_text
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.inputs import Tokens, _model, as_tokens

Convention = Literal["interventions", "transformer_lens"]
CONVENTIONS: tuple[str, ...] = ("interventions", "transformer_lens")


@dataclass(frozen=True, eq=False)
class HeadScores:
    """``[layers, heads]`` scores of each detector, and the tokens they were measured on."""

    previous: torch.Tensor
    duplicate: torch.Tensor
    induction: torch.Tensor
    tokens: torch.Tensor

    def top(self, which: str, k: int = 3) -> list[tuple[int, int, float]]:
        """The ``k`` best heads for a detector, as (layer, head, score)."""
        scores = getattr(self, which)
        flat = scores.flatten().topk(k)
        n_heads = scores.shape[1]
        return [
            (int(i) // n_heads, int(i) % n_heads, float(v))
            for v, i in zip(flat.values, flat.indices, strict=True)
        ]


def repeated_random_tokens(
    vocab: int, half: int, batch: int, seed: int = 0, bos: int | None = None
) -> torch.Tensor:
    """``[batch, (1 +) 2*half]``: distinct random tokens, twice (after ``bos`` if given)."""
    if half < 2 or half > vocab - 1:
        raise SpecError(f"half must be in 2..{vocab - 1}, got {half}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        choices = torch.tensor([t for t in range(vocab) if t != bos])
        seq = choices[torch.randperm(len(choices), generator=g)[:half]]
        row = torch.cat([seq, seq])
        rows.append(torch.cat([torch.tensor([bos]), row]) if bos is not None else row)
    return torch.stack(rows)


def _previous_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """For each position, the last earlier position holding the same token, else -1."""
    batch, seq = tokens.shape
    out = torch.full((batch, seq), -1, dtype=torch.long)
    for b in range(batch):
        last: dict[int, int] = {}
        for i, t in enumerate(tokens[b].tolist()):
            out[b, i] = last.get(t, -1)
            last[t] = i
    return out


def scores_from_patterns(
    patterns: torch.Tensor, tokens: torch.Tensor, convention: Convention = "interventions"
) -> tuple[torch.Tensor, ...]:
    """Detector scores ``[heads]`` from one layer's patterns ``[batch, heads, q, k]``.

    >>> p = torch.tensor([[[[1.0, 0, 0], [1, 0, 0], [0, 1, 0]]]])  # a previous-token head
    >>> scores_from_patterns(p, torch.tensor([[4, 5, 6]]))[0].tolist()  # previous-token
    [1.0]
    >>> round(float(scores_from_patterns(p, torch.tensor([[4, 5, 6]]), "transformer_lens")[0]), 4)
    0.6667
    """
    if convention == "transformer_lens":
        return _transformer_lens_scores(patterns, tokens)
    if convention != "interventions":
        raise SpecError(f"unknown convention {convention!r}; expected {choices_text(CONVENTIONS)}")
    batch, _, seq, _ = patterns.shape
    prev = patterns[:, :, torch.arange(1, seq), torch.arange(0, seq - 1)].mean(dim=(0, 2))
    occurrence = _previous_occurrence(tokens)
    dup_terms, ind_terms = [], []
    for b in range(batch):
        queries = (occurrence[b] >= 0).nonzero().flatten()
        keys = occurrence[b, queries]
        if len(queries):
            dup_terms.append(patterns[b, :, queries, keys])
            ind_terms.append(patterns[b, :, queries, keys + 1])  # keys + 1 <= queries
    dup = torch.cat(dup_terms, dim=-1).mean(-1) if dup_terms else torch.zeros(patterns.shape[1])
    ind = torch.cat(ind_terms, dim=-1).mean(-1) if ind_terms else torch.zeros(patterns.shape[1])
    return prev, dup, ind


def _transformer_lens_scores(
    patterns: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """TransformerLens's ``"mul"`` detector: per sequence, the attention on a 0/1 target
    mask summed over every (query, key) and divided by the pattern's sum; then the batch
    mean. Duplicate targets are *every* earlier occurrence; induction targets the key
    after each of them."""
    seq = patterns.shape[-1]
    below = torch.ones(seq, seq).tril(-1).bool()  # key strictly before query
    previous = torch.zeros(seq, seq, dtype=torch.bool)
    previous[torch.arange(1, seq), torch.arange(seq - 1)] = True
    same = tokens[:, :, None] == tokens[:, None, :]  # [batch, q, k]
    duplicate = same & below
    induction = torch.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]  # key j + 1 for each earlier occurrence j
    total = patterns.sum(dim=(-2, -1))  # [batch, heads]

    def score(mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(patterns.dtype)
        if mask.ndim == 2:
            mask = mask.expand(patterns.shape[0], seq, seq)
        hits = (patterns * mask[:, None]).sum(dim=(-2, -1))
        return (hits / total).mean(0)

    return score(previous), score(duplicate), score(induction)


def head_scores(
    model: nn.Module | str,
    tokens: Tokens | None = None,
    *,
    half: int = 10,
    batch: int = 8,
    seed: int = 0,
    bos: int | None = None,
    convention: Convention = "interventions",
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head, in the
    package's convention (default) or TransformerLens's (``convention="transformer_lens"``;
    the module docstring has the table of differences)."""
    if convention not in CONVENTIONS:
        raise SpecError(f"unknown convention {convention!r}; expected {choices_text(CONVENTIONS)}")
    model, tokenizer = _model(model, tokenizer, run_options)
    info = describe(model)
    if info.n_layers is None or info.vocab is None:
        raise SpecError("head detectors need a model with an architecture map")
    ids = (
        repeated_random_tokens(info.vocab, half, batch, seed, bos)
        if tokens is None
        else as_tokens(tokens, tokenizer, "heads")
    )
    g = Graph()
    r = g.run("heads", tokens=ids)
    for layer in range(info.n_layers):
        r.read("attn_pattern", layer=layer, name=f"pattern.{layer}")
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    per_layer = [
        scores_from_patterns(res[f"pattern.{layer}"].float(), ids, convention)
        for layer in range(info.n_layers)
    ]
    prev, dup, ind = (torch.stack([s[i] for s in per_layer]) for i in range(3))
    return HeadScores(prev, dup, ind, ids)
