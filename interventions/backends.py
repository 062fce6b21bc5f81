"""The backend seam: one small protocol, and a registry that imports adapters lazily.

The core never imports an adapter module until a backend is asked for by name, so
``import interventions`` imports neither nnsight nor pyvene. Third-party backends register
with :func:`register_backend` or the ``interventions.backends`` entry-point group; neither
may replace a built-in name.

>>> "torch" in list_backends()
True
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from interventions.errors import InterventionError, UnknownBackend, choices_text, suggest

if TYPE_CHECKING:
    import torch
    from torch import nn

    from interventions.plan import Plan


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run. ``validate`` rejects a graph that needs more, before running."""

    ops: frozenset[str]
    views: frozenset[str]  # hook views: plain, heads, attn_weights, logits
    generation: bool
    gradients: bool
    remote: bool
    raw_modules: bool  # raw module-path sites on any nn.Module
    hf_only: bool = False  # needs a HuggingFace model (config + generate)
    sae_source: bool = False  # sae_splice(source=...): read one site, write another

    def describe(self) -> dict[str, object]:
        return {
            "ops": sorted(self.ops),
            "views": sorted(self.views),
            "generation": self.generation,
            "gradients": self.gradients,
            "remote": self.remote,
            "raw_modules": self.raw_modules,
            "hf_only": self.hf_only,
            "sae_source": self.sae_source,
        }


@runtime_checkable
class Backend(Protocol):
    """Executes a plan on a model and returns the raw result tensors by name."""

    name: str
    capabilities: Capabilities

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this backend drives (for provenance)."""
        ...

    def execute(self, plan: Plan, model: nn.Module, **options: Any) -> dict[str, torch.Tensor]:
        """Run every run of the plan. Leaves no hooks or state on ``model``, even on error."""
        ...


_BUILTIN: dict[str, str] = {
    "torch": "interventions.adapters.torch_hooks:TorchHooksBackend",
    "nnsight": "interventions.adapters.nnsight:NNsightBackend",
    "pyvene": "interventions.adapters.pyvene:PyveneBackend",
}
_REGISTERED: dict[str, str] = {}
_INSTANCES: dict[str, Backend] = {}
ENTRY_POINT_GROUP = "interventions.backends"


def register_backend(name: str, target: str) -> None:
    """Register a backend by ``"module:Class"``; imported on first use. Built-ins are fixed."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in backend and cannot be replaced")
    if ":" not in target:
        raise ValueError(f"backend target {target!r} must look like 'package.module:Class'")
    _REGISTERED[name] = target
    _INSTANCES.pop(name, None)


def _entry_points() -> dict[str, str]:
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _BUILTIN:
            found[ep.name] = ep.value
    return found


def _targets() -> dict[str, str]:
    return {**_entry_points(), **_REGISTERED, **_BUILTIN}


def list_backends() -> list[str]:
    """Names of every known backend (installed or not)."""
    return list(_targets())


def get_backend(name: str) -> Backend:
    """The backend called ``name``, imported on first use."""
    if name in _INSTANCES:
        return _INSTANCES[name]
    targets = _targets()
    if name not in targets:
        raise UnknownBackend(
            f"unknown backend {name!r}{suggest(name, targets)}; backends: {choices_text(targets)}"
        )
    module_name, _, attr = targets[name].partition(":")
    try:
        module = importlib.import_module(module_name)
        backend = getattr(module, attr)()  # a backend may import its library only here
    except ImportError as exc:
        missing = f"needs {exc.name}, which is not installed" if exc.name else "cannot be imported"
        raise InterventionError(
            f"backend {name!r} {missing} ({exc}); install its extra: "
            f"pip install 'interventions[{name}]'"
        ) from None
    _INSTANCES[name] = backend
    return backend


def backend_capabilities() -> Mapping[str, Capabilities | str]:
    """Each backend's capabilities, or the reason it cannot be loaded here."""
    out: dict[str, Capabilities | str] = {}
    for name in list_backends():
        try:
            out[name] = get_backend(name).capabilities
        except InterventionError as exc:
            out[name] = str(exc)
    return out
