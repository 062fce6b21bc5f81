"""The pyvene backend: each run of a plan becomes one pyvene ``IntervenableModel``.

How a graph maps onto pyvene (0.1.8's native, hook-based backend):

* **Model.** pyvene wraps a thin :class:`_Wrapped` module around the user's model. The
  wrapper gives pyvene the ``config`` attribute it reads (``None`` for a plain
  ``nn.Module``, so raw modules work), makes the root module addressable (pyvene cannot
  name the root of the model it wraps: ``"model.output"`` is the root's output), calls
  the model the way the torch reference does, and shields it from pyvene's freeze.
* **Sites.** Every hook point (``ModelInfo.hook_point``) becomes a
  ``RepresentationConfig`` whose ``component`` is the raw module path with ``.output`` or
  ``.input`` (``"model.transformer.h.0.mlp.output"``). No ``unit_locations`` are given, so
  pyvene hands each intervention the whole site tensor (``keep_last_dim=True`` keeps its
  shape) and writes the returned tensor back; the intervention narrows it with the
  selector through :func:`interventions.sites.take` / :func:`~interventions.sites.put`,
  the same code as the reference. This is what makes negative positions, lists, slices,
  heads, batch items and hidden-dim slices all work, for every family and every raw
  module, instead of the subset pyvene's per-family ``unit``/``max_number_of_units``
  machinery can express. The ``head`` site is the output projection's input, viewed as
  ``[batch, pos, head, d_head]`` inside the intervention.
* **Ops.** One representation per op. They are grouped by hook point in order of first
  use and keep graph order within a point, exactly like the reference's hooks (pyvene
  runs the hooks of a module in registration order):

  ==================  ===================================================================
  ``read``            pyvene's own ``CollectIntervention`` (reads of one point with no
                      write between share one); the selector is applied after the run, as
                      in the reference, so generation can concatenate steps. With
                      ``grad=True``: :class:`ReadIntervention`, which routes the forward
                      through the recorded region so gradients reach it
  ``patch``           :class:`PatchIntervention`, an interchange: the value is pyvene's
                      *source*. A value read in another run is passed as precomputed
                      ``source_representations`` (the source run is never re-run); a
                      constant is the intervention's ``source_representation`` buffer
  ablate, add, ...    :class:`OpIntervention`, a ``SourcelessIntervention`` applying the
                      reference semantics (:func:`interventions.apply.apply_op`)
  ==================  ===================================================================

* **Values between runs.** Runs execute in plan order; a read's value is kept and given to
  later runs as ``source_representations``; whole-site captures feed mean and resample
  ablations.
* **Generation.** ``IntervenableModel.generate`` with no ``unit_locations`` and
  ``intervene_on_prompt=True`` runs every intervention on the prompt pass and on each
  generated step; a step clock (the model's input length, as in the torch reference)
  turns absolute positions into positions of the current step (:func:`step_select`).

In-place writes. pyvene writes an intervention's result *into* the hooked tensor. On the
standard sites nothing else holds that tensor when it is written, so this equals the
reference's "replace the value". Where something else may hold it, the wrapper first gives
the hooked module a private copy (a pre-hook or hook installed just before pyvene's, for
the duration of the call): on raw module sites, whose caller may reuse the tensor
(``x + block(x)`` with a write on ``block.input``), and with ``grad=True`` at every written
point, since autograd may have saved the tensor (GPT-2's ``o_proj`` input is a view of the
SDPA output). For a module called by keywords only, the same pre-hook puts first the
keyword the reference would use (pyvene takes the first one).

Hygiene. pyvene's ``IntervenableModel`` puts what it wraps in eval mode and sets
``requires_grad=False`` on its parameters; the wrapper lists no parameters and keeps
``train``/``eval`` to itself, so the user's model runs as the user left it. pyvene also
removes *every* forward hook and pre-hook of the model when it runs. The adapter snapshots
training flags, ``requires_grad`` and the hook tables before a plan runs and restores them
afterwards, whether or not the run failed: the user's own hooks come back (they do not fire
during a pyvene run).

Not supported: ``attn_pattern``. pyvene hands interventions only the first element of a
module's output, and the attention weights are the second; only some families pass them
through a module of their own (GPT-2's ``attn_dropout``), and capabilities are per backend.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from interventions.apply import RunState, apply_op
from interventions.architectures import HookPoint
from interventions.backends import Capabilities
from interventions.errors import (
    BackendVersionError,
    ExecutionError,
    InterventionError,
)
from interventions.hf import accepts, greedy_config, logits_kwargs
from interventions.ops import OP_KINDS, Const, Op, Patch, Read, Ref
from interventions.plan import Plan, absolute_select, step_select
from interventions.progress import progress
from interventions.sites import Select, Site, put, put_, site_axes, take

SUPPORTED_PYVENE = ">=0.1.8,<0.2"

# Hook tables of an nn.Module that pyvene (or a failed run) may leave changed.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


# ---------------------------------------------------------------------------------------
# Version


def installed_version() -> str:
    """The installed pyvene version, or a clear error when pyvene is missing."""
    try:
        return importlib.metadata.version("pyvene")
    except importlib.metadata.PackageNotFoundError:
        raise InterventionError(
            "backend 'pyvene' needs pyvene, which is not installed; "
            f"pip install 'interventions[pyvene]' (pyvene{SUPPORTED_PYVENE})"
        ) from None


def check_version(version: str | None = None) -> str:
    """Return the pyvene version, or raise :class:`BackendVersionError` if unsupported."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    found = installed_version() if version is None else version
    try:
        ok = Version(found) in SpecifierSet(SUPPORTED_PYVENE, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise BackendVersionError(
            f"pyvene {found} is installed, but the pyvene backend supports "
            f"pyvene{SUPPORTED_PYVENE}; install one with pip install 'pyvene{SUPPORTED_PYVENE}'"
        )
    return found


# ---------------------------------------------------------------------------------------
# Per-run context shared by the interventions of one IntervenableModel


@dataclass
class _StepClock:
    """Which absolute positions the current forward call covers (generation)."""

    offset: int = 0
    length: int = 0
    calls: int = 0

    def advance(self, length: int) -> None:
        self.offset = self.offset + self.length if self.calls else 0
        self.length = length
        self.calls += 1


@dataclass
class _RunContext:
    """What the interventions of one run need besides their own tensor."""

    state: RunState
    n_heads: int | None
    generating: bool
    prompt: int
    fed: int
    grad: bool = False
    clock: _StepClock = field(default_factory=_StepClock)
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)  # SAE features, grad reads


