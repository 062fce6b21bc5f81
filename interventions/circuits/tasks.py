"""The standard circuit-discovery tasks of the bundled reference models: clean and
corrupt token ids and the metric, for the recipes, the tests and the command line.

* ``induction``: ``[BOS, A, A[:-1]]`` (``A``: ``half_len`` distinct random tokens), the
  answer the next token ``A[-1]``, the metric its logit (the copying metric); the corrupt
  prompt replaces the first copy of ``A`` by other random tokens, so nothing is repeated
  and the same query has nothing to copy.
* ``ioi``: template 0 prompts of the IOI model (:func:`~interventions.reference_models.ioi.ioi_batch`),
  corrupt prompts naming a third person at ``S2``, the metric the logit difference IO - S.

>>> clean, corrupt, metric = task_data("induction", n=2, seed=0)
>>> clean.shape, corrupt.shape, metric.kind, bool((clean[:, -5:] == corrupt[:, -5:]).all())
(torch.Size([2, 20]), torch.Size([2, 20]), 'logit', True)
"""

from __future__ import annotations

import torch

from interventions.errors import SpecError, choices_text
from interventions.recipes.metrics import Metric

TASKS: tuple[str, ...] = ("induction", "ioi")


def task_data(
    task: str, *, n: int = 16, seed: int = 0, half_len: int = 10
) -> tuple[torch.Tensor, torch.Tensor, Metric]:
    """(clean ids, corrupt ids, metric) of ``task`` with ``n`` prompts, drawn with ``seed``."""
    if task == "induction":
        from interventions.reference_models import induction as ind

        gen = torch.Generator().manual_seed(seed)
        tokens = ind.repeated_tokens(n, half_len, gen)
        clean, answer = tokens[:, :-1], tokens[:, -1]
        other = ind.repeated_tokens(n, half_len, gen)
        corrupt = clean.clone()
        corrupt[:, 1 : half_len + 1] = other[:, 1 : half_len + 1]
        return clean, corrupt, Metric.logit(answer)
    if task == "ioi":
        from interventions.reference_models.ioi import ioi_batch

        clean, corrupt, answer, wrong = ioi_batch(n, torch.Generator().manual_seed(seed), 0)
        return clean, corrupt, Metric.logit_diff(answer, wrong)
    raise SpecError(f"unknown task {task!r}; tasks: {choices_text(TASKS)}")
