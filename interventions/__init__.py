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

from interventions.architectures import ArchitectureMap, architectures, register_architecture
from interventions.backends import (
    Backend,
    Capabilities,
    backend_capabilities,
    list_backends,
    register_backend,
)
from interventions.batching import Budget
from interventions.comparison import Comparison, compare
from interventions.errors import (
    BackendVersionError,
    ExecutionError,
    InterventionError,
    JobLost,
    MalformedResponse,
    ModelNotDeployed,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteExecutionError,
    RemoteTimeout,
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
from interventions.execute import __version__, load_model, run, submit
from interventions.graph import Graph, RunHandle
from interventions.ops import FeatureEdit, Ref
from interventions.positions import token_positions
from interventions.remote import Job
from interventions.results import Provenance, Results
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

__all__ = [
    "SAE",
    "ArchitectureMap",
    "Backend",
    "BackendVersionError",
    "BatchTopKSAE",
    "Budget",
    "Capabilities",
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
    "RunHandle",
    "SAEError",
    "SAEErrorGradientWarning",
    "SAEFit",
    "SAEInfo",
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
    "architectures",
    "backend_capabilities",
    "check_graph_saes",
    "check_sae",
    "compare",
    "harvest_features",
    "list_backends",
    "load_model",
    "load_sae",
    "per_prompt",
    "register_architecture",
    "register_backend",
    "run",
    "save_sae",
    "submit",
    "token_positions",
    "train_sae",
    "validate",
]
