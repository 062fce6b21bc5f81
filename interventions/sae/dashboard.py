"""Feature dashboards: harvest chosen features over a dataset, keeping only what is shown.

:func:`harvest_features` runs the dataset through graphs in batches (each batch one
``iv.run`` of a ``sae_splice(..., features=)`` with the error kept, so the model's output is
unchanged) and keeps, per chosen feature, only:

- the ``top_k`` prompts where the feature fires hardest, each as a window of ``context``
  tokens either side of its strongest token, with the activation of every token;
- an exact histogram of its non-zero activations (fixed bin count; when a value passes the
  top bin, neighbouring bins merge and the width doubles, so no second pass is needed);
- its density (the fraction of tokens where it is non-zero) and its maximum.

Memory is flat in the number of prompts: a batch's activations are dropped once reduced.

Top logits: a feature's decoder row ``d = W_dec[f]`` (in the residual stream) is read out
as ``(centre(d) * gamma) @ W_U.T``: the final norm's learned scale ``gamma`` folded into the
unembedding (Gemma's ``1 + weight``), LayerNorm's mean subtraction applied (RMSNorm has
none), and the per-token ``1 / rms`` factor left out; it is positive and shared by every
token, so it scales the logits but never reorders them. SAEs whose decoder does not write
the residual width (e.g. on ``mlp_hidden``) get no logits.

>>> import torch, transformers, interventions as iv
>>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2))
>>> sae = iv.StandardSAE(torch.eye(8), torch.zeros(8), torch.eye(8), torch.zeros(8))
>>> dash = iv.harvest_features(model, sae, [[1, 2, 3], [4, 5]], [0, 3], site="resid_pre",
...                            layer=0, top_k=2)
>>> [card.index for card in dash.features], dash.n_prompts, dash.n_tokens
([0, 3], 2, 5)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from interventions.errors import SAEError
from interventions.sae.dashboard_html import Example, FeatureCard, FeatureDashboard

__all__ = ["Example", "FeatureCard", "FeatureDashboard", "harvest_features"]


# -- the reductions ----------------------------------------------------------------------


class _Histogram:
    """Exact counts of positive values in ``n_bins`` bins of one width per feature; the
    width doubles (neighbouring bins merge) whenever a value passes the top bin."""

    def __init__(self, n_features: int, n_bins: int) -> None:
        self.n_bins = n_bins
        self.counts = torch.zeros(n_features, n_bins, dtype=torch.long)
        self.width = [0.0] * n_features

    def add(self, f: int, values: Tensor) -> None:
        values = values[values > 0]
        if values.numel() == 0:
            return
        top = float(values.max())
        if self.width[f] == 0.0:
            self.width[f] = top / self.n_bins * (1 + 1e-6)
        while top >= self.width[f] * self.n_bins:
            merged = self.counts[f].view(-1, 2).sum(1)
            self.counts[f] = torch.cat([merged, torch.zeros_like(merged)])
            self.width[f] *= 2
        idx = (values / self.width[f]).floor().long().clamp_(0, self.n_bins - 1)
        self.counts[f] += torch.bincount(idx.cpu(), minlength=self.n_bins)

    def result(self, f: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
        counts = self.counts[f].tolist()
        while counts and counts[-1] == 0:
            counts.pop()
        edges = tuple(i * self.width[f] for i in range(len(counts) + 1)) if counts else ()
        return edges, tuple(int(c) for c in counts)


class _TopK:
    """The ``k`` prompts with the largest maximum activation per feature, with windows."""

    def __init__(self, n_features: int, k: int, context: int) -> None:
        w = 2 * context + 1
        self.k, self.context = k, context
        self.values = torch.full((n_features, k), -math.inf)
        self.prompt = torch.full((n_features, k), -1, dtype=torch.long)
        self.position = torch.zeros(n_features, k, dtype=torch.long)
        self.ids = torch.full((n_features, k, w), -1, dtype=torch.long)
        self.acts = torch.zeros(n_features, k, w)

    def add(self, acts: Tensor, mask: Tensor, ids: Tensor, first: int) -> None:
        """``acts [B, P, F]`` (masked entries ignored), ``ids [B, P]`` (-1 = padding)."""
        b, p, n_f = acts.shape
        masked = acts.masked_fill(~mask[..., None], -math.inf)
        best, pos = masked.max(dim=1)  # [B, F]
        best = best.masked_fill(best <= 0, -math.inf).T  # [F, B]
        pos = pos.T
        offsets = torch.arange(-self.context, self.context + 1)
        window = pos[..., None] + offsets  # [F, B, W]
        inside = (window >= 0) & (window < p)
        safe = window.clamp(0, p - 1)
        rows = torch.arange(b)[None, :, None].expand_as(safe)
        win_ids = ids[rows, safe].masked_fill(~inside, -1)
        feat = torch.arange(n_f)[:, None, None].expand_as(safe)
        win_acts = acts[rows, safe, feat].masked_fill(~inside | (win_ids < 0), 0.0)
        all_values = torch.cat([self.values, best], dim=1)
        top, order = all_values.topk(self.k, dim=1)
        all_prompt = torch.cat([self.prompt, torch.arange(first, first + b).expand(n_f, b)], 1)
        self.values = top
        self.prompt = all_prompt.gather(1, order)
        self.position = torch.cat([self.position, pos], 1).gather(1, order)
        w = order[..., None].expand(-1, -1, offsets.numel())
        self.ids = torch.cat([self.ids, win_ids], 1).gather(1, w)
        self.acts = torch.cat([self.acts, win_acts.float()], 1).gather(1, w)


# -- inputs and outputs ------------------------------------------------------------------


def _batches(prompts: Any, size: int, tokenizer: Any) -> Iterator[list[list[int]]]:
    items: Iterable[Any] = (
        (row.tolist() for row in prompts) if isinstance(prompts, Tensor) else prompts
    )
    batch: list[list[int]] = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise SAEError("harvest_features: text prompts need tokenizer=")
            ids = [int(t) for t in tokenizer(item)["input_ids"]]
        else:
            ids = [int(t) for t in item]
        if not ids:
            raise SAEError("harvest_features: an empty prompt (no tokens)")
        batch.append(ids)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_text(tokenizer: Any) -> Any:
    cache: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache:
            cache[i] = str(i) if tokenizer is None else str(tokenizer.decode([i]))
        return cache[i]

    return text


def _histogram(values: Tensor, n_bins: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    counts = torch.histc(values, bins=n_bins, min=lo, max=hi)
    step = (hi - lo) / n_bins
    return tuple(lo + i * step for i in range(n_bins + 1)), tuple(int(c) for c in counts)


def feature_logits(model: nn.Module, sae: Any, features: Sequence[int]) -> Tensor | None:
    """``[len(features), vocab]``: each feature's decoder row read out through the final norm's
    scale and the unembedding (see the module docstring), or None when it cannot be."""
    from interventions.architectures import describe

    info = describe(model)
    get = getattr(model, "get_output_embeddings", None)
    unembed = get() if callable(get) else None
    if unembed is None or info.arch is None:
        return None
    w_u = unembed.weight.detach().float()  # [vocab, d]
    d = sae.W_dec.detach().float()[list(features)].to(w_u.device)  # [F, d_out]
    if d.shape[-1] != w_u.shape[1]:
        return None
    norm = model.get_submodule(info.arch.final_norm)
    gamma = getattr(norm, "weight", None)
    g = torch.ones(d.shape[-1]) if gamma is None else gamma.detach().float().cpu()
    if type(norm).__name__.startswith("Gemma"):
        g = 1.0 + g
    if isinstance(norm, nn.LayerNorm):
        d = d - d.mean(-1, keepdim=True)
    return ((d * g.to(d.device)) @ w_u.T).cpu()


def harvest_features(
    model: nn.Module,
    sae: Any,
    prompts: Any,
    features: Sequence[int],
    *,
    site: str | None = None,
    layer: int | None = None,
    tokenizer: Any = None,
    batch_size: int = 32,
    top_k: int = 10,
    context: int = 8,
    n_bins: int = 32,
    n_logits: int = 10,
    exclude_bos: bool = False,
    backend: str = "torch",
    **options: Any,
) -> FeatureDashboard:
    """Harvest ``features`` of ``sae`` over ``prompts`` for a dashboard.

    ``prompts``: token id lists of any lengths, a ``[batch, pos]`` tensor, or text (with
    ``tokenizer``); any iterable, read ``batch_size`` at a time. ``site``/``layer`` default
    to the SAE's own. ``exclude_bos`` leaves position 0 out of every statistic. ``backend``
    and ``options`` go to ``iv.run``. See the module docstring for what is kept.
    """
    from interventions.execute import run
    from interventions.graph import Graph

    feats = [int(f) for f in features]
    bad = [f for f in feats if not 0 <= f < sae.d_sae]
    if not feats or bad:
        raise SAEError(
            f"harvest_features: feature indices {bad or 'none'} are not in 0..{sae.d_sae - 1}"
        )
    for name, value, least in (("batch_size", batch_size, 1), ("top_k", top_k, 1)):
        if value < least:
            raise SAEError(f"harvest_features: {name} must be >= {least}, got {value}")
    if n_bins < 2 or n_bins % 2:
        raise SAEError(f"harvest_features: n_bins must be an even number >= 2, got {n_bins}")
    info = getattr(sae, "info", None)
    if site is None:
        if info is None or info.site is None:
            raise SAEError("harvest_features: pass site=; the SAE does not say where it belongs")
        site, layer = info.site, info.layer if layer is None else layer
    where_site, where_layer = site, layer
    where = where_site if where_layer is None else f"{where_site}[{where_layer}]"
    index = torch.tensor(feats)
    hist = _Histogram(len(feats), n_bins)
    top = _TopK(len(feats), top_k, context)
    n_prompts = n_tokens = 0
    nonzero = torch.zeros(len(feats), dtype=torch.long)
    for batch in _batches(prompts, batch_size, tokenizer):
        g = Graph()
        g.run("h", tokens=batch).sae_splice(
            where_site, where_layer, sae=sae, error="keep", features="f"
        )
        res = run(g, model, backend=backend, tokenizer=tokenizer, **options)
        acts = res["f"][..., index.to(res["f"].device)].detach().float().cpu()  # [B, P, F]
        got = res.mask("f")
        mask = torch.ones(acts.shape[:2], dtype=torch.bool) if got is None else got.cpu()
        if exclude_bos:
            mask[:, 0] = False
        longest = acts.shape[1]
        ids = torch.tensor([row + [-1] * (longest - len(row)) for row in batch])
        real = acts[mask]  # [T, F]
        n_tokens += real.shape[0]
        nonzero += (real > 0).sum(0)
        for j in range(len(feats)):
            hist.add(j, real[:, j])
        top.add(acts, mask, ids, n_prompts)
        n_prompts += len(batch)
    text = _token_text(tokenizer)
    logits = feature_logits(model, sae, feats)
    cards = []
    for j, f in enumerate(feats):
        examples = []
        for slot in range(top_k):
            if not math.isfinite(float(top.values[j, slot])):
                break
            ids_row, acts_row = top.ids[j, slot].tolist(), top.acts[j, slot].tolist()
            keep = [i for i, t in enumerate(ids_row) if t >= 0]
            examples.append(
                Example(
                    int(top.prompt[j, slot]),
                    int(top.position[j, slot]),
                    tuple(text(ids_row[i]) for i in keep),
                    tuple(float(acts_row[i]) for i in keep),
                    keep.index(context),
                )
            )
        edges, counts = hist.result(j)
        tops: tuple[tuple[str, float], ...] = ()
        bottoms: tuple[tuple[str, float], ...] = ()
        logit_edges: tuple[float, ...] = ()
        logit_counts: tuple[int, ...] = ()
        if logits is not None:
            k = min(n_logits, logits.shape[1])
            hi, lo = logits[j].topk(k), (-logits[j]).topk(k)
            tops = tuple(
                (text(int(i)), float(v)) for v, i in zip(hi.values, hi.indices, strict=True)
            )
            bottoms = tuple(
                (text(int(i)), -float(v)) for v, i in zip(lo.values, lo.indices, strict=True)
            )
            logit_edges, logit_counts = _histogram(logits[j], n_bins)
        cards.append(
            FeatureCard(
                f,
                float(top.values[j, 0]) if examples else 0.0,
                float(nonzero[j]) / max(n_tokens, 1),
                int(nonzero[j]),
                edges,
                counts,
                tuple(examples),
                tops,
                bottoms,
                logit_edges,
                logit_counts,
            )
        )
    config = getattr(model, "config", None)
    model_name = getattr(config, "_name_or_path", None)
    return FeatureDashboard(
        where,
        model_name if isinstance(model_name, str) and model_name else None,
        n_prompts,
        n_tokens,
        tuple(cards),
        getattr(info, "sae_id", None),
    )
