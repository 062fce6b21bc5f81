"""Conventions shared with TransformerLens and SAELens, each against a hand-computed oracle."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import interventions as iv
from interventions.errors import SpecError
from interventions.recipes import (
    Metric,
    activation_patching,
    direct_logit_attribution,
    feature_attribution,
    head_scores,
    logit_lens,
)
from tests.tiny_models import ALL_FAMILIES, hf_model

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
    corrupt = torch.stack([CORRUPT[0], CLEAN[1]])  # the second prompt is not corrupted
    model = hf_model("gpt2")
    with pytest.raises(SpecError, match=r"per_example.*normalization='batch_mean'"):
        activation_patching(model, CLEAN, corrupt, METRIC, layers=[0], normalization="per_example")
    with pytest.raises(SpecError, match="unknown normalization 'each'; expected batch_mean"):
        activation_patching(model, CLEAN, CORRUPT, METRIC, normalization="each")  # type: ignore[arg-type]


@pytest.mark.parametrize("recipe", ["activation_patching", "path_patching", "attribution_patching"])
def test_the_patching_recipes_refuse_bad_pairs_and_choices_before_running(recipe: str) -> None:
    import interventions.recipes as recipes

    sweep = getattr(recipes, recipe)
    model = hf_model("gpt2")

    def hooks() -> list[int]:
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]

    before = hooks()  # the shared model may carry a user's hook from another test
    with pytest.raises(SpecError, match="must hold as many prompts, got 2 and 1"):
        sweep(model, CLEAN, CORRUPT[:1], METRIC)
    with pytest.raises(SpecError, match="unknown normalization 'each'; expected batch_mean"):
        sweep(model, CLEAN, CORRUPT, METRIC, normalization="each")
    if recipe != "path_patching":  # path patching always noises the senders
        with pytest.raises(SpecError, match="unknown direction 'up'; expected denoise, noise"):
            sweep(model, CLEAN, CORRUPT, METRIC, direction="up")
    assert hooks() == before, [
        (n, m._forward_hooks, m._forward_pre_hooks)
        for n, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    ]


# tokens 7 8 7 8 7: query 4 has two earlier 7s, so "last occurrence" and "every
# occurrence" differ; one head, rows summing to one
HEAD_TOKENS = torch.tensor([[7, 8, 7, 8, 7]])
HEAD_PATTERN = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.4, 0.0],
        [0.1, 0.2, 0.3, 0.1, 0.3],
    ]
)[None, None]


def test_head_detector_conventions_by_hand() -> None:
    from interventions.recipes.heads import scores_from_patterns

    prev, dup, ind = scores_from_patterns(HEAD_PATTERN, HEAD_TOKENS)
    # ours: mean over queries with a target; the last earlier occurrence only
    assert float(prev) == pytest.approx((0.5 + 0.3 + 0.3 + 0.1) / 4)  # q1..q4 -> q-1
    assert float(dup) == pytest.approx((0.2 + 0.2 + 0.3) / 3)  # q2->0, q3->1, q4->2
    assert float(ind) == pytest.approx((0.3 + 0.3 + 0.1) / 3)  # q2->1, q3->2, q4->3
    prev, dup, ind = scores_from_patterns(HEAD_PATTERN, HEAD_TOKENS, "transformer_lens")
    # TransformerLens: attention on every target, summed, over the pattern's sum (5)
    assert float(prev) == pytest.approx((0.5 + 0.3 + 0.3 + 0.1) / 5)
    assert float(dup) == pytest.approx((0.2 + 0.2 + (0.1 + 0.3)) / 5)  # q4 -> 0 and 2
    assert float(ind) == pytest.approx((0.3 + 0.3 + (0.2 + 0.1)) / 5)  # q4 -> 1 and 3


def test_a_perfect_induction_head_scores_one_here_and_under_half_in_transformer_lens() -> None:
    from interventions.recipes.heads import repeated_random_tokens, scores_from_patterns

    half = 10
    tokens = repeated_random_tokens(64, half, batch=2, bos=1)  # [2, 21]
    seq = tokens.shape[1]
    pattern = torch.zeros(2, 1, seq, seq)
    pattern[:, :, :, 0] = 1.0  # first half: everything on the BOS
    for q in range(1 + half, seq):
        pattern[:, :, q, 0] = 0.0
        pattern[:, :, q, q - half + 1] = 1.0  # the token after the earlier copy
    assert float(scores_from_patterns(pattern, tokens)[2]) == pytest.approx(1.0)
    tl = float(scores_from_patterns(pattern, tokens, "transformer_lens")[2])
    assert tl == pytest.approx(half / seq)  # 10 / 21 = 0.476


def test_head_scores_transformer_lens_convention_on_a_model() -> None:
    model = hf_model("llama")
    scores = head_scores(model, half=6, batch=3, seed=1, convention="transformer_lens")
    ids = scores.tokens
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        try:
            attn = model(ids, output_attentions=True).attentions
        finally:
            model.config._attn_implementation = "sdpa"
    seq = 12  # distinct tokens twice: one earlier occurrence each, at q - 6
    for layer in range(2):
        a = attn[layer]  # [batch, heads, q, k]; each row sums to one, so the total is seq
        prev = sum(a[:, :, q, q - 1] for q in range(1, seq)) / seq
        ind = sum(a[:, :, q, q - 5] for q in range(6, seq)) / seq
        dup = sum(a[:, :, q, q - 6] for q in range(6, seq)) / seq
        torch.testing.assert_close(scores.previous[layer], prev.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.induction[layer], ind.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.duplicate[layer], dup.mean(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(SpecError, match="unknown convention 'tl'; expected interventions"):
        head_scores(model, half=4, batch=1, convention="tl")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_embeddings_entry_is_transformer_lens_entry_zero(family: str) -> None:
    model = hf_model(family)
    plain = logit_lens(model, CLEAN)
    lens = logit_lens(model, CLEAN, include_embeddings=True)
    assert lens.labels == ("embed", "resid_post[0]", "resid_post[1]")
    assert plain.labels == ("resid_post[0]", "resid_post[1]")
    torch.testing.assert_close(lens.logits[1:], plain.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        if family == "gpt2":  # token plus position embeddings, final LayerNorm, unembedding
            t = model.transformer
            x = t.wte(CLEAN) + t.wpe(torch.arange(CLEAN.shape[1]))
            by_hand = model.lm_head(t.ln_f(x))
        else:
            by_hand = model.lm_head(model.model.norm(model.model.embed_tokens(CLEAN)))
    torch.testing.assert_close(lens.logits[0], by_hand, atol=1e-5, rtol=1e-5)
    assert lens.table().splitlines()[0].startswith("embed   : ")
    assert lens.table().splitlines()[1].startswith("layer  0: ")


def _with_random_biases(family: str) -> torch.nn.Module:
    """A copy of the tiny model whose biases and norm weights are random (a freshly built
    model has zero biases, which would make the bias terms vanish)."""
    model = copy.deepcopy(hf_model(family))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_direct_logit_attribution_terms_sum_to_the_logit_difference(family: str) -> None:
    model = _with_random_biases(family)
    dla = direct_logit_attribution(model, CLEAN, METRIC)
    with torch.no_grad():
        by_hand = float(METRIC(model(CLEAN).logits[:, -1]).mean())
    assert dla.total == pytest.approx(by_hand, abs=1e-5)
    parts = (
        float(dla.heads.sum() + dla.mlps.sum() + dla.attn_bias.sum() + dla.mlp_bias.sum())
        + dla.embed
        + dla.final_bias
    )
    assert parts == pytest.approx(dla.total, abs=1e-4)
    assert dla.components_total == pytest.approx(dla.total, abs=1e-4)


def test_direct_logit_attribution_bias_terms_by_hand_on_gpt2() -> None:
    model = _with_random_biases("gpt2")  # every linear map has a bias; ln_f has one too
    dla = direct_logit_attribution(model, CLEAN, METRIC)
    assert abs(dla.final_bias) > 1e-6 and dla.attn_bias.abs().min() > 1e-6
    seen: dict[str, torch.Tensor] = {}
    h = model.transformer.h[-1].register_forward_hook(
        lambda m, i, o: seen.update(x=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(CLEAN)
    h.remove()
    x = seen["x"][:, -1]  # the final residual at the last position, [batch, d]
    centred = x - x.mean(-1, keepdim=True)
    ln = model.transformer.ln_f
    scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()  # frozen
    w_u = model.lm_head.weight.detach()
    direction = w_u[torch.tensor([7, 8])] - w_u[torch.tensor([9, 10])]  # [batch, d]

    def through_norm(v: torch.Tensor) -> float:
        v = v - v.mean()
        return float(((v / scale) * ln.weight.detach() * direction).sum(-1).mean())

    for layer in range(2):
        block = model.transformer.h[layer]
        assert float(dla.attn_bias[layer]) == pytest.approx(
            through_norm(block.attn.c_proj.bias.detach()), abs=1e-5
        )
        assert float(dla.mlp_bias[layer]) == pytest.approx(
            through_norm(block.mlp.c_proj.bias.detach()), abs=1e-5
        )
    assert dla.final_bias == pytest.approx(
        float((ln.bias.detach() * direction).sum(-1).mean()), abs=1e-5
    )


def _tiny_sae(d: int = 32, n: int = 24) -> iv.StandardSAE:
    g = torch.Generator().manual_seed(0)
    return iv.StandardSAE(
        W_enc=torch.randn(d, n, generator=g) / d**0.5,
        b_enc=torch.zeros(n),
        W_dec=torch.randn(n, d, generator=g) / n**0.5,
        b_dec=torch.zeros(d),
    )


@pytest.mark.parametrize("error", ["keep", "detach"])
def test_sae_error_term_same_values_different_gradients_by_hand(error: str) -> None:
    model = hf_model("gpt2")
    sae = _tiny_sae()
    g = iv.Graph()
    r = g.run("a", tokens=CLEAN)
    r.sae_splice("resid_post", 0, sae=sae, error=error, features="f")
    r.read("logits", pos=-1, name="logits")
    res = iv.run(g, model, grad=True)
    (grad_f,) = torch.autograd.grad(METRIC(res["logits"]).sum(), [res["f"]])

    # by hand, with no SAE at all: the unchanged model and d metric / d resid_post[0]
    seen: dict[str, torch.Tensor] = {}

    def grab(m: torch.nn.Module, i: object, o: object) -> object:
        h = o[0] if isinstance(o, tuple) else o
        h = h.detach().requires_grad_(True)
        seen["h"] = h
        return (h, *o[1:]) if isinstance(o, tuple) else h

    handle = model.transformer.h[0].register_forward_hook(grab)
    try:
        logits = model(CLEAN).logits[:, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(res["logits"].detach(), logits.detach(), atol=1e-5, rtol=1e-5)
    (grad_h,) = torch.autograd.grad(METRIC(logits).sum(), [seen["h"]])
    if error == "keep":
        # out = decode(f) + (x - decode(f)): W_dec is added and subtracted, nothing reaches f
        torch.testing.assert_close(grad_f, torch.zeros_like(grad_f), atol=0, rtol=0)
    else:
        # out = decode(f) + constant: d metric / d f = d metric / d out @ W_dec^T
        torch.testing.assert_close(grad_f, grad_h @ sae.W_dec.T, atol=1e-5, rtol=1e-4)
        assert grad_f.abs().max() > 1e-4


def test_feature_attribution_warns_once_when_the_error_term_is_kept() -> None:
    model = hf_model("gpt2")
    sae = _tiny_sae()
    with pytest.warns(iv.SAEErrorGradientWarning, match="error='keep'") as caught:
        kept = feature_attribution(model, CLEAN, sae, METRIC, layer=0, error="keep")
    assert sum(issubclass(w.category, iv.SAEErrorGradientWarning) for w in caught) == 1
    assert issubclass(iv.SAEErrorGradientWarning, UserWarning)
    torch.testing.assert_close(kept, torch.zeros_like(kept), atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", iv.SAEErrorGradientWarning)
        detached = feature_attribution(model, CLEAN, sae, METRIC, layer=0)  # the default
    assert detached.abs().max() > 1e-6


def test_transformer_lens_hook_names_are_aliases_of_standard_sites() -> None:
    model = hf_model("gpt2")
    g = iv.Graph()
    r = g.run("a", tokens=CLEAN)
    alias = r.read("blocks.1.hook_resid_pre", name="alias")
    r.read("resid_pre", layer=1, name="standard")
    r.read("blocks.0.attn.hook_z", name="z")
    res = iv.run(g, model)
    assert alias is not None
    torch.testing.assert_close(res["alias"], res["standard"], atol=0, rtol=0)
    # by hand: the input of block 1 and the per-head input of block 0's c_proj
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.transformer.h[1].register_forward_pre_hook(
            lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"])), with_kwargs=True
        ),
        model.transformer.h[0].attn.c_proj.register_forward_pre_hook(
            lambda m, a: seen.update(z=a[0])
        ),
    ]
    with torch.no_grad():
        model(CLEAN)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(res["alias"], seen["x"], atol=1e-6, rtol=0)
    torch.testing.assert_close(res["z"], seen["z"].unflatten(-1, (4, 8)), atol=1e-6, rtol=0)
    # the graph holds, prints and saves the standard name only
    text = g.to_json()
    assert "hook_resid_pre" not in text and "hook_z" not in text and "resid_pre" in text
    assert iv.Graph.from_json(text) == g
    assert iv.Site("blocks.1.hook_resid_pre") == iv.Site("resid_pre", 1)
    assert iv.Site("blocks.2.mlp.hook_post", 2) == iv.Site("mlp_hidden", 2)
    assert iv.Site("hook_embed") == iv.Site("embed")


def test_transformer_lens_aliases_refuse_what_they_do_not_mean() -> None:
    with pytest.raises(SpecError, match="names layer 1 but was given layer=2"):
        iv.Site("blocks.1.hook_resid_pre", 2)
    with pytest.raises(
        iv.UnknownSite, match=r"'blocks.1.attn.hook_rot_q' is not a TransformerLens"
    ):
        iv.Site("blocks.1.attn.hook_rot_q")
    with pytest.raises(iv.UnknownSite, match=r"aliases: hook_embed, blocks.\{layer\}"):
        iv.Site("hook_pos_embed")


def test_the_crosswalk_in_the_docs_matches_the_code() -> None:
    from pathlib import Path

    from interventions.crosswalk import crosswalk_markdown

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "crosswalk.md").read_text()
    start = doc.index("<!-- generated by: python -m interventions.crosswalk -->")
    end = doc.index("<!-- end generated -->")
    body = doc[start:end].split("\n", 1)[1]
    assert body.strip() == crosswalk_markdown().strip(), (
        "docs/crosswalk.md is stale: regenerate its tables with python -m interventions.crosswalk"
    )
    assert "docs/crosswalk.md" in (root / "README.md").read_text()
    # spot checks written out by hand, so a bug in the generator cannot pass unseen
    for row in (
        "| `resid_pre[L]` | `blocks.L.hook_resid_pre` | `model.transformer.h[L].input` "
        "| `model.transformer.h.L.input` |",
        "| `mlp_hidden[L]` | `blocks.L.mlp.hook_post` | `model.model.layers[L].mlp.down_proj"
        ".input` | `model.model.layers.L.mlp.down_proj.input` |",
        "| `attn_out[L]` | `blocks.L.hook_attn_out` | `model.gpt_neox.layers[L].attention.output`"
        " | `model.gpt_neox.layers.L.attention.output` |",
    ):
        assert row in doc
