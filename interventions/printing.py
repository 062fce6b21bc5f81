"""Graphs as readable text: one line per run and per op, the way torch.fx prints nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from interventions.ops import (
    Ablate,
    Add,
    EdgePatch,
    Grad,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESplice,
    Scale,
    Value,
)

if TYPE_CHECKING:
    from interventions.spec import GraphSpec, Run


def _tensor(graph: GraphSpec, key: str) -> str:
    tensor = graph.tensors.get(key)
    if tensor is None:
        return f"%{key} <missing>"
    dtype = str(tensor.dtype).removeprefix("torch.")
    return f"%{key} {dtype}{list(tensor.shape)}"


def _value(graph: GraphSpec, value: Value) -> str:
    if isinstance(value, Ref):
        return f"%{value.read}"
    return _tensor(graph, value.tensor)


def format_run(graph: GraphSpec, run: Run, width: int) -> str:
    if run.tokens is not None:
        source = f"tokens={_tensor(graph, run.tokens)}"
        lengths = graph.tensors.get(run.lengths) if run.lengths is not None else None
        if lengths is not None and lengths.numel():
            source += f" lengths={int(lengths.min())}..{int(lengths.max())}"
    elif run.inputs is not None:
        source = f"inputs={_tensor(graph, run.inputs)}"
    else:
        texts = run.text or ()
        shown = ", ".join(repr(t if len(t) <= 40 else t[:37] + "...") for t in texts[:3])
        more = f", ... ({len(texts)} prompts)" if len(texts) > 3 else ""
        source = f"text=[{shown}{more}]"
    gen = f" generate max_new_tokens={run.max_new_tokens}" if run.generates else ""
    if run.sampling is not None:
        smp = run.sampling
        gen += f" sample temperature={smp.temperature:g} seed={smp.seed}"
        gen += "" if smp.top_k is None else f" top_k={smp.top_k}"
        gen += "" if smp.top_p is None else f" top_p={smp.top_p:g}"
    if run.padding_side is not None:
        gen += f" padding_side={run.padding_side}"
    return f"  run {run.name:<{width}} {source}{gen}"


def format_op(graph: GraphSpec, op: Op) -> str:
    where = f"{op.run} {op.site}"
    if not op.select.is_all:
        where += f" {op.select.describe()}"
    if isinstance(op, Read):
        return f"  %{op.name} = read {where}"
    if isinstance(op, Patch):
        return f"  patch {where} <- {_value(graph, op.value)}"
    if isinstance(op, Ablate):
        extra = "" if op.source is None else f" over {op.source}"
        if op.method == "mean" and op.per_position:
            extra += " per_position"
        if op.method == "resample":
            extra += f" seed={op.seed}"
        return f"  ablate {where} {op.method}{extra}"
    if isinstance(op, Add):
        return f"  add {where} += {op.scale:g} * {_tensor(graph, op.direction.tensor)}"
    if isinstance(op, ProjectOut):
        return f"  project_out {where} along {_tensor(graph, op.direction.tensor)}"
    if isinstance(op, Scale):
        return f"  scale {where} *= {op.factor:g}"
    if isinstance(op, SAESplice):
        spec = graph.saes.get(op.sae)
        kind = spec.kind if spec is not None else "?"
        edits = " ".join(_edit(e) for e in op.edits)
        prefix = f"%{op.features} = " if op.features else ""
        source = f" source={op.source}" if op.source is not None else ""
        return f"  {prefix}sae_splice {where} sae=%{op.sae}({kind}){source} error={op.error}" + (
            f" edits[{edits}]" if edits else ""
        )
    if isinstance(op, EdgePatch):
        up = f"{op.upstream}" + ("" if op.upstream_head is None else f" head={op.upstream_head}")
        how = {"patch": f" from {op.source}", "mean": f" mean over {op.source}", "zero": " zero"}
        return f"  edge_patch {where} += ({up}){how[op.method]}"
    if isinstance(op, Grad):
        wrong = "" if op.wrong is None else f" - {_tensor(graph, op.wrong.tensor)}"
        metric = f"{op.metric}({_tensor(graph, op.answer.tensor)}{wrong} @ pos {op.metric_pos})"
        return f"  %{op.name} = grad {where} of sum {metric}"
    raise AssertionError(f"unprintable op {op!r}")


def _edit(edit: object) -> str:
    from interventions.ops import FeatureEdit

    assert isinstance(edit, FeatureEdit)
    feats = ",".join(map(str, edit.features))
    if edit.mode == "clamp":
        return f"clamp({feats}, {edit.low}, {edit.high})"
    return f"{edit.mode}({feats}, {edit.value:g})"


def format_graph(graph: GraphSpec) -> str:
    width = max((len(name) for name in graph.runs), default=0)
    lines = [f"Graph({len(graph.runs)} runs, {len(graph.ops)} ops)"]
    lines += [format_run(graph, run, width) for run in graph.runs.values()]
    lines += [format_op(graph, op) for op in graph.ops]
    return "\n".join(lines)
