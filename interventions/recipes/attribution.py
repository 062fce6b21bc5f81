"""Input attribution: saliency, input x gradient and integrated gradients of a metric with
respect to the token embeddings, per token and per prompt, on every backend with gradients.

Each method is a graph of ``grad`` ops: the gradient of the metric at the ``embed`` site
(the token embedding module's output), taken where the model runs (in the nnsight trace,
remotely too) or client-side by ``torch.autograd`` (torch, pyvene); the logits are read
for the metric's values. Integrated gradients interpolates inside the graph:
each of its ``steps + 1`` points is a run that scales ``embed`` by ``alpha`` and adds
``(1 - alpha) * baseline``, so the model sees ``baseline + alpha * (x - baseline)``.

What ``embed`` is, per family (the standard definition, Inseq's and Captum's
``LayerIntegratedGradients`` on the embedding layer):

=============================  =========================================================
GPT-2                          ``transformer.wte`` output, before position embeddings
GPT-NeoX (Pythia)              ``gpt_neox.embed_in`` output (rotary positions, none added)
Llama, Mistral, Qwen2          ``model.embed_tokens`` output
Gemma                          ``model.embed_tokens`` output, before the model's
                               ``sqrt(d_model)`` scaling
=============================  =========================================================

Scores per token: ``saliency`` is the L2 norm of the gradient over the hidden dimension
(unsigned, as Inseq aggregates it); ``input_x_gradient`` and ``integrated_gradients`` sum
the attribution over the hidden dimension (signed), so a prompt's scores add up to the
method's estimate of the metric's change. Integrated gradients uses the trapezoidal rule
on ``alpha = 0, 1/steps, ..., 1``; its completeness error ``|sum - (metric(x) -
metric(baseline))|`` falls as ``1/steps**2`` and is reported per prompt.

Baselines: on a model with no additive position embeddings whose first op is a
scale-invariant norm (Llama, Mistral, Qwen2, Gemma, NeoX), the zero baseline's path is
flat for ``alpha > ~eps`` and jumps at ``alpha = 0`` (the norm of a zero vector), so
completeness then needs absurd ``steps``; use a token baseline (not a pad token whose
embedding is zero) there. GPT-2's position embeddings keep the zero path smooth.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> from interventions.recipes import Metric
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=20)).eval()
>>> a = input_attribution(model, [[1, 2, 3]], Metric.logit(4), steps=20)
>>> a.scores[0].shape, bool(a.completeness_error.max() < 1e-2)
(torch.Size([3]), True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from interventions.errors import SpecError, choices_text
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes._dataset import Batch, Dataset, batches
from interventions.recipes.inputs import _model
from interventions.recipes.metrics import Metric

Method = Literal["saliency", "input_x_gradient", "integrated_gradients"]
METHODS: tuple[str, ...] = ("saliency", "input_x_gradient", "integrated_gradients")


@dataclass(frozen=True, eq=False)
class InputAttribution:
    """Attributions of a metric to each prompt's token embeddings (prompts in input order)."""

    method: str
    tokens: tuple[tuple[int, ...], ...]
    attributions: tuple[torch.Tensor, ...]  # per prompt [len, d]
    scores: tuple[torch.Tensor, ...]  # per prompt [len]: one score per token
    metric_values: torch.Tensor  # [prompts]: metric(input)
    baseline_values: torch.Tensor | None = None  # [prompts]: metric(baseline), IG only
    steps: int | None = None

    @property
    def per_prompt(self) -> torch.Tensor:
        """Each prompt's total attribution ``[prompts]`` (the sum of its token scores)."""
        return torch.stack([s.sum() for s in self.scores])

    @property
    def completeness_error(self) -> torch.Tensor:
        """``|sum of attributions - (metric(x) - metric(baseline))|`` per prompt (IG only)."""
        if self.baseline_values is None:
            raise SpecError(
                f"completeness is a property of integrated_gradients, not {self.method}"
            )
        total = torch.stack([a.sum() for a in self.attributions])
        return (total - (self.metric_values - self.baseline_values)).abs()

    def text(self, prompt: int = 0, decode: Any = None) -> str:
        """One prompt's tokens with their scores, one per line.

        >>> a = InputAttribution("saliency", ((5, 6),), (torch.ones(2, 1),),
        ...                      (torch.tensor([0.5, -1.0]),), torch.zeros(1))
        >>> print(a.text())
        5  +0.500
        6  -1.000
        """
        names = [str(decode(t)) if decode else str(t) for t in self.tokens[prompt]]
        width = max(len(n) for n in names)
        scores = self.scores[prompt].tolist()
        return "\n".join(f"{n.ljust(width)}  {s:+.3f}" for n, s in zip(names, scores, strict=True))

    def plot(self, path: str | os.PathLike[str], prompt: int = 0, decode: Any = None) -> Path:
        """One prompt's token scores as a one-row heat map PNG."""
        from interventions.plots import heatmap

        labels = [str(decode(t)) if decode else str(t) for t in self.tokens[prompt]]
        signed = self.method != "saliency"
        return heatmap(
            self.scores[prompt].unsqueeze(0),
            path,
            row_labels=[self.method],
            col_labels=labels,
            title=f"{self.method} (prompt {prompt})",
            xlabel="token",
            ylabel="",
            center=0.0 if signed else None,
            colorbar_label="attribution",
        )


