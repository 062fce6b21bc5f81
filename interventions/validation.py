"""One validation pass, before any backend sees a graph.

It checks sites, layer and head ranges, positions against sequence lengths, tensor and
SAE shapes, run order and the chosen backend's capabilities. Every error names the op
and the site, and lists the valid choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from interventions.architectures import HookPoint, ModelInfo, describe
from interventions.backends import Capabilities
from interventions.errors import InterventionError, UnsupportedOp, ValidationError, choices_text
from interventions.graph import Graph
from interventions.ops import (
    Ablate,
    Add,
    Const,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESplice,
    op_kind,
)
from interventions.plan import Plan, generation_positions, make_plan
from interventions.sites import Select, selected_shape


def _where(op: Op) -> str:
    sel = "" if op.select.is_all else " " + op.select.describe()
    return f"{op_kind(op)} on {op.run}.{op.site}{sel}"


def _axis_sizes(plan: Plan, op: Op, point: HookPoint) -> dict[str, int] | None:
    """Sizes of each axis of the op's site in its run (None for raw sites: unknown)."""
    info = plan.info
    if op.site.is_raw:
        return None
    batch, prompt = plan.batch_size(op.run), plan.prompt_length(op.run)
    run = plan.graph.runs[op.run]
    seq = prompt + (run.max_new_tokens - 1 if run.max_new_tokens else 0)
    sizes = {"batch": batch, "pos": seq, "key_pos": seq}
    if op.site.name in ("head", "attn_pattern"):
        sizes["head"] = info.n_heads or 0
    width = info.width(op.site)
    if width is not None:
        sizes["hidden"] = width
    return sizes


def _region(plan: Plan, op: Op, select: Select, sizes: dict[str, int], run: str) -> tuple[int, ...]:
    axes = op.site.kind.axes
    shape = [sizes[a] for a in axes]
    if run != op.run:  # a value from another run: that run's own batch and length
        other = plan.graph.runs[run]
        seq = plan.prompt_length(run) + (other.max_new_tokens - 1 if other.max_new_tokens else 0)
        shape = [
            plan.batch_size(run) if a == "batch" else seq if a in ("pos", "key_pos") else sizes[a]
            for a in axes
        ]
    gen = plan.graph.runs[run]
    if gen.generates and select.pos is not None:
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


