"""``grad`` ops on a backend that keeps the autograd graph (``grad=True``): client-side.

A ``grad`` op (:class:`~interventions.ops.Grad`) asks for the gradient, at a site, of a
metric of its run's logits. A backend that lists ``"grad"`` in its capabilities' ops
(nnsight) computes it where the model runs, so it works remotely too. Any other backend
with ``gradients`` (torch, pyvene) gets it from here: each ``grad`` op becomes a read of
its site, each such run reads its logits at the metric's position, the graph runs with
``grad=True``, and the metric's gradient is taken with ``torch.autograd.grad``, one
backward pass per run. Both ways give one answer; the conformance tests hold them to it.

>>> import torch, transformers, interventions as iv
>>> from interventions.recipes import Metric
>>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2))
>>> g = iv.Graph()
>>> name = g.run("r", tokens=[[1, 2, 3]]).grad("resid_pre", 0, metric=Metric.logit(5))
>>> iv.run(g, model)[name].shape
torch.Size([1, 3, 8])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from interventions.apply import grad_metric
from interventions.errors import SpecError
from interventions.ops import Grad, Read, Scale
from interventions.results import Results
from interventions.serialize import fingerprint
from interventions.sites import Select, Site
from interventions.spec import GraphSpec

_INNER = "__grad_in__"
_LOGITS = "__grad_logits__"


def has_grads(graph: GraphSpec) -> bool:
    return any(isinstance(op, Grad) for op in graph.ops)


def refuse_streamed(graph: GraphSpec) -> None:
    """Chunked runs cut a run's prompts, and a grad op's token ids with them: refused."""
    if has_grads(graph):
        raise SpecError(
            "grad ops run on whole runs, not in chunks (chunk_size=, reduce=); give each run "
            "a batch of prompts instead"
        )


def by_autograd(graph: GraphSpec, run_grad: Callable[[GraphSpec], Results]) -> Results:
    """Run ``graph`` with its ``grad`` ops lowered to reads; ``run_grad`` runs a graph with
    ``grad=True`` (reads that stay in the autograd graph)."""
    grads = [op for op in graph.ops if isinstance(op, Grad)]
    lowered = type(graph)(tensors=dict(graph.tensors), saes=dict(graph.saes))
    lowered.runs.update(graph.runs)
    lowered.ops = [op for op in graph.ops if not isinstance(op, Grad)]
    # after every other op, so each read sees the value the rest of the forward sees; the
    # neutral scale makes that value a tensor of its own, which only the rest of the
    # forward uses (a raw '<norm>.input' is the norm's input, not the residual stream)
    for op in grads:
        lowered.ops.append(Scale(op.run, op.site, Select(), 1.0))
        lowered.ops.append(Read(op.run, op.site, op.select, _INNER + op.name))
    runs: dict[str, Grad] = {}
    for op in grads:
        if op.run not in runs:
            runs[op.run] = op
            logits = Read(op.run, Site("logits"), Select.make(pos=op.metric_pos), _LOGITS + op.run)
            lowered.ops.append(logits)
    res = run_grad(lowered)
    out = {name: res[name].detach() for name in graph.reads() if name in res}
    tensors = graph.tensors
    for name, first in runs.items():
        mine = [op for op in grads if op.run == name]
        wrong = None if first.wrong is None else tensors[first.wrong.tensor]
        metric = grad_metric(first.metric, res[_LOGITS + name], tensors[first.answer.tensor], wrong)
        inputs = [res[_INNER + op.name] for op in mine]
        # runs may share a batched forward (and values flow between runs): one backward
        # per run, each of its own metric, the graph kept for the next
        raw = torch.autograd.grad(metric.sum(), inputs, allow_unused=True, retain_graph=True)
        for op, x, grad in zip(mine, inputs, raw, strict=True):
            out[op.name] = (torch.zeros_like(x) if grad is None else grad).detach()
    provenance = replace(res.provenance, graph=fingerprint(graph))
    masks = {k: m for k in out if k in res and (m := res.mask(k)) is not None}
    return Results({k: out[k] for k in graph.reads() if k in out}, provenance, masks=masks)
