"""A tensor's bytes: one view for comparing tensors bit for bit and hashing them, and
the check that a graph's tensors hold finite numbers.

>>> import torch
>>> bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
False
>>> digest(torch.zeros(2)) == digest(torch.zeros(2))
True
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch

from interventions.errors import SpecError


def byte_view(tensor: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer (a numpy view of CPU memory, or ``b""`` when empty)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so ``-0.0 != 0.0`` and a NaN equals the same NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and bytes(byte_view(a)) == bytes(byte_view(b))


# SHA-256 of tensors already hashed, so an SAE's weights are hashed once, not on every run
# that splices it. Keyed by identity and checked against the tensor's version counter,
# which every in-place change made through torch bumps.
_DIGESTS: dict[int, tuple[weakref.ref[torch.Tensor], tuple[object, ...], bytes]] = {}


def digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 of the tensor's bytes, cached per tensor object until it changes."""
    stamp = (tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
    key = id(tensor)
    hit = _DIGESTS.get(key)
    if hit is not None and hit[0]() is tensor and hit[1] == stamp:
        return hit[2]
    value = hashlib.sha256(byte_view(tensor)).digest()

    def forget(_ref: weakref.ref[torch.Tensor]) -> None:
        _DIGESTS.pop(key, None)

    _DIGESTS[key] = (weakref.ref(tensor, forget), stamp, value)
    return value


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`SpecError` if a float tensor holds NaN or Inf (the first one named)."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return
    if tensor.is_floating_point() and tensor.element_size() == 1:
        tensor = tensor.float()  # float8: torch has no isfinite for it; the cast keeps NaN/Inf
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        index = [int(i) for i in bad.nonzero()[0]]
        raise SpecError(
            f"{what} holds {int(bad.sum())} NaN/Inf value(s), first at {index} "
            f"({tensor[tuple(index)].item()}); build with iv.Graph(allow_nonfinite=True) to "
            "keep them on purpose"
        )
