"""Recipes on prompts of different lengths and on dataset columns (issue 10).

The oracle: each recipe on a ragged batch equals the same recipe run prompt by prompt,
each prompt alone and unpadded (batch means are the mean of the per-prompt values), at
fp32 1e-5; a ``datasets.Dataset`` column, a generator and the equivalent list give the
same result. The IOI reference model's word tokenizer gives texts of different lengths.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import interventions as iv
from interventions.recipes import (
    Metric,
    ablate_components,
    attribution_patching,
    contrastive_direction,
    feature_ablation,
    feature_activations,
    feature_attribution,
    steer,
    top_activating,
)
from interventions.reference_models import ioi
from tests.tiny_models import hf_model

datasets = pytest.importorskip("datasets")

TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = [[5, 9, 11], [7, 3, 22, 40, 8, 13, 6], [12, 30, 4, 9, 51], [17, 2], [8, 8, 21, 33, 9, 1]]
ANSWER = torch.tensor([10, 20, 30, 40, 50])
WRONG = torch.tensor([11, 21, 31, 41, 51])
REFERENCE = [[3, 4, 5, 6], [9, 10], [20, 21, 22, 23, 24, 25]]


@cache
def _model() -> torch.nn.Module:
    return hf_model("gpt2")


@cache
def _sae() -> iv.StandardSAE:
    g = torch.Generator().manual_seed(0)
    d = _model().config.n_embd
    return iv.StandardSAE(
        W_enc=torch.randn(d, 24, generator=g) / d**0.5,
        b_enc=torch.zeros(24),
        W_dec=torch.randn(24, d, generator=g) / d**0.5,
        b_dec=torch.zeros(d),
    )


def _metric(rows: list[int] | None = None) -> Metric:
    if rows is None:
        return Metric.logit_diff(ANSWER, WRONG)
    return Metric.logit_diff(ANSWER[rows], WRONG[rows])


def _column(rows: list[list[int]]) -> object:
    return datasets.Dataset.from_dict({"ids": rows})["ids"]


COMPONENTS = [("mlp_out", 0), ("head", 1, 0), ("resid_pre", 1)]


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablate_components_ragged_equals_prompt_by_prompt(method: str) -> None:
    model = _model()
    ref = REFERENCE if method == "mean" else None
    batch = ablate_components(model, PROMPTS, COMPONENTS, _metric(), method=method, reference=ref)
    alone = [
        ablate_components(model, [p], COMPONENTS, _metric([i]), method=method, reference=ref)
        for i, p in enumerate(PROMPTS)
    ]
    for key, value in batch.items():
        expected = sum(a[key] for a in alone) / len(alone)
        assert value == pytest.approx(expected, abs=1e-5), key
    assert any(abs(v) > 1e-3 for v in batch.values())  # the ablations do something
    col = ablate_components(
        model, _column(PROMPTS), COMPONENTS, _metric(), method=method, reference=ref
    )
    gen = ablate_components(
        model, (p for p in PROMPTS), COMPONENTS, _metric(), method=method, reference=ref
    )
    assert col == batch and gen == batch


def test_mean_ablation_over_a_ragged_reference_averages_real_tokens() -> None:
    """The oracle: a hand-computed mean over the reference's real tokens, patched in."""
    model = _model()
    comp = [("resid_pre", 1)]
    got = ablate_components(model, PROMPTS, comp, _metric(), method="mean", reference=REFERENCE)
    g = iv.Graph()
    g.run("ref", tokens=REFERENCE).read("resid_pre", layer=1, name="x")
    res = iv.run(g, model)
    real = res.mask("x")
    assert real is not None
    mean = res["x"][real].mean(0)
    effects = []
    for i, p in enumerate(PROMPTS):
        h = iv.Graph()
        h.run("base", tokens=[p]).read("logits", pos=-1, name="base")
        r = h.run("abl", tokens=[p])
        r.patch("resid_pre", layer=1, value=mean.expand(1, len(p), -1).clone())
        r.read("logits", pos=-1, name="abl")
        out = iv.run(h, model)
        m = _metric([i])
        effects.append(float(m(out["abl"]) - m(out["base"])))
    assert got["resid_pre[1]"] == pytest.approx(sum(effects) / len(effects), abs=1e-5)


