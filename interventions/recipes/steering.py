"""Steering: add a direction during generation, and where directions come from.

Prompts may have different lengths (or be any iterable of prompts, e.g. a ``datasets``
column): each is generated from unpadded, and positions count in its own tokens.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=20)).eval()
>>> d = contrastive_direction(model, torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]]), layer=1)
>>> out = steer(model, torch.tensor([[1, 2]]), d, layer=1, scale=4.0, max_new_tokens=3)
>>> out.plain.shape, out.steered.shape
(torch.Size([1, 3]), torch.Size([1, 3]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.inputs import Tokens, _model, as_prompts
from interventions.sae import SAE
from interventions.sites import IndexLike


def contrastive_direction(
    model: nn.Module | str,
    positive: Tokens,
    negative: Tokens,
    *,
    site: str = "resid_post",
    layer: int | None = None,
    pos: IndexLike = -1,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> torch.Tensor:
    """Mean activation over ``positive`` prompts minus the mean over ``negative`` ones
    (over every selected token: with whole positions of prompts of different lengths,
    over their real tokens only)."""
    model, tokenizer = _model(model, tokenizer, run_options)
    pos_ids, neg_ids = (
        as_prompts(positive, tokenizer, "positive"),
        as_prompts(negative, tokenizer, "negative"),
    )
    g = Graph()
    g.run("positive", tokens=pos_ids).read(site, layer=layer, pos=pos, name="pos")
    g.run("negative", tokens=neg_ids).read(site, layer=layer, pos=pos, name="neg")
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)

    def mean(name: str) -> torch.Tensor:
        x, real = res[name].float(), res.mask(name)
        if real is not None:  # padded to the longest prompt: keep the real tokens
            x = x[real.to(x.device)]
        return x.reshape(-1, x.shape[-1]).mean(0)

    return mean("pos") - mean("neg")


def sae_feature_direction(sae: SAE, feature: int) -> torch.Tensor:
    """The decoder direction of one SAE feature (what the feature writes)."""
    w_dec = getattr(sae, "W_dec", None)
    if w_dec is None:
        raise SpecError(f"{type(sae).__name__} has no W_dec")
    if not 0 <= feature < w_dec.shape[0]:
        raise SpecError(f"feature {feature} out of range 0..{w_dec.shape[0] - 1}")
    return w_dec[feature].detach().float().clone()


@dataclass(frozen=True, eq=False)
class SteeringResult:
    """Greedy generations without and with the direction added."""

    plain: torch.Tensor  # [batch, new tokens]
    steered: torch.Tensor
    graph: Graph
    plain_text: tuple[str, ...] = ()
    steered_text: tuple[str, ...] = ()

    def changed(self) -> float:
        """Fraction of generated tokens that differ."""
        return float((self.plain != self.steered).float().mean())


def steer(
    model: nn.Module | str,
    prompt: Tokens,
    direction: torch.Tensor,
    *,
    site: str = "resid_post",
    layer: int | None = None,
    scale: float = 1.0,
    pos: IndexLike = None,
    max_new_tokens: int = 20,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> SteeringResult:
    """Generate greedily with and without ``scale * direction`` added at ``site``.

    ``pos=None`` steers every position, generated ones included. ``prompt``: one prompt,
    a batch, prompts of different lengths (each generates from its own last token) or
    any iterable of prompts.
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    ids = as_prompts(prompt, tokenizer, "prompt")
    g = Graph()
    g.run("plain", tokens=ids, max_new_tokens=max_new_tokens)
    g.run("steered", tokens=ids, max_new_tokens=max_new_tokens).add(
        site, layer=layer, direction=direction, scale=scale, pos=pos
    )
    res = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)
    plain, steered = res["plain.generated"], res["steered.generated"]
    texts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    if tokenizer is not None:
        texts = (
            tuple(tokenizer.batch_decode(plain)),
            tuple(tokenizer.batch_decode(steered)),
        )
    return SteeringResult(plain, steered, g, *texts)
