"""What each op kind needs of the model and the graph, with the shapes the validation
pass knows: the axis sizes of a site in a run (a standard site's from the model's
description, a raw site's as the shape-only dry run measured them), the region an op's
selector takes of it, and the checks of each kind of op on that region (a patch's value,
an added direction, an ablation's source, an SAE's width and source site, a gradient's
metric, an edge's upstream and downstream). :func:`interventions.validation.validate`
calls them op by op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from interventions.architectures import HookPoint
from interventions.dry_run import Point
from interventions.errors import InterventionError, ValidationError, choices_text
from interventions.ops import (
    Ablate,
    Add,
    Const,
    EdgePatch,
    Grad,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESplice,
    op_kind,
)
from interventions.plan import Plan, generation_positions
from interventions.selection import selected_shape, site_axes
from interventions.sites import RESIDUAL, Select, Site, Span


def where(op: Op) -> str:
    sel = "" if op.select.is_all else " " + op.select.describe()
    return f"{op_kind(op)} on {op.run}.{op.site}{sel}"


# What the shape-only dry run measured at each (run, raw module site); None: not reached.
Shapes = dict[tuple[str, Point], tuple[int, ...] | None]


def _raw_sizes(plan: Plan, op: Op, shapes: Shapes) -> dict[str, int] | None:
    """Axis sizes of a raw site's tensor in the op's run, as the dry run measured it (axes
    named as backends name them, see :func:`site_axes`), or None when it is unknown."""
    shape = shapes.get((op.run, op.site.raw_parts))
    if not shape:
        return None
    sizes = dict(zip(site_axes(op.site.kind, len(shape)), shape, strict=True))
    run = plan.graph.runs[op.run]
    if run.generates and "pos" in sizes:  # the prompt pass was measured; steps follow
        if sizes["pos"] != plan.prompt_length(op.run):
            return None
        sizes["pos"] += (run.max_new_tokens or 1) - 1
    return sizes


def axes_of(site: Site, sizes: dict[str, int]) -> tuple[str, ...]:
    """The axes of a site's tensor: a standard site's own, a raw site's as measured."""
    return tuple(sizes) if site.is_raw else site.kind.axes


def axis_sizes(plan: Plan, op: Op, shapes: Shapes) -> dict[str, int] | None:
    """Sizes of each axis of the op's site in its run (None for a raw site the dry run did
    not reach: unknown)."""
    info = plan.info
    if op.site.is_raw:
        return _raw_sizes(plan, op, shapes)
    batch, prompt = plan.batch_size(op.run), plan.prompt_length(op.run)
    run = plan.graph.runs[op.run]
    seq = prompt + (run.max_new_tokens - 1 if run.max_new_tokens else 0)
    sizes = {"batch": batch, "pos": seq, "key_pos": seq}
    if "head" in op.site.kind.axes:
        sizes["head"] = info.head_count(op.site) or 0
    width = info.width(op.site)
    if width is not None:
        sizes["hidden"] = width
    return sizes


def region_of(
    plan: Plan, op: Op, select: Select, sizes: dict[str, int], run: str, *, own: bool = False
) -> tuple[int, ...]:
    """The shape ``select`` takes of the op's site; ``sizes`` of run ``run`` (``own``: they
    are that run's already, as a raw site's measured sizes are)."""
    axes = axes_of(op.site, sizes)
    shape = [sizes[a] for a in axes]
    if run != op.run and not own and not op.site.is_raw:
        # a value from another run: that run's own batch and length
        other = plan.graph.runs[run]
        seq = plan.prompt_length(run) + (other.max_new_tokens - 1 if other.max_new_tokens else 0)
        shape = [
            plan.batch_size(run) if a == "batch" else seq if a in ("pos", "key_pos") else sizes[a]
            for a in axes
        ]
    gen = plan.graph.runs[run]
    if gen.generates and select.pos is not None and "pos" in axes:
        # positions in generation are absolute (negative: from the end of the prompt)
        positions = generation_positions(
            select.pos, plan.prompt_length(run), shape[axes.index("pos")]
        )
        assert positions is not None
        for p in positions:
            if not 0 <= p < shape[axes.index("pos")]:
                raise IndexError(
                    f"pos={p} is out of range for {shape[axes.index('pos')]} positions"
                )
        select = Select(
            select.batch,
            tuple(positions) if not isinstance(select.pos, int) else positions[0],
            select.head,
            select.dims,
        )
    return selected_shape(select, axes, shape)


