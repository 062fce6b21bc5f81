"""Known answers on the IOI reference model (fast: committed weights, no training except a
short determinism smoke test).

Residual-stream activation patching (clean into corrupted, logit difference IO - S,
0 = corrupted, 1 = clean) must find where the model keeps the fact that S is repeated:
at the S2 position in the early layers, at the final position in the last layer, and
nowhere else.  Every backend must find it.
"""

from __future__ import annotations

from functools import cache
from itertools import pairwise

import pytest
import torch

from interventions.errors import UnsupportedOp
from interventions.recipes import Metric, activation_patching, attribution_patching
from interventions.recipes.patching import AttributionResult
from interventions.reference_models import ioi, load_reference

BACKENDS = ("torch", "nnsight", "pyvene")
GRAD_BACKENDS = ("torch", "pyvene")  # nnsight computes no gradients
TEMPLATE = 0
N_PROMPTS = 16

# Thresholds (see the module docstring of ioi for the per-seed measurements).
MIN_ACCURACY = 0.95
MIN_LOGIT_DIFF = 2.0
#: resid_pre[0] and the last resid_post patch the whole difference at once: exact up to
#: float rounding.
EXACT_ATOL = 1e-3
#: Largest |score| allowed at positions other than S2 and the end, in any layer.
MAX_OTHER = 0.1
#: In the middle layers, S2 and the end together restore at least this much.
MIN_MIDDLE_TOTAL = 0.6
#: Attribution patching (gradient) against the exact resid_pre sweep: Pearson r.  Noising
#: (gradient at the clean run) measured 0.90 / 0.88 / 0.93 on seeds 0 / 1 / 2; denoising
#: (gradient at the corrupted run) only 0.43 / 0.57 / 0.74: the model is trained to be
#: indifferent between IO and S whenever S2 is a third name, so the metric is flat around
#: the corrupted run and the gradient misses the S2 cells of the early layers, whose exact
#: score is 1 (the known failure of the linear approximation for large, saturating
#: changes such as swapping a token).
MIN_ATTRIBUTION_R = {"noise": 0.8, "denoise": 0.3}


@cache
def _committed() -> tuple[torch.nn.Module, object]:
    return ioi.load_ioi_model()


@cache
def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ioi.ioi_batch(N_PROMPTS, torch.Generator().manual_seed(7), TEMPLATE)


def _metric() -> Metric:
    _, _, answer, wrong = _prompts()
    return Metric.logit_diff(answer, wrong)


# --------------------------------------------------------------------------- data


def test_templates_and_vocabulary() -> None:
    assert len(set(ioi.VOCAB)) == len(ioi.VOCAB)
    for t in ioi.TEMPLATES:
        assert len(t.words) == ioi.SEQ_LEN
        assert 0 < t.n1 < t.n2 < t.s2 < t.end == ioi.SEQ_LEN - 1


def test_ioi_batch_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    clean, corrupt, answer, wrong = ioi.ioi_batch(200, gen)
    assert clean.shape == corrupt.shape == (200, ioi.SEQ_LEN)
    assert answer.shape == wrong.shape == (200,)
    bos = ioi.VOCAB.index(ioi.BOS)
    assert (clean[:, 0] == bos).all()
    names = {ioi.VOCAB.index(n) for n in ioi.NAMES}
    templates_seen = set()
    for c, x, a, w in zip(
        clean.tolist(), corrupt.tolist(), answer.tolist(), wrong.tolist(), strict=True
    ):
        template = next(
            t
            for t in ioi.TEMPLATES
            if all(
                ioi.VOCAB[tok] == word
                for tok, word in zip(c, t.words, strict=True)
                if not word.startswith("{")
            )
        )
        templates_seen.add(template)
        diff = [i for i in range(ioi.SEQ_LEN) if c[i] != x[i]]
        assert diff == [template.s2]
        assert {c[template.n1], c[template.n2]} == {a, w} and a != w
        assert c[template.s2] == w
        assert x[template.s2] in names - {a, w}
    assert len(templates_seen) == len(ioi.TEMPLATES)
    again = ioi.ioi_batch(200, torch.Generator().manual_seed(0))
    assert all(
        torch.equal(u, v) for u, v in zip(again, (clean, corrupt, answer, wrong), strict=True)
    )
    with pytest.raises(ValueError):
        ioi.ioi_batch(1, gen, template=len(ioi.TEMPLATES))


