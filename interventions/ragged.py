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

* **merged**: the parts of a run are row groups of *one* forward of
  every prompt right-padded to the longest, with no attention mask. On a causal decoder
  (:data:`RIGHT_PADDING_EXACT`, checked by :func:`right_padding_exact`) that is exact: a
  real token attends only to earlier positions, all real, and position ids count from 0
  in every row. Each group's positions are rewritten to absolute ones counted back from
  the forward's end (:func:`placed`: ``-1`` becomes each prompt's last real token), so an
  op at the last tokens still lets the logits be computed there only; reads over whole
  positions are one read, zeroed past each row's length when put back together.
* **split**: each part is an ordinary run of equal-length prompts of its own (no
  padding anywhere, so exact on every family: mixtures of experts, unknown families,
  plain modules), used where a run generates, touches raw module sites or attention
  patterns, or where the cost estimate (:meth:`_Builder.merge_pays`: per-forward overhead
  against the arithmetic that padding adds and the logits each way computes) prefers it.

Either way the pad id cannot matter and every backend (remote too) runs an ordinary
graph. Split parts of one length from different runs still share forward passes through
the batching pass that follows.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from interventions.architectures import ModelInfo
from interventions.assembly import Assembly, MeanSlot, Part, Piece, Split
from interventions.errors import SpecError, ValidationError
from interventions.ops import (
    Ablate,
    Add,
    Const,
    EdgePatch,
    Op,
    Patch,
    Read,
    Ref,
    SAESplice,
    produces,
)
from interventions.selection import selected_shape
from interventions.sites import Index, PerPrompt, Select, Site, Span
from interventions.spec import GraphSpec, Run

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


def _first_position(pos: Index, length: int) -> int:
    """The earliest position (from a prompt's first token) a selector touches."""
    if pos is None:
        return 0
    if isinstance(pos, Span):
        idx = pos.indices(length)
        return min(idx) if idx else length
    items = [pos] if isinstance(pos, int) else list(pos)  # type: ignore[arg-type]
    return min((p if p >= 0 else length + p) for p in items) if items else length


# -- the pass ---------------------------------------------------------------------------


