"""``iv.run``: load (if named), validate, plan, execute on a backend, attach provenance."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import torch
from torch import nn

from interventions.architectures import describe
from interventions.backends import get_backend
from interventions.batching import Budget, batch_graph
from interventions.errors import ExecutionError, InterventionError, UnsupportedOp
from interventions.graph import Graph
from interventions.plan import make_plan
from interventions.results import Provenance, Results
from interventions.validation import validate

__version__ = "0.1.0"


def load_model(name_or_path: str, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer with transformers (hub name or local directory).

    The bundled reference models load by their short names (see
    :mod:`interventions.reference_models`), with no download.
    """
    from interventions.reference_models import load_reference

    bundled = load_reference(name_or_path)
    if bundled is not None:
        return bundled
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise InterventionError("loading a model by name needs transformers") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InterventionError(f"cannot load model {name_or_path!r}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    model.eval()
    return model, tokenizer


def _config_hash(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if to_json is None:
        return "-"
    return hashlib.sha256(to_json(use_diff=False).encode()).hexdigest()


def _versions(backend_versions: dict[str, str]) -> tuple[tuple[str, str], ...]:
    versions = {"interventions": __version__, "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    versions.update(backend_versions)
    return tuple(sorted(versions.items()))


def run(
    graph: Graph,
    model: nn.Module | str,
    *,
    backend: str = "torch",
    tokenizer: Any = None,
    batch: bool = True,
    budget: Budget | None = None,
    progress: bool | None = None,
    **options: Any,
) -> Results:
    """Validate ``graph`` against ``model``, execute it on ``backend``, return :class:`Results`.

    ``model`` is a model object (HuggingFace or any ``nn.Module``) or a name/path that
    transformers can load. Independent runs of equal shape share batched forward passes
    under ``budget`` (see :mod:`interventions.batching`); ``batch=False`` runs each run on
    its own. ``progress`` shows a bar for executions longer than a second (default: on a
    terminal). Backend-specific ``options`` are passed through (the torch backend takes
    ``grad=True`` to keep the autograd graph).

    >>> import torch, interventions as iv
    >>> g = iv.Graph()
    >>> _ = g.run("a", inputs=torch.ones(1, 2, 4)).read("output", name="y")
    >>> iv.run(g, torch.nn.Linear(4, 3))["y"].shape
    torch.Size([1, 2, 3])
    """
    if isinstance(model, str):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if not isinstance(model, nn.Module):
        raise InterventionError(f"model must be an nn.Module or a name, got {type(model).__name__}")
    info = describe(model)
    plan = validate(graph, model, tokenizer=tokenizer, backend=backend, info=info)
    impl = get_backend(backend)
    if options.get("grad") and not impl.capabilities.gradients:
        from interventions.backends import backend_capabilities

        able = [
            n for n, c in backend_capabilities().items() if not isinstance(c, str) and c.gradients
        ]
        raise UnsupportedOp(
            f"backend {backend!r} computes no gradients (grad=True); backends that do: "
            f"{', '.join(able)}"
        )
    internal: frozenset[str] = frozenset()
    if batch and len(graph.runs) > 1:
        batched = batch_graph(graph, budget, inputs=plan.inputs, info=info)
        internal = batched.internal
        plan = make_plan(batched.graph, info, tokenizer)
    try:
        tensors = impl.execute(plan, model, progress=progress, **options)
    except InterventionError:
        raise
    except Exception as exc:
        raise ExecutionError(f"backend {backend!r} failed: {type(exc).__name__}: {exc}") from exc
    provenance = Provenance(
        graph=graph.fingerprint(),
        model_class=info.class_name,
        model_config=_config_hash(model),
        backend=backend,
        versions=_versions(impl.versions()),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    wanted = graph.reads()
    return Results(
        {k: tensors[k] for k in wanted if k in tensors and k not in internal}, provenance
    )
