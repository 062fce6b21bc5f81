"""From a validated graph to what a backend executes: run order and concrete inputs.

The plan resolves everything that must be the same on every backend before any of them
runs: the order of runs, the token ids of text prompts, the position arithmetic of
generation, and the resample draws. Backends only execute it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from interventions.architectures import ModelInfo
from interventions.errors import SpecError, ValidationError
from interventions.graph import Graph, Run
from interventions.ops import Ablate, Op, Read
from interventions.sites import Select, Site, Span


@dataclass(frozen=True)
class Plan:
    """A graph ready to execute: runs in dependency order with their input tensors."""

    graph: Graph
    info: ModelInfo
    order: tuple[str, ...]
    inputs: Mapping[str, torch.Tensor]  # run -> token ids [batch, seq] or a raw input tensor

    def ops_of(self, run: str) -> list[Op]:
        return [op for op in self.graph.ops if op.run == run]

    def captures_of(self, run: str) -> list[Site]:
        """Sites of ``run`` whose full value another run's ablation needs."""
        sites: list[Site] = []
        for op in self.graph.ops:
            if isinstance(op, Ablate) and op.source == run and op.site not in sites:
                sites.append(op.site)
        return sites

    def read_ops(self) -> dict[str, Read]:
        return {op.name: op for op in self.graph.ops if isinstance(op, Read)}

    def prompt_length(self, run: str) -> int:
        return int(self.inputs[run].shape[1]) if self.inputs[run].ndim >= 2 else 1

    def batch_size(self, run: str) -> int:
        return int(self.inputs[run].shape[0])


def tokenize(run: Run, tokenizer: Any) -> torch.Tensor:
    """Token ids of a text run; prompts of one run must have the same length."""
    assert run.text is not None
    if tokenizer is None:
        raise ValidationError(
            f"run {run.name!r} has text but no tokenizer was given; pass tokenizer=, or "
            "tokens= instead of text="
        )
    ids = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in run.text]
    lengths = sorted({len(x) for x in ids})
    if len(lengths) > 1:
        raise ValidationError(
            f"run {run.name!r}: its prompts tokenize to different lengths {lengths}; positions "
            "would not line up. Use prompts of equal length, one run per length, or tokens="
        )
    if lengths == [0]:
        raise ValidationError(f"run {run.name!r}: a prompt tokenizes to nothing")
    return torch.tensor(ids, dtype=torch.long)


def run_inputs(graph: Graph, tokenizer: Any) -> dict[str, torch.Tensor]:
    out = {}
    for run in graph.runs.values():
        if run.tokens is not None:
            out[run.name] = graph.tensors[run.tokens]
        elif run.inputs is not None:
            out[run.name] = graph.tensors[run.inputs]
        else:
            out[run.name] = tokenize(run, tokenizer)
    return out


def generation_positions(
    index: int | tuple[int, ...] | Span | None, prompt: int, fed: int
) -> list[int] | None:
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


def make_plan(graph: Graph, info: ModelInfo, tokenizer: Any = None) -> Plan:
    return Plan(graph, info, tuple(graph.run_order()), run_inputs(graph, tokenizer))
