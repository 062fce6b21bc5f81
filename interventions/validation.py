"""One validation pass, before any backend sees a graph.

It checks sites, layer and head ranges, positions against sequence lengths, tensor and
SAE shapes, run order and the chosen backend's capabilities. Every error names the op
and the site, and lists the valid choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from interventions.architectures import HookPoint, ModelInfo, describe
from interventions.backends import Capabilities
from interventions.devices import input_device
from interventions.dry_run import Point, first_layer_problem, probe
from interventions.errors import InterventionError, UnsupportedOp, ValidationError, choices_text
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
from interventions.plan import Plan, generation_positions, make_plan
from interventions.ragged import needs_split, right_padding_exact, split_graph
from interventions.routing import check_expert_ids
from interventions.selection import selected_shape, site_axes
from interventions.sites import RESIDUAL, STANDARD_SITES, Select, Site, Span
from interventions.spec import GraphSpec


def _where(op: Op) -> str:
    sel = "" if op.select.is_all else " " + op.select.describe()
    return f"{op_kind(op)} on {op.run}.{op.site}{sel}"


# What the shape-only dry run measured at each (run, raw module site); None: not reached.
_Shapes = dict[tuple[str, Point], tuple[int, ...] | None]


def _raw_sizes(plan: Plan, op: Op, shapes: _Shapes) -> dict[str, int] | None:
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


def _axes(site: Site, sizes: dict[str, int]) -> tuple[str, ...]:
    """The axes of a site's tensor: a standard site's own, a raw site's as measured."""
    return tuple(sizes) if site.is_raw else site.kind.axes


def _axis_sizes(plan: Plan, op: Op, shapes: _Shapes) -> dict[str, int] | None:
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


def _region(
    plan: Plan, op: Op, select: Select, sizes: dict[str, int], run: str, *, own: bool = False
) -> tuple[int, ...]:
    """The shape ``select`` takes of the op's site; ``sizes`` of run ``run`` (``own``: they
    are that run's already, as a raw site's measured sizes are)."""
    axes = _axes(op.site, sizes)
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


def _who_can(test: Callable[[Capabilities], bool]) -> str:
    """Names of the loadable backends whose capabilities pass ``test``."""
    from interventions.backends import backend_capabilities

    names = [
        n for n, c in backend_capabilities().items() if isinstance(c, Capabilities) and test(c)
    ]
    return choices_text(names) or "none installed"


def _per_position_value(plan: Plan, op: Op) -> bool:
    """Does the op bring a value with its own position axis (which generated steps lack)?"""
    graph = plan.graph
    if isinstance(op, Ablate):
        return op.method == "resample" or (op.method == "mean" and op.per_position)
    if isinstance(op, Patch) and isinstance(op.value, Ref):
        return True
    const = op.value if isinstance(op, Patch) else op.direction if isinstance(op, Add) else None
    if isinstance(const, Const):
        shape = graph.tensors[const.tensor].shape
        axes = op.site.kind.axes
        # a constant broadcasts from the right; it has a position axis if it reaches it
        pos_from_right = len(axes) - axes.index("pos") if "pos" in axes else None
        return (
            pos_from_right is not None
            and len(shape) >= pos_from_right
            and (shape[len(shape) - pos_from_right] > 1)
        )
    return False


def _prompt_only(plan: Plan, op: Op) -> bool:
    prompt = plan.prompt_length(op.run)
    fed = prompt + (plan.graph.runs[op.run].max_new_tokens or 1) - 1
    if fed == prompt:  # one new token: only the prompt pass is ever fed
        return True
    if op.select.pos is None:
        return False
    positions = generation_positions(op.select.pos, prompt, fed)
    return positions is not None and all(0 <= p < prompt for p in positions)


def _runs_kind(caps: Capabilities, kind: str) -> bool:
    # a backend with gradients (grad=True) runs grad ops by client-side autograd
    return kind in caps.ops or (kind == "grad" and caps.gradients)


