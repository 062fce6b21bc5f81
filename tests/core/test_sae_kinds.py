"""The later SAE kinds (gated, BatchTopK, transcoders, constant_norm_rescale) against
hand-written formulas; files (directories, single safetensors, hub releases) bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import interventions as iv
from interventions.errors import SAEError
from interventions.sae import (
    RELEASES,
    SAE_KINDS,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUTranscoder,
    SAEInfo,
    SAERelease,
    SkipTranscoder,
    StandardSAE,
    Transcoder,
    batch_topk,
    load_sae,
    save_sae,
    site_of_hook,
)

GEN = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def example(kind: str, d_in: int = 4, d_sae: int = 6, d_out: int = 3) -> Any:
    """One SAE of each kind, random weights."""
    base = {"W_enc": rand(d_in, d_sae), "b_enc": rand(d_sae) * 0.1}
    sae_dec = {"W_dec": rand(d_sae, d_in), "b_dec": rand(d_in)}
    tc_dec = {"W_dec": rand(d_sae, d_out), "b_dec": rand(d_out)}
    if kind == "relu":
        return StandardSAE(**base, **sae_dec, apply_b_dec_to_input=True)
    if kind == "jumprelu":
        return iv.JumpReLUSAE(**base, **sae_dec, threshold=rand(d_sae).abs() * 0.3)
    if kind == "topk":
        return iv.TopKSAE(**base, **sae_dec, k=2, apply_b_dec_to_input=True)
    if kind == "batchtopk":
        return BatchTopKSAE(**base, **sae_dec, threshold=torch.full((d_sae,), 0.2), k=2.0)
    if kind == "gated":
        return GatedSAE(**base, **sae_dec, r_mag=rand(d_sae) * 0.1, b_mag=rand(d_sae) * 0.1)
    if kind == "transcoder":
        return Transcoder(**base, **tc_dec)
    if kind == "jumprelu_transcoder":
        return JumpReLUTranscoder(**base, **tc_dec, threshold=torch.full((d_sae,), 0.1))
    assert kind == "skip_transcoder"
    return SkipTranscoder(**base, **tc_dec, W_skip=rand(d_out, d_in))


# --- hand-written formulas ------------------------------------------------------------------


def test_gated_by_hand() -> None:
    # x = [1, 2]; W_enc = I; gate pre = x + b_gate = [1 - 2, 2 + 0] = [-1, 2] -> gate [0, 1]
    # magnitude: W_enc * exp(r_mag) = diag(e^0, e^ln2) = diag(1, 2); pre = [1, 4] + b_mag
    sae = GatedSAE(
        torch.eye(2),
        torch.tensor([-2.0, 0.0]),
        torch.eye(2),
        torch.tensor([0.5, 0.5]),
        r_mag=torch.tensor([0.0, float(torch.log(torch.tensor(2.0)))]),
        b_mag=torch.tensor([0.0, -1.0]),
    )
    f = sae.encode(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(f, torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(sae.forward(torch.tensor([1.0, 2.0])), torch.tensor([0.5, 3.5]))


def test_constant_norm_rescale_by_hand() -> None:
    # x = [3, 4]: ||x|| = 5, s = sqrt(2) / 5; the SAE is the identity, so out = x exactly
    sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2),
                      constant_norm_rescale=True)  # fmt: skip
    x = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(sae.encode(x), x * 2**0.5 / 5)
    torch.testing.assert_close(sae.forward(x), x)
    # a bias is added in the rescaled space, so it is scaled back by 1/s = 5/sqrt(2)
    biased = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.tensor([1.0, 0.0]),
                         constant_norm_rescale=True)  # fmt: skip
    torch.testing.assert_close(biased.forward(x), torch.tensor([3.0 + 5 / 2**0.5, 4.0]))


def test_batch_topk_by_hand_and_inference_threshold() -> None:
    pre = torch.tensor([[3.0, 1.0, 0.5], [2.5, 2.0, -1.0]])
    # k = 1.5 per vector, 2 vectors: the 3 largest relu values of the batch survive
    assert batch_topk(pre, 1.5).tolist() == [[3.0, 0.0, 0.0], [2.5, 2.0, 0.0]]
    sae = BatchTopKSAE(torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3),
                       threshold=torch.full((3,), 1.5), k=1.5)  # fmt: skip
    assert sae.encode(pre).tolist() == [[3.0, 0.0, 0.0], [2.5, 2.0, 0.0]]
    assert sae.encode_batch(pre).tolist() == [[3.0, 0.0, 0.0], [2.5, 2.0, 0.0]]


def test_transcoders_by_hand() -> None:
    x = torch.tensor([1.0, -2.0])
    w_enc, b_enc = torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([0.0, -1.0])
    w_dec, b_dec = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]), torch.tensor([0.0, 0.0, 1.0])
    # pre = [1, 2 - 1] = [1, 1]; relu -> [1, 1]; out = [1, 3, 3] + [0, 0, 1]
    tc = Transcoder(w_enc, b_enc, w_dec, b_dec)
    assert (tc.d_in, tc.d_sae, tc.d_out) == (2, 2, 3)
    assert tc.forward(x).tolist() == [1.0, 3.0, 4.0]
    jt = JumpReLUTranscoder(w_enc, b_enc, w_dec, b_dec, threshold=torch.tensor([0.5, 1.0]))
    assert jt.encode(x).tolist() == [1.0, 0.0]  # 1 is not strictly above 1
    w_skip = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    st = SkipTranscoder(w_enc, b_enc, w_dec, b_dec, W_skip=w_skip)
    assert st.forward(x).tolist() == [2.0, 1.0, 3.0]  # + x @ W_skip.T = [1, -2, -1]


@pytest.mark.parametrize("kind", sorted(SAE_KINDS))
def test_kernel_form_equals_forward(kind: str) -> None:
    """The canonical form the nnsight adapter evaluates, written out once more here."""
    sae = example(kind)
    x = rand(5, sae.d_in) * 2
    act, w_enc, b_enc, w_dec, b_dec, extra, b_in, w_skip, rescale = sae.kernel()
    s = (sae.d_in**0.5) / x.norm(dim=-1, keepdim=True) if rescale else torch.ones(5, 1)
    xin = x * s - (b_in if b_in is not None else 0)
    pre = xin @ w_enc + b_enc
    if act == "relu":
        f = pre.clamp(min=0)
    elif act == "jumprelu":
        f = torch.where(pre > extra, pre.clamp(min=0), torch.zeros_like(pre))
    elif act == "topk":
        kth = pre.sort(dim=-1, descending=True).values[:, extra - 1 : extra]
        f = torch.where(pre >= kth, pre.clamp(min=0), torch.zeros_like(pre))
    else:
        f = (pre > 0).float() * (xin @ extra[0] + extra[1]).clamp(min=0)
    out = (f @ w_dec + b_dec) / s + (x @ w_skip.T if w_skip is not None else 0)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.forward(x), out)


# --- files: directories, single files, releases -------------------------------------------------


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", sorted(SAE_KINDS))
@pytest.mark.parametrize("single", [False, True])
def test_save_load_bit_for_bit(kind: str, single: bool, tmp_path: Path) -> None:
    sae = example(kind).with_info(SAEInfo.from_hook("blocks.1.hook_resid_post", model_name="m"))
    target = tmp_path / ("sae.safetensors" if single else "sae")
    loaded = load_sae(save_sae(sae, target, single_file=single))
    if kind == "batchtopk":  # written as JumpReLU with its threshold, as SAELens does
        assert loaded.kind == "jumprelu"
        _bits_equal(loaded.tensors(), {k: v for k, v in sae.tensors().items()})
    else:
        assert type(loaded) is type(sae) and loaded.params() == sae.params()
        _bits_equal(loaded.tensors(), sae.tensors())
    assert loaded.info is not None and loaded.info.where == "resid_post[1]"
    assert loaded.info.model_name == "m"
    x = rand(3, sae.d_in)
    assert torch.equal(loaded.forward(x), sae.forward(x))


def test_gated_file_uses_saelens_names(tmp_path: Path) -> None:
    save_sae(example("gated"), tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sae_weights.safetensors"), "pt") as h:
        assert sorted(h.keys()) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "gated"


def test_expected_average_only_in_folds_the_factor(tmp_path: Path) -> None:
    sae = example("relu")
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(normalize_activations="expected_average_only_in", norm_scaling_factor=2.0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    folded = load_sae(tmp_path)
    x = rand(4, sae.d_in)
    # the SAE saw 2x: encode(2x) and the reconstruction scaled back by 1/2
    torch.testing.assert_close(folded.encode(x), sae.encode(2 * x))
    torch.testing.assert_close(folded.forward(x), sae.forward(2 * x) / 2)
    cfg.pop("norm_scaling_factor")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert torch.equal(load_sae(tmp_path).forward(x), sae.forward(x))  # identity, as SAELens 6


def test_single_file_without_config_is_named(tmp_path: Path) -> None:
    save_file(example("relu").tensors(), str(tmp_path / "w.safetensors"))
    with pytest.raises(SAEError, match="no config"):
        load_sae(tmp_path / "w.safetensors")
    sae = load_sae(
        tmp_path / "w.safetensors", cfg={"architecture": "standard", "d_in": 4, "d_sae": 6}
    )
    assert sae.kind == "relu"


def test_site_of_hook() -> None:
    assert site_of_hook("blocks.8.hook_resid_pre") == ("resid_pre", 8)
    assert site_of_hook("blocks.0.mlp.hook_post") == ("mlp_hidden", 0)
    assert site_of_hook("hook_embed") == ("embed", None)
    assert site_of_hook("blocks.3.attn.hook_z") is None


def make_hub_cache(cache: Path, repo_id: str, folders: dict[str, Any], rev: str) -> None:
    """The layout huggingface_hub reads offline: models--org--name/{refs/main, snapshots/rev}."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    for folder, sae in folders.items():
        save_sae(sae, root / "snapshots" / rev / folder)


