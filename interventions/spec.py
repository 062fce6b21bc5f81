"""The intervention graph as data: runs, ops and the tensors they name (its builder,
:class:`~interventions.builder.RunHandle`, is in ``builder.py``).

This is the bottom of the core: it checks each op as it is added (names, references,
order; no model) and knows nothing of validation, planning, printing or JSON. The
public :class:`interventions.Graph` (``graph.py``) adds those services on top.

>>> import torch
>>> from interventions.spec import GraphSpec
>>> g = GraphSpec()
>>> clean = g.run("clean", tokens=torch.tensor([[1, 2, 3]]))
>>> corrupt = g.run("corrupt", tokens=torch.tensor([[1, 4, 3]]))
>>> h = clean.read("resid_post", layer=0)
>>> corrupt.patch("resid_post", layer=0, pos=-1, value=h)
>>> g.run_order(), g.reads()
(['clean', 'corrupt'], ['clean.resid_post.0'])

A value read in one run can flow into another (``patch(value=h)``). Ops on the same
site of a run apply in the order they were added; a read sees the ops added before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from interventions.builder import RunHandle
from interventions.errors import SpecError, choices_text, suggest
from interventions.ops import (
    FeatureEdit,
    Grad,
    Op,
    Read,
    SAESpec,
    SAESplice,
    check_op_names,
    depends_on,
    op_kind,
    produces,
    source_run,
    tensor_keys,
)
from interventions.runs import Run, check_lengths, is_name, sampling_from, token_rows
from interventions.sites import Select, Site
from interventions.tensor_bytes import bitwise_equal, check_finite

if TYPE_CHECKING:
    from interventions.sae.base import SAE


@dataclass
class GraphSpec:
    """An experiment as data: runs, ops and a table of named tensors and SAEs.

    Tensors holding NaN or Inf are refused unless ``allow_nonfinite=True``: a policy kept
    in the JSON (a graph that opts in loads again; one that does not is refused at load),
    not part of equality or the fingerprint.
    """

    runs: dict[str, Run] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    saes: dict[str, SAESpec] = field(default_factory=dict)
    allow_nonfinite: bool = False

    # -- building ------------------------------------------------------------------

    def run(
        self,
        name: str,
        *,
        tokens: torch.Tensor | Sequence[int] | Sequence[Sequence[int]] | None = None,
        text: str | Sequence[str] | None = None,
        inputs: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        attention_mask: torch.Tensor | Sequence[Sequence[int]] | None = None,
        padding_side: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> RunHandle:
        """Add a run and return a handle to put ops on it.

        ``tokens``: ids, ``[seq]`` or ``[batch, seq]``, or a list of prompts of different
        lengths; ``text``: one prompt or a batch (any lengths), tokenized with the model's
        tokenizer; ``inputs``: a tensor passed positionally to a plain ``nn.Module``.
        ``max_new_tokens`` turns the run into greedy generation; any of ``temperature``,
        ``top_k``, ``top_p`` or ``seed`` makes it sample instead (:class:`Sampling`).

        Padded ids from a tokenizer come with their ``attention_mask`` (left or right
        padding): the padding is dropped here, so the pad id never matters. Prompts of
        different lengths never share a padded forward pass: positions count in each
        prompt's own tokens (see :mod:`interventions.ragged`). ``padding_side`` lays out
        results over whole positions of such prompts (default: the tokenizer's side).
        """
        if name in self.runs:
            raise SpecError(f"run {name!r} already exists; runs: {choices_text(self.runs)}")
        token_key = input_key = length_key = None
        if attention_mask is not None and tokens is None:
            raise SpecError(f"run {name!r}: attention_mask= goes with tokens=")
        if tokens is not None:
            ids, lengths = token_rows(name, tokens, attention_mask)
            token_key = self._add_tensor(ids)
            if lengths is not None:
                length_key = self._add_tensor(lengths)
        if inputs is not None:
            if not isinstance(inputs, torch.Tensor):
                raise SpecError(f"run {name!r}: inputs= must be a tensor")
            input_key = self._add_tensor(inputs)
        texts = (text,) if isinstance(text, str) else (tuple(text) if text is not None else None)
        self._add_run(
            Run(
                name,
                tokens=token_key,
                text=texts,
                inputs=input_key,
                max_new_tokens=max_new_tokens,
                lengths=length_key,
                padding_side=padding_side,
                sampling=sampling_from(temperature, top_k, top_p, seed),
            )
        )
        return RunHandle(self, name)

    def _add_run(self, run: Run) -> None:
        for key in (run.tokens, run.inputs, run.lengths):
            if key is not None and key not in self.tensors:
                raise SpecError(f"run {run.name!r} names tensor {key!r}, which the graph lacks")
        if run.lengths is not None:
            check_lengths(run, self.tensors[run.tokens], self.tensors[run.lengths])  # type: ignore[index]
        self.runs[run.name] = run

    def _add_tensor(self, tensor: torch.Tensor) -> str:
        # The tensor itself when it already is a plain CPU tensor (not a detached alias), so
        # that its cached digest serves every graph built from it, e.g. an SAE's weights.
        if tensor.requires_grad:
            tensor = tensor.detach()
        tensor = tensor.cpu().contiguous()
        for key, existing in self.tensors.items():
            if existing is tensor:
                return key
        key = f"t{len(self.tensors)}"
        while key in self.tensors:
            key = f"{key}_"
        if not self.allow_nonfinite:
            check_finite(tensor, f"tensor {key}")
        self.tensors[key] = tensor
        return key

    def add(self, op: Op) -> Op:
        """Append an op after checking it against the graph so far (no model needed)."""
        cache = getattr(self, "_known_cache", None)
        if cache is None or cache[0] is not self.ops or cache[1] != len(self.ops):
            # rebuilt only when ops were replaced or changed behind the builder's back
            cache = (self.ops, len(self.ops), {n: o for o in self.ops for n in produces(o)})
        self._check_op(op, cache[2])
        self.ops.append(op)
        cache[2].update({name: op for name in produces(op)})
        self._known_cache = (self.ops, len(self.ops), cache[2])
        return op

    def _add_sae(self, sae: SAE) -> str:
        from interventions.sae.kinds import SAE_KINDS

        kind = getattr(sae, "kind", None)
        if kind not in SAE_KINDS or not isinstance(sae, SAE_KINDS[kind]):
            raise SpecError(
                f"sae_splice needs a built-in SAE ({choices_text(SAE_KINDS)}), got "
                f"{type(sae).__name__}; load one with iv.load_sae or build one from weights"
            )
        for key, spec in self.saes.items():
            if spec.kind == kind and _same_tensors(self, spec, sae):
                return key
        key = f"sae{len(self.saes)}"
        tensors = tuple(
            (param, self._add_tensor(value)) for param, value in sorted(sae.tensors().items())
        )
        self.saes[key] = SAESpec(kind, tuple(sorted(sae.params().items())), tensors)
        return key

    # -- checks that need no model -------------------------------------------------

    def _check_op(self, op: Op, known: Mapping[str, Op]) -> None:
        """Check ``op`` given ``known``, the ops before it by the names they record."""
        check_op_names(op)  # before any message quotes a name or suggests one
        if op.run not in self.runs:
            raise SpecError(
                f"{op_kind(op)} on run {op.run!r}: no such run"
                f"{suggest(op.run, self.runs)}; runs: {choices_text(self.runs) or 'none'}"
            )
        if not isinstance(op.site, Site) or not isinstance(op.select, Select):
            raise SpecError(f"{op_kind(op)} on run {op.run!r}: malformed site or selector")
        for name in produces(op):
            if not is_name(name):
                raise SpecError(f"read name {name!r}: use letters, digits and '_-.:/[]#'")
            if name in known:
                raise SpecError(f"{op_kind(op)} name {name!r} is already used by another read")
        for name in depends_on(op):
            source = known.get(name)
            if source is None:
                raise SpecError(
                    f"{op_kind(op)} on {op.run}.{op.site}: value {name!r} is not read earlier"
                    f"{suggest(name, known)}; reads so far: {choices_text(known) or 'none'}"
                )
            if isinstance(source, Grad):
                raise SpecError(
                    f"{op_kind(op)} on {op.run}.{op.site}: {name!r} is a gradient (a result); "
                    "only reads and SAE features flow into other runs"
                )
            if source.run == op.run:
                raise SpecError(
                    f"{op_kind(op)} on {op.run}.{op.site}: value {name!r} comes from the same "
                    "run; a value can only flow into another run"
                )
        for key in tensor_keys(op):
            if key not in self.tensors:
                raise SpecError(f"{op_kind(op)} on {op.run}.{op.site}: no tensor {key!r}")
        src = source_run(op)
        if src is not None:
            if src not in self.runs:
                raise SpecError(
                    f"{op_kind(op)} on {op.run}.{op.site}: source run {src!r} does not exist"
                    f"{suggest(src, self.runs)}; runs: {choices_text(self.runs)}"
                )
            if src == op.run:
                raise SpecError(f"{op_kind(op)} on {op.run}.{op.site}: source must be another run")
        if isinstance(op, SAESplice):
            if op.sae not in self.saes:
                raise SpecError(f"sae_splice on {op.run}.{op.site}: no SAE {op.sae!r}")
            for edit in op.edits:
                if not isinstance(edit, FeatureEdit):
                    raise SpecError(f"sae_splice on {op.run}.{op.site}: bad edit {edit!r}")
        if not isinstance(op, Read) and not op.site.kind.writable:
            raise SpecError(
                f"{op_kind(op)} on {op.run}.{op.site}: site {op.site.name!r} is read only"
            )

    def check(self) -> None:
        """Check the graph's own consistency (no model). ``validate`` also calls this."""
        for run in self.runs.values():
            for key in (run.tokens, run.inputs, run.lengths):
                if key is not None and key not in self.tensors:
                    raise SpecError(f"run {run.name!r} names missing tensor {key!r}")
        for key, spec in self.saes.items():
            for param, tensor_key in spec.tensors:
                if tensor_key not in self.tensors:
                    raise SpecError(f"SAE {key!r} parameter {param!r}: no tensor {tensor_key!r}")
        known: dict[str, Op] = {}
        for op in self.ops:
            self._check_op(op, known)
            known.update((name, op) for name in produces(op))
        self.run_order()

    def run_order(self) -> list[str]:
        """Runs in an order where every value is read before it is used."""
        reads = {name: op.run for op in self.ops for name in produces(op)}
        needs: dict[str, set[str]] = {name: set() for name in self.runs}
        for op in self.ops:
            for name in depends_on(op):
                needs[op.run].add(reads[name])
            if source_run(op) is not None:
                needs[op.run].add(str(source_run(op)))
        position = {name: i for i, name in enumerate(self.runs)}
        order: list[str] = []
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        for root in self.runs:
            if root in state:
                continue
            # iterative depth-first search: long chains of runs must not hit the recursion limit
            path: list[str] = [root]
            stack = [iter(sorted(needs[root], key=position.__getitem__))]
            state[root] = 1
            while stack:
                dep = next(stack[-1], None)
                if dep is None:
                    stack.pop()
                    done = path.pop()
                    state[done] = 2
                    order.append(done)
                elif state.get(dep) == 1:
                    cycle = [*path[path.index(dep) :], dep]
                    raise SpecError(f"runs depend on each other in a cycle: {' -> '.join(cycle)}")
                elif dep not in state:
                    state[dep] = 1
                    path.append(dep)
                    stack.append(iter(sorted(needs[dep], key=position.__getitem__)))
        return order

    # -- data ----------------------------------------------------------------------

    def reads(self) -> list[str]:
        """Names of everything a run of this graph returns."""
        names = [name for op in self.ops for name in produces(op)]
        names += [f"{r.name}.generated" for r in self.runs.values() if r.generates]
        return names

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GraphSpec):
            return NotImplemented
        return (
            list(self.runs.items()) == list(other.runs.items())
            and self.ops == other.ops
            and self.saes == other.saes
            and self.tensors.keys() == other.tensors.keys()
            and all(bitwise_equal(t, other.tensors[k]) for k, t in self.tensors.items())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable builder

    def __repr__(self) -> str:
        return f"<{type(self).__name__} runs={list(self.runs)} ops={len(self.ops)} tensors={len(self.tensors)}>"

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)


def _same_tensors(graph: GraphSpec, spec: SAESpec, sae: SAE) -> bool:
    mine = dict(spec.tensors)
    theirs = sae.tensors()  # type: ignore[attr-defined]
    return (
        mine.keys() == theirs.keys()
        and all(
            graph.tensors[mine[k]] is theirs[k] or bitwise_equal(graph.tensors[mine[k]], theirs[k])
            for k in mine
        )
        and tuple(sorted(sae.params().items())) == spec.params  # type: ignore[attr-defined]
    )
