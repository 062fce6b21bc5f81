"""One validation pass, before any backend sees a graph.

It checks sites, layer and head ranges, positions against sequence lengths, tensor and
SAE shapes, run order and the chosen backend's capabilities. Every error names the op
and the site, and lists the valid choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from interventions.architectures import HookPoint, ModelInfo, describe
from interventions.backends import Capabilities
from interventions.devices import input_device
from interventions.dry_run import Point, first_layer_problem, probe
from interventions.errors import InterventionError, UnsupportedOp, ValidationError, choices_text
from interventions.op_checks import (
    KIND_CHECKS,
    Shapes,
    Target,
    axes_of,
    axis_sizes,
    check_edge_patch,
    check_grad,
    region_of,
    where,
)
from interventions.ops import (
    Ablate,
    Add,
    Const,
    EdgePatch,
    Grad,
    Op,
    Patch,
    Read,
    Ref,
    SAESplice,
    op_kind,
)
from interventions.plan import Plan, generation_positions, make_plan
from interventions.ragged import needs_split, split_graph
from interventions.ragged_layout import right_padding_exact
from interventions.routing import check_expert_ids
from interventions.sites import STANDARD_SITES, Site
from interventions.spec import GraphSpec


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
            f"{where(op)}: the backend cannot run {op_kind(op)!r}; backends that can: "
            f"{_who_can(lambda c: _runs_kind(c, op_kind(op)))}"
        )
    if point.view not in caps.views:
        raise UnsupportedOp(
            f"{where(op)}: the backend cannot reach site {op.site.name!r}; backends that "
            f"can: {_who_can(lambda c: point.view in c.views)}"
        )
    if isinstance(op, SAESplice) and op.source is not None and not caps.sae_source:
        raise UnsupportedOp(
            f"{where(op)}: the backend cannot run a cross-site sae_splice (source="
            f"{op.source}); backends that can: {_who_can(lambda c: c.sae_source)}"
        )
    if op.site.is_raw and not caps.raw_modules:
        raise UnsupportedOp(
            f"{where(op)}: the backend does not support raw module sites; backends that "
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
            f"{where(op)}: writing {op.site.name!r} re-runs the router's top-k rule, and the "
            f"{arch} map of {info.class_name} has no routing rule for its router (a custom "
            "router, or its config lacks the rule's field); read the site, or register the "
            "map with routing=iv.RoutingRule(...)"
        )
    if op.site.name != "experts_chosen":
        return
    assert info.n_experts is not None and info.top_k is not None
    if not isinstance(op, Patch):
        raise ValidationError(
            f"{where(op)}: expert ids can only be patched (ids from another run's "
            f"experts_chosen, or a constant of ids in 0..{info.n_experts - 1}), not "
            f"{op_kind(op)}; to change routing smoothly, write router_logits"
        )
    if isinstance(op.value, Const):
        ids = plan.graph.tensors[op.value.tensor]
        width = info.top_k if op.select.dims is None else ids.shape[-1] if ids.ndim else 1
        check_expert_ids(
            ids if ids.ndim else ids.reshape(1),
            f"{where(op)}: the constant",
            info.n_experts,
            width,
        )
        return
    producer = plan.producers[op.value.read]
    if not isinstance(producer, Read) or producer.site.name != "experts_chosen":
        raise ValidationError(
            f"{where(op)}: expert ids come from a read of experts_chosen (or a constant of "
            f"ids in 0..{info.n_experts - 1}); value {op.value.read!r} is from "
            f"{producer.run}.{producer.site}"
        )


def _check_site_rules(plan: Plan, op: Op) -> None:
    """Rules of the site and the run that hold whatever the op's kind."""
    run = plan.graph.runs[op.run]
    if op.site.name in ("attn_pattern", "attn_scores") and run.generates:
        raise ValidationError(
            f"{where(op)}: attention patterns and scores cannot be used in a generating run"
        )
    if (
        op.site.name == "attn_scores"
        and isinstance(op, Ablate)
        and op.method == "mean"
        and not op.per_position
    ):
        raise ValidationError(
            f"{where(op)}: a mean of attention scores over query positions mixes rows with "
            "different causal masks; pass per_position=True (the mean over prompts only)"
        )
    _check_router_write(plan, op)
    if isinstance(op, SAESplice) and op.features is not None and run.generates:
        raise ValidationError(f"{where(op)}: features= cannot be recorded in a generating run")
    if run.generates and _per_position_value(plan, op) and not _prompt_only(plan, op):
        raise ValidationError(
            f"{where(op)}: in a generating run, a value that differs by position can only "
            f"be applied at prompt positions (0..{plan.prompt_length(op.run) - 1}); select "
            "them with pos="
        )
    has_heads = not op.site.is_raw and "head" in op.site.kind.axes
    if has_heads and not plan.info.head_count(op.site):
        raise ValidationError(f"{where(op)}: the model's config has no head count")
    if op.select.head is not None and not has_heads:
        internals = [
            n for n, k in STANDARD_SITES.items() if "head" in k.axes and n not in _HEAD_SITES
        ]
        raise ValidationError(
            f"{where(op)}: head= only applies to the 'head', 'attn_pattern' and 'attn_scores' sites and "
            f"the attention internals ({choices_text(internals)})"
        )


def _check_op(plan: Plan, op: Op, caps: Capabilities | None, shapes: Shapes) -> None:
    point = plan.info.hook_point(op.site)
    if caps is not None:
        _check_capabilities(op, point, caps)
    _check_site_rules(plan, op)
    if isinstance(op, EdgePatch):
        check_edge_patch(plan, op)
    if isinstance(op, Grad):
        check_grad(plan, op)
    sizes = axis_sizes(plan, op, shapes)
    if sizes is None:  # a raw module site the dry run did not reach: shapes unknown
        return
    measured = " (measured by a shape-only dry run)" if op.site.is_raw else ""
    try:
        region = region_of(plan, op, op.select, sizes, op.run)
    except IndexError as exc:
        valid = {a: sizes[a] for a in axes_of(op.site, sizes) if a in sizes}
        raise ValidationError(
            f"{where(op)}: {exc}; axis sizes here are {valid}{measured}"
        ) from None
    except InterventionError as exc:
        raise ValidationError(f"{where(op)}: {exc}{measured}") from None
    check = KIND_CHECKS.get(type(op))
    if check is not None:
        check(plan, op, Target(point, sizes, region, shapes))


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


def _dry_run(plan: Plan, model: nn.Module, *, layers: bool, sites: bool) -> Shapes:
    """Measure the raw module sites each run touches (``sites``) and refuse inputs the
    model's first layer cannot take (``layers``), with a shape-only dry run of each run
    that needs one (see :mod:`interventions.dry_run`): runs with raw sites, runs with
    ``inputs=``, and every run on a plain ``nn.Module``."""
    shapes: Shapes = {}
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
            f"{where(ragged[0])}: gradients need a run of prompts of one length; run "
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
