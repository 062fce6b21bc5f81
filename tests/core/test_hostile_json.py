"""Hostile and malformed graph JSON: a valid ``Graph`` or a ``SpecError``, nothing else.

Every input to ``Graph.from_json`` and ``Graph.load`` either decodes to a graph that passes
``check()`` and round-trips, or raises a :class:`~interventions.errors.SpecError` (a
subclass of ``InterventionError``). Nothing else escapes, each example finishes within the
hypothesis deadline, no file outside the JSON's directory is opened (an audit hook watches
every ``open``), and nothing is written.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

import interventions as iv
from interventions.errors import SpecError, UnknownOp
from interventions.serialize import MAX_JSON_BYTES
from tests.core.strategies import graphs

FAST = settings(deadline=2000)  # milliseconds per example
SMALL_GRAPHS = graphs(max_runs=2, max_ops=4)

# --- what the decoder touches -------------------------------------------------------------

_EVENTS: list[tuple[str, tuple[Any, ...]]] | None = None
_MUTATING = {
    "os.remove",
    "os.rename",
    "os.mkdir",
    "os.rmdir",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.utime",
    "shutil.copyfile",
    "shutil.move",
    "shutil.rmtree",
}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _EVENTS is not None and (event == "open" or event in _MUTATING):
        _EVENTS.append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records when asked


@contextlib.contextmanager
def watching() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Record the ``open`` and file-changing audit events raised inside the block."""
    global _EVENTS
    events: list[tuple[str, tuple[Any, ...]]] = []
    _EVENTS = events
    try:
        yield events
    finally:
        _EVENTS = None


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def opened_paths(events: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    """Real paths of the files opened; fails on any write or file-changing call."""
    out = []
    for event, args in events:
        assert event == "open", f"the decoder changed files: {event} {args}"
        path, mode, flags = [*args, None, None][:3]
        assert not (isinstance(mode, str) and set(mode) & set("wax+")), f"write: {args}"
        assert not (isinstance(flags, int) and flags & _WRITE_FLAGS), f"write: {args}"
        if isinstance(path, (str, bytes, os.PathLike)):
            out.append(os.path.realpath(os.fsdecode(path)))
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int, bool]]:
    """Every entry under ``root`` with size, mtime and whether it is a symlink."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            out[p] = (s.st_size, s.st_mtime_ns, os.path.islink(p))
    return out


def decoded(call: Callable[[], iv.Graph]) -> iv.Graph | None:
    """Run a decoder call: it returns a valid graph (returned) or raises SpecError (None).

    Any other exception propagates and fails the test.
    """
    try:
        g = call()
    except SpecError as exc:
        assert str(exc), "errors must say what is wrong"
        return None
    assert isinstance(g, iv.Graph)
    g.check()
    assert iv.Graph.from_json(g.to_json()) == g
    assert str(g).startswith(f"Graph({len(g.runs)} runs, {len(g.ops)} ops)")
    g.fingerprint()
    return g


# --- random JSON ---------------------------------------------------------------------------

FIELD_NAMES = sorted(
    {
        *("format", "version", "runs", "saes", "ops", "tensors", "tensor_data"),
        *("name", "tokens", "text", "inputs", "max_new_tokens"),
        *("op", "run", "site", "select", "layer", "batch", "pos", "head", "dims"),
        *("start", "stop", "step", "value", "ref", "const", "method", "source"),
        *("per_position", "seed", "direction", "scale", "factor", "sae", "edits"),
        *("error", "features", "mode", "low", "high", "kind", "params", "dtype"),
        *("shape", "inline", "file", "__class__", "__reduce__", "py/object"),
    }
)
STRINGS = [
    *("", " ", ".", "..", "../x.safetensors", "/etc/passwd", "\x00", "a\x00b", "\\"),
    *("t0", "t1", "t99", "sae0", "read", "patch", "ablate", "sae_splice", "frobnicate"),
    *("resid_post", "head", "attn_pattern", "output", "x.output", "logits", "embed"),
    *("float32", "int64", "bfloat16", "float8_e4m3fn", "F32", "zero", "mean", "resample"),
    *("keep", "drop", "detach", "set", "scale", "clamp", "relu", "topk", "jumprelu"),
    *("interventions.graph", "a" * 300, "NaN", "\u2028", "\ud800", "%clean.x"),
]
NUMBERS: list[Any] = [
    *(0, 1, -1, 2, 7, 100_000, 100_001, 10**30, -(10**30), 2**63, 2**64, -(2**63) - 1),
    *(10**308, 10**400, 10**4000, 0.5, -0.0, 1e308, 5e-324, 1.0),
    *(float("nan"), float("inf"), float("-inf")),
]
# Text spliced in after json.dumps, for what json.dumps cannot write.
RAW = {
    "\x00RAW:digits": "9" * 5000,
    "\x00RAW:negdigits": "-" + "9" * 4301,
    "\x00RAW:lists": "[" * 100_000 + "]" * 100_000,
    "\x00RAW:objects": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "\x00RAW:bigexp": "1e999999",
    "\x00RAW:nan": "NaN",
    "\x00RAW:ninf": "-Infinity",
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(NUMBERS),
    st.text(max_size=12),
    st.sampled_from(STRINGS),
    st.sampled_from(sorted(RAW)),
)
json_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)


def dump(doc: Any) -> str:
    text = json.dumps(doc, allow_nan=True)
    for key, raw in RAW.items():
        text = text.replace(json.dumps(key), raw)
    return text


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def valid_document(g: iv.Graph) -> dict[str, Any]:
    return json.loads(g.to_json())


@st.composite
def mutated_documents(draw: st.DrawFn) -> str:
    """A valid graph's JSON with one to three fields replaced, deleted, added or wrapped."""
    doc = valid_document(draw(SMALL_GRAPHS))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap"]))
        node = _get(doc, path)
        if not path or action == "replace":
            new = draw(json_values)
            if path:
                _get(doc, path[:-1])[path[-1]] = new
            else:
                doc = new
        elif action == "delete":
            del _get(doc, path[:-1])[path[-1]]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=5))] = draw(json_values)
        elif action == "add" and isinstance(node, list):
            node.insert(draw(st.integers(0, len(node))), draw(json_values))
        else:
            _get(doc, path[:-1])[path[-1]] = draw(st.sampled_from([[node], {"value": node}]))
        if not isinstance(doc, (dict, list)):
            break
    return dump(doc)


