"""Result folders: written atomically, read back or refused with a typed error.

``Results.save`` writes each file to a temporary name and renames it; a failed write
(disk full, mocked) raises ``OutputError`` and leaves the previous folder intact.
``Results.load`` on a malformed folder raises ``ResultsError`` naming the file and the
field (the table below); hypothesis mutates real folders and garbles their bytes: the
load returns equal results or raises ``ResultsError``, nothing else, within a deadline.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import interventions as iv
from interventions.errors import OutputError, ResultsError

FAST = settings(deadline=2000)


def _results() -> iv.Results:
    prov = iv.Provenance(
        graph="abc",
        model_class="M",
        model_config="-",
        backend="torch",
        versions=(("torch", "2"),),
        created="2026-01-01T00:00:00+00:00",
    )
    return iv.Results(
        {"y": torch.arange(6.0).reshape(2, 3), "ids": torch.tensor([1, 2], dtype=torch.long)},
        prov,
    )


def _same(a: iv.Results, b: iv.Results) -> None:
    assert list(a) == list(b) and a.provenance == b.provenance
    for k in a:
        assert a[k].dtype == b[k].dtype
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_round_trip(tmp_path: Path) -> None:
    r = _results()
    r.save(tmp_path / "out")
    _same(iv.Results.load(tmp_path / "out"), r)
    assert sorted(os.listdir(tmp_path / "out")) == ["results.safetensors", "summary.json"]


# --- the malformed-results table ----------------------------------------------------------

DROP = object()


def _summary_edit(path: str, value: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        doc = json.loads((folder / "summary.json").read_text())
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
        (folder / "summary.json").write_text(json.dumps(doc))

    return edit


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        target = folder / name
        target.write_bytes(data if isinstance(data, bytes) else data.encode())

    return edit


def _truncate(n: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        target = folder / "results.safetensors"
        target.write_bytes(target.read_bytes()[:n])

    return edit


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _dir_instead(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return edit


TABLE: list[tuple[str, Callable[[Path], None], str]] = [
    ("versions list", _summary_edit("provenance.versions", ["torch", "2"]), "provenance.versions: expected an object of strings"),
    ("results 5", _summary_edit("results", 5), "results: expected an object, got int"),
    ("deep nesting", _write("summary.json", "[" * 100_000 + "]" * 100_000), "summary.json': not valid JSON"),
    ("truncated tensors", _truncate(140), "results.safetensors': tensor data is not valid safetensors: truncated"),
    ("truncated header", _truncate(12), "results.safetensors': tensor data is not valid safetensors: header length"),
    ("empty tensors", _truncate(0), "too short"),
    ("graph dict", _summary_edit("provenance.graph", {"a": 1}), "provenance.graph: expected a string"),
    ("created int", _summary_edit("provenance.created", 5), "provenance.created: expected a string"),
    ("remote list", _summary_edit("provenance.remote", [1]), "provenance.remote: expected an object of strings"),
    ("provenance list", _summary_edit("provenance", []), "provenance: expected an object, got list"),
    ("missing field", _summary_edit("provenance.backend", DROP), "missing backend"),
    ("unknown field", _summary_edit("provenance.evil", "x"), "unknown field(s) evil"),
    ("top unknown", _summary_edit("extra", 1), "expected an object with provenance and results"),
    ("no results", _summary_edit("results", DROP), "expected an object with provenance and results"),
    ("summary list", _write("summary.json", "[]"), "expected an object with provenance and results"),
    ("summary binary", _write("summary.json", b"\xff\xfe\x00"), "not valid JSON"),
    ("no summary", _remove("summary.json"), "summary.json' is missing or not a regular file"),
    ("summary is a dir", _dir_instead("summary.json"), "summary.json' is missing or not a regular file"),
    ("no tensors", _remove("results.safetensors"), "results.safetensors': cannot be read"),
    ("tensors is a dir", _dir_instead("results.safetensors"), "results.safetensors'"),
    ("shape wrong", _summary_edit("results.y.shape", [3, 2]), "results.y: declared float32 [3, 2] but the data is float32 [2, 3]"),
    ("dtype wrong", _summary_edit("results.y.dtype", "float16"), "results.y: declared float16 [2, 3]"),
    ("shape floats", _summary_edit("results.y.shape", [2.0, 3]), "results.y: expected {dtype, shape}"),
    ("entry extra", _summary_edit("results.y.device", "cuda"), "results.y: expected {dtype, shape}"),
    ("undeclared", _summary_edit("results.y", DROP), "tensor data holds 'ids', 'y' but summary.json declares 'ids'"),
    ("phantom", _summary_edit("results.z", {"dtype": "float32", "shape": []}), "but summary.json declares 'ids', 'y', 'z'"),
    ("garbage tensors", _write("results.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"), "the header is not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_malformed_results_table(
    tmp_path: Path, edit: Callable[[Path], None], message: str
) -> None:
    folder = _results().save(tmp_path / "out")
    edit(folder)
    with pytest.raises(ResultsError) as info:
        iv.Results.load(folder)
    assert type(info.value) is ResultsError
    assert message in str(info.value), str(info.value)


def test_a_huge_declared_tensor_is_refused_from_the_header(tmp_path: Path) -> None:
    folder = _results().save(tmp_path / "out")
    head = json.dumps(
        {"y": {"dtype": "F32", "shape": [2**34], "data_offsets": [0, 2**36]}}
    ).encode()
    with (folder / "results.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + 2**36)  # sparse 64 GiB
    _summary_edit("results", {"y": {"dtype": "float32", "shape": [2**34]}})(folder)
    with pytest.raises(ResultsError, match="exceed the limit"):
        iv.Results.load(folder)


# --- atomic writes -------------------------------------------------------------------------


def test_save_replaces_files_whole_and_a_full_disk_leaves_the_old_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _results().save(tmp_path / "out")
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    bigger = iv.Results({"y": torch.ones(100)}, _results().provenance)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match=r"results\.safetensors'.*No space left on device"):
        bigger.save(folder)
    monkeypatch.undo()
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before  # no temp left
    _same(iv.Results.load(folder), _results())


def test_save_onto_a_file_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="it is a file, not a folder"):
        _results().save(tmp_path / "file")


def test_graph_save_failure_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = iv.Graph()
    g.run("a", tokens=[[1, 2]]).read("logits", name="y")
    monkeypatch.setattr(
        os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(OutputError, match=r"g\.safetensors"):
        g.save(str(tmp_path / "g.json"))
    assert os.listdir(tmp_path) == []


def test_save_on_a_small_tmpfs_if_the_machine_allows(tmp_path: Path) -> None:
    """The real disk-full case, where a 1 MiB tmpfs can be mounted (root in a container)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.system(
        f"mount -t tmpfs -o size=1m tmpfs {mount} 2>/dev/null"
    ):
        pytest.skip("cannot mount a tmpfs here; the mocked ENOSPC test covers the case")
    try:
        big = iv.Results({"y": torch.ones(1024 * 1024)}, _results().provenance)  # 4 MiB
        with pytest.raises(OutputError, match="No space left on device"):
            big.save(mount / "out")
        assert [p for p in (mount / "out").iterdir()] == []
    finally:
        os.system(f"umount {mount}")


