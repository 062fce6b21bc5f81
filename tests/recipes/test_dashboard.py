"""Feature dashboards: harvested numbers against a hand loop, the page in a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import transformers

import interventions as iv
from interventions.cli import main
from interventions.sae.dashboard import _Histogram
from interventions.sae.dashboard_html import neuronpedia_batch

FEATURES = [0, 3, 5]


@pytest.fixture(scope="module")
def model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=32, bos_token_id=1
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def sae() -> iv.StandardSAE:
    g = torch.Generator().manual_seed(1)
    return iv.StandardSAE(
        torch.randn(16, 8, generator=g),
        torch.randn(8, generator=g) * 0.5,
        torch.randn(8, 16, generator=g),
        torch.zeros(16),
    )


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(2, 12, (23,), generator=g).tolist()
    return [torch.randint(0, 40, (n,), generator=g).tolist() for n in lengths]


def _hand(model, sae, prompts):
    """Each prompt alone through a forward hook on block 1's input: [len, d_sae] each."""
    out = []
    for ids in prompts:
        got = {}
        h = model.transformer.h[1].register_forward_pre_hook(
            lambda m, a, got=got: got.__setitem__("x", a[0].detach())
        )
        try:
            with torch.no_grad():
                model(torch.tensor([ids]))
        finally:
            h.remove()
        out.append(sae.encode(got["x"][0]))
    return out


def test_harvest_matches_a_hand_loop_over_prompts_of_different_lengths(model, sae) -> None:
    prompts = _prompts()
    hand = _hand(model, sae, prompts)
    dash = iv.harvest_features(
        model, sae, prompts, FEATURES, site="resid_pre", layer=1, batch_size=5, top_k=3, context=2
    )
    assert dash.n_prompts == len(prompts)
    assert dash.n_tokens == sum(len(p) for p in prompts)
    for card, f in zip(dash.features, FEATURES, strict=True):
        acts = torch.cat([h[:, f] for h in hand])
        assert card.index == f
        assert card.n_nonzero == int((acts > 0).sum())
        assert card.density == pytest.approx(float((acts > 0).float().mean()))
        assert card.max_activation == pytest.approx(float(acts.max()), rel=1e-5)
        per_prompt = torch.tensor([float(h[:, f].max()) for h in hand])
        want = per_prompt.topk(3).values  # (ties: prompts whose first token is the same)
        got = torch.tensor([float(per_prompt[ex.prompt]) for ex in card.examples])
        torch.testing.assert_close(got, want)
        assert len({ex.prompt for ex in card.examples}) == 3
        for ex in card.examples:
            row, p = hand[ex.prompt][:, f], int(hand[ex.prompt][:, f].argmax())
            assert ex.position == p
            lo, hi = max(0, p - 2), min(len(row), p + 3)
            assert ex.tokens == tuple(str(t) for t in prompts[ex.prompt][lo:hi])
            torch.testing.assert_close(torch.tensor(ex.values), row[lo:hi])
            assert ex.centre == p - lo
        # The histogram holds every non-zero value, each in the bin its edges say.
        assert sum(card.hist_counts) == card.n_nonzero
        edges = torch.tensor(card.hist_edges)
        nz = acts[acts > 0]
        for i, c in enumerate(card.hist_counts):
            inside = (nz >= edges[i]) & (nz < edges[i + 1])
            if i == len(card.hist_counts) - 1:
                inside |= nz >= edges[-1]
            assert int(inside.sum()) == c


def test_exclude_bos_leaves_position_zero_out(model, sae) -> None:
    prompts = _prompts()
    hand = _hand(model, sae, prompts)
    dash = iv.harvest_features(
        model, sae, prompts, FEATURES, site="resid_pre", layer=1, exclude_bos=True
    )
    for card, f in zip(dash.features, FEATURES, strict=True):
        acts = torch.cat([h[1:, f] for h in hand])
        assert card.n_nonzero == int((acts > 0).sum())
        assert all(ex.position > 0 for ex in card.examples)


def test_top_logits_are_the_models_own_readout_of_the_decoder_row(model, sae) -> None:
    dash = iv.harvest_features(model, sae, [[1, 2, 3]], FEATURES, site="resid_pre", layer=1)
    ln, head = model.transformer.ln_f, model.lm_head
    for card, f in zip(dash.features, FEATURES, strict=True):
        d = sae.W_dec[f]
        with torch.no_grad():  # the model's final norm + unembedding on the direction alone
            oracle = head(ln(d)) - head(ln(torch.zeros_like(d)))
        oracle = oracle * (d.var(unbiased=False) + ln.eps).sqrt()  # undo LN's 1/sigma
        top = oracle.topk(10)
        assert [t for t, _ in card.top_logits] == [str(i) for i in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor([v for _, v in card.top_logits]), top.values)
        bottom = (-oracle).topk(10)
        assert [t for t, _ in card.bottom_logits] == [str(i) for i in bottom.indices.tolist()]


