"""Known answers on the toy model of superposition (fast: committed weights, no training
except a short determinism smoke test).

The model has no architecture map, so every graph uses raw sites: ``"down.output"`` is the
5-dimensional bottleneck the SAE reads and writes.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import interventions as iv
from interventions.reference_models import load_reference
from interventions.reference_models import superposition as sp

BACKENDS = ("torch", "nnsight", "pyvene")

# Measured on seeds 0, 1, 2 (see the module docstring): 14-15 of the 20 features are
# represented (column norm ~1.0-1.15; the rest ~0.01), always including the 12 most
# important, and every represented feature has an SAE decoder row with cosine >= 0.954
# (mean ~0.99).  The thresholds leave a margin.
MIN_REPRESENTED = 12
TOP_FEATURES = 10
MIN_COSINE = 0.93
# The latent that fires most on a lone feature: its decoder row has cosine >= 0.942 with
# the feature's direction (seeds 0-2).
MIN_TOP_LATENT_COSINE = 0.9
#: Splicing with the error term kept must not change the outputs (float rounding only).
ATOL = 1e-5


@cache
def _committed() -> tuple[sp.ToyModel, iv.StandardSAE]:
    return sp.load_superposition()


def _inputs(n: int = 32, seed: int = 3) -> torch.Tensor:
    return sp.feature_batch(n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- files, data


def test_committed_files_are_small_and_safe() -> None:
    names = sorted(p.name for p in sp.WEIGHTS_DIR.iterdir())
    assert names == ["cfg.json", "config.json", "model.safetensors", "sae_weights.safetensors"]
    assert sum((sp.WEIGHTS_DIR / n).stat().st_size for n in names) < 100_000


def test_feature_batch_is_sparse_and_deterministic() -> None:
    x = sp.feature_batch(4096, torch.Generator().manual_seed(0))
    assert x.shape == (4096, sp.N_FEATURES)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    density = float((x > 0).float().mean())
    assert abs(density - sp.FEATURE_PROBABILITY) < 0.01
    assert torch.equal(x, sp.feature_batch(4096, torch.Generator().manual_seed(0)))


def test_model_is_tied_and_registered() -> None:
    model, _ = _committed()
    assert model.up.weight is model.down.weight
    x = _inputs()
    with torch.no_grad():
        by_hand = torch.relu(x @ model.down.weight.T @ model.down.weight + model.up.bias)
        assert torch.allclose(model(x), by_hand, atol=1e-6)
    loaded, tokenizer = load_reference("superposition")  # type: ignore[misc]
    assert tokenizer is None
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_training_is_deterministic_smoke() -> None:
    a = sp.train_superposition(seed=5, steps=10, batch_size=64)
    b = sp.train_superposition(seed=5, steps=10, batch_size=64)
    c = sp.train_superposition(seed=6, steps=10, batch_size=64)
    assert torch.equal(a.down.weight, b.down.weight) and torch.equal(a.up.bias, b.up.bias)
    assert not torch.equal(a.down.weight, c.down.weight)
    assert not a.training
    sa = sp.train_sae(a, seed=5, steps=10, batch_size=64)
    sb = sp.train_sae(b, seed=5, steps=10, batch_size=64)
    assert all(torch.equal(sa.tensors()[k], sb.tensors()[k]) for k in sa.tensors())
    assert torch.allclose(sa.W_dec.norm(dim=-1), torch.ones(sp.D_SAE), atol=1e-5)


# --------------------------------------------------------------------------- known answers


def test_model_is_in_superposition() -> None:
    """More features than dimensions are represented, the most important ones first."""
    model, _ = _committed()
    represented = sp.represented_features(model)
    assert MIN_REPRESENTED <= int(represented.sum()) < sp.N_FEATURES
    assert int(represented.sum()) > 2 * sp.D_HIDDEN
    assert represented[:TOP_FEATURES].all()


def test_sae_recovers_the_true_feature_directions() -> None:
    model, sae = _committed()
    cos = sp.feature_recovery(sae, model)
    assert cos.shape == (sp.N_FEATURES,)
    represented = sp.represented_features(model)
    assert float(cos[represented].min()) > MIN_COSINE, cos
    # a different latent for every represented feature
    dirs = torch.nn.functional.normalize(sp.feature_directions(model), dim=-1)
    best = (dirs @ torch.nn.functional.normalize(sae.W_dec, dim=-1).T).argmax(-1)
    assert len(set(best[represented].tolist())) == int(represented.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_splice_keep_is_neutral_and_drop_decodes(backend: str) -> None:
    model, sae = _committed()
    x = _inputs()
    g = iv.Graph()
    g.run("base", inputs=x).read("output", name="base")
    keep = g.run("keep", inputs=x)
    keep.sae_splice(sp.HIDDEN_SITE, sae=sae, error="keep", features="features")
    keep.read("output", name="keep")
    drop = g.run("drop", inputs=x)
    drop.sae_splice(sp.HIDDEN_SITE, sae=sae, error="drop")
    drop.read(sp.HIDDEN_SITE, name="drop.h")
    drop.read("output", name="drop")
    res = iv.run(g, model, backend=backend)
    with torch.no_grad():
        h = model.down(x)
        features = sae.encode(h)
        recon = sae.decode(features)
        by_hand = model.relu(model.up(recon))
        base = model(x)
    torch.testing.assert_close(res["base"], base, atol=ATOL, rtol=0)
    torch.testing.assert_close(res["keep"], base, atol=ATOL, rtol=0)
    torch.testing.assert_close(res["features"], features, atol=ATOL, rtol=0)
    torch.testing.assert_close(res["drop.h"], recon, atol=ATOL, rtol=0)
    torch.testing.assert_close(res["drop"], by_hand, atol=ATOL, rtol=0)
    assert float((by_hand - base).abs().max()) > 10 * ATOL  # dropping the error matters


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_feature_fires_a_latent_along_its_direction(backend: str) -> None:
    """One feature at a time, through the graph: the SAE latent that fires most has a
    decoder direction along that feature's column of ``W``.  (Several latents may share
    a feature, 40 latents for ~15 features, so the top one need not be the best match.)"""
    model, sae = _committed()
    represented = sp.represented_features(model)
    x = torch.eye(sp.N_FEATURES)[represented]  # one active feature per row, magnitude 1
    g = iv.Graph()
    g.run("one-hot", inputs=x).sae_splice(
        sp.HIDDEN_SITE, sae=sae, error="keep", features="features"
    )
    features = iv.run(g, model, backend=backend)["features"]
    assert features.shape == (int(represented.sum()), sp.D_SAE)
    with torch.no_grad():
        torch.testing.assert_close(features, sae.encode(model.down(x)), atol=ATOL, rtol=0)
    dirs = torch.nn.functional.normalize(sp.feature_directions(model)[represented], dim=-1)
    top = features.argmax(-1)
    cos = (dirs * torch.nn.functional.normalize(sae.W_dec, dim=-1)[top]).sum(-1)
    assert float(cos.min()) > MIN_TOP_LATENT_COSINE, cos
    assert bool((features.max(-1).values > 0.1).all())
