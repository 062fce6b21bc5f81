"""Head detectors: previous-token, duplicate-token and induction scores per head.

Scores are mean attention weights read from ``attn_pattern`` (so any backend that can read
attention patterns runs them). On any token sequence, for a query at position ``i``:

* previous-token: attention to ``i - 1``;
* duplicate-token: attention to the previous occurrence ``j`` of the same token;
* induction: attention to ``j + 1``, the token that followed that occurrence.

The default input is a batch of random token sequences repeated twice, where every
second-half position has a previous occurrence.

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
from typing import Any

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.patching import Tokens, _model, as_tokens


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


def scores_from_patterns(patterns: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Detector scores ``[heads]`` from one layer's patterns ``[batch, heads, q, k]``."""
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


def head_scores(
    model: nn.Module | str,
    tokens: Tokens | None = None,
    *,
    half: int = 10,
    batch: int = 8,
    seed: int = 0,
    bos: int | None = None,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> HeadScores:
    """Previous-token, duplicate-token and induction scores of every head."""
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
        scores_from_patterns(res[f"pattern.{layer}"].float(), ids) for layer in range(info.n_layers)
    ]
    prev, dup, ind = (torch.stack([s[i] for s in per_layer]) for i in range(3))
    return HeadScores(prev, dup, ind, ids)