@st.composite
def garbled_texts(draw: st.DrawFn) -> bytes:
    """A valid graph's JSON text with bytes deleted, inserted, replaced or cut off."""
    text = draw(SMALL_GRAPHS).to_json(indent=draw(st.sampled_from([None, 2])))
    data = bytearray(text.encode())
    structure = text.index('"tensor_data"')  # mostly hit the structure, not the base64
    for _ in range(draw(st.integers(1, 4))):
        end = structure if draw(st.integers(0, 4)) else len(data)
        i = draw(st.integers(0, max(0, min(end, len(data)) - 1)))
        edit = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "duplicate"]))
        if edit == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif edit == "insert":
            data[i:i] = draw(
                st.binary(min_size=1, max_size=6) | st.sampled_from(STRINGS[:9]).map(str.encode)
            )
        elif edit == "replace" and data:
            data[i] = draw(st.integers(0, 255))
        elif edit == "truncate":
            del data[i:]
        else:
            data[i:i] = data[i : i + draw(st.integers(1, 40))]
    return bytes(data)


# safetensors dtype -> (torch dtype name, bytes per item)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "C64": ("complex64", 8),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F4": ("float4_e2m1fn_x2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "X": ("X", 1),
    "": ("", 1),
}


def _pack(header: Any, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def garbled_blobs(draw: st.DrawFn) -> str:
    """A valid graph whose inline safetensors blob is damaged or hand-made."""
    g = draw(graphs(max_runs=2, max_ops=3))
    doc = valid_document(g)
    blob = bytearray(base64.b64decode(doc["tensor_data"]["inline"]))
    (header_len,) = struct.unpack("<Q", bytes(blob[:8]))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "length", "header", "fresh"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            end = 8 + header_len if draw(st.booleans()) else len(blob)
            blob[draw(st.integers(0, end - 1))] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        blob = blob[: draw(st.integers(0, len(blob) - 1))]
    elif how == "extend":
        blob += draw(st.binary(min_size=1, max_size=16))
    elif how == "length":
        n = draw(
            st.sampled_from([0, 1, 2, header_len - 1, header_len + 1, len(blob), 2**63, 2**64 - 1])
            | st.integers(0, 2**64 - 1)
        )
        blob[:8] = struct.pack("<Q", max(0, n))
    elif how == "header":
        header = json.loads(bytes(blob[8 : 8 + header_len]))
        path = draw(st.sampled_from(list(_paths(header))[1:] or [()]))
        new = draw(
            st.sampled_from(sorted(SAFETENSORS_DTYPES))
            | st.lists(st.integers(-(2**64), 2**64) | st.sampled_from(NUMBERS[:12]), max_size=4)
            | json_values
        )
        if path:
            _get(header, path[:-1])[path[-1]] = new
        blob = bytearray(_pack(header, bytes(blob[8 + header_len :])))
    else:  # a blob made from scratch, declared in the graph as what it claims to hold
        fresh: dict[str, Any] = {}
        data = b""
        declared = {}
        for i in range(draw(st.integers(0, 3))):
            dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
            torch_name, itemsize = SAFETENSORS_DTYPES[dtype]
            shape = draw(st.lists(st.integers(0, 4) | st.sampled_from([2**32, 2**63]), max_size=3))
            numel = 1
            for n in shape:
                numel *= n
            exact = numel * itemsize <= 256 and draw(st.integers(0, 3)) > 0
            size = numel * itemsize if exact else draw(st.integers(0, 64))
            fresh[f"t{i}"] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [len(data), len(data) + size],
            }
            data += draw(st.binary(min_size=size, max_size=size))
            declared[f"t{i}"] = {"dtype": torch_name, "shape": shape}
        if draw(st.booleans()):
            fresh["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
        blob = bytearray(_pack(fresh, data))
        doc = {"format": "interventions.graph", "version": 1, "tensors": declared}
    doc["tensor_data"] = {"inline": base64.b64encode(bytes(blob)).decode()}
    return dump(doc)


# --- properties ----------------------------------------------------------------------------


@FAST
@given(mutated_documents())
def test_mutated_documents(text: str) -> None:
    decoded(lambda: iv.Graph.from_json(text))


@FAST
@given(garbled_texts())
def test_garbled_text(data: bytes) -> None:
    decoded(lambda: iv.Graph.from_json(data))


@FAST
@given(garbled_blobs())
def test_garbled_tensor_blobs(text: str) -> None:
    decoded(lambda: iv.Graph.from_json(text))


@FAST
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    decoded(lambda: iv.Graph.from_json(dump(value)))


@FAST
@given(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=8))
def test_arbitrary_top_level_fields(doc: dict[str, Any]) -> None:
    base = {"format": "interventions.graph", "version": 1}
    decoded(lambda: iv.Graph.from_json(dump({**base, **doc})))


