"""The backend: ``execute`` runs a plan locally in nnsight traces; ``submit`` and
``attach`` run it on an NDIF host as one request (see :mod:`.ndif` and :mod:`.jobs`).

Both paths compile the plan the same way (:mod:`.compiler`), bind the envoys each
run's program touches, and hand the whole to :func:`.program._run_program`: locally it
runs the traces one after the other; remotely it is the body of one nnsight session,
serialized by :class:`_Capture` instead of being run.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, ClassVar

import torch
from torch import nn

from interventions.architectures import ModelInfo
from interventions.attention import QKV_VIEWS, SPLIT_VIEWS
from interventions.backends import Capabilities
from interventions.errors import (
    BackendVersionError,
    ExecutionError,
    InterventionError,
    ModelNotDeployed,
)
from interventions.hf import accepts, eager_attention, generation_config, logits_kwargs
from interventions.ops import OP_KINDS
from interventions.plan import Plan
from interventions.progress import progress

from .compiler import _Compiler, _RunCode, _Stage
from .decode import _DEFAULT_MAX_RESULT_BYTES, check_max_result_bytes
from .jobs import _NdifJob
from .model import (
    _can_batch,
    _check_generated,
    _check_max_batch,
    _envoy_at,
    _NoTokenizer,
    _repo_of,
    _restore_modules,
    _wrap,
)
from .ndif import _DEFAULT_RETRIES, _config_host_key, _Ndif, _subscribe, _timeout_of
from .program import _run_program

SUPPORTED = ">=0.8,<0.9"  # the range of the `nnsight` extra in pyproject.toml
_STATE_KEYS = ("forward", "__nnsight__")  # what nnsight puts into a module's __dict__


def check_version(installed: str) -> None:
    """Raise :class:`BackendVersionError` unless nnsight ``installed`` is supported.

    >>> check_version("0.8.1")
    >>> check_version("0.9.0rc1")
    Traceback (most recent call last):
    ...
    interventions.errors.BackendVersionError: nnsight 0.9.0rc1 is installed; the nnsight backend supports nnsight>=0.8,<0.9
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        ok = SpecifierSet(SUPPORTED).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise BackendVersionError(
            f"nnsight {installed} is installed; the nnsight backend supports nnsight{SUPPORTED}"
        )


def _head_dims(info: ModelInfo) -> tuple[int, int, int]:
    """(query heads, key-value heads, head width) for the q/k/v views in the program."""
    n = info.n_heads or 1
    return n, info.n_kv_heads or n, info.d_head or 1


