"""The torch backend itself: one forward pass (or ``generate`` call) per run, with the
hook set :class:`_Hooks` installed and removed around it. See the package docstring."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from interventions.apply import (
    RunState,
    add_at,
    apply_op,
    block_rows,
    delta_of_outputs,
    edge_operands,
    node_output,
)
from interventions.architectures import HookPoint, ModelInfo
from interventions.attention import (
    QKV_VIEWS,
    SPLIT_VIEWS,
    projection_weight,
)
from interventions.backends import Capabilities
from interventions.devices import input_device
from interventions.errors import ExecutionError, InterventionError
from interventions.hf import accepts, eager_attention, generation_config, logits_kwargs, seeded
from interventions.ops import OP_KINDS, EdgePatch, Read
from interventions.plan import Plan, absolute_select, step_select
from interventions.progress import progress
from interventions.selection import put, site_axes, take
from interventions.sites import Select, Site

from .internals import (
    ROUTER_VIEWS,
    Entry,
    InternalHooks,
    StepClock,
    get_plain,
    set_plain,
)


def _snapshot(point: HookPoint, x: torch.Tensor) -> torch.Tensor:
    """What a read keeps: a copy of the tensor as the hook sees it, since the model may
    write into it afterwards (Falcon adds attention's output into its MLP's output in
    place). The logits are the model's own output, which it does not touch again."""
    return x.detach() if point.view == "logits" else x.detach().clone()


class _AllTaken(BaseException):
    """Raised by the last hook a run needs: the rest of the forward cannot change any
    result, so it is not computed. A BaseException, so that no ``except Exception`` in
    model code between the hook and the backend can swallow it."""