def _fits(value: tuple[int, ...], region: tuple[int, ...]) -> bool:
    try:
        return torch.broadcast_shapes(value, region) == region
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Target:
    """Where an op lands: its hook point, the site's axis sizes and the selected region."""

    point: HookPoint
    sizes: dict[str, int]
    region: tuple[int, ...]
    shapes: Shapes  # the dry run's measurements, for values read at raw sites


def _const_shape(plan: Plan, const: Const) -> tuple[int, ...]:
    return tuple(plan.graph.tensors[const.tensor].shape)


def _feature_shape(plan: Plan, producer: SAESplice, target: Target) -> tuple[int, ...]:
    """Shape of the feature activations an SAE splice records."""
    graph = plan.graph
    feature_sizes = axis_sizes(plan, producer, target.shapes)
    if feature_sizes is None:  # a raw site not measured: the target's residual axes
        feature_sizes = {a: target.sizes[a] for a in RESIDUAL if a in target.sizes}
    w_enc = graph.tensors[dict(graph.saes[producer.sae].tensors)["W_enc"]]
    selected = region_of(plan, producer, producer.select, feature_sizes, producer.run)
    return (*selected[:-1], int(w_enc.shape[1]))


def _read_shape(plan: Plan, op: Patch, source: Read, target: Target) -> tuple[int, ...] | None:
    """Shape a read value takes when patched: aligned (whole read) or as it was selected
    (None: read at a raw site the dry run did not reach)."""
    assert isinstance(op.value, Ref)
    sizes = target.sizes
    src_sizes = axis_sizes(plan, source, target.shapes)
    if src_sizes is None:
        return None
    if not source.select.is_all:
        return region_of(plan, source, source.select, src_sizes, source.run)
    if source.site.is_raw or op.site.is_raw:
        return _raw_aligned_shape(plan, op, source, src_sizes, sizes)
    if source.site.kind.axes != op.site.kind.axes or plan.info.width(
        source.site
    ) != plan.info.width(op.site):
        raise ValidationError(
            f"{where(op)}: value {op.value.read!r} is a whole {source.site} "
            f"and cannot be aligned with {op.site}; read it with a selector"
        )
    src_sizes = {**src_sizes, **{a: sizes[a] for a in ("head", "hidden") if a in sizes}}
    return region_of(plan, op, op.select, src_sizes, source.run)


def _raw_aligned_shape(
    plan: Plan, op: Patch, source: Read, src_sizes: dict[str, int], sizes: dict[str, int]
) -> tuple[int, ...]:
    """An aligned patch with a raw site at either end: the read's whole tensor, taken with
    the patch's selector on the target's axes (as backends take it)."""
    src_axes = axes_of(source.site, src_sizes)
    whole = tuple(src_sizes[a] for a in src_axes)
    if op.select.is_all:
        return whole
    if src_axes != axes_of(op.site, sizes):
        assert isinstance(op.value, Ref)
        raise ValidationError(
            f"{where(op)}: value {op.value.read!r} is a whole {source.site} of shape "
            f"{list(whole)} and cannot be aligned with {op.site}; read it with a selector"
        )
    return region_of(plan, op, op.select, src_sizes, source.run, own=True)


def _check_patch(plan: Plan, op: Op, target: Target) -> None:
    assert isinstance(op, Patch)
    if isinstance(op.value, Const):
        shape = _const_shape(plan, op.value)
        what = f"constant %{op.value.tensor}"
    else:
        producer = plan.producers[op.value.read]
        if isinstance(producer, SAESplice):  # recorded features: placed as they are
            shape = _feature_shape(plan, producer, target)
            what = f"features %{op.value.read}"
        else:
            assert isinstance(producer, Read)
            try:
                read_shape = _read_shape(plan, op, producer, target)
            except IndexError as exc:
                raise ValidationError(
                    f"{where(op)}: value {op.value.read!r} from run {producer.run!r}: {exc}"
                ) from None
            if read_shape is None:
                return  # a raw site the dry run did not reach: its shape is unknown
            shape = read_shape
            what = f"value %{op.value.read} (from run {producer.run!r})"
    if not _fits(shape, target.region):
        raise ValidationError(
            f"{where(op)}: {what} has shape {list(shape)} but the patched region is "
            f"{list(target.region)}"
        )


