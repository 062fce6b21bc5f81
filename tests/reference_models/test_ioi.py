"""Known answers on the IOI reference model (fast: committed weights, no training except a
short determinism smoke test).

Residual-stream activation patching (clean into corrupted, logit difference IO - S,
0 = corrupted, 1 = clean) must find where the model keeps the fact that S is repeated:
at the S2 position in the early layers, at the final position in the last layer, and
nowhere else.  Every backend must find it, on one template's prompts and on prompts of
all five templates (different lengths) in one ragged run pair at per-prompt positions,
whose values must equal running each template as its own equal-length graph.
"""

from __future__ import annotations

import doctest
from functools import cache
from itertools import pairwise

import pytest
import torch

import interventions as iv
from interventions.errors import UnsupportedOp
from interventions.recipes import Metric, activation_patching, attribution_patching
from interventions.recipes.patching_grads import AttributionResult
from interventions.reference_models import ioi, load_reference

BACKENDS = ("torch", "nnsight", "pyvene")
GRAD_BACKENDS = ("torch", "pyvene", "nnsight")  # nnsight: grad ops, computed in the trace
TEMPLATE = 0
N_PROMPTS = 16
N_RAGGED = 40  # 8 prompts of each of the five templates, in a random order

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
#: (gradient at the clean run) measured 0.72 / 0.62 / 0.71 on seeds 0 / 1 / 2; denoising
#: (gradient at the corrupted run) only 0.33 / 0.27 / 0.20: the model is trained to be
#: indifferent between IO and S whenever S2 is a third name, so the metric is flat around
#: the corrupted run and the gradient misses the S2 cells of the early layers, whose exact
#: score is 1 (the known failure of the linear approximation for large, saturating
#: changes such as swapping a token).
MIN_ATTRIBUTION_R = {"noise": 0.5, "denoise": 0.15}
#: ... and noising tracks the exact sweep better than denoising, by at least this much.
MIN_NOISE_ADVANTAGE = 0.2


@cache
def _committed() -> tuple[torch.nn.Module, object]:
    return ioi.load_ioi_model()


@cache
def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return ioi.ioi_batch(N_PROMPTS, torch.Generator().manual_seed(7), TEMPLATE)


@cache
def _ragged_data() -> ioi.IOIDataset:
    return ioi.ioi_dataset(N_RAGGED, torch.Generator().manual_seed(11))


def _metric() -> Metric:
    _, _, answer, wrong = _prompts()
    return Metric.logit_diff(answer, wrong)


# --------------------------------------------------------------------------- data


def test_templates_and_vocabulary() -> None:
    assert len(set(ioi.VOCAB)) == len(ioi.VOCAB)
    lengths = [t.length for t in ioi.TEMPLATES]
    assert len(set(lengths)) == len(lengths) == 5  # five different lengths
    assert sorted(lengths) == [12, 14, 15, 17, 19]
    for t in ioi.TEMPLATES:
        assert len(t.words) == t.length
        assert 0 < t.n1 < t.n2 < t.s2 < t.end == t.length - 1


def _template_of(ids: list[int]) -> ioi.Template:
    return next(
        t
        for t in ioi.TEMPLATES
        if len(t.words) == len(ids)
        and all(
            ioi.VOCAB[tok] == word
            for tok, word in zip(ids, t.words, strict=True)
            if not word.startswith("{")
        )
    )


def _check_pair(c: list[int], x: list[int], a: int, w: int, template: ioi.Template) -> None:
    names = {ioi.VOCAB.index(n) for n in ioi.NAMES}
    assert c[0] == x[0] == ioi.VOCAB.index(ioi.BOS)
    assert [i for i in range(len(c)) if c[i] != x[i]] == [template.s2]
    assert {c[template.n1], c[template.n2]} == {a, w} and a != w
    assert c[template.s2] == w
    assert x[template.s2] in names - {a, w}


