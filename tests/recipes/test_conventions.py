"""Conventions shared with TransformerLens and SAELens, each against a hand-computed oracle."""

from __future__ import annotations

import pytest
import torch

from interventions.recipes import Metric, activation_patching
from tests.tiny_models import hf_model

CLEAN = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
CORRUPT = CLEAN.clone()
CORRUPT[:, 2] = 30
METRIC = Metric.logit_diff(torch.tensor([7, 8]), torch.tensor([9, 10]))


def _hand_head_patch(model: torch.nn.Module, layer: int, pos: int, head: int) -> float:
    """The metric (batch mean) of the corrupted run with one head at one position patched
    from the clean run, by hooks on the llama o_proj input."""
    o_proj = model.model.layers[layer].self_attn.o_proj
    d_head = o_proj.in_features // model.config.num_attention_heads
    cols = slice(head * d_head, (head + 1) * d_head)
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        h = o_proj.register_forward_pre_hook(lambda m, a: saved.update(x=a[0].clone()))
        model(CLEAN)
        h.remove()

        def patch(m: torch.nn.Module, a: tuple) -> tuple:
            x = a[0].clone()
            x[:, pos, cols] = saved["x"][:, pos, cols]
            return (x,)

        h = o_proj.register_forward_pre_hook(patch)
        logits = model(CORRUPT).logits[:, -1]
        h.remove()
    return float(METRIC(logits).mean())


def test_per_position_false_patches_every_position_at_once() -> None:
    model = hf_model("gpt2")
    together = activation_patching(model, CLEAN, CORRUPT, METRIC, per_position=False)
    # the whole clean residual stream entering any layer restores the clean run exactly
    assert together.cols == ("all",)
    torch.testing.assert_close(together.scores, torch.ones(2, 1), atol=1e-5, rtol=0)
    # positions 0 and 1 are equal in both runs (causal attention): patching them is a no-op
    early = activation_patching(model, CLEAN, CORRUPT, METRIC, per_position=False, positions=[0, 1])
    torch.testing.assert_close(early.scores, torch.zeros(2, 1), atol=1e-5, rtol=0)
    per_pos = activation_patching(model, CLEAN, CORRUPT, METRIC, per_position=True)
    assert per_pos.scores.shape == (2, 6)


def test_head_sweep_per_position_matches_hand_hooks() -> None:
    model = hf_model("llama")
    grid = activation_patching(
        model, CLEAN, CORRUPT, METRIC, site="head", per_position=True, normalize=False
    )
    assert grid.scores.shape == (2, 6 * 4)
    assert grid.cols[:5] == ("0.h0", "0.h1", "0.h2", "0.h3", "1.h0")
    by_pos = grid.scores.unflatten(1, (6, 4))  # [layer, pos, head], TransformerLens's layout
    for layer, pos, head in [(0, 2, 1), (1, 4, 3), (1, 5, 0)]:
        expected = _hand_head_patch(model, layer, pos, head)
        assert float(by_pos[layer, pos, head]) == pytest.approx(expected, abs=1e-5)
    # layer 0 heads at positions 0 and 1 see identical inputs: patching them changes nothing
    corrupt_metric = grid.corrupt_metric
    torch.testing.assert_close(by_pos[0, :2], torch.full((2, 4), corrupt_metric), atol=1e-5, rtol=0)
    every = activation_patching(model, CLEAN, CORRUPT, METRIC, site="head", normalize=False)
    assert every.cols == ("h0", "h1", "h2", "h3")  # the head default: all positions at once
    assert not torch.allclose(every.scores[0], by_pos[0, 0])


def test_per_position_must_be_a_bool() -> None:
    from interventions.errors import SpecError

    with pytest.raises(SpecError, match="per_position must be True, False or None, got 'yes'"):
        activation_patching(hf_model("gpt2"), CLEAN, CORRUPT, METRIC, per_position="yes")  # type: ignore[arg-type]
