"""The backend: a plan run on pyvene one run at a time, each run one ``IntervenableModel``."""

from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any

import torch
from torch import nn

from interventions.apply import RunState
from interventions.attention import QKV_VIEWS, SPLIT_VIEWS
from interventions.backends import Capabilities
from interventions.devices import input_device
from interventions.errors import BackendVersionError, ExecutionError, InterventionError
from interventions.hf import accepts, generation_config, seeded
from interventions.ops import OP_KINDS
from interventions.plan import Plan, absolute_select
from interventions.progress import progress
from interventions.selection import site_axes, take

from .classes import _RunContext, _view_in
from .compiler import _compile, _Compiled
from .internals import finish_internals
from .model import _ModelGuard, _Wrapped

SUPPORTED_PYVENE = ">=0.1.8,<0.2"


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


def _device(model: nn.Module) -> torch.device:
    return input_device(model)


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
        dims=_dims(plan),
    )
    compiled = _compile(plan, run, ctx, wrapper.model)
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
    wrapper.blocks = _block_recorders(ctx, compiled)
    inputs = plan.inputs[run].to(device)
    tokens: torch.Tensor | None = None
    if graph_run.max_new_tokens is not None:
        wrapper.hf_call = True
        # logits_to_keep=0: the prompt pass computes logits at every position, so the
        # `logits` site sees the prompt (HF would keep the last position only)
        keep = {"logits_to_keep": 0} if accepts(model, "logits_to_keep") else {}
        with seeded(graph_run.sampling):
            first, generated = intervenable.generate(
                {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)},
                source_representations=sources,
                intervene_on_prompt=True,  # with no unit_locations: every step, prompt included
                generation_config=generation_config(graph_run.max_new_tokens, graph_run.sampling),
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
    finish_internals(run, ctx)
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
        full = _view_in(entry.point, _concat(parts), ctx.n_heads, ctx.dims)
        for op in entry.reads:
            select = op.select
            if ctx.generating:  # negative positions count from the end of the prompt
                select = absolute_select(select, ctx.prompt, ctx.fed)
            ctx.state.results[op.name] = take(full, select, site_axes(op.site.kind, full.ndim))
        for site in entry.captures:
            ctx.state.captures[(run, str(site))] = full


def _dims(plan: Plan) -> tuple[int, int, int] | None:
    info = plan.info
    if not (info.n_heads and info.d_head):
        return None
    return info.n_heads, info.n_kv_heads or info.n_heads, info.d_head


def _block_recorders(ctx: _RunContext, compiled: _Compiled) -> list[tuple[nn.Module, Any]]:
    """(block, pre-hook) pairs that record the block inputs the per-head inputs need."""
    if ctx.internals is None or not compiled.blocks:
        return []
    store = ctx.internals.block_inputs

    def recorder(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            store[layer] = x

        return hook

    return [(m, recorder(n)) for m, n in ctx.internals.block_modules(compiled.blocks)]


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Steps of a generating run, concatenated along the position axis (axis 1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class PyveneBackend:
    """pyvene ``IntervenableModel``: every op runs as a pyvene intervention."""

    name = "pyvene"
    capabilities = Capabilities(
        # grad ops: lowered to grad=True reads by the core
        ops=frozenset(OP_KINDS) - {"grad"},
        # attn_weights and attn_scores: not module inputs or outputs (see the package doc);
        # router_logits/router_choice/expert_out: refused, see the package doc
        views=frozenset({"plain", "heads", "logits", "resid", *QKV_VIEWS, *SPLIT_VIEWS}),
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
        wrapper.foreign_hooks = guard.own_hooks()
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