def _check_capabilities(op: Op, point: HookPoint, caps: Capabilities) -> None:
    if not _runs_kind(caps, op_kind(op)):
        raise UnsupportedOp(
            f"{_where(op)}: the backend cannot run {op_kind(op)!r}; backends that can: "
            f"{_who_can(lambda c: _runs_kind(c, op_kind(op)))}"
        )
    if point.view not in caps.views:
        raise UnsupportedOp(
            f"{_where(op)}: the backend cannot reach site {op.site.name!r}; backends that "
            f"can: {_who_can(lambda c: point.view in c.views)}"
        )
    if isinstance(op, SAESplice) and op.source is not None and not caps.sae_source:
        raise UnsupportedOp(
            f"{_where(op)}: the backend cannot run a cross-site sae_splice (source="
            f"{op.source}); backends that can: {_who_can(lambda c: c.sae_source)}"
        )
    if op.site.is_raw and not caps.raw_modules:
        raise UnsupportedOp(
            f"{_where(op)}: the backend does not support raw module sites; backends that "
            f"can: {_who_can(lambda c: c.raw_modules)}"
        )


_HEAD_SITES = ("head", "attn_pattern", "attn_scores")
_ROUTER_SITES = ("router_logits", "experts_chosen")


def _check_router_write(plan: Plan, op: Op) -> None:
    """A write to a router site re-runs the family's routing rule: refuse it where the map
    has none (a custom router), and refuse what cannot be expert ids."""
    if op.site.name not in _ROUTER_SITES or isinstance(op, (Read, Grad)):
        return
    info = plan.info
    if info.routing is None:
        arch = info.arch.name if info.arch is not None else "?"
        raise UnsupportedOp(
            f"{_where(op)}: writing {op.site.name!r} re-runs the router's top-k rule, and the "
            f"{arch} map of {info.class_name} has no routing rule for its router (a custom "
            "router, or its config lacks the rule's field); read the site, or register the "
            "map with routing=iv.RoutingRule(...)"
        )
    if op.site.name != "experts_chosen":
        return
    assert info.n_experts is not None and info.top_k is not None
    if not isinstance(op, Patch):
        raise ValidationError(
            f"{_where(op)}: expert ids can only be patched (ids from another run's "
            f"experts_chosen, or a constant of ids in 0..{info.n_experts - 1}), not "
            f"{op_kind(op)}; to change routing smoothly, write router_logits"
        )
    if isinstance(op.value, Const):
        ids = plan.graph.tensors[op.value.tensor]
        width = info.top_k if op.select.dims is None else ids.shape[-1] if ids.ndim else 1
        check_expert_ids(
            ids if ids.ndim else ids.reshape(1),
            f"{_where(op)}: the constant",
            info.n_experts,
            width,
        )
        return
    producer = plan.producers[op.value.read]
    if not isinstance(producer, Read) or producer.site.name != "experts_chosen":
        raise ValidationError(
            f"{_where(op)}: expert ids come from a read of experts_chosen (or a constant of "
            f"ids in 0..{info.n_experts - 1}); value {op.value.read!r} is from "
            f"{producer.run}.{producer.site}"
        )


def _check_site_rules(plan: Plan, op: Op) -> None:
    """Rules of the site and the run that hold whatever the op's kind."""
    run = plan.graph.runs[op.run]
    if op.site.name in ("attn_pattern", "attn_scores") and run.generates:
        raise ValidationError(
            f"{_where(op)}: attention patterns and scores cannot be used in a generating run"
        )
    if (
        op.site.name == "attn_scores"
        and isinstance(op, Ablate)
        and op.method == "mean"
        and not op.per_position
    ):
        raise ValidationError(
            f"{_where(op)}: a mean of attention scores over query positions mixes rows with "
            "different causal masks; pass per_position=True (the mean over prompts only)"
        )
    _check_router_write(plan, op)
    if isinstance(op, SAESplice) and op.features is not None and run.generates:
        raise ValidationError(f"{_where(op)}: features= cannot be recorded in a generating run")
    if run.generates and _per_position_value(plan, op) and not _prompt_only(plan, op):
        raise ValidationError(
            f"{_where(op)}: in a generating run, a value that differs by position can only "
            f"be applied at prompt positions (0..{plan.prompt_length(op.run) - 1}); select "
            "them with pos="
        )
    has_heads = not op.site.is_raw and "head" in op.site.kind.axes
    if has_heads and not plan.info.head_count(op.site):
        raise ValidationError(f"{_where(op)}: the model's config has no head count")
    if op.select.head is not None and not has_heads:
        internals = [
            n for n, k in STANDARD_SITES.items() if "head" in k.axes and n not in _HEAD_SITES
        ]
        raise ValidationError(
            f"{_where(op)}: head= only applies to the 'head', 'attn_pattern' and 'attn_scores' sites and "
            f"the attention internals ({choices_text(internals)})"
        )