@FAST
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_arbitrary_text(data: bytes | str) -> None:
    decoded(lambda: iv.Graph.from_json(data))


@FAST
@given(st.sampled_from([None, 0, 1.5, [], {}, object(), bytearray(b"{}"), Path("g.json")]))
def test_non_text_input(value: Any) -> None:
    with pytest.raises(SpecError, match="expected JSON text"):
        iv.Graph.from_json(value)


# --- sidecar files ---------------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    """``tmp/outside/secret.safetensors`` (a *valid* sidecar, so reading it would succeed),
    and ``tmp/graph/`` holding links, a FIFO and a directory that all lead nowhere good."""
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3]]).add("resid_post", 0, direction=torch.ones(4))
    outside = tmp_path / "outside"
    graph_dir = tmp_path / "graph"
    outside.mkdir()
    graph_dir.mkdir()
    g.save(str(outside / "secret.json"))
    secret = outside / "secret.safetensors"
    g.save(str(graph_dir / "good.json"))
    (graph_dir / "link.safetensors").symlink_to("../outside/secret.safetensors")
    (graph_dir / "abslink.safetensors").symlink_to(secret)
    (graph_dir / "dirlink").symlink_to(outside)
    (graph_dir / "dangling.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    (graph_dir / "dir.safetensors").mkdir()
    os.mkfifo(graph_dir / "fifo.safetensors")  # reading it would block forever
    return {"root": tmp_path, "graph": graph_dir, "secret": secret, "outside": outside}


def _load_with_sidecar(box: dict[str, Path], name: Any) -> iv.Graph | None:
    """Write ``graph/hostile.json`` naming ``name`` as its sidecar, then load it, watched."""
    doc = json.loads((box["graph"] / "good.json").read_text())
    doc["tensor_data"] = {"file": name}
    path = box["graph"] / "hostile.json"
    path.write_text(json.dumps(doc))
    before = snapshot(box["root"])
    with watching() as events:
        g = decoded(lambda: iv.Graph.load(str(path)))
    assert snapshot(box["root"]) == before, "loading changed files"
    graph_dir = os.path.realpath(box["graph"])
    for opened in opened_paths(events):
        assert opened != os.path.realpath(box["secret"]), f"{name!r} read the secret"
        if opened.startswith(os.path.realpath(box["root"]) + os.sep):
            assert os.path.dirname(opened) == graph_dir, f"{name!r} opened {opened}"
    return g


HOSTILE_SIDECARS = [
    "../outside/secret.safetensors",
    "..",
    ".",
    "",
    "/etc/passwd",
    "link.safetensors",
    "abslink.safetensors",
    "dirlink/secret.safetensors",
    "dangling.safetensors",
    "dir.safetensors",
    "fifo.safetensors",
    "a/b.safetensors",
    "a\\b.safetensors",
    "..\\outside\\secret.safetensors",
    "good.safetensors\x00",
    "good\x00.safetensors",
    "\x00",
    "link.safetensors/",
    "./good.safetensors",
    "~/secret.safetensors",
    "x" * 300 + ".safetensors",
    "x" * 5000 + ".safetensors",
    "good.json",
    "hostile.json",
    "missing.safetensors",
    "file:///etc/passwd",
    "%2e%2e%2foutside%2fsecret.safetensors",
]


def _short(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


@pytest.mark.parametrize("name", HOSTILE_SIDECARS, ids=_short)
def test_hostile_sidecar_names_are_refused(sandbox: dict[str, Path], name: str) -> None:
    assert _load_with_sidecar(sandbox, name) is None


@pytest.mark.parametrize("name", ["/ABS", "../outside/secret.safetensors"])
def test_absolute_and_parent_paths_to_the_secret(sandbox: dict[str, Path], name: str) -> None:
    name = str(sandbox["secret"]) if name == "/ABS" else name
    with pytest.raises(SpecError, match=r"bare '<name>\.safetensors' file name"):
        (sandbox["graph"] / "x.json").write_text(
            json.dumps(
                {"format": "interventions.graph", "version": 1, "tensor_data": {"file": name}}
            )
        )
        iv.Graph.load(sandbox["graph"] / "x.json")


@pytest.mark.parametrize("name", [7, None, ["good.safetensors"], {"file": "good.safetensors"}])
def test_sidecar_name_of_the_wrong_type(sandbox: dict[str, Path], name: Any) -> None:
    assert _load_with_sidecar(sandbox, name) is None


def test_symlinked_sidecar_is_refused_even_though_its_target_is_valid(
    sandbox: dict[str, Path],
) -> None:
    with pytest.raises(SpecError, match="not a regular file"):
        doc = json.loads((sandbox["graph"] / "good.json").read_text())
        doc["tensor_data"] = {"file": "link.safetensors"}
        (sandbox["graph"] / "x.json").write_text(json.dumps(doc))
        iv.Graph.load(sandbox["graph"] / "x.json")


def test_the_audit_sees_a_legitimate_sidecar_read(sandbox: dict[str, Path]) -> None:
    """Control: the watcher does record the sidecar a good graph reads."""
    g = _load_with_sidecar(sandbox, "good.safetensors")
    assert g is not None and len(g.tensors) == 2
    with watching() as events:
        iv.Graph.load(sandbox["graph"] / "good.json")
    assert os.path.realpath(sandbox["graph"] / "good.safetensors") in opened_paths(events)


SIDECAR_PARTS = ["..", ".", "/", "\\", "\x00", "outside", "secret", "link", "good", "~", " "]


@FAST
@given(
    st.lists(st.sampled_from(SIDECAR_PARTS), max_size=6)
    .map("".join)
    .map(lambda s: s + ".safetensors")
    | st.text(max_size=20)
)
def test_random_sidecar_names(name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        box = {"root": Path(tmp)}
        box.update(_sandbox_paths(Path(tmp)))
        g = _load_with_sidecar(box, name)
        if g is not None:  # only a plain file beside the JSON may have been read
            assert os.path.basename(name) == name and name.endswith(".safetensors")


def _sandbox_paths(root: Path) -> dict[str, Path]:
    outside, graph_dir = root / "outside", root / "graph"
    outside.mkdir()
    graph_dir.mkdir()
    g = iv.Graph()
    g.run("a", tokens=[[1, 2, 3]])
    g.save(str(outside / "secret.json"))
    g.save(str(graph_dir / "good.json"))
    (graph_dir / "link.safetensors").symlink_to("../outside/secret.safetensors")
    return {"graph": graph_dir, "secret": outside / "secret.safetensors", "outside": outside}


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d / "missing.json",
        lambda d: d,
        lambda d: d / ("x" * 5000 + ".json"),
        lambda d: str(d / "a\x00b.json"),
        lambda d: d / "fifo.safetensors",
        lambda d: d / "dir.safetensors",
        lambda d: d / "link.safetensors",  # a valid safetensors file, but not JSON
    ],
    ids=["missing", "directory", "long-name", "nul", "fifo", "dir", "not-json"],
)
def test_hostile_graph_paths(sandbox: dict[str, Path], make: Callable[[Path], Any]) -> None:
    before = snapshot(sandbox["root"])
    with pytest.raises(SpecError):
        iv.Graph.load(make(sandbox["graph"]))
    assert snapshot(sandbox["root"]) == before


def test_oversized_graph_file_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no disk used, but read_bytes would be 64 MB
    with watching() as events, pytest.raises(SpecError, match="limit"):
        iv.Graph.load(big)
    assert os.path.realpath(big) not in opened_paths(events)


def test_oversized_json_text() -> None:
    with pytest.raises(SpecError, match="limit"):
        iv.Graph.from_json(" " * (MAX_JSON_BYTES + 1))


# --- sizes that must not take long --------------------------------------------------------


@pytest.mark.parametrize(
    "fragment",
    ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "0" + "}" * 100_000, "9" * 100_000],
    ids=["lists", "objects", "digits"],
)
@pytest.mark.parametrize("where", ["root", "layer", "text", "tensors"])
def test_deep_and_long_values_fail_fast(fragment: str, where: str) -> None:
    g = iv.Graph()
    g.run("a", text="hi").read("resid_post", 0)
    text = g.to_json(indent=None)
    if where == "root":
        text = fragment
    elif where == "layer":
        text = text.replace('"layer": 0', f'"layer": {fragment}')
    elif where == "text":
        text = text.replace('"text": ["hi"]', f'"text": {fragment}')
    else:
        text = text.replace('"tensors": {}', f'"tensors": {fragment}')
    assert fragment in text
    start = time.perf_counter()
    with pytest.raises(SpecError):
        iv.Graph.from_json(text)
    assert time.perf_counter() - start < 2.0


def test_many_ops_decode_in_linear_time() -> None:
    n = 10_000
    doc = {
        "format": "interventions.graph",
        "version": 1,
        "runs": [{"name": "a", "text": ["x"]}, {"name": "b", "text": ["y"]}],
        "ops": [
            {"op": "read", "run": "a", "site": {"name": "logits"}, "name": f"r{i}"}
            for i in range(n)
        ]
        + [{"op": "patch", "run": "b", "site": {"name": "logits"}, "value": {"ref": "r0"}}],
    }
    text = json.dumps(doc)
    start = time.perf_counter()
    g = iv.Graph.from_json(text)
    elapsed = time.perf_counter() - start
    assert len(g.ops) == n + 1
    assert elapsed < 5.0, f"{n} ops took {elapsed:.1f} s"


# --- a table of specific malformed documents ----------------------------------------------

SAE = iv.StandardSAE(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4))


def base_graph() -> iv.Graph:
    g = iv.Graph()
    clean = g.run("clean", tokens=torch.tensor([[1, 2, 3]]))
    corrupt = g.run("corrupt", tokens=torch.tensor([[1, 4, 3]]))
    h = clean.read("resid_post", layer=0)  # ops[0]
    corrupt.patch("resid_post", layer=0, pos=-1, value=h)  # ops[1]
    corrupt.ablate("mlp_out", 1, method="mean", source=clean)  # ops[2]
    corrupt.add("resid_pre", 1, direction=torch.ones(4), scale=2.0)  # ops[3]
    corrupt.project_out("attn_out", 0, direction=torch.ones(4), pos=slice(0, None, 2))  # ops[4]
    corrupt.scale("head", 1, head=2, factor=0.5)  # ops[5]
    corrupt.sae_splice(  # ops[6]
        "resid_post",
        1,
        sae=SAE,
        edits=[iv.FeatureEdit.set(0, 1.0), iv.FeatureEdit.clamp([1, 2], low=0.0, high=3.0)],
        error="drop",
        features="feats",
    )
    corrupt.read("logits", pos=-1, name="out")  # ops[7]
    return g


BASE = base_graph()
BASE_DOC = valid_document(BASE)
DROP = object()


def _doc(*changes: tuple[str, Any]) -> str:
    """The base document with ``("ops.0.site.layer", value)`` changes (DROP deletes)."""
    doc = copy.deepcopy(BASE_DOC)
    for path, value in changes:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")] if path else []
        if not keys:
            doc = value
            continue
        parent = _get(doc, tuple(keys[:-1]))
        if value is DROP:
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value
    return dump(doc)


def _blob(tensors: dict[str, torch.Tensor]) -> str:
    return base64.b64encode(st_save(tensors)).decode()


def _bool_doc(data: bytes) -> str:
    header = {"b": {"dtype": "BOOL", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    return dump(
        {
            "format": "interventions.graph",
            "version": 1,
            "tensors": {"b": {"dtype": "bool", "shape": [len(data)]}},
            "tensor_data": {"inline": base64.b64encode(_pack(header, data)).decode()},
        }
    )


# (document text, exact error type, substring of the message)
# fmt: off
TABLE: list[tuple[str, str, type[Exception], str]] = [
    ("sanity", _doc(), type(None), ""),
    # the envelope
    ("not json", "{", SpecError, "not valid JSON"),
    ("empty", "", SpecError, "not valid JSON"),
    ("root list", _doc(("", [])), SpecError, "graph: expected an object, got list"),
    ("format", _doc(("format", "other")), SpecError, "graph.format: expected"),
    ("no format", _doc(("format", DROP)), SpecError, "graph.format"),
    ("version 2", _doc(("version", 2)), SpecError, "graph.version"),
    ("version true", _doc(("version", True)), SpecError, "graph.version"),
    ("version 1.0", _doc(("version", 1.0)), SpecError, "graph.version"),
    ("unknown top field", _doc(("pickle", "x")), SpecError, "graph: unknown field(s) pickle"),
    ("runs object", _doc(("runs", {})), SpecError, "graph.runs and graph.ops must be lists"),
    ("saes list", _doc(("saes", [])), SpecError, "graph.saes and graph.tensors must be objects"),
    # runs
    ("run name", _doc(("runs.0.name", "")), SpecError, "graph.runs[0]: run name ''"),
    ("run name int", _doc(("runs.0.name", 3)), SpecError, "graph.runs[0].name: expected a string"),
    ("dup run", _doc(("runs.1.name", "clean")), SpecError, "graph.runs[1]: duplicate run name"),
    ("mnt -1", _doc(("runs.0.max_new_tokens", -1)), SpecError, "graph.runs[0]: run 'clean'"),
    ("mnt 1e30", _doc(("runs.0.max_new_tokens", 10**30)), SpecError, "max_new_tokens"),
    ("mnt str", _doc(("runs.0.max_new_tokens", "3")), SpecError, "graph.runs[0].max_new_tokens"),
    ("text str", _doc(("runs.0.text", "hi")), SpecError, "graph.runs[0].text: expected a list"),
    ("two sources", _doc(("runs.0.text", ["hi"])), SpecError, "graph.runs[0]: run 'clean' needs"),
    ("no tensor", _doc(("runs.0.tokens", "t99")), SpecError, "names tensor 't99'"),
    ("float tokens", _doc(("runs.0.tokens", "t2")), SpecError, "graph.runs[0]: tokens 't2'"),
    ("run field", _doc(("runs.0.model", "gpt2")), SpecError, "graph.runs[0]: unknown field(s) model"),
    # ops: kinds and common fields
    ("unknown op", _doc(("ops.0.op", "exec")), UnknownOp, "graph.ops[0]: unknown op 'exec'"),
    ("op list", _doc(("ops.0.op", [])), UnknownOp, "graph.ops[0]: unknown op []"),
    ("op dict", _doc(("ops.0.op", {"op": "read"})), UnknownOp, "graph.ops[0]: unknown op"),
    ("no op", _doc(("ops.0.op", DROP)), UnknownOp, "graph.ops[0]: unknown op None"),
    ("op not obj", _doc(("ops.0", "read")), SpecError, "graph.ops[0]: expected an object"),
    ("op field", _doc(("ops.0.hook", "x")), SpecError, "graph.ops[0]: unknown field(s) hook"),
    ("run int", _doc(("ops.0.run", 0)), SpecError, "graph.ops[0].run: expected a string"),
    ("no run", _doc(("ops.0.run", "ghost")), SpecError, "run 'ghost': no such run"),
    ("site str", _doc(("ops.0.site", "resid_post")), SpecError, "graph.ops[0].site: expected an"),
    ("site name", _doc(("ops.0.site.name", "resid_psot")), SpecError, "graph.ops[0].site: 'resid_psot'"),
    ("site layer str", _doc(("ops.0.site.layer", "0")), SpecError, "graph.ops[0].site.layer: expected an int"),
    ("site layer bool", _doc(("ops.0.site.layer", True)), SpecError, "graph.ops[0].site.layer"),
    ("no layer", _doc(("ops.0.site.layer", DROP)), SpecError, "graph.ops[0].site: site 'resid_post' needs a layer"),
    ("raw layer", _doc(("ops.0.site", {"name": "output", "layer": 0})), SpecError, "graph.ops[0].site: raw module site"),
    ("site field", _doc(("ops.0.site.module", "x")), SpecError, "graph.ops[0].site: unknown field(s) module"),
    ("read only", _doc(("ops.5.site.name", "attn_pattern")), SpecError, "site 'attn_pattern' is read only"),
    ("select list", _doc(("ops.1.select", [1])), SpecError, "graph.ops[1].select: expected an object"),
    ("select field", _doc(("ops.1.select.time", 1)), SpecError, "graph.ops[1].select: unknown field(s) time"),
    ("pos bool", _doc(("ops.1.select.pos", True)), SpecError, "graph.ops[1].select.pos"),
    ("pos float", _doc(("ops.1.select.pos", 1.5)), SpecError, "graph.ops[1].select.pos: expected an object"),
    ("pos empty", _doc(("ops.1.select.pos", [])), SpecError, "graph.ops[1].select.pos: expected a non-empty list"),
    ("pos strs", _doc(("ops.1.select.pos", ["1"])), SpecError, "graph.ops[1].select.pos"),
    ("step 0", _doc(("ops.4.select.pos.step", 0)), SpecError, "graph.ops[4].select.pos: slice step cannot be zero"),
    ("start float", _doc(("ops.4.select.pos.start", 0.5)), SpecError, "graph.ops[4].select.pos.start: expected an int"),
    ("span field", _doc(("ops.4.select.pos.end", 3)), SpecError, "graph.ops[4].select.pos: unknown field(s) end"),
    # ops: per kind
    ("read name", _doc(("ops.0.name", 5)), SpecError, "graph.ops[0].name: expected a string"),
    ("read name chars", _doc(("ops.0.name", "a b")), SpecError, "read name 'a b'"),
    ("dup read", _doc(("ops.7.name", "feats")), SpecError, "name 'feats' is already used"),
    ("value both", _doc(("ops.1.value", {"ref": "x", "const": "t2"})), SpecError, "graph.ops[1].value: give exactly one of ref, const"),
    ("value none", _doc(("ops.1.value", {})), SpecError, "graph.ops[1].value: give exactly one"),
    ("value str", _doc(("ops.1.value", "clean.resid_post.0")), SpecError, "graph.ops[1].value: expected an object"),
    ("ref unknown", _doc(("ops.1.value.ref", "nope")), SpecError, "value 'nope' is not read earlier"),
    ("ref same run", _doc(("ops.1.run", "clean")), SpecError, "comes from the same run"),
    ("const unknown", _doc(("ops.1.value", {"const": "t99"})), SpecError, "no tensor 't99'"),
    ("method", _doc(("ops.2.method", "median")), SpecError, "graph.ops[2]: unknown ablation method 'median'"),
    ("no source", _doc(("ops.2.source", None)), SpecError, "graph.ops[2]: ablate 'mean' needs source="),
    ("ghost source", _doc(("ops.2.source", "ghost")), SpecError, "source run 'ghost' does not exist"),
    ("self source", _doc(("ops.2.source", "corrupt")), SpecError, "source must be another run"),
    ("per_position", _doc(("ops.2.per_position", "yes")), SpecError, "graph.ops[2].per_position: expected true or false"),
    ("seed float", _doc(("ops.2.seed", 1.5)), SpecError, "graph.ops[2].seed: expected an int"),
    ("scale nan", _doc(("ops.3.scale", float("nan"))), SpecError, "graph.ops[3].scale: expected a finite number, got nan"),
    ("scale inf", _doc(("ops.3.scale", float("inf"))), SpecError, "graph.ops[3].scale"),
    ("scale huge", _doc(("ops.3.scale", 10**400)), SpecError, "graph.ops[3].scale: expected a finite number"),
    ("scale str", _doc(("ops.3.scale", "2")), SpecError, "graph.ops[3].scale"),
    ("scale missing", _doc(("ops.3.scale", DROP)), SpecError, "graph.ops[3].scale"),
    ("direction int", _doc(("ops.3.direction", 3)), SpecError, "graph.ops[3].direction: expected a string"),
    ("direction ?", _doc(("ops.4.direction", "t99")), SpecError, "no tensor 't99'"),
    ("factor inf", _doc(("ops.5.factor", float("-inf"))), SpecError, "graph.ops[5].factor"),
    ("sae key", _doc(("ops.6.sae", "sae9")), SpecError, "no SAE 'sae9'"),
    ("sae error", _doc(("ops.6.error", "ignore")), SpecError, "graph.ops[6]: unknown SAE error term 'ignore'"),
    ("edits obj", _doc(("ops.6.edits", {})), SpecError, "graph.ops[6].edits: expected a list"),
    ("edit mode", _doc(("ops.6.edits.0.mode", "double")), SpecError, "graph.ops[6].edits[0]: unknown feature edit mode 'double'"),
    ("edit feats", _doc(("ops.6.edits.0.features", [-1])), SpecError, "graph.ops[6].edits[0]: feature edit: features"),
    ("edit feat bool", _doc(("ops.6.edits.0.features", [True])), SpecError, "graph.ops[6].edits[0].features"),
    ("edit value", _doc(("ops.6.edits.0.value", None)), SpecError, "graph.ops[6].edits[0]: feature edit 'set' value"),
    ("clamp order", _doc(("ops.6.edits.1.low", 5)), SpecError, "graph.ops[6].edits[1]: clamp: low=5.0 > high=3.0"),
    ("edit field", _doc(("ops.6.edits.1.fn", "x")), SpecError, "graph.ops[6].edits[1]: unknown field(s) fn"),
    ("features name", _doc(("ops.6.features", "bad name")), SpecError, "read name 'bad name'"),
    # SAEs
    ("sae kind", _doc(("saes.sae0.kind", "gelu")), SpecError, "graph.saes.sae0.kind: unknown SAE kind 'gelu'"),
    ("sae param", _doc(("saes.sae0.params.k", 3)), SpecError, "graph.saes.sae0: StandardSAE: unexpected param 'k'"),
    ("sae param nan", _doc(("saes.sae0.params.apply_b_dec_to_input", float("nan"))), SpecError, "graph.saes.sae0.params"),
    ("sae param int", _doc(("saes.sae0.params.apply_b_dec_to_input", 1)), SpecError, "graph.saes.sae0: StandardSAE: apply_b_dec_to_input"),
    ("sae tensor key", _doc(("saes.sae0.tensors.W_enc", "t99")), SpecError, "SAE 'sae0' parameter 'W_enc': no tensor 't99'"),
    ("sae int tensor", _doc(("saes.sae0.tensors.W_enc", "t0")), SpecError, "graph.saes.sae0: StandardSAE: tensor 'b_enc' has shape [4], expected [3]"),
    ("sae missing", _doc(("saes.sae0.tensors.b_dec", DROP)), SpecError, "graph.saes.sae0: StandardSAE: missing 'b_dec'"),
    ("sae field", _doc(("saes.sae0.url", "x")), SpecError, "graph.saes.sae0: unknown field(s) url"),
    # tensors
    ("dtype", _doc(("tensors.t2.dtype", "float16")), SpecError, "graph.tensors.t2: declared"),
    ("shape", _doc(("tensors.t2.shape", [5])), SpecError, "graph.tensors.t2: declared"),
    ("shape floats", _doc(("tensors.t2.shape", [4.0])), SpecError, "graph.tensors.t2: declared"),
    ("shape bools", _doc(("tensors.t0.shape", [True, 3])), SpecError, "graph.tensors.t0: declared"),
    ("meta field", _doc(("tensors.t2.device", "cuda")), SpecError, "graph.tensors.t2: unknown field(s) device"),
    ("undeclared", _doc(("tensors.t2", DROP)), SpecError, "the graph declares"),
    ("phantom", _doc(("tensors.t99", {"dtype": "float32", "shape": []})), SpecError, "t99"),
    ("b64", _doc(("tensor_data.inline", "!!!")), SpecError, "tensor_data.inline: not valid base64"),
    ("b64 unicode", _doc(("tensor_data.inline", "ü")), SpecError, "tensor_data.inline: not valid base64"),
    ("not safetensors", _doc(("tensor_data.inline", "Z2FyYmFnZQ==")), SpecError, "tensor data is not valid safetensors"),
    ("inline int", _doc(("tensor_data.inline", 5)), SpecError, "tensor_data.inline: expected a string"),
    ("both", _doc(("tensor_data.file", "g.safetensors")), SpecError, "tensor_data: give inline or file, not both"),
    ("td field", _doc(("tensor_data.url", "http://x")), SpecError, "tensor_data: unknown field(s) url"),
    ("td list", _doc(("tensor_data", [])), SpecError, "tensor_data: expected an object"),
    ("file w/o dir", _doc(("tensor_data", {"file": "g.safetensors"})), SpecError, "load the graph with Graph.load(path)"),
    ("bool byte 2", _bool_doc(b"\x01\x02"), SpecError, "graph.tensors.b: bool data holds bytes"),
    ("wrong dtype data", _doc(("tensor_data.inline", _blob({**BASE.tensors, "t2": torch.ones(4, dtype=torch.float64)}))), SpecError, "graph.tensors.t2: declared"),
    # numbers and nesting
    ("layer digits", _doc(("ops.0.site.layer", "\x00RAW:digits")), SpecError, "not valid JSON"),
    ("deep lists", _doc(("ops.0.select.pos", "\x00RAW:lists")), SpecError, "not valid JSON"),
    ("deep objects", _doc(("runs.0.text", "\x00RAW:objects")), SpecError, "not valid JSON"),
    ("exp overflow", _doc(("ops.3.scale", "\x00RAW:bigexp")), SpecError, "graph.ops[3].scale: expected a finite number, got inf"),
    ("cycle", _doc(("ops.2.run", "clean"), ("ops.2.source", "corrupt")), SpecError, "cycle: clean -> corrupt -> clean"),
]
# fmt: on


@pytest.mark.parametrize(
    ("text", "error", "message"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_malformed_document_table(text: str, error: type[Exception], message: str) -> None:
    if error is type(None):
        assert iv.Graph.from_json(text) == BASE
        return
    with pytest.raises(SpecError) as info:
        iv.Graph.from_json(text)
    assert type(info.value) is error
    assert message in str(info.value)


def test_canonical_bools_decode() -> None:
    g = iv.Graph.from_json(_bool_doc(b"\x01\x00"))
    assert g.tensors["b"].tolist() == [True, False]


def test_table_covers_every_op_kind() -> None:
    kinds = {op["op"] for op in BASE_DOC["ops"]}
    assert kinds == {"read", "patch", "ablate", "add", "project_out", "scale", "sae_splice"}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("ops.0.site.layer", 10**30),
        ("ops.0.site.layer", -1),
        ("ops.2.seed", 10**30),
        ("ops.6.edits.0.features", [10**30]),
        ("ops.1.select.pos", -(10**30)),
        ("ops.4.select.pos", {"start": None, "stop": None, "step": -(10**30)}),
        ("runs.0.max_new_tokens", 100_000),
    ],
)
def test_huge_but_well_formed_numbers_decode(path: str, value: Any) -> None:
    """Out-of-range for a model, but a well-formed graph: ``validate`` catches these."""
    g = decoded(lambda: iv.Graph.from_json(_doc((path, value))))
    assert g is not None