def test_streaming_histogram_merges_bins_exactly() -> None:
    h = _Histogram(1, 4)
    h.add(0, torch.tensor([0.5, 1.0]))  # width 0.25 (+1e-6 relative, so 1.0 fits bin 3)
    h.add(0, torch.tensor([3.0, 0.1, 0.0]))  # 3.0 forces two merges: width 1.0
    edges, counts = h.result(0)
    assert counts == (3, 0, 1)  # [0, 1): {0.1, 0.5, 1.0}, [1, 2): {}, [2, 3): {3.0}; 0 dropped
    assert edges[1] == pytest.approx(1.0 * (1 + 1e-6))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"features": [99]}, r"feature indices \[99\] are not in 0\.\.7"),
        ({"features": [0], "n_bins": 3}, "n_bins must be an even number"),
        ({"features": [0], "top_k": 0}, "top_k must be >= 1"),
    ],
)
def test_bad_arguments_are_named(model, sae, kwargs, message) -> None:
    with pytest.raises(iv.SAEError, match=message):
        iv.harvest_features(model, sae, [[1, 2]], site="resid_pre", layer=1, **kwargs)


def test_neuronpedia_json_fields(model, sae) -> None:
    dash = iv.harvest_features(model, sae, _prompts(), FEATURES, site="resid_pre", layer=1)
    batch = neuronpedia_batch(dash)
    assert batch["layer"] == 1
    feat = batch["features"][0]
    assert len(feat["freq_hist_data_bar_heights"]) == len(feat["freq_hist_data_bar_values"])
    assert feat["feature_index"] == FEATURES[0]
    act = feat["activations"][0]
    assert act["values"][act["qualifying_token_index"]] == pytest.approx(feat["maxActApprox"])
    assert len(feat["pos_str"]) == len(feat["pos_values"]) == 10
    json.dumps(batch)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(path: str) -> tuple[str, str]:
    exe = _chromium()
    assert exe is not None
    done = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--dump-dom", f"file://{path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.stdout, done.stderr


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_the_page_loads_in_a_headless_browser_with_no_console_errors(model, sae, tmp_path) -> None:
    dash = iv.harvest_features(model, sae, _prompts(), FEATURES, site="resid_pre", layer=1, top_k=4)
    html_path, _ = dash.save(str(tmp_path / "dash"))
    dom, log = _browse(html_path)
    assert "Uncaught" not in log and "CONSOLE" not in log, log
    n = sum(len(c.examples) for c in dash.features)
    assert f'id="summary">{n} examples shown<' in dom  # the page's own script ran
    assert dom.count('class="ex"') == n
    assert 'title="activation ' in dom
    # The check can fail: a page with a broken script is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<p>x</p><script>notAFunction();</script>")
    assert "Uncaught" in _browse(str(bad))[1]


def test_cli_writes_the_dashboard(model, sae, tmp_path) -> None:
    model_dir, sae_dir = tmp_path / "model", tmp_path / "sae"
    model.save_pretrained(model_dir)
    iv.save_sae(sae, str(sae_dir), metadata={"hook_name": "blocks.1.hook_resid_pre"})
    out = tmp_path / "out"
    argv = ["sae-dashboard", "--model", str(model_dir), "--sae", str(sae_dir), "--features",
            "0", "3", "--prompt-ids", "1,2,3,4", "5,6", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    batch = json.loads((out / "neuronpedia.json").read_text())
    want = iv.harvest_features(
        model, sae, [[1, 2, 3, 4], [5, 6]], [0, 3], site="resid_pre", layer=1
    )
    expected = json.loads(json.dumps(neuronpedia_batch(want)))["features"]
    for key in ("feature_index", "frac_nonzero", "maxActApprox", "pos_values", "neg_values"):
        assert [f[key] for f in batch["features"]] == [f[key] for f in expected]
    values = [[a["values"] for a in f["activations"]] for f in batch["features"]]
    assert values == [[a["values"] for a in f["activations"]] for f in expected]
    assert batch["model_id"] == str(model_dir)
    assert (out / "dashboard.html").read_text().startswith("<!DOCTYPE html>")
    assert main([*argv[:-2], "--sae-id", "x", "--out", str(out)]) != 0