RELEASE = SAERelease.layered("org/tiny-saes", "tiny", "blocks.{layer}.hook_resid_pre", range(2))
REV = "0" * 40


def test_load_by_release_through_the_hub_cache(tmp_path: Path) -> None:
    saes = {f"blocks.{i}.hook_resid_pre": example("topk") for i in range(2)}
    make_hub_cache(tmp_path, "org/tiny-saes", saes, REV)
    sae = load_sae(
        release=RELEASE, sae_id="blocks.1.hook_resid_pre", cache_dir=tmp_path, local_files_only=True
    )
    _bits_equal(sae.tensors(), saes["blocks.1.hook_resid_pre"].tensors())
    assert sae.info is not None and (sae.info.site, sae.info.layer) == ("resid_pre", 1)
    assert sae.info.release == "org/tiny-saes" and sae.info.model_name == "tiny"
    again = load_sae(release=RELEASE, sae_id="blocks.0.hook_resid_pre", revision=REV,
                     cache_dir=tmp_path, local_files_only=True)  # fmt: skip
    _bits_equal(again.tensors(), saes["blocks.0.hook_resid_pre"].tensors())
    with pytest.raises(SAEError, match=r"blocks\.1\.hook_resid_pre"):
        load_sae(release=RELEASE, sae_id="blocks.7.hook_resid_pre", cache_dir=tmp_path)
    with pytest.raises(SAEError, match="gpt2-small-res-jb"):
        load_sae(release="gpt2-small-res-jbb", sae_id="x")
    with pytest.raises(SAEError, match="could not get"):
        load_sae(release=RELEASE, sae_id="blocks.0.hook_resid_pre", revision="1" * 40,
                 cache_dir=tmp_path, local_files_only=True)  # fmt: skip


def test_builtin_release_offline_via_environment(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE, in a fresh interpreter (they are read at import)."""
    release = RELEASES["gpt2-small-res-jb"]
    make_hub_cache(tmp_path, release.repo_id, {"blocks.8.hook_resid_pre": example("relu")}, REV)
    code = (
        "import interventions as iv\n"
        "s = iv.load_sae(release='gpt2-small-res-jb', sae_id='blocks.8.hook_resid_pre')\n"
        "print(s.kind, s.info.where, s.info.model_name)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["relu", "resid_pre[8]", "gpt2"]


def test_splice_needs_no_site_when_the_sae_knows_it() -> None:
    sae = example("relu", d_in=4).with_info(SAEInfo.from_hook("blocks.1.hook_resid_pre"))
    g = iv.Graph()
    g.run("a", inputs=torch.ones(1, 2, 4)).sae_splice(sae=sae)
    assert str(g.ops[0].site) == "resid_pre[1]"
    with pytest.raises(iv.SpecError, match="hook_z"):
        iv.Graph().run("a", inputs=torch.ones(1, 2, 4)).sae_splice(
            sae=sae.with_info(SAEInfo.from_hook("blocks.1.attn.hook_z"))
        )