def _metric_rows(metric: Metric, rows: Sequence[int], n: int) -> Metric:
    def pick(ids: torch.Tensor | None) -> torch.Tensor | None:
        if ids is None or ids.numel() == 1:
            return ids
        if ids.numel() != n:
            raise SpecError(f"the metric has {ids.numel()} answers for {n} prompts")
        return ids.reshape(-1)[list(rows)]

    return Metric(metric.kind, pick(metric.answer), pick(metric.wrong))


def _baseline(
    baseline: str | int | torch.Tensor, model: nn.Module, backend: str, opts: Any
) -> torch.Tensor:
    """The baseline embeddings: ``[d]`` or ``[seq, d]`` (broadcast over the batch)."""
    if isinstance(baseline, torch.Tensor):
        return baseline.detach().float()
    if baseline == "zero":
        return torch.zeros(())
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        g = Graph()
        g.run("baseline", tokens=[[baseline]]).read("embed", name="embed")
        return run(g, model, backend=backend, **opts)["embed"][0, 0].detach().float()
    raise SpecError(
        f"unknown baseline {baseline!r}; give 'zero', a token id (its embedding at every "
        "position) or a tensor of embeddings [d] or [seq, d]"
    )


def _gradients(
    model: nn.Module,
    batch: Batch,
    metric: Metric,
    alphas: Sequence[float],
    base: torch.Tensor | None,
    pos: int,
    backend: str,
    opts: dict[str, Any],
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Per alpha: the gradient of the metric wrt the (interpolated) embeddings, [b, seq, d],
    and the metric [b]; plus the input embeddings [b, seq, d]."""
    g = Graph()
    batch.add_run(g, "input").read("embed", name="input.embed")
    for i, alpha in enumerate(alphas):
        r = batch.add_run(g, f"point.{i}")
        if base is not None:
            r.scale("embed", factor=alpha)
            if base.ndim:  # a zero baseline adds nothing
                r.add("embed", direction=base, scale=1.0 - alpha)
        r.grad("embed", metric=metric, metric_pos=pos, name=f"point.{i}.grad")
        r.read("logits", pos=pos, name=f"point.{i}.logits")
    res = run(g, model, backend=backend, **opts)
    values = [metric(res[f"point.{i}.logits"]).float().cpu() for i in range(len(alphas))]
    grads = [res[f"point.{i}.grad"].float().cpu() for i in range(len(alphas))]
    return grads, values, res["input.embed"].detach().float().cpu()


def input_attribution(
    model: nn.Module | str,
    tokens: Dataset,
    metric: Metric,
    *,
    method: Method = "integrated_gradients",
    steps: int = 50,
    baseline: str | int | torch.Tensor = "zero",
    pos: int = -1,
    batch_size: int = 16,
    points_per_pass: int = 16,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> InputAttribution:
    """Attribute ``metric`` (of the logits at ``pos``) to each token's embedding.

    ``tokens``: prompts of any lengths (ids or texts). ``metric``: a ``logit_diff``,
    ``logit``, ``prob`` or ``logprob`` metric, with one answer or one per prompt.
    ``method``: ``saliency`` (``|grad|``), ``input_x_gradient`` (``x * grad``) or
    ``integrated_gradients`` (``(x - baseline) * mean grad`` on the straight path,
    ``steps`` trapezoid intervals). ``baseline`` (IG): ``"zero"`` embeddings (Captum's
    default), a token id (its embedding at every position, e.g. a pad or ``<unk>``
    token) or a tensor ``[d]`` / ``[seq, d]``. ``points_per_pass`` bounds how many
    interpolation points share one batched forward and backward pass.

    Refused up front, by name, on a backend that computes no gradients.
    """
    from interventions.recipes._grads import require_gradients

    if method not in METHODS:
        raise SpecError(f"unknown attribution method {method!r}; methods: {choices_text(METHODS)}")
    require_gradients(backend, f"input attribution ({method})")
    if metric.kind == "kl":
        raise SpecError("input attribution needs a metric of the logits alone, not 'kl'")
    if steps < 1:
        raise SpecError(f"steps must be at least 1, got {steps}")
    model, tokenizer = _model(model, tokenizer, run_options)
    opts = {"tokenizer": tokenizer, **run_options}
    ig = method == "integrated_gradients"
    all_batches = list(batches(tokens, batch_size=batch_size, tokenizer=tokenizer))
    n = sum(len(b.indices) for b in all_batches)
    token_out: list[tuple[int, ...]] = [()] * n
    attrs: list[torch.Tensor] = [torch.zeros(0)] * n
    values = torch.zeros(n)
    base_values = torch.zeros(n)
    alphas = [k / steps for k in range(steps + 1)] if ig else [1.0]
    weights = [0.5 if k in (0, steps) else 1.0 for k in range(steps + 1)] if ig else [1.0]
    for batch in all_batches:
        assert batch.tokens is not None
        m = _metric_rows(metric, batch.indices, n)
        base = _baseline(baseline, model, backend, opts) if ig else None
        total: torch.Tensor | None = None
        x: torch.Tensor | None = None
        for start in range(0, len(alphas), points_per_pass):
            chunk = alphas[start : start + points_per_pass]
            grads, vals, x = _gradients(model, batch, m, chunk, base, pos, backend, opts)
            for j, (grad, val) in enumerate(zip(grads, vals, strict=True)):
                k = start + j
                part = grad * weights[k]
                total = part if total is None else total + part
                if k == len(alphas) - 1:
                    values[list(batch.indices)] = val
                if ig and k == 0:
                    base_values[list(batch.indices)] = val
        assert total is not None and x is not None
        if method == "saliency":
            attr = total.abs()
        elif method == "input_x_gradient":
            attr = x * total
        else:
            assert base is not None
            attr = (x - base) * (total / steps)
        for row, i in enumerate(batch.indices):
            token_out[i] = tuple(batch.tokens[row].tolist())
            attrs[i] = attr[row]
    if method == "saliency":
        scores = tuple(a.norm(dim=-1) for a in attrs)
    else:
        scores = tuple(a.sum(-1) for a in attrs)
    return InputAttribution(
        method,
        tuple(token_out),
        tuple(attrs),
        scores,
        values,
        base_values if ig else None,
        steps if ig else None,
    )