def test_steer_ragged_equals_prompt_by_prompt() -> None:
    model = _model()
    direction = model.get_output_embeddings().weight[42].detach()
    prompts = PROMPTS[1:4]  # lengths 7, 5, 2
    kw = {"layer": 1, "scale": 8.0, "max_new_tokens": 3}
    batch = steer(model, prompts, direction, **kw)
    assert batch.plain.shape == batch.steered.shape == (3, 3)
    for i, p in enumerate(prompts):
        one = steer(model, [p], direction, **kw)
        assert torch.equal(batch.plain[i], one.plain[0]), i
        assert torch.equal(batch.steered[i], one.steered[0]), i
    assert batch.changed() > 0
    col = steer(model, _column(prompts), direction, **kw)
    assert torch.equal(col.steered, batch.steered) and torch.equal(col.plain, batch.plain)
    last = steer(model, prompts, direction, pos=-1, **kw)  # each prompt's own last token
    alone = steer(model, [prompts[2]], direction, pos=-1, **kw)
    assert torch.equal(last.steered[2], alone.steered[0])


def test_contrastive_direction_over_ragged_prompts_averages_real_tokens() -> None:
    model = _model()
    positive, negative = PROMPTS[:3], PROMPTS[3:]

    def tokens_of(prompts: list[list[int]]) -> torch.Tensor:  # the oracle: one prompt at a time
        rows = []
        for p in prompts:
            with torch.no_grad():
                hidden = model(torch.tensor([p]), output_hidden_states=True).hidden_states
            rows.append(hidden[1][0])  # resid_post of layer 0: every real token
        return torch.cat(rows)

    got = contrastive_direction(model, positive, negative, layer=0, pos=None)
    expected = tokens_of(positive).mean(0) - tokens_of(negative).mean(0)
    torch.testing.assert_close(got, expected, **TOL)
    last = contrastive_direction(model, _column(positive), iter(negative), layer=1)
    by_hand = contrastive_direction(model, positive, negative, layer=1, pos=-1)
    torch.testing.assert_close(last, by_hand, **TOL)


def test_feature_recipes_ragged_equal_prompt_by_prompt() -> None:
    model, sae = _model(), _sae()
    feats = feature_activations(model, PROMPTS, sae, layer=0)
    longest = max(len(p) for p in PROMPTS)
    assert feats.shape == (len(PROMPTS), longest, 24)
    alone = [feature_activations(model, [p], sae, layer=0)[0] for p in PROMPTS]
    for i, (p, one) in enumerate(zip(PROMPTS, alone, strict=True)):
        torch.testing.assert_close(feats[i, : len(p)], one, **TOL)
        assert not feats[i, len(p) :].any()  # right padding is zero
    torch.testing.assert_close(feature_activations(model, _column(PROMPTS), sae, layer=0), feats)

    top = top_activating(model, PROMPTS, sae, feature=3, k=6, layer=0)
    every = sorted(
        ((float(one[pos, 3]), i, pos) for i, one in enumerate(alone) for pos in range(len(one))),
        reverse=True,
    )[:6]
    assert [(a.prompt, a.position) for a in top] == [(i, pos) for _, i, pos in every]
    assert [a.value for a in top] == pytest.approx([v for v, _, _ in every], abs=1e-5)
    assert top_activating(model, _column(PROMPTS), sae, feature=3, k=6, layer=0) == top
    # an element that is a batch [2, seq] is two prompts, counted in order
    pair = torch.tensor([PROMPTS[0], [1, 2, 3]])
    batched = top_activating(model, [pair, PROMPTS[1]], sae, feature=3, k=30, layer=0)
    assert sorted({a.prompt for a in batched}) == [0, 1, 2] and len(batched) == 3 + 3 + 7
    third = sorted((a.position, a.value) for a in batched if a.prompt == 2)
    assert [v for _, v in third] == pytest.approx(alone[1][:, 3].tolist(), abs=1e-5)

    metric = _metric()
    ablation = feature_ablation(model, PROMPTS, sae, [3, 5, 7], metric, layer=0)
    ablation_alone = torch.stack(
        [
            feature_ablation(model, [p], sae, [3, 5, 7], _metric([i]), layer=0)
            for i, p in enumerate(PROMPTS)
        ]
    ).mean(0)
    torch.testing.assert_close(ablation, ablation_alone, **TOL)
    torch.testing.assert_close(
        feature_ablation(model, _column(PROMPTS), sae, [3, 5, 7], metric, layer=0), ablation
    )

    attribution = feature_attribution(model, PROMPTS, sae, metric, layer=0, batch_size=2)
    attribution_alone = torch.stack(
        [feature_attribution(model, [p], sae, _metric([i]), layer=0) for i, p in enumerate(PROMPTS)]
    ).mean(0)
    torch.testing.assert_close(attribution, attribution_alone, **TOL)
    assert attribution.abs().max() > 1e-4
    torch.testing.assert_close(
        feature_attribution(model, (p for p in PROMPTS), sae, metric, layer=0), attribution
    )


