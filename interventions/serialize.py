"""Graphs to and from JSON. Tensors go to safetensors (inline base64, or a sidecar file).

Nothing is pickled, and nothing is imported by name: the decoder accepts only the closed
op set, checks every field's type, and raises :class:`SpecError` for anything else. A
sidecar is only ever read from the directory of the JSON file, by a bare file name.

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> _ = g.run("a", tokens=torch.tensor([[1, 2]])).read("logits", pos=-1)
>>> iv.Graph.from_json(g.to_json()) == g
True
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from interventions.errors import InterventionError, SAEError, SpecError, UnknownOp, choices_text
from interventions.ops import (
    OP_KINDS,
    Ablate,
    Add,
    Const,
    FeatureEdit,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESpec,
    SAESplice,
    Scale,
    op_kind,
)
from interventions.sae import SAE_KINDS, sae_from_parts
from interventions.sites import Index, PerPrompt, Select, Site, Span
from interventions.spec import GraphSpec, Run
from interventions.tensor_bytes import digest

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
    }


def fingerprint(graph: GraphSpec) -> str:
    """SHA-256 of the graph's JSON and tensor bytes: equal graphs, equal fingerprints."""
    hasher = hashlib.sha256(json.dumps(graph_to_dict(graph), sort_keys=True).encode())
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
    tmp_json, tmp_side = (
        target.with_name(target.name + ".tmp"),
        sidecar.with_name(sidecar.name + ".tmp"),
    )
    tmp_side.write_bytes(_tensor_blob(graph))
    tmp_json.write_text(json.dumps(doc, indent=2, allow_nan=False))
    os.replace(tmp_side, sidecar)  # both or neither look complete to a reader
    os.replace(tmp_json, target)


# -- decoding ----------------------------------------------------------------------------


class _Doc:
    """Typed access to a JSON object, with the path of each field for error messages."""

    def __init__(self, value: Any, where: str, allowed: set[str]) -> None:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        unknown = set(value) - allowed
        if unknown:
            raise SpecError(
                f"{where}: unknown field(s) {choices_text(sorted(map(str, unknown)))}; "
                f"allowed: {choices_text(sorted(allowed))}"
            )
        self.value = value
        self.where = where

    def get(self, key: str, default: Any = None) -> Any:
        return self.value.get(key, default)

    def text(self, key: str, *, optional: bool = False) -> Any:
        v = self.value.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise SpecError(f"{self.where}.{key}: expected a string, got {v!r:.80}")
        return v

    def integer(self, key: str, *, optional: bool = False) -> Any:
        v = self.value.get(key)
        if v is None and optional:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise SpecError(f"{self.where}.{key}: expected an int, got {v!r:.80}")
        return v

    def number(self, key: str, *, optional: bool = False) -> Any:
        v = self.value.get(key)
        if v is None and optional:
            return None
        try:
            number = None if isinstance(v, bool) or not isinstance(v, (int, float)) else float(v)
        except OverflowError:  # an int too large for a float
            number = None
        if number is None or not math.isfinite(number):
            raise SpecError(f"{self.where}.{key}: expected a finite number, got {v!r:.80}")
        return number

    def flag(self, key: str) -> bool:
        v = self.value.get(key, False)
        if not isinstance(v, bool):
            raise SpecError(f"{self.where}.{key}: expected true or false, got {v!r:.80}")
        return v


def _decode_index(value: Any, where: str) -> Index:
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpecError(f"{where}: expected an int, a list of ints or a slice")
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise SpecError(f"{where}: expected a non-empty list of ints")
        return tuple(value)
    if isinstance(value, dict) and "per_prompt" in value:
        d = _Doc(value, where, {"per_prompt", "squeeze"})
        rows = d.get("per_prompt")
        if not isinstance(rows, list) or not all(
            isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
            for r in rows
        ):
            raise SpecError(f"{where}.per_prompt: expected a list of lists of ints")
        try:
            return PerPrompt(tuple(tuple(r) for r in rows), d.flag("squeeze"))
        except SpecError as exc:
            raise _at(exc, where) from None
    d = _Doc(value, where, {"start", "stop", "step"})
    span = Span(
        d.integer("start", optional=True),
        d.integer("stop", optional=True),
        d.integer("step", optional=True),
    )
    if span.step == 0:
        raise SpecError(f"{where}: slice step cannot be zero")
    return span