def test_tokenizer_round_trip_and_offline_loading() -> None:
    model, tokenizer = _committed()
    clean = _prompts()[0]
    texts = ioi.ioi_texts(clean)
    assert torch.equal(tokenizer(texts, return_tensors="pt").input_ids, clean)
    assert torch.equal(ioi.make_tokenizer()(texts, return_tensors="pt").input_ids, clean)
    loaded, loaded_tok = load_reference("ioi")  # type: ignore[misc]
    assert loaded_tok is not None and loaded_tok.bos_token == ioi.BOS
    with torch.no_grad():
        assert torch.equal(loaded(clean).logits, model(clean).logits)  # type: ignore[operator]


def test_committed_files() -> None:
    names = sorted(p.name for p in ioi.WEIGHTS_DIR.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sum((ioi.WEIGHTS_DIR / n).stat().st_size for n in names) < 1_000_000


def test_training_is_deterministic_smoke() -> None:
    a = ioi.train_ioi_model(seed=3, steps=10, batch_size=8)
    b = ioi.train_ioi_model(seed=3, steps=10, batch_size=8)
    c = ioi.train_ioi_model(seed=4, steps=10, batch_size=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


# --------------------------------------------------------------------------- behaviour


def test_committed_model_solves_ioi() -> None:
    model, _ = _committed()
    for template in [None, *range(len(ioi.TEMPLATES))]:
        ev = ioi.evaluate_ioi_model(model, n=100, template=template)  # type: ignore[arg-type]
        assert ev["accuracy"] > MIN_ACCURACY, (template, ev)
        assert ev["logit_diff"] > MIN_LOGIT_DIFF, (template, ev)
        # corrupted prompts leave the answer undetermined: IO and S about equally likely
        assert abs(ev["corrupt_logit_diff"]) < 0.5, (template, ev)


# --------------------------------------------------------------------------- patching


@cache
def _sweeps(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    model, _ = _committed()
    clean, corrupt, _, _ = _prompts()
    pre = activation_patching(model, clean, corrupt, _metric(), site="resid_pre", backend=backend)
    post = activation_patching(
        model, clean, corrupt, _metric(), site="resid_post", layers=[-1], backend=backend
    )
    return pre.scores, post.scores


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_patching_finds_s2_then_end(backend: str) -> None:
    pre, post = _sweeps(backend)
    t = ioi.TEMPLATES[TEMPLATE]
    n_layers = ioi.make_ioi_config().n_layer
    assert pre.shape == (n_layers, ioi.SEQ_LEN) and post.shape == (1, ioi.SEQ_LEN)
    others = [p for p in range(ioi.SEQ_LEN) if p not in (t.s2, t.end)]
    # layer 0: the tokens differ only at S2, so patching S2 restores everything
    assert abs(float(pre[0, t.s2]) - 1.0) < EXACT_ATOL
    assert float(pre[0, [p for p in range(ioi.SEQ_LEN) if p != t.s2]].abs().max()) < EXACT_ATOL
    # the last layer's output: only the final position feeds the answer
    assert abs(float(post[0, t.end]) - 1.0) < EXACT_ATOL
    assert float(post[0, :-1].abs().max()) < EXACT_ATOL
    # positions before S2 are identical in both runs: exactly no effect anywhere
    assert float(pre[:, : t.s2].abs().max()) < EXACT_ATOL
    # every layer: the effect sits at S2 and the end only
    assert float(pre[:, others].abs().max()) < MAX_OTHER, pre
    # middle layers: S2 and the end together carry most of it, and S2's share falls
    for layer in range(1, n_layers):
        assert float(pre[layer, t.s2] + pre[layer, t.end]) > MIN_MIDDLE_TOTAL, pre
    s2_share = [*pre[:, t.s2].tolist(), float(post[0, t.s2])]
    end_share = [*pre[:, t.end].tolist(), float(post[0, t.end])]
    assert all(a >= b - 0.05 for a, b in pairwise(s2_share)), s2_share
    assert all(a <= b + 0.05 for a, b in pairwise(end_share)), end_share


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backends_agree_with_torch_on_the_sweep(backend: str) -> None:
    pre, post = _sweeps(backend)
    ref_pre, ref_post = _sweeps("torch")
    torch.testing.assert_close(pre, ref_pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(post, ref_post, atol=1e-4, rtol=0)


@cache
def _attribution(backend: str, direction: str) -> AttributionResult:
    model, _ = _committed()
    clean, corrupt, _, _ = _prompts()
    return attribution_patching(
        model,
        clean,
        corrupt,
        _metric(),
        site="resid_pre",
        direction=direction,  # type: ignore[arg-type]
        compare_exact=True,
        backend=backend,
    )


@pytest.mark.parametrize("direction", ["noise", "denoise"])
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_attribution_patching_tracks_exact_patching(backend: str, direction: str) -> None:
    res = _attribution(backend, direction)
    assert res.correlation is not None
    assert res.correlation > MIN_ATTRIBUTION_R[direction], res.correlation
    t = ioi.TEMPLATES[TEMPLATE]
    approx = res.approx.scores
    # the unpatched metric (0 denoising, 1 noising): exactly before S2, nearly elsewhere
    neutral = 0.0 if direction == "denoise" else 1.0
    others = [p for p in range(ioi.SEQ_LEN) if p not in (t.s2, t.end)]
    assert float((approx[:, : t.s2] - neutral).abs().max()) < EXACT_ATOL
    assert float((approx[:, others] - neutral).abs().max()) < MAX_OTHER
    # in the last layer, wherever patching has a large exact effect, the gradient
    # estimate moves the same way (noising: visibly; denoising: the gradient at the
    # corrupted run can be nearly flat, see MIN_ATTRIBUTION_R)
    assert res.exact is not None
    exact_moved = res.exact.scores[-1] - neutral
    approx_moved = approx[-1] - neutral
    large = exact_moved.abs() > 0.3
    assert bool(large.any())
    assert bool((exact_moved[large] * approx_moved[large] > 0).all()), (approx, res.exact.scores)
    if direction == "noise":
        assert float(approx_moved[large].abs().min()) > 0.05, approx


@pytest.mark.parametrize("backend", GRAD_BACKENDS[1:])
def test_attribution_patching_agrees_across_backends(backend: str) -> None:
    for direction in ("noise", "denoise"):
        res, ref = _attribution(backend, direction), _attribution("torch", direction)
        torch.testing.assert_close(res.approx.scores, ref.approx.scores, atol=1e-4, rtol=0)
        assert res.exact is not None and ref.exact is not None
        torch.testing.assert_close(res.exact.scores, ref.exact.scores, atol=1e-4, rtol=0)


def test_attribution_patching_is_refused_on_nnsight() -> None:
    model, _ = _committed()
    clean, corrupt, _, _ = _prompts()
    with pytest.raises(UnsupportedOp):
        attribution_patching(model, clean, corrupt, _metric(), backend="nnsight")


def test_patching_by_name_with_text_prompts() -> None:
    """``"ioi"`` loads by name with its tokenizer, so text prompts work."""
    clean, corrupt, _, _ = _prompts()
    res = activation_patching(
        "ioi", ioi.ioi_texts(clean), ioi.ioi_texts(corrupt), _metric(), layers=[0]
    )
    torch.testing.assert_close(res.scores, _sweeps("torch")[0][:1], atol=1e-5, rtol=0)
