"""From a validated graph to what a backend executes: run order and concrete inputs.

The plan resolves everything that must be the same on every backend before any of them
runs: the order of runs, the token ids of text prompts, the position arithmetic of
generation, and the resample draws. Backends only execute it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from interventions.architectures import ModelInfo
from interventions.batching import Budget
from interventions.errors import SpecError, ValidationError
from interventions.ops import Ablate, EdgePatch, Grad, Op, Read, SAESplice, produces
from interventions.runs import padded
from interventions.sites import Index, PerPrompt, Select, Site, Span
from interventions.spec import GraphSpec, Run


@dataclass(frozen=True)
class Plan:
    """A graph ready to execute: runs in dependency order with their input tensors."""

    graph: GraphSpec
    info: ModelInfo
    order: tuple[str, ...]
    inputs: Mapping[str, torch.Tensor]  # run -> token ids [batch, seq] or a raw input tensor
    # bounds one forward pass when a backend merges runs itself (None: the user asked for
    # no batching, so the planner did not bound anything)
    budget: Budget | None = None
    # runs whose prompts differ in length: each prompt's length (``inputs`` holds them
    # left-aligned and zero-filled); the ragged pass splits such runs by length
    lengths: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    padding_side: str = "right"  # the tokenizer's, for results laid out over positions
    # how to put the results of a graph split by the ragged pass back together
    assembly: Any = None

    @functools.cached_property
    def producers(self) -> dict[str, Op]:
        """The op that produces each value name (reads, SAE features)."""
        return {name: op for op in self.graph.ops for name in produces(op)}

    def aligned(self, read: str) -> bool:
        """Whether value ``read`` is a read of its whole site, so a patch from it takes the
        same entries it writes (an aligned patch)."""
        source = self.producers.get(read)
        return isinstance(source, Read) and source.select.is_all

    def ops_of(self, run: str) -> list[Op]:
        return [op for op in self.graph.ops if op.run == run]

    def captures_of(self, run: str) -> list[Site]:
        """Sites of ``run`` whose full value another run's ablation or edge patch needs, or
        one of its own cross-site SAE splices reads (its ``source``, later in the same
        forward pass)."""
        return list(self._captures.get(run, ()))

    @functools.cached_property
    def _captures(self) -> dict[str, list[Site]]:
        """:meth:`captures_of` for every run, in one walk over the ops (backends ask per
        run and per hook)."""
        by_run: dict[str, list[Site]] = {}

        def add(run: str, site: Site) -> None:
            sites = by_run.setdefault(run, [])
            if site not in sites:
                sites.append(site)

        for op in self.graph.ops:
            if isinstance(op, Ablate) and op.source is not None:
                add(op.source, op.site)
            if isinstance(op, EdgePatch) and op.source is not None:
                add(op.source, op.upstream)
            if isinstance(op, SAESplice) and op.source is not None:
                add(op.run, op.source)
        return by_run

    def read_ops(self) -> dict[str, Read]:
        return {op.name: op for op in self.graph.ops if isinstance(op, Read)}

    def prompt_length(self, run: str) -> int:
        return int(self.inputs[run].shape[1]) if self.inputs[run].ndim >= 2 else 1

    def batch_size(self, run: str) -> int:
        return int(self.inputs[run].shape[0])

    def logits_to_keep(self, run: str) -> int | None:
        """How many final positions of ``run``'s logits its ops touch, when fewer than all.

        A HuggingFace forward then computes the unembedding only there
        (``logits_to_keep=k``), which is most of the cost of a small model's forward when
        a sweep reads the last position only. ``None`` means every position is needed:
        some op at the logits selects a non-negative or open-ended position, the run
        generates, is not a token run of a HuggingFace model, or touches a raw module site
        outside the blocks and the final norm (it could be the unembedding; the blocks and
        the final norm see every position whatever ``logits_to_keep`` is).

        Negative positions select the same entries in the kept tail as in the full
        tensor, so ops need no rewriting.
        """
        graph_run = self.graph.runs[run]
        if not self.info.is_hf or graph_run.generates or graph_run.inputs is not None:
            return None
        need = 0
        for op in self.ops_of(run):
            if op.site.is_raw and not self._before_unembedding(op.site):
                return None
            if isinstance(op, Grad):  # its metric reads the logits at metric_pos
                if op.metric_pos >= 0:
                    return None
                need = max(need, -op.metric_pos)
            if op.site.name != "logits":
                continue
            if isinstance(op, Ablate):
                return None
            tail = _tail_length(op.select.pos)
            if tail is None:
                return None
            need = max(need, tail)
        if any(
            site.name == "logits" or (site.is_raw and not self._before_unembedding(site))
            for site in self.captures_of(run)
        ):
            return None
        if need == 0:  # no op needs the logits: compute them at one position only
            return 1 if self.prompt_length(run) > 1 else None
        return need if need < self.prompt_length(run) else None

    def _before_unembedding(self, site: Site) -> bool:
        """Whether a raw site is a module inside the blocks or the final norm: a
        HuggingFace forward keeps the last ``logits_to_keep`` positions only after them."""
        arch = self.info.arch
        if arch is None:
            return False
        path = site.raw_parts[0]
        norm = arch.final_norm
        return path.startswith(arch.layers + ".") or path == norm or path.startswith(norm + ".")


def _tail_length(index: Index) -> int | None:
    """How many final positions a ``pos`` selector reaches when it uses negative positions
    only (``None`` otherwise).

    >>> _tail_length(-1), _tail_length((-3, -1)), _tail_length(Span(-4)), _tail_length(2)
    (1, 3, 4, None)
    """
    if isinstance(index, int):
        return -index if index < 0 else None
    if isinstance(index, tuple):
        return max(-i for i in index) if all(i < 0 for i in index) else None
    if isinstance(index, Span):
        ends_negative = index.stop is None or index.stop < 0
        forward = index.step is None or index.step > 0
        if index.start is not None and index.start < 0 and ends_negative and forward:
            return -index.start
    return None


def tokenize_rows(run: Run, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt of a text run (any lengths)."""
    assert run.text is not None
    if tokenizer is None:
        raise ValidationError(
            f"run {run.name!r} has text but no tokenizer was given; pass tokenizer=, or "
            "tokens= instead of text="
        )
    rows = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in run.text]
    for i, row in enumerate(rows):
        if not row:
            from interventions.hf import empty_tokenizer

            if empty_tokenizer(tokenizer):
                raise ValidationError(
                    f"run {run.name!r}: this model has no tokenizer (the one given is empty, "
                    "as for a model saved without tokenizer files); pass tokens= or --clean-ids"
                )
            raise ValidationError(
                f"run {run.name!r}: prompt {i} ({run.text[i]!r:.60}) tokenizes to nothing"
            )
    return rows


