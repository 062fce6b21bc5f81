"""What each op does to a tensor: the reference semantics, in plain torch.

Local adapters call :func:`apply_op` on the tensor they find at a site; the nnsight
adapter re-states the same arithmetic inside its traces (which must not import this
package when they run on a remote host), and the conformance suite holds it to this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from interventions.errors import ExecutionError
from interventions.ops import (
    Ablate,
    Add,
    Const,
    EdgePatch,
    FeatureEdit,
    Grad,
    Op,
    Patch,
    ProjectOut,
    Read,
    SAESplice,
    Scale,
)
from interventions.plan import Plan, resample_indices
from interventions.sae import SAE, sae_from_parts
from interventions.selection import put, put_, take
from interventions.sites import Select, Span
from interventions.spec import GraphSpec


@dataclass
class RunState:
    """What ops need from outside their own tensor while a graph executes."""

    plan: Plan
    results: dict[str, torch.Tensor] = field(default_factory=dict)  # reads so far
    captures: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (run, site)
    _saes: dict[str, SAE] = field(default_factory=dict)

    @property
    def graph(self) -> GraphSpec:
        return self.plan.graph

    def sae(self, key: str) -> SAE:
        if key not in self._saes:
            spec = self.graph.saes[key]
            tensors = {param: self.graph.tensors[k] for param, k in spec.tensors}
            self._saes[key] = sae_from_parts(spec.kind, tensors, dict(spec.params))
        return self._saes[key]

    def const(self, c: Const, like: torch.Tensor) -> torch.Tensor:
        return self.graph.tensors[c.tensor].to(device=like.device, dtype=like.dtype)


def edit_features(f: torch.Tensor, edits: Sequence[FeatureEdit]) -> torch.Tensor:
    """Apply feature edits in order to activations ``f`` [..., d_sae]."""
    if not edits:
        return f
    f = f.clone()
    for edit in edits:
        idx = list(edit.features)
        if edit.mode == "set":
            assert edit.value is not None
            f[..., idx] = edit.value
        elif edit.mode == "scale":
            assert edit.value is not None
            f[..., idx] = f[..., idx] * edit.value
        else:
            f[..., idx] = f[..., idx].clamp(min=edit.low, max=edit.high)
    return f


def sae_splice(
    x: torch.Tensor, sae: SAE, op: SAESplice, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``x`` through the SAE with edits; returns (new x, unedited features).

    The SAE runs in float32 whatever the model's dtype, and the result is cast back. What
    is written is the SAE's ``reconstruct(f, x)`` (which undoes an input rescaling and adds
    a skip transcoder's skip path), or ``decode(f)`` for an SAE that has no ``reconstruct``.
    With ``source`` (a cross-site splice: the same selection of the source site) the SAE
    encodes ``source`` instead of ``x``; the error term is still ``x - reconstruction``.
    A splice with the error kept and no edits writes ``x`` itself when no gradient is
    being recorded (what it equals), so recording features costs only the encoder.
    """
    x32 = x.float()
    src32 = x32 if source is None else source.to(device=x.device).float()
    sae32 = sae.to(device=x.device, dtype=torch.float32)  # type: ignore[attr-defined]
    f = sae32.encode(src32)
    if op.error == "keep" and not op.edits and not torch.is_grad_enabled():
        # recon + (x - recon) is x: without gradients only the features are needed (no
        # decode; the value is x exactly instead of to rounding)
        return x, f
    reconstruct = getattr(sae32, "reconstruct", None)

    def written(h: torch.Tensor) -> torch.Tensor:
        return reconstruct(h, src32) if reconstruct is not None else sae32.decode(h)

    recon = written(edit_features(f, op.edits))
    if op.error == "drop":
        out = recon
    else:
        err = x32 - (recon if not op.edits else written(f))
        out = recon + (err.detach() if op.error == "detach" else err)
    return out.to(x.dtype), f


