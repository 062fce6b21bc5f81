"""``iv.run``: load (if named), validate, plan, execute on a backend, attach provenance."""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interventions._version import __version__
from interventions.architectures import describe
from interventions.assembly import Split, fill_means
from interventions.backends import get_backend
from interventions.batching import Budget, batch_graph
from interventions.errors import ExecutionError, InterventionError, UnsupportedOp
from interventions.graph import Graph
from interventions.hf import empty_tokenizer, falcon_alibi_attention
from interventions.locks import model_lock
from interventions.ops import Read, depends_on, produces, source_run
from interventions.plan import make_plan
from interventions.remote import Job, remote_backend
from interventions.results import Provenance, Results
from interventions.sites import Select
from interventions.validation import validate


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
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise InterventionError("loading a model by name needs transformers") from exc
    _check_local_path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InterventionError(f"cannot load model {name_or_path!r}: {exc}") from None
    model.eval()
    return model, _tokenizer(name_or_path)


def _check_local_path(name_or_path: str) -> None:
    """A name that can only be a path (``/x``, ``./x``, ``~/x``, ``a/b/c``) must exist."""
    path = Path(name_or_path).expanduser()
    looks_local = (
        name_or_path.startswith((".", "/", "~", "\\"))
        or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
    )
    if looks_local and not path.exists():
        raise InterventionError(
            f"cannot load model {name_or_path!r}: no such directory ({str(path.absolute())!r}); "
            "give a bundled name, a hub id like 'gpt2' or 'org/name', or an existing folder"
        )
    if path.exists() and not path.is_dir():
        raise InterventionError(
            f"cannot load model {name_or_path!r}: it is a file, not a model directory"
        )