def tokenize(run: Run, tokenizer: Any) -> torch.Tensor:
    """Token ids of a text run whose prompts have one length (see :func:`tokenize_rows`)."""
    rows = tokenize_rows(run, tokenizer)
    lengths = sorted({len(x) for x in rows})
    if len(lengths) > 1:
        raise ValidationError(
            f"run {run.name!r}: its prompts tokenize to different lengths {lengths}"
        )
    return torch.tensor(rows, dtype=torch.long)


def run_inputs(
    graph: GraphSpec, tokenizer: Any
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Each run's input tensor, and the prompt lengths of runs whose prompts differ."""
    out: dict[str, torch.Tensor] = {}
    lengths: dict[str, tuple[int, ...]] = {}
    for run in graph.runs.values():
        if run.tokens is not None:
            out[run.name] = graph.tensors[run.tokens]
            if run.lengths is not None:
                lengths[run.name] = tuple(int(n) for n in graph.tensors[run.lengths])
        elif run.inputs is not None:
            out[run.name] = graph.tensors[run.inputs]
        else:
            ids, ragged = padded(tokenize_rows(run, tokenizer))
            out[run.name] = ids
            if ragged is not None:
                lengths[run.name] = ragged
    return out, lengths


def generation_positions(index: Index, prompt: int, fed: int) -> list[int] | None:
    """Absolute positions an op's ``pos`` selects in a generating run (``None``: all).

    Negative positions count from the end of the prompt; slices are taken over every
    position fed to the model (prompt plus generated) with negative bounds again counted
    from the end of the prompt, so ``slice(-2, None)`` is the last two prompt tokens and
    everything generated after them.

    >>> generation_positions(-1, prompt=4, fed=6), generation_positions(Span(-1), 4, 6)
    ([3], [3, 4, 5])
    """
    if index is None:
        return None
    assert not isinstance(index, PerPrompt), "the ragged pass resolves per-prompt positions"
    if isinstance(index, Span):
        start = index.start + prompt if index.start is not None and index.start < 0 else index.start
        stop = index.stop + prompt if index.stop is not None and index.stop < 0 else index.stop
        if index.step is not None and index.step < 0:
            raise SpecError("negative slice steps are not supported for positions in generation")
        return list(range(fed)[slice(start, stop, index.step)])
    items = [index] if isinstance(index, int) else list(index)
    return [i + prompt if i < 0 else i for i in items]


def step_select(select: Select, prompt: int, fed: int, offset: int, length: int) -> Select | None:
    """The selector for one forward step covering positions ``[offset, offset+length)``.

    Returns ``None`` when the op touches no position of this step.
    """
    if select.pos is None:
        return select
    absolute = generation_positions(select.pos, prompt, fed)
    assert absolute is not None
    local = [a - offset for a in absolute if offset <= a < offset + length]
    if not local:
        return None
    pos: int | tuple[int, ...] = local[0] if isinstance(select.pos, int) else tuple(local)
    return Select(batch=select.batch, pos=pos, head=select.head, dims=select.dims)


def absolute_select(select: Select, prompt: int, fed: int) -> Select:
    """A generating run's selector with positions made absolute (see
    :func:`generation_positions`), for reading the concatenated prompt+generated tensor.

    >>> absolute_select(Select(pos=-1), prompt=4, fed=6)
    Select(pos=3)
    """
    if select.pos is None:
        return select
    positions = generation_positions(select.pos, prompt, fed)
    assert positions is not None
    pos: int | tuple[int, ...] = positions[0] if isinstance(select.pos, int) else tuple(positions)
    return Select(batch=select.batch, pos=pos, head=select.head, dims=select.dims)


def resample_indices(seed: int, n_target: int, n_source: int) -> torch.Tensor:
    """Which source batch item each target item takes in a resample ablation.

    Drawn on the CPU from ``seed`` so every backend draws the same.

    >>> resample_indices(0, 3, 5).tolist() == resample_indices(0, 3, 5).tolist()
    True
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_source, (n_target,), generator=generator)


def make_plan(
    graph: GraphSpec, info: ModelInfo, tokenizer: Any = None, budget: Budget | None = None
) -> Plan:
    inputs, lengths = run_inputs(graph, tokenizer)
    side = getattr(tokenizer, "padding_side", None)
    return Plan(
        graph,
        info,
        tuple(graph.run_order()),
        inputs,
        budget,
        lengths=lengths,
        padding_side=side if side in ("left", "right") else "right",
    )
