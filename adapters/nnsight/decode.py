"""What the host sends back, read as plain data: tensors, dicts, strings, nnsight's
``Status``; nothing the host names is ever constructed here.

Every answer that is not what NDIF sends (bad JSON, wrong types, a corrupt or truncated
archive or compression stream, a pickle naming objects) raises
:class:`~interventions.errors.MalformedResponse` saying which message and what was
wrong, and a result larger than ``max_result_bytes`` once decompressed raises
:class:`~interventions.errors.ResultTooLarge` before it is decompressed or loaded. The
caller adds host, model key and job id.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from interventions.errors import MalformedResponse, ResultTooLarge

_DEFAULT_MAX_RESULT_BYTES = 2**31  # 2 GiB: the largest result read unless max_result_bytes=
_CHUNK = 1 << 20


def _malformed(what: str, problem: str, exc: BaseException | None = None) -> MalformedResponse:
    detail = f" ({type(exc).__name__}: {str(exc)[:200]})" if exc is not None else ""
    return MalformedResponse(
        f"{what} from the host is malformed: {problem}{detail}",
        hint="Check that NDIF_HOST (or remote=) names an NDIF API of a supported version",
    )


def check_max_result_bytes(value: Any) -> int:
    """``max_result_bytes=`` as a positive int, or a clear error.

    >>> check_max_result_bytes(1024)
    1024
    >>> check_max_result_bytes(0)
    Traceback (most recent call last):
    ...
    interventions.errors.InterventionError: nnsight backend: max_result_bytes must be a positive int (bytes), got 0
    """
    from interventions.errors import InterventionError

    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InterventionError(
            f"nnsight backend: max_result_bytes must be a positive int (bytes), got {value!r}"
        )
    return value


def _too_large(size: int, limit: int) -> ResultTooLarge:
    return ResultTooLarge(
        f"the job's result is {size} bytes, over max_result_bytes={limit}",
        hint="Pass a larger max_result_bytes= to iv.run/iv.submit (remote=True), or read "
        "less (select positions, fewer reads)",
    )


def json_object(text: str | bytes, what: str) -> dict[str, Any]:
    """A message that must be one JSON object.

    >>> json_object('{"id": "x"}', "a status")
    {'id': 'x'}
    >>> json_object("[1]", "a status")
    Traceback (most recent call last):
    ...
    interventions.errors.MalformedResponse: a status from the host is malformed: a JSON list, not an object ...]. Check that ...
    """
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _malformed(what, "not JSON", exc) from None
    if not isinstance(value, dict):
        raise _malformed(what, f"a JSON {type(value).__name__}, not an object")
    return value


def response(fields: Any, what: str) -> Any:
    """An NDIF status (nnsight's ``ResponseModel``) from its fields, checked by pydantic."""
    from nnsight.schema.response import ResponseModel
    from pydantic import ValidationError

    if not isinstance(fields, dict):
        raise _malformed(what, f"a {type(fields).__name__}, not a response's fields")
    try:
        return ResponseModel.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'response'}: {e['msg']}" for e in exc.errors()
        )
        raise _malformed(what, f"not an NDIF response ({problems[:300]})") from None


def response_json(text: str | bytes, what: str) -> Any:
    """An NDIF status sent as JSON (HTTP answers, text websocket messages)."""
    return response(json_object(text, what), what)


def load_frame(frame: bytes, limit: int) -> Any:
    """A binary websocket frame: a ``torch.save``d response carrying the result inline.

    The frame is a dict of plain values (id, status, description, the result blob as
    bytes, meta); it is read with an unpickler that admits nothing but nnsight's
    ``Status`` enum, so no object the host names is ever constructed here.
    """
    import pickle
    import zipfile

    from nnsight.schema.response import Status

    what = "a websocket frame"

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == (Status.__module__, "Status"):
                return Status
            raise pickle.UnpicklingError(f"a response frame may not name {module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            raise pickle.UnpicklingError("a response frame carries no tensors")

    try:
        with zipfile.ZipFile(io.BytesIO(frame)) as archive:
            entry = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
            if entry is None:
                raise _malformed(what, "a zip archive with no data.pkl")
            if entry.file_size > limit:
                raise _too_large(entry.file_size, limit)
            data = archive.read(entry)
    except (MalformedResponse, ResultTooLarge):
        raise
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, ...: not a whole archive
        raise _malformed(what, "not a torch.save archive", exc) from None
    try:
        fields = Plain(io.BytesIO(data)).load()
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ...
        raise _malformed(what, "its pickle cannot be read as plain data", exc) from None
    return response(fields, what)


def _decompress(blob: bytes, limit: int) -> bytes:
    import zstandard

    try:
        size = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as exc:
        raise _malformed("the job's result", "not zstd-compressed", exc) from None
    if size > limit:
        raise _too_large(size, limit)
    try:
        if size >= 0:  # the frame says its size: checked above, decompressed at once
            return bytes(zstandard.ZstdDecompressor().decompress(blob))
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob))
        parts: list[bytes] = []
        total = 0
        while chunk := reader.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise _too_large(total, limit)
            parts.append(chunk)
        return b"".join(parts)
    except zstandard.ZstdError as exc:  # truncated or corrupt stream
        raise _malformed("the job's result", "a corrupt or truncated zstd stream", exc) from None


def load_result(
    blob: bytes, compress: bool, limit: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A result blob (zstd, then torch.save) as (tensors by read name, echoed request data).

    Loaded with ``weights_only=True``: a result is tensors and plain containers, and
    nothing the host sends is unpickled as arbitrary objects.
    """
    what = "the job's result"
    if len(blob) > limit:
        raise _too_large(len(blob), limit)
    if compress:
        blob = _decompress(blob, limit)
    try:
        saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # bad zip, truncated, UnpicklingError for named objects
        raise _malformed(what, "not a torch.save archive of tensors and plain data", exc) from None
    result = saved.get("result") if isinstance(saved, dict) else None
    if not isinstance(result, dict):
        raise _malformed(what, "no 'result' dict in it")
    values, echo = result.get("values"), result.get("echo")
    if not isinstance(values, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in values.items()
    ):
        raise _malformed(what, "its 'values' are not tensors by read name")
    if echo is not None and not isinstance(echo, dict):
        raise _malformed(what, f"its 'echo' is a {type(echo).__name__}, not a dict")
    return dict(values), dict(echo or {})
