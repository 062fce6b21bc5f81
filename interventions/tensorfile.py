"""Safe tensor I/O: bounded safetensors reads (header checked first), atomic writes, and
the finiteness check for graph tensors.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. :func:`read_tensors` reads only the
header, checks it (every tensor expected, dtypes and shapes as declared, byte ranges
that fit the file, a total under ``max_bytes``) and only then reads the data, so a
hostile or truncated file costs a few reads, never its declared size in memory.

>>> import torch
>>> from safetensors.torch import save
>>> blob = save({"w": torch.zeros(2, 3)})
>>> read_tensors(blob, {"w": ("float32", [2, 3])}, what="w.safetensors")["w"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from interventions.errors import InterventionError, OutputError, SpecError, choices_text, excerpt

MAX_TENSOR_BYTES = 4 * 1024**3  # default cap on the data of one file (4 GiB)
MAX_HEADER_BYTES = 64 * 1024 * 1024

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "C64": ("complex64", 8),
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

Declared = Mapping[str, tuple[str, Sequence[int]]]


def read_tensors(
    source: bytes | str | os.PathLike[str],
    expected: Declared | None,
    *,
    what: str,
    max_bytes: int = MAX_TENSOR_BYTES,
    error: type[InterventionError] = SpecError,
    field: str = "",
    declared_by: str = "the graph",
) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors blob or file, after checking its header.

    ``expected`` maps each tensor's name to its dtype name and shape (``None``: accept
    any names, still bounded). ``what`` names the file in messages; ``error`` is the
    class raised; ``field`` prefixes a tensor's name where its declaration is named
    (``"graph.tensors."``) and ``declared_by`` names what declared them. Raise ``max_bytes`` to read larger files on purpose.
    """
    try:
        if isinstance(source, bytes):
            return _read(
                io.BytesIO(source),
                len(source),
                expected,
                what,
                max_bytes,
                error,
                field,
                declared_by,
            )
        path = Path(source)
        with path.open("rb") as f:
            return _read(
                f,
                os.fstat(f.fileno()).st_size,
                expected,
                what,
                max_bytes,
                error,
                field,
                declared_by,
            )
    except OSError as exc:
        raise error(f"{what}: cannot be read: {exc.strerror or exc}") from None


def _read(
    f: BinaryIO,
    size: int,
    expected: Declared | None,
    what: str,
    max_bytes: int,
    error: type[InterventionError],
    field: str,
    declared_by: str,
) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    bad = f"{what}: tensor data is not valid safetensors"
    if size < 8:
        raise error(f"{bad}: {size} bytes is too short")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise error(f"{bad}: header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise error(f"{bad}: the header is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise error(f"{bad}: the header is not a JSON object")
    header.pop("__metadata__", None)
    names = sorted(header)
    if expected is not None and set(names) != set(expected):
        raise error(
            f"{what}: tensor data holds {_listing(names)} but {declared_by} declares "
            f"{_listing(sorted(expected))}"
        )
    total = 0
    for name in names:
        total = max(total, _check_entry(header[name], name, expected, what, error, field))
    if total > max_bytes:
        raise error(
            f"{what}: {total} bytes of tensor data exceed the limit of {max_bytes}; pass "
            "max_tensor_bytes= to read it"
        )
    if 8 + n + total > size:
        raise error(f"{bad}: truncated: the header needs {8 + n + total} bytes, file has {size}")
    f.seek(0)
    blob = f.read(8 + n + total)
    try:
        return dict(load(blob)) if names else {}
    except Exception as exc:  # safetensors raises its own error types
        raise error(f"{bad}: {str(exc)[:200]}") from None


def _check_entry(
    entry: object,
    name: str,
    expected: Declared | None,
    what: str,
    error: type[InterventionError],
    field: str,
) -> int:
    """Check one header entry; return the end of its byte range."""
    where = f"{what}: tensor {excerpt(name)}"
    if not isinstance(entry, dict):
        raise error(f"{where}: header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise error(f"{where}: unknown dtype {excerpt(code)}; dtypes: {choices_text(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise error(f"{where}: shape {excerpt(shape)} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise error(f"{where}: data_offsets {excerpt(offsets)} are not [start, end]")
    dtype, itemsize = DTYPES[code]
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise error(f"{where}: {dtype} {shape} does not fill bytes {offsets}")
    if expected is not None:
        want_dtype, want_shape = expected[name]
        if want_dtype != dtype or list(want_shape) != shape:
            raise error(
                f"{field}{excerpt(name)[1:-1]}: declared {want_dtype} {list(want_shape)} but "
                f"the data is {dtype} {shape} ({what})"
            )
    return int(offsets[1])


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _listing(names: Sequence[str]) -> str:
    shown = [excerpt(n, 40) for n in names[:20]]
    more = f", ... ({len(names)} in all)" if len(names) > 20 else ""
    return (", ".join(shown) + more) if names else "nothing"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it over ``path``.

    A reader sees the old file or the new one, never a part; on failure (disk full,
    permissions) the temporary file is removed and :class:`OutputError` names ``path``.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
    >>> write_atomic(target, b"abc"); target.read_bytes()
    b'abc'
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
