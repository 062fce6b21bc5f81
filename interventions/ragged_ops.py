"""The op rewriting of the ragged pass: every op moved onto the parts of its run.

:mod:`interventions.ragged_layout` decides how each run's prompts are laid out (one run
per length, or row groups of one right-padded forward); :class:`_Rewriter`, driven by
:func:`interventions.ragged.split_graph`, rewrites the graph onto that layout: it makes
the parts' runs, copies every op onto the parts it touches (with
:func:`~interventions.ragged_layout.placed` positions in a merged forward), routes
values patched between runs row by row through small derived reads, and records the
assemblies that put the results back together in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from interventions.architectures import ModelInfo
from interventions.assembly import Assembly, MeanSlot, Part, Piece
from interventions.errors import ValidationError
from interventions.ops import Ablate, Add, Const, Op, Patch, Read, Ref, SAESplice, produces
from interventions.ragged_layout import Prompts, placed, raw_pos
from interventions.selection import selected_shape
from interventions.sites import Index, PerPrompt, Select, Site, Span
from interventions.spec import GraphSpec, Run


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
class _Rewriter:
    """The new graph, built op by op onto the parts of the runs of ``prompts``."""

    prompts: Prompts
    padding_side: str
    info: ModelInfo | None
    merge: frozenset[str] = frozenset()  # runs run as one right-padded forward
    graph: GraphSpec = field(init=False)
    new: GraphSpec = field(init=False)
    parts: dict[str, tuple[Part, ...]] = field(default_factory=dict)
    assemblies: list[Assembly] = field(default_factory=list)
    internal: set[str] = field(default_factory=set)
    means: list[MeanSlot] = field(default_factory=list)
    derived: dict[str, list[Read]] = field(default_factory=dict)  # source read -> reads
    replaced: dict[int, list[Op]] = field(default_factory=dict)  # id(op) -> its ops
    taken: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.graph = self.prompts.graph
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

    def make_parts(self, name: str) -> None:
        run = self.graph.runs[name]
        n = self.prompts.n_rows(name)
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
        ids = self.prompts.inputs[name]
        ordered = self.prompts.groups(name)
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

    def parts_of(self, run: str) -> tuple[Part, ...]:
        """A split run's parts; an unsplit run is one part, itself."""
        if run in self.parts:
            return self.parts[run]
        n = self.prompts.n_rows(run)
        return (Part(run, tuple(range(n)), self.prompts.length(run, 0) if n else 0),)

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
            n = self.prompts.length(run, row)
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
        everything = self.prompts.n_rows(part.run) if part.width is not None else len(part.rows)
        if local == list(range(everything)):
            return None
        return tuple(local)

    def part_pos(self, op: Op, part: Part) -> Index:
        return placed(raw_pos(op, part), part)

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
        n = self.prompts.n_rows(op.run)
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
            lengths = tuple(self.prompts.length(op.run, r) for r in sel_rows)
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
        n_target = self.prompts.n_rows(target_run)
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
                pos = raw_pos(op, tp)
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
        rows, dropped = _rows_of(select.batch, self.prompts.n_rows(run), "value")
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
        n_t, n_s = self.prompts.n_rows(op.run), self.prompts.n_rows(source_run)
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
        n_t, n_s = self.prompts.n_rows(op.run), self.prompts.n_rows(source)
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
            pos = raw_pos(op, part)
            region = Select(pos=pos, head=op.select.head, dims=op.select.dims)
            key = self.tensor(torch.zeros(self.mean_shape(op.site, part.length, region)))
            self.means.append(MeanSlot(key, source, op.site, op.per_position, part.length, region))
            select = replace(
                op.select, batch=self.local_batch(part, picks, dropped), pos=placed(pos, part)
            )
            out.append(Patch(part.run, op.site, select, Const(key)))
        return out