def _tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer, or ``None`` when it has none (or an empty one)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    return None if empty_tokenizer(tokenizer) else tokenizer


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), then give every module back its own mode.

    A model left in ``train()`` mode would run with dropout, so reruns would differ.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    >>> with eval_mode(m):
    ...     m.training
    False
    >>> m.training, m[0].training
    (True, True)
    """
    modes = [(m, m.training) for m in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _config_hash(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if to_json is None:
        return "-"
    # keyed by class and attributes (nested values by value): ~10x cheaper than the JSON
    key = (type(config), repr(vars(config)))
    found = _CONFIG_HASHES.get(key)
    if found is None:
        found = hashlib.sha256(to_json(use_diff=False).encode()).hexdigest()
        if len(_CONFIG_HASHES) >= 64:
            _CONFIG_HASHES.clear()
        _CONFIG_HASHES[key] = found
    return found


_CONFIG_HASHES: dict[tuple[type, str], str] = {}


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
    chunk_size: int | None = None,
    reduce: Mapping[str, str] | None = None,
    shards: str | os.PathLike[str] | None = None,
    read_dtype: torch.dtype | None = None,
    **options: Any,
) -> Results:
    """Validate ``graph`` against ``model``, execute it on ``backend``, return :class:`Results`.

    ``read_dtype=torch.float32`` gives every floating-point read in that dtype (a bf16 or
    fp16 model's reads upcast exactly, after the run: the model runs in its own dtype);
    integer results (expert ids, generated tokens) are left as they are.

    ``chunk_size=n`` streams a dataset: the graph runs on ``n`` prompts at a time (sorted
    by length, results in dataset order), and ``reduce={"read": "mean" | "sum" |
    "token_mean" | "token_sum" | "shards"}`` keeps a running reduction of a read instead of
    every row (``shards=`` names the folder for ``"shards"``); see
    :mod:`interventions.stream`.

    ``model`` is a model object (HuggingFace or any ``nn.Module``) or a name/path that
    transformers can load. Independent runs of equal shape share batched forward passes
    under ``budget`` (see :mod:`interventions.batching`); ``batch=False`` runs each run on
    its own. ``progress`` shows a bar for executions longer than a second (default: on a
    terminal). Backend-specific ``options`` are passed through (the torch backend takes
    ``grad=True`` to keep the autograd graph).

    Runs on one model object are serialised (see :func:`model_lock`): threads that share a
    model wait for each other and never see each other's hooks. A model in ``train()`` mode
    runs in eval mode (no dropout) and gets each module's mode back afterwards.

    ``remote=True`` (nnsight backend) sends the whole graph to an NDIF host as one
    request and waits for it: ``model`` may then be just the model's name on the host
    (only its config is read here). Host and API key follow nnsight (``NDIF_HOST``,
    ``NDIF_API_KEY``, its config file), or ``remote="http://host:port"``; options
    ``model_key=``, ``api_key=``, ``timeout=`` (seconds, default 600; 0 or negative is an
    error), ``retries=`` and ``max_result_bytes=`` (default 2 GiB, the largest result read).
    See :func:`submit` for jobs that outlive the client.

    >>> import torch, interventions as iv
    >>> g = iv.Graph()
    >>> _ = g.run("a", inputs=torch.ones(1, 2, 4)).read("output", name="y")
    >>> iv.run(g, torch.nn.Linear(4, 3))["y"].shape
    torch.Size([1, 2, 3])
    """
    _check_read_dtype(read_dtype)
    if chunk_size is not None or reduce or shards is not None:
        if read_dtype is not None:  # each chunk's reads, before they are reduced
            options = {**options, "read_dtype": read_dtype}
        return _run_streamed(
            graph,
            model,
            backend,
            tokenizer,
            batch,
            budget,
            progress,
            chunk_size,
            reduce,
            shards,
            options,
        )
    remote = options.pop("remote", False)
    if remote:
        job = _run_remote(
            graph, model, backend, tokenizer, batch, budget, remote, options, wait=True
        )
        done = job.result(timeout=None)  # None: the timeout= option given to the backend
        return done if read_dtype is None else _cast_reads(done, read_dtype)
    if isinstance(model, str):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    if not isinstance(model, nn.Module):
        raise InterventionError(f"model must be an nn.Module or a name, got {type(model).__name__}")
    if _grads_by_autograd(graph, backend):
        from interventions.gradients import by_autograd

        validate(graph, model, tokenizer=tokenizer)  # the grad ops' own checks, before lowering
        options.pop("grad", None)
        run_grad = functools.partial(
            run, model=model, backend=backend, tokenizer=tokenizer, batch=batch, budget=budget,
            progress=progress, grad=True, **options,
        )  # fmt: skip
        return by_autograd(graph, run_grad)
    # a first, smaller graph (means over ragged sources) runs the same way as this one
    run_first = functools.partial(
        run, model=model, backend=backend, tokenizer=tokenizer, batch=batch, budget=budget,
        progress=progress, **options,
    )  # fmt: skip

    with model_lock(model), eval_mode(model):
        model, info, plan, impl, internal = _prepare(
            graph, model, backend, tokenizer, batch, budget, options, remote=False, first=run_first
        )
        try:
            tensors = impl.execute(plan, model, progress=progress, **options)
        except InterventionError:
            raise
        except Exception as exc:
            raise ExecutionError(
                f"backend {backend!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    masks: dict[str, torch.Tensor] = {}
    if plan.assembly is not None:
        tensors, masks = plan.assembly.assemble(tensors)
    provenance = Provenance(
        graph=graph.fingerprint(),
        model_class=info.class_name,
        model_config=_config_hash(model),
        backend=backend,
        versions=_versions(impl.versions()),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    wanted = graph.reads()
    results = Results(
        {k: tensors[k] for k in wanted if k in tensors and k not in internal},
        provenance,
        masks={k: m for k, m in masks.items() if k in wanted},
    )
    return results if read_dtype is None else _cast_reads(results, read_dtype)


def _check_read_dtype(dtype: object) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InterventionError(
            f"read_dtype={dtype!r}: expected a floating-point torch dtype, e.g. "
            "torch.float32, torch.float64, torch.bfloat16, torch.float16, or None"
        )


def _cast_reads(results: Results, dtype: torch.dtype) -> Results:
    """``results`` with every floating-point tensor in ``dtype`` (masks, ints untouched)."""
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in results.items()}
    masks = {k: m for k in results if (m := results.mask(k)) is not None}
    return Results(tensors, results.provenance, masks=masks)


def _grads_by_autograd(graph: Graph, backend: str) -> bool:
    """Has ``graph`` grad ops that ``backend`` leaves to client-side autograd?"""
    from interventions.gradients import has_grads

    if not has_grads(graph):
        return False
    caps = get_backend(backend).capabilities
    return "grad" not in caps.ops and caps.gradients


def _run_streamed(
    graph: Graph,
    model: nn.Module | str,
    backend: str,
    tokenizer: Any,
    batch: bool,
    budget: Budget | None,
    progress: bool | None,
    chunk_size: int | None,
    reduce: Mapping[str, str] | None,
    shards: str | os.PathLike[str] | None,
    options: dict[str, Any],
) -> Results:
    from interventions.gradients import refuse_streamed
    from interventions.stream import run_in_chunks

    refuse_streamed(graph)

    if isinstance(model, str) and not options.get("remote"):
        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer

    run_chunk = functools.partial(
        run, model=model, backend=backend, tokenizer=tokenizer, batch=batch, budget=budget,
        progress=False, **options,
    )  # fmt: skip

    size = chunk_size if chunk_size is not None else 2**62  # reductions alone: one chunk
    return run_in_chunks(graph, tokenizer, size, reduce, shards, run_chunk, progress)


def _prepare(
    graph: Graph,
    model: nn.Module | str,
    backend: str,
    tokenizer: Any,
    batch: bool,
    budget: Budget | None,
    options: dict[str, Any],
    *,
    remote: bool,
    first: Callable[[Graph], Results] | None = None,
) -> tuple[nn.Module, Any, Any, Any, frozenset[str]]:
    """Load (or, for a remote run, only build the structure of) the model, validate, batch.

    A mean ablation over a run of prompts of different lengths needs the source's mean
    over its real tokens first: ``first`` runs that smaller graph (same backend, local or
    remote) before the plan is final.
    """
    if isinstance(model, str):
        model, loaded_tokenizer = load_structure(model) if remote else load_model(model)
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
        ops = (
            " (its grad ops compute gradients where the model runs)"
            if "grad" in impl.capabilities.ops
            else ""
        )
        raise UnsupportedOp(
            f"backend {backend!r} keeps no autograd graph (grad=True){ops}; backends that do: "
            f"{', '.join(able)}"
        )
    internal: frozenset[str] = frozenset()
    split = plan.assembly
    if split is not None:
        internal = split.internal
        if split.means:
            assert first is not None, "mean ablations over ragged sources need a first pass"
            fill_means(split, _source_means(graph, split, first))
    if batch and len(plan.graph.runs) > 1:
        budget = budget or Budget.for_model(model)
        batched = batch_graph(plan.graph, budget, inputs=plan.inputs, info=info)
        internal = internal | batched.internal
        plan = replace(make_plan(batched.graph, info, tokenizer, budget), assembly=split)
    return model, info, plan, impl, internal


def _source_means(
    graph: Graph, split: Split, first: Callable[[Graph], Results]
) -> dict[str, dict[str, torch.Tensor]]:
    """The whole sites that mean ablations average, from a first run of their source runs
    (and the runs those depend on), rows left-aligned."""
    wanted = {(slot.source, slot.site) for slot in split.means}
    needs = {name: set() for name in graph.runs}  # type: dict[str, set[str]]
    producer = {n: op.run for op in graph.ops for n in produces(op)}
    for op in graph.ops:
        needs[op.run].update(producer[n] for n in depends_on(op))
        source = source_run(op)
        if source is not None:
            needs[op.run].add(source)
    keep: set[str] = set()
    todo = [source for source, _ in wanted]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(needs[name])
    sub = Graph(tensors=dict(graph.tensors), saes=dict(graph.saes))
    for name in graph.run_order():
        if name in keep:
            sub.runs[name] = replace(graph.runs[name], padding_side="right")
    sub.ops = [op for op in graph.ops if op.run in keep]
    names = {}
    for i, (source, site) in enumerate(sorted(wanted, key=str)):
        names[(source, site)] = f"__mean_source{i}"
        sub.ops.append(Read(source, site, Select(), names[(source, site)]))
    res = first(sub)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for (source, site), name in names.items():
        out.setdefault(source, {})[str(site)] = res[name]
    return out


def load_structure(name_or_path: str) -> tuple[nn.Module, Any]:
    """A causal LM's module tree on the ``meta`` device (no weights), and its tokenizer.

    What a remote run needs on the client: the graph is validated and compiled against
    the structure, and the host runs it on its own copy of the weights. Cached per name
    (a few per process): the structure holds no weights and no state of any run.
    """
    return _load_structure(name_or_path)


@functools.lru_cache(maxsize=8)
def _load_structure(name_or_path: str) -> tuple[nn.Module, Any]:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise InterventionError("naming a remote model needs transformers") from exc
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise InterventionError(f"cannot read the config of {name_or_path!r}: {exc}") from None
    model.config._name_or_path = name_or_path
    return model.eval(), _tokenizer(name_or_path)


def _run_remote(
    graph: Graph,
    model: nn.Module | str,
    backend: str,
    tokenizer: Any,
    batch: bool,
    budget: Budget | None,
    remote: Any,
    options: dict[str, Any],
    *,
    wait: bool,
) -> Job:
    """Prepare the plan on the client and hand it to the backend as one request: a Job."""

    # bound before ``options`` gains the host below; a first graph goes to the same host
    run_first = functools.partial(
        run, model=model, backend=backend, tokenizer=tokenizer, batch=batch, budget=budget,
        remote=remote, **options,
    )  # fmt: skip

    model, info, plan, impl, internal = _prepare(
        graph, model, backend, tokenizer, batch, budget, options, remote=True, first=run_first
    )
    _refuse_remote_falcon_alibi_patterns(plan.graph, model)
    if isinstance(remote, str):
        options.setdefault("host", remote)  # nnsight's convention: remote="http://host:port"
    impl = remote_backend(impl, backend)
    echo = {
        "graph": graph.fingerprint(),
        "model_class": info.class_name,
        "model_config": _config_hash(model),
        "backend": backend,
        "versions": {str(k): str(v) for k, v in _versions(impl.versions())},  # type: ignore[attr-defined]
        "wanted": [k for k in graph.reads() if k not in internal],
    }
    if plan.assembly is not None:  # the results are put back together where they arrive
        echo["assemblies"] = [a.to_dict() for a in plan.assembly.assemblies]
    handle = impl.submit(plan, model, wait=wait, echo=echo, **options)
    return Job(handle, backend)


def _refuse_remote_falcon_alibi_patterns(graph: Graph, model: nn.Module) -> None:
    """A host's eager Falcon attention counts ALiBi twice (transformers 5; locally the
    adapters correct it, see :func:`interventions.hf.falcon_alibi_attention`), so patterns
    read there would be wrong and their run's outputs too: refused before anything is sent."""
    eager = sorted({op.site.name for op in graph.ops} & {"attn_pattern", "attn_scores"})
    if eager and falcon_alibi_attention(model):
        raise UnsupportedOp(
            f"{', '.join(eager)} on Falcon with ALiBi cannot run remotely: the host's eager "
            "attention counts ALiBi twice (transformers 5), which the local backends correct; "
            "run it locally (remote=False), or leave attention patterns out of the remote graph"
        )


def submit(
    graph: Graph,
    model: nn.Module | str,
    *,
    backend: str = "nnsight",
    tokenizer: Any = None,
    batch: bool = True,
    budget: Budget | None = None,
    **options: Any,
) -> Job:
    """Send ``graph`` to a remote host as one request and return a :class:`~interventions.Job`
    at once, without waiting.

    ``model`` names the model on the host (a hub id or a checkpoint directory; only its
    config is read here) or is a model object of the same architecture. ``job.id`` can be
    written down: ``iv.Job.attach(id).result()`` collects the result from any process.
    Options as for a remote :func:`run`: ``host=``, ``api_key=``, ``model_key=``,
    ``timeout=``, ``retries=``, ``max_batch=``, ``max_result_bytes=``.
    """
    options.pop("remote", None)
    return _run_remote(graph, model, backend, tokenizer, batch, budget, True, options, wait=False)