def test_ioi_batch_layout() -> None:
    for index, template in enumerate(ioi.TEMPLATES):
        gen = torch.Generator().manual_seed(index)
        clean, corrupt, answer, wrong = ioi.ioi_batch(50, gen, index)
        assert clean.shape == corrupt.shape == (50, template.length)
        assert answer.shape == wrong.shape == (50,)
        for c, x, a, w in zip(
            clean.tolist(), corrupt.tolist(), answer.tolist(), wrong.tolist(), strict=True
        ):
            assert _template_of(c) == template
            _check_pair(c, x, a, w, template)
        again = ioi.ioi_batch(50, torch.Generator().manual_seed(index), index)
        assert all(
            torch.equal(u, v) for u, v in zip(again, (clean, corrupt, answer, wrong), strict=True)
        )
    gen = torch.Generator().manual_seed(0)
    for bad in (len(ioi.TEMPLATES), -1, None):
        with pytest.raises(ValueError, match="template must be"):
            ioi.ioi_batch(1, gen, bad)  # type: ignore[arg-type]


def test_ioi_dataset_layout() -> None:
    data = ioi.ioi_dataset(50, torch.Generator().manual_seed(0))
    assert len(data) == len(data.clean) == len(data.corrupt) == 50
    assert data.answer.shape == data.wrong.shape == (50,)
    counts = [0] * len(ioi.TEMPLATES)
    for i in range(50):
        c, x = list(data.clean[i]), list(data.corrupt[i])
        template = _template_of(c)
        assert data.templates[i] == template == ioi.TEMPLATES[int(data.info.template[i])]
        counts[ioi.TEMPLATES.index(template)] += 1
        _check_pair(c, x, int(data.answer[i]), int(data.wrong[i]), template)
        assert data.s2.row(i) == template.s2 and data.end.row(i) == len(c) - 1
    assert counts == [10] * 5  # every template equally often
    assert len(set(data.lengths[:5])) > 1  # in a random order, not sorted by template
    again = ioi.ioi_dataset(50, torch.Generator().manual_seed(0))
    assert again.clean == data.clean and again.corrupt == data.corrupt
    sub = data.subset([3, 1])
    assert sub.clean == (data.clean[3], data.clean[1])
    assert sub.s2 == iv.per_prompt([data.s2.row(3), data.s2.row(1)])
    assert sub.answer.tolist() == [int(data.answer[3]), int(data.answer[1])]
    only = ioi.ioi_dataset(6, torch.Generator().manual_seed(1), templates=[2, 4])
    assert sorted(only.lengths) == [12, 12, 12, 14, 14, 14]
    with pytest.raises(ValueError, match="template must be"):
        ioi.ioi_dataset(2, torch.Generator(), templates=[7])


def test_pad_right_gives_each_prompt_its_own_logits() -> None:
    model, _ = _committed()
    data = _ragged_data()
    alone = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in data.clean[:5]])
    with torch.no_grad():
        together = ioi._final_logits(model, data.clean[:5])  # type: ignore[arg-type]
    torch.testing.assert_close(together, alone.detach(), atol=1e-4, rtol=0)


def test_data_doctests() -> None:
    from interventions.reference_models import ioi_data

    for module in (ioi, ioi_data):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_tokenizer_round_trip_and_offline_loading() -> None:
    model, tokenizer = _committed()
    clean = _prompts()[0]
    texts = ioi.ioi_texts(clean)
    assert torch.equal(tokenizer(texts, return_tensors="pt").input_ids, clean)
    assert torch.equal(ioi.make_tokenizer()(texts, return_tensors="pt").input_ids, clean)
    ragged = _ragged_data()
    texts = ioi.ioi_texts(ragged.clean)
    assert [tuple(ids) for ids in tokenizer(texts).input_ids] == list(ragged.clean)
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
    assert pre.shape == (n_layers, t.length) and post.shape == (1, t.length)
    others = [p for p in range(t.length) if p not in (t.s2, t.end)]
    # layer 0: the tokens differ only at S2, so patching S2 restores everything
    assert abs(float(pre[0, t.s2]) - 1.0) < EXACT_ATOL
    assert float(pre[0, [p for p in range(t.length) if p != t.s2]].abs().max()) < EXACT_ATOL
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
    others = [p for p in range(t.length) if p not in (t.s2, t.end)]
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


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_attribution_patching_tracks_better_when_noising(backend: str) -> None:
    noise, denoise = _attribution(backend, "noise"), _attribution(backend, "denoise")
    assert noise.correlation is not None and denoise.correlation is not None
    assert noise.correlation > denoise.correlation + MIN_NOISE_ADVANTAGE


