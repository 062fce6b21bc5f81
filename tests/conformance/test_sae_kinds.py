"""Every SAE kind spliced on all three backends: the same numbers as the torch reference,
whose features equal the kind's own ``encode`` of the clean activations (held to the
hand formulas in tests/core/test_sae_kinds.py), and position 0 (BOS) left alone by
``pos=slice(1, None)``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import interventions as iv
from interventions.architectures import describe
from interventions.sae import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUTranscoder,
    SkipTranscoder,
    StandardSAE,
    Transcoder,
)
from tests.tiny_models import hf_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
GEN = torch.Generator().manual_seed(3)
IDS = torch.randint(4, 60, (2, 6), generator=GEN)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * 0.5


def kinds(d: int, s: int = 8) -> dict[str, Any]:
    enc = {"W_enc": rand(d, s), "b_enc": rand(s) * 0.2}
    dec = {"W_dec": rand(s, d), "b_dec": rand(d) * 0.2}
    return {
        "rescaled-relu": StandardSAE(**enc, **dec, constant_norm_rescale=True),
        "batchtopk": BatchTopKSAE(
            **enc, **dec, threshold=torch.full((s,), 0.1), k=2.0, apply_b_dec_to_input=True
        ),
        "gated": GatedSAE(**enc, **dec, r_mag=rand(s) * 0.2, b_mag=rand(s) * 0.2),
        "transcoder": Transcoder(**enc, **dec),
        "jumprelu_transcoder": JumpReLUTranscoder(**enc, **dec, threshold=torch.full((s,), 0.1)),
        "skip_transcoder": SkipTranscoder(**enc, **dec, W_skip=rand(d, d) * 0.3),
    }


def backends() -> list[str]:
    out = ["torch"]
    for name in ("nnsight", "pyvene"):
        try:
            __import__(name)
            out.append(name)
        except ImportError:
            pass
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_kind_on_every_backend(family: str) -> None:
    model = hf_model(family)
    d = int(describe(model).d_model or 0)
    edits = [iv.FeatureEdit.set(1, 2.0), iv.FeatureEdit.clamp([3, 4], high=0.1)]
    g = iv.Graph()
    clean = g.run("clean", tokens=IDS)
    clean.read("resid_post", 0, name="clean.site")
    saes = kinds(d)
    for name, sae in saes.items():
        for error in ("keep", "drop", "detach"):
            run = g.run(f"{name}-{error}", tokens=IDS)
            run.sae_splice("resid_post", 0, sae=sae, edits=edits, error=error,
                           features=f"{run.name}.f", pos=slice(1, None))  # fmt: skip
            run.read("resid_post", 0, name=f"{run.name}.site")
            run.read("logits", name=f"{run.name}.logits")
    ref = iv.run(g, model, backend="torch")
    x = ref["clean.site"]
    for name, sae in saes.items():
        for error in ("keep", "drop", "detach"):
            got = ref[f"{name}-{error}.f"]
            torch.testing.assert_close(got, sae.encode(x[:, 1:]), **TOL)
            site = ref[f"{name}-{error}.site"]
            assert torch.equal(site[:, 0], x[:, 0])  # BOS untouched
            if error == "drop":
                f = sae.encode(x[:, 1:])
                f[..., 1] = 2.0
                f[..., 3:5] = f[..., 3:5].clamp(max=0.1)
                torch.testing.assert_close(site[:, 1:], sae.reconstruct(f, x[:, 1:]), **TOL)
    for backend in backends()[1:]:
        got = iv.run(g, model, backend=backend)
        assert sorted(got) == sorted(ref)
        for key in ref:
            torch.testing.assert_close(
                got[key], ref[key], **TOL, msg=lambda m, k=key, b=backend: f"{b} {k!r}: {m}"
            )


def test_neutral_with_error_kept() -> None:
    """Law 3 for the new kinds: an SAE spliced with its error kept changes nothing."""
    model = hf_model("gpt2")
    d = int(describe(model).d_model or 0)
    g = iv.Graph()
    g.run("base", tokens=IDS).read("logits", name="base")
    for i, sae in enumerate(kinds(d).values()):
        run = g.run(f"r{i}", tokens=IDS)
        run.sae_splice("mlp_out", 1, sae=sae)
        run.read("logits", name=f"r{i}")
    for backend in backends():
        out = iv.run(g, model, backend=backend)
        for i in range(len(kinds(d))):
            torch.testing.assert_close(out[f"r{i}"], out["base"], **TOL)
