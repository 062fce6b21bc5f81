"""Logit lens and direct logit attribution.

The logit lens is itself a graph: patching the last block's output with an earlier
layer's residual stream makes the model's own final norm and unembedding decode it, so
the lens runs on every backend, remote ones included, with no weights on the client.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=20)).eval()
>>> lens = logit_lens(model, torch.tensor([[1, 2, 3]]), tokens_of_interest=[4])
>>> lens.probs.shape, lens.top_tokens.shape  # [layers, positions, ...]
(torch.Size([2, 3, 1]), torch.Size([2, 3, 5]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.inputs import Tokens, _model, as_tokens
from interventions.recipes.metrics import Metric


@dataclass(frozen=True, eq=False)
class LogitLens:
    """Per layer and position: the top tokens, their probabilities, and chosen tokens'."""

    top_tokens: torch.Tensor  # [entries, positions, k] (batch item 0)
    top_probs: torch.Tensor  # [entries, positions, k]
    probs: torch.Tensor  # [entries, positions, len(tokens_of_interest)] (batch mean)
    logits: torch.Tensor  # [entries, batch, positions, vocab]
    tokens_of_interest: tuple[int, ...]
    graph: Graph
    labels: tuple[str, ...] = ()  # what each entry decodes: "embed", "resid_post[0]", ...

    def table(self, decode: Any = None, position: int = -1) -> str:
        """Top token per layer at ``position`` (decoded with ``decode(id)`` if given)."""
        lines = []
        offset = 1 if self.labels[:1] == ("embed",) else 0
        for entry in range(self.top_tokens.shape[0]):
            tops = self.top_tokens[entry, position].tolist()
            probs = self.top_probs[entry, position].tolist()
            shown = ", ".join(
                f"{decode(t) if decode else t} {p:.2f}" for t, p in zip(tops, probs, strict=True)
            )
            label = "embed   " if entry < offset else f"layer {entry - offset:>2}"
            lines.append(f"{label}: {shown}")
        return "\n".join(lines)


