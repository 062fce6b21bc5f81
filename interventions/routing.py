"""Top-k routing rules of mixture-of-experts families, as data.

A family's router (transformers 5's ``*TopKRouter``) returns ``(logits, weights, ids)``
already computed from its logits. A write to ``router_logits`` or ``experts_chosen``
therefore re-runs the family's rule on the written value: from new logits, new ids and
weights; from new ids, their weights under the router's own logits. The rule is one
:class:`RoutingRule` per architecture map; a map without one (a custom router) cannot be
written at those sites.

>>> rule = RoutingRule(renormalize=True, weights_dtype="float32")
>>> weights, ids = route(torch.tensor([[0.0, 1.0, 2.0]]), rule.resolve(None), top_k=2)
>>> ids.tolist(), [round(w, 4) for w in weights[0].tolist()]
([[2, 1]], [0.7311, 0.2689])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from interventions.errors import ValidationError


@dataclass(frozen=True)
class RoutingRule:
    """``softmax`` over the logits in float32, the ``top_k`` largest probabilities, then
    optionally renormalised to sum to 1; the weights kept in float32 or cast back to the
    logits' dtype.

    ``renormalize`` is ``True``/``False``, or the name of a boolean config field that says
    (``"norm_topk_prob"``); :meth:`resolve` reads it from the model's config.

    >>> RoutingRule("norm_topk_prob", "logits").resolve(None) is None
    True
    """

    renormalize: bool | str
    weights_dtype: Literal["float32", "logits"]

    def resolve(self, config: Any) -> RoutingRule | None:
        """This rule with ``renormalize`` read from ``config`` (``None`` when the config
        lacks the field: the rule is then unknown and writes are refused)."""
        if isinstance(self.renormalize, bool):
            return self
        value = getattr(config, self.renormalize, None)
        return replace(self, renormalize=value) if isinstance(value, bool) else None

    def describe(self) -> str:
        """One line for docs and errors.

        >>> RoutingRule(True, "float32").describe()
        'softmax (float32), top-k, renormalised; weights float32'
        """
        norm = (
            "renormalised"
            if self.renormalize is True
            else "not renormalised"
            if self.renormalize is False
            else f"renormalised if config.{self.renormalize}"
        )
        dtype = "float32" if self.weights_dtype == "float32" else "in the logits' dtype"
        return f"softmax (float32), top-k, {norm}; weights {dtype}"


def _finish(top: torch.Tensor, logits: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    if rule.renormalize is True:
        top = top / top.sum(dim=-1, keepdim=True)
    return top if rule.weights_dtype == "float32" else top.to(logits.dtype)


def route(logits: torch.Tensor, rule: RoutingRule, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, ids) the rule gives for ``logits`` (``(..., n_experts)``), as the
    family's router computes them from its own logits."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, ids = torch.topk(probs, top_k, dim=-1)
    return _finish(top, logits, rule), ids


def weights_for(logits: torch.Tensor, ids: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """The routing weights of the chosen ``ids`` (``(..., top_k)``) under ``logits``,
    slot by slot, by the rule (renormalised over the chosen ones where it renormalises).

    >>> rule = RoutingRule(True, "float32")
    >>> w = weights_for(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0, 1]]), rule)
    >>> [round(v, 4) for v in w[0].tolist()]
    [0.2689, 0.7311]
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return _finish(probs.gather(-1, ids), logits, rule)


def check_expert_ids(ids: torch.Tensor, where: str, n_experts: int, top_k: int) -> None:
    """Refuse ids that no router could choose: not integers, not ``top_k`` per token,
    outside ``0..n_experts - 1``, or one expert twice in one token's top-k.

    >>> check_expert_ids(torch.tensor([[0, 0]]), "experts_chosen[0]", 4, 2)
    Traceback (most recent call last):
    ...
    interventions.errors.ValidationError: experts_chosen[0]: expert ids repeat within one token's top-k (first at token 0: [0, 0]); each token needs 2 different experts in 0..3
    """
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValidationError(
            f"{where}: expert ids must be integers (e.g. int64), got {ids.dtype}; valid ids "
            f"are 0..{n_experts - 1}"
        )
    if ids.ndim == 0 or ids.shape[-1] != top_k:
        raise ValidationError(
            f"{where}: expert ids need {top_k} per token (the last axis), got shape "
            f"{list(ids.shape)}"
        )
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= n_experts:
        raise ValidationError(
            f"{where}: expert ids must be in 0..{n_experts - 1}, found {low}..{high}"
        )
    ordered = ids.reshape(-1, top_k).sort(dim=-1).values
    repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)
    if bool(repeats.any()):
        token = int(repeats.nonzero()[0, 0])
        raise ValidationError(
            f"{where}: expert ids repeat within one token's top-k (first at token {token}: "
            f"{ids.reshape(-1, top_k)[token].tolist()}); each token needs {top_k} different "
            f"experts in 0..{n_experts - 1}"
        )
