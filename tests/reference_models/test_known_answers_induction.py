"""Law 5, known answers: on the bundled induction model, the recipes find the mechanism.

The model (``interventions.reference_models.induction``, seed 0) copies a repeated
segment with a layer-0 previous-token head and layer-1 induction heads. Thresholds below
hold with wide margins on the committed weights; the closing note of the issue lists the
margins measured across seeds.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import interventions as iv
from interventions.recipes import head_scores
from interventions.reference_models.induction import (
    BOS_TOKEN_ID,
    load_induction_model,
    repeated_tokens,
)

HALF = 16
ALL_BACKENDS = ("torch", "nnsight", "pyvene")
PATTERN_BACKENDS = ("torch", "nnsight")  # pyvene cannot read attention patterns


@cache
def model() -> torch.nn.Module:
    return load_induction_model(attn_implementation="sdpa")


def tokens() -> torch.Tensor:
    return repeated_tokens(8, HALF, torch.Generator().manual_seed(123))


def repeated_half_accuracy(logits: torch.Tensor, ids: torch.Tensor) -> float:
    # predictions at positions HALF+1 .. 2*HALF-1 of the second copy, of the next token
    pred = logits[:, HALF + 1 : 2 * HALF].argmax(-1)
    return float((pred == ids[:, HALF + 2 : 2 * HALF + 1]).float().mean())


@pytest.mark.parametrize("backend", PATTERN_BACKENDS)
def test_induction_and_previous_token_heads_are_found(backend: str) -> None:
    scores = head_scores(model(), half=20, batch=8, bos=BOS_TOKEN_ID, seed=0, backend=backend)
    induction, previous = scores.induction, scores.previous
    # every layer-1 head is an induction head (tested one by one), far above all layer-0 heads
    assert (induction[1] > 0.9).all(), induction
    assert induction[1].min() - induction[0].max() > 0.8
    # the previous-token heads sit in layer 0, far above every layer-1 head
    layer, head, best = scores.top("previous", 1)[0]
    assert (layer, head) == (0, 2) and best > 0.8
    assert previous[0].max() - previous[1].max() > 0.6


def test_pyvene_refuses_pattern_reads_before_running() -> None:
    with pytest.raises(iv.UnsupportedOp, match="attn_pattern"):
        head_scores(model(), half=4, batch=1, backend="pyvene")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ablating_the_induction_heads_breaks_copying(backend: str) -> None:
    ids = tokens()
    g = iv.Graph()
    g.run("base", tokens=ids).read("logits", name="base")
    group = g.run("induction_heads", tokens=ids)
    group.ablate("head", layer=1, head=[0, 1, 2, 3])
    group.read("logits", name="group")
    # the layer-0 heads that are not the previous-token head (L0H2 in the committed model)
    other = g.run("unrelated_heads", tokens=ids)
    other.ablate("head", layer=0, head=[0, 1, 3])
    other.read("logits", name="unrelated")
    single = g.run("previous_token_head", tokens=ids)
    single.ablate("head", layer=0, head=2)
    single.read("logits", name="single")
    res = iv.run(g, model(), backend=backend)
    base = repeated_half_accuracy(res["base"], ids)
    assert base > 0.95
    assert repeated_half_accuracy(res["group"], ids) < 0.1  # chance is 1/127
    assert base - repeated_half_accuracy(res["unrelated"], ids) < 0.05
    assert repeated_half_accuracy(res["single"], ids) < 0.3  # the K-composition input