def logit_lens(
    model: nn.Module | str,
    tokens: Tokens,
    *,
    tokens_of_interest: Sequence[int] = (),
    k: int = 5,
    include_embeddings: bool = False,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> LogitLens:
    """Decode the residual stream after every layer with the final norm and unembedding.

    Entry ``i`` of ``logits``/``probs``/``top_*`` for an ``n``-layer model, against
    TransformerLens's ``cache.accumulated_resid()`` (``n + 1`` entries, embeddings first):

    ===================  ====================  ====================  ======================
    what is decoded      default (``n``)       ``include_embeddings  ``accumulated_resid``
                                               =True`` (``n + 1``)
    ===================  ====================  ====================  ======================
    embeddings           (absent)              0                     0 (``resid_pre[0]``)
    output of layer L    L                     L + 1                 L + 1
    (``resid_post[L]``)
    final residual       n - 1 (the model's    n                     n
                         own logits)
    ===================  ====================  ====================  ======================

    The embeddings entry is ``resid_pre[0]``: token embeddings plus position embeddings
    where the model adds them (GPT-2), scaled where the model scales them (Gemma).
    ``lens.labels`` names each entry.
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_tokens(tokens, tokenizer, "lens")
    info = describe(model)
    if info.n_layers is None:
        raise SpecError("the logit lens needs a model with an architecture map")
    last = info.n_layers - 1
    g = Graph()
    base = g.run("base", tokens=ids)
    entries: list[tuple[str, str, int]] = [("embed", "resid_pre", 0)] if include_embeddings else []
    entries += [(f"resid_post[{layer}]", "resid_post", layer) for layer in range(info.n_layers)]
    for label, site, layer in entries:
        if site == "resid_post" and layer == last:
            base.read("logits", name=f"lens.{label}")
            continue
        value = base.read(site, layer=layer)
        r = g.run(f"lens.{label}", tokens=ids)
        r.patch("resid_post", layer=last, value=value)
        r.read("logits", name=f"lens.{label}")
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    labels = tuple(label for label, _, _ in entries)
    logits = torch.stack([res[f"lens.{label}"] for label in labels]).float()
    probs = logits.softmax(-1)
    top = probs[:, 0].topk(min(k, probs.shape[-1]), dim=-1)
    chosen = list(tokens_of_interest)
    picked = probs[..., chosen].mean(1) if chosen else probs[..., :0].mean(1)
    return LogitLens(top.indices, top.values, picked, logits, tuple(chosen), g, labels)


@dataclass(frozen=True, eq=False)
class LogitAttribution:
    """Each head's and MLP's direct contribution to a logit difference, per layer, and the
    constant (bias) terms, which together sum to ``total``:
    ``heads.sum() + mlps.sum() + embed + attn_bias.sum() + mlp_bias.sum() + final_bias``
    (:attr:`components_total`)."""

    heads: torch.Tensor  # [layers, heads]: z_h @ W_O[h], no output bias
    mlps: torch.Tensor  # [layers]: the MLP output less its down projection's bias
    embed: float  # the embedding's (with positions, if any) direct share
    total: float  # the actual logit difference at the position
    attn_bias: torch.Tensor  # [layers]: the attention output projection's bias (0 if none)
    mlp_bias: torch.Tensor  # [layers]: the MLP down projection's bias (0 if none)
    final_bias: float  # the final norm's additive bias and the unembedding's bias

    @property
    def components_total(self) -> float:
        """The sum of every term; equals ``total`` up to float error."""
        parts = self.heads.sum() + self.mlps.sum() + self.attn_bias.sum() + self.mlp_bias.sum()
        return float(parts) + self.embed + self.final_bias


def _bias(module: nn.Module, width: int) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    return torch.zeros(width) if bias is None else bias.detach().float()


def _frozen_norm(
    norm: nn.Module, x: torch.Tensor, d_model: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A norm's gain, its scale frozen at its value on ``x`` [batch, d], and whether it
    centres (LayerNorm) or not (RMSNorm)."""
    gamma = getattr(norm, "weight", None)
    gamma_t = torch.ones(d_model) if gamma is None else gamma.detach().float()
    if type(norm).__name__.startswith("Gemma"):
        gamma_t = 1.0 + gamma_t  # Gemma's RMSNorm scales by (1 + weight)
    if isinstance(norm, nn.LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        return gamma_t, centred.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt(), True
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    return gamma_t, x.pow(2).mean(-1, keepdim=True).add(eps).sqrt(), False


def _post_norm_factor(
    model: nn.Module, module: str, layer: int, res: Any, part: str
) -> torch.Tensor:
    """``gamma / rms(x)`` [batch, d] of a block's post-norm (an RMSNorm) on this run."""
    arch = describe(model).arch
    assert arch is not None
    norm = model.get_submodule(f"{arch.layers}.{layer}.{module}")
    x = res[f"{part}_in.{layer}"].float()
    gamma, scale, centre = _frozen_norm(norm, x, x.shape[-1])
    if centre:
        raise SpecError(f"direct logit attribution: {module} is a LayerNorm post-norm")
    return gamma / scale


def direct_logit_attribution(
    model: nn.Module,
    tokens: Tokens,
    metric: Metric,
    *,
    pos: int = -1,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> LogitAttribution:
    """Direct logit attribution of heads and MLP outputs to ``metric`` (a logit difference
    or a logit), decomposed so that the terms sum exactly to the metric.

    The final residual is ``embed + sum_L (attn_out[L] + mlp_out[L])``, and
    ``attn_out[L] = sum_h z_h W_O[h] + b_O``, ``mlp_out[L] = (MLP less bias) + b_out``. The
    final norm is linearised the usual DLA way: its scale (the RMS, or the standard
    deviation for LayerNorm) is **frozen at its value on this run's full residual**, and
    its centring (LayerNorm) is applied to each term, which is exact because centring is
    linear. What is left is constant: the norm's additive bias and the unembedding's bias
    (``final_bias``). So ``components_total == total`` to float precision, on every family.

    Reads come from any backend; the unembedding, norm and bias weights come from the
    local model object, so this recipe needs local weights.
    """
    if metric.kind not in ("logit_diff", "logit"):
        raise SpecError("direct logit attribution needs a linear metric: logit_diff or logit")
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_tokens(tokens, tokenizer, "dla")
    info = describe(model)
    if info.arch is None or info.n_layers is None or not info.n_heads:
        raise SpecError("direct logit attribution needs a model with an architecture map")
    arch = info.arch
    g = Graph()
    r = g.run("base", tokens=ids)
    for layer in range(info.n_layers):
        r.read("head", layer=layer, pos=pos, name=f"head.{layer}")
        r.read("mlp_out", layer=layer, pos=pos, name=f"mlp.{layer}")
    r.read("resid_post", layer=info.n_layers - 1, pos=pos, name="final")
    r.read("resid_pre", layer=0, pos=pos, name="embed")
    r.read("logits", pos=pos, name="logits")
    # post-norm families (Gemma-2/3, OLMo-2) norm each block's output before the residual
    # add: read the norms' inputs to freeze their scales as the final norm's is frozen
    post_norm = arch.attn_out is not None and arch.attn_out != arch.attn_out_proj
    if post_norm:
        for layer in range(info.n_layers):
            for part, module in (("attn", arch.attn_out_module), ("mlp", arch.mlp_out_module)):
                site = f"{arch.layers}.{layer}.{module}.input"
                r.read(site, pos=pos, name=f"{part}_in.{layer}")
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)

    unembed = model.get_output_embeddings()  # type: ignore[operator]
    w_u = unembed.weight.detach().float()  # [vocab, d]
    d_model = w_u.shape[1]
    b_u = _bias(unembed, w_u.shape[0])
    answer = metric.answer
    assert answer is not None
    rows = torch.arange(ids.shape[0])
    direction = w_u[answer.expand(len(rows))]
    unembed_bias = b_u[answer.expand(len(rows))]
    if metric.kind == "logit_diff":
        assert metric.wrong is not None
        direction = direction - w_u[metric.wrong.expand(len(rows))]
        unembed_bias = unembed_bias - b_u[metric.wrong.expand(len(rows))]
    norm = model.get_submodule(arch.final_norm)
    final = res["final"].float()
    gamma_t, scale, centre = _frozen_norm(norm, final, d_model)
    readout = direction * gamma_t  # [batch, d]

    def contribution(x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(len(rows), d_model)
        if centre:
            x = x - x.mean(-1, keepdim=True)
        return ((x / scale) * readout).sum(-1)  # [batch]

    heads = torch.zeros(info.n_layers, info.n_heads)
    mlps = torch.zeros(info.n_layers)
    attn_bias = torch.zeros(info.n_layers)
    mlp_bias = torch.zeros(info.n_layers)
    for layer in range(info.n_layers):
        proj = model.get_submodule(f"{arch.layers}.{layer}.{arch.attn_out_proj}")
        down = (  # fused mixture-of-experts blocks have no single down projection
            None
            if arch.mlp_down_proj is None
            else model.get_submodule(f"{arch.layers}.{layer}.{arch.mlp_down_proj}")
        )
        weight = proj.get_parameter("weight").detach().float()
        # nn.Linear weight is [out, in]; GPT-2's Conv1D is [in, out]
        w_o = weight.T if type(proj).__name__ == "Conv1D" else weight
        z = res[f"head.{layer}"].float()  # [batch, heads, d_head]
        b_o = _bias(proj, d_model)
        b_out = torch.zeros(d_model) if down is None else _bias(down, d_model)
        attn_factor = mlp_factor = torch.ones(d_model)
        if post_norm:  # what the block adds is norm(x) = x * gamma / rms(x), rms frozen
            attn_factor = _post_norm_factor(model, arch.attn_out_module, layer, res, "attn")
            mlp_factor = _post_norm_factor(model, arch.mlp_out_module, layer, res, "mlp")
        for head in range(info.n_heads):
            d_head = z.shape[-1]
            out = z[:, head] @ w_o[:, head * d_head : (head + 1) * d_head].T
            heads[layer, head] = contribution(out * attn_factor).mean()
        attn_bias[layer] = contribution(b_o * attn_factor).mean()
        mlp_bias[layer] = contribution(b_out * mlp_factor).mean()
        mlps[layer] = contribution(res[f"mlp.{layer}"].float() - b_out * mlp_factor).mean()
    norm_beta = getattr(norm, "bias", None)
    beta = torch.zeros(d_model) if norm_beta is None else norm_beta.detach().float()
    final_bias = ((beta * direction).sum(-1) + unembed_bias).mean()
    total = metric(res["logits"]).mean()
    return LogitAttribution(
        heads,
        mlps,
        float(contribution(res["embed"]).mean()),
        float(total),
        attn_bias,
        mlp_bias,
        float(final_bias),
    )
