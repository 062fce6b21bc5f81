"""Every recipe against an independent oracle: hand-written hooks or hand-derived answers."""

from __future__ import annotations

import pytest
import torch

import interventions as iv
from interventions.recipes import (
    Metric,
    ablate_components,
    activation_patching,
    attribution_patching,
    contrastive_direction,
    direct_logit_attribution,
    feature_ablation,
    feature_activations,
    feature_attribution,
    head_scores,
    logit_lens,
    path_patching,
    sae_feature_direction,
    steer,
    top_activating,
)
from tests.tiny_models import hf_model

BACKENDS = ["torch", "nnsight", "pyvene"]
GRADIENTS = ["torch", "nnsight", "pyvene"]  # nnsight: grad ops, computed in the trace
GRAD_READS = ["torch", "pyvene"]  # grad=True reads that stay in the autograd graph
CLEAN = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
CORRUPT = CLEAN.clone()
CORRUPT[:, 2] = 30
METRIC = Metric.logit_diff(torch.tensor([7, 8]), torch.tensor([9, 10]))


def _hidden(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


def _sae(d: int = 32, n: int = 24, seed: int = 0) -> iv.StandardSAE:
    g = torch.Generator().manual_seed(seed)
    return iv.StandardSAE(
        W_enc=torch.randn(d, n, generator=g) / d**0.5,
        b_enc=torch.zeros(n),
        W_dec=torch.randn(n, d, generator=g) / n**0.5,
        b_dec=torch.zeros(d),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_patching_sweep_known_answers(backend: str, family: str) -> None:
    model = hf_model(family)
    result = activation_patching(model, CLEAN, CORRUPT, METRIC, backend=backend)
    # the embeddings differ only at position 2: patching there restores everything,
    # patching elsewhere changes nothing
    expected = torch.zeros(6)
    expected[2] = 1.0
    torch.testing.assert_close(result.scores[0], expected, atol=1e-4, rtol=0)
    last = activation_patching(
        model, CLEAN, CORRUPT, METRIC, site="resid_post", layers=[-1], backend=backend
    )
    assert last.scores[0, -1] == pytest.approx(1.0, abs=1e-4)  # the final residual is everything
    torch.testing.assert_close(last.scores[0, :2], torch.zeros(2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_cell_equals_a_hand_hook(backend: str) -> None:
    model = hf_model("gpt2")
    result = activation_patching(
        model, CLEAN, CORRUPT, METRIC, site="mlp_out", normalize=False, backend=backend
    )
    with torch.no_grad():
        saved = {}
        h = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: saved.update(o=o))
        model(CLEAN)
        h.remove()

        def patch(m: torch.nn.Module, i: object, o: torch.Tensor) -> torch.Tensor:
            o = o.clone()
            o[:, 4] = saved["o"][:, 4]
            return o

        h = model.transformer.h[1].mlp.register_forward_hook(patch)
        logits = model(CORRUPT).logits[:, -1]
        h.remove()
    expected = METRIC(logits).mean()
    assert float(result.scores[1, 4]) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_sweep_and_noising(backend: str) -> None:
    model = hf_model("llama")
    heads = activation_patching(model, CLEAN, CORRUPT, METRIC, site="head", backend=backend)
    assert heads.scores.shape == (2, 4) and heads.cols == ("h0", "h1", "h2", "h3")
    noise = activation_patching(model, CLEAN, CORRUPT, METRIC, direction="noise", backend=backend)
    # noising the changed embedding breaks everything: score 0; elsewhere stays clean: 1
    assert noise.scores[0, 2] == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(noise.scores[0, [0, 1, 3, 4, 5]], torch.ones(5), atol=1e-4, rtol=0)
    kl = activation_patching(model, CLEAN, CORRUPT, Metric.kl(), layers=[0], backend=backend)
    assert kl.scores[0, 2] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_is_of_batch_means(backend: str) -> None:
    """A prompt whose clean and corrupted inputs are equal has no gap of its own; the
    score normalises the batch means, so the sweep still works and means the same."""
    model = hf_model("gpt2")
    clean = CLEAN
    corrupt = torch.stack([CORRUPT[0], CLEAN[1]])  # the second prompt is not corrupted
    raw = activation_patching(model, clean, corrupt, METRIC, normalize=False, backend=backend)
    got = activation_patching(model, clean, corrupt, METRIC, backend=backend)
    gap = raw.clean_metric - raw.corrupt_metric
    assert abs(gap) > 1e-5  # a random tiny model: small, but far above fp32 noise
    torch.testing.assert_close(
        got.scores, (raw.scores - raw.corrupt_metric) / gap, atol=1e-3, rtol=1e-3
    )
    # where the first prompt's patch restores it fully, the batch mean is restored fully
    torch.testing.assert_close(got.scores[0, 2], torch.tensor(1.0), atol=1e-2, rtol=0)


def test_attribution_patching_of_kl_needs_grad_reads() -> None:
    with pytest.raises(
        iv.UnsupportedOp, match=r"not data \(kl\), which backend 'nnsight' cannot.*torch, pyvene"
    ):
        attribution_patching(hf_model("gpt2"), CLEAN, CORRUPT, Metric.kl(), backend="nnsight")


@pytest.mark.parametrize("backend", GRADIENTS)
def test_attribution_patching_is_exact_where_nothing_changes_and_tracks_the_sweep(
    backend: str,
) -> None:
    model = hf_model("gpt2")
    attr = attribution_patching(model, CLEAN, CORRUPT, METRIC, compare_exact=True, backend=backend)
    assert attr.exact is not None and attr.correlation is not None
    # positions whose activations are equal in both runs get exactly zero
    torch.testing.assert_close(
        attr.approx.scores[0, [0, 1, 3, 4, 5]], torch.zeros(5), atol=1e-6, rtol=0
    )
    assert attr.correlation > 0.5
    # an independent finite-difference check of one cell's gradient estimate
    with torch.no_grad():
        clean_h = _hidden(model, CLEAN)[1]
    captured = {}

    def grab(m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        captured["x"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    h = model.transformer.h[1].register_forward_pre_hook(grab, with_kwargs=True)
    logits = model(CORRUPT).logits[:, -1]
    h.remove()
    m_corrupt = METRIC(logits)
    (grad,) = torch.autograd.grad(m_corrupt.sum(), [captured["x"]])
    delta = ((clean_h - captured["x"].detach()) * grad).sum(-1)
    m_clean = METRIC(model(CLEAN).logits[:, -1]).detach()
    expected = delta.mean(0) / (m_clean.mean() - m_corrupt.detach().mean())
    torch.testing.assert_close(attr.approx.scores[1], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_path_patching_to_logits_and_receivers(backend: str) -> None:
    model = hf_model("llama")
    direct = path_patching(model, CLEAN, CORRUPT, METRIC, backend=backend)
    assert direct.scores.shape == (2, 4) and not direct.scores.isnan().any()
    via = path_patching(model, CLEAN, CORRUPT, METRIC, receivers=[(1, 0), (1, 2)], backend=backend)
    assert via.scores.shape == (1, 4)  # senders: the heads of layer 0
    # a receiver whose output we overwrite with its clean value (sender patched from an
    # identical run) changes nothing: with clean == corrupt every score is 1
    same = path_patching(
        model, CLEAN, CLEAN.clone(), Metric.logit(7), normalize=False, backend=backend
    )
    clean_metric = Metric.logit(7)(model(CLEAN).logits[:, -1].detach()).mean()
    torch.testing.assert_close(
        same.scores, torch.full_like(same.scores, float(clean_metric)), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_logit_lens_decodes_with_the_models_own_head(backend: str, family: str) -> None:
    model = hf_model(family)
    lens = logit_lens(model, CLEAN, tokens_of_interest=[7], backend=backend)
    with torch.no_grad():
        hidden = _hidden(model, CLEAN)
        torch.testing.assert_close(lens.logits[-1], model(CLEAN).logits, atol=1e-5, rtol=1e-5)
        final_norm = model.get_submodule({"gpt2": "transformer.ln_f"}.get(family, "model.norm"))
        by_hand = model.get_output_embeddings()(final_norm(hidden[1]))
    torch.testing.assert_close(lens.logits[0], by_hand, atol=1e-5, rtol=1e-5)
    assert lens.probs.shape == (2, 6, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_direct_logit_attribution_sums_to_the_logit_difference(backend: str, family: str) -> None:
    model = hf_model(family)  # no biases after the residual stream in these families
    dla = direct_logit_attribution(model, CLEAN, METRIC, backend=backend)
    total = float(dla.heads.sum() + dla.mlps.sum()) + dla.embed
    assert total == pytest.approx(dla.total, abs=1e-4)
    with torch.no_grad():
        assert dla.total == pytest.approx(
            float(METRIC(model(CLEAN).logits[:, -1]).mean()), abs=1e-5
        )


def test_head_scores_need_attention_patterns() -> None:
    with pytest.raises(iv.UnsupportedOp, match=r"attn_pattern.*backends that can: torch, nnsight"):
        head_scores(hf_model("llama"), half=4, batch=1, backend="pyvene")


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_head_scores_match_patterns_computed_by_hand(backend: str) -> None:
    model = hf_model("llama")
    scores = head_scores(model, half=6, batch=3, seed=1, backend=backend)
    ids = scores.tokens
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        try:
            attn = model(ids, output_attentions=True).attentions
        finally:
            model.config._attn_implementation = "sdpa"
    half = 6
    for layer in range(2):
        a = attn[layer]
        prev = torch.stack([a[:, :, i, i - 1] for i in range(1, 2 * half)], -1).mean(dim=(0, 2))
        ind = torch.stack([a[:, :, i, i - half + 1] for i in range(half, 2 * half)], -1).mean(
            dim=(0, 2)
        )
        dup = torch.stack([a[:, :, i, i - half] for i in range(half, 2 * half)], -1).mean(
            dim=(0, 2)
        )
        torch.testing.assert_close(scores.previous[layer], prev, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.induction[layer], ind, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.duplicate[layer], dup, atol=1e-5, rtol=1e-5)
    assert len(scores.top("induction", 2)) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_contrastive_direction_and_steering(backend: str) -> None:
    model = hf_model("gpt2")
    d = contrastive_direction(model, CLEAN, CORRUPT, layer=1, pos=-1, backend=backend)
    got: dict[str, list[torch.Tensor]] = {}  # GPT-2's last hidden state is post-norm: hook
    h = model.transformer.h[1].register_forward_hook(
        lambda m, i, o: got.setdefault("x", []).append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(CLEAN)
        model(CORRUPT)
    h.remove()
    torch.testing.assert_close(
        d, got["x"][0][:, -1].mean(0) - got["x"][1][:, -1].mean(0), atol=1e-5, rtol=1e-5
    )

    zero = steer(model, CLEAN[:1], torch.zeros(32), layer=1, max_new_tokens=4, backend=backend)
    assert torch.equal(zero.plain, zero.steered) and zero.changed() == 0.0
    direction = model.get_output_embeddings().weight[42].detach()
    strong = steer(
        model, CLEAN[:1], direction, layer=1, scale=50.0, max_new_tokens=4, backend=backend
    )
    assert (strong.steered == 42).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_recipes_against_hand_computation(backend: str) -> None:
    model, sae = hf_model("llama"), _sae()
    with torch.no_grad():
        x = _hidden(model, CLEAN)[1]  # resid_post of layer 0
    feats = feature_activations(model, CLEAN, sae, layer=0, backend=backend)
    torch.testing.assert_close(feats, sae.encode(x), atol=1e-5, rtol=1e-5)
    top = top_activating(
        model, [CLEAN[:1], CLEAN[1:]], sae, feature=3, k=2, layer=0, backend=backend
    )
    all_acts = sorted(sae.encode(x)[..., 3].flatten().tolist(), reverse=True)
    assert [a.value for a in top] == pytest.approx(all_acts[:2], abs=1e-5)
    torch.testing.assert_close(sae_feature_direction(sae, 3), sae.W_dec[3])

    metric = Metric.logit(7)
    effects = feature_ablation(model, CLEAN, sae, [3, 5], metric, layer=0, backend=backend)
    assert effects.shape == (2,)
    if backend not in GRAD_READS:
        with pytest.raises(iv.UnsupportedOp):
            feature_attribution(model, CLEAN, sae, metric, layer=0, backend=backend)
        return
    attribution = feature_attribution(model, CLEAN, sae, metric, layer=0, backend=backend)
    assert attribution.shape == (24,)
    # by hand: f * d metric / d f with the error term detached
    captured = {}

    def splice(m: torch.nn.Module, i: object, o: object) -> object:
        h = o[0] if isinstance(o, tuple) else o
        f = sae.encode(h).detach().requires_grad_(True)
        captured["f"] = f
        new = sae.decode(f) + (h - sae.decode(sae.encode(h))).detach()
        return (new, *o[1:]) if isinstance(o, tuple) else new

    handle = model.model.layers[0].register_forward_hook(splice)
    out = metric(model(CLEAN).logits[:, -1]).sum()
    handle.remove()
    (grad,) = torch.autograd.grad(out, [captured["f"]])
    torch.testing.assert_close(
        attribution, (captured["f"] * grad).sum(1).mean(0).detach(), atol=1e-4, rtol=1e-4
    )

    effects = feature_ablation(model, CLEAN, sae, [3, 5], metric, layer=0)
    assert effects.shape == (2,)


def test_component_ablation_matches_a_hand_hook() -> None:
    model = hf_model("gpt2")
    metric = Metric.logit(7)
    effects = ablate_components(
        model, CLEAN, [("mlp_out", 1), ("head", 0, 2)], metric, method="zero"
    )
    with torch.no_grad():
        base = metric(model(CLEAN).logits[:, -1]).mean()
        h = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        zeroed = metric(model(CLEAN).logits[:, -1]).mean()
        h.remove()
    assert effects["mlp_out[1]"] == pytest.approx(float(zeroed - base), abs=1e-5)
    mean_effects = ablate_components(
        model, CLEAN, [("mlp_out", 1)], metric, method="mean", reference=CORRUPT
    )
    resample = ablate_components(
        model, CLEAN, [("mlp_out", 1)], metric, method="resample", reference=CORRUPT
    )
    assert set(mean_effects) == set(resample) == {"mlp_out[1]"}
    with pytest.raises(iv.SpecError, match="needs reference="):
        ablate_components(model, CLEAN, [("mlp_out", 1)], metric, method="mean")