@dataclass(frozen=True)
class _Target:
    """Where an op lands: its hook point, the site's axis sizes and the selected region."""

    point: HookPoint
    sizes: dict[str, int]
    region: tuple[int, ...]
    shapes: _Shapes  # the dry run's measurements, for values read at raw sites


def _const_shape(plan: Plan, const: Const) -> tuple[int, ...]:
    return tuple(plan.graph.tensors[const.tensor].shape)


def _feature_shape(plan: Plan, producer: SAESplice, target: _Target) -> tuple[int, ...]:
    """Shape of the feature activations an SAE splice records."""
    graph = plan.graph
    feature_sizes = _axis_sizes(plan, producer, target.shapes)
    if feature_sizes is None:  # a raw site not measured: the target's residual axes
        feature_sizes = {a: target.sizes[a] for a in RESIDUAL if a in target.sizes}
    w_enc = graph.tensors[dict(graph.saes[producer.sae].tensors)["W_enc"]]
    selected = _region(plan, producer, producer.select, feature_sizes, producer.run)
    return (*selected[:-1], int(w_enc.shape[1]))


def _read_shape(plan: Plan, op: Patch, source: Read, target: _Target) -> tuple[int, ...] | None:
    """Shape a read value takes when patched: aligned (whole read) or as it was selected
    (None: read at a raw site the dry run did not reach)."""
    assert isinstance(op.value, Ref)
    sizes = target.sizes
    src_sizes = _axis_sizes(plan, source, target.shapes)
    if src_sizes is None:
        return None
    if not source.select.is_all:
        return _region(plan, source, source.select, src_sizes, source.run)
    if source.site.is_raw or op.site.is_raw:
        return _raw_aligned_shape(plan, op, source, src_sizes, sizes)
    if source.site.kind.axes != op.site.kind.axes or plan.info.width(
        source.site
    ) != plan.info.width(op.site):
        raise ValidationError(
            f"{_where(op)}: value {op.value.read!r} is a whole {source.site} "
            f"and cannot be aligned with {op.site}; read it with a selector"
        )
    src_sizes = {**src_sizes, **{a: sizes[a] for a in ("head", "hidden") if a in sizes}}
    return _region(plan, op, op.select, src_sizes, source.run)


def _raw_aligned_shape(
    plan: Plan, op: Patch, source: Read, src_sizes: dict[str, int], sizes: dict[str, int]
) -> tuple[int, ...]:
    """An aligned patch with a raw site at either end: the read's whole tensor, taken with
    the patch's selector on the target's axes (as backends take it)."""
    src_axes = _axes(source.site, src_sizes)
    whole = tuple(src_sizes[a] for a in src_axes)
    if op.select.is_all:
        return whole
    if src_axes != _axes(op.site, sizes):
        assert isinstance(op.value, Ref)
        raise ValidationError(
            f"{_where(op)}: value {op.value.read!r} is a whole {source.site} of shape "
            f"{list(whole)} and cannot be aligned with {op.site}; read it with a selector"
        )
    return _region(plan, op, op.select, src_sizes, source.run, own=True)


def _check_patch(plan: Plan, op: Op, target: _Target) -> None:
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
                    f"{_where(op)}: value {op.value.read!r} from run {producer.run!r}: {exc}"
                ) from None
            if read_shape is None:
                return  # a raw site the dry run did not reach: its shape is unknown
            shape = read_shape
            what = f"value %{op.value.read} (from run {producer.run!r})"
    if not _fits(shape, target.region):
        raise ValidationError(
            f"{_where(op)}: {what} has shape {list(shape)} but the patched region is "
            f"{list(target.region)}"
        )


