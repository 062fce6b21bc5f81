"""Graphs to JSON. Tensors go to safetensors (inline base64, or a sidecar file); the
strict decoder that reads them back is :mod:`interventions.deserialize`.

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> _ = g.run("a", tokens=torch.tensor([[1, 2]])).read("logits", pos=-1)
>>> iv.Graph.from_json(g.to_json()) == g
True
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from interventions.errors import (
    SpecError,
)
from interventions.ops import (
    Ablate,
    Add,
    EdgePatch,
    FeatureEdit,
    Grad,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESplice,
    Scale,
    op_kind,
)
from interventions.runs import Run
from interventions.sites import Index, PerPrompt, Select, Site, Span
from interventions.spec import GraphSpec
from interventions.tensor_bytes import digest
from interventions.tensorfile import write_atomic

FORMAT = "interventions.graph"
VERSION = 1
MAX_JSON_BYTES = 64 * 1024 * 1024

G = TypeVar("G", bound=GraphSpec)


# -- encoding ----------------------------------------------------------------------------


def _index(index: Index) -> Any:
    if isinstance(index, PerPrompt):
        return {"per_prompt": [list(row) for row in index.positions], "squeeze": index.squeeze}
    if isinstance(index, Span):
        return {"start": index.start, "stop": index.stop, "step": index.step}
    if isinstance(index, tuple):
        return list(index)
    return index


def _select(select: Select) -> dict[str, Any]:
    return {k: _index(v) for k, v in select.items()}


def _site(site: Site) -> dict[str, Any]:
    return {"name": site.name} if site.layer is None else {"name": site.name, "layer": site.layer}


def _edit(edit: FeatureEdit) -> dict[str, Any]:
    out: dict[str, Any] = {"features": list(edit.features), "mode": edit.mode}
    for key, number in (("value", edit.value), ("low", edit.low), ("high", edit.high)):
        if number is not None:
            out[key] = float(number)
    return out


def op_to_dict(op: Op) -> dict[str, Any]:
    out: dict[str, Any] = {
        "op": op_kind(op),
        "run": op.run,
        "site": _site(op.site),
        "select": _select(op.select),
    }
    if isinstance(op, Read):
        out["name"] = op.name
    elif isinstance(op, Patch):
        v = op.value
        out["value"] = {"ref": v.read} if isinstance(v, Ref) else {"const": v.tensor}
    elif isinstance(op, Ablate):
        out.update(method=op.method, source=op.source, per_position=op.per_position, seed=op.seed)
    elif isinstance(op, Add):
        out.update(direction=op.direction.tensor, scale=float(op.scale))
    elif isinstance(op, ProjectOut):
        out["direction"] = op.direction.tensor
    elif isinstance(op, Scale):
        out["factor"] = float(op.factor)
    elif isinstance(op, SAESplice):
        out.update(
            sae=op.sae, edits=[_edit(e) for e in op.edits], error=op.error, features=op.features
        )
        if op.source is not None:  # only when set, so graphs without it keep their hash
            out["source"] = _site(op.source)
    elif isinstance(op, Grad):
        out.update(
            name=op.name,
            metric=op.metric,
            answer=op.answer.tensor,
            wrong=None if op.wrong is None else op.wrong.tensor,
            metric_pos=op.metric_pos,
        )
    elif isinstance(op, EdgePatch):
        out.update(
            upstream=_site(op.upstream),
            upstream_head=op.upstream_head,
            method=op.method,
            source=op.source,
        )
    return out


def _run_doc(run: Run) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": run.name,
        "tokens": run.tokens,
        "text": None if run.text is None else list(run.text),
        "inputs": run.inputs,
        "max_new_tokens": run.max_new_tokens,
    }
    # written only when set, so graphs without them keep their JSON and fingerprint
    for key in ("lengths", "padding_side"):
        if getattr(run, key) is not None:
            doc[key] = getattr(run, key)
    if run.sampling is not None:
        doc["sampling"] = dataclasses.asdict(run.sampling)
    return doc


def graph_to_dict(graph: GraphSpec) -> dict[str, Any]:
    """The JSON document without tensor data (which goes inline or to a sidecar)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "runs": [_run_doc(r) for r in graph.runs.values()],
        "saes": {
            key: {"kind": s.kind, "params": dict(s.params), "tensors": dict(s.tensors)}
            for key, s in graph.saes.items()
        },
        "ops": [op_to_dict(op) for op in graph.ops],
        "tensors": {
            key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for key, t in graph.tensors.items()
        },
        **({"allow_nonfinite": True} if graph.allow_nonfinite else {}),
    }


def fingerprint(graph: GraphSpec) -> str:
    """SHA-256 of the graph's JSON and tensor bytes: equal graphs, equal fingerprints."""
    doc = graph_to_dict(graph)
    doc.pop("allow_nonfinite", None)  # a policy for building and loading, not content
    hasher = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    for key in sorted(graph.tensors):
        tensor = graph.tensors[key]
        hasher.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
        hasher.update(digest(tensor))
    return hasher.hexdigest()


def _tensor_blob(graph: GraphSpec) -> bytes:
    from safetensors.torch import save

    # clone(): safetensors refuses tensors that share memory (one tensor added twice, a view)
    return save({k: t.detach().cpu().contiguous().clone() for k, t in graph.tensors.items()})


def to_json(graph: GraphSpec, *, indent: int | None = 2) -> str:
    doc = graph_to_dict(graph)
    doc["tensor_data"] = {"inline": base64.b64encode(_tensor_blob(graph)).decode("ascii")}
    return json.dumps(doc, indent=indent, allow_nan=False)


def save(graph: GraphSpec, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    sidecar = target.with_suffix(".safetensors")
    if sidecar == target:
        raise SpecError(f"{target}: a graph file cannot end in .safetensors (that is the sidecar)")
    doc = graph_to_dict(graph)
    doc["tensor_data"] = {"file": sidecar.name}
    # each file is renamed into place whole; the graph names its sidecar and is written last
    write_atomic(sidecar, _tensor_blob(graph))
    write_atomic(target, json.dumps(doc, indent=2, allow_nan=False).encode())