@pytest.mark.parametrize("backend", GRAD_BACKENDS[1:])
def test_attribution_patching_agrees_across_backends(backend: str) -> None:
    for direction in ("noise", "denoise"):
        res, ref = _attribution(backend, direction), _attribution("torch", direction)
        torch.testing.assert_close(res.approx.scores, ref.approx.scores, atol=1e-4, rtol=0)
        assert res.exact is not None and ref.exact is not None
        torch.testing.assert_close(res.exact.scores, ref.exact.scores, atol=1e-4, rtol=0)


def test_attribution_patching_of_kl_is_refused_on_nnsight() -> None:
    """nnsight takes gradients of metrics given as data (grad ops); kl is not one."""
    model, _ = _committed()
    clean, corrupt, _, _ = _prompts()
    with pytest.raises(UnsupportedOp, match=r"not data \(kl\)"):
        attribution_patching(model, clean, corrupt, Metric.kl(), backend="nnsight")


def test_patching_by_name_with_text_prompts() -> None:
    """``"ioi"`` loads by name with its tokenizer, so text prompts work."""
    clean, corrupt, _, _ = _prompts()
    res = activation_patching(
        "ioi", ioi.ioi_texts(clean), ioi.ioi_texts(corrupt), _metric(), layers=[0]
    )
    torch.testing.assert_close(res.scores, _sweeps("torch")[0][:1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- ragged

#: The sweep's cells: (site, layer) rows x the positions patched in each prompt.
SLOTS = ("s2", "end", "after")  # "after": the token after S2, a position that should not matter


def _cells() -> list[tuple[str, int]]:
    n_layers = ioi.make_ioi_config().n_layer
    return [*(("resid_pre", layer) for layer in range(n_layers)), ("resid_post", n_layers - 1)]


def _sweep_values(
    model: torch.nn.Module,
    clean: object,
    corrupt: object,
    positions: dict[str, object],
    data: ioi.IOIDataset,
    backend: str,
) -> dict[str, torch.Tensor]:
    """One graph: the clean and corrupted runs, and for every cell a corrupted run with
    the clean residual patched in at that slot's positions.  Per prompt: the logit
    difference IO - S at its last token, keyed ``"clean"``, ``"corrupt"`` and
    ``"{site}[{layer}].{slot}"``."""
    g = iv.Graph()
    clean_run = g.run("clean", tokens=clean)  # type: ignore[arg-type]
    corrupt_run = g.run("corrupt", tokens=corrupt)  # type: ignore[arg-type]
    clean_run.read("logits", pos=-1, name="clean")
    corrupt_run.read("logits", pos=-1, name="corrupt")
    for site, layer in _cells():
        for slot in SLOTS:
            pos = positions[slot]
            value = clean_run.read(site, layer=layer, pos=pos)
            name = f"{site}[{layer}].{slot}"
            patched = g.run(name, tokens=corrupt)  # type: ignore[arg-type]
            patched.patch(site, layer=layer, pos=pos, value=value)
            patched.read("logits", pos=-1, name=name)
    res = iv.run(g, model, backend=backend)
    rows = torch.arange(len(data))
    return {
        name: (res[name][rows, data.answer] - res[name][rows, data.wrong]).float() for name in res
    }


@cache
def _ragged_values(backend: str) -> dict[str, torch.Tensor]:
    """The sweep over prompts of all five templates (different lengths) in one run pair,
    at per-prompt positions."""
    data = _ragged_data()
    after = iv.per_prompt([t.s2 + 1 for t in data.templates])
    positions: dict[str, object] = {"s2": data.s2, "end": data.end, "after": after}
    return _sweep_values(_committed()[0], data.clean, data.corrupt, positions, data, backend)


def _score(values: dict[str, torch.Tensor], name: str) -> float:
    """Normalised after the batch mean: 0 = corrupted, 1 = clean."""
    clean, corrupt = values["clean"].mean(), values["corrupt"].mean()
    return float((values[name].mean() - corrupt) / (clean - corrupt))


def _scores(values: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per slot, the score of each cell (rows as in :func:`_cells`)."""
    rows = [f"{site}[{layer}]" for site, layer in _cells()]
    return {slot: [_score(values, f"{row}.{slot}") for row in rows] for slot in SLOTS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_patching_finds_s2_then_end_over_all_templates(backend: str) -> None:
    values = _ragged_values(backend)
    data = _ragged_data()
    assert values["clean"].shape == (N_RAGGED,)
    assert float(values["clean"].min()) > MIN_LOGIT_DIFF / 2
    first, last = _cells()[0], _cells()[-1]
    pre0, post = f"{first[0]}[{first[1]}]", f"{last[0]}[{last[1]}]"
    # exact, prompt by prompt: patching the embedding-level residual at S2 gives the clean
    # prompt; patching the last layer's output at the end gives the clean answer
    for exact in (f"{pre0}.s2", f"{post}.end"):
        torch.testing.assert_close(values[exact], values["clean"], atol=EXACT_ATOL, rtol=0)
    for none in (f"{pre0}.end", f"{pre0}.after", f"{post}.s2", f"{post}.after"):
        torch.testing.assert_close(values[none], values["corrupt"], atol=EXACT_ATOL, rtol=0)
    rows = [f"{site}[{layer}]" for site, layer in _cells()]
    scores = _scores(values)
    # S2 carries it in the early layers, the end in the last; nowhere else matters
    assert min(scores["s2"][:2]) > 0.9, scores
    assert scores["end"][-1] > 0.9 and scores["end"][0] < EXACT_ATOL, scores
    assert max(abs(v) for v in scores["after"]) < MAX_OTHER, scores
    for s2, end in zip(scores["s2"], scores["end"], strict=True):
        assert s2 + end > MIN_MIDDLE_TOTAL, scores
    assert all(a >= b - 0.05 for a, b in pairwise(scores["s2"])), scores
    assert all(a <= b + 0.05 for a, b in pairwise(scores["end"])), scores
    # and every template on its own shows the same picture
    for index in range(len(ioi.TEMPLATES)):
        mine = [i for i, t in enumerate(data.templates) if t == ioi.TEMPLATES[index]]
        own = {name: v[mine] for name, v in values.items()}
        assert _score(own, f"{pre0}.s2") > 0.99 and _score(own, f"{post}.end") > 0.99
        for row in rows:
            assert _score(own, f"{row}.s2") + _score(own, f"{row}.end") > MIN_MIDDLE_TOTAL


def test_ragged_sweep_equals_each_template_on_its_own() -> None:
    """The oracle: each template's prompts as their own equal-length graph (rectangular
    ids, int positions) give the ragged sweep's per-prompt values."""
    data = _ragged_data()
    ragged = _ragged_values("torch")
    covered = torch.zeros(N_RAGGED, dtype=torch.bool)
    for template in ioi.TEMPLATES:
        rows = [i for i, t in enumerate(data.templates) if t == template]
        sub = data.subset(rows)
        positions: dict[str, object] = {"s2": template.s2, "end": template.end}
        positions["after"] = template.s2 + 1
        model = _committed()[0]
        clean, corrupt = torch.tensor(sub.clean), torch.tensor(sub.corrupt)
        own = _sweep_values(model, clean, corrupt, positions, sub, "torch")
        assert own.keys() == ragged.keys()
        for name, value in own.items():
            # 1e-5 absolute and relative (values reach ~70, where fp32 steps are 8e-6)
            torch.testing.assert_close(ragged[name][rows], value, atol=1e-5, rtol=1e-5)
        covered[rows] = True
    assert bool(covered.all())


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_ragged_sweep_agrees_across_backends(backend: str) -> None:
    values, ref = _ragged_values(backend), _ragged_values("torch")
    assert values.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(values[name], ref[name], atol=1e-4, rtol=0)