def test_text_columns_of_different_lengths_on_the_ioi_model() -> None:
    """A ``datasets`` column of texts (the IOI model's five templates, 12-19 tokens) gives
    what the same list gives, and each prompt alone."""
    model, tok = ioi.load_ioi_model()
    data = ioi.ioi_dataset(5, torch.Generator().manual_seed(0))
    texts = ioi.ioi_texts(data.clean)
    assert len({len(p) for p in data.clean}) == 5
    column = datasets.Dataset.from_dict({"text": texts})["text"]
    metric = Metric.logit_diff(data.answer, data.wrong)
    comps = [("head", 1, 0), ("mlp_out", 0)]
    got = ablate_components(model, column, comps, metric, method="zero", tokenizer=tok)
    assert got == ablate_components(model, texts, comps, metric, method="zero", tokenizer=tok)
    alone = [
        ablate_components(
            model,
            [t],
            comps,
            Metric.logit_diff(data.answer[i : i + 1], data.wrong[i : i + 1]),
            method="zero",
            tokenizer=tok,
        )
        for i, t in enumerate(texts)
    ]
    for key, value in got.items():
        assert value == pytest.approx(sum(a[key] for a in alone) / 5, abs=1e-5)
    ids_column = datasets.Dataset.from_dict({"ids": [list(p) for p in data.clean]})["ids"]
    assert ablate_components(model, ids_column, comps, metric, method="zero") == got


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["nnsight", "pyvene"])
def test_ragged_recipes_on_other_backends_equal_torch(backend: str) -> None:
    """The oracle is the torch reference, itself checked prompt by prompt above."""
    model, sae = _model(), _sae()
    metric = _metric()
    kw = {"method": "mean", "reference": REFERENCE}
    torch_ = ablate_components(model, PROMPTS, COMPONENTS, metric, **kw)
    other = ablate_components(model, PROMPTS, COMPONENTS, metric, backend=backend, **kw)
    assert other == pytest.approx(torch_, abs=1e-5)
    torch.testing.assert_close(
        feature_activations(model, PROMPTS, sae, layer=0, backend=backend),
        feature_activations(model, PROMPTS, sae, layer=0),
        **TOL,
    )
    direction = model.get_output_embeddings().weight[42].detach()
    steer_kw = {"layer": 1, "scale": 8.0, "max_new_tokens": 3}
    ours = steer(model, PROMPTS[1:4], direction, backend=backend, **steer_kw)
    ref = steer(model, PROMPTS[1:4], direction, **steer_kw)
    assert torch.equal(ours.steered, ref.steered) and torch.equal(ours.plain, ref.plain)


CORRUPT = [[5, 2, 11], [7, 3, 22, 1, 8, 13], [12, 30, 4, 9, 50], [17, 3, 3], [8, 8, 21, 1, 9, 1]]