def _check_add(plan: Plan, op: Op, target: _Target) -> None:
    assert isinstance(op, Add)
    shape = _const_shape(plan, op.direction)
    if not _fits(shape, target.region):
        raise ValidationError(
            f"{_where(op)}: direction of shape {list(shape)} does not broadcast to the "
            f"selected region {list(target.region)}"
        )


def _check_project_out(plan: Plan, op: Op, target: _Target) -> None:
    assert isinstance(op, ProjectOut)
    shape, region = _const_shape(plan, op.direction), target.region
    if len(shape) not in (1, 2) or not region or shape[-1] != region[-1]:
        width = region[-1] if region else "?"
        raise ValidationError(
            f"{_where(op)}: direction must be [{width}] or [k, {width}], got {list(shape)}"
        )


def _check_ablate(plan: Plan, op: Op, target: _Target) -> None:
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
            f"{_where(op)}: {need} needs runs of equal length; {op.source!r} has "
            f"{plan.prompt_length(op.source)} positions and {op.run!r} has "
            f"{plan.prompt_length(op.run)}"
        )
    if plan.graph.runs[op.source].generates:
        raise ValidationError(f"{_where(op)}: the source run {op.source!r} must not generate")


def _check_sae_splice(plan: Plan, op: Op, target: _Target) -> None:
    assert isinstance(op, SAESplice)
    graph = plan.graph
    tensors = dict(graph.saes[op.sae].tensors)
    w_enc = graph.tensors.get(tensors.get("W_enc", ""))
    if w_enc is None or w_enc.ndim != 2:
        raise ValidationError(f"{_where(op)}: SAE {op.sae!r} has no 2-D W_enc")
    d_in, d_sae = int(w_enc.shape[0]), int(w_enc.shape[1])
    if op.source is None and (not target.region or target.region[-1] != d_in):
        raise ValidationError(
            f"{_where(op)}: SAE {op.sae!r} reads vectors of size {d_in} but the selected "
            f"region is {list(target.region)}"
        )
    w_dec = graph.tensors.get(tensors.get("W_dec", ""))
    if op.source is not None:
        _check_sae_source(plan, op, target, d_in, w_dec)
    elif w_dec is not None and w_dec.ndim == 2 and int(w_dec.shape[1]) != d_in:
        raise ValidationError(
            f"{_where(op)}: transcoder {op.sae!r} ({graph.saes[op.sae].kind}) writes vectors of "
            f"size {int(w_dec.shape[1])} into the region it reads, of size {d_in}"
        )
    for edit in op.edits:
        bad = [f for f in edit.features if f >= d_sae]
        if bad:
            raise ValidationError(
                f"{_where(op)}: feature(s) {bad} out of range; the SAE has features 0..{d_sae - 1}"
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
    plan: Plan, op: SAESplice, target: _Target, d_in: int, w_dec: torch.Tensor | None
) -> None:
    """A cross-site splice: the source exists, comes first, and has the SAE's input width."""
    assert op.source is not None
    for site, what in ((op.source, "source"), (op.site, "site")):
        if site.name in _PLAIN_SOURCE_SITES:
            raise ValidationError(
                f"{_where(op)}: a cross-site sae_splice reads and writes [batch, pos, d] sites; "
                f"its {what} {site} is not one"
            )
    if op.select.dims is not None or op.select.head is not None:
        raise ValidationError(
            f"{_where(op)}: a cross-site sae_splice takes no dims= or head= selection"
        )
    try:
        src_point = plan.info.hook_point(op.source)
    except InterventionError as exc:
        raise ValidationError(f"{_where(op)}: source: {exc}") from None
    src_rank, dst_rank = _forward_rank(op.source), _forward_rank(op.site)
    if src_rank is not None and dst_rank is not None and src_rank >= dst_rank:
        raise ValidationError(
            f"{_where(op)}: the source {op.source} does not come before {op.site} in the "
            "forward pass; a cross-site splice reads its source first"
        )
    if src_point == target.point:
        raise ValidationError(f"{_where(op)}: the source {op.source} is the same hook point")
    width = plan.info.width(op.source)
    if width is not None and width != d_in:
        raise ValidationError(
            f"{_where(op)}: SAE {op.sae!r} reads vectors of size {d_in} but its source "
            f"{op.source} has {width}"
        )
    d_out = int(w_dec.shape[1]) if w_dec is not None and w_dec.ndim == 2 else d_in
    if not target.region or target.region[-1] != d_out:
        raise ValidationError(
            f"{_where(op)}: SAE {op.sae!r} writes vectors of size {d_out} but the selected "
            f"region of {op.site} is {list(target.region)}"
        )