def _decode_select(value: Any, where: str) -> Select:
    d = _Doc(value if value is not None else {}, where, {"batch", "pos", "head", "dims"})
    fields = {k: _decode_index(d.get(k), f"{where}.{k}") for k in ("batch", "pos", "head", "dims")}
    for k in ("batch", "head", "dims"):
        if isinstance(fields[k], PerPrompt):
            raise SpecError(f"{where}.{k}: only pos can be chosen prompt by prompt")
    return Select(**fields)


def _decode_site(value: Any, where: str) -> Site:
    d = _Doc(value, where, {"name", "layer"})
    try:
        return Site(d.text("name"), d.integer("layer", optional=True))
    except InterventionError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _decode_edit(value: Any, where: str) -> FeatureEdit:
    d = _Doc(value, where, {"features", "mode", "value", "low", "high"})
    features = d.get("features")
    if not isinstance(features, list) or not all(
        isinstance(f, int) and not isinstance(f, bool) for f in features
    ):
        raise SpecError(f"{where}.features: expected a list of ints")
    try:
        return FeatureEdit(
            tuple(features),
            d.text("mode"),
            d.number("value", optional=True),
            d.number("low", optional=True),
            d.number("high", optional=True),
        )
    except SpecError as exc:
        raise _at(exc, where) from None


_COMMON = {"op", "run", "site", "select"}
_FIELDS: dict[str, set[str]] = {
    "read": {"name"},
    "patch": {"value"},
    "ablate": {"method", "source", "per_position", "seed"},
    "add": {"direction", "scale"},
    "project_out": {"direction"},
    "scale": {"factor"},
    "sae_splice": {"sae", "edits", "error", "features", "source"},
}


def op_from_dict(value: Any, where: str) -> Op:
    try:
        return _op_from_dict(value, where)
    except SpecError as exc:
        raise _at(exc, where) from None


def _at(exc: SpecError, where: str) -> SpecError:
    """``exc`` with the JSON path in front, unless its message already names it."""
    text = str(exc)
    return exc if text.startswith(where) else type(exc)(f"{where}: {text}")


def _op_from_dict(value: Any, where: str) -> Op:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
    kind = value.get("op")
    if not isinstance(kind, str) or kind not in OP_KINDS:
        raise UnknownOp(f"{where}: unknown op {kind!r:.80}; ops: {choices_text(OP_KINDS)}")
    d = _Doc(value, where, _COMMON | _FIELDS[kind])
    run, site = d.text("run"), _decode_site(d.get("site"), f"{where}.site")
    select = _decode_select(d.get("select"), f"{where}.select")
    if kind == "read":
        return Read(run, site, select, d.text("name"))
    if kind == "patch":
        v = _Doc(d.get("value"), f"{where}.value", {"ref", "const"})
        if ("ref" in v.value) == ("const" in v.value):
            raise SpecError(f"{where}.value: give exactly one of ref, const")
        val: Ref | Const = Ref(v.text("ref")) if "ref" in v.value else Const(v.text("const"))
        return Patch(run, site, select, val)
    if kind == "ablate":
        return Ablate(
            run,
            site,
            select,
            d.text("method"),
            d.text("source", optional=True),
            d.flag("per_position"),
            d.integer("seed", optional=True) or 0,
        )
    if kind == "add":
        return Add(run, site, select, Const(d.text("direction")), d.number("scale"))
    if kind == "project_out":
        return ProjectOut(run, site, select, Const(d.text("direction")))
    if kind == "scale":
        return Scale(run, site, select, d.number("factor"))
    edits = d.get("edits", [])
    if not isinstance(edits, list):
        raise SpecError(f"{where}.edits: expected a list")
    return SAESplice(
        run,
        site,
        select,
        d.text("sae"),
        tuple(_decode_edit(e, f"{where}.edits[{i}]") for i, e in enumerate(edits)),
        d.text("error"),
        d.text("features", optional=True),
        _decode_site(d.get("source"), f"{where}.source") if "source" in d.value else None,
    )