# --- fuzzing ------------------------------------------------------------------------------


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Fail a hang: SIGALRM after ``seconds`` (deadline only measures finished examples)."""

    def hang(signum: int, frame: object) -> None:
        raise AssertionError(f"Results.load hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _loaded_or_refused(folder: Path) -> None:
    with _time_limit(10):
        try:
            r = iv.Results.load(folder)
        except ResultsError as exc:
            assert str(exc)
            return
    assert isinstance(r, iv.Results)
    for name in r:
        assert isinstance(r[name], torch.Tensor)


_SAVED = tempfile.mkdtemp(prefix="iv-results-")
_results().save(_SAVED)
SUMMARY = json.loads((Path(_SAVED) / "summary.json").read_text())
BLOB = (Path(_SAVED) / "results.safetensors").read_bytes()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_summaries(draw: st.DrawFn) -> str:
    doc = json.loads(json.dumps(SUMMARY))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(json_values)
            continue
        node = doc
        try:
            for p in path[:-1]:
                node = node[p]
            if draw(st.booleans()) and isinstance(node, dict):
                del node[path[-1]]
            else:
                node[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass
    return json.dumps(doc, allow_nan=True)


@st.composite
def garbled_blobs(draw: st.DrawFn) -> bytes:
    blob = bytearray(BLOB)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if how == "flip" and blob:
            blob[draw(st.integers(0, len(blob) - 1))] = draw(st.integers(0, 255))
        elif how == "cut":
            blob = blob[: draw(st.integers(0, len(blob)))]
        elif how == "insert":
            at = draw(st.integers(0, len(blob)))
            blob[at:at] = draw(st.binary(max_size=16))
        else:
            blob[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(blob)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="iv-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@FAST
@given(summary=mutated_summaries())
def test_mutated_summaries(folder: Path, summary: str) -> None:
    (folder / "summary.json").write_text(summary)
    (folder / "results.safetensors").write_bytes(BLOB)
    _loaded_or_refused(folder)


@FAST
@given(blob=garbled_blobs())
def test_garbled_tensor_files(folder: Path, blob: bytes) -> None:
    (folder / "summary.json").write_text(json.dumps(SUMMARY))
    (folder / "results.safetensors").write_bytes(blob)
    _loaded_or_refused(folder)


@FAST
@given(
    summary=st.binary(max_size=64) | st.text(max_size=64).map(str.encode),
    blob=st.binary(max_size=64),
)
def test_arbitrary_bytes(folder: Path, summary: bytes, blob: bytes) -> None:
    (folder / "summary.json").write_bytes(summary)
    (folder / "results.safetensors").write_bytes(blob)
    _loaded_or_refused(folder)