# What each kind of op checks about the value it brings, once its region is known (the
# way torch.fx's interpreter dispatches per node kind). Reads and scales bring no value.
_KIND_CHECKS: dict[type, Callable[[Plan, Op, _Target], None]] = {
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


def _check_grad(plan: Plan, op: Grad) -> None:
    """A grad op's metric: of a forward run of equal-length prompts, its token ids one per
    prompt (or one for all) and in the vocabulary, its position inside the prompt, and the
    same for every grad op of the run (one backward pass per run)."""
    run = plan.graph.runs[op.run]
    if run.generates:
        raise ValidationError(f"{_where(op)}: gradients need a run that does not generate")
    try:
        plan.info.hook_point(Site("logits"))
    except InterventionError as exc:
        raise ValidationError(f"{_where(op)}: the metric needs the model's logits: {exc}") from None
    first = next(o for o in plan.ops_of(op.run) if isinstance(o, Grad))
    if not _same_objective(plan.graph.tensors, first, op):
        raise ValidationError(
            f"{_where(op)}: every grad op of run {op.run!r} differentiates one metric (one "
            f"backward pass), but {first.name!r} and {op.name!r} name different ones"
        )
    batch, prompt = plan.batch_size(op.run), plan.prompt_length(op.run)
    for what, const in (("answer", op.answer), ("wrong", op.wrong)):
        if const is None:
            continue
        ids = plan.graph.tensors[const.tensor]
        if ids.dtype != torch.long or ids.ndim != 1 or ids.shape[0] not in (1, batch):
            raise ValidationError(
                f"{_where(op)}: metric {what} ids must be int64 [{batch}] (one per prompt) or "
                f"[1]; got {ids.dtype} {list(ids.shape)}"
            )
        vocab = plan.info.vocab
        if vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValidationError(
                f"{_where(op)}: metric {what} ids must be in 0..{vocab - 1}, found "
                f"{int(ids.min())}..{int(ids.max())}"
            )
    if not -prompt <= op.metric_pos < prompt:
        raise ValidationError(
            f"{_where(op)}: metric_pos {op.metric_pos} is outside the prompt "
            f"(positions {-prompt}..{prompt - 1})"
        )


_EDGE_DOWNSTREAM = ("q_input", "k_input", "v_input")


def _check_edge_patch(plan: Plan, op: EdgePatch) -> None:
    """An edge patch's two ends: a node output that exists, before a downstream input."""
    info, run = plan.info, plan.graph.runs[op.run]
    plan.info.hook_point(op.upstream)
    if op.upstream_head is not None and op.upstream_head >= (info.n_heads or 0):
        raise ValidationError(
            f"{_where(op)}: upstream head {op.upstream_head} is out of range; the model has "
            f"heads 0..{(info.n_heads or 0) - 1}"
        )
    if not op.site.is_raw and op.site.name not in _EDGE_DOWNSTREAM:
        raise ValidationError(
            f"{_where(op)}: an edge ends at a per-head input ({choices_text(_EDGE_DOWNSTREAM)}) "
            f"or at a raw '<norm>.input' site, not at {op.site.name!r}"
        )
    if op.site.is_raw and op.site.raw_parts[1] != "input":
        raise ValidationError(f"{_where(op)}: a raw edge end must be a module's '.input'")
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
            f"{_where(op)}: an edge patch selects "
            + ("one head (head=<int>)" if wanted else "nothing")
            + ", optionally a block of rows (batch=a:b), and nothing else"
            + f", got {op.select.describe() or 'no head'}"
        )
    if not op.site.is_raw:
        assert op.site.layer is not None and op.upstream.layer is not None
        start = -1 if op.upstream.name == "resid_pre" else op.upstream.layer
        if start >= op.site.layer:
            raise ValidationError(
                f"{_where(op)}: upstream {op.upstream} is not before {op.site}; an edge runs "
                "from an earlier layer's node (or the embeddings)"
            )
    if run.generates:
        raise ValidationError(f"{_where(op)}: edge patches need a run that does not generate")
    if op.source is not None:
        if plan.graph.runs[op.source].generates:
            raise ValidationError(f"{_where(op)}: the source run {op.source!r} must not generate")
        n = plan.batch_size(op.run)
        if isinstance(rows, Span):  # a block pairs its rows with the source's, in turn
            n = len(rows.indices(n))
        same = plan.prompt_length(op.source) == plan.prompt_length(op.run) and (
            n == plan.batch_size(op.source)
            or (rows is not None and n > 0 and n % plan.batch_size(op.source) == 0)
        )
        if op.method == "patch" and not same:
            raise ValidationError(
                f"{_where(op)}: patching an edge from {op.source!r} needs runs of one shape "
                f"(or a block of rows, batch=, a multiple of the source's); "
                f"{op.source!r} has {plan.batch_size(op.source)} x "
                f"{plan.prompt_length(op.source)} and {op.run!r} has {n} x "
                f"{plan.prompt_length(op.run)} (prompts x positions)"
            )