def needs_split(graph: GraphSpec, lengths: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether some run holds prompts of different lengths or per-prompt positions."""
    return bool(lengths) or any(isinstance(op.select.pos, PerPrompt) for op in graph.ops)


def _rows_of(index: Index, n: int, where: str) -> tuple[list[int], bool]:
    """The rows a batch selector picks, in order, and whether it drops the batch axis."""
    if index is None:
        return list(range(n)), False
    if isinstance(index, Span):
        return index.indices(n), False
    items = [index] if isinstance(index, int) else list(index)  # type: ignore[arg-type]
    for i in items:
        if not -n <= i < n:
            raise ValidationError(f"{where}: batch={i} is out of range for {n} prompts")
    return [i % n for i in items], isinstance(index, int)


def _where(op: Op) -> str:
    kind = type(op).__name__.lower()
    return f"{kind} on {op.run}.{op.site}"


@dataclass
class _Builder:
    graph: GraphSpec
    inputs: Mapping[str, torch.Tensor]
    lengths: Mapping[str, tuple[int, ...]]
    padding_side: str
    info: ModelInfo | None
    merge: frozenset[str] = frozenset()  # runs run as one right-padded forward
    new: GraphSpec = field(init=False)
    parts: dict[str, tuple[Part, ...]] = field(default_factory=dict)
    assemblies: list[Assembly] = field(default_factory=list)
    internal: set[str] = field(default_factory=set)
    means: list[MeanSlot] = field(default_factory=list)
    derived: dict[str, list[Read]] = field(default_factory=dict)  # source read -> reads
    replaced: dict[int, list[Op]] = field(default_factory=dict)  # id(op) -> its ops
    taken: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        sae_keys = {key for spec in self.graph.saes.values() for _, key in spec.tensors}
        self.new = type(self.graph)(
            tensors={k: self.graph.tensors[k] for k in sae_keys}, saes=dict(self.graph.saes)
        )
        self.producers = {n: op for op in self.graph.ops for n in produces(op)}
        self.taken = set(self.graph.runs) | {n for op in self.graph.ops for n in produces(op)}

    # names --------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def tensor(self, t: torch.Tensor) -> str:
        return self.new._add_tensor(t)

    # rows and parts -----------------------------------------------------------------

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

    def make_parts(self, name: str) -> None:
        run = self.graph.runs[name]
        n = self.n_rows(name)
        per_prompt = [
            op for op in self.graph.ops if op.run == name and isinstance(op.select.pos, PerPrompt)
        ]
        for op in per_prompt:
            pos = op.select.pos
            assert isinstance(pos, PerPrompt)
            if len(pos) != n:
                raise ValidationError(
                    f"{_where(op)}: per-prompt positions are given for {len(pos)} prompts but "
                    f"run {name!r} has {n}"
                )
        parts = []
        ids = self.inputs[name]
        ordered = self.groups(name)
        if name in self.merge:
            width = max(int(key[0]) for key, _ in ordered)
            self.new.runs[name] = Run(name, tokens=self.tensor(ids[:, :width].contiguous()))
            self.parts[name] = tuple(
                Part(name, tuple(rows), int(key[0]), width) for key, rows in ordered
            )
            return
        for k, (key, rows) in enumerate(ordered):
            length = int(key[0])
            part = self.fresh(f"{name}#{k}")
            tokens = ids[rows, :length].contiguous()
            sampling = run.sampling
            if sampling is not None:  # each part samples from its own seed: seed + part
                sampling = replace(sampling, seed=sampling.seed + k)
            self.new.runs[part] = Run(
                part,
                tokens=self.tensor(tokens),
                max_new_tokens=run.max_new_tokens,
                sampling=sampling,
            )
            parts.append(Part(part, tuple(rows), length))
        self.parts[name] = tuple(parts)
        if run.generates:
            pieces = tuple(Piece(f"{p.run}.generated", p.rows) for p in parts)
            self.assemblies.append(Assembly(f"{name}.generated", pieces, n, self.side(name)))
            self.internal.update(piece.name for piece in pieces)

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

    def mergeable(self, name: str) -> bool:
        """Whether a run may be one right-padded forward: a token run that does not generate,
        whose ops (and the sites other runs take from it) are at standard sites with
        positions on axis 1 and no key positions."""
        run = self.graph.runs[name]
        if (run.tokens is None and run.text is None) or run.generates:
            return False
        sites: list[Site] = []
        for op in self.graph.ops:
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

    def merge_pays(self, name: str, device: str) -> bool:
        """The cost estimate: one forward of every row padded to the longest, against one
        forward per part (each computing only the logits its ops need)."""
        from interventions.plan import _tail_length

        info = self.info
        if info is None or None in (info.n_layers, info.d_model, info.vocab):
            return False
        layers, d, vocab = int(info.n_layers), int(info.d_model), int(info.vocab)  # type: ignore[arg-type]
        d_mlp = info.d_mlp or 4 * d
        groups = self.groups(name)
        width = max(int(key[0]) for key, _ in groups)
        logit_ops = [op for op in self.graph.ops if op.run == name and op.site.name == "logits"]
        full_logits = any(isinstance(op, Ablate) for op in logit_ops) or any(
            isinstance(op, Ablate) and op.source == name and op.site.name == "logits"
            for op in self.graph.ops
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
            tails = [_tail_length(self.raw_pos(op, part)) for op in logit_ops]
            known = [t for t in tails if t is not None]
            keep = (
                1 if not tails else length if full_logits or len(known) < len(tails) else max(known)
            )
            split += flops(len(rows), length, keep)
            for op in logit_ops:
                absolute = _first_position(self.raw_pos(op, part), length)
                first = min(first, absolute)
        merged_keep = width if full_logits else (width - first if logit_ops else 1)
        return flops(self.n_rows(name), width, max(merged_keep, 1)) <= split

    def parts_of(self, run: str) -> tuple[Part, ...]:
        """A split run's parts; an unsplit run is one part, itself."""
        if run in self.parts:
            return self.parts[run]
        n = self.n_rows(run)
        return (Part(run, tuple(range(n)), self.length(run, 0) if n else 0),)

    def part_of(self, run: str, row: int) -> Part:
        for p in self.parts_of(run):
            if row in p.rows:
                return p
        raise AssertionError((run, row))  # pragma: no cover

    def side(self, run: str) -> str:
        return self.graph.runs[run].padding_side or self.padding_side

    # checks -------------------------------------------------------------------------

    def check_positions(
        self, op: Op, run: str, rows: Sequence[int], pos: Index, what: str = ""
    ) -> None:
        """Positions given as ints must exist in every prompt they apply to."""
        if pos is None or isinstance(pos, Span):
            return
        graph_run = self.graph.runs[run]
        extra = (graph_run.max_new_tokens or 1) - 1
        for row in rows:
            items: Sequence[int]
            if isinstance(pos, PerPrompt):
                items = pos.positions[row]
            else:
                items = (pos,) if isinstance(pos, int) else pos
            n = self.length(run, row)
            for p in items:
                if not -n <= p < n + extra:
                    raise ValidationError(
                        f"{_where(op)}{what}: pos={p} is past the end of prompt {row} of run "
                        f"{run!r}, which has {n} tokens (valid: {-n}..{n + extra - 1})"
                    )

    # emission -----------------------------------------------------------------------

    def local_batch(self, part: Part, targets: Sequence[int], dropped: bool) -> Index:
        local = part.local(targets)
        if dropped:
            return local[0]
        everything = self.n_rows(part.run) if part.width is not None else len(part.rows)
        if local == list(range(everything)):
            return None
        return tuple(local)

    def raw_pos(self, op: Op, part: Part) -> Index:
        """The op's positions for the part's prompts, counted in their own tokens."""
        pos = op.select.pos
        if isinstance(pos, PerPrompt):
            return pos.row(part.rows[0])
        return pos

    def part_pos(self, op: Op, part: Part) -> Index:
        return placed(self.raw_pos(op, part), part)

    def const_rows(self, const: Const, op: Op, n_sel: int, picks: Sequence[int]) -> Const:
        """A constant for some selected prompts: sliced when it has a row per selected prompt."""
        t = self.graph.tensors[const.tensor]
        sel = op.select
        dropped = [
            i
            for i in (sel.batch, sel.pos, sel.head, sel.dims)
            if isinstance(i, int) or (isinstance(i, PerPrompt) and i.squeeze)
        ]
        region_ndim = len(op.site.kind.axes) - len(dropped)
        row_per_prompt = not isinstance(sel.batch, int) and n_sel > 1 and t.ndim == region_ndim
        if not op.site.is_raw and row_per_prompt and t.shape[0] == n_sel:
            return Const(self.tensor(t[list(picks)].contiguous()))
        return Const(self.tensor(t))

    def emit_generic(self, op: Op) -> list[Op]:
        """An op on a split run (no value from another run): one copy per part it touches."""
        n = self.n_rows(op.run)
        sel_rows, dropped = _rows_of(op.select.batch, n, _where(op))
        self.check_positions(op, op.run, sel_rows, op.select.pos)
        out: list[Op] = []
        pieces: list[tuple[str, list[int]]] = []
        if (
            isinstance(op, Read)
            and op.select.pos is None
            and not dropped
            and self.parts[op.run][0].width is not None
        ):
            # one read of the merged forward; the assembly zeroes each row's padding
            name = self.fresh(f"{op.name}#0")
            lengths = tuple(self.length(op.run, r) for r in sel_rows)
            piece = Piece(name, tuple(range(len(sel_rows))), lengths)
            self.assemblies.append(Assembly(op.name, (piece,), len(sel_rows), self.side(op.run)))
            self.internal.add(name)
            return [replace(op, name=name)]
        for part in self.parts[op.run]:
            picks = [j for j, r in enumerate(sel_rows) if r in part.rows]
            if not picks:
                continue
            targets = [sel_rows[j] for j in picks]
            select = replace(
                op.select,
                batch=self.local_batch(part, targets, dropped),
                pos=self.part_pos(op, part),
            )
            new_op: Any = replace(op, run=part.run, select=select)
            if isinstance(op, Read):
                name = self.fresh(f"{op.name}#{len(pieces)}")
                new_op = replace(new_op, name=name)
                pieces.append((name, picks))
            elif isinstance(op, Patch) and isinstance(op.value, Const):
                new_op = replace(new_op, value=self.const_rows(op.value, op, len(sel_rows), picks))
            elif isinstance(op, Add):
                new_op = replace(
                    new_op, direction=self.const_rows(op.direction, op, len(sel_rows), picks)
                )
            elif isinstance(op, SAESplice) and op.features is not None:
                name = self.fresh(f"{op.features}#{len(pieces)}")
                new_op = replace(new_op, features=name)
                pieces.append((name, picks))
            else:  # project_out's direction; other ops hold no constant
                new_op = self.with_consts(new_op)
            out.append(new_op)
        if isinstance(op, Read) or (isinstance(op, SAESplice) and op.features is not None):
            result = op.name if isinstance(op, Read) else op.features
            assert result is not None
            self.assemblies.append(
                Assembly(
                    result,
                    tuple(Piece(n, tuple(p)) for n, p in pieces),
                    None if dropped else len(sel_rows),
                    self.side(op.run),
                )
            )
            self.internal.update(n for n, _ in pieces)
        return out

    def with_consts(self, op: Op) -> Op:
        """Copy an op's constants into the new graph's tensor table."""
        for attr in ("value", "direction"):
            v = getattr(op, attr, None)
            if isinstance(v, Const):
                fields: dict[str, Any] = {attr: Const(self.tensor(self.graph.tensors[v.tensor]))}
                op = replace(op, **fields)
        return op

    # values between runs ------------------------------------------------------------

    def route(
        self,
        op: Patch | Ablate,
        source: tuple[str, str, Site],
        pairs: Sequence[tuple[int, int, int]],
        source_select: Select,
        aligned: bool,
    ) -> list[Op]:
        """Ops that give each target row its source row's value.

        ``pairs`` are (index among the selected targets, target row, source row). Each
        (target part, source part) pair gets one derived read of the source part and one
        patch of the target part. ``source`` is (run, key the derived reads go after, site).
        """
        source_run, source_key, source_site = source
        target_run = op.run
        n_target = self.n_rows(target_run)
        _, dropped = _rows_of(op.select.batch, n_target, _where(op))
        groups: dict[tuple[Part, Part], list[tuple[int, int, int]]] = {}
        for j, t, s in pairs:
            groups.setdefault(
                (self.part_of(target_run, t), self.part_of(source_run, s)), []
            ).append((j, t, s))
        out: list[Op] = []
        for (tp, sp), members in groups.items():
            targets = [t for _, t, _ in members]
            sources = [s for _, _, s in members]
            if aligned:
                pos = self.raw_pos(op, tp)
                if pos is None and tp.length != sp.length:
                    raise ValidationError(
                        f"{_where(op)}: the value is a whole site of run "
                        f"{source_run!r}, whose prompt {sources[0]} has {sp.length} tokens, "
                        f"but prompt {targets[0]} of run {target_run!r} has {tp.length}; "
                        "select positions with pos= (e.g. pos=-1, or iv.token_positions(...))"
                    )
                self.check_positions(op, source_run, sources, pos, " (in the source run)")
                local_s = sp.local(sources)
                dselect = Select(
                    batch=tuple(local_s),
                    pos=placed(pos, sp),
                    head=op.select.head,
                    dims=op.select.dims,
                )
            else:
                spos = source_select.pos
                if isinstance(spos, PerPrompt):
                    spos = spos.row(sp.rows[0])
                spos = placed(spos, sp)
                local_s = sp.local(sources)
                if isinstance(source_select.batch, int):
                    batch: Index = local_s[0]
                elif len(set(local_s)) == 1 and self.value_rows(source_select, source_run) == 1:
                    batch = (local_s[0],)
                else:
                    batch = tuple(local_s)
                dselect = Select(
                    batch=batch, pos=spos, head=source_select.head, dims=source_select.dims
                )
            read_name = self.fresh(f"__ragged{len(self.internal)}")
            self.internal.add(read_name)
            self.derived.setdefault(source_key, []).append(
                Read(sp.run, source_site, dselect, read_name)
            )
            tselect = replace(
                op.select,
                batch=self.local_batch(tp, targets, dropped),
                pos=self.part_pos(op, tp),
            )
            out.append(Patch(tp.run, op.site, tselect, Ref(read_name)))
        return out

    def mean_shape(self, site: Site, length: int, region: Select) -> tuple[int, ...]:
        """The shape of a mean ablation's value over ``region`` of one prompt."""
        info = self.info
        if site.is_raw or info is None or info.width(site) is None:
            raise ValidationError(
                f"mean ablation of {site} from a run of prompts of different lengths needs a "
                "standard site of a known model"
            )
        sizes = {"batch": 1, "pos": length, "key_pos": length, "head": info.head_count(site) or 0}
        sizes["hidden"] = int(info.width(site))  # type: ignore[arg-type]
        axes = site.kind.axes
        return selected_shape(region, axes, [sizes[a] for a in axes])

    def value_rows(self, select: Select, run: str) -> int:
        rows, dropped = _rows_of(select.batch, self.n_rows(run), "value")
        return 1 if dropped else len(rows)

    def plan_patch(self, op: Patch) -> list[Op] | None:
        """The ops replacing a patch whose value comes from another run, when either run is split."""
        assert isinstance(op.value, Ref)
        producer = self.producers[op.value.read]
        source_run = producer.run
        if op.run not in self.parts and source_run not in self.parts:
            return None
        if not isinstance(producer, Read):
            raise ValidationError(
                f"{_where(op)}: SAE features %{op.value.read} cannot be patched between runs "
                "whose prompts differ in length or positions; patch a read instead"
            )
        n_t, n_s = self.n_rows(op.run), self.n_rows(source_run)
        targets, _ = _rows_of(op.select.batch, n_t, _where(op))
        self.check_positions(op, op.run, targets, op.select.pos)
        aligned = producer.select.is_all
        pairs: list[tuple[int, int, int]] = []
        if aligned:
            for j, t in enumerate(targets):
                if n_s == n_t:
                    s = t
                elif n_s == 1 and op.select.batch is None:
                    s = 0
                else:
                    raise ValidationError(
                        f"{_where(op)}: value %{op.value.read} holds {n_s} prompts and the "
                        f"patched run {op.run!r} {n_t}; they are paired prompt by prompt"
                    )
                pairs.append((j, t, s))
        else:
            sources, dropped = _rows_of(producer.select.batch, n_s, _where(producer))
            self.check_positions(producer, source_run, sources, producer.select.pos)
            for j, t in enumerate(targets):
                if dropped or len(sources) == 1:
                    s = sources[0]
                elif len(sources) == len(targets):
                    s = sources[j]
                else:
                    raise ValidationError(
                        f"{_where(op)}: value %{op.value.read} holds {len(sources)} prompts "
                        f"but the patch selects {len(targets)} of run {op.run!r}"
                    )
                pairs.append((j, t, s))
        return self.route(
            op, (source_run, producer.name, producer.site), pairs, producer.select, aligned
        )

    def plan_ablate(self, op: Ablate) -> list[Op] | None:
        """Mean and resample ablations when the target or the source run is split."""
        if op.source is None or (op.run not in self.parts and op.source not in self.parts):
            return None
        source = op.source
        n_t, n_s = self.n_rows(op.run), self.n_rows(source)
        targets, dropped = _rows_of(op.select.batch, n_t, _where(op))
        self.check_positions(op, op.run, targets, op.select.pos)
        if op.method == "resample":
            from interventions.plan import resample_indices

            draws = resample_indices(op.seed, n_t, n_s).tolist()
            pairs = [(j, t, int(draws[t])) for j, t in enumerate(targets)]
            # a resample is a patch from the drawn prompts at the same positions: a read of
            # the whole source site placed right after the source run's last op
            return self.route(op, (source, f"__end__:{source}", op.site), pairs, Select(), True)
        # mean: a constant per target part, filled after a first pass over the source
        out: list[Op] = []
        for part in self.parts_of(op.run):
            picks = [t for t in targets if t in part.rows]
            if not picks:
                continue
            pos = self.raw_pos(op, part)
            region = Select(pos=pos, head=op.select.head, dims=op.select.dims)
            key = self.tensor(torch.zeros(self.mean_shape(op.site, part.length, region)))
            self.means.append(MeanSlot(key, source, op.site, op.per_position, part.length, region))
            select = replace(
                op.select, batch=self.local_batch(part, picks, dropped), pos=placed(pos, part)
            )
            out.append(Patch(part.run, op.site, select, Const(key)))
        return out


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
    whose forward is exact under right padding, see :func:`right_padding_exact`) a run
    whose ops allow it becomes one right-padded forward instead of one per length, where
    the cost estimate for ``device`` says that is cheaper.
    """
    b = _Builder(graph, inputs, lengths, padding_side, info)
    split = b.split_runs()
    if merge:
        b.merge = frozenset(
            name for name in split if b.mergeable(name) and b.merge_pays(name, device)
        )
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
