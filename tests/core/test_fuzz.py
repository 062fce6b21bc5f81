"""Fuzzing specs and results with a count: every case loads or raises a typed error.

Marked ``slow``; the numbers in the README come from::

    pytest -m slow --hypothesis-profile=slow -s tests/core/test_fuzz.py

(1000 cases per probe there; the default suite runs the same strategies, 40 cases each, in
``test_hostile_json.py`` and ``test_results_files.py``). A case passes when the call returns
a value or raises an :class:`~interventions.errors.InterventionError` subclass; anything
else is an untyped error, and a case that takes over 10 s is a hang (SIGALRM). The last
test prints the table: probe, cases, typed errors, defects.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import interventions as iv
from interventions.errors import InterventionError
from tests.core import test_hostile_json as spec_probes
from tests.core import test_results_files as result_probes

pytestmark = pytest.mark.slow

CASES: Counter[str] = Counter()
TYPED: Counter[str] = Counter()
DEFECTS: dict[str, list[str]] = {}
HANG_SECONDS = 10


@contextmanager
def _time_limit() -> Iterator[None]:
    def hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"hung for {HANG_SECONDS} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _probe(name: str, call: Callable[[], Any]) -> None:
    CASES[name] += 1
    try:
        with _time_limit():
            call()
    except InterventionError:
        TYPED[name] += 1
    except Exception as exc:  # an untyped error or a hang: the defect this test looks for
        DEFECTS.setdefault(name, []).append(f"{type(exc).__name__}: {str(exc)[:200]}")
        raise


def _round_trips(g: iv.Graph) -> None:
    """What a decoded graph must satisfy (as in ``test_hostile_json.decoded``)."""
    g.check()
    assert iv.Graph.from_json(g.to_json()) == g


@st.composite
def garbled(draw: st.DrawFn, blob: bytes) -> bytes:
    out = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if how == "flip" and out:
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        elif how == "cut":
            out = out[: draw(st.integers(0, len(out)))]
        elif how == "insert":
            at = draw(st.integers(0, len(out)))
            out[at:at] = draw(st.binary(max_size=16))
        else:
            out[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(out)


def _saved_graph() -> tuple[str, bytes]:
    import torch

    g = iv.Graph()
    r = g.run("a", tokens=torch.tensor([[1, 2, 3]]))
    r.add("resid_post", 0, direction=torch.ones(32), scale=2.0)
    r.read("logits", pos=-1, name="y")
    tmp = Path(tempfile.mkdtemp(prefix="iv-fuzz-graph-"))
    g.save(str(tmp / "g.json"))
    text, blob = (tmp / "g.json").read_text(), (tmp / "g.safetensors").read_bytes()
    shutil.rmtree(tmp)
    return text, blob


GRAPH_JSON, SIDECAR = _saved_graph()


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="iv-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


FUZZ = settings(deadline=None)  # max_examples: the profile's (1000 in `slow`)


@FUZZ
@given(text=spec_probes.mutated_documents())
def test_spec_mutated_documents(text: str) -> None:
    _probe("spec: mutated documents", lambda: _round_trips(iv.Graph.from_json(text)))


@FUZZ
@given(data=spec_probes.garbled_texts())
def test_spec_garbled_text(data: bytes) -> None:
    _probe("spec: garbled text", lambda: iv.Graph.from_json(data))


@FUZZ
@given(text=spec_probes.garbled_blobs())
def test_spec_garbled_inline_tensors(text: str) -> None:
    _probe("spec: garbled inline tensors", lambda: iv.Graph.from_json(text))


@FUZZ
@given(value=spec_probes.json_values)
def test_spec_arbitrary_json(value: Any) -> None:
    _probe("spec: arbitrary JSON", lambda: iv.Graph.from_json(spec_probes.dump(value)))


@FUZZ
@given(data=st.binary(max_size=256) | st.text(max_size=256))
def test_spec_arbitrary_bytes(data: bytes | str) -> None:
    _probe("spec: arbitrary bytes", lambda: iv.Graph.from_json(data))


@FUZZ
@given(blob=garbled(SIDECAR))
def test_spec_garbled_sidecar_files(folder: Path, blob: bytes) -> None:
    (folder / "g.json").write_text(GRAPH_JSON)
    (folder / "g.safetensors").write_bytes(blob)
    _probe("spec: garbled sidecar file", lambda: iv.Graph.load(str(folder / "g.json")))


@FUZZ
@given(
    field=st.sampled_from(["run", "name", "site"]),
    size=st.integers(0, 3_000_000),
    char=st.characters(codec="utf-8"),
)
def test_spec_long_names(field: str, size: int, char: str) -> None:
    doc = json.loads(GRAPH_JSON)
    doc["tensor_data"] = {"inline": ""}
    doc["tensors"] = {}
    doc["runs"] = [{"name": "a", "text": ["x"]}]
    op = {"op": "read", "run": "a", "site": {"name": "logits"}, "select": {}, "name": "y"}
    if field == "site":
        op["site"] = {"name": char * size}
    else:
        op[field] = char * size
    doc["ops"] = [op]
    _probe("spec: long names", lambda: iv.Graph.from_json(json.dumps(doc)))


@FUZZ
@given(summary=result_probes.mutated_summaries())
def test_results_mutated_summaries(folder: Path, summary: str) -> None:
    (folder / "summary.json").write_text(summary)
    (folder / "results.safetensors").write_bytes(result_probes.BLOB)
    _probe("results: mutated summary.json", lambda: iv.Results.load(folder))


@FUZZ
@given(blob=garbled(result_probes.BLOB))
def test_results_garbled_tensor_files(folder: Path, blob: bytes) -> None:
    (folder / "summary.json").write_text(json.dumps(result_probes.SUMMARY))
    (folder / "results.safetensors").write_bytes(blob)
    _probe("results: garbled results.safetensors", lambda: iv.Results.load(folder))


@FUZZ
@given(summary=st.binary(max_size=128), blob=st.binary(max_size=128))
def test_results_arbitrary_bytes(folder: Path, summary: bytes, blob: bytes) -> None:
    (folder / "summary.json").write_bytes(summary)
    (folder / "results.safetensors").write_bytes(blob)
    _probe("results: arbitrary bytes", lambda: iv.Results.load(folder))


def test_zz_report() -> None:
    """The table (run last): probe, cases, typed errors, defects."""
    rows = [f"{'probe':40} {'cases':>7} {'typed errors':>13} {'defects':>8}"]
    for name in CASES:
        rows.append(f"{name:40} {CASES[name]:7} {TYPED[name]:13} {len(DEFECTS.get(name, [])):8}")
    total = sum(CASES.values())
    rows.append(
        f"{'total':40} {total:7} {sum(TYPED.values()):13} {sum(map(len, DEFECTS.values())):8}"
    )
    print("\n" + "\n".join(rows))
    assert not DEFECTS, DEFECTS
    if settings.default.max_examples >= 1000:
        assert total >= 10_000, total
