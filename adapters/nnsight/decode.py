"""What the host sends back, read as plain data: tensors, dicts, strings, nnsight's
``Status``; nothing the host names is ever constructed here.
"""

from __future__ import annotations

from typing import Any

import torch


def _load_result(blob: bytes, compress: bool) -> Any:
    """A result blob (zstd, then torch.save) as plain data: tensors, dicts, strings.

    Loaded with ``weights_only=True``: a result is tensors and plain containers, and
    nothing the host sends is unpickled as arbitrary objects.
    """
    import io

    if compress:
        import zstandard

        blob = zstandard.ZstdDecompressor().decompress(blob)
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _load_frame(frame: bytes) -> Any:
    """A binary websocket frame: a ``torch.save``d response carrying the result inline.

    The frame is a dict of plain values (id, status, description, the result blob as
    bytes, meta); it is read with an unpickler that admits nothing but nnsight's
    ``Status`` enum, so no object the host names is ever constructed here.
    """
    import io
    import pickle
    import zipfile

    from nnsight.schema.response import ResponseModel, Status

    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == (Status.__module__, "Status"):
                return Status
            raise pickle.UnpicklingError(f"a response frame may not name {module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            raise pickle.UnpicklingError("a response frame carries no tensors")

    with zipfile.ZipFile(io.BytesIO(frame)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        data = Plain(io.BytesIO(archive.read(name))).load()
    return ResponseModel(**data)