def _check_op(plan: Plan, op: Op, caps: Any) -> None:
    info = plan.info
    graph = plan.graph
    run = graph.runs[op.run]
    point = info.hook_point(op.site)
    if caps is not None:
        if op_kind(op) not in caps.ops:
            raise UnsupportedOp(
                f"{_where(op)}: the backend cannot run {op_kind(op)!r}; backends that can: "
                f"{_who_can(lambda c: op_kind(op) in c.ops)}"
            )
        if point.view not in caps.views:
            raise UnsupportedOp(
                f"{_where(op)}: the backend cannot reach site {op.site.name!r}; backends that "
                f"can: {_who_can(lambda c: point.view in c.views)}"
            )
        if op.site.is_raw and not caps.raw_modules:
            raise UnsupportedOp(
                f"{_where(op)}: the backend does not support raw module sites; backends that "
                f"can: {_who_can(lambda c: c.raw_modules)}"
            )
    if op.site.name == "attn_pattern" and run.generates:
        raise ValidationError(
            f"{_where(op)}: attention patterns cannot be read in a generating run"
        )
    if isinstance(op, SAESplice) and op.features is not None and run.generates:
        raise ValidationError(f"{_where(op)}: features= cannot be recorded in a generating run")
    if run.generates and _per_position_value(plan, op) and not _prompt_only(plan, op):
        raise ValidationError(
            f"{_where(op)}: in a generating run, a value that differs by position can only "
            f"be applied at prompt positions (0..{plan.prompt_length(op.run) - 1}); select "
            "them with pos="
        )
    if op.site.name in ("head", "attn_pattern") and not info.n_heads:
        raise ValidationError(f"{_where(op)}: the model's config has no head count")
    if op.select.head is not None and op.site.name not in ("head", "attn_pattern"):
        raise ValidationError(
            f"{_where(op)}: head= only applies to the 'head' and 'attn_pattern' sites"
        )
    sizes = _axis_sizes(plan, op, point)
    if sizes is None:
        if op.select.head is not None:
            raise ValidationError(
                f"{_where(op)}: head= only applies to the 'head' and 'attn_pattern' sites"
            )
        return
    try:
        region = _region(plan, op, op.select, sizes, op.run)
    except IndexError as exc:
        valid = {a: sizes[a] for a in op.site.kind.axes if a in sizes}
        raise ValidationError(f"{_where(op)}: {exc}; axis sizes here are {valid}") from None
    except InterventionError as exc:
        raise ValidationError(f"{_where(op)}: {exc}") from None

    def const_shape(c: Const) -> tuple[int, ...]:
        return tuple(graph.tensors[c.tensor].shape)

    if isinstance(op, Patch):
        if isinstance(op.value, Const):
            shape = const_shape(op.value)
        else:
            producer = plan.producers[op.value.read]
            if isinstance(producer, SAESplice):  # recorded features: placed as they are
                feature_sizes = _axis_sizes(plan, producer, point) or sizes
                w_enc = graph.tensors[dict(graph.saes[producer.sae].tensors)["W_enc"]]
                selected = _region(plan, producer, producer.select, feature_sizes, producer.run)
                shape = (*selected[:-1], int(w_enc.shape[1]))
                if not _fits(shape, region):
                    raise ValidationError(
                        f"{_where(op)}: features %{op.value.read} have shape {list(shape)} but "
                        f"the patched region is {list(region)}"
                    )
                return
            assert isinstance(producer, Read)
            source = producer
            if source.site.is_raw:
                return
            src_sizes = _axis_sizes(plan, source, point) or sizes
            src_sizes = {**src_sizes, **{a: sizes[a] for a in ("head", "hidden") if a in sizes}}
            try:
                if source.select.is_all:
                    if source.site.kind.axes != op.site.kind.axes or info.width(
                        source.site
                    ) != info.width(op.site):
                        raise ValidationError(
                            f"{_where(op)}: value {op.value.read!r} is a whole {source.site} "
                            f"and cannot be aligned with {op.site}; read it with a selector"
                        )
                    shape = _region(plan, op, op.select, src_sizes, source.run)
                else:
                    shape = _region(
                        plan,
                        source,
                        source.select,
                        _axis_sizes(plan, source, point) or sizes,
                        source.run,
                    )
            except IndexError as exc:
                raise ValidationError(
                    f"{_where(op)}: value {op.value.read!r} from run {source.run!r}: {exc}"
                ) from None
        if not _fits(shape, region):
            what = (
                f"value %{op.value.read} (from run {source.run!r})"
                if isinstance(op.value, Ref)
                else f"constant %{op.value.tensor}"
            )
            raise ValidationError(
                f"{_where(op)}: {what} has shape {list(shape)} but the patched region is "
                f"{list(region)}"
            )
    elif isinstance(op, Add):
        shape = const_shape(op.direction)
        if not _fits(shape, region):
            raise ValidationError(
                f"{_where(op)}: direction of shape {list(shape)} does not broadcast to the "
                f"selected region {list(region)}"
            )
    elif isinstance(op, ProjectOut):
        shape = const_shape(op.direction)
        if len(shape) not in (1, 2) or not region or shape[-1] != region[-1]:
            raise ValidationError(
                f"{_where(op)}: direction must be [{region[-1] if region else '?'}] or "
                f"[k, {region[-1] if region else '?'}], got {list(shape)}"
            )
    elif isinstance(op, Ablate) and op.source is not None:
        src = graph.runs[op.source]
        if (
            op.method == "mean"
            and op.per_position
            and plan.prompt_length(op.source) != plan.prompt_length(op.run)
        ):
            raise ValidationError(
                f"{_where(op)}: per-position mean needs runs of equal length; {op.source!r} has "
                f"{plan.prompt_length(op.source)} positions and {op.run!r} has {plan.prompt_length(op.run)}"
            )
        if op.method == "resample" and plan.prompt_length(op.source) != plan.prompt_length(op.run):
            raise ValidationError(
                f"{_where(op)}: resampling needs runs of equal length; {op.source!r} has "
                f"{plan.prompt_length(op.source)} positions and {op.run!r} has {plan.prompt_length(op.run)}"
            )
        if src.generates:
            raise ValidationError(f"{_where(op)}: the source run {op.source!r} must not generate")
    elif isinstance(op, SAESplice):
        spec = graph.saes[op.sae]
        tensors = dict(spec.tensors)
        sae_w_enc = graph.tensors.get(tensors.get("W_enc", ""))
        if sae_w_enc is None or sae_w_enc.ndim != 2:
            raise ValidationError(f"{_where(op)}: SAE {op.sae!r} has no 2-D W_enc")
        d_in, d_sae = int(sae_w_enc.shape[0]), int(sae_w_enc.shape[1])
        if not region or region[-1] != d_in:
            raise ValidationError(
                f"{_where(op)}: SAE {op.sae!r} reads vectors of size {d_in} but the selected "
                f"region is {list(region)}"
            )
        w_dec = graph.tensors.get(tensors.get("W_dec", ""))
        if w_dec is not None and w_dec.ndim == 2 and int(w_dec.shape[1]) != d_in:
            raise ValidationError(
                f"{_where(op)}: transcoder {op.sae!r} ({spec.kind}) writes vectors of size "
                f"{int(w_dec.shape[1])} into the region it reads, of size {d_in}"
            )
        for edit in op.edits:
            bad = [f for f in edit.features if f >= d_sae]
            if bad:
                raise ValidationError(
                    f"{_where(op)}: feature(s) {bad} out of range; the SAE has features 0..{d_sae - 1}"
                )


def validate(
    graph: Graph,
    model: nn.Module,
    *,
    tokenizer: Any = None,
    backend: str | None = None,
    info: ModelInfo | None = None,
) -> Plan:
    """Check ``graph`` against ``model`` (and ``backend``'s capabilities); return the plan.

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
    for op in graph.ops:
        _check_op(plan, op, caps)
    return plan
