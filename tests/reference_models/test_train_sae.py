"""iv.train_sae: the known answer on the superposition model (every represented true feature
has a decoder row at cosine >= 0.95, seeds 0-2), checkpoints in SAELens's format, and the
TopK and JumpReLU objectives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import interventions as iv
import interventions.reference_models.superposition as sp
from interventions.sae.training import TrainStats

STEPS = 1500  # with lr 1e-2; measured min cosines 0.993 / 0.998 / 0.994 on seeds 0 / 1 / 2


def data(seed: int, steps: int, chunk: int = 8192) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    return [sp.feature_batch(chunk, gen) for _ in range(steps * 1024 // chunk + 1)]


@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_train_sae_recovers_the_true_features(seed: int) -> None:
    torch.set_num_threads(1)
    model = sp.load_superposition_model()
    sae = iv.train_sae(
        model, sp.HIDDEN_SITE, data(seed, STEPS), d_sae=40, steps=STEPS, lr=1e-2, seed=seed,
        progress=False,
    )  # fmt: skip
    cos = sp.feature_recovery(sae, model)
    represented = sp.represented_features(model)
    assert int(represented.sum()) >= 12
    assert float(cos[represented].min()) >= 0.95, cos[represented]


def test_checkpoints_and_result_are_saelens_directories(tmp_path: Path) -> None:
    model = sp.load_superposition_model()
    stats: list[TrainStats] = []
    sae = iv.train_sae(
        model, sp.HIDDEN_SITE, data(0, 40), d_sae=16, steps=40, progress=False,
        checkpoint_dir=tmp_path / "ck", checkpoint_every=20, out=tmp_path / "final", stats=stats,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_20", "step_40"]
    loaded = iv.load_sae(tmp_path / "final")
    for key, value in sae.tensors().items():
        assert torch.equal(loaded.tensors()[key], value)
    assert stats[0].steps == 40 and stats[0].tokens == 40 * 1024
    assert loaded.info is None  # a raw site has no TransformerLens hook name to save


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_other_objectives_train_and_reconstruct(kind: str) -> None:
    model = sp.load_superposition_model()
    stats: list[TrainStats] = []
    sae = iv.train_sae(
        model, sp.HIDDEN_SITE, data(0, 300), kind=kind, d_sae=40, k=3, steps=300, lr=1e-2,
        progress=False, stats=stats,
    )  # fmt: skip
    assert sae.kind == kind
    h = sp.feature_batch(4096, torch.Generator().manual_seed(7)) @ model.down.weight.detach().T
    fvu = ((sae.forward(h) - h) ** 2).sum() / ((h - h.mean(0)) ** 2).sum()
    assert float(fvu) < 0.5, (kind, float(fvu))
    l0 = float((sae.encode(h) > 0).float().sum(-1).mean())
    assert l0 <= (3 if kind == "topk" else 20), l0
