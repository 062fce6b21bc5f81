"""The layout of a ragged batch: which rows run together, and in how many forwards.

:func:`interventions.ragged.split_graph` groups each split run's rows into parts
(:meth:`Prompts.groups`: one per length and choice of per-prompt positions) and runs
them either one run per part or, on a family in :data:`RIGHT_PADDING_EXACT` whose ops
allow it (:func:`mergeable`), as row groups of one right-padded forward, where the cost
estimate (:func:`merge_pays`) prefers that. :func:`placed` says where a part's positions
fall in the forward that runs it; :mod:`interventions.ragged_ops` rewrites the ops onto
that layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from interventions.architectures import ModelInfo
from interventions.assembly import Part
from interventions.errors import ValidationError
from interventions.ops import Ablate, Op, SAESplice
from interventions.sites import Index, PerPrompt, Site, Span
from interventions.spec import GraphSpec

# -- merged forwards --------------------------------------------------------------------

# Model families whose forward is exact under right padding with no attention mask: causal
# decoders with learned, rotary or ALiBi positions. A real token attends only to earlier
# positions, all of them real when the padding comes last, and position ids count from 0
# in every row, so each prompt's activations are those of the prompt run alone. Left out
# (they keep one forward per length): mixture-of-experts families (router sites count
# every token of the forward, padding too, and expert dispatch groups tokens across the
# batch), families with bidirectional or non-causal attention, unknown families and
# plain modules.
RIGHT_PADDING_EXACT = frozenset(
    {
        "gpt2",
        "gpt_neox",
        "gptj",
        "opt",
        "bloom",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "falcon",
    }
)

# What one forward pass costs beyond its arithmetic, per layer, in FLOPs of arithmetic
# (Python, dispatch and kernel launches): the cost estimate weighs it against the
# arithmetic that padding every row to the longest adds.
FORWARD_OVERHEAD = {"cpu": 1e8, "cuda": 1e10}


def right_padding_exact(model: Any, info: ModelInfo) -> bool:
    """Whether ``model``'s forward gives each row what it gives that row alone when rows are
    right-padded and no attention mask is passed (see :data:`RIGHT_PADDING_EXACT`).

    >>> import transformers
    >>> from interventions.architectures import describe
    >>> m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2))
    >>> right_padding_exact(m, describe(m))
    True
    """
    config = getattr(model, "config", None)
    if not info.is_hf or info.model_type not in RIGHT_PADDING_EXACT or config is None:
        return False
    if info.n_experts or getattr(config, "is_encoder_decoder", False):
        return False
    return not getattr(config, "use_bidirectional_attention", False)


def _first_position(pos: Index, length: int) -> int:
    """The earliest position (from a prompt's first token) a selector touches."""
    if pos is None:
        return 0
    if isinstance(pos, Span):
        idx = pos.indices(length)
        return min(idx) if idx else length
    items = [pos] if isinstance(pos, int) else list(pos)  # type: ignore[arg-type]
    return min((p if p >= 0 else length + p) for p in items) if items else length


def placed(pos: Index, part: Part) -> Index:
    """A part's positions (counted in its prompts' own tokens) in the forward that runs it.

    Unchanged for a part that is a run of its own. In a merged forward (``part.width``
    positions, real tokens first) positions are counted back from the forward's end, so
    that ops touching only final positions still let the logits be computed there only.

    >>> p = Part("r", (0, 2), length=3, width=5)
    >>> placed(-1, p), placed(0, p), placed(None, p), placed(Span(-2), p)
    (-3, -5, 0:3, -4:-2)
    """
    if part.width is None or isinstance(pos, PerPrompt):
        return pos
    n, w = part.length, part.width
    if pos is None:
        return None if n == w else Span(0, n)

    def one(p: int) -> int:
        if not -n <= p < n:
            raise ValidationError(f"pos={p} is past the end of a prompt of {n} tokens")
        return (p if p >= 0 else n + p) - w

    if isinstance(pos, int):
        return one(pos)
    if isinstance(pos, Span):
        idx = pos.indices(n)
        if not idx:
            return Span(0, 0)
        step = idx[1] - idx[0] if len(idx) > 1 else 1
        if step > 0:
            stop = idx[-1] + 1 - w
            return Span(idx[0] - w, stop if stop < 0 else None, None if step == 1 else step)
        return tuple(i - w for i in idx)
    return tuple(one(p) for p in pos)


# -- rows and parts --------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """Each run's prompts: token ids (rows left-aligned) and, for split runs, lengths."""

    graph: GraphSpec
    inputs: Mapping[str, torch.Tensor]
    lengths: Mapping[str, tuple[int, ...]]

    def n_rows(self, run: str) -> int:
        return int(self.inputs[run].shape[0])

    def length(self, run: str, row: int) -> int:
        if run in self.lengths:
            return self.lengths[run][row]
        t = self.inputs[run]
        return int(t.shape[1]) if t.ndim >= 2 else 1

    def split_runs(self) -> set[str]:
        out = set(self.lengths)
        out.update(op.run for op in self.graph.ops if isinstance(op.select.pos, PerPrompt))
        return out

    def groups(self, name: str) -> list[tuple[tuple[Any, ...], list[int]]]:
        """Rows of a run that share a length and every per-prompt position: (key, rows),
        by length; ``key[0]`` is the length."""
        per_prompt = [
            op for op in self.graph.ops if op.run == name and isinstance(op.select.pos, PerPrompt)
        ]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for row in range(self.n_rows(name)):
            key = (self.length(name, row), *(op.select.pos.row(row) for op in per_prompt))  # type: ignore[union-attr]
            groups.setdefault(key, []).append(row)
        return sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]))


