"""The torch backend's hooks for the model's internals, as a mixin of its per-run hook
set (:class:`interventions.adapters.torch_hooks.backend._Hooks`): per-head q, k, v and their
per-head inputs at the attention projections, the pre-softmax scores inside an eager
attention forward, the block inputs the per-head inputs start from, and a mixture of
experts' router and expert outputs. Each hook hands its tensor to the hook set's
``_process``, which applies the run's ops, and writes back what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from interventions.architectures import HookPoint
from interventions.attention import (
    QKV_VIEWS,
    SPLIT_VIEWS,
    ScoresInterceptor,
    head_input_delta,
    projection_weight,
    qkv_view,
    split_input_delta,
)
from interventions.errors import ExecutionError
from interventions.ops import EdgePatch, Op
from interventions.plan import Plan
from interventions.routing import check_expert_ids, route, weights_for
from interventions.sites import Site, Span


@dataclass
class Entry:
    """An op (or a capture for another run's ablation) at one hook point."""

    op: Op | None
    site: Site
    buffers: list[torch.Tensor] = field(default_factory=list)  # per-step full tensors to keep
    live: bool = False  # a capture an edge patch of this same run needs, later in the pass


@dataclass
class StepClock:
    """Tracks which absolute positions the current forward call covers."""

    offset: int = 0
    length: int = 0
    calls: int = 0

    def advance(self, length: int) -> None:
        self.offset = self.offset + self.length if self.calls else 0
        self.length = length
        self.calls += 1


def _block(span: Span, rows: int) -> tuple[int, int]:
    """A step-1 span's ``(start, stop)`` among ``rows`` rows (validation allows no other)."""
    start, stop, step = slice(span.start, span.stop, span.step).indices(rows)
    assert step == 1, span
    return start, max(start, stop)


def runs_by_point(
    pairs: list[tuple[HookPoint, Entry]],
) -> list[tuple[HookPoint, list[Entry]]]:
    """Consecutive entries at one hook point as one group, in op order (so a run of ops at
    one view is applied together, and op order across views is kept)."""
    groups: list[tuple[HookPoint, list[Entry]]] = []
    for point, entry in pairs:
        if groups and groups[-1][0] == point:
            groups[-1][1].append(entry)
        else:
            groups.append((point, [entry]))
    return groups


def expert_outputs(experts: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each expert's output for each row of ``x`` (tokens, d_model), as transformers'
    fused ``*Experts`` computes it for the tokens routed to it: ``down(act(gate) * up)``
    with ``gate, up = gate_up_proj @ x`` halves. Returns (tokens, expert, d_model).
    """
    act: Callable[[torch.Tensor], torch.Tensor] = getattr(experts, "act_fn")  # noqa: B009
    gate_up = torch.einsum("nd,efd->nef", x, experts.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("nef,edf->ned", act(gate) * up, experts.down_proj)


def _expert_args(point: HookPoint, args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if len(args) != 3 or not all(isinstance(a, torch.Tensor) for a in args):
        raise ExecutionError(
            f"{point.module} was called without (hidden_states, top_k_index, top_k_weights) "
            "as positional arguments; expert_out needs transformers' fused experts module"
        )
    x, index, weights = args
    return x, index, weights


ROUTER_VIEWS = ("router_logits", "router_choice")


def get_plain(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    logits = getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ExecutionError(f"cannot find a tensor in a module output of type {type(value).__name__}")


def set_plain(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    if getattr(value, "logits", None) is not None:
        value["logits"] = new  # ModelOutput keeps attribute and key in step
        return value
    raise ExecutionError(
        f"cannot replace a tensor in a module output of type {type(value).__name__}"
    )


class InternalHooks:
    """The internals' hooks; the hook set that mixes them in owns the state below and
    ``_process`` (the run's ops at a hook point, applied to a tensor)."""

    model: nn.Module
    plan: Plan
    run: str
    grad: bool
    clock: StepClock
    handles: list[torch.utils.hooks.RemovableHandle]
    cleanups: list[Callable[[], None]]
    block_inputs: dict[int, torch.Tensor]
    split_copies: dict[HookPoint, tuple[int, torch.Tensor]]
    qkv_entries: dict[str, list[tuple[HookPoint, Entry]]]
    router_entries: dict[str, list[tuple[HookPoint, Entry]]]

    def _process(
        self, point: HookPoint, x: torch.Tensor, entries: list[Entry] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def _edge_delta(self, op: EdgePatch) -> torch.Tensor:
        raise NotImplementedError

    def _attn_norm(self, layer: int) -> nn.Module:
        """The attention norm of ``layer``: where each head's input copy goes first."""
        arch = self.plan.info.arch
        assert arch is not None and arch.attn_norm is not None
        return self.model.get_submodule(f"{arch.layers}.{layer}.{arch.attn_norm}")

    def _qkv(self, x: torch.Tensor, view: str) -> torch.Tensor:
        info = self.plan.info
        assert info.n_heads and info.n_kv_heads and info.d_head
        return qkv_view(
            x, view, n_heads=info.n_heads, n_kv_heads=info.n_kv_heads, d_head=info.d_head
        )

    def _qkv_hook(self, module_name: str) -> Callable[..., Any]:
        """One hook for every q/k/v and per-head-input op at a projection, in op order
        (q and q_input of GPT-2 share ``c_attn``): each run of ops at one view at a time."""

        groups = runs_by_point(self.qkv_entries[module_name])
        # a per-head input whose ops are all edge patches, in one group: no later ops at it
        # need its copies, so only the heads and rows the edges touch are computed
        points = [point for point, _ in groups]
        edges_only = {
            point
            for point, entries in groups
            if point.view in SPLIT_VIEWS
            and points.count(point) == 1
            and all(isinstance(e.op, EdgePatch) and not e.live for e in entries)
        }

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            x = get_plain(output)
            new = x
            for point, entries in groups:
                if point in edges_only and not self.grad:
                    new = self._split_edges(point, module, new, entries)
                else:
                    new = self._qkv_output(point, module, new, entries)
            return output if new is x else set_plain(output, new)

        return hook

    def _qkv_output(
        self, point: HookPoint, module: nn.Module, x: torch.Tensor, entries: list[Entry]
    ) -> torch.Tensor:
        """The projection output with the ops at a q/k/v site or a per-head input applied."""
        if point.view in QKV_VIEWS:
            part = self._qkv(x, point.view)
            new = self._process(point, part, entries)
            if new is part:
                return x
            out = x.clone()
            self._qkv(out, point.view).copy_(new)
            return out
        view = point.view.removeprefix("split_")
        assert point.layer is not None
        block_input = self.block_inputs[point.layer]
        heads = self._qkv(x, view).shape[-2]
        # the copies as earlier ops at this site in this forward call left them (ops at
        # another view of the projection may have come between)
        kept = self.split_copies.get(point)
        old = kept[1] if kept is not None and kept[0] == self.clock.calls else None
        copies = block_input.unsqueeze(-2).expand(*block_input.shape[:-1], heads, -1)
        copies = copies if old is None else old
        new = self._process(point, copies, entries)
        self.split_copies[point] = (self.clock.calls, new)
        if new is copies:
            return x
        info = self.plan.info
        norm = self._attn_norm(point.layer)
        assert info.n_heads and info.n_kv_heads and info.d_head
        delta = split_input_delta(
            norm,
            projection_weight(module),
            block_input,
            new,
            view,
            n_heads=info.n_heads,
            n_kv_heads=info.n_kv_heads,
            d_head=info.d_head,
            old=old,
        )
        out = x.clone()
        self._qkv(out, view).add_(delta.to(out.dtype))
        return out

    def _split_edges(
        self, point: HookPoint, module: nn.Module, x: torch.Tensor, entries: list[Entry]
    ) -> torch.Tensor:
        """The projection output with edge patches into a per-head input applied, head by
        head over the rows they patch: the same sums as :meth:`_qkv_output` (each head's
        copy plus its edges' deltas, through the norm and the head's weights), without the
        copies of every head and row."""
        view = point.view.removeprefix("split_")
        assert point.layer is not None
        block_input = self.block_inputs[point.layer]
        rows = block_input.shape[0]
        by_head: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for entry in entries:
            op = entry.op
            assert isinstance(op, EdgePatch) and isinstance(op.select.head, int)
            span = op.select.batch
            assert span is None or isinstance(span, Span), span  # validation allows no other
            start, stop = (0, rows) if span is None else _block(span, rows)
            if start < stop:
                by_head.setdefault(op.select.head, []).append((start, stop, self._edge_delta(op)))
        if not by_head:
            return x
        info = self.plan.info
        assert info.n_heads and info.n_kv_heads and info.d_head
        norm = self._attn_norm(point.layer)
        weights = qkv_view(
            projection_weight(module), view, n_heads=info.n_heads,
            n_kv_heads=info.n_kv_heads, d_head=info.d_head,
        )  # fmt: skip
        out = x.clone()
        target = self._qkv(out, view)
        for head, parts in by_head.items():
            lo, hi = min(p[0] for p in parts), max(p[1] for p in parts)
            change = torch.zeros_like(block_input[lo:hi])
            for start, stop, delta in parts:
                change[start - lo : stop - lo] += delta.to(change.dtype)
            d = head_input_delta(norm, weights[:, head], block_input[lo:hi], change)
            target[lo:hi, ..., head, :] += d.to(out.dtype)
        return out

    def _scores_hooks(self, point: HookPoint, module: nn.Module) -> None:
        """Hooks that hand the ops at ``attn_scores`` the tensor the attention module's
        eager forward softmaxes (:class:`ScoresInterceptor`, entered for that forward)."""
        active: list[ScoresInterceptor] = []

        def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
            mode = ScoresInterceptor(lambda x: self._process(point, x))
            mode.__enter__()
            active.append(mode)

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if not active:
                return
            mode = active.pop()
            mode.__exit__(None, None, None)
            if mode.calls != 1:
                raise ExecutionError(
                    f"{point.module} called softmax {mode.calls} times in one forward; the "
                    "attn_scores site needs eager attention, which calls it once"
                )

        def leave_all() -> None:  # a failed forward skips nothing: always_call hooks
            while active:
                active.pop().__exit__(None, None, None)

        self.handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        self.handles.append(module.register_forward_hook(leave, always_call=True))
        self.cleanups.append(leave_all)

    def _block_input_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            self.block_inputs[layer] = x

        return hook

    def _router_hook(self, module_name: str) -> Callable[..., Any]:
        """One hook for every ``router_logits`` and ``experts_chosen`` op at an MoE gate, in
        op order. The gate returns (logits, weights, ids), one row per token, already
        routed: a write re-runs the family's routing rule (new logits: new ids and weights;
        new ids: their weights under the gate's logits), so later ops see the new routing."""
        groups = runs_by_point(self.router_entries[module_name])

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, tuple) or len(output) != 3:
                raise ExecutionError(
                    f"{module_name} returned {type(output).__name__}, not the (router_logits, "
                    "routing_weights, expert_ids) of a transformers top-k router"
                )
            logits, weights, ids = output
            info, length, changed = self.plan.info, self.clock.length, False
            for point, entries in groups:
                at = 0 if point.view == "router_logits" else 2
                flat = (logits, weights, ids)[at]
                view = flat.reshape(-1, length, flat.shape[-1])
                new = self._process(point, view, entries)
                if new is view:
                    continue
                rule = info.routing
                assert rule is not None and info.top_k and info.n_experts  # validated
                changed = True
                if point.view == "router_logits":
                    logits = new.reshape(logits.shape).to(logits.dtype)
                    weights, ids = route(logits, rule, info.top_k)
                else:
                    check_expert_ids(
                        new, f"{self.run}.{entries[0].site}", info.n_experts, info.top_k
                    )
                    ids = new.reshape(ids.shape).to(ids.dtype)
                    weights = weights_for(logits, ids, rule)
            return (logits, weights, ids) if changed else output

        return hook

    def _experts(
        self, point: HookPoint, module: nn.Module, args: Any, output: torch.Tensor
    ) -> torch.Tensor:
        """``expert_out``: every expert's output for every token, recomputed from the fused
        weights; a write changes the block's output by each chosen expert's routing
        weight times the change to its output (unchosen experts' entries change nothing)."""
        x, index, weights = _expert_args(point, args)
        every = expert_outputs(module, x)  # (tokens, expert, d_model)
        view = every.reshape(-1, self.clock.length, *every.shape[1:])
        new = self._process(point, view)
        if new is view:
            return output
        n_experts = every.shape[1]
        chosen = index.clamp(max=n_experts - 1)  # an id of n_experts: no expert (padding)
        delta = (new.reshape(every.shape) - every).gather(
            1, chosen[..., None].expand(*index.shape, every.shape[-1])
        )  # (tokens, top-k slot, d_model): the chosen experts' changes
        weight = torch.where(index < n_experts, weights, torch.zeros_like(weights))
        return output + (delta * weight[..., None]).sum(1).to(output.dtype)
