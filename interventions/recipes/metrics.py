"""Metrics on final-position logits, shared by the patching recipes.

A metric maps logits ``[batch, vocab]`` (and, for KL, reference logits) to one number per
batch item. :func:`normalized` turns a metric into the 0 = corrupted, 1 = clean score.

>>> import torch
>>> m = Metric.logit_diff(answer=torch.tensor([1]), wrong=torch.tensor([0]))
>>> m(torch.tensor([[0.5, 2.0, 0.0]])).tolist()
[1.5]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from interventions.errors import SpecError, choices_text

MetricKind = Literal["logit_diff", "logit", "prob", "logprob", "kl"]
METRIC_KINDS: tuple[str, ...] = ("logit_diff", "logit", "prob", "logprob", "kl")


@dataclass(frozen=True, eq=False)
class Metric:
    """One of the standard metrics, with the token ids it needs per batch item."""

    kind: MetricKind
    answer: torch.Tensor | None = None  # [batch] ids of the right answer
    wrong: torch.Tensor | None = None  # [batch] ids of the wrong answer (logit_diff)

    def __post_init__(self) -> None:
        if self.kind not in METRIC_KINDS:
            raise SpecError(f"unknown metric {self.kind!r}; metrics: {choices_text(METRIC_KINDS)}")
        if self.kind in ("logit_diff", "logit", "prob", "logprob") and self.answer is None:
            raise SpecError(f"metric {self.kind!r} needs answer= token ids")
        if self.kind == "logit_diff" and self.wrong is None:
            raise SpecError("metric 'logit_diff' needs wrong= token ids")

    @classmethod
    def logit_diff(cls, answer: torch.Tensor | int, wrong: torch.Tensor | int) -> Metric:
        return cls("logit_diff", _ids(answer), _ids(wrong))

    @classmethod
    def prob(cls, answer: torch.Tensor | int) -> Metric:
        return cls("prob", _ids(answer))

    @classmethod
    def logit(cls, answer: torch.Tensor | int) -> Metric:
        return cls("logit", _ids(answer))

    @classmethod
    def kl(cls) -> Metric:
        """KL(reference || patched) of the next-token distributions; needs reference logits."""
        return cls("kl")

    def __call__(self, logits: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()
        rows = torch.arange(logits.shape[0], device=logits.device)

        def pick(values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
            assert ids is not None
            return values[rows, ids.to(values.device).expand(logits.shape[0])]

        if self.kind == "logit":
            return pick(logits, self.answer)
        if self.kind == "logit_diff":
            return pick(logits, self.answer) - pick(logits, self.wrong)
        if self.kind == "prob":
            return pick(logits.softmax(-1), self.answer)
        if self.kind == "logprob":
            return pick(logits.log_softmax(-1), self.answer)
        if reference is None:
            raise SpecError("metric 'kl' needs reference logits")
        ref = reference.float().log_softmax(-1)
        return F.kl_div(logits.log_softmax(-1), ref, log_target=True, reduction="none").sum(-1)


def _ids(value: torch.Tensor | int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.long)
    return t.reshape(-1)


def normalized(value: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """``(value - corrupt) / (clean - corrupt)``: 0 = corrupted, 1 = clean.

    >>> normalized(torch.tensor(1.5), torch.tensor(2.0), torch.tensor(1.0)).item()
    0.5
    """
    gap = clean - corrupt
    if torch.is_tensor(gap) and bool((gap.abs() < 1e-12).any()):
        raise SpecError(
            "the metric is the same on the clean and corrupted inputs, so it cannot be "
            "normalised; pick inputs that differ, or normalize=False"
        )
    return (value - corrupt) / gap
