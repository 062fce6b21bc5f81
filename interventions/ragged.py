"""Prompts of different lengths, exactly: runs split by length, results put back together.

A run may hold prompts of different lengths (``tokens=`` as a list of lists, ``text=``,
or padded ids with their ``attention_mask``), and positions may be chosen prompt by
prompt (:class:`~interventions.sites.PerPrompt`, ``iv.token_positions``). Positions
always count in each prompt's own tokens: non-negative ones from its first token,
negative ones from its last.

This planner pass splits each such run into *parts*, one per prompt length (and per
choice of per-prompt positions), and rewrites every op onto the parts; a value patched
between runs is routed row by row through small derived reads. A part runs one of two
ways, chosen per run:

* **merged**: the parts of a run are row groups of *one* forward of every prompt
  right-padded to the longest, with no attention mask. On a causal decoder
  (:data:`~interventions.ragged_layout.RIGHT_PADDING_EXACT`, checked by
  :func:`~interventions.ragged_layout.right_padding_exact`) that is exact: a real token
  attends only to earlier positions, all real, and position ids count from 0 in every
  row. Each group's positions are rewritten to absolute ones counted back from the
  forward's end (:func:`~interventions.ragged_layout.placed`: ``-1`` becomes each
  prompt's last real token), so an op at the last tokens still lets the logits be
  computed there only; reads over whole positions are one read, zeroed past each row's
  length when put back together.
* **split**: each part is an ordinary run of equal-length prompts of its own (no
  padding anywhere, so exact on every family: mixtures of experts, unknown families,
  plain modules), used where a run generates, touches raw module sites or attention
  patterns, or where the cost estimate (:func:`~interventions.ragged_layout.merge_pays`:
  per-forward overhead against the arithmetic that padding adds and the logits each way
  computes) prefers it.

Either way the pad id cannot matter and every backend (remote too) runs an ordinary
graph. Split parts of one length from different runs still share forward passes through
the batching pass that follows.

This module is the pass itself (:func:`needs_split`, :func:`split_graph`);
:mod:`interventions.ragged_layout` decides the layout (the parts, merged or split, the
cost estimate) and :mod:`interventions.ragged_ops` rewrites the ops onto it.

What a read of a split run returns (in prompt order, whatever the split):

* when every prompt gives the same number of positions (``pos=-1``, a list, a
  per-prompt position, a negative slice), the rows are stacked as usual;
* otherwise (whole positions, a slice past some prompts' ends) the rows are padded with
  zeros to the longest, on the run's ``padding_side`` (the tokenizer's by default, else
  right), and :meth:`Results.mask <interventions.results.Results.mask>` gives which
  entries are real (``attn_pattern`` is padded on both of its position axes).

>>> import torch, transformers, interventions as iv
>>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
>>> g = iv.Graph()
>>> r = g.run("r", tokens=[[1, 2, 3, 4], [5, 6]])
>>> _ = r.read("resid_post", layer=0, pos=-1, name="last")
>>> _ = r.read("resid_post", layer=0, name="all")
>>> res = iv.run(g, model)
>>> res["last"].shape, res["all"].shape, res.mask("all").tolist()
(torch.Size([2, 32]), torch.Size([2, 4, 32]), [[True, True, True, True], [True, True, False, False]])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from interventions.architectures import ModelInfo
from interventions.assembly import Split
from interventions.errors import SpecError
from interventions.ops import Ablate, EdgePatch, Op, Patch, Read, Ref
from interventions.ragged_layout import Prompts, merge_pays, mergeable
from interventions.ragged_ops import _Rewriter
from interventions.sites import PerPrompt
from interventions.spec import GraphSpec, Run


def needs_split(graph: GraphSpec, lengths: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether some run holds prompts of different lengths or per-prompt positions."""
    return bool(lengths) or any(isinstance(op.select.pos, PerPrompt) for op in graph.ops)


def split_graph(
    graph: GraphSpec,
    inputs: Mapping[str, torch.Tensor],
    lengths: Mapping[str, tuple[int, ...]],
    padding_side: str = "right",
    info: ModelInfo | None = None,
    *,
    merge: bool = False,
    device: str = "cpu",
) -> Split:
    """Rewrite ``graph`` so that no run holds prompts of different lengths.

    ``inputs`` are the runs' token ids (text runs tokenized, rows left-aligned and
    zero-filled) and ``lengths`` each split run's prompt lengths. With ``merge`` (a model
    whose forward is exact under right padding, see
    :func:`~interventions.ragged_layout.right_padding_exact`) a run whose ops allow it
    becomes one right-padded forward instead of one per length, where the cost estimate
    for ``device`` says that is cheaper.
    """
    prompts = Prompts(graph, inputs, lengths)
    split = prompts.split_runs()
    merged = frozenset(
        name
        for name in split
        if merge and mergeable(graph, name) and merge_pays(prompts, info, name, device)
    )
    b = _Rewriter(prompts, padding_side, info, merged)
    for op in graph.ops:
        if isinstance(op, EdgePatch) and (op.run in split or op.source in split):
            raise SpecError(
                f"edge_patch on {op.run}.{op.site}: edge patches need runs whose prompts all "
                "have one length (no per-prompt positions); group the prompts by length"
            )
    for name in graph.runs:
        if name in split:
            b.make_parts(name)
        else:
            run = graph.runs[name]
            if run.inputs is not None:
                b.new.runs[name] = Run(name, inputs=b.tensor(inputs[name]))
            else:
                b.new.runs[name] = Run(
                    name,
                    tokens=b.tensor(inputs[name]),
                    max_new_tokens=run.max_new_tokens,
                    sampling=run.sampling,
                )
    # patches and ablations routed between runs, worked out before emission so that the
    # derived reads they need can be placed right after their source reads
    for op in graph.ops:
        if isinstance(op, Patch) and isinstance(op.value, Ref):
            ops = b.plan_patch(op)
        elif isinstance(op, Ablate) and op.method != "zero":
            ops = b.plan_ablate(op)
        else:
            continue
        if ops is not None:
            b.replaced[id(op)] = ops
    emitted: list[Op] = []
    for op in graph.ops:
        if id(op) in b.replaced:
            emitted.extend(b.replaced[id(op)])
        elif op.run in b.parts:
            emitted.extend(b.emit_generic(op))
        else:
            emitted.append(b.with_consts(op))
        if isinstance(op, Read):
            emitted.extend(b.derived.get(op.name, []))
    # resample reads of whole source sites see everything the source run does
    for key, reads in b.derived.items():
        if key.startswith("__end__:"):
            source = key.removeprefix("__end__:")
            last = max(
                (i for i, o in enumerate(emitted) if o.run in {p.run for p in b.parts_of(source)}),
                default=len(emitted) - 1,
            )
            emitted[last + 1 : last + 1] = reads
    b.new.ops = emitted
    b.new.check()
    return Split(b.new, dict(b.parts), tuple(b.assemblies), frozenset(b.internal), tuple(b.means))
