"""Edge attribution patching (EAP) and its integrated-gradients form (EAP-IG).

EAP scores an edge ``u -> d`` by the first-order change of the metric when the edge is
patched from the corrupt run: ``(out_u(corrupt) - out_u(clean)) . grad_d``, where
``grad_d`` is the gradient of the metric (the batch mean) with respect to the downstream
input ``d`` alone, on the clean run, summed over prompts and positions (Syed et al. 2023).
EAP-IG (Hanna et al. 2024) averages ``grad_d`` over ``steps`` points on the straight
line between the corrupt and the clean token embeddings, ``alpha = 1/steps, ..., 1``;
with ``steps=1`` that is the clean point alone, and EAP-IG is EAP.

Both are graphs on any backend with gradients, remote NDIF included, in two passes of
the model: the corrupt run's upstream outputs (``resid_pre`` at 0, ``head``,
``mlp_out``), then the gradient pass of ``grad`` ops, whose backward pass runs where the
model runs, and whose last point is the clean run itself and also gives the clean
upstream outputs. Gradients are taken at the MLP's and the final norm's inputs (their
norms' inputs, not the residual stream), and at each head's q, k and v, from which the
gradient at each head's own copy of its input follows here by the vector-Jacobian
product of its norm and projection. An EAP-IG point's token embeddings are
``alpha * clean + (1 - alpha) * corrupt`` (a ``scale`` and an ``add``). The head outputs
and that product use the model's weights, so a remote run takes the model object, not
just its name.

>>> import torch, transformers
>>> from interventions.recipes import Metric
>>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20)
>>> model = transformers.GPT2LMHeadModel(cfg).eval()
>>> c = edge_attribution(model, [[1, 2, 3]], [[1, 4, 3]], Metric.logit(5))
>>> len(c.edges), c.method
(13, 'eap')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from interventions.architectures import ModelInfo, describe
from interventions.attention import projection_weight, qkv_view
from interventions.circuits.circuit import Circuit
from interventions.circuits.edges import (
    Edge,
    Node,
    all_edges,
    all_nodes,
    downstream_site,
    upstream_site,
)
from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.metrics import Metric
from interventions.sites import Site


def _tokens(value: Any, what: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.ndim != 2 or t.is_floating_point():
        raise SpecError(f"{what}: expected token ids [prompts, positions], got {tuple(t.shape)}")
    return t


def _check_backend(backend: str) -> None:
    from interventions.recipes._grads import require_gradients

    require_gradients(backend, "edge attribution")


class _InputGrads:
    """The gradient of the metric at each downstream input, averaged over the points,
    ``[rows, prompts * positions * d_model]`` (one row per head), made when asked for.

    A raw input's (the MLP's, the final norm's) is kept as the grad pass gave it. A
    per-head input's is the vector-Jacobian product of ``x_h -> norm(x_h) @ W_h`` at the
    block's input ``x`` of each point, of the gradient at that head's q/k/v: only the
    small q/k/v gradients and block inputs are kept, and a layer's per-head input
    gradients (``[prompts, positions, heads, d_model]``, one copy of the stream per head)
    are made for the layer being scored, its q, k and v inputs in one product.
    """

    def __init__(self, model: nn.Module, info: ModelInfo, downs: dict[str, Site], scale: float):
        self.model, self.info, self.downs, self.scale = model, info, downs, scale
        self.raw: dict[str, torch.Tensor] = {}  # summed over points, scaled
        # per point: the block inputs by layer and the q/k/v gradients by input name
        self.points: list[tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]] = []

    def add_point(
        self,
        xs: dict[int, torch.Tensor],
        raw: dict[str, torch.Tensor],
        qkv: dict[str, torch.Tensor],
    ) -> None:
        for name, grad in raw.items():
            g = grad.detach().float() * self.scale
            self.raw[name] = self.raw[name].add_(g) if name in self.raw else g
        if qkv:
            self.points.append(({k: v.detach() for k, v in xs.items()}, qkv))

    def n_rows(self, key: str) -> int:
        """How many rows an input has in :meth:`rows`: its heads, or 1."""
        site = self.downs[key]
        if site.is_raw:
            return 1
        n = self.info.n_heads or 1
        return n if site.name == "q_input" else (self.info.n_kv_heads or n)

    def rows(self, keys: Sequence[str]) -> torch.Tensor:
        """The inputs' gradients stacked, ``[rows, prompts * positions * d_model]``: an
        input's heads (one row for a raw input) in turn. A layer's q/k/v inputs in a row
        come from one product, as one block (no copy when that is all of ``keys``)."""
        blocks: list[torch.Tensor] = []
        i = 0
        while i < len(keys):
            site = self.downs[keys[i]]
            if site.is_raw:
                blocks.append(self.raw[keys[i]].reshape(1, -1))
                i += 1
                continue
            j = i
            while j < len(keys) and not self.downs[keys[j]].is_raw:
                if self.downs[keys[j]].layer != site.layer:
                    break
                j += 1
            assert site.layer is not None
            blocks.append(self._head_inputs(site.layer, keys[i:j]))
            i = j
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _head_inputs(self, layer: int, names: Sequence[str]) -> torch.Tensor:
        """The per-head input gradients of the inputs ``names`` of one layer, summed over
        the points, ``[heads, prompts * positions * d_model]`` (each input's heads in
        turn)."""
        info, arch = self.info, self.info.arch
        assert arch is not None
        norm = self.model.get_submodule(f"{arch.layers}.{layer}.{arch.attn_norm}")
        n = info.n_heads or 1
        dims = {"n_heads": n, "n_kv_heads": info.n_kv_heads or n, "d_head": info.d_head or 1}
        weights = []
        for name in names:
            point = self.info.hook_point(Site(self.downs[name].name.removesuffix("_input"), layer))
            w = projection_weight(self.model.get_submodule(point.module)).detach()
            weights.append(qkv_view(w, point.view, **dims).float())  # [d_model, head, d_head]
        w_all = weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)
        total: torch.Tensor | None = None
        for xs, grads in self.points:
            x = xs[layer].detach().float().to(w_all.device)
            g_out = torch.cat([grads[name].float().to(w_all.device) for name in names], dim=-2)
            # the cotangent at each head's copy of the norm's output, head-major:
            # [heads, b, p, d_model] (one batched product over the heads)
            cot = torch.einsum("bphe,dhe->hbpd", g_out, w_all)
            with torch.enable_grad():
                heads = x.unsqueeze(0).expand(cot.shape[0], *x.shape).clone().requires_grad_()
                (g,) = torch.autograd.grad(norm.forward(heads), heads, cot)
            total = g if total is None else total.add_(g)
        assert total is not None
        return total.mul_(self.scale).reshape(total.shape[0], -1)


def _down_key(edge: Edge) -> tuple[str, int | None]:
    """(read name, head) of an edge's downstream input."""
    d = edge.downstream
    if d.kind == "head":
        return f"in.{edge.input}.{d.layer}", d.head
    return (f"in.mlp.{d.layer}" if d.kind == "mlp" else "in.logits"), None


