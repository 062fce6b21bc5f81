"""Where a model lives: the device its inputs go to, and the free memory of its devices.

Models dispatched by accelerate (``device_map=...``, ``dispatch_model``, CPU or disk
offload) hold parameters on several devices, offloaded ones on ``meta`` until their
module runs; accelerate's hooks move values between devices. Backends feed inputs to
:func:`input_device` and return every read on the CPU.

>>> import torch
>>> input_device(torch.nn.Linear(2, 2))
device(type='cpu')
>>> free_bytes(torch.nn.Linear(2, 2)) is None  # no CUDA parameters
True
"""

from __future__ import annotations

import torch
from torch import nn


def model_devices(model: nn.Module) -> list[torch.device]:
    """The distinct devices of a model's parameters and buffers, first seen first
    (``meta``, where accelerate keeps offloaded weights, left out)."""
    seen: list[torch.device] = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta" and tensor.device not in seen:
            seen.append(tensor.device)
    return seen


def input_device(model: nn.Module) -> torch.device:
    """Where token ids and input tensors go: the device of the first parameter that is not
    offloaded (for a dispatched model that is the embedding's, and accelerate's hooks move
    inputs on from there), else the CPU."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def free_bytes(model: nn.Module) -> int | None:
    """The least free memory (``torch.cuda.mem_get_info``) over the CUDA devices that hold
    the model's parameters; ``None`` when none does (CPU models, no CUDA)."""
    if not torch.cuda.is_available():  # before walking the parameters: every run asks
        return None
    cuda = [d for d in model_devices(model) if d.type == "cuda"]
    if not cuda:
        return None
    return min(torch.cuda.mem_get_info(d)[0] for d in cuda)
