"""A hostile sidecar is refused from its header, before its data is read.

Before: a sparse 64 GB sidecar gave a raw ``MemoryError`` (the file was read whole).
Now the header is checked against the graph (names, dtypes, shapes, byte ranges, a total
cap raised by ``max_tensor_bytes=``) and only a file that passes is read.
"""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import interventions as iv
from interventions.errors import SpecError
from interventions.tensorfile import MAX_TENSOR_BYTES

ELEMENTS = 16 * 1024**3  # float32: a 64 GiB tensor


def _saved(tmp_path: Path) -> Path:
    g = iv.Graph()
    g.run("a", tokens=torch.tensor([[1, 2, 3]])).add(
        "resid_post", 0, direction=torch.ones(32), scale=2.0
    )
    path = tmp_path / "g.json"
    g.save(str(path))
    return path


def _write_sidecar(path: Path, header: dict[str, object], data_size: int) -> None:
    head = json.dumps(header).encode()
    with path.with_suffix(".safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + data_size)  # sparse: no disk used, no bytes written


def _declare(path: Path, key: str, dtype: str, shape: list[int]) -> None:
    doc = json.loads(path.read_text())
    doc["tensors"][key] = {"dtype": dtype, "shape": shape}
    path.write_text(json.dumps(doc))


def _entries(path: Path, big_shape: list[int], big_dtype: str = "F32") -> dict[str, object]:
    itemsize = {"F32": 4, "I64": 8}[big_dtype]
    size = itemsize
    for n in big_shape:
        size *= n
    return {
        "t0": {"dtype": "I64", "shape": [1, 3], "data_offsets": [0, 24]},
        "t1": {"dtype": big_dtype, "shape": big_shape, "data_offsets": [24, 24 + size]},
    }


def _refused(path: Path, message: str, **options: int) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(SpecError, match=message):
            iv.Graph.load(str(path), **options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 50 * 1024**2, f"{peak} bytes allocated"


def test_a_sparse_64_gib_sidecar_is_refused_by_the_cap(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _declare(path, "t1", "float32", [ELEMENTS])
    _write_sidecar(path, _entries(path, [ELEMENTS]), 24 + 4 * ELEMENTS)
    _refused(path, "exceed the limit of .* pass max_tensor_bytes=")


def test_raising_the_cap_then_meets_a_truncated_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _declare(path, "t1", "float32", [ELEMENTS])
    _write_sidecar(path, _entries(path, [ELEMENTS]), 1000)  # claims 64 GiB, holds 1000 bytes
    _refused(path, "truncated", max_tensor_bytes=2 * 4 * ELEMENTS)


@pytest.mark.parametrize(
    ("header_shape", "declared_shape", "message"),
    [
        ([31], [32], "declared float32 \\[32\\] but the data is float32 \\[31\\]"),
        ([64], [32], "declared float32 \\[32\\] but the data is float32 \\[64\\]"),
    ],
)
def test_header_shapes_must_match_the_graph(
    tmp_path: Path, header_shape: list[int], declared_shape: list[int], message: str
) -> None:
    path = _saved(tmp_path)
    _write_sidecar(path, _entries(path, header_shape), 24 + 4 * header_shape[0])
    _declare(path, "t1", "float32", declared_shape)
    _refused(path, message)


def test_an_undeclared_tensor_in_the_header_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    entries = _entries(path, [32])
    entries["extra"] = {
        "dtype": "F32",
        "shape": [ELEMENTS],
        "data_offsets": [152, 152 + 4 * ELEMENTS],
    }
    _write_sidecar(path, entries, 152 + 4 * ELEMENTS)
    _refused(path, "tensor data holds 'extra', 't0', 't1' but the graph declares 't0', 't1'")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [32], "data_offsets": [24, 100]}, "does not fill bytes"),
        ({"dtype": "X9", "shape": [32], "data_offsets": [24, 152]}, "unknown dtype 'X9'; dtypes: "),
        ({"dtype": "F32", "shape": [-32], "data_offsets": [24, 152]}, "not a list of sizes"),
        ({"dtype": "F32", "shape": [32], "data_offsets": [152, 24]}, "not \\[start, end\\]"),
        ({"dtype": "F32", "shape": [32]}, "not \\[start, end\\]"),
    ],
)
def test_malformed_header_entries(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    path = _saved(tmp_path)
    entries = _entries(path, [32])
    entries["t1"] = entry
    _write_sidecar(path, entries, 152)
    _refused(path, message)


def test_a_header_length_past_the_end_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with path.with_suffix(".safetensors").open("wb") as f:
        f.write(struct.pack("<Q", 2**63) + b"{}")
    _refused(path, "header length")


def test_a_genuine_sidecar_loads_and_the_cap_is_an_explicit_option(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    g = iv.Graph.load(str(path))
    torch.testing.assert_close(g.tensors["t1"], torch.ones(32), atol=0, rtol=0)
    assert os.path.getsize(path.with_suffix(".safetensors")) < MAX_TENSOR_BYTES
    with pytest.raises(SpecError, match="152 bytes of tensor data exceed the limit of 100"):
        iv.Graph.load(str(path), max_tensor_bytes=100)