class _Hooks(InternalHooks):
    """Installs hooks for one run and removes every one of them on exit."""

    def __init__(
        self, model: nn.Module, plan: Plan, run: str, state: RunState, grad: bool = False
    ) -> None:
        self.model = model
        self.grad = grad
        self.plan = plan
        self.run = run
        self.state = state
        self.clock = StepClock()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.cleanups: list[Callable[[], None]] = []
        self.points: dict[HookPoint, list[Entry]] = {}
        self.recorded: dict[str, list[torch.Tensor]] = {}
        self.selected: dict[str, torch.Tensor] = {}  # reads already selected (grad mode)
        self.captures: dict[str, list[torch.Tensor]] = {}
        self.block_inputs: dict[int, torch.Tensor] = {}  # for the per-head-input sites
        self.split_copies: dict[HookPoint, tuple[int, torch.Tensor]] = {}  # (call, copies)
        info = plan.info
        # q/k/v and per-head-input entries by projection module, in op order
        self.qkv_entries: dict[str, list[tuple[HookPoint, Entry]]] = {}
        # router_logits and experts_chosen entries by gate module, in op order
        self.router_entries: dict[str, list[tuple[HookPoint, Entry]]] = {}
        for op in plan.ops_of(run):
            self._add(info.hook_point(op.site), Entry(op, op.site))
        for site in plan.captures_of(run):
            self._add(info.hook_point(site), Entry(None, site))
        self.live: dict[str, torch.Tensor] = {}  # upstream node values of this run's edges
        # each edge delta by (upstream, head, rows, method, source): (its live value, delta)
        self.edge_deltas: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.out_projs: dict[int, torch.Tensor] = {}  # attention output weights by layer
        # (value, head) -> (value, its node output): identity-checked, as ids get reused
        self.node_outputs: dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
        live = {op.upstream for op in plan.ops_of(run) if isinstance(op, EdgePatch)}
        for site in sorted(live, key=str):
            self._add(info.hook_point(site), Entry(None, site, live=True))
        graph_run = plan.graph.runs[run]
        self.prompt = plan.prompt_length(run)
        self.fed = self.prompt + (graph_run.max_new_tokens - 1 if graph_run.max_new_tokens else 0)
        self.generating = graph_run.generates
        # the hooked (module, side) pairs still to fire before the forward may stop early
        # (filled as the hooks are registered)
        self.untaken: set[tuple[str, str]] = set()

    def _may_stop_early(self) -> bool:
        """Once every hook of a plain forward has fired, nothing later changes a result.
        Not for gradients (the backward needs the whole graph), generation (later steps)
        or raw module sites (a module may be called more than once per forward)."""
        if self.grad or self.generating or not self.plan.info.is_hf or not self.points:
            return False
        return all(p.module and not e.site.is_raw for p, es in self.points.items() for e in es)

    def _tracker(self, key: tuple[str, str]) -> Callable[..., None]:
        def taken(*_: Any) -> None:
            self.untaken.discard(key)
            if not self.untaken:
                raise _AllTaken

        return taken

    def _add(self, point: HookPoint, entry: Entry) -> None:
        self.points.setdefault(point, []).append(entry)
        if point.view in QKV_VIEWS or point.view in SPLIT_VIEWS:
            self.qkv_entries.setdefault(point.module, []).append((point, entry))
        if point.view in ROUTER_VIEWS:
            self.router_entries.setdefault(point.module, []).append((point, entry))

    def _process(
        self, point: HookPoint, x: torch.Tensor, entries: list[Entry] | None = None
    ) -> torch.Tensor:
        # Writes go into one private copy of the module's tensor, made at the first write
        # (a copy per op would cost a full tensor copy per patch of a batched sweep), and
        # made again after anything kept a reference to the current tensor.
        owned = False
        # edge patches at this point, summed by selection and added once (before any other
        # op sees x): several edges into one input cost one write, not one each
        pending: dict[tuple[Select, tuple[str, ...]], list[torch.Tensor]] = {}
        for entry in self.points[point] if entries is None else entries:
            axes = site_axes(entry.site.kind, x.ndim)
            op = entry.op
            if isinstance(op, EdgePatch):
                pending.setdefault((op.select, axes), []).append(self._edge_delta(op))
                continue
            if pending:
                x, owned = self._add_deltas(x, owned, pending)
            if entry.live:
                self.live[str(entry.site)] = x if self.grad else x.detach()
                owned = False
                continue
            if op is None:
                kept = x if self.grad else _snapshot(point, x)
                self.captures.setdefault(str(entry.site), []).append(kept)
                # the latest value, for this run's own cross-site SAE splices
                self.state.captures[(self.run, str(entry.site))] = kept
                owned = owned and kept is not x
                continue
            if isinstance(op, Read):
                if self.grad and not self.generating:
                    # route the forward through the recorded tensor so gradients reach it
                    region = take(x, op.select, axes)
                    # the forward goes on from a function of the region, never the region
                    # itself, which the model might write into (Falcon's MLP output)
                    x = put(x, op.select, axes, region) if region is not x else region.clone()
                    self.selected[op.name] = region
                    owned = True
                    continue
                # reads keep every position of every step; their selector applies at the end
                kept = _snapshot(point, x)
                self.recorded.setdefault(op.name, []).append(kept)
                owned = owned and kept is not x
                continue
            select: Select | None = op.select
            if self.generating:
                select = step_select(
                    op.select, self.prompt, self.fed, self.clock.offset, self.clock.length
                )
            if select is None:
                continue
            inplace = not self.grad  # autograd keeps the out-of-place form
            if inplace and not owned:
                x, owned = x.clone(), True
            x, extra = apply_op(op, x, axes, select, self.state, inplace=inplace)
            for name, value in extra.items():
                self.recorded.setdefault(name, []).append(value if self.grad else value.detach())
        if pending:
            x, owned = self._add_deltas(x, owned, pending)
        return x

    def _add_deltas(
        self,
        x: torch.Tensor,
        owned: bool,
        pending: dict[tuple[Select, tuple[str, ...]], list[torch.Tensor]],
    ) -> tuple[torch.Tensor, bool]:
        """``x`` with the pending edge deltas added, each selection's sum in one write."""
        if not self.grad and not owned:  # one private copy for all edges here
            x, owned = x.clone(), True
        for (select, axes), deltas in pending.items():
            total = deltas[0] if len(deltas) == 1 else deltas[0] + deltas[1]
            for d in deltas[2:]:
                total = total + d if self.grad else total.add_(d)
            x = add_at(x, select, axes, total, inplace=not self.grad)
        pending.clear()
        return x, owned

    def _edge_delta(self, op: EdgePatch) -> torch.Tensor:
        """The edge's delta (:func:`interventions.apply.edge_delta`), computed once per
        upstream node, rows and ablation in this forward: edges from one node into many
        inputs share it. The node's outputs (here, all rows; in the source) are computed
        once per value: ACDC's blocks of rows patch one node over many spans."""
        key = (str(op.upstream), op.upstream_head, op.select.batch, op.method, op.source)
        here = self.live.get(str(op.upstream))
        hit = self.edge_deltas.get(key)
        if hit is not None and hit[0] is here:  # the same live value: the same delta
            return hit[1]
        arch = self.plan.info.arch
        assert arch is not None

        def out_proj(layer: int) -> torch.Tensor:
            if layer not in self.out_projs:
                name = f"{arch.layers}.{layer}.{arch.attn_out_proj}"
                self.out_projs[layer] = projection_weight(self.model.get_submodule(name))
            return self.out_projs[layer]

        here_, there, w_o = edge_operands(op, self.live, self.state.captures, out_proj)
        mine = block_rows(op, self._node_output(here_, op.upstream_head, w_o))
        other = None
        if there is not None:
            there = there.to(device=here_.device, dtype=here_.dtype)  # no copy when already so
            other = self._node_output(there, op.upstream_head, w_o)
        delta = delta_of_outputs(op, mine, other)
        self.edge_deltas[key] = (here_, delta)
        return delta

    def _node_output(
        self, value: torch.Tensor, head: int | None, w_o: torch.Tensor | None
    ) -> torch.Tensor:
        """:func:`interventions.apply.node_output`, once per value and head."""
        key = (id(value), head)
        hit = self.node_outputs.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        out = node_output(value, head, w_o)
        self.node_outputs[key] = (value, out)
        return out

    def _view_in(self, point: HookPoint, x: torch.Tensor) -> torch.Tensor:
        if point.view == "heads":
            n = self.plan.info.n_heads
            assert n is not None
            return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)
        if point.view == "tokens":  # one row per token -> (batch, pos, width)
            return x.reshape(-1, self.clock.length, x.shape[-1])
        return x

    def _view_out(self, point: HookPoint, x: torch.Tensor) -> torch.Tensor:
        if point.view == "heads":
            return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
        if point.view == "tokens":
            return x.reshape(-1, x.shape[-1])
        return x

    def _output_hook(self, point: HookPoint) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if point.view == "attn_weights":
                if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                    raise ExecutionError(
                        f"{point.module} returned no attention weights; eager attention is needed"
                    )
                self._process(point, output[1])
                return output
            if point.view == "expert_out":
                return self._experts(point, module, args, output)
            x = get_plain(output)
            new = self._view_out(point, self._process(point, self._view_in(point, x)))
            return output if new is x else set_plain(output, new)

        return hook

    def _input_hook(self, point: HookPoint) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> Any:
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
                new = self._view_out(point, self._process(point, self._view_in(point, x)))
                if point.view == "resid" and new is not x:
                    # the residual connection holds this very tensor: write into it
                    x.copy_(new)
                    return None
                return None if new is x else ((new, *args[1:]), kwargs)
            for key in ("hidden_states", "input", "x", "input_ids", "inputs_embeds"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    x = kwargs[key]
                    new = self._view_out(point, self._process(point, self._view_in(point, x)))
                    if point.view == "resid" and new is not x:
                        x.copy_(new)
                        return None
                    return None if new is x else (args, {**kwargs, key: new})
            raise ExecutionError(f"{point.module or 'the model'} was called with no tensor input")

        return hook

    def _clock_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        for key in ("input_ids", "inputs_embeds"):
            if x is None and isinstance(kwargs.get(key), torch.Tensor):
                x = kwargs[key]
        self.clock.advance(int(x.shape[1]) if x is not None and x.ndim >= 2 else 1)

    def __enter__(self) -> _Hooks:
        hooked: set[tuple[str, str]] = set()  # (module, side) of every op's hook
        try:
            self.handles.append(
                self.model.register_forward_pre_hook(self._clock_hook, with_kwargs=True)
            )
            for name in self.qkv_entries:
                module = self.model.get_submodule(name)
                self.handles.append(module.register_forward_hook(self._qkv_hook(name)))
                hooked.add((name, "output"))
            for name in self.router_entries:
                module = self.model.get_submodule(name)
                self.handles.append(module.register_forward_hook(self._router_hook(name)))
                hooked.add((name, "output"))
            for point in self.points:
                if point.module in self.qkv_entries or point.view in ROUTER_VIEWS:
                    continue
                module = self.model.get_submodule(point.module) if point.module else self.model
                if point.view == "attn_scores":
                    self._scores_hooks(point, module)
                    hooked.add((point.module, "output"))  # its last hook: the forward hook
                elif point.io == "output":
                    self.handles.append(module.register_forward_hook(self._output_hook(point)))
                    hooked.add((point.module, "output"))
                else:
                    self.handles.append(
                        module.register_forward_pre_hook(self._input_hook(point), with_kwargs=True)
                    )
                    hooked.add((point.module, "input"))
            # after the block's own input hooks (resid_pre), so the per-head inputs start
            # from the block input as edited in this run: pre-hooks run in registration order
            arch = self.plan.info.arch
            for layer in sorted({p.layer for p in self.points if p.layer is not None}):
                assert arch is not None
                block = self.model.get_submodule(f"{arch.layers}.{layer}")
                self.handles.append(
                    block.register_forward_pre_hook(self._block_input_hook(layer), with_kwargs=True)
                )
            # last, so each runs after every other hook on its module
            self.untaken = hooked if self._may_stop_early() else set()
            for module_name, side in sorted(self.untaken):
                module = self.model.get_submodule(module_name)
                tracker = self._tracker((module_name, side))
                self.handles.append(
                    module.register_forward_hook(tracker)
                    if side == "output"
                    else module.register_forward_pre_hook(tracker)
                )
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for cleanup in self.cleanups:
            cleanup()
        self.cleanups.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def finish(self) -> None:
        """Turn per-step tensors into results (reads: concatenated over steps, then selected)."""
        self.state.results.update(self.selected)
        reads = {op.name: op for op in self.plan.ops_of(self.run) if isinstance(op, Read)}
        for name, parts in self.recorded.items():
            op = reads.get(name)
            if op is None:  # SAE features: recorded already selected, one step
                self.state.results[name] = parts[0]
                continue
            full = self._concat(op.site, parts)
            select = op.select
            if self.generating:  # negative positions count from the end of the prompt
                select = absolute_select(select, self.prompt, self.fed)
            self.state.results[name] = take(full, select, site_axes(op.site.kind, full.ndim))
        for key, parts in self.captures.items():
            site = next(s for s in self.plan.captures_of(self.run) if str(s) == key)
            self.state.captures[(self.run, key)] = self._concat(site, parts)

    def _concat(self, site: Site, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1:
            return parts[0]
        axes = site_axes(site.kind, parts[0].ndim)
        return torch.cat(parts, dim=axes.index("pos") if "pos" in axes else 1)


def _forward(
    model: nn.Module, info: ModelInfo, plan: Plan, run: str, grad: bool
) -> torch.Tensor | None:
    inputs = plan.inputs[run]
    graph_run = plan.graph.runs[run]
    device = input_device(model)
    context = contextlib.nullcontext() if grad else torch.no_grad()
    with context:
        if graph_run.inputs is not None:
            model(inputs.to(device))
            return None
        ids = inputs.to(device)
        if graph_run.max_new_tokens is not None:
            # logits_to_keep=0: HF generate otherwise computes the prompt pass's logits at
            # the last position only, and the `logits` site would not see the prompt.
            keep = {"logits_to_keep": 0} if accepts(model, "logits_to_keep") else {}
            with seeded(graph_run.sampling):
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=generation_config(
                        graph_run.max_new_tokens, graph_run.sampling
                    ),
                    **keep,
                )
            return out[:, ids.shape[1] :].cpu()
        if info.is_hf:
            model(input_ids=ids, use_cache=False, **logits_kwargs(model, plan.logits_to_keep(run)))
        else:
            model(ids)
    return None


class TorchHooksBackend:
    """Plain PyTorch forward hooks. The oracle for every other backend."""

    name = "torch"
    capabilities = Capabilities(
        # grad ops: lowered to grad=True reads by the core (interventions.gradients)
        ops=frozenset(OP_KINDS) - {"grad"},
        views=frozenset(
            {
                "plain",
                "heads",
                "attn_weights",
                "attn_scores",
                "logits",
                "resid",
                "tokens",
                "router_logits",
                "router_choice",
                "expert_out",
                *QKV_VIEWS,
                *SPLIT_VIEWS,
            }
        ),
        generation=True,
        gradients=True,
        remote=False,
        raw_modules=True,
        sae_source=True,
    )

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def execute(self, plan: Plan, model: nn.Module, **options: Any) -> dict[str, torch.Tensor]:
        grad = bool(options.pop("grad", False))
        show = options.pop("progress", None)
        if options:
            raise InterventionError(
                f"torch backend: unknown options {sorted(options)}; valid: grad, progress"
            )
        state = RunState(plan)
        generated: dict[str, torch.Tensor] = {}
        needs_eager = any(op.site.name in ("attn_pattern", "attn_scores") for op in plan.graph.ops)
        with eager_attention(model, needs_eager):
            for run in progress(plan.order, show, desc="runs (torch)"):
                hooks = _Hooks(model, plan, run, state, grad)
                try:
                    with hooks:
                        tokens = _forward(model, plan.info, plan, run, grad)
                except _AllTaken:
                    tokens = None
                except InterventionError:
                    raise
                except Exception as exc:
                    raise ExecutionError(f"run {run!r} failed on the torch backend: {exc}") from exc
                hooks.finish()
                if tokens is not None:
                    generated[f"{run}.generated"] = tokens
        results = {
            name: state.results[name] for name in plan.graph.reads() if name in state.results
        }
        results.update(generated)
        if not grad:
            results = {k: v.detach().cpu() for k, v in results.items()}
        return results