def orthonormal_basis(direction: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns ``[d, r]`` spanning ``direction`` ([d] or [k, d] rows).

    Rank-deficient inputs (parallel rows, zero rows) span only what they span: the
    singular vectors below a relative tolerance are dropped, so a zero direction gives an
    empty basis and projecting it out changes nothing.

    >>> orthonormal_basis(torch.tensor([[1.0, 0.0], [2.0, 0.0]])).shape
    torch.Size([2, 1])
    """
    d = direction.detach().to(torch.float64)
    basis = d.reshape(1, -1) if d.ndim == 1 else d
    u, s, _ = torch.linalg.svd(basis.T, full_matrices=False)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return u[:, :0].float()
    keep = s > s.max() * max(basis.shape) * torch.finfo(torch.float32).eps
    return u[:, keep].float()


def project_out(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Remove from ``x`` its component in the span of ``direction`` ([d] or [k, d])."""
    q = orthonormal_basis(direction).to(x.device)
    x32 = x.float()
    return (x32 - (x32 @ q) @ q.T).to(x.dtype)


def ablation_value(
    op: Ablate, x: torch.Tensor, axes: Sequence[str], state: RunState
) -> torch.Tensor:
    """The full-size replacement tensor for an ablation of ``x``."""
    if op.method == "zero":
        return torch.zeros_like(x)
    assert op.source is not None
    src = state.captures[(op.source, str(op.site))].to(device=x.device, dtype=x.dtype)
    if op.method == "mean":
        dims = (0,) if op.per_position else (0, 1)
        return src.mean(dim=dims, keepdim=True).expand_as(x)
    idx = resample_indices(op.seed, x.shape[0], src.shape[0]).to(src.device)
    return src[idx].expand_as(x)


def apply_op(
    op: Op,
    x: torch.Tensor,
    axes: Sequence[str],
    select: Select,
    state: RunState,
    recorded: Mapping[str, torch.Tensor] | None = None,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply one op to the full tensor ``x`` at its site, narrowed by ``select``.

    Returns the new tensor and anything recorded (reads, SAE features). ``select`` is the
    op's selector, possibly rewritten for one generation step. With ``inplace`` the op
    writes into ``x`` and returns it: for a caller that owns ``x`` (it cloned the module's
    tensor once for all the ops at one hook, instead of a copy per op).
    """

    def write(value: torch.Tensor) -> torch.Tensor:
        if inplace:
            put_(x, select, axes, value)
            return x
        return put(x, select, axes, value)

    if isinstance(op, Read):
        return x, {op.name: take(x, select, axes)}
    if isinstance(op, Grad):  # the forward is unchanged; see interventions.gradients
        return x, {}
    if isinstance(op, Patch):
        if isinstance(op.value, Const):
            return write(state.const(op.value, x)), {}
        value = state.results[op.value.read].to(device=x.device, dtype=x.dtype)
        if state.plan.aligned(op.value.read):  # a read of the whole site: take the same entries
            value = take(value, select, axes)
        return write(value), {}
    if isinstance(op, Ablate):
        full = ablation_value(op, x, axes, state)
        return write(take(full, select, axes)), {}
    region = take(x, select, axes)
    recorded_out: dict[str, torch.Tensor] = {}
    if isinstance(op, Add):
        new = region + op.scale * state.const(op.direction, region)
    elif isinstance(op, ProjectOut):
        new = project_out(region, state.graph.tensors[op.direction.tensor].to(region.device))
    elif isinstance(op, Scale):
        new = region * op.factor
    elif isinstance(op, SAESplice):
        source = None
        if op.source is not None:
            captured = state.captures.get((op.run, str(op.source)))
            if captured is None:
                raise ExecutionError(
                    f"sae_splice on {op.run}.{op.site}: its source {op.source} was not reached "
                    f"before {op.site} in the forward pass; the source must come first"
                )
            source = take(captured, select, axes)
        new, feats = sae_splice(region, state.sae(op.sae), op, source)
        if op.features is not None:
            recorded_out[op.features] = feats
    else:  # pragma: no cover - the op set is closed
        raise AssertionError(f"unknown op {op!r}")
    return write(new), recorded_out


def grad_metric(
    metric: str, logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor | None
) -> torch.Tensor:
    """Per prompt, the metric a ``grad`` op differentiates, of logits ``[batch, vocab]``
    (the run's logits at the op's ``metric_pos``), in float32.

    >>> grad_metric("logit_diff", torch.tensor([[0.5, 2.0, 0.0]]), torch.tensor([1]),
    ...             torch.tensor([0])).tolist()
    [1.5]
    """
    z = logits.float()
    rows = torch.arange(z.shape[0], device=z.device)

    def pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return values[rows, ids.to(values.device).expand(z.shape[0])]

    if metric == "prob":
        return pick(z.softmax(-1), answer)
    if metric == "logprob":
        return pick(z.log_softmax(-1), answer)
    value = pick(z, answer)
    return value - pick(z, wrong) if wrong is not None else value


def node_output(x: torch.Tensor, head: int | None, w_o: torch.Tensor | None) -> torch.Tensor:
    """An edge's upstream node output as the residual stream receives it, ``[..., d_model]``.

    ``x`` is the value at the node's site; for a head (``head`` set) it is the ``head``
    site ``[..., head, d_head]`` and the output is ``x[..., h, :] @ W_O[h]``, with ``w_o``
    the output projection's ``(n_heads * d_head, d_model)`` weight (no bias: the bias is
    no node's).

    >>> node_output(torch.ones(1, 2, 2), 1, torch.eye(4)).tolist()
    [[0.0, 0.0, 1.0, 1.0]]
    """
    if head is None:
        return x
    assert w_o is not None
    d_head = x.shape[-1]
    return x[..., head, :] @ w_o[head * d_head : (head + 1) * d_head].to(x.dtype)


def edge_operands(
    op: EdgePatch,
    live: Mapping[str, torch.Tensor],
    captures: Mapping[tuple[str, str], torch.Tensor],
    out_proj: Callable[[int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(here, there, w_o)`` for :func:`apply_edge_patch`: this run's live value of the
    edge's upstream node, the source run's captured one (``None`` for zero), and for a head
    its layer's output projection weight (``out_proj(layer)``, as the backend finds it)."""
    here = live.get(str(op.upstream))
    if here is None:
        raise ExecutionError(
            f"edge_patch on {op.run}.{op.site}: its upstream {op.upstream} had not run when "
            "the downstream input was reached; an edge must run forward"
        )
    there = None if op.source is None else captures[(op.source, str(op.upstream))]
    w_o = None
    if op.upstream.name == "head":
        assert op.upstream.layer is not None
        w_o = out_proj(op.upstream.layer)
    return here, there, w_o


def block_rows(op: EdgePatch, x: torch.Tensor) -> torch.Tensor:
    """``x``'s rows that the edge patch ``op`` edits: its block (``select.batch``) or all."""
    rows = op.select.batch
    if rows is None:
        return x
    assert isinstance(rows, Span), rows  # the planner gives an edge patch a Span, nothing else
    return x[rows.start : rows.stop : rows.step]


def edge_delta(
    op: EdgePatch,
    here: torch.Tensor,
    there: torch.Tensor | None,
    w_o: torch.Tensor | None,
) -> torch.Tensor:
    """What an edge patch adds to its downstream input: the upstream node's output in the
    source run (or zero, or the source's mean over rows and positions) minus its output
    ``here``, in this run.

    An op of a batched run (``select.batch``: its block of rows) takes its block of
    ``here``; a block of several runs' rows pairs each run's rows with the source's, row
    for row (the source keeps a pass of its own, see :mod:`interventions.batching`)."""
    here = block_rows(op, here)
    mine = node_output(here, op.upstream_head, w_o)
    other = None
    if there is not None:
        other = node_output(there.to(device=here.device, dtype=here.dtype), op.upstream_head, w_o)
    return delta_of_outputs(op, mine, other)


def delta_of_outputs(op: EdgePatch, mine: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """:func:`edge_delta` from the upstream node's outputs: ``mine`` in this run (its
    block of rows, :func:`block_rows`), ``other`` in the source (``None`` for ``zero``). A
    backend that patches many edges from one node computes those outputs once."""
    if op.method == "zero":
        return -mine
    assert other is not None
    if op.method == "mean":
        other = other.mean(dim=(0, 1), keepdim=True)
    elif other.shape[0] != mine.shape[0]:  # each block of the source's rows, no copies
        blocks = mine.unflatten(0, (mine.shape[0] // other.shape[0], other.shape[0]))
        return (other - blocks).flatten(0, 1)
    return other - mine


def apply_edge_patch(
    op: EdgePatch,
    x: torch.Tensor,
    axes: Sequence[str],
    here: torch.Tensor,
    there: torch.Tensor | None,
    w_o: torch.Tensor | None,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """The downstream input ``x`` with the edge's delta added to its selected head (or all
    of it, for an MLP's or the final norm's input). Out of place, or into ``x`` itself
    (``inplace``: for a caller that owns ``x``)."""
    return add_at(x, op.select, axes, edge_delta(op, here, there, w_o), inplace=inplace)


def add_at(
    x: torch.Tensor,
    select: Select,
    axes: Sequence[str],
    delta: torch.Tensor,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``x`` with ``delta`` added to its selected entries (out of place, or into ``x``):
    what edge patches write, one call for the summed deltas of several edges into one
    selection.

    >>> add_at(torch.zeros(1, 2, 2, 3), Select.make(head=1), ("batch", "pos", "head", "hidden"),
    ...        torch.ones(1, 2, 3))[0, :, :, 0].tolist()
    [[0.0, 1.0], [0.0, 1.0]]
    """
    region = take(x, select, axes)
    if inplace:
        put_(x, select, axes, region + delta.to(region.dtype))
        return x
    return put(x, select, axes, region + delta.to(region.dtype))