def _forward_key(node: Node) -> tuple[int, int, int]:
    """Where a node writes, in forward order: the embeddings, then per layer its heads and
    its MLP."""
    if node.kind == "embed":
        return (-1, 0, 0)
    assert node.layer is not None
    return (node.layer, 0, node.head or 0) if node.kind == "head" else (node.layer, 1, 0)


def _differences(
    model: nn.Module,
    info: ModelInfo,
    ups: Sequence[Node],
    clean: dict[str, torch.Tensor],
    corrupt: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``out_u(corrupt) - out_u(clean)`` of each upstream node ``ups`` (in forward order),
    ``[nodes, prompts * positions * d_model]``: the differences are taken at the sites, and
    a layer's heads go through their output projection in one product."""
    arch = info.arch
    assert arch is not None
    out: torch.Tensor | None = None
    i = 0
    while i < len(ups):
        node = ups[i]
        site = str(upstream_site(info, node))
        diff = corrupt[site].float() - clean[site].float().to(corrupt[site].device)
        if node.kind == "head":
            j = i
            while j < len(ups) and ups[j].kind == "head" and ups[j].layer == node.layer:
                j += 1
            heads = [u.head for u in ups[i:j]]
            o_proj = model.get_submodule(f"{arch.layers}.{node.layer}.{arch.attn_out_proj}")
            w_o = projection_weight(o_proj).detach().float().to(diff.device)
            w_o = w_o.unflatten(0, (-1, diff.shape[-1]))  # [head, d_head, d_model]
            if len(heads) != w_o.shape[0]:
                index = torch.tensor(heads, device=diff.device)
                diff, w_o = diff.index_select(-2, index), w_o.index_select(0, index)
            rows = torch.einsum("bphe,hed->hbpd", diff, w_o).flatten(1)
        else:
            j, rows = i + 1, diff.reshape(1, -1)
        if out is None:
            out = torch.empty(len(ups), rows.shape[1], device=rows.device)
        out[i:j] = rows
        i = j
    assert out is not None
    return out


def _scores(
    edge_list: Sequence[Edge] | None,
    reps: Sequence[tuple[Edge, int]],
    diffs: torch.Tensor,
    ups: Sequence[Node],
    grads: _InputGrads,
) -> list[float]:
    """``(corrupt - clean) . grad`` summed over prompts, positions and the model width, for
    every edge, as matrix products: the upstream nodes feeding an input come first in
    forward order (a slice, no copy), and the inputs that need the same slice (a layer's
    q, k and v inputs, all heads) are one product.

    ``edge_list=None`` means every edge of the model in :func:`all_edges` order (``reps``:
    its first edge into each input, in order, with the input's number of edges): each
    table, flattened, is then the scores of its edges in that order, with no per-edge
    bookkeeping."""
    index = {u: i for i, u in enumerate(ups)}
    by_input: dict[str, list[tuple[int, int, int]]] = {}
    by_slice: dict[int, list[str]] = {}
    if edge_list is None:
        for e, n_up in reps:  # an input reads the first n_up nodes, in forward order
            key, head = _down_key(e)
            if head:  # one key per input, all its heads
                continue
            by_slice.setdefault(n_up, []).append(key)
    else:
        for i, e in enumerate(edge_list):
            key, head = _down_key(e)
            by_input.setdefault(key, []).append((i, index[e.upstream], head or 0))
        for key, rows in by_input.items():
            by_slice.setdefault(1 + max(u for _, u, _ in rows), []).append(key)
    tables: list[torch.Tensor] = []
    out = torch.empty(0 if edge_list is None else len(edge_list), dtype=torch.float32)
    for n_up, keys in by_slice.items():
        # every head of every input here, one row each: [rows, N * d_model]
        stacked = grads.rows(keys)
        # one matrix product (an einsum over two axes is many times slower on CPU)
        table = (stacked.to(diffs.device) @ diffs[:n_up].T).cpu()  # [rows, n_up]
        del stacked
        if edge_list is None:
            tables.append(table.flatten())
            continue
        edge_ids, row_ids, up_ids = [], [], []
        offset = 0
        for k in keys:
            for i, u, h in by_input[k]:
                edge_ids.append(i)
                row_ids.append(offset + h)
                up_ids.append(u)
            offset += grads.n_rows(k)
        out[torch.tensor(edge_ids)] = table[torch.tensor(row_ids), torch.tensor(up_ids)]
    return (torch.cat(tables) if edge_list is None else out).tolist()


def _down_grads(
    model: nn.Module,
    info: ModelInfo,
    ids: torch.Tensor,
    e_bad: torch.Tensor,
    alphas: Sequence[float],
    downs: dict[str, Site],
    up_sites: Sequence[Site],
    metric: Metric,
    pos: int,
    backend: str,
    run_options: dict[str, Any],
) -> tuple[_InputGrads, dict[str, torch.Tensor]]:
    """The gradient of the metric (the prompts' mean) at each downstream input, averaged
    over the points ``alphas`` (:class:`_InputGrads`), and the clean run's upstream values
    (read at the last point, which is the clean run itself): grad ops, so it runs where the
    model runs (NDIF too). A per-head input's gradient comes from its head's q/k/v
    gradient and the block's input; the MLP's and final norm's inputs are grad ops of
    their own."""
    arch = info.arch
    assert arch is not None
    g = Graph()
    last = len(alphas) - 1
    for k, alpha in enumerate(alphas):
        r = g.run(f"point{k}", tokens=ids)
        if k != last:  # alpha * clean + (1 - alpha) * corrupt token embeddings
            r.scale("embed", factor=alpha)
            r.add("embed", direction=e_bad, scale=1.0 - alpha)
        inputs_read: set[int] = set()
        for name, site in downs.items():
            if site.is_raw:
                r.grad(site, metric=metric, metric_pos=pos, name=f"point{k}.{name}")
                continue
            part = Site(site.name.removesuffix("_input"), site.layer)
            r.grad(part, metric=metric, metric_pos=pos, name=f"point{k}.{name}")
            assert site.layer is not None
            if site.layer not in inputs_read:
                inputs_read.add(site.layer)
                r.read(
                    f"{arch.layers}.{site.layer}.{arch.attn_norm}.input",
                    name=f"point{k}.x.{site.layer}",
                )
        if k == last:
            for site in up_sites:
                r.read(site, name=f"clean.{site}")
    res = run(g, model, backend=backend, **run_options)
    grads = _InputGrads(model, info, downs, 1.0 / (len(alphas) * ids.shape[0]))
    for k in range(len(alphas)):
        raw = {n: res[f"point{k}.{n}"] for n, site in downs.items() if site.is_raw}
        qkv = {n: res[f"point{k}.{n}"] for n, site in downs.items() if not site.is_raw}
        layers = {s.layer for s in downs.values() if not s.is_raw and s.layer is not None}
        grads.add_point({i: res[f"point{k}.x.{i}"] for i in layers}, raw, qkv)
    clean = {str(s): res[f"clean.{s}"].detach() for s in up_sites}
    return grads, clean


def edge_attribution(
    model: nn.Module,
    clean: torch.Tensor | Sequence[Sequence[int]],
    corrupt: torch.Tensor | Sequence[Sequence[int]],
    metric: Metric,
    *,
    steps: int | None = None,
    pos: int = -1,
    edges: Sequence[Edge] | None = None,
    backend: str = "torch",
    **run_options: Any,
) -> Circuit:
    """Score every edge (or ``edges``) by EAP, or by EAP-IG with ``steps`` points.

    ``clean`` and ``corrupt``: token ids of one shape ``[prompts, positions]``, paired
    row by row. ``metric``: of the logits at ``pos`` (``logit_diff``, ``logit``, ``prob``,
    ``logprob``), averaged over prompts. A score is the estimated change of that mean
    when the edge alone is patched from the corrupt run; refused up front, by name, on a
    backend without gradients.
    """
    _check_backend(backend)
    if metric.kind == "kl":
        raise SpecError("edge attribution needs a metric of the logits alone, not 'kl'")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise SpecError(f"steps must be a positive int (or None for EAP), got {steps!r}")
    ids, bad = _tokens(clean, "clean"), _tokens(corrupt, "corrupt")
    if ids.shape != bad.shape:
        raise SpecError(
            f"clean {tuple(ids.shape)} and corrupt {tuple(bad.shape)} token ids must have one "
            "shape: prompts are paired row by row and position by position"
        )
    info = describe(model)
    edge_list = list(all_edges(info) if edges is None else edges)
    if not edge_list:
        raise SpecError("edges=: no edges to score (None scores every edge of the model)")
    every = edges is None  # all_edges' order: scored with no per-edge bookkeeping
    ups = all_nodes(info)[:-1] if every else sorted({e.upstream for e in edge_list})
    up_sites = sorted({upstream_site(info, u) for u in ups}, key=str)

    # pass 1: the corrupt run's upstream outputs and token embeddings
    g = Graph()
    r = g.run("corrupt", tokens=bad)
    r.read("embed", name="corrupt.embed")
    for site in up_sites:
        r.read(site, name=f"corrupt.{site}")
    first = run(g, model, backend=backend, **run_options)

    # pass 2: gradients of the metric wrt each downstream input, at each point; the last
    # point is the clean run itself, exactly, and gives the clean upstream outputs too
    alphas = [1.0] if steps is None else [k / steps for k in range(1, steps + 1)]
    downs: dict[str, Site] = {}
    if every:  # each input's edges in a row, the first from the embeddings
        starts = [i for i, e in enumerate(edge_list) if e.upstream.kind == "embed"]
        ends = [*starts[1:], len(edge_list)]
        reps = [(edge_list[a], b - a) for a, b in zip(starts, ends, strict=True)]
    else:  # one per input
        firsts = {(e.downstream, e.input): e for e in edge_list}.values()
        reps = [(e, 0) for e in firsts]
    for e, _ in reps:
        site, _ = downstream_site(info, e)
        downs[_down_key(e)[0]] = site
    grads, clean_values = _down_grads(
        model, info, ids, first["corrupt.embed"], alphas, downs, up_sites, metric, pos,
        backend, run_options,
    )  # fmt: skip
    ups_fwd = sorted(ups, key=_forward_key)
    corrupt_values = {str(s): first[f"corrupt.{s}"] for s in up_sites}
    diffs = _differences(model, info, ups_fwd, clean_values, corrupt_values)
    del clean_values, corrupt_values
    scores = _scores(None if every else edge_list, reps, diffs, ups_fwd, grads)
    method = "eap" if steps is None else f"eap_ig(steps={steps})"
    return Circuit(tuple(edge_list), tuple(scores), method)
