"""interventions: one declarative intervention graph, run on any backend.

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> x = g.run("x", inputs=torch.ones(1, 3, 4))
>>> x.scale("output", factor=2.0)
>>> _ = x.read("output", name="y")
>>> iv.run(g, torch.nn.Linear(4, 4, bias=False))["y"].shape
torch.Size([1, 3, 4])

Modules: ``sites`` (where), ``architectures`` (standard names per family), ``ops`` (the
closed op set), ``graph`` (runs + ops; JSON), ``validate``, ``plan``, ``results``,
``backends`` (the adapter registry), ``sae``; adapters live in ``interventions.adapters``
and are imported only when a backend is used.
"""

import sys
import types
from typing import TYPE_CHECKING

from interventions._version import __version__
from interventions.errors import (
    BackendVersionError,
    ExecutionError,
    InterventionError,
    JobLost,
    MalformedResponse,
    ModelNotDeployed,
    OutputError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteExecutionError,
    RemoteTimeout,
    ResultsError,
    ResultTooLarge,
    SAEError,
    SAEErrorGradientWarning,
    SpecError,
    UnknownArchitecture,
    UnknownBackend,
    UnknownOp,
    UnknownSite,
    UnsupportedOp,
    ValidationError,
)

if TYPE_CHECKING:
    from interventions.architectures import ArchitectureMap, architectures, register_architecture
    from interventions.backends import (
        Backend,
        Capabilities,
        backend_capabilities,
        list_backends,
        register_backend,
    )
    from interventions.batching import Budget
    from interventions.circuits.acdc import acdc
    from interventions.circuits.circuit import Circuit
    from interventions.circuits.evaluate import completeness, faithfulness
    from interventions.comparison import Comparison, compare
    from interventions.execute import load_model, run, submit
    from interventions.graph import Graph, RunHandle
    from interventions.ops import FeatureEdit, Ref
    from interventions.positions import token_positions
    from interventions.propose import ArchitectureCheck, check_architecture, propose_architecture
    from interventions.remote import Job
    from interventions.results import Provenance, Results
    from interventions.routing import RoutingRule
    from interventions.runs import Sampling
    from interventions.sae import (
        SAE,
        BatchTopKSAE,
        GatedSAE,
        JumpReLUSAE,
        JumpReLUTranscoder,
        SAEInfo,
        SkipTranscoder,
        StandardSAE,
        TopKSAE,
        Transcoder,
        load_sae,
        save_sae,
    )
    from interventions.sae.check import SAEFit, check_graph_saes, check_sae
    from interventions.sae.dashboard import FeatureDashboard, harvest_features
    from interventions.sae.training import train_sae
    from interventions.sites import PerPrompt, Select, Site, per_prompt
    from interventions.validation import validate

# Everything but the errors is imported on first use, so ``import interventions`` (and the
# command line's ``--help``) does not import torch.
_LAZY: dict[str, str] = {
    "acdc": "interventions.circuits.acdc",
    "Circuit": "interventions.circuits.circuit",
    "completeness": "interventions.circuits.evaluate",
    "faithfulness": "interventions.circuits.evaluate",
    "ArchitectureMap": "interventions.architectures",
    "architectures": "interventions.architectures",
    "register_architecture": "interventions.architectures",
    "RoutingRule": "interventions.routing",
    "Backend": "interventions.backends",
    "Capabilities": "interventions.backends",
    "backend_capabilities": "interventions.backends",
    "list_backends": "interventions.backends",
    "register_backend": "interventions.backends",
    "Budget": "interventions.batching",
    "Comparison": "interventions.comparison",
    "compare": "interventions.comparison",
    "load_model": "interventions.execute",
    "run": "interventions.execute",
    "submit": "interventions.execute",
    "Graph": "interventions.graph",
    "RunHandle": "interventions.graph",
    "FeatureEdit": "interventions.ops",
    "Ref": "interventions.ops",
    "token_positions": "interventions.positions",
    "Job": "interventions.remote",
    "ArchitectureCheck": "interventions.propose",
    "check_architecture": "interventions.propose",
    "propose_architecture": "interventions.propose",
    "Provenance": "interventions.results",
    "Results": "interventions.results",
    "BatchTopKSAE": "interventions.sae",
    "GatedSAE": "interventions.sae",
    "JumpReLUSAE": "interventions.sae",
    "JumpReLUTranscoder": "interventions.sae",
    "SAE": "interventions.sae",
    "SAEInfo": "interventions.sae",
    "SkipTranscoder": "interventions.sae",
    "StandardSAE": "interventions.sae",
    "TopKSAE": "interventions.sae",
    "Transcoder": "interventions.sae",
    "load_sae": "interventions.sae",
    "save_sae": "interventions.sae",
    "SAEFit": "interventions.sae.check",
    "check_sae": "interventions.sae.check",
    "check_graph_saes": "interventions.sae.check",
    "FeatureDashboard": "interventions.sae.dashboard",
    "harvest_features": "interventions.sae.dashboard",
    "train_sae": "interventions.sae.training",
    "PerPrompt": "interventions.sites",
    "Sampling": "interventions.runs",
    "Select": "interventions.sites",
    "Site": "interventions.sites",
    "per_prompt": "interventions.sites",
    "validate": "interventions.validation",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'interventions' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``iv.architectures`` is a function: importing the submodule of that name must not
    replace it (the import system sets each loaded submodule as a package attribute)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules under its full name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "SAE",
    "ArchitectureCheck",
    "ArchitectureMap",
    "Backend",
    "BackendVersionError",
    "BatchTopKSAE",
    "Budget",
    "Capabilities",
    "Circuit",
    "Comparison",
    "ExecutionError",
    "FeatureDashboard",
    "FeatureEdit",
    "GatedSAE",
    "Graph",
    "InterventionError",
    "Job",
    "JobLost",
    "JumpReLUSAE",
    "JumpReLUTranscoder",
    "MalformedResponse",
    "ModelNotDeployed",
    "OutputError",
    "PerPrompt",
    "Provenance",
    "Ref",
    "RemoteAuthError",
    "RemoteConnectionError",
    "RemoteError",
    "RemoteExecutionError",
    "RemoteTimeout",
    "ResultTooLarge",
    "Results",
    "ResultsError",
    "RoutingRule",
    "RunHandle",
    "SAEError",
    "SAEErrorGradientWarning",
    "SAEFit",
    "SAEInfo",
    "Sampling",
    "Select",
    "Site",
    "SkipTranscoder",
    "SpecError",
    "StandardSAE",
    "TopKSAE",
    "Transcoder",
    "UnknownArchitecture",
    "UnknownBackend",
    "UnknownOp",
    "UnknownSite",
    "UnsupportedOp",
    "ValidationError",
    "__version__",
    "acdc",
    "architectures",
    "backend_capabilities",
    "check_architecture",
    "check_graph_saes",
    "check_sae",
    "compare",
    "completeness",
    "faithfulness",
    "harvest_features",
    "list_backends",
    "load_model",
    "load_sae",
    "per_prompt",
    "propose_architecture",
    "register_architecture",
    "register_backend",
    "run",
    "save_sae",
    "submit",
    "token_positions",
    "train_sae",
    "validate",
]