class NNsightBackend:
    """Graphs compiled into nnsight traces; see the module docstring."""

    name = "nnsight"
    capabilities = Capabilities(
        ops=frozenset(OP_KINDS),
        # attn_scores lives inside the attention function: refused by name (not built);
        # router_logits/router_choice/expert_out: a write re-runs the family's routing rule
        # or the fused experts inside the shipped block (not built): refused by name
        views=frozenset(
            {"plain", "heads", "attn_weights", "logits", "resid", *QKV_VIEWS, *SPLIT_VIEWS}
        ),
        generation=True,
        gradients=False,
        remote=True,
        raw_modules=True,
        hf_only=False,
        sae_source=True,
    )

    def __init__(self) -> None:
        import nnsight

        self._version = str(nnsight.__version__)
        check_version(self._version)

    def versions(self) -> dict[str, str]:
        return {"nnsight": self._version, "torch": torch.__version__}

    def execute(self, plan: Plan, model: nn.Module, **options: Any) -> dict[str, torch.Tensor]:
        max_batch = options.pop("max_batch", None)
        show = options.pop("progress", None)
        if options.pop("remote", False):
            raise InterventionError(
                "nnsight backend: a remote run goes through iv.run(..., remote=True) or "
                "iv.submit(...), which send the whole graph to the host as one request"
            )
        if options:
            extra = (
                " (reads here leave the autograd graph; grad ops (RunHandle.grad) compute "
                "gradients in the trace)"
                if "grad" in options
                else ""
            )
            raise InterventionError(
                f"nnsight backend: unknown options {sorted(options)}{extra}; valid: max_batch, "
                "progress, remote"
            )
        _check_max_batch(max_batch)
        batched = _can_batch(model, plan.info)
        stages = _Compiler(plan, model, batched).stages(max_batch)
        needs_eager = any(op.site.name == "attn_pattern" for op in plan.graph.ops)
        stage_at: dict[str, int] = {}
        with _restore_modules(model), eager_attention(model, needs_eager), torch.no_grad():
            wrapper = _wrap(model, batched)
            try:
                program = {
                    "stages": progress(
                        [self._stage_program(wrapper, model, s, plan) for s in stages],
                        show,
                        desc="stages (nnsight)",
                    ),
                    "eager": False,  # switched above, on the client's own model
                    "dims": _head_dims(plan.info),
                    "wanted": (),
                    "echo": None,
                }
                store = _run_program(wrapper, program, plan.info.n_heads or 1, None, stage_at)
            except InterventionError:
                raise
            except Exception as exc:
                stage = stages[stage_at.get("stage", 0)] if stages else None
                names = ", ".join(repr(r.name) for r in stage.runs) if stage else "-"
                which = f"run {names}" if stage and len(stage.runs) == 1 else f"runs {names}"
                raise ExecutionError(
                    f"{which} failed on the nnsight backend: {type(exc).__name__}: {exc}"
                ) from exc
            del wrapper
        _check_generated(plan, store)
        return {name: store[name].detach().cpu() for name in plan.graph.reads() if name in store}

    # -- remote (NDIF) ----------------------------------------------------------------

    _REMOTE_OPTIONS = (
        "host",
        "api_key",
        "model_key",
        "timeout",
        "retries",
        "max_batch",
        "max_result_bytes",
    )

    def submit(
        self, plan: Plan, model: nn.Module, *, wait: bool, echo: dict[str, Any], **options: Any
    ) -> _NdifJob:
        """Send the whole plan to an NDIF host as one request (one nnsight session).

        ``wait=True`` subscribes first and receives the result on the websocket, as
        nnsight's blocking ``remote=True`` does; ``wait=False`` submits without a
        connection (the host stores status and result; poll or re-attach by id).
        """
        options.pop("progress", None)
        unknown = sorted(set(options) - set(self._REMOTE_OPTIONS))
        if unknown:
            raise InterventionError(
                f"nnsight backend: unknown options {unknown} for a remote run; valid: "
                f"{', '.join(self._REMOTE_OPTIONS)}"
            )
        timeout = _timeout_of(options.get("timeout"))
        max_result = check_max_result_bytes(
            options.get("max_result_bytes", _DEFAULT_MAX_RESULT_BYTES)
        )
        max_batch = options.get("max_batch")
        _check_max_batch(max_batch)
        if not _can_batch(model, plan.info):
            raise InterventionError(
                "nnsight backend: a remote run needs a HuggingFace causal LM (named on the "
                f"host by its model key); {plan.info.class_name} is not one"
            )
        retries = int(options.get("retries", _DEFAULT_RETRIES))
        host, api_key = _config_host_key(options.get("host"), options.get("api_key"))
        client = _Ndif(host, api_key, str(options.get("model_key") or _repo_of(model)), retries)
        from nnsight.schema.config import CONFIG

        compress = bool(CONFIG.API.COMPRESS)
        blob = self.payload(plan, model, client, echo, max_batch, compress)

        def send() -> tuple[Any, str]:
            socket, session_id = _subscribe(client) if wait else (None, "")
            try:
                received = client.post(blob, compress, session_id)
            except BaseException:
                if socket is not None:
                    socket.close()
                raise
            return socket, str(received.id)

        socket, job_id = send()
        return _NdifJob(
            client,
            job_id,
            compress=compress,
            timeout=timeout,
            max_result_bytes=max_result,
            socket=socket,
            resend=send if wait else None,
        )

    def payload(
        self,
        plan: Plan,
        model: nn.Module,
        client: _Ndif,
        echo: dict[str, Any],
        max_batch: int | None = None,
        compress: bool = False,
    ) -> bytes:
        """The request body a remote run sends: the plan compiled into one nnsight
        session, serialized by nnsight (block source plus the plain data it names).
        Sets ``client.model_key`` to the key the host must serve."""
        wrapper = self._remote_wrapper(client, client.model_key)
        client.model_key = wrapper.to_model_key()
        stages = _Compiler(plan, model, True).stages(max_batch)
        capture = _Capture(compress)
        program = {
            "stages": [self._stage_program(wrapper, model, s, plan) for s in stages],
            "eager": any(op.site.name == "attn_pattern" for op in plan.graph.ops),
            "dims": _head_dims(plan.info),
            "wanted": tuple(plan.graph.reads()),
            "echo": {**echo, "model_key": client.model_key},
        }
        _run_program(wrapper, program, plan.info.n_heads or 1, capture)
        assert capture.blob is not None
        return capture.blob

    def attach(self, job_id: str, **options: Any) -> _NdifJob:
        """A handle on a job submitted earlier (by any process), by its id."""
        from nnsight.schema.config import CONFIG

        host, api_key = _config_host_key(options.get("host"), options.get("api_key"))
        client = _Ndif(host, api_key, "", int(options.get("retries", _DEFAULT_RETRIES)))
        timeout = _timeout_of(options.get("timeout"))
        max_result = check_max_result_bytes(
            options.get("max_result_bytes", _DEFAULT_MAX_RESULT_BYTES)
        )
        compress = bool(CONFIG.API.COMPRESS)
        return _NdifJob(
            client, job_id, compress=compress, timeout=timeout, max_result_bytes=max_result
        )

    def _remote_wrapper(self, client: _Ndif, repo: str) -> Any:
        """nnsight's own meta model for ``repo`` (no weights), cached: its envoys are
        what the shipped block names, and its key is what the host deploys under."""
        cache: dict[str, Any] = self.__dict__.setdefault("_remote_models", {})
        if repo in cache:
            return cache[repo]
        from nnsight.modeling.transformers import TransformersModel

        full_key = ":" in repo and repo.split(":", 1)[1].lstrip().startswith("{")
        repo_id = json.loads(repo.split(":", 1)[1])["repo_id"] if full_key else repo
        if os.path.isdir(repo_id):
            # a checkpoint directory is its own id (nnsight would ask the hub for it)
            from nnsight.modeling.huggingface import _ID_CACHE

            _ID_CACHE.setdefault(repo_id, repo_id)
        try:
            if full_key:
                wrapper = TransformersModel.from_model_key(repo, tokenizer=_NoTokenizer())
            else:
                wrapper = TransformersModel(
                    repo_id, task="text-generation", tokenizer=_NoTokenizer()
                )
        except Exception as exc:
            raise client.error(
                ModelNotDeployed,
                f"cannot read the model's config for {repo!r} ({type(exc).__name__}: {exc})",
                hint="model_key= (or the model's name_or_path) must be a hub id or a "
                "checkpoint directory that both this client and the host can read",
            ) from None
        cache[repo] = wrapper
        return wrapper

    @staticmethod
    def _stage_program(wrapper: Any, model: nn.Module, stage: _Stage, plan: Plan) -> dict[str, Any]:
        """One stage (one trace) as plain data: its call settings and its runs' programs."""
        graph = plan.graph
        first = graph.runs[stage.runs[0].name]
        decoding: dict[str, Any] = {}
        if first.max_new_tokens is not None:
            # traced through model.generate: the block sees every forward of the decoding loop
            decoding["generation_config"] = generation_config(first.max_new_tokens, first.sampling)
            if accepts(model, "logits_to_keep"):
                decoding["logits_to_keep"] = 0  # the prompt pass's logits at every position
        invokes: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        trace_kwargs: dict[str, Any] = {}
        keeps = [plan.logits_to_keep(code.name) for code in stage.runs]
        keep = None if None in keeps else max(k for k in keeps if k is not None)
        if stage.kind != "single":
            # TransformersModel batches the invokes' token ids; settings go to the call
            trace_kwargs = decoding or {"use_cache": False, **logits_kwargs(model, keep)}
            invokes = [((plan.inputs[code.name],), {}) for code in stage.runs]
        else:
            # the generic envoy takes one invoke, passed to the model (or generate) as is
            for code in stage.runs:
                x = plan.inputs[code.name]
                if graph.runs[code.name].inputs is not None or not plan.info.is_hf:
                    invokes.append(((x,), {}))
                elif decoding:
                    invokes.append(
                        ((), {"input_ids": x, "attention_mask": torch.ones_like(x), **decoding})
                    )
                else:
                    keep_run = logits_kwargs(model, plan.logits_to_keep(code.name))
                    invokes.append(((), {"input_ids": x, "use_cache": False, **keep_run}))
        progs = [
            NNsightBackend._program(wrapper, code, plan, invoke)
            for code, invoke in zip(stage.runs, invokes, strict=True)
        ]
        return {
            "generate": first.max_new_tokens is not None,
            "seed": None if first.sampling is None else first.sampling.seed,
            "kwargs": trace_kwargs,
            "barriers": dict(stage.barriers),
            "progs": progs,
            "grad": any(code.grads for code in stage.runs),
            # a HuggingFace model's plain forward stops once its every run is done there
            # (as on the torch backend): nothing later in it is read
            "stop": plan.info.is_hf
            and first.max_new_tokens is None
            and not any(code.grads for code in stage.runs),
        }

    @staticmethod
    def _program(
        wrapper: Any, code: _RunCode, plan: Plan, invoke: tuple[tuple[Any, ...], dict[str, Any]]
    ) -> dict[str, Any]:
        """A run's program as plain data, with the envoys it touches bound."""
        steps = []
        for step in code.steps:
            entries = []
            for loc, instrs in step:
                entries.append(
                    (
                        _envoy_at(wrapper, loc[0]),
                        loc[1],
                        tuple(code.waits.get(loc, ())),
                        tuple(code.signals.get(loc, ())),
                        tuple(instrs),
                        loc in code.swapped,
                    )
                )
            steps.append(entries)
        graph_run = plan.graph.runs[code.name]
        return {
            "args": invoke[0],
            "kwargs": invoke[1],
            "steps": steps,
            "concat": code.concat,
            "generated": f"{code.name}.generated" if graph_run.generates else None,
            "prompt": code.prompt,
        }