def _decode_run(value: Any, where: str) -> Run:
    d = _Doc(
        value,
        where,
        {"name", "tokens", "text", "inputs", "max_new_tokens", "lengths", "padding_side"},
    )
    text = d.get("text")
    if text is not None and (
        not isinstance(text, list) or not all(isinstance(t, str) for t in text)
    ):
        raise SpecError(f"{where}.text: expected a list of strings")
    try:
        return Run(
            d.text("name"),
            d.text("tokens", optional=True),
            None if text is None else tuple(text),
            d.text("inputs", optional=True),
            d.integer("max_new_tokens", optional=True),
            d.text("lengths", optional=True),
            d.text("padding_side", optional=True),
        )
    except SpecError as exc:
        raise _at(exc, where) from None


def _decode_sae(value: Any, where: str) -> SAESpec:
    d = _Doc(value, where, {"kind", "params", "tensors"})
    params, tensors = d.get("params", {}), d.get("tensors", {})
    if not isinstance(params, dict) or not all(
        isinstance(v, (int, float, bool)) and (not isinstance(v, float) or math.isfinite(v))
        for v in params.values()
    ):
        raise SpecError(f"{where}.params: expected an object of numbers and booleans")
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise SpecError(f"{where}.tensors: expected an object of tensor keys")
    kind = d.text("kind")
    if kind not in SAE_KINDS:
        raise SpecError(
            f"{where}.kind: unknown SAE kind {kind!r:.80}; kinds: {choices_text(SAE_KINDS)}"
        )
    return SAESpec(kind, tuple(sorted(params.items())), tuple(sorted(tensors.items())))


def _check_saes(graph: GraphSpec) -> None:
    """Build each SAE once, so bad shapes, dtypes or settings fail here and not mid-run."""
    for key, spec in graph.saes.items():
        parts = {param: graph.tensors[k] for param, k in spec.tensors}
        try:
            sae_from_parts(spec.kind, parts, dict(spec.params))
        except SAEError as exc:
            raise SpecError(f"graph.saes.{key}: {exc}") from None


