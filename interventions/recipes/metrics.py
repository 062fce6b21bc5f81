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


Normalization = Literal["batch_mean", "per_example"]
NORMALIZATIONS: tuple[str, ...] = ("batch_mean", "per_example")


def check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise SpecError(
            f"unknown normalization {normalization!r}; expected {choices_text(NORMALIZATIONS)}"
        )


def batch_score(
    values: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    *,
    normalize: bool = True,
    normalization: Normalization = "batch_mean",
) -> torch.Tensor:
    """Reduce per-example metric values ``[..., batch]`` to one score each.

    ``normalization="batch_mean"`` (the default) normalises the batch means,
    ``(mean m - mean m_corrupt) / (mean m_clean - mean m_corrupt)``; ``"per_example"``
    normalises each example by its own gap and then averages (TransformerLens's usual
    metric), which one example with a near-zero gap can dominate.

    >>> values = torch.tensor([[2.0, 0.0]])  # one cell, two examples
    >>> clean, corrupt = torch.tensor([2.0, 4.0]), torch.tensor([0.0, -4.0])
    >>> batch_score(values, clean, corrupt).tolist()  # (1 - -2) / (3 - -2)
    [0.6000000238418579]
    >>> batch_score(values, clean, corrupt, normalization="per_example").tolist()  # (1 + 0.5) / 2
    [0.75]
    """
    check_normalization(normalization)
    if not normalize:
        return values.mean(-1)
    if normalization == "per_example":
        if bool(((clean - corrupt).abs() < 1e-12).any()):
            raise SpecError(
                "normalization='per_example': some example has the same metric on its clean "
                "and corrupted inputs, so it cannot be normalised on its own; use "
                "normalization='batch_mean' or normalize=False"
            )
        return normalized(values, clean, corrupt).mean(-1)
    return normalized(values.mean(-1), clean.mean(-1), corrupt.mean(-1))


def standard_error(
    values: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    *,
    normalize: bool = True,
    normalization: Normalization = "batch_mean",
) -> torch.Tensor:
    """The standard error of :func:`batch_score` over the batch: ``std / sqrt(batch)``
    (sample std, ``n - 1``), of the per-example scores for ``"per_example"``, and for
    ``"batch_mean"`` of the raw values divided by the batch-mean gap, which is treated as
    fixed (:func:`bootstrap_interval` resamples it too). NaN for a batch of one.

    >>> standard_error(torch.tensor([[1.0, 3.0]]), torch.ones(2), torch.zeros(2)).tolist()
    [1.0]
    """
    check_normalization(normalization)
    n = values.shape[-1]
    if normalize and normalization == "per_example":
        values = normalized(values, clean, corrupt)
    elif normalize:
        values = values / (clean.mean(-1) - corrupt.mean(-1)).abs()
    if n < 2:
        return torch.full(values.shape[:-1], float("nan"))
    return values.std(-1, correction=1) / n**0.5


def bootstrap_interval(
    values: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    *,
    normalize: bool = True,
    normalization: Normalization = "batch_mean",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A percentile bootstrap interval of :func:`batch_score`: examples are resampled
    with replacement (the same draw for every cell, clean and corrupted metric), and the
    score recomputed, denominators included. Resamples whose gap vanishes are skipped.

    >>> lo, hi = bootstrap_interval(torch.tensor([[0.0, 1.0]]), torch.ones(2), torch.zeros(2))
    >>> lo.tolist(), hi.tolist()
    ([0.0], [1.0])
    """
    check_normalization(normalization)
    if not 0 < confidence < 1:
        raise SpecError(f"confidence must be between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise SpecError(f"n_resamples must be at least 1, got {n_resamples}")
    n = values.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_resamples, n), generator=gen)
    v, c, k = values.float()[..., idx], corrupt.float()[idx], clean.float()[idx]
    if not normalize:
        boot = v.mean(-1)
    elif normalization == "per_example":
        boot = ((v - c) / (k - c)).mean(-1)
    else:
        gap = k.mean(-1) - c.mean(-1)
        gap = torch.where(gap.abs() < 1e-12, torch.nan, gap)
        boot = (v.mean(-1) - c.mean(-1)) / gap
    alpha = (1 - confidence) / 2
    q = torch.tensor([alpha, 1 - alpha])
    lo, hi = torch.nanquantile(boot, q, dim=-1)
    return lo, hi