class _Capture:
    """An nnsight backend that serializes the captured session instead of running it.

    The payload is exactly nnsight's (``RequestModel.serialize``): the tracer and the
    block reduced to (source, the globals and locals it names). The block's source and
    the names it reads are the same for every request (they depend on the code, not the
    graph), so they are computed once per block and reused: nnsight would unparse and
    walk this block's syntax tree on every request, most of a request's client time.
    """

    _blocks: ClassVar[dict[int, tuple[Any, str, frozenset[str]]]] = {}

    def __init__(self, compress: bool) -> None:
        self.compress = compress
        self.blob: bytes | None = None

    def __call__(self, tracer: Any) -> None:
        import ast

        from nnsight.intervention.serialization import _referenced_names, dumps

        node = tracer.node
        cached = self._blocks.get(id(node))
        if cached is None or cached[0] is not node:
            offset = "\n" * (node.body[0].lineno - 1)
            source = offset + ast.unparse(ast.Module(body=node.body, type_ignores=[]))
            cached = (node, source, frozenset(_referenced_names(source)))
            self._blocks[id(node)] = cached
        _, source, names = cached
        # no nnsight.pull_env(): nothing is shipped by value; the block names only
        # torch, nnsight and plain data (the host has no copy of this package)
        frame = tracer.info.frame
        variables, scope = dict(frame.f_locals), frame.f_globals
        used_locals = {n: variables[n] for n in names if n in variables}
        used_globals = {}
        for name in names - used_locals.keys():
            # a Scope resolves through its chain by subscript (as nnsight does); a name
            # it lacks is a builtin or an attribute, resolved on the host
            with contextlib.suppress(KeyError):
                used_globals[name] = scope[name]
        blob = dumps((tracer, (source, used_globals, used_locals)))
        if self.compress:
            import zstandard

            blob = zstandard.ZstdCompressor(level=6).compress(blob)
        self.blob = blob
