"""The nnsight backend: a plan compiled into nnsight traces.

HuggingFace causal LMs are wrapped in nnsight's ``TransformersModel`` around the model
object the user holds (no loading, no tokenizer: runs arrive as token ids); any other
``nn.Module`` in the generic ``nnsight.NNsight`` envoy. The wrapper lives only for one
``execute``: nnsight installs a controller ``forward`` (and its state) into every
module's ``__dict__``, and those are taken out again afterwards, failed run or not.

How runs map to traces
----------------------
Runs are scheduled into *stages*, each one nnsight trace (one batched forward, or one
``generate`` call), in the plan's dependency order:

* forward runs of equal prompt length share a trace, one ``tracer.invoke`` per run;
* generating runs with equal prompt length and ``max_new_tokens`` share a ``generate``
  trace, one invoke per run, with ``tracer.iter`` walking the decoding steps;
* runs fed by ``inputs=`` tensors, and every run of a plain ``nn.Module`` (whose
  generic envoy cannot batch invokes), get a trace of their own.

A value that flows between runs (a ``patch`` from another run's read, the reference
run of a mean or resample ablation) stays inside the trace when producer and consumer
share a stage: both invokes touch the same module, and a ``tracer.barrier`` per
(producer, module) makes the consumer wait until the producer has recorded it. A flow
between different modules, or out of a generating run, sends the consumer to a later
stage; the value then waits in the executor's store (for NDIF, inside one session).
Different prompt lengths never share a trace: padding would move positions and
change the numbers.

What runs inside a trace
------------------------
Everything the core knows is resolved here on the client: sites become module paths
and sides, selectors become plain tuples (``int``, tuples of ints, ``slice``),
generation selectors are rewritten per decoding step, resample draws, SAE weights
(float32) and the orthonormal bases of ``project_out`` are computed. The code inside
the ``with`` block uses only torch, builtins and the trace; its small kernels are
defined *inside* the block, so the block's source is self-contained (nnsight ships a
trace to NDIF as the block's source plus the values it names). At standard sites
edits are made in place on the rows nnsight hands each invoke, as
``output[...] = value`` in hand-written nnsight (no re-concatenation of the whole
batch per edited invoke); at raw module paths, whose tensor something else may still
hold (GPT-2 keeps ``ln_2``'s input as its residual), they go to a copy that is
swapped in, as the reference replaces the value. Reads are copies.

Generation: an op applies on the prompt pass and on every generated step, with
absolute positions (negative ones counted from the end of the prompt), exactly like
the torch reference; reads keep every fed position and are selected at the end.
Decoding is greedy with a KV cache, so step ``k > 0`` feeds exactly position
``prompt + k - 1``.

Not supported: gradients (``grad=``), remote execution (not yet), and ops on a module
called more than once per forward pass (they bind to its first call).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from interventions.apply import orthonormal_basis
from interventions.architectures import HookPoint, ModelInfo
from interventions.backends import Capabilities
from interventions.errors import (
    BackendVersionError,
    ExecutionError,
    InterventionError,
    JobLost,
    ModelNotDeployed,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteExecutionError,
    RemoteTimeout,
)
from interventions.hf import accepts, eager_attention, greedy_config, logits_kwargs
from interventions.ops import (
    OP_KINDS,
    Ablate,
    Add,
    Const,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESplice,
    Scale,
    produces,
)
from interventions.plan import Plan, absolute_select, resample_indices, step_select
from interventions.progress import progress
from interventions.sae import sae_from_parts
from interventions.sites import Index, Select, Site, Span

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


# ---------------------------------------------------------------------------------------
# Client side: the plan compiled into stages of per-run programs (plain data only).

Location = tuple[str, str]  # (module path, "input" | "output")


def _event_order(model: nn.Module) -> dict[Location, int]:
    """When each module's input and output are reached, assuming children run in order.

    A module's input comes before anything inside it and its output after everything
    inside it. Registration order is execution order for the standard sites of every
    built-in family (the tests hold this); raw module paths are ordered by
    :func:`_observed_order` instead.
    """
    order: dict[Location, int] = {}
    stack: list[tuple[str, nn.Module, bool]] = [("", model, False)]
    seen: set[int] = set()
    while stack:
        name, module, done = stack.pop()
        if done:
            order[(name, "output")] = len(order)
            continue
        if id(module) in seen:
            continue
        seen.add(id(module))
        order[(name, "input")] = len(order)
        stack.append((name, module, True))
        children = [
            (f"{name}.{child}" if name else child, m) for child, m in module.named_children()
        ]
        for child_name, child in reversed(children):
            stack.append((child_name, child, False))
    return order


def _observed_order(model: nn.Module, plan: Plan) -> dict[Location, int]:
    """Module inputs and outputs in the order one small forward pass reaches them.

    Raw module paths can name modules that run out of registration order (a llama
    layer registers its norms after its attention and MLP), so graphs with raw sites
    are ordered by a probe: one batch item, one token, plain hooks removed at once.
    Modules the probe never reaches keep their registration order, after the others.
    """
    static = _event_order(model)
    if not plan.order:
        return static
    run = plan.graph.runs[plan.order[0]]
    x = plan.inputs[run.name][:1]
    seen: dict[Location, int] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def recorder(where: Location) -> Any:
        def hook(*_: Any) -> None:
            seen.setdefault(where, len(seen))

        return hook

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(recorder((name, "input"))))
            handles.append(module.register_forward_hook(recorder((name, "output"))))
        with torch.no_grad():
            if run.inputs is not None:
                model(x.to(device))
            elif plan.info.is_hf:
                model(input_ids=x[:, :1].to(device), use_cache=False)
            else:
                model(x[:, :1].to(device))
    except Exception:  # the real run will report what is wrong with the model
        return static
    finally:
        for handle in handles:
            handle.remove()
    tail = len(seen)
    return {loc: seen.get(loc, tail + i) for loc, i in static.items()}


def _encode_index(index: Index) -> Any:
    if isinstance(index, Span):
        return slice(index.start, index.stop, index.step)
    return index


def _encode_select(select: Select) -> tuple[tuple[str, Any], ...]:
    """A selector as plain data: (field, int | tuple of ints | slice) pairs."""
    return tuple((name, _encode_index(index)) for name, index in select.items())


def _axes_hint(site: Site) -> tuple[str, ...] | None:
    """The axis names of a standard site; ``None`` for raw sites (named by their ndim)."""
    return None if site.is_raw else tuple(site.kind.axes)


@dataclass
class _Entry:
    """An op of one run at one hook point, or a capture of the site for another run."""

    op: Op | None
    site: Site


@dataclass
class _RunCode:
    """Everything the trace needs for one run, except envoys (bound at execution)."""

    name: str
    kind: str  # "fwd", "gen" or "single"
    generates: bool
    key: tuple[int, ...]
    rows: int
    prompt: int
    steps: list[list[tuple[Location, list[tuple[Any, ...]]]]]  # per step: locations
    swapped: set[Location]  # locations edited by replacing the value (raw sites)
    concat: list[tuple[str, tuple[str, ...] | None, tuple[tuple[str, Any], ...]]]
    locations: dict[str, Location]  # produced name / capture key -> where it is produced
    waits: dict[Location, list[str]] = field(default_factory=dict)
    signals: dict[Location, list[str]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """A forward pass with nothing to do or record (generation always records)."""
        return not self.generates and not any(self.steps)


@dataclass
class _Stage:
    kind: str
    key: tuple[int, ...]
    runs: list[_RunCode] = field(default_factory=list)
    barriers: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.runs)


def _capture_key(run: str, site: Site) -> str:
    return f"{run}|{site}"


class _Compiler:
    """Turns a validated plan into stages of plain-data programs."""

    def __init__(self, plan: Plan, model: nn.Module, batched: bool) -> None:
        self.plan = plan
        self.info: ModelInfo = plan.info
        self.graph = plan.graph
        self.batched = batched
        raw = any(op.site.is_raw for op in plan.graph.ops)
        self.order = _observed_order(model, plan) if raw else _event_order(model)
        self._saes: dict[str, tuple[Any, ...]] = {}
        self._bases: dict[str, torch.Tensor] = {}
        self.producers = plan.producers

    def location(self, site: Site) -> tuple[Location, HookPoint]:
        point = self.info.hook_point(site)
        return (point.module, point.io), point

    # -- per-op instructions ----------------------------------------------------------

    def sae_params(self, key: str, op: SAESplice) -> tuple[Any, ...]:
        if key not in self._saes:
            spec = self.graph.saes[key]
            tensors = {param: self.graph.tensors[k] for param, k in spec.tensors}
            sae = sae_from_parts(spec.kind, tensors, dict(spec.params)).to(dtype=torch.float32)
            self._saes[key] = sae.kernel()  # the canonical form: no per-kind code here
        edits = tuple((e.mode, list(e.features), e.value, e.low, e.high) for e in op.edits)
        return (*self._saes[key], edits, op.error)

    def basis(self, key: str) -> torch.Tensor:
        """Orthonormal columns spanning a project_out direction, as the reference builds them."""
        if key not in self._bases:
            self._bases[key] = orthonormal_basis(self.graph.tensors[key])
        return self._bases[key]

    def instruction(self, op: Op, view: str, select: Select, run: str) -> tuple[Any, ...]:
        axes = _axes_hint(op.site)
        sel = _encode_select(select)
        tensors = self.graph.tensors
        if isinstance(op, Read):
            return ("read", view, axes, sel, op.name)
        if isinstance(op, Patch):
            if isinstance(op.value, Const):
                return ("patch", view, axes, sel, tensors[op.value.tensor])
            assert isinstance(op.value, Ref)
            aligned = self.plan.aligned(op.value.read)
            return ("patchref", view, axes, sel, op.value.read, aligned)
        if isinstance(op, Ablate):
            if op.method == "zero":
                return ("ablate", view, axes, sel, "zero", None, None)
            assert op.source is not None
            key = _capture_key(op.source, op.site)
            if op.method == "mean":
                dims = (0,) if op.per_position else (0, 1)
                return ("ablate", view, axes, sel, "mean", key, dims)
            draws = resample_indices(
                op.seed, self.plan.batch_size(run), self.plan.batch_size(op.source)
            )
            return ("ablate", view, axes, sel, "resample", key, draws)
        if isinstance(op, Add):
            return ("add", view, axes, sel, tensors[op.direction.tensor], float(op.scale))
        if isinstance(op, ProjectOut):
            return ("project", view, axes, sel, self.basis(op.direction.tensor))
        if isinstance(op, Scale):
            return ("scale", view, axes, sel, float(op.factor))
        if isinstance(op, SAESplice):
            return ("sae", view, axes, sel, self.sae_params(op.sae, op), op.features)
        raise AssertionError(f"unknown op {op!r}")  # pragma: no cover - closed set

    # -- per-run programs -------------------------------------------------------------

    def run_code(self, run: str) -> _RunCode:
        plan, graph = self.plan, self.graph
        graph_run = graph.runs[run]
        # Hook points in the reference's order: ops first, then captures, each in the
        # order they first appear; several hook points of one module (views) share a
        # location and keep that order.
        points: dict[HookPoint, list[_Entry]] = {}
        for op in plan.ops_of(run):
            points.setdefault(self.location(op.site)[1], []).append(_Entry(op, op.site))
        for site in plan.captures_of(run):
            points.setdefault(self.location(site)[1], []).append(_Entry(None, site))
        by_location: dict[Location, list[tuple[HookPoint, list[_Entry]]]] = {}
        for point, entries in points.items():
            by_location.setdefault((point.module, point.io), []).append((point, entries))
        locations = sorted(by_location, key=lambda loc: self.order.get(loc, len(self.order)))

        prompt = plan.prompt_length(run)
        generating = graph_run.generates
        n_steps = graph_run.max_new_tokens or 1
        fed = prompt + (n_steps - 1 if generating else 0)
        produced: dict[str, Location] = {}
        concat: list[tuple[str, tuple[str, ...] | None, tuple[tuple[str, Any], ...]]] = []
        steps: list[list[tuple[Location, list[tuple[Any, ...]]]]] = []
        # Standard sites are edited in place (each run's own rows of the live tensor).
        # A raw module path can name a tensor something else still holds (GPT-2 keeps
        # `ln_2`'s input as the residual), so edits there go to a copy swapped in.
        swapped = {
            loc
            for loc, groups in by_location.items()
            for _, entries in groups
            for e in entries
            if e.op is not None and not isinstance(e.op, Read) and e.site.is_raw
        }
        for step in range(n_steps):
            offset, length = (0, prompt) if step == 0 else (prompt + step - 1, 1)
            step_locations: list[tuple[Location, list[tuple[Any, ...]]]] = []
            for loc in locations:
                instrs: list[tuple[Any, ...]] = []
                for point, entries in by_location[loc]:
                    for entry in entries:
                        if entry.op is None:
                            key = _capture_key(run, entry.site)
                            instrs.append(("capture", point.view, key))
                            produced[key] = loc
                            continue
                        op = entry.op
                        for name in produces(op):
                            produced[name] = loc
                        if isinstance(op, Read) and generating:
                            # every fed position is kept; the selector applies at the end,
                            # with positions absolute (negative: from the end of the prompt)
                            instrs.append(("keep", point.view, op.name))
                            if step == 0:
                                at_end = absolute_select(op.select, prompt, fed)
                                concat.append(
                                    (op.name, _axes_hint(op.site), _encode_select(at_end))
                                )
                            continue
                        select: Select | None = op.select
                        if generating:
                            select = step_select(op.select, prompt, fed, offset, length)
                        if select is None:
                            continue
                        instrs.append(self.instruction(op, point.view, select, run))
                if instrs:
                    step_locations.append((loc, instrs))
            steps.append(step_locations)
        while steps and not steps[-1]:
            steps.pop()  # nothing to do at the last steps: do not wait for them

        batch_key: tuple[int, ...]
        if not self.batched or graph_run.inputs is not None:
            kind, batch_key = "single", ()
        elif generating:
            kind, batch_key = "gen", (prompt, n_steps)
        else:
            kind, batch_key = "fwd", (prompt,)
        return _RunCode(
            name=run,
            kind=kind,
            generates=generating,
            key=batch_key,
            rows=plan.batch_size(run),
            prompt=prompt,
            steps=steps,
            swapped=swapped,
            concat=concat,
            locations=produced,
        )

    def dependencies(self, run: str) -> list[tuple[str, str, Location]]:
        """(producer run, produced key, consumer location) for each value ``run`` takes in."""
        out = []
        for op in self.plan.ops_of(run):
            loc = self.location(op.site)[0]
            if isinstance(op, Patch) and isinstance(op.value, Ref):
                out.append((self.producers[op.value.read].run, op.value.read, loc))
            elif isinstance(op, Ablate) and op.source is not None:
                out.append((op.source, _capture_key(op.source, op.site), loc))
        return out

    def stages(self, max_batch: int | None) -> list[_Stage]:
        stages: list[_Stage] = []
        where: dict[str, int] = {}
        codes: dict[str, _RunCode] = {}
        for run in self.plan.order:
            code = self.run_code(run)
            codes[run] = code
            deps = self.dependencies(run)
            lower = 0
            shared: list[tuple[str, str, Location]] = []  # flows that may stay in one trace
            for producer, key, loc in deps:
                source = codes[producer]
                same_place = (
                    code.kind == "fwd"
                    and source.kind == "fwd"
                    and source.key == code.key
                    and source.locations.get(key) == loc
                )
                lower = max(lower, where[producer] + (0 if same_place else 1))
                if same_place:
                    shared.append((producer, key, loc))
            if code.empty and not code.locations:
                continue  # a forward pass nobody observes changes nothing
            limit = max_batch
            if limit is None and self.plan.budget is not None:
                # the planner's budget bounds a trace too: merging its batches into one
                # invoke set would build the forward it was told not to build
                limit = self.plan.budget.rows(code.prompt, self.info)
            index = next(
                (
                    i
                    for i in range(lower, len(stages))
                    if code.kind != "single"
                    and stages[i].kind == code.kind
                    and stages[i].key == code.key
                    and (limit is None or stages[i].rows + code.rows <= limit)
                ),
                None,
            )
            if index is None:
                stages.append(_Stage(code.kind, code.key))
                index = len(stages) - 1
            stage = stages[index]
            stage.runs.append(code)
            where[run] = index
            for producer, _key, loc in shared:
                if where[producer] != index:
                    continue
                barrier = f"{producer}@{loc[0]}.{loc[1]}"
                if barrier not in stage.barriers:
                    stage.barriers[barrier] = 1
                    codes[producer].signals.setdefault(loc, []).append(barrier)
                waits = code.waits.setdefault(loc, [])
                if barrier not in waits:
                    waits.append(barrier)
                    stage.barriers[barrier] += 1
        return stages


# ---------------------------------------------------------------------------------------
# The model, wrapped for one execute and left as it was.


class _NoTokenizer:
    """What ``TransformersModel`` needs of a tokenizer when every run is token ids.

    Runs arrive tokenized (the plan tokenizes text with the user's tokenizer), and
    invokes of one trace have equal lengths, so nothing is ever tokenized or padded.
    """

    pad_token = "<pad>"
    eos_token = "<eos>"
    pad_token_id = 0
    eos_token_id = 0
    padding_side = "left"
    model_max_length = 1 << 62

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ExecutionError("the nnsight backend passes token ids; it never tokenizes text")

    def __repr__(self) -> str:
        return "<token ids only>"


@contextlib.contextmanager
def _restore_modules(model: nn.Module) -> Iterator[None]:
    """Put back every module's ``forward`` and nnsight state slot as they were."""
    saved: list[tuple[nn.Module, dict[str, Any]]] = [
        (m, {k: m.__dict__[k] for k in _STATE_KEYS if k in m.__dict__}) for m in model.modules()
    ]
    try:
        yield
    finally:
        for module, before in saved:
            for key in _STATE_KEYS:
                if key in before:
                    module.__dict__[key] = before[key]
                else:
                    module.__dict__.pop(key, None)


def _can_batch(model: nn.Module, info: ModelInfo) -> bool:
    """Whether ``TransformersModel`` fits: a decoder-only HuggingFace model that generates.

    Anything else goes through the generic ``NNsight`` envoy, one run per trace.
    """
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return bool(
        info.is_hf
        and callable(can_generate)
        and can_generate()
        and not getattr(config, "is_encoder_decoder", False)
    )


def _wrap(model: nn.Module, batched: bool) -> Any:
    if batched:
        from nnsight.modeling.transformers import TransformersModel

        return TransformersModel(model, task="text-generation", tokenizer=_NoTokenizer())
    from nnsight import NNsight

    return NNsight(model)


def _envoy_at(root: Any, path: str) -> Any:
    """The envoy of module ``path`` (nnsight moves children named like its own
    properties, ``output`` say, to ``E_output``)."""
    from nnsight.intervention.envoy import Envoy

    envoy = root
    for part in path.split(".") if path else []:
        if not part.startswith("_") and inspect.isdatadescriptor(getattr(Envoy, part, None)):
            part = Envoy.OVERLOAD_PREFIX + part
        envoy = getattr(envoy, part)
    return envoy


def _repo_of(model: nn.Module) -> str:
    """The name a model is known by on a host: its hub id or checkpoint directory."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        raise InterventionError(
            "nnsight backend: this model has no name (config._name_or_path); pass "
            "model_key= (a hub id or checkpoint directory deployed on the host)"
        )
    return str(name)


def _check_max_batch(max_batch: Any) -> None:
    if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
        raise InterventionError(
            f"nnsight backend: max_batch must be a positive int, got {max_batch!r}"
        )


def _check_generated(plan: Plan, store: Mapping[str, Any]) -> None:
    for run in plan.graph.runs.values():
        if run.generates and f"{run.name}.generated" not in store:
            raise ExecutionError(
                f"run {run.name!r} stopped generating before its last step on the nnsight backend"
            )


# ---------------------------------------------------------------------------------------
# The backend.


class NNsightBackend:
    """Graphs compiled into nnsight traces; see the module docstring."""

    name = "nnsight"
    capabilities = Capabilities(
        ops=frozenset(OP_KINDS),
        views=frozenset({"plain", "heads", "attn_weights", "logits"}),
        generation=True,
        gradients=False,
        remote=True,
        raw_modules=True,
        hf_only=False,
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
            extra = " (the nnsight backend computes no gradients)" if "grad" in options else ""
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

    _REMOTE_OPTIONS = ("host", "api_key", "model_key", "timeout", "retries", "max_batch")

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
        max_batch = options.get("max_batch")
        _check_max_batch(max_batch)
        if not _can_batch(model, plan.info):
            raise InterventionError(
                "nnsight backend: a remote run needs a HuggingFace causal LM (named on the "
                f"host by its model key); {plan.info.class_name} is not one"
            )
        timeout = float(options.get("timeout") or _DEFAULT_TIMEOUT)
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
        timeout = float(options.get("timeout") or _DEFAULT_TIMEOUT)
        return _NdifJob(client, job_id, compress=bool(CONFIG.API.COMPRESS), timeout=timeout)

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
            decoding["generation_config"] = greedy_config(first.max_new_tokens)
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
            "kwargs": trace_kwargs,
            "barriers": dict(stage.barriers),
            "progs": progs,
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


def _run_program(
    wrapper: Any,
    program: dict[str, Any],
    n_heads: int,
    backend: Any = None,
    stage_at: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run every stage of a compiled plan, each stage one nnsight trace; return the store.

    Locally (``backend=None``) the stages run one after the other in this process. For
    a remote run the same block is the body of one nnsight *session*, captured by
    ``backend`` and sent to the host as one request; the host runs it and sends back
    ``result`` (the wanted reads and the echoed request data). The body of the ``with``
    block is what nnsight ships: it names only torch, nnsight, builtins, the traces and
    the plain data of ``program`` -- never this package, which the host does not have.
    ``stage_at["stage"]`` says which stage is running (for error messages).
    """
    import nnsight  # the block marks its result with nnsight.save for the host to return

    store: dict[str, Any] = {}
    stage_at = stage_at if stage_at is not None else {}
    remote = backend is not None  # the block must not name `backend` (it would be shipped)
    session = wrapper.session(backend=backend) if backend is not None else contextlib.nullcontext()
    with session:
        memo: dict[Any, Any] = {}  # (shape, axes, id of selector, device) -> index plan

        def axes_of(ndim: int, axes: Any) -> Any:
            # a standard site's axes; a raw site is (batch, pos, ..., hidden) by its ndim
            if axes is not None and len(axes) == ndim:
                return axes
            if ndim >= 3:
                return ("batch", "pos", *[f"axis{i}" for i in range(2, ndim - 1)], "hidden")
            return ("batch", "hidden")[2 - ndim :]

        def index_of(shape: Any, axes: Any, sel: Any, device: Any) -> Any:
            # (index, dropped dims, kept shape): ix_-style outer-product selection;
            # ints select one entry and drop their axis
            if not sel:
                return None
            key = (tuple(shape), axes, id(sel), device)  # slices are unhashable before 3.12
            if key in memo:
                return memo[key]
            ndim = len(shape)
            names = axes_of(ndim, axes)
            per: dict[int, Any] = {}
            for name, index in sel:
                if name == "dims":
                    per[ndim - 1] = index
                elif name in names:
                    per[names.index(name)] = index
                else:
                    raise ValueError(f"selector {name}= does not apply to axes {names}")
            picks: list[Any] = []
            dropped: list[int] = []
            lengths: list[int] = []
            for dim in range(ndim):
                size = shape[dim]
                index = per.get(dim)
                if index is None:
                    picks.append(slice(None))
                    lengths.append(size)
                elif isinstance(index, slice):
                    r = range(size)[index]
                    picks.append(slice(r.start, r.stop, r.step) if r.step > 0 else list(r))
                    lengths.append(len(r))
                else:
                    items = [index] if isinstance(index, int) else list(index)
                    for i in items:
                        if not -size <= i < size:
                            raise IndexError(
                                f"index {i} is out of range for an axis of size {size}"
                            )
                    items = [i % size for i in items]
                    if isinstance(index, int):
                        picks.append(slice(items[0], items[0] + 1))
                        dropped.append(dim)
                    else:
                        picks.append(items)
                    lengths.append(len(items))
            lists = [p for p in picks if isinstance(p, list)]
            if len(lists) <= 1:
                index = tuple(
                    torch.tensor(p, dtype=torch.long, device=device) if isinstance(p, list) else p
                    for p in picks
                )
            else:  # several lists: every axis gets its own broadcast index tensor
                tensors: list[Any] = []
                for dim, p in enumerate(picks):
                    items = p if isinstance(p, list) else list(range(shape[dim])[p])
                    view = [1] * ndim
                    view[dim] = len(items)
                    tensors.append(torch.tensor(items, dtype=torch.long, device=device).view(view))
                index = tuple(tensors)
            kept = tuple(n for dim, n in enumerate(lengths) if dim not in dropped)
            memo[key] = (index, tuple(dropped), kept)
            return memo[key]

        def take(x: Any, ix: Any) -> Any:
            if ix is None:
                return x
            out = x[ix[0]]
            for dim in reversed(ix[1]):
                out = out.squeeze(dim)
            return out

        def put(x: Any, ix: Any, value: Any) -> None:  # in place
            value = value.to(device=x.device, dtype=x.dtype)
            if ix is None:
                x.copy_(value.expand(x.shape))
                return
            index, dropped, kept = ix
            value = value.expand(torch.broadcast_shapes(value.shape, kept))
            for dim in dropped:
                value = value.unsqueeze(dim)
            x[index] = value

        def sae_splice(region: Any, params: Any) -> Any:
            # the canonical form of interventions.sae.base._AffineSAE.kernel
            act, w_enc, b_enc, w_dec, b_dec, extra, b_in, w_skip, rescale, edits, error = params
            device = region.device
            w_enc, b_enc = w_enc.to(device), b_enc.to(device)
            w_dec, b_dec = w_dec.to(device), b_dec.to(device)
            x32 = region.float()
            scale = x32.shape[-1] ** 0.5 / x32.norm(dim=-1, keepdim=True) if rescale else None
            xin = x32 * scale if rescale else x32
            if b_in is not None:
                xin = xin - b_in.to(device)
            pre = xin @ w_enc + b_enc
            if act == "relu":
                f = torch.relu(pre)
            elif act == "jumprelu":
                f = torch.relu(pre) * (pre > extra.to(device)).to(pre.dtype)
            elif act == "topk":
                top = torch.topk(pre, k=extra, dim=-1, sorted=False)
                f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
            else:  # gated: pre is the gate, extra the magnitude path
                mag = xin @ extra[0].to(device) + extra[1].to(device)
                f = (pre > 0).to(pre.dtype) * torch.relu(mag)
            g = f.clone() if edits else f
            for mode, features, value, low, high in edits:
                if mode == "set":
                    g[..., features] = value
                elif mode == "scale":
                    g[..., features] = g[..., features] * value
                else:
                    g[..., features] = g[..., features].clamp(min=low, max=high)

            def written(h: Any) -> Any:
                y = h @ w_dec + b_dec
                if rescale:
                    y = y / scale
                if w_skip is not None:
                    y = y + x32 @ w_skip.to(device).T
                return y

            recon = written(g)
            if error == "drop":
                out = recon
            else:
                err = x32 - (recon if not edits else written(f))
                out = recon + (err.detach() if error == "detach" else err)
            return out.to(region.dtype), f

        def apply(x: Any, ins: Any, kept: Any) -> None:
            kind = ins[0]
            if kind == "keep":
                kept.setdefault(ins[2], []).append(x.clone())
                return
            if kind == "capture":
                store[ins[2]] = x.clone()
                return
            axes, sel = ins[2], ins[3]
            ix = index_of(x.shape, axes, sel, x.device)
            if kind == "read":
                store[ins[4]] = take(x, ix).clone()
            elif kind == "patch":
                put(x, ix, ins[4])
            elif kind == "patchref":
                value = store[ins[4]].to(device=x.device, dtype=x.dtype)
                if ins[5]:  # a whole-site read: the same entries of it
                    value = take(value, index_of(value.shape, axes, sel, value.device))
                put(x, ix, value)
            elif kind == "ablate":
                if ins[4] == "zero":
                    put(x, ix, torch.zeros_like(take(x, ix)))
                else:
                    source = store[ins[5]].to(device=x.device, dtype=x.dtype)
                    if ins[4] == "mean":
                        full = source.mean(dim=ins[6], keepdim=True).expand_as(x)
                    else:
                        full = source[ins[6].to(source.device)].expand_as(x)
                    put(x, ix, take(full, ix))
            else:
                region = take(x, ix)
                if kind == "add":
                    new = region + ins[5] * ins[4].to(device=region.device, dtype=region.dtype)
                elif kind == "project":
                    q = ins[4].to(region.device)
                    x32 = region.float()
                    new = (x32 - (x32 @ q) @ q.T).to(region.dtype)
                elif kind == "scale":
                    new = region * ins[4]
                else:
                    new, features = sae_splice(region, ins[4])
                    if ins[5] is not None:
                        store[ins[5]] = features
                put(x, ix, new)

        def main_of(raw: Any, io: Any) -> Any:
            # the tensor at a module's input or output, and where it sits in the value
            if io == "input":
                args, kw = raw
                if args and isinstance(args[0], torch.Tensor):
                    return args[0], 0
                for name in ("hidden_states", "input", "x", "input_ids", "inputs_embeds"):
                    if isinstance(kw.get(name), torch.Tensor):
                        return kw[name], name
                raise RuntimeError("the module was called with no tensor input")
            if isinstance(raw, torch.Tensor):
                return raw, None
            if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
                return raw[0], 0
            if isinstance(getattr(raw, "logits", None), torch.Tensor):
                return raw.logits, "logits"
            raise RuntimeError(f"no tensor in a module output of type {type(raw).__name__}")

        def rebuild(raw: Any, io: Any, where: Any, new: Any) -> Any:
            # the value with its tensor replaced
            if io == "input":
                args, kw = raw
                return ((new, *args[1:]), kw) if where == 0 else (args, {**kw, where: new})
            if where is None:
                return new
            if where == 0:
                return (new, *raw[1:]) if isinstance(raw, tuple) else [new, *raw[1:]]
            raw[where] = new  # a ModelOutput keeps attribute and key in step
            return raw

        def view_of(x: Any, view: Any) -> Any:
            # (the tensor ops see, the tensor to write it back to if it is a copy)
            if view != "heads":
                return x, None
            shape = (*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
            if x.is_contiguous():
                return x.view(shape), None
            return x.reshape(shape), x

        def attention_of(raw: Any) -> Any:
            if not isinstance(raw, tuple) or len(raw) < 2 or raw[1] is None:
                raise RuntimeError("no attention weights returned; eager attention is needed")
            return raw[1]

        # attention weights need eager attention; on the host it is switched per request
        configs: list[Any] = []
        if program["eager"]:
            for module in wrapper._module.modules():
                config = getattr(module, "config", None)
                if config is not None:
                    configs.append((config, getattr(config, "_attn_implementation", None)))
            for config, _ in configs:
                config._attn_implementation = "eager"
        try:
            for index, stage in enumerate(program["stages"]):
                stage_at["stage"] = index
                fn = wrapper._module.generate if stage["generate"] else None
                with wrapper.trace(fn=fn, **stage["kwargs"]) as tracer:
                    gates = {key: tracer.barrier(n) for key, n in stage["barriers"].items()}
                    for prog in stage["progs"]:
                        with tracer.invoke(*prog["args"], **prog["kwargs"]):
                            kept: dict[str, Any] = {}
                            for step in tracer.iter[0 : len(prog["steps"])]:
                                for envoy, io, waits, signals, instrs, swap in prog["steps"][step]:
                                    for key in waits:
                                        gates[key]()
                                    raw = envoy.output if io == "output" else envoy.inputs
                                    main, where = None, None
                                    views: dict[str, Any] = {}
                                    for ins in instrs:
                                        if ins[1] not in views:
                                            if ins[1] == "attn_weights":
                                                views[ins[1]] = (attention_of(raw), None)
                                            else:
                                                if main is None:
                                                    main, where = main_of(raw, io)
                                                    main = main.clone() if swap else main
                                                views[ins[1]] = view_of(main, ins[1])
                                        apply(views[ins[1]][0], ins, kept)
                                    for x, base in views.values():
                                        if base is not None:
                                            base.copy_(x.reshape(base.shape))
                                    if swap and io == "output":
                                        envoy.output = rebuild(raw, io, where, main)
                                    elif swap:
                                        envoy.inputs = rebuild(raw, io, where, main)
                                    for key in signals:
                                        gates[key]()
                            for name, axes, sel in prog["concat"]:
                                parts = kept[name]
                                full = parts[0]
                                if len(parts) > 1:
                                    names = axes_of(full.ndim, axes)
                                    full = torch.cat(
                                        parts, dim=names.index("pos") if "pos" in names else 1
                                    )
                                store[name] = take(
                                    full, index_of(full.shape, axes, sel, full.device)
                                )
                            if prog["generated"] is not None:
                                store[prog["generated"]] = tracer.result[:, prog["prompt"] :]
        finally:
            for config, impl in configs:
                config._attn_implementation = impl
        result = {
            "values": {k: v for k, v in store.items() if k in program["wanted"]},
            "echo": program["echo"],
        }
        if remote:
            nnsight.save(result)
    return store


# ---------------------------------------------------------------------------------------
# Remote execution on NDIF: the whole plan as one session, one request.

_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the host
_READ_TIMEOUT = 60.0  # seconds for one HTTP exchange
_DEFAULT_TIMEOUT = 600.0  # seconds for a whole remote run, unless timeout= says otherwise
# Extra attempts after a transient failure (refused, reset, 502-504), waiting
# _backoff(1), _backoff(2), ... in between: about 15 s in all by default, because an NDIF
# API answers 503 "compute backend is reconnecting" for some seconds after a disturbance.
_DEFAULT_RETRIES = 5
_TRANSIENT_STATUS = frozenset({502, 503, 504})
_AUTH_STATUS = frozenset({400, 401, 403})
_AUTH_HINT = (
    "Set NDIF_API_KEY (or api_key=, or nnsight's config: "
    "nnsight.CONFIG.set_default_api_key) to a key this host accepts"
)


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


def _config_host_key(host: str | None, api_key: str | None) -> tuple[str, str]:
    """Host and API key as nnsight resolves them: arguments, else NDIF_HOST /
    NDIF_API_KEY, else nnsight's config file."""
    from nnsight.schema.config import CONFIG

    found_host = host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST
    found_key = api_key if api_key is not None else (os.environ.get("NDIF_API_KEY") or "")
    found_key = found_key or CONFIG.API.APIKEY or ""
    found_host = str(found_host).rstrip("/")
    if not found_host.startswith(("http://", "https://")):
        raise RemoteConnectionError(
            f"invalid host {found_host!r}",
            host=found_host,
            hint="An NDIF host is a URL starting with http:// or https:// (NDIF_HOST)",
        )
    return found_host, str(found_key)


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): 0.5, 1, 2, 4, 8, 8, ..."""
    return min(0.5 * 2 ** (attempt - 1), 8.0)


class _Ndif:
    """A small HTTP client for one NDIF host: every call bounded in time and retries."""

    def __init__(self, host: str, api_key: str, model_key: str, retries: int) -> None:
        self.host = host
        self.api_key = api_key
        self.model_key = model_key
        self.retries = max(0, int(retries))
        self.requests = 0  # HTTP requests and websocket connections made (for measurements)

    def error(self, cls: type[RemoteError], message: str, **fields: Any) -> RemoteError:
        fields.setdefault("host", self.host)
        fields.setdefault("model_key", self.model_key or None)
        return cls(message, **fields)

    def headers(self) -> dict[str, str]:
        import sys
        import time

        headers = {
            "ndif-timestamp": repr(time.time()),
            "nnsight-version": _nnsight_version(),
            "python-version": sys.version,
        }
        if self.api_key:
            headers["ndif-api-key"] = self.api_key
        return headers

    def call(
        self,
        method: str,
        url: str,
        *,
        job_id: str | None = None,
        retry: bool = True,
        idempotent: bool = True,
        **kw: Any,
    ) -> Any:
        """One HTTP exchange; connection failures and 502-504 are retried with backoff.

        A request that is not ``idempotent`` (a job submission) is sent again only when it
        cannot have arrived: the connection was refused, or the host answered 502-504.
        """
        import time

        import httpx

        timeout = httpx.Timeout(_READ_TIMEOUT, connect=_CONNECT_TIMEOUT)
        attempts = 1 + (self.retries if retry else 0)
        last: str = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(_backoff(attempt))
            self.requests += 1
            try:
                with httpx.Client(timeout=timeout) as client:
                    response = client.request(method, url, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = f"cannot connect: {exc}"
                continue
            except httpx.TimeoutException as exc:
                raise self.error(
                    RemoteTimeout,
                    f"no answer from the host within {_READ_TIMEOUT:.0f}s ({type(exc).__name__})",
                    job_id=job_id,
                    hint="The host may be overloaded; try again later",
                ) from None
            except httpx.HTTPError as exc:  # reset, protocol errors: transient
                if not idempotent:  # the request may have arrived: sending it again could
                    raise self.error(  # run the job twice
                        RemoteConnectionError,
                        f"the connection broke while sending ({type(exc).__name__}: {exc})",
                        job_id=job_id,
                        hint="The job may or may not have been queued; run it again",
                    ) from None
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in _TRANSIENT_STATUS:
                last = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            return response
        raise self.error(
            RemoteConnectionError,
            f"the host cannot be reached after {attempts} attempt(s) ({last})",
            job_id=job_id,
            hint="Check that the host is up and that NDIF_HOST (or remote=) names it",
        )

    def post(self, blob: bytes, compress: bool, session_id: str = "") -> Any:
        from nnsight.schema.request import RequestModel
        from nnsight.schema.response import ResponseModel

        envelope = RequestModel(model_key=self.model_key, compress=compress)
        envelope.session_id = session_id
        response = self.call(
            "POST",
            f"{self.host}/request",
            idempotent=False,
            data={"data": envelope.metadata()},
            files={"blob": ("request", blob, "application/octet-stream")},
            headers=self.headers(),
        )
        self.check(response)
        try:
            return ResponseModel.model_validate_json(response.text)
        except ValueError:
            raise self.error(
                RemoteConnectionError,
                f"the host's answer to a request is not NDIF's: {response.text[:200]!r}",
                hint="Check that NDIF_HOST (or remote=) names an NDIF API",
            ) from None

    def check(self, response: Any, job_id: str | None = None) -> None:
        code = response.status_code
        if code < 400:
            return
        detail = _detail(response)
        if code in _AUTH_STATUS:
            raise self.error(
                RemoteAuthError,
                f"the host refused the API key (HTTP {code}: {detail})",
                job_id=job_id,
                hint=_AUTH_HINT,
            )
        if code in (404, 405):
            raise self.error(
                RemoteConnectionError,
                f"the host has no NDIF API at {response.request.url.path} (HTTP {code})",
                job_id=job_id,
                hint="Check that NDIF_HOST (or remote=) names an NDIF API, not another server",
            )
        raise self.error(RemoteError, f"the host answered HTTP {code}: {detail}", job_id=job_id)

    def status(self, job_id: str) -> Any:
        """The latest stored status of a non-blocking job, or None if none is stored yet."""
        from nnsight.schema.response import ResponseModel

        response = self.call(
            "GET", f"{self.host}/response/{job_id}", job_id=job_id, headers=self.headers()
        )
        if response.status_code == 404:
            return None
        self.check(response, job_id)
        return ResponseModel.model_validate_json(response.text)

    def download(self, url: str, job_id: str) -> bytes:
        response = self.call("GET", url, job_id=job_id)
        if response.status_code >= 400:
            raise self.error(
                JobLost,
                f"the job's result cannot be downloaded (HTTP {response.status_code})",
                job_id=job_id,
                hint="Results expire on the host; run the graph again",
            )
        return bytes(response.content)


def _detail(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return (response.text or "").strip()[:300] or "no detail"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:300]


def _nnsight_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnsight")
    except PackageNotFoundError:  # pragma: no cover
        return ""


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


# What NDIF says when a job failed for a reason other than the graph; anything else in
# an ERROR is the trace raising on the host (its traceback).
_NOT_DEPLOYED = ("CANT_ACCOMMODATE", "not deployed", "Repository Not Found", "describe_checkpoint")
_LOST = (
    "cancelled or preempted",
    "evicted",
    "Please try again later",
    "Actor died",
    "actor died",
    "RayActorError",
)


class _NdifJob:
    """One request on an NDIF host: the handle behind :class:`interventions.Job`."""

    def __init__(
        self,
        client: _Ndif,
        job_id: str,
        *,
        compress: bool,
        timeout: float,
        socket: Any = None,
        resend: Any = None,
    ) -> None:
        self.client = client
        self.id = job_id
        self.compress = compress
        self.timeout = timeout
        self.socket = socket  # the /subscribe websocket of a blocking run
        self.resend = resend  # sends the request again (blocking runs): (socket, job id)
        self.resent = 0
        self.last: str = "RECEIVED"
        self.meta: dict[str, Any] | None = None  # what the run cost the host (NDIF's meta)

    @property
    def host(self) -> str:
        return self.client.host

    @property
    def model_key(self) -> str:
        return self.client.model_key or "?"

    def status(self) -> str:
        if self.socket is not None:
            return self.last
        response = self.client.status(self.id)
        if response is not None:
            self.last = response.status.value
        return self.last

    def wait(self, timeout: float | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        import time

        limit = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        while True:
            try:
                response = self._wait_socket(deadline) if self.socket else self._poll(deadline)
                break
            except JobLost:
                # the host lost a blocking run (replica died, connection dropped): send it
                # again, a bounded number of times, within the same deadline
                self.close()
                if self.resend is None or self.resent >= self.client.retries:
                    raise
                self.resent += 1
                time.sleep(min(_backoff(self.resent), 4.0, max(deadline - time.monotonic(), 0)))
                self.socket, self.id = self.resend()
                self.last = "RECEIVED"
            finally:
                if self.last in ("COMPLETED", "ERROR"):
                    self.close()
        self.close()
        self.meta = response.meta
        data = response.data
        if isinstance(data, (bytes, bytearray)):
            blob = bytes(data)
        elif isinstance(data, str) and data:
            blob = self.client.download(data, self.id)
        else:
            raise self.client.error(
                JobLost, "the host reported the job complete but sent no result", job_id=self.id
            )
        try:
            saved = _load_result(blob, self.compress)
            result = saved["result"]
            values, echo = dict(result["values"]), dict(result["echo"] or {})
        except Exception as exc:
            raise self.client.error(
                RemoteError,
                f"the job's result cannot be read ({type(exc).__name__}: {exc})",
                job_id=self.id,
            ) from None
        if echo.get("model_key"):
            self.client.model_key = str(echo["model_key"])
        return values, echo

    def _timeout(self, limit: float) -> RemoteTimeout:
        how = (
            "collect it later with iv.Job.attach(id).result()"
            if self.socket is None
            else "a blocking run's result arrives only on its connection: use iv.submit for "
            "long jobs, or a larger timeout="
        )
        return self.client.error(  # type: ignore[return-value]
            RemoteTimeout,
            f"the job did not finish within {limit:.0f}s (last status {self.last})",
            job_id=self.id,
            hint=f"It may still be running; {how}",
        )

    def _poll(self, deadline: float) -> Any:
        import time

        from nnsight.schema.response import Status

        delay = 0.02
        while True:
            response = self.client.status(self.id)
            if response is not None:
                self.last = response.status.value
                if response.status == Status.COMPLETED:
                    return response
                if response.status == Status.ERROR:
                    raise self._failure(response.description)
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout(self.timeout)
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 1.5, 1.0)

    def _wait_socket(self, deadline: float) -> Any:
        import json
        import time

        import websocket
        from nnsight.schema.response import ResponseModel, Status

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(self.timeout)
            self.socket.settimeout(min(remaining, 5.0))
            try:
                message = self.socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as exc:
                raise self.client.error(
                    JobLost,
                    f"the connection to the host closed while the job ran ({type(exc).__name__})",
                    job_id=self.id,
                    hint="The host may have restarted. A blocking run's result arrives only on "
                    "its connection: run it again, or use iv.submit to keep jobs across "
                    "connection failures",
                ) from None
            if isinstance(message, (bytes, bytearray)):
                response = _load_frame(bytes(message))
            else:
                try:
                    response = ResponseModel.model_validate_json(message)
                except ValueError:
                    if "session_id" in json.loads(message):
                        continue
                    raise
            self.last = response.status.value
            if response.status == Status.COMPLETED:
                return response
            if response.status == Status.ERROR:
                raise self._failure(response.description)

    def _failure(self, description: str) -> RemoteError:
        text = description or "no description"
        if any(marker in text for marker in _NOT_DEPLOYED):
            return self.client.error(
                ModelNotDeployed,
                "the host has no deployment of this model (and did not deploy one): "
                f"{text.strip().splitlines()[-1][:300]}",
                job_id=self.id,
                hint="Deploy the model on the host (scripts/ndif/deploy.py for a local NDIF), "
                "or check that model_key= names a deployed model",
            )
        if "execution timeout" in text:
            return self.client.error(
                RemoteTimeout,
                f"the host stopped the job: {text.strip()[:300]}",
                job_id=self.id,
                hint="Split the graph (max_batch=) or ask the host for a longer timeout",
            )
        if any(marker in text for marker in _LOST):
            return self.client.error(
                JobLost,
                f"the host lost the job: {text.strip()[:300]}",
                job_id=self.id,
                hint="Its replica was stopped or restarted; run the graph again",
            )
        last = text.strip().splitlines()[-1] if text.strip() else text
        return self.client.error(
            RemoteExecutionError,
            f"the graph raised on the host: {last[:300]}",
            job_id=self.id,
            hint="The remote traceback below shows where. If the graph runs locally, check "
            "that the host's model is the one it was validated against (model_key=)",
            remote_traceback=text,
        )

    def close(self) -> None:
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self.socket.close()
            self.socket = None


def _subscribe(client: _Ndif) -> tuple[Any, str]:
    """Open the /subscribe websocket of a blocking run; returns (socket, session id)."""
    import json
    import time

    import websocket

    scheme, _, rest = client.host.partition("://")
    url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/subscribe"
    header = [f"ndif-api-key: {client.api_key}"] if client.api_key else None
    last = ""
    for attempt in range(1 + client.retries):
        if attempt:
            time.sleep(_backoff(attempt))
        client.requests += 1
        try:
            socket = websocket.create_connection(url, timeout=_CONNECT_TIMEOUT, header=header)
        except websocket.WebSocketBadStatusException as exc:
            code = int(getattr(exc, "status_code", 0) or 0)
            if code in (401, 403):
                raise client.error(
                    RemoteAuthError,
                    f"the host refused the API key (HTTP {code})",
                    hint=_AUTH_HINT,
                ) from None
            if code in _TRANSIENT_STATUS:
                last = f"HTTP {code}"
                continue
            raise client.error(
                RemoteConnectionError,
                f"the host has no NDIF websocket at /subscribe (HTTP {code})",
                hint="Check that NDIF_HOST (or remote=) names an NDIF API, not another server",
            ) from None
        except (websocket.WebSocketException, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        try:
            socket.settimeout(_READ_TIMEOUT)
            first = json.loads(socket.recv())
            return socket, str(first["session_id"])
        except Exception as exc:
            with contextlib.suppress(Exception):
                socket.close()
            raise client.error(
                RemoteConnectionError,
                f"the host's websocket does not speak NDIF's protocol ({type(exc).__name__})",
                hint="Check that NDIF_HOST (or remote=) names an NDIF API",
            ) from None
    raise client.error(
        RemoteConnectionError,
        f"the host cannot be reached after {1 + client.retries} attempt(s) ({last})",
        hint="Check that the host is up and that NDIF_HOST (or remote=) names it",
    )