@dataclass
class _Target:
    """One op at one hook point: how to view the tensor there and what to select."""

    op: Op
    point: HookPoint
    ctx: _RunContext
    aligned: bool = False  # patch from a whole-site read: take the same entries

    def select(self) -> Select | None:
        """The op's selector for the current forward step (``None``: not this step)."""
        if not self.ctx.generating:
            return self.op.select
        clock = self.ctx.clock
        return step_select(
            self.op.select, self.ctx.prompt, self.ctx.fed, clock.offset, clock.length
        )

    def view_in(self, x: torch.Tensor) -> torch.Tensor:
        return _view_in(self.point, x, self.ctx.n_heads)

    def view_out(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.reshape(like.shape) if self.point.view == "heads" else x

    def axes(self, x: torch.Tensor) -> tuple[str, ...]:
        return site_axes(self.op.site.kind, x.ndim)


def _view_in(point: HookPoint, x: torch.Tensor, n_heads: int | None) -> torch.Tensor:
    if point.view == "heads":
        assert n_heads is not None
        return x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)
    return x


# ---------------------------------------------------------------------------------------
# Intervention classes (subclasses of pyvene's, defined when pyvene is first needed)


@dataclass(frozen=True)
class _Classes:
    patch: type
    op: type
    read: type
    collect: type


