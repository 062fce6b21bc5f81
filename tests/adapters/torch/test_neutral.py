"""DESIGN law 3 on the torch reference: neutral ops leave the outputs unchanged.

Each op is put on every standard site of a family at once (raw sites on the toy net), and
the logits are compared with a plain forward pass of the model with no hooks at all.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from torch.testing import assert_close

import interventions as iv
from tests.adapters.torch.hand import (
    FP32,
    IDS,
    MODELS,
    capture,
    forward,
    hand_sae,
    logits_with,
    model_of,
    run,
    site_of,
)

SITES = [
    ("embed", None),
    ("resid_pre", 0),
    ("attn_out", 0),
    ("head", 1),
    ("mlp_hidden", 0),
    ("mlp_out", 1),
    ("resid_post", 1),
    ("final_norm", None),
    ("logits", None),
]


def sites(family: str) -> list[tuple[str, int | None]]:
    return [site_of(family, s, layer) for s, layer in SITES if family != "toy" or s != "head"]


@cache
def widths(family: str) -> dict[tuple[str, int | None], int]:
    model = model_of(family)
    found = capture(model, family, sites(family))  # head: [b, pos, head, d_head]
    return {site: t.shape[-1] for site, t in zip(sites(family), found, strict=True)}


def logits_after(family: str, put: Any) -> tuple[iv.Results, torch.Tensor]:
    """Run a graph whose run 'x' gets ``put(handle, site, layer, width)`` at every site."""
    g = iv.Graph()
    x = g.run("x", tokens=IDS)
    for (site, layer), width in widths(family).items():
        put(x, site, layer, width)
    x.read(*site_of(family, "logits"), name="out")
    return run(g, model_of(family)), forward(model_of(family), IDS)


@pytest.mark.parametrize("family", MODELS)
def test_patching_a_run_with_its_own_activations(family: str) -> None:
    model = model_of(family)
    g = iv.Graph()
    first = g.run("first", tokens=IDS)
    second = g.run("second", tokens=IDS)
    for site, layer in sites(family):
        value = first.read(site, layer)
        second.patch(site, layer, value=value)
        second.patch(site, layer, value=value, pos=-1)  # aligned, with a selector
        if site == "head":
            second.patch(site, layer, value=value, head=[0, 2], pos=slice(1, 3))
    first.read(*site_of(family, "logits"), name="first_out")
    second.read(*site_of(family, "logits"), name="out")
    res = run(g, model)
    clean = forward(model, IDS)
    assert_close(res["first_out"], clean, **FP32)
    assert_close(res["out"], clean, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_adding_a_zero_direction(family: str) -> None:
    res, clean = logits_after(
        family, lambda x, s, layer, w: x.add(s, layer, direction=torch.zeros(w), scale=5.0)
    )
    assert_close(res["out"], clean, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_scaling_by_one(family: str) -> None:
    res, clean = logits_after(family, lambda x, s, layer, w: x.scale(s, layer, factor=1.0))
    assert_close(res["out"], clean, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_sae_splice_with_error_kept_and_no_edits(family: str) -> None:
    """A bad SAE (random weights): the error term carries everything, and is added back."""

    def splice(x: iv.RunHandle, s: str, layer: int | None, w: int) -> None:
        x.sae_splice(s, layer, sae=hand_sae(w, seed=w).sae(), error="keep")

    res, clean = logits_after(family, splice)
    assert_close(res["out"], clean, **FP32)

    def detached(x: iv.RunHandle, s: str, layer: int | None, w: int) -> None:
        x.sae_splice(s, layer, sae=hand_sae(w, seed=w).sae(), error="detach", pos=[0, -1])

    res, clean = logits_after(family, detached)
    assert_close(res["out"], clean, **FP32)


@pytest.mark.parametrize("family", MODELS)
def test_sae_splice_with_error_dropped_is_the_reconstruction(family: str) -> None:
    """error='drop' = patching sae.decode(sae.encode(x)) in by hand."""
    model = model_of(family)
    checked = 0
    chosen = [  # resid_pre, head, mlp_out, final_norm
        site_of(family, s, layer) for s, layer in SITES[1::2] if family != "toy" or s != "head"
    ]
    for (site, layer), width in widths(family).items():
        if (site, layer) not in chosen:
            continue
        sae = hand_sae(width, seed=100 + width).sae()
        g = iv.Graph()
        x = g.run("x", tokens=IDS)
        x.sae_splice(site, layer, sae=sae, error="drop")
        x.read(*site_of(family, "logits"), name="out")

        def recon(t: torch.Tensor, sae: Any = sae) -> torch.Tensor:
            return sae.decode(sae.encode(t))

        want = logits_with(model, family, [(site, layer, recon)])
        assert_close(run(g, model)["out"], want, **FP32)
        assert not torch.allclose(want, forward(model, IDS), atol=1e-3)  # not neutral
        checked += 1
    assert checked >= 3