def _check_op(plan: Plan, op: Op, caps: Capabilities | None, shapes: _Shapes) -> None:
    point = plan.info.hook_point(op.site)
    if caps is not None:
        _check_capabilities(op, point, caps)
    _check_site_rules(plan, op)
    if isinstance(op, EdgePatch):
        _check_edge_patch(plan, op)
    if isinstance(op, Grad):
        _check_grad(plan, op)
    sizes = _axis_sizes(plan, op, shapes)
    if sizes is None:  # a raw module site the dry run did not reach: shapes unknown
        return
    measured = " (measured by a shape-only dry run)" if op.site.is_raw else ""
    try:
        region = _region(plan, op, op.select, sizes, op.run)
    except IndexError as exc:
        valid = {a: sizes[a] for a in _axes(op.site, sizes) if a in sizes}
        raise ValidationError(
            f"{_where(op)}: {exc}; axis sizes here are {valid}{measured}"
        ) from None
    except InterventionError as exc:
        raise ValidationError(f"{_where(op)}: {exc}{measured}") from None
    check = _KIND_CHECKS.get(type(op))
    if check is not None:
        check(plan, op, _Target(point, sizes, region, shapes))


def _raw_points(plan: Plan, run: str) -> set[Point]:
    """The raw module sites a run touches: its ops' sites (and cross-site sources), and the
    sites other runs capture from it."""
    sites: list[Site] = list(plan.captures_of(run))
    for op in plan.ops_of(run):
        sites.append(op.site)
        if isinstance(op, SAESplice) and op.source is not None:
            sites.append(op.source)
        if isinstance(op, EdgePatch):
            sites.append(op.upstream)
    return {s.raw_parts for s in sites if s.is_raw}


def _dry_run(plan: Plan, model: nn.Module, *, layers: bool, sites: bool) -> _Shapes:
    """Measure the raw module sites each run touches (``sites``) and refuse inputs the
    model's first layer cannot take (``layers``), with a shape-only dry run of each run
    that needs one (see :mod:`interventions.dry_run`): runs with raw sites, runs with
    ``inputs=``, and every run on a plain ``nn.Module``."""
    shapes: _Shapes = {}
    for name in plan.order:
        run = plan.graph.runs[name]
        points = _raw_points(plan, name) if sites else set()
        first = layers and (run.inputs is not None or not plan.info.is_hf)
        if not points and not first:
            continue
        inputs = plan.inputs[name]
        hf_ids = plan.info.is_hf and run.inputs is None  # as backends call the model
        found = probe(
            model, inputs, call="hf_ids" if hf_ids else "positional", points=points, first=first
        )
        if first and found.first is not None:
            problem = first_layer_problem(name, found.first, inputs)
            if problem is not None:
                raise ValidationError(problem)
        shapes.update({(name, point): shape for point, shape in found.shapes.items()})
    return shapes