@functools.cache
def _classes() -> _Classes:
    import pyvene as pv

    class PatchIntervention(pv.Intervention):
        """Interchange: the selected entries take the source value.

        The source is pyvene's ``source`` argument (``source_representations``: a value
        read in another run) or, for a constant, this intervention's
        ``source_representation`` buffer, as in pyvene's ``VanillaIntervention``.
        """

        def __init__(self, target: _Target, constant: torch.Tensor | None = None) -> None:
            super().__init__(keep_last_dim=True, source_representation=constant)
            self.target = target

        def forward(
            self,
            base: torch.Tensor,
            source: torch.Tensor | None = None,
            subspaces: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            target = self.target
            select = target.select()
            if select is None:
                return base
            value = self.source_representation if source is None else source
            if value is None:
                raise ExecutionError(f"patch on {target.op.site}: pyvene passed no source value")
            x = target.view_in(base)
            axes = target.axes(x)
            value = value.to(device=x.device, dtype=x.dtype)
            if target.aligned:
                value = take(value, select, axes)
            if target.ctx.grad:
                return target.view_out(put(x, select, axes, value), base)
            put_(x, select, axes, value)  # ``base`` is pyvene's private copy of the site
            return target.view_out(x, base)

        def __str__(self) -> str:
            return f"PatchIntervention({self.target.op.site})"

    class OpIntervention(pv.SourcelessIntervention):
        """Ablate, add, project_out, scale or sae_splice, with the reference semantics."""

        def __init__(self, target: _Target) -> None:
            super().__init__(keep_last_dim=True)
            self.target = target

        def forward(
            self,
            base: torch.Tensor,
            source: torch.Tensor | None = None,
            subspaces: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            target = self.target
            select = target.select()
            if select is None:
                return base
            x = target.view_in(base)
            # pyvene hands every intervention its own copy of the site (without linked
            # subspaces, which this adapter never builds), so it may be written in place
            x, extra = apply_op(
                target.op, x, target.axes(x), select, target.ctx.state, inplace=not target.ctx.grad
            )
            for name, value in extra.items():
                target.ctx.recorded[name] = value if target.ctx.grad else value.detach()
            return target.view_out(x, base)

        def __str__(self) -> str:
            return f"OpIntervention({type(self.target.op).__name__} {self.target.op.site})"

    class ReadIntervention(pv.SourcelessIntervention):
        """A read that keeps gradients (``grad=True``): the forward goes on from the region.

        pyvene's ``CollectIntervention`` records a copy that nothing downstream uses, so no
        gradient could reach it. This one returns ``put(x, select, take(x, select))``, which
        pyvene writes back into the site tensor, so the model's outputs depend on the
        recorded region, as in the torch reference.
        """

        def __init__(self, target: _Target) -> None:
            super().__init__(keep_last_dim=True)
            self.target = target

        def forward(
            self,
            base: torch.Tensor,
            source: torch.Tensor | None = None,
            subspaces: Any = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            target = self.target
            op = target.op
            assert isinstance(op, Read)
            x = target.view_in(base)
            axes = target.axes(x)
            region = take(x, op.select, axes)
            if region is not x:
                x = put(x, op.select, axes, region)
            target.ctx.recorded[op.name] = region
            return target.view_out(x, base)

        def __str__(self) -> str:
            return f"ReadIntervention({self.target.op.site})"

    return _Classes(
        patch=PatchIntervention,
        op=OpIntervention,
        read=ReadIntervention,
        collect=pv.CollectIntervention,
    )


# ---------------------------------------------------------------------------------------
# The wrapper pyvene sees


def _first_tensor_of_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    for key in ("input_ids", "inputs_embeds"):
        if x is None and isinstance(kwargs.get(key), torch.Tensor):
            x = kwargs[key]
    return x


# Where the torch reference finds a module's input tensor when it is passed by keyword.
_INPUT_KEYS = ("hidden_states", "input", "x", "input_ids", "inputs_embeds")


def _prepare_input(copy: bool, module: nn.Module, args: Any, kwargs: Any) -> Any:
    """Pre-hook run just before pyvene's at an input site.

    pyvene takes a module's input from ``args[0]``, or else from the *first* keyword
    argument; the reference looks for ``hidden_states``, ``input``, ... by name. For a call
    by keywords this puts the reference's choice first. With ``copy`` the module gets a
    private copy of the tensor, so pyvene's in-place write cannot reach the caller's.
    """
    if args:
        if copy and isinstance(args[0], torch.Tensor):
            return (args[0].clone(), *args[1:]), kwargs
        return None
    key = next((k for k in _INPUT_KEYS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if key is None or (not copy and next(iter(kwargs)) == key):
        return None
    value = kwargs[key].clone() if copy else kwargs[key]
    return args, {key: value, **{k: v for k, v in kwargs.items() if k != key}}


def _private_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: hand on a copy of the tensor pyvene will write into."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].clone(), *output[1:])
    if isinstance(output, dict) and output:
        key = next(iter(output))
        if isinstance(output[key], torch.Tensor):
            output[key] = output[key].clone()
    return None


class _Wrapped(nn.Module):
    """What pyvene wraps: the user's model as ``.model``, called like the torch reference.

    pyvene freezes what it wraps (``model.eval()`` and ``requires_grad=False`` on every
    parameter, in ``IntervenableModel.__init__``). The wrapper shields the user's model
    from that: it lists no parameters and keeps ``train``/``eval`` to itself. It holds no
    state beyond the current run's call settings, and installs its helper hooks (the
    generation clock; private copies at raw write sites) only for the duration of a call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)  # pyvene reads it; None for plain modules
        self.hf_call = False
        self.logits_to_keep: int | None = None
        self.clock: _StepClock | None = None
        self.inputs: list[tuple[nn.Module, bool]] = []  # input sites, and whether to copy
        self.private_outputs: list[nn.Module] = []

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return iter(())

    def train(self, mode: bool = True) -> _Wrapped:
        self.training = mode  # not passed on to the user's model
        return self

    def forward(self, inputs: torch.Tensor) -> Any:
        with self._helpers():
            if self.hf_call:
                keep = logits_kwargs(self.model, self.logits_to_keep)
                return self.model(input_ids=inputs, use_cache=False, **keep)
            return self.model(inputs)

    def generate(self, **kwargs: Any) -> Any:
        with self._helpers():
            return self.model.generate(**kwargs)  # type: ignore[operator]

    def _tick(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        assert self.clock is not None
        x = _first_tensor_of_args(args, kwargs)
        self.clock.advance(int(x.shape[1]) if x is not None and x.ndim >= 2 else 1)

    @contextlib.contextmanager
    def _helpers(self) -> Iterator[None]:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            if self.clock is not None:
                handles.append(
                    self.model.register_forward_pre_hook(self._tick, with_kwargs=True, prepend=True)
                )
            for module, copy in self.inputs:
                hook = functools.partial(_prepare_input, copy)
                handles.append(
                    module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
                )
            for module in self.private_outputs:
                handles.append(module.register_forward_hook(_private_output, prepend=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


# ---------------------------------------------------------------------------------------
# Model state: what pyvene changes, put back


class _ModelGuard:
    """Snapshot of training flags, ``requires_grad`` and hook tables; restores them.

    The wrapper already keeps pyvene's freeze away from the model, and pyvene removes its
    own hooks; the guard is the backstop that makes "no state left" hold whatever pyvene
    or a failure did (pyvene also drops hooks it did not install).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.params = [p for m in self.modules for p in m._parameters.values() if p is not None]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.hooks: dict[tuple[int, str], list[tuple[Any, Any]]] = {}
        for i, module in enumerate(self.modules):
            attrs = module.__dict__
            for attr in _HOOK_TABLES:
                table = attrs.get(attr)
                if table:
                    self.hooks[(i, attr)] = list(table.items())

    def restore(self) -> None:
        for module, training in zip(self.modules, self.training, strict=True):
            if module.training != training:
                module.training = training
        for param, flag in zip(self.params, self.requires_grad, strict=True):
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        for i, module in enumerate(self.modules):
            attrs = module.__dict__
            for attr in _HOOK_TABLES:
                table = attrs.get(attr)
                expected = self.hooks.get((i, attr))
                if table is None or (not table and expected is None):
                    continue
                if list(table.items()) != (expected or []):
                    table.clear()
                    table.update(expected or [])


# ---------------------------------------------------------------------------------------
# Compiling one run


@dataclass
class _Collect:
    """A CollectIntervention's consumers: reads (by op) and ablation captures (by site)."""

    point: HookPoint
    reads: list[Read] = field(default_factory=list)
    captures: list[Site] = field(default_factory=list)


@dataclass
class _Compiled:
    representations: list[Any] = field(default_factory=list)
    collects: dict[int, _Collect] = field(default_factory=dict)  # representation index ->
    sources: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> source value
    inputs: dict[str, bool] = field(default_factory=dict)  # input site -> private copy?
    private_outputs: list[str] = field(default_factory=list)


def _component(point: HookPoint) -> str:
    return f"model.{point.module}.{point.io}" if point.module else f"model.{point.io}"


def _compile(plan: Plan, run: str, ctx: _RunContext) -> _Compiled:
    """The run's representations: grouped by hook point, in graph order within each.

    Grouping follows the torch reference, which keeps one hook per hook point in order of
    first use; so two views of one tensor (``head`` and a raw ``o_proj.input``) apply in
    the same order on both backends. Reads of one point share a collect until a write.
    """
    import pyvene as pv

    classes = _classes()
    info = plan.info
    entries: dict[HookPoint, list[Op | Site]] = {}  # a Site: a capture for an ablation
    for op in plan.ops_of(run):
        entries.setdefault(info.hook_point(op.site), []).append(op)
    for site in plan.captures_of(run):
        entries.setdefault(info.hook_point(site), []).append(site)

    out = _Compiled()

    def add(point: HookPoint, intervention: Any) -> int:
        out.representations.append(
            pv.RepresentationConfig(component=_component(point), intervention=intervention)
        )
        return len(out.representations) - 1

    def private(point: HookPoint) -> None:
        if point.io == "input":
            out.inputs[point.module] = True
        elif point.module not in out.private_outputs:
            out.private_outputs.append(point.module)

    for point, items in entries.items():
        if point.io == "input":
            out.inputs.setdefault(point.module, False)
        shared: _Collect | None = None
        for item in items:
            if isinstance(item, Read) and ctx.grad and not ctx.generating:
                private(point)
                add(point, classes.read(_Target(item, point, ctx)))
                continue
            if isinstance(item, (Read, Site)):
                if shared is None:
                    shared = _Collect(point)
                    out.collects[add(point, classes.collect(keep_last_dim=True))] = shared
                if isinstance(item, Read):
                    shared.reads.append(item)
                else:
                    shared.captures.append(item)
                continue
            shared = None  # later reads must see this write
            op = item
            if op.site.is_raw or ctx.grad:
                # a raw tensor may be aliased by its caller; with gradients, autograd may
                # have saved it (GPT-2's o_proj input is a view of the SDPA output)
                private(point)
            if isinstance(op, Patch) and isinstance(op.value, Ref):
                # a whole-site read is aligned; a selected read or SAE features are not
                target = _Target(op, point, ctx, aligned=plan.aligned(op.value.read))
                out.sources[add(point, classes.patch(target))] = ctx.state.results[op.value.read]
            elif isinstance(op, Patch):
                assert isinstance(op.value, Const)
                constant = plan.graph.tensors[op.value.tensor]
                add(point, classes.patch(_Target(op, point, ctx), constant))
            else:
                add(point, classes.op(_Target(op, point, ctx)))
    return out


# ---------------------------------------------------------------------------------------
# Running


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _execute_run(
    plan: Plan, run: str, state: RunState, wrapper: _Wrapped, device: torch.device, grad: bool
) -> torch.Tensor | None:
    """Run one run of the plan on pyvene; returns generated tokens for a generating run."""
    import pyvene as pv

    graph_run = plan.graph.runs[run]
    prompt = plan.prompt_length(run)
    ctx = _RunContext(
        state=state,
        n_heads=plan.info.n_heads,
        generating=graph_run.generates,
        prompt=prompt,
        fed=prompt + (graph_run.max_new_tokens - 1 if graph_run.max_new_tokens else 0),
        grad=grad,
    )
    compiled = _compile(plan, run, ctx)
    if not compiled.representations and not graph_run.generates:
        return None  # nothing to observe: skip the forward pass

    intervenable = pv.IntervenableModel(
        pv.IntervenableConfig(representations=compiled.representations), wrapper
    )
    keys = list(intervenable.sorted_keys)
    if len(keys) != len(compiled.representations):
        raise ExecutionError(
            f"run {run!r}: pyvene built {len(keys)} interventions for "
            f"{len(compiled.representations)} representations"
        )
    sources = {keys[i]: value for i, value in compiled.sources.items()} or None

    model = wrapper.model
    wrapper.clock = ctx.clock if ctx.generating else None
    wrapper.inputs = [(_submodule(model, p), copy) for p, copy in compiled.inputs.items()]
    wrapper.private_outputs = [_submodule(model, p) for p in compiled.private_outputs]
    inputs = plan.inputs[run].to(device)
    tokens: torch.Tensor | None = None
    if graph_run.max_new_tokens is not None:
        wrapper.hf_call = True
        # logits_to_keep=0: the prompt pass computes logits at every position, so the
        # `logits` site sees the prompt (HF would keep the last position only)
        keep = {"logits_to_keep": 0} if accepts(model, "logits_to_keep") else {}
        first, generated = intervenable.generate(
            {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)},
            source_representations=sources,
            intervene_on_prompt=True,  # with no unit_locations: every step, prompt included
            generation_config=greedy_config(graph_run.max_new_tokens),
            **keep,
        )
        tokens = generated[:, inputs.shape[1] :].cpu()
    else:
        wrapper.hf_call = graph_run.inputs is None and plan.info.is_hf
        wrapper.logits_to_keep = plan.logits_to_keep(run)
        first, _ = intervenable({"inputs": inputs}, source_representations=sources)
    collected = list(first[1]) if intervenable.return_collect_activations else []
    _finish(run, compiled, collected, ctx)
    return tokens


def _finish(run: str, compiled: _Compiled, collected: list[torch.Tensor], ctx: _RunContext) -> None:
    """Turn pyvene's collected activations into results and captures.

    pyvene returns the activations of every CollectIntervention in order, each as one
    tensor per forward call (several when generating).
    """
    ctx.state.results.update(ctx.recorded)
    n = len(compiled.collects)
    if n == 0:
        return
    if len(collected) % n:
        raise ExecutionError(
            f"run {run!r}: pyvene collected {len(collected)} tensors for {n} reads"
        )
    per = len(collected) // n
    for k, entry in enumerate(compiled.collects.values()):
        parts = collected[k * per : (k + 1) * per]
        full = _view_in(entry.point, _concat(parts), ctx.n_heads)
        for op in entry.reads:
            select = op.select
            if ctx.generating:  # negative positions count from the end of the prompt
                select = absolute_select(select, ctx.prompt, ctx.fed)
            ctx.state.results[op.name] = take(full, select, site_axes(op.site.kind, full.ndim))
        for site in entry.captures:
            ctx.state.captures[(run, str(site))] = full


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Steps of a generating run, concatenated along the position axis (axis 1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class PyveneBackend:
    """pyvene ``IntervenableModel``: every op runs as a pyvene intervention."""

    name = "pyvene"
    capabilities = Capabilities(
        ops=frozenset(OP_KINDS),
        views=frozenset({"plain", "heads", "logits"}),
        generation=True,
        gradients=True,
        remote=False,
        raw_modules=True,
        hf_only=False,
    )

    def __init__(self) -> None:
        self._version = check_version()

    def versions(self) -> dict[str, str]:
        return {"pyvene": self._version, "torch": torch.__version__}

    def execute(self, plan: Plan, model: nn.Module, **options: Any) -> dict[str, torch.Tensor]:
        grad = bool(options.pop("grad", False))
        show = options.pop("progress", None)
        if options:
            raise InterventionError(
                f"pyvene backend: unknown options {sorted(options)}; valid: grad, progress"
            )
        state = RunState(plan)
        generated: dict[str, torch.Tensor] = {}
        guard = _ModelGuard(model)
        wrapper = _Wrapped(model)
        device = _device(model)
        try:
            with contextlib.nullcontext() if grad else torch.no_grad():
                for run in progress(plan.order, show, desc="runs (pyvene)"):
                    try:
                        tokens = _execute_run(plan, run, state, wrapper, device, grad)
                    except InterventionError:
                        raise
                    except Exception as exc:
                        raise ExecutionError(
                            f"run {run!r} failed on the pyvene backend: {type(exc).__name__}: {exc}"
                        ) from exc
                    if tokens is not None:
                        generated[f"{run}.generated"] = tokens
        finally:
            guard.restore()
        results = {
            name: state.results[name] for name in plan.graph.reads() if name in state.results
        }
        results.update(generated)
        if grad:
            return results
        return {k: v.detach().cpu() for k, v in results.items()}


__all__ = ["SUPPORTED_PYVENE", "PyveneBackend", "check_version", "installed_version"]