def _load_tensors(doc: _Doc, directory: Path | None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    data = _Doc(doc.get("tensor_data", {}), "tensor_data", {"inline", "file"})
    if "inline" in data.value and "file" in data.value:
        raise SpecError("tensor_data: give inline or file, not both")
    if "inline" in data.value:
        try:
            blob = base64.b64decode(data.text("inline"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SpecError(f"tensor_data.inline: not valid base64 ({exc})") from None
    elif "file" in data.value:
        name = data.text("file")
        if directory is None:
            raise SpecError(f"tensor_data.file {name!r}: load the graph with Graph.load(path)")
        if (
            name in ("", ".", "..")
            or name != os.path.basename(name)
            or "/" in name
            or "\\" in name
            or "\x00" in name
            or not name.endswith(".safetensors")
        ):
            raise SpecError(
                f"tensor_data.file {name!r}: must be a bare '<name>.safetensors' file name "
                "beside the graph"
            )
        path = directory / name
        try:
            if path.is_symlink() or not path.is_file():
                raise SpecError(f"tensor sidecar {str(path)!r} is missing or not a regular file")
            blob = path.read_bytes()
        except OSError as exc:
            raise SpecError(
                f"tensor sidecar {str(path)!r} cannot be read: {exc.strerror}"
            ) from None
    else:
        blob = b""
    if not blob:
        return {}
    try:
        return dict(load(blob))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise SpecError(f"tensor data is not valid safetensors: {exc}") from None


def graph_from_doc(raw: Any, directory: Path | None = None, *, into: type[G]) -> G:
    """Decode a parsed document into a new graph of class ``into``."""
    doc = _Doc(raw, "graph", {"format", "version", "runs", "saes", "ops", "tensors", "tensor_data"})
    if doc.get("format") != FORMAT:
        raise SpecError(f"graph.format: expected {FORMAT!r}, got {doc.get('format')!r:.80}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise SpecError(
            f"graph.version: this package reads version {VERSION}, got {doc.get('version')!r:.80}"
        )
    runs, ops, saes = doc.get("runs", []), doc.get("ops", []), doc.get("saes", {})
    declared = doc.get("tensors", {})
    if not isinstance(runs, list) or not isinstance(ops, list):
        raise SpecError("graph.runs and graph.ops must be lists")
    if not isinstance(saes, dict) or not isinstance(declared, dict):
        raise SpecError("graph.saes and graph.tensors must be objects")
    tensors = _load_tensors(doc, directory)
    if set(tensors) != set(declared):
        raise SpecError(
            f"tensor data holds {choices_text(sorted(tensors)) or 'nothing'} but the graph "
            f"declares {choices_text(sorted(map(str, declared))) or 'nothing'}"
        )
    for key, meta in declared.items():
        m = _Doc(meta, f"graph.tensors.{key}", {"dtype", "shape"})
        t = tensors[key]
        shape = m.get("shape")
        if (
            not isinstance(m.get("dtype"), str)
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
            or m.get("dtype") != str(t.dtype).removeprefix("torch.")
            or shape != list(t.shape)
        ):
            raise SpecError(
                f"graph.tensors.{key}: declared {meta!r:.200} but the data is "
                f"{t.dtype} {list(t.shape)}"
            )
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            # torch keeps such bytes, but any copy turns them into 1: not a stable value
            raise SpecError(f"graph.tensors.{key}: bool data holds bytes other than 0 and 1")
    graph = into(tensors={key: tensors[key] for key in declared})
    for i, r in enumerate(runs):
        run = _decode_run(r, f"graph.runs[{i}]")
        if run.name in graph.runs:
            raise SpecError(f"graph.runs[{i}]: duplicate run name {run.name!r}")
        graph._add_run(run)
        ids = tensors.get(run.tokens) if run.tokens is not None else None
        if ids is not None and (ids.dtype != torch.long or ids.ndim != 2 or ids.numel() == 0):
            raise SpecError(f"graph.runs[{i}]: tokens {run.tokens!r} must be int64 [batch, seq]")
    for key, s in saes.items():
        graph.saes[str(key)] = _decode_sae(s, f"graph.saes.{key}")
    graph.ops = [op_from_dict(o, f"graph.ops[{i}]") for i, o in enumerate(ops)]
    graph.check()
    _check_saes(graph)
    return graph


def from_json(
    text: str | bytes,
    *,
    directory: str | os.PathLike[str] | None = None,
    into: type[G],
) -> G:
    if not isinstance(text, (str, bytes)):
        raise SpecError(f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_JSON_BYTES:
        raise SpecError(f"graph JSON is {len(text)} bytes; the limit is {MAX_JSON_BYTES}")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise SpecError(f"not valid JSON: {str(exc)[:200]}") from None
    try:
        return graph_from_doc(raw, None if directory is None else Path(directory), into=into)
    except RecursionError:
        raise SpecError("graph JSON is nested too deeply") from None


def load(path: str | os.PathLike[str], *, into: type[G]) -> G:
    target = Path(path)
    try:
        if not target.is_file():
            raise SpecError(f"graph file {str(target)!r} does not exist")
        if target.stat().st_size > MAX_JSON_BYTES:
            raise SpecError(
                f"graph file {str(target)!r} is {target.stat().st_size} bytes; "
                f"the limit is {MAX_JSON_BYTES}"
            )
        text = target.read_bytes()
    except OSError as exc:
        raise SpecError(f"graph file {str(target)!r} cannot be read: {exc.strerror}") from None
    return from_json(text, directory=target.parent, into=into)
