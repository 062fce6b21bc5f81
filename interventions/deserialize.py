"""JSON to graphs: the strict decoder (the encoder is :mod:`interventions.serialize`).

Nothing is pickled, and nothing is imported by name: the decoder accepts only the closed
op set, checks every field's type, and raises :class:`SpecError` for anything else. A
sidecar is only ever read from the directory of the JSON file, by a bare file name, and
its header is checked against the graph before its data is read.

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> _ = g.run("a", tokens=torch.tensor([[1, 2]])).read("logits", pos=-1)
>>> from_json(g.to_json(), into=iv.Graph) == g
True
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
from pathlib import Path
from typing import Any, TypeVar

import torch

from interventions.errors import (
    InterventionError,
    SAEError,
    SpecError,
    UnknownOp,
    check_name,
    choices_text,
)
from interventions.ops import (
    OP_KINDS,
    Ablate,
    Add,
    Const,
    EdgePatch,
    FeatureEdit,
    Grad,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESpec,
    SAESplice,
    Scale,
)
from interventions.runs import Run, Sampling
from interventions.sae import SAE_KINDS, sae_from_parts
from interventions.serialize import FORMAT, MAX_JSON_BYTES, VERSION
from interventions.sites import Index, PerPrompt, Select, Site, Span
from interventions.spec import GraphSpec
from interventions.tensor_bytes import check_finite
from interventions.tensorfile import MAX_TENSOR_BYTES, read_tensors

G = TypeVar("G", bound=GraphSpec)


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
    "edge_patch": {"upstream", "upstream_head", "method", "source"},
    "grad": {"name", "metric", "answer", "wrong", "metric_pos"},
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
    if kind == "grad":
        wrong = d.text("wrong", optional=True)
        pos = d.integer("metric_pos", optional=True)
        return Grad(
            run,
            site,
            select,
            d.text("name"),
            d.text("metric"),  # checked by Grad
            Const(d.text("answer")),
            None if wrong is None else Const(wrong),
            -1 if pos is None else pos,
        )
    if kind == "edge_patch":
        return EdgePatch(
            run,
            site,
            select,
            _decode_site(d.get("upstream"), f"{where}.upstream"),
            d.integer("upstream_head", optional=True),
            d.text("method"),
            d.text("source", optional=True),
        )
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


def _decode_sampling(value: Any, where: str) -> Sampling | None:
    if value is None:
        return None
    d = _Doc(value, where, {"temperature", "top_k", "top_p", "seed"})
    return Sampling(
        d.number("temperature"),
        d.integer("top_k", optional=True),
        d.number("top_p", optional=True),
        d.integer("seed"),
    )


def _decode_run(value: Any, where: str) -> Run:
    d = _Doc(
        value,
        where,
        {
            "name",
            "tokens",
            "text",
            "inputs",
            "max_new_tokens",
            "lengths",
            "padding_side",
            "sampling",
        },
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
            _decode_sampling(d.get("sampling"), f"{where}.sampling"),
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


def _declared(declared: dict[Any, Any]) -> dict[str, tuple[str, list[int]]]:
    """``graph.tensors`` checked as ``{key: {dtype, shape}}``, before any data is read."""
    out: dict[str, tuple[str, list[int]]] = {}
    for key, meta in declared.items():
        m = _Doc(meta, f"graph.tensors.{key}", {"dtype", "shape"})
        dtype, shape = m.get("dtype"), m.get("shape")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise SpecError(
                f"graph.tensors.{key}: declared {meta!r:.200}; expected a dtype name and a list "
                "of sizes"
            )
        out[str(key)] = (dtype, shape)
    return out


def _load_tensors(
    doc: _Doc,
    directory: Path | None,
    expected: dict[str, tuple[str, list[int]]],
    max_tensor_bytes: int,
) -> dict[str, torch.Tensor]:
    data = _Doc(doc.get("tensor_data", {}), "tensor_data", {"inline", "file"})
    if "inline" in data.value and "file" in data.value:
        raise SpecError("tensor_data: give inline or file, not both")
    source: bytes | Path
    if "inline" in data.value:
        try:
            source = base64.b64decode(data.text("inline"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SpecError(f"tensor_data.inline: not valid base64 ({exc})") from None
        what = "tensor_data.inline"
    elif "file" in data.value:
        name = data.text("file")
        if directory is None:
            raise SpecError(f"tensor_data.file {name!r:.80}: load the graph with Graph.load(path)")
        if (
            name in ("", ".", "..")
            or name != os.path.basename(name)
            or "/" in name
            or "\\" in name
            or "\x00" in name
            or not name.endswith(".safetensors")
        ):
            raise SpecError(
                f"tensor_data.file {name!r:.80}: must be a bare '<name>.safetensors' file name "
                "beside the graph"
            )
        path = source = directory / name
        what = f"tensor sidecar {str(path)!r:.300}"
        try:
            if path.is_symlink() or not path.is_file():
                raise SpecError(f"{what} is missing or not a regular file")
        except OSError as exc:
            raise SpecError(f"{what} cannot be read: {exc.strerror}") from None
    else:
        source = b""
        what = "tensor data"
    if source == b"":
        if expected:
            raise SpecError(
                f"tensor data holds nothing but the graph declares {choices_text(sorted(expected))}"
            )
        return {}
    return read_tensors(
        source, expected, what=what, max_bytes=max_tensor_bytes, field="graph.tensors."
    )


def graph_from_doc(
    raw: Any,
    directory: Path | None = None,
    *,
    into: type[G],
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
) -> G:
    """Decode a parsed document into a new graph of class ``into``."""
    doc = _Doc(
        raw,
        "graph",
        {"format", "version", "runs", "saes", "ops", "tensors", "tensor_data", "allow_nonfinite"},
    )
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
    for key in (*declared, *saes):
        check_name(key, "graph.tensors / graph.saes key")
    tensors = _load_tensors(doc, directory, _declared(declared), max_tensor_bytes)
    for key, meta in declared.items():
        t = tensors[key]
        if str(t.dtype).removeprefix("torch.") != meta["dtype"] or list(t.shape) != meta["shape"]:
            raise SpecError(  # read_tensors checked this already; kept as a second guard
                f"graph.tensors.{key}: declared {meta!r:.200} but the data is "
                f"{t.dtype} {list(t.shape)}"
            )
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            # torch keeps such bytes, but any copy turns them into 1: not a stable value
            raise SpecError(f"graph.tensors.{key}: bool data holds bytes other than 0 and 1")
    allow_nonfinite = doc.flag("allow_nonfinite")
    if not allow_nonfinite:
        for key, t in tensors.items():
            check_finite(t, f"graph.tensors.{key}")
    graph = into(tensors={key: tensors[key] for key in declared}, allow_nonfinite=allow_nonfinite)
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
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
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
        return graph_from_doc(
            raw,
            None if directory is None else Path(directory),
            into=into,
            max_tensor_bytes=max_tensor_bytes,
        )
    except RecursionError:
        raise SpecError("graph JSON is nested too deeply") from None


def load(
    path: str | os.PathLike[str], *, into: type[G], max_tensor_bytes: int = MAX_TENSOR_BYTES
) -> G:
    """Read a graph file and its sidecar; the sidecar's header is checked against the
    graph (names, dtypes, shapes, a total under ``max_tensor_bytes``) before its data."""
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
    return from_json(text, directory=target.parent, into=into, max_tensor_bytes=max_tensor_bytes)