def _attribution_alone(backend: str, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair alone, unpadded: its approximate metric at its own last ``k`` positions
    (``k`` the shortest prompt's length) and its clean and corrupted metrics."""
    k = min(len(p) for p in PROMPTS + CORRUPT)
    values, metrics = [], []
    for i, (a, b) in enumerate(zip(PROMPTS, CORRUPT, strict=True)):
        one = attribution_patching(
            _model(), [a], [b], _metric([i]), direction=direction, backend=backend
        ).approx
        assert one.values is not None and one.clean_values is not None
        assert one.corrupt_values is not None
        # alone, the columns end at the last position (0.. for a pair of one length,
        # -m.. for a pair of two): its last k are the batch's columns
        values.append(one.values[:, -k:, 0])
        metrics.append(torch.cat([one.clean_values, one.corrupt_values]))
    return torch.stack(values, -1), torch.stack(metrics, -1)


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_patching_ragged_equals_pair_by_pair(backend: str, direction: str) -> None:
    """Pairs of different lengths (and a pair whose clean and corrupted prompts differ in
    length), per-prompt answers: each score cell is what each pair alone gives, at
    positions counted from each prompt's own end."""
    from interventions.recipes import attribution_patching as ap
    from interventions.recipes.metrics import batch_score

    model = _model()
    got = ap(model, PROMPTS, CORRUPT, _metric(), direction=direction, backend=backend).approx
    k = min(len(p) for p in PROMPTS + CORRUPT)
    assert got.cols == tuple(str(p) for p in range(-k, 0))
    values, metrics = _attribution_alone(backend, direction)
    assert got.values is not None and got.clean_values is not None
    torch.testing.assert_close(got.values, values, **TOL)
    torch.testing.assert_close(got.clean_values, metrics[0], **TOL)
    torch.testing.assert_close(got.corrupt_values, metrics[1], **TOL)
    torch.testing.assert_close(got.scores, batch_score(values, metrics[0], metrics[1]), **TOL)
    base = metrics[1] if direction == "denoise" else metrics[0]
    assert (got.values - base).abs().max() > 1e-3  # the gradient terms do something
    col = ap(model, _column(PROMPTS), iter(CORRUPT), _metric(), direction=direction).approx
    torch.testing.assert_close(
        col.scores, ap(model, PROMPTS, CORRUPT, _metric(), direction=direction).approx.scores
    )


def test_attribution_patching_ragged_compares_with_the_exact_ragged_sweep() -> None:
    """``compare_exact`` sweeps the same cells exactly (each prompt's own positions)."""
    from interventions.recipes import activation_patching

    model = _model()
    got = attribution_patching(model, PROMPTS, CORRUPT, _metric(), compare_exact=True)
    exact = activation_patching(model, PROMPTS, CORRUPT, _metric())
    assert got.exact is not None and got.exact.cols == got.approx.cols == exact.cols
    torch.testing.assert_close(got.exact.scores, exact.scores)
    assert got.correlation is not None and -1.0 <= got.correlation <= 1.0


@pytest.mark.parametrize("receivers", ["logits", [(1, 0), (1, 2)]])
def test_path_patching_ragged_equals_pair_by_pair(receivers: str | list[tuple[int, int]]) -> None:
    """Pairs of different lengths (each clean prompt as long as its corrupted twin, whose
    first token differs): each sender's metric per prompt, and the clean and corrupted
    metrics, are what each pair alone gives; a dataset column gives the list's scores."""
    from interventions.recipes import path_patching

    model = _model()
    corrupt = [[(t * 7 + 3) % 64 if j == 0 else t for j, t in enumerate(p)] for p in PROMPTS]
    got = path_patching(model, PROMPTS, corrupt, _metric(), receivers=receivers)
    alone = [
        path_patching(model, [a], [b], _metric([i]), receivers=receivers)
        for i, (a, b) in enumerate(zip(PROMPTS, corrupt, strict=True))
    ]
    assert got.values is not None and got.clean_values is not None
    assert got.corrupt_values is not None
    torch.testing.assert_close(got.values, torch.cat([a.values for a in alone], -1), **TOL)  # type: ignore[misc]
    torch.testing.assert_close(got.clean_values, torch.cat([a.clean_values for a in alone]), **TOL)  # type: ignore[misc]
    torch.testing.assert_close(
        got.corrupt_values,
        torch.cat([a.corrupt_values for a in alone]),
        **TOL,  # type: ignore[misc]
    )
    assert (got.values - got.clean_values).abs().max() > 1e-3  # the patches do something
    column = path_patching(model, _column(PROMPTS), iter(corrupt), _metric(), receivers=receivers)
    torch.testing.assert_close(column.scores, got.scores)


def test_path_patching_refuses_a_pair_of_two_lengths_by_index() -> None:
    from interventions.recipes import path_patching

    with pytest.raises(iv.SpecError, match="prompt 1 has 7 clean and 6 corrupted tokens"):
        path_patching(_model(), PROMPTS, CORRUPT, _metric())
