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


def _hand_mlp_patch_per_example(model: torch.nn.Module, layer: int, pos: int) -> torch.Tensor:
    """Each prompt's metric of the corrupted run with gpt2 mlp_out[layer] at ``pos`` patched
    from the clean run, by hand hooks."""
    mlp = model.transformer.h[layer].mlp
    with torch.no_grad():
        saved: dict[str, torch.Tensor] = {}
        h = mlp.register_forward_hook(lambda m, i, o: saved.update(o=o))
        model(CLEAN)
        h.remove()

        def patch(m: torch.nn.Module, i: object, o: torch.Tensor) -> torch.Tensor:
            o = o.clone()
            o[:, pos] = saved["o"][:, pos]
            return o

        h = mlp.register_forward_hook(patch)
        logits = model(CORRUPT).logits[:, -1]
        h.remove()
    return METRIC(logits)


def test_per_example_normalisation_stderr_and_bootstrap_by_hand() -> None:
    model = hf_model("gpt2")
    with torch.no_grad():
        k = METRIC(model(CLEAN).logits[:, -1])  # each prompt's clean metric
        c = METRIC(model(CORRUPT).logits[:, -1])
    v = _hand_mlp_patch_per_example(model, 0, 2)
    x = (v - c) / (k - c)  # each prompt normalised on its own
    per_example = float(x.mean())
    batch_mean = float((v.mean() - c.mean()) / (k.mean() - c.mean()))
    assert abs(per_example - batch_mean) > 1e-3  # the two conventions differ here

    kwargs = dict(site="mlp_out", layers=[0], positions=[2])
    tl = activation_patching(model, CLEAN, CORRUPT, METRIC, normalization="per_example", **kwargs)
    ours = activation_patching(model, CLEAN, CORRUPT, METRIC, **kwargs)
    assert float(tl.scores[0, 0]) == pytest.approx(per_example, abs=1e-4)
    assert float(ours.scores[0, 0]) == pytest.approx(batch_mean, abs=1e-4)

    # two prompts: the sample std is |a - b| / sqrt(2), so the standard error is |a - b| / 2
    assert float(tl.stderr[0, 0]) == pytest.approx(float((x[0] - x[1]).abs() / 2), abs=1e-4)
    gap = float((k.mean() - c.mean()).abs())
    assert float(ours.stderr[0, 0]) == pytest.approx(float((v[0] - v[1]).abs() / 2) / gap, abs=1e-4)

    # with two prompts a resample is (0, 0), (1, 1) or a mix, each drawn many times in 1000:
    # the 95% interval runs from the lowest to the highest of those resamples' scores
    lo, hi = tl.bootstrap(n_resamples=1000, seed=3)
    assert float(lo[0, 0]) == pytest.approx(float(x.min()), abs=1e-4)
    assert float(hi[0, 0]) == pytest.approx(float(x.max()), abs=1e-4)
    lo, hi = ours.bootstrap(n_resamples=1000, seed=3)
    candidates = [float(x[0]), float(x[1]), batch_mean]
    assert float(lo[0, 0]) == pytest.approx(min(candidates), abs=1e-4)
    assert float(hi[0, 0]) == pytest.approx(max(candidates), abs=1e-4)


def test_per_example_normalisation_refuses_a_prompt_with_no_gap() -> None:
    from interventions.errors import SpecError

    corrupt = torch.stack([CORRUPT[0], CLEAN[1]])  # the second prompt is not corrupted
    model = hf_model("gpt2")
    with pytest.raises(SpecError, match="per_example.*normalization='batch_mean'"):
        activation_patching(model, CLEAN, corrupt, METRIC, layers=[0], normalization="per_example")
    with pytest.raises(SpecError, match="unknown normalization 'each'; expected batch_mean"):
        activation_patching(model, CLEAN, CORRUPT, METRIC, normalization="each")  # type: ignore[arg-type]