def _check_add(plan: Plan, op: Op, target: Target) -> None:
    assert isinstance(op, Add)
    shape = _const_shape(plan, op.direction)
    if not _fits(shape, target.region):
        raise ValidationError(
            f"{where(op)}: direction of shape {list(shape)} does not broadcast to the "
            f"selected region {list(target.region)}"
        )


def _check_project_out(plan: Plan, op: Op, target: Target) -> None:
    assert isinstance(op, ProjectOut)
    shape, region = _const_shape(plan, op.direction), target.region
    if len(shape) not in (1, 2) or not region or shape[-1] != region[-1]:
        width = region[-1] if region else "?"
        raise ValidationError(
            f"{where(op)}: direction must be [{width}] or [k, {width}], got {list(shape)}"
        )


def _check_ablate(plan: Plan, op: Op, target: Target) -> None:
    assert isinstance(op, Ablate)
    if op.source is None:
        return
    same_length = plan.prompt_length(op.source) == plan.prompt_length(op.run)
    need = (
        "per-position mean"
        if op.method == "mean" and op.per_position
        else "resampling"
        if op.method == "resample"
        else None
    )
    if need is not None and not same_length:
        raise ValidationError(
            f"{where(op)}: {need} needs runs of equal length; {op.source!r} has "
            f"{plan.prompt_length(op.source)} positions and {op.run!r} has "
            f"{plan.prompt_length(op.run)}"
        )
    if plan.graph.runs[op.source].generates:
        raise ValidationError(f"{where(op)}: the source run {op.source!r} must not generate")


def _check_sae_splice(plan: Plan, op: Op, target: Target) -> None:
    assert isinstance(op, SAESplice)
    graph = plan.graph
    tensors = dict(graph.saes[op.sae].tensors)
    w_enc = graph.tensors.get(tensors.get("W_enc", ""))
    if w_enc is None or w_enc.ndim != 2:
        raise ValidationError(f"{where(op)}: SAE {op.sae!r} has no 2-D W_enc")
    d_in, d_sae = int(w_enc.shape[0]), int(w_enc.shape[1])
    if op.source is None and (not target.region or target.region[-1] != d_in):
        raise ValidationError(
            f"{where(op)}: SAE {op.sae!r} reads vectors of size {d_in} but the selected "
            f"region is {list(target.region)}"
        )
    w_dec = graph.tensors.get(tensors.get("W_dec", ""))
    if op.source is not None:
        _check_sae_source(plan, op, target, d_in, w_dec)
    elif w_dec is not None and w_dec.ndim == 2 and int(w_dec.shape[1]) != d_in:
        raise ValidationError(
            f"{where(op)}: transcoder {op.sae!r} ({graph.saes[op.sae].kind}) writes vectors of "
            f"size {int(w_dec.shape[1])} into the region it reads, of size {d_in}"
        )
    for edit in op.edits:
        bad = [f for f in edit.features if f >= d_sae]
        if bad:
            raise ValidationError(
                f"{where(op)}: feature(s) {bad} out of range; the SAE has features 0..{d_sae - 1}"
            )


# Where a standard site sits within its layer, in forward order (None: outside the layers).
_SITE_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_hidden": 2, "mlp_out": 3, "resid_post": 4}
_PLAIN_SOURCE_SITES = ("head", "attn_pattern", "attn_scores")


def _forward_rank(site: Site) -> tuple[float, float] | None:
    if site.is_raw:
        return None
    if site.name == "embed":
        return (-1.0, 0.0)
    if site.name in ("final_norm", "logits"):
        return (float("inf"), float(site.name == "logits"))
    if site.name in _SITE_ORDER and site.layer is not None:
        return (float(site.layer), float(_SITE_ORDER[site.name]))
    return None