def raw_pos(op: Op, part: Part) -> Index:
    """The op's positions for the part's prompts, counted in their own tokens."""
    pos = op.select.pos
    if isinstance(pos, PerPrompt):
        return pos.row(part.rows[0])
    return pos


# -- merged or split: the cost estimate ------------------------------------------------


def mergeable(graph: GraphSpec, name: str) -> bool:
    """Whether a run may be one right-padded forward: a token run that does not generate,
    whose ops (and the sites other runs take from it) are at standard sites with
    positions on axis 1 and no key positions."""
    run = graph.runs[name]
    if (run.tokens is None and run.text is None) or run.generates:
        return False
    sites: list[Site] = []
    for op in graph.ops:
        if op.run == name:
            sites.append(op.site)
            if isinstance(op, SAESplice) and op.source is not None:
                sites.append(op.source)
        if isinstance(op, Ablate) and op.source == name:
            sites.append(op.site)
    return all(
        not s.is_raw and s.kind.axes[:2] == ("batch", "pos") and "key_pos" not in s.kind.axes
        for s in sites
    )


def merge_pays(prompts: Prompts, info: ModelInfo | None, name: str, device: str) -> bool:
    """The cost estimate: one forward of every row padded to the longest, against one
    forward per part (each computing only the logits its ops need)."""
    from interventions.plan import _tail_length

    if info is None or None in (info.n_layers, info.d_model, info.vocab):
        return False
    layers, d, vocab = int(info.n_layers), int(info.d_model), int(info.vocab)  # type: ignore[arg-type]
    d_mlp = info.d_mlp or 4 * d
    groups = prompts.groups(name)
    width = max(int(key[0]) for key, _ in groups)
    logit_ops = [op for op in prompts.graph.ops if op.run == name and op.site.name == "logits"]
    full_logits = any(isinstance(op, Ablate) for op in logit_ops) or any(
        isinstance(op, Ablate) and op.source == name and op.site.name == "logits"
        for op in prompts.graph.ops
    )

    def flops(rows: int, length: int, keep: int) -> float:
        per_token = 2 * layers * (4 * d * d + 2 * d * d_mlp + 2 * d * length)
        return layers * FORWARD_OVERHEAD.get(device, FORWARD_OVERHEAD["cuda"]) + rows * (
            length * per_token + keep * 2 * d * vocab
        )

    split, first = 0.0, width
    for key, rows in groups:
        length = int(key[0])
        part = Part(name, tuple(rows), length)
        tails = [_tail_length(raw_pos(op, part)) for op in logit_ops]
        known = [t for t in tails if t is not None]
        keep = 1 if not tails else length if full_logits or len(known) < len(tails) else max(known)
        split += flops(len(rows), length, keep)
        for op in logit_ops:
            absolute = _first_position(raw_pos(op, part), length)
            first = min(first, absolute)
    merged_keep = width if full_logits else (width - first if logit_ops else 1)
    return flops(prompts.n_rows(name), width, max(merged_keep, 1)) <= split
