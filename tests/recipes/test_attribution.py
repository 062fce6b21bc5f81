"""Input attribution against hand-written autograd on the embedding output (``inputs_embeds``
is exactly the ``embed`` site's tensor on every family), integrated-gradient completeness,
and other backends against torch."""

from __future__ import annotations

import pytest
import torch

from interventions.backends import get_backend
from interventions.errors import SpecError, UnsupportedOp
from interventions.recipes import Metric, input_attribution
from tests.tiny_models import hf_model

FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma")
PROMPTS = [[3, 7, 1, 9, 4], [5, 6, 8], [11, 12, 13, 14, 15]]  # two lengths
ANSWER, WRONG = torch.tensor([4, 9, 20]), torch.tensor([2, 3, 21])
ATOL = 1e-5
#: |sum of IG attributions - (metric(x) - metric(0))| with 32 trapezoid steps.
COMPLETENESS_ATOL = 2e-3


def _hand(
    model: torch.nn.Module, prompt: list[int], row: int, alpha: float, base: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Gradient of the logit difference wrt ``b + alpha * (x - b)``, the token embeddings
    ``x`` moved towards a baseline ``b`` (zero, or token ``base``'s embedding)."""
    ids = torch.tensor([prompt])
    embed = model.get_input_embeddings()
    x = embed(ids).detach()
    b = torch.zeros_like(x) if base is None else embed(torch.full_like(ids, base)).detach()
    e = (b + alpha * (x - b)).requires_grad_(True)
    logits = model(inputs_embeds=e).logits[0, -1]
    m = logits[ANSWER[row]] - logits[WRONG[row]]
    (grad,) = torch.autograd.grad(m, [e])
    return x[0], b[0], grad[0], float(m.detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_saliency_and_input_x_gradient_equal_hand_autograd(family: str) -> None:
    model = hf_model(family)
    metric = Metric.logit_diff(ANSWER, WRONG)
    sal = input_attribution(model, PROMPTS, metric, method="saliency")
    ixg = input_attribution(model, PROMPTS, metric, method="input_x_gradient")
    for row, prompt in enumerate(PROMPTS):
        x, _, grad, m = _hand(model, prompt, row, 1.0)
        torch.testing.assert_close(sal.attributions[row], grad.abs(), atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(sal.scores[row], grad.norm(dim=-1), atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(ixg.scores[row], (x * grad).sum(-1), atol=ATOL, rtol=1e-4)
        assert ixg.tokens[row] == tuple(prompt)
        assert abs(float(ixg.metric_values[row]) - m) < ATOL


# Llama's first RMSNorm is scale-invariant and it adds no position embeddings, so on the
# zero baseline's path the metric is flat for alpha > ~eps and jumps at 0: the path
# integral is still complete, but no practical number of steps resolves it. A token
# baseline gives a smooth path (see the module docstring).
@pytest.mark.parametrize(("family", "base"), [("gpt2", None), ("llama", 63)])
def test_integrated_gradients_equal_hand_trapezoid_and_are_complete(
    family: str, base: int | None
) -> None:
    model = hf_model(family)
    steps = 32
    metric = Metric.logit_diff(ANSWER, WRONG)
    baseline = "zero" if base is None else base
    ig = input_attribution(model, PROMPTS, metric, steps=steps, baseline=baseline)
    for row, prompt in enumerate(PROMPTS):
        total = torch.zeros(0)
        for k in range(steps + 1):
            x, b, grad, _ = _hand(model, prompt, row, k / steps, base)
            w = 0.5 if k in (0, steps) else 1.0
            total = grad * w if k == 0 else total + grad * w
        torch.testing.assert_close(
            ig.attributions[row], (x - b) * total / steps, atol=1e-5, rtol=1e-4
        )
        _, _, _, m_input = _hand(model, prompt, row, 1.0, base)
        _, _, _, m_base = _hand(model, prompt, row, 0.0, base)
        assert abs(float(ig.metric_values[row]) - m_input) < ATOL
        assert abs(float(ig.baseline_values[row]) - m_base) < ATOL
        gap = abs(float(ig.attributions[row].sum()) - (m_input - m_base))
        assert gap < COMPLETENESS_ATOL
    assert float(ig.completeness_error.max()) < COMPLETENESS_ATOL
    # the error is real and shrinks with steps: with 2 steps it is larger
    coarse = input_attribution(model, PROMPTS, metric, steps=2, baseline=baseline)
    assert float(coarse.completeness_error.max()) > float(ig.completeness_error.max())


@pytest.mark.parametrize("backend", ("nnsight", "pyvene"))
def test_other_backends_equal_torch_or_refuse_by_name(backend: str) -> None:
    model = hf_model("gpt2")
    metric = Metric.logit_diff(ANSWER, WRONG)
    try:
        caps = get_backend(backend).capabilities
    except Exception as exc:
        pytest.skip(str(exc))
    if not caps.gradients and "grad" not in caps.ops:
        with pytest.raises(UnsupportedOp, match=rf"needs gradients.*'{backend}' cannot.*torch"):
            input_attribution(model, PROMPTS, metric, backend=backend)
        return
    for method in ("saliency", "input_x_gradient", "integrated_gradients"):
        ours = input_attribution(model, PROMPTS, metric, method=method, steps=8, backend=backend)
        ref = input_attribution(model, PROMPTS, metric, method=method, steps=8)
        for a, b in zip(ours.attributions, ref.attributions, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bad_arguments_name_the_choices() -> None:
    model = hf_model("gpt2")
    with pytest.raises(SpecError, match=r"unknown attribution method 'ig'.*integrated_gradients"):
        input_attribution(model, PROMPTS, Metric.logit(1), method="ig")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="unknown baseline 'pad'"):
        input_attribution(model, PROMPTS, Metric.logit(1), baseline="pad")
    with pytest.raises(SpecError, match="not 'kl'"):
        input_attribution(model, PROMPTS, Metric.kl())


def test_text_view_and_picture(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = hf_model("gpt2")
    a = input_attribution(model, PROMPTS, Metric.logit(4), method="input_x_gradient")
    lines = a.text(prompt=1).splitlines()
    assert [line.split()[0] for line in lines] == ["5", "6", "8"]
    assert float(lines[2].split()[1]) == pytest.approx(float(a.scores[1][2]), abs=1e-3)
    assert a.plot(tmp_path / "a.png", prompt=1).stat().st_size > 0