def _fed_positions(run: Any, ids: torch.Tensor, lengths: Any) -> int:
    """How many positions the longest prompt of a run feeds (generated ones included)."""
    longest = max(lengths) if lengths else (int(ids.shape[1]) if ids.ndim >= 2 else 1)
    return int(longest) + (run.max_new_tokens - 1 if run.max_new_tokens else 0)


def validate(
    graph: GraphSpec,
    model: nn.Module,
    *,
    tokenizer: Any = None,
    backend: str | None = None,
    info: ModelInfo | None = None,
) -> Plan:
    """Check ``graph`` against ``model`` (and ``backend``'s capabilities); return the plan.

    To also measure how well every SAE the graph splices fits (on probe prompts), see
    :func:`interventions.sae.check.check_graph_saes`.

    >>> import torch, interventions as iv
    >>> g = iv.Graph()
    >>> _ = g.run("a", inputs=torch.zeros(1, 3, 4)).read("output")
    >>> iv.validate(g, torch.nn.Linear(4, 2)).order
    ('a',)
    """
    graph.check()
    info = info or describe(model)
    caps = None
    if backend is not None:
        from interventions.backends import get_backend

        caps = get_backend(backend).capabilities
        if caps.hf_only and not info.is_hf:
            raise UnsupportedOp(
                f"backend {backend!r} needs a HuggingFace model; {info.class_name} is a plain "
                "nn.Module. Use backend='torch'"
            )
        gens = [r.name for r in graph.runs.values() if r.generates]
        if gens and not caps.generation:
            raise UnsupportedOp(
                f"runs {choices_text(gens)} generate, which backend {backend!r} cannot"
            )
    gens = [r.name for r in graph.runs.values() if r.generates]
    if gens and not info.is_hf:
        raise ValidationError(
            f"runs {choices_text(gens)} generate, which needs a HuggingFace model with generate()"
        )
    plan = make_plan(graph, info, tokenizer)
    for name, ids in plan.inputs.items():
        run = graph.runs[name]
        if (
            run.inputs is None
            and info.vocab is not None
            and (ids.min() < 0 or ids.max() >= info.vocab)
        ):
            raise ValidationError(
                f"run {name!r}: token ids must be in 0..{info.vocab - 1}, found "
                f"{int(ids.min())}..{int(ids.max())}"
            )
        fed = _fed_positions(run, ids, plan.lengths.get(name))
        if run.inputs is None and info.max_positions is not None and fed > info.max_positions:
            extra = (
                f" ({fed - (run.max_new_tokens or 1) + 1} of prompt and {run.max_new_tokens - 1} generated)"
                if run.max_new_tokens
                else ""
            )
            raise ValidationError(
                f"run {name!r}: {fed} positions{extra} but {info.class_name} has learned "
                f"positions for {info.max_positions} only; shorten the prompts"
                + (" or max_new_tokens" if run.max_new_tokens else "")
            )
    ragged = [op for op in graph.ops if isinstance(op, Grad) and op.run in plan.lengths]
    if ragged:
        raise ValidationError(
            f"{_where(ragged[0])}: gradients need a run of prompts of one length; run "
            f"{ragged[0].run!r} has several (group prompts by length, as the recipes do)"
        )
    if needs_split(graph, plan.lengths):
        _dry_run(plan, model, layers=True, sites=False)
        split = split_graph(
            graph,
            plan.inputs,
            plan.lengths,
            plan.padding_side,
            info,
            merge=right_padding_exact(model, info),
            device=input_device(model).type,
        )
        plan = replace(make_plan(split.graph, info), assembly=split)
        shapes = _dry_run(plan, model, layers=False, sites=True)
        origin = {
            p.run: (run, p) for run, parts in split.parts.items() for p in parts if p.width is None
        }
        for op in split.graph.ops:
            try:
                _check_op(plan, op, caps, shapes)
            except ValidationError as exc:
                if op.run not in origin:
                    raise
                whole, part = origin[op.run]
                raise ValidationError(
                    f"{exc} [{op.run!r} is prompts {list(part.rows)[:8]}"
                    f"{'...' if len(part.rows) > 8 else ''} of run {whole!r}, {part.length} tokens]"
                ) from None
        return plan
    shapes = _dry_run(plan, model, layers=True, sites=True)
    for op in graph.ops:
        _check_op(plan, op, caps, shapes)
    return plan