def _check_sae_source(
    plan: Plan, op: SAESplice, target: Target, d_in: int, w_dec: torch.Tensor | None
) -> None:
    """A cross-site splice: the source exists, comes first, and has the SAE's input width."""
    assert op.source is not None
    for site, what in ((op.source, "source"), (op.site, "site")):
        if site.name in _PLAIN_SOURCE_SITES:
            raise ValidationError(
                f"{where(op)}: a cross-site sae_splice reads and writes [batch, pos, d] sites; "
                f"its {what} {site} is not one"
            )
    if op.select.dims is not None or op.select.head is not None:
        raise ValidationError(
            f"{where(op)}: a cross-site sae_splice takes no dims= or head= selection"
        )
    try:
        src_point = plan.info.hook_point(op.source)
    except InterventionError as exc:
        raise ValidationError(f"{where(op)}: source: {exc}") from None
    src_rank, dst_rank = _forward_rank(op.source), _forward_rank(op.site)
    if src_rank is not None and dst_rank is not None and src_rank >= dst_rank:
        raise ValidationError(
            f"{where(op)}: the source {op.source} does not come before {op.site} in the "
            "forward pass; a cross-site splice reads its source first"
        )
    if src_point == target.point:
        raise ValidationError(f"{where(op)}: the source {op.source} is the same hook point")
    width = plan.info.width(op.source)
    if width is not None and width != d_in:
        raise ValidationError(
            f"{where(op)}: SAE {op.sae!r} reads vectors of size {d_in} but its source "
            f"{op.source} has {width}"
        )
    d_out = int(w_dec.shape[1]) if w_dec is not None and w_dec.ndim == 2 else d_in
    if not target.region or target.region[-1] != d_out:
        raise ValidationError(
            f"{where(op)}: SAE {op.sae!r} writes vectors of size {d_out} but the selected "
            f"region of {op.site} is {list(target.region)}"
        )


# What each kind of op checks about the value it brings, once its region is known (the
# way torch.fx's interpreter dispatches per node kind). Reads and scales bring no value.
KIND_CHECKS: dict[type, Callable[[Plan, Op, Target], None]] = {
    Patch: _check_patch,
    Add: _check_add,
    ProjectOut: _check_project_out,
    Ablate: _check_ablate,
    SAESplice: _check_sae_splice,
}


def _same_objective(tensors: dict[str, torch.Tensor], a: Grad, b: Grad) -> bool:
    """One metric: the same kind and position, and token ids equal by value (two ops may
    hold equal ids under different tensor keys)."""

    def ids(const: Const | None) -> torch.Tensor | None:
        return None if const is None else tensors[const.tensor]

    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None) == (y is None) and (x is None or y is None or torch.equal(x, y))

    return (
        (a.metric, a.metric_pos) == (b.metric, b.metric_pos)
        and same(ids(a.answer), ids(b.answer))
        and same(ids(a.wrong), ids(b.wrong))
    )


def check_grad(plan: Plan, op: Grad) -> None:
    """A grad op's metric: of a forward run of equal-length prompts, its token ids one per
    prompt (or one for all) and in the vocabulary, its position inside the prompt, and the
    same for every grad op of the run (one backward pass per run)."""
    run = plan.graph.runs[op.run]
    if run.generates:
        raise ValidationError(f"{where(op)}: gradients need a run that does not generate")
    try:
        plan.info.hook_point(Site("logits"))
    except InterventionError as exc:
        raise ValidationError(f"{where(op)}: the metric needs the model's logits: {exc}") from None
    first = next(o for o in plan.ops_of(op.run) if isinstance(o, Grad))
    if not _same_objective(plan.graph.tensors, first, op):
        raise ValidationError(
            f"{where(op)}: every grad op of run {op.run!r} differentiates one metric (one "
            f"backward pass), but {first.name!r} and {op.name!r} name different ones"
        )
    batch, prompt = plan.batch_size(op.run), plan.prompt_length(op.run)
    for what, const in (("answer", op.answer), ("wrong", op.wrong)):
        if const is None:
            continue
        ids = plan.graph.tensors[const.tensor]
        if ids.dtype != torch.long or ids.ndim != 1 or ids.shape[0] not in (1, batch):
            raise ValidationError(
                f"{where(op)}: metric {what} ids must be int64 [{batch}] (one per prompt) or "
                f"[1]; got {ids.dtype} {list(ids.shape)}"
            )
        vocab = plan.info.vocab
        if vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValidationError(
                f"{where(op)}: metric {what} ids must be in 0..{vocab - 1}, found "
                f"{int(ids.min())}..{int(ids.max())}"
            )
    if not -prompt <= op.metric_pos < prompt:
        raise ValidationError(
            f"{where(op)}: metric_pos {op.metric_pos} is outside the prompt "
            f"(positions {-prompt}..{prompt - 1})"
        )


_EDGE_DOWNSTREAM = ("q_input", "k_input", "v_input")


def check_edge_patch(plan: Plan, op: EdgePatch) -> None:
    """An edge patch's two ends: a node output that exists, before a downstream input."""
    info, run = plan.info, plan.graph.runs[op.run]
    plan.info.hook_point(op.upstream)
    if op.upstream_head is not None and op.upstream_head >= (info.n_heads or 0):
        raise ValidationError(
            f"{where(op)}: upstream head {op.upstream_head} is out of range; the model has "
            f"heads 0..{(info.n_heads or 0) - 1}"
        )
    if not op.site.is_raw and op.site.name not in _EDGE_DOWNSTREAM:
        raise ValidationError(
            f"{where(op)}: an edge ends at a per-head input ({choices_text(_EDGE_DOWNSTREAM)}) "
            f"or at a raw '<norm>.input' site, not at {op.site.name!r}"
        )
    if op.site.is_raw and op.site.raw_parts[1] != "input":
        raise ValidationError(f"{where(op)}: a raw edge end must be a module's '.input'")
    wanted = "head" if not op.site.is_raw else None
    # batch=: a block of rows (a step-1 span), e.g. one candidate's of ACDC's stacked pass
    rows = op.select.batch
    block = isinstance(rows, Span) and rows.step in (None, 1)
    given = [k for k, v in op.select.items() if v is not None and k != "batch"]
    if (
        given != ([wanted] if wanted else [])
        or (wanted and not isinstance(op.select.head, int))
        or (rows is not None and not block)
    ):
        raise ValidationError(
            f"{where(op)}: an edge patch selects "
            + ("one head (head=<int>)" if wanted else "nothing")
            + ", optionally a block of rows (batch=a:b), and nothing else"
            + f", got {op.select.describe() or 'no head'}"
        )
    if not op.site.is_raw:
        assert op.site.layer is not None and op.upstream.layer is not None
        start = -1 if op.upstream.name == "resid_pre" else op.upstream.layer
        if start >= op.site.layer:
            raise ValidationError(
                f"{where(op)}: upstream {op.upstream} is not before {op.site}; an edge runs "
                "from an earlier layer's node (or the embeddings)"
            )
    if run.generates:
        raise ValidationError(f"{where(op)}: edge patches need a run that does not generate")
    if op.source is not None:
        if plan.graph.runs[op.source].generates:
            raise ValidationError(f"{where(op)}: the source run {op.source!r} must not generate")
        n = plan.batch_size(op.run)
        if isinstance(rows, Span):  # a block pairs its rows with the source's, in turn
            n = len(rows.indices(n))
        same = plan.prompt_length(op.source) == plan.prompt_length(op.run) and (
            n == plan.batch_size(op.source)
            or (rows is not None and n > 0 and n % plan.batch_size(op.source) == 0)
        )
        if op.method == "patch" and not same:
            raise ValidationError(
                f"{where(op)}: patching an edge from {op.source!r} needs runs of one shape "
                f"(or a block of rows, batch=, a multiple of the source's); "
                f"{op.source!r} has {plan.batch_size(op.source)} x "
                f"{plan.prompt_length(op.source)} and {op.run!r} has {n} x "
                f"{plan.prompt_length(op.run)} (prompts x positions)"
            )
