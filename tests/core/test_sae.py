"""Tests of interventions.sae: the three SAE kinds, and SAELens directories on disk."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from interventions.errors import InterventionError, SAEError
from interventions.sae import (
    CFG_FILENAME,
    SAE,
    SAE_KINDS,
    WEIGHTS_FILENAME,
    JumpReLUSAE,
    StandardSAE,
    TopKSAE,
    load_sae,
    sae_from_parts,
    save_sae,
)

FAST = settings(max_examples=40, deadline=None)
# The three kinds these tests were written for; the later kinds are in test_sae_kinds.py.
FIRST_KINDS = ("jumprelu", "relu", "topk")

# --- a 2 -> 3 SAE whose outputs are worked out by hand -----------------------------------------
#   x = [1, 2]
#   x @ W_enc = [1*1 + 2*2, 1*0 + 2*1, 1*-1 + 2*0] = [5, 2, -1]
#   pre = x @ W_enc + b_enc = [5, 1, -0.5]
W_ENC = torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
B_ENC = torch.tensor([0.0, -1.0, 0.5])
W_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
B_DEC = torch.tensor([1.0, 1.0])
X = torch.tensor([1.0, 2.0])


def hand_parts() -> dict[str, Any]:
    return {
        "W_enc": W_ENC.clone(),
        "b_enc": B_ENC.clone(),
        "W_dec": W_DEC.clone(),
        "b_dec": B_DEC.clone(),
    }


def random_parts(
    d_in: int, d_sae: int, seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g, dtype=dtype),
        "b_enc": torch.randn(d_sae, generator=g, dtype=dtype),
        "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=dtype),
        "b_dec": torch.randn(d_in, generator=g, dtype=dtype),
    }


def make(kind: str, parts: dict[str, Any], apply: bool = False, **extra: Any) -> Any:
    if kind == "jumprelu":
        extra.setdefault("threshold", torch.full_like(parts["b_enc"], 0.25))
    if kind == "topk":
        extra.setdefault("k", min(2, parts["b_enc"].shape[0]))
    return SAE_KINDS[kind](**parts, **extra, apply_b_dec_to_input=apply)


# --- hand-computed oracles ------------------------------------------------------------------------


def test_standard_encode_decode_by_hand() -> None:
    sae = StandardSAE(**hand_parts())
    assert (sae.d_in, sae.d_sae) == (2, 3)
    assert sae.pre_activation(X).tolist() == [5.0, 1.0, -0.5]
    f = sae.encode(X)
    assert f.tolist() == [5.0, 1.0, 0.0]
    # [5, 1, 0] @ W_dec = [5 + 0, 0 + 1] = [5, 1]; + b_dec = [6, 2]
    assert sae.decode(f).tolist() == [6.0, 2.0]
    assert sae.forward(X).tolist() == [6.0, 2.0]


def test_standard_applies_b_dec_to_input_by_hand() -> None:
    sae = StandardSAE(**hand_parts(), apply_b_dec_to_input=True)
    # x - b_dec = [0, 1]; @ W_enc = [2, 1, 0]; + b_enc = [2, 0, 0.5]
    assert sae.encode(X).tolist() == [2.0, 0.0, 0.5]


def test_jumprelu_by_hand() -> None:
    # pre = [5, 1, -0.5]; thresholds [5, 0.5, -1]:
    #   5 > 5 is false -> 0;  1 > 0.5 -> 1;  -0.5 > -1 but relu(-0.5) = 0 -> 0 (SAELens's rule)
    sae = JumpReLUSAE(**hand_parts(), threshold=torch.tensor([5.0, 0.5, -1.0]))
    assert sae.encode(X).tolist() == [0.0, 1.0, 0.0]
    # a threshold just below 5 lets the first feature through, unchanged
    sae = JumpReLUSAE(**hand_parts(), threshold=torch.tensor([4.9, 0.5, -1.0]))
    assert sae.encode(X).tolist() == [5.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("k", "expected"), [(1, [5.0, 0.0, 0.0]), (2, [5.0, 1.0, 0.0]), (3, [5.0, 1.0, 0.0])]
)
def test_topk_by_hand(k: int, expected: list[float]) -> None:
    # k = 3 keeps -0.5 too, and the ReLU then zeroes it, as SAELens's TopK does
    assert TopKSAE(**hand_parts(), k=k).encode(X).tolist() == expected


def test_topk_batched_rows_are_independent() -> None:
    sae = TopKSAE(**hand_parts(), k=1)
    x = torch.tensor([[[1.0, 2.0], [0.0, -1.0]], [[-1.0, 0.0], [3.0, 0.0]]])
    f = sae.encode(x)
    assert f.shape == (2, 2, 3)
    for i in range(2):
        for j in range(2):
            assert torch.equal(f[i, j], sae.encode(x[i, j]))


@pytest.mark.parametrize("kind", FIRST_KINDS)
def test_encode_decode_accept_any_leading_shape(kind: str) -> None:
    sae = make(kind, random_parts(4, 6, seed=1))
    x = torch.randn(2, 3, 5, 4)
    f = sae.encode(x)
    assert f.shape == (2, 3, 5, 6)
    assert sae.decode(f).shape == (2, 3, 5, 4)
    assert torch.allclose(sae.encode(x.reshape(-1, 4)).reshape(f.shape), f)


def test_inputs_are_cast_to_the_sae_dtype() -> None:
    sae = StandardSAE(**hand_parts()).to(dtype=torch.float64)
    f = sae.encode(X.to(torch.float16))
    assert f.dtype == torch.float64
    assert sae.decode(f.to(torch.float32)).dtype == torch.float64


# --- properties -----------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8), shift=st.floats(-3.0, 3.0))
def test_topk_keeps_the_k_largest(seed: int, k: int, shift: float) -> None:
    parts = random_parts(5, 8, seed)
    parts["b_enc"] = parts["b_enc"] + shift
    sae = TopKSAE(**parts, k=k)
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(seed + 1))
    pre = sae.pre_activation(x)
    f = sae.encode(x)
    nonzero = (f != 0).sum(-1)
    assert bool((nonzero <= k).all())
    # every kept value is its pre-activation, positive, and among the k largest
    kth = pre.topk(k, dim=-1).values[..., -1:]
    kept = f != 0
    assert torch.equal(f[kept], pre[kept])
    assert bool((pre[kept] > 0).all())
    assert bool((pre >= kth)[kept].all())
    # exactly k survive wherever the k largest are all positive
    assert torch.equal(
        nonzero[(kth > 0).squeeze(-1)], torch.full_like(nonzero[(kth > 0).squeeze(-1)], k)
    )


@FAST
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(-1.0, 1.0))
def test_jumprelu_fires_strictly_above_threshold(seed: int, scale: float) -> None:
    parts = random_parts(4, 9, seed)
    g = torch.Generator().manual_seed(seed + 7)
    threshold = scale * torch.rand(9, generator=g)
    sae = JumpReLUSAE(**parts, threshold=threshold)
    x = torch.randn(6, 4, generator=g)
    pre = sae.pre_activation(x)
    f = sae.encode(x)
    fires = (pre > threshold) & (pre > 0)
    assert torch.equal(f, torch.where(fires, pre, torch.zeros_like(pre)))


@FAST
@given(seed=st.integers(0, 2**31 - 1), apply=st.booleans())
def test_standard_matches_reference_formula(seed: int, apply: bool) -> None:
    p = random_parts(3, 5, seed)
    sae = StandardSAE(**p, apply_b_dec_to_input=apply)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed + 3))
    x_in = x - p["b_dec"] if apply else x
    assert torch.allclose(sae.encode(x), torch.relu(x_in @ p["W_enc"] + p["b_enc"]))


def perfect_parts(d_in: int, b_dec: torch.Tensor) -> dict[str, Any]:
    """d_sae = 2 d_in features +v and -v: relu(v) - relu(-v) = v, so decode(encode(x)) = x."""
    eye = torch.eye(d_in, dtype=torch.float64)
    return {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * d_in, dtype=torch.float64),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_dec": b_dec,
    }


@FAST
@given(
    x=st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4),
    b=st.lists(st.floats(-10.0, 10.0), min_size=4, max_size=4),
)
def test_perfect_reconstruction_for_every_kind(x: list[float], b: list[float]) -> None:
    xt = torch.tensor(x, dtype=torch.float64)
    parts = perfect_parts(4, torch.tensor(b, dtype=torch.float64))
    saes = [
        StandardSAE(**parts, apply_b_dec_to_input=True),
        JumpReLUSAE(
            **parts, threshold=torch.zeros(8, dtype=torch.float64), apply_b_dec_to_input=True
        ),
        TopKSAE(**parts, k=4, apply_b_dec_to_input=True),
    ]
    for sae in saes:
        assert torch.allclose(sae.forward(xt), xt, atol=1e-9), type(sae).__name__


def test_perfect_reconstruction_with_pseudo_inverse() -> None:
    # features stay positive (big b_enc), so the SAE is affine and pinv inverts it
    g = torch.Generator().manual_seed(0)
    W_enc = torch.randn(3, 6, generator=g, dtype=torch.float64)
    b_enc = torch.full((6,), 100.0, dtype=torch.float64)
    W_dec = torch.linalg.pinv(W_enc)
    b_dec = -(b_enc @ W_dec)
    sae = StandardSAE(W_enc, b_enc, W_dec, b_dec)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(sae.forward(x), x, atol=1e-9)


# --- dataclass behaviour --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FIRST_KINDS)
def test_parts_round_trip_and_protocol(kind: str) -> None:
    sae = make(kind, random_parts(3, 4, seed=2), apply=True)
    assert sae.kind == kind and SAE_KINDS[kind] is type(sae)
    assert isinstance(sae, SAE)
    rebuilt = sae_from_parts(kind, sae.tensors(), sae.params())
    assert type(rebuilt) is type(sae)
    assert rebuilt.params() == sae.params()
    assert all(torch.equal(rebuilt.tensors()[n], t) for n, t in sae.tensors().items())
    assert set(sae.params()) == {"apply_b_dec_to_input"} | ({"k"} if kind == "topk" else set())
    expected_tensors = {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if kind == "jumprelu" else set()
    )
    assert set(sae.tensors()) == expected_tensors
    assert "d_in=3, d_sae=4" in repr(sae)


def test_protocol_accepts_duck_types_and_rejects_others() -> None:
    class Duck:
        d_in = 2
        d_sae = 3

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def decode(self, f: torch.Tensor) -> torch.Tensor:
            return f

    assert isinstance(Duck(), SAE)
    assert not isinstance(object(), SAE)


def test_frozen_and_to_returns_new_instance() -> None:
    sae = JumpReLUSAE(**hand_parts(), threshold=torch.zeros(3))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sae.W_enc = torch.zeros(2, 3)  # type: ignore[misc]
    moved = sae.to(dtype=torch.float64)
    assert moved is not sae and type(moved) is JumpReLUSAE
    assert all(t.dtype == torch.float64 for t in moved.tensors().values())
    assert sae.W_enc.dtype == torch.float32
    assert moved.params() == sae.params()
    assert sae.to("cpu").device == torch.device("cpu")
    topk = TopKSAE(**hand_parts(), k=2).to(dtype=torch.bfloat16)
    assert topk.k == 2 and topk.dtype == torch.bfloat16


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(SAEError) as info:
        sae_from_parts("gatd", hand_parts(), {})
    msg = str(info.value)
    assert "'gatd'" in msg and all(k in msg for k in ("relu", "jumprelu", "topk"))
    assert isinstance(info.value, InterventionError)


def test_from_parts_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(SAEError, match="unexpected tensor 'W_encc'"):
        StandardSAE.from_parts({**hand_parts(), "W_encc": W_ENC}, {})
    with pytest.raises(SAEError, match="unexpected param 'kk'"):
        TopKSAE.from_parts(hand_parts(), {"kk": 1})
    with pytest.raises(SAEError, match="missing 'k'"):
        TopKSAE.from_parts(hand_parts(), {})
    parts = hand_parts()
    del parts["b_dec"]
    with pytest.raises(SAEError, match="missing 'b_dec'"):
        StandardSAE.from_parts(parts, {})


BAD_PARTS = [
    ("W_enc", torch.zeros(2, 3, 1), "W_enc", "[2, 3, 1]"),
    ("b_enc", torch.zeros(4), "b_enc", "[4]"),
    ("W_dec", torch.zeros(2, 3), "W_dec", "[2, 3]"),
    ("b_dec", torch.zeros(3), "b_dec", "[3]"),
    ("b_dec", [1.0, 1.0], "b_dec", "torch.Tensor"),
    ("b_enc", torch.zeros(3, dtype=torch.int64), "b_enc", "int64"),
    ("b_enc", torch.zeros(3, dtype=torch.float64), "b_enc", "float64"),
]


@pytest.mark.parametrize(("field", "value", "name", "detail"), BAD_PARTS)
def test_bad_shapes_and_types_name_the_tensor(
    field: str, value: Any, name: str, detail: str
) -> None:
    parts: dict[str, Any] = hand_parts()
    parts[field] = value
    with pytest.raises(SAEError) as info:
        StandardSAE(**parts)
    msg = str(info.value)
    assert repr(name) in msg and detail in msg


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"threshold": torch.zeros(2)}, "'threshold' has shape [2], expected [3]"),
        ({"threshold": torch.zeros(1, 3)}, "'threshold' has shape [1, 3]"),
    ],
)
def test_jumprelu_threshold_shape(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(SAEError) as info:
        JumpReLUSAE(**hand_parts(), **kwargs)
    assert needle in str(info.value)


@pytest.mark.parametrize("k", [0, 4, -1, True, 2.0])
def test_topk_rejects_bad_k(k: Any) -> None:
    with pytest.raises(SAEError, match="k"):
        TopKSAE(**hand_parts(), k=k)


def test_encode_and_decode_check_the_width() -> None:
    sae = StandardSAE(**hand_parts())
    with pytest.raises(SAEError, match=r"input x has shape \[4, 3\], expected \[..., 2\]"):
        sae.encode(torch.zeros(4, 3))
    with pytest.raises(SAEError, match=r"features f has shape \[2\], expected \[..., 3\]"):
        sae.decode(torch.zeros(2))


# --- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FIRST_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_save_load_round_trip(kind: str, dtype: torch.dtype, tmp_path: Path) -> None:
    sae = make(kind, random_parts(5, 7, seed=3, dtype=dtype), apply=True)
    out = save_sae(
        sae, tmp_path / "nested" / "sae", metadata={"hook_name": "blocks.1.hook_resid_post"}
    )
    assert sorted(p.name for p in out.iterdir()) == [CFG_FILENAME, WEIGHTS_FILENAME]
    loaded = load_sae(out)
    assert type(loaded) is type(sae)
    assert loaded.params() == sae.params()
    for name, t in sae.tensors().items():
        assert loaded.tensors()[name].dtype == dtype
        assert torch.equal(loaded.tensors()[name], t), name
    cfg = json.loads((out / CFG_FILENAME).read_text())
    assert cfg["architecture"] == {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[kind]
    assert cfg["d_in"] == 5 and cfg["d_sae"] == 7 and cfg["apply_b_dec_to_input"] is True
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    if kind == "topk":
        assert cfg["k"] == 2


def test_load_casts_and_moves(tmp_path: Path) -> None:
    save_sae(StandardSAE(**hand_parts()), tmp_path)
    sae = load_sae(tmp_path, device="cpu", dtype=torch.float64)
    assert sae.dtype == torch.float64 and sae.encode(X).tolist() == [5.0, 1.0, 0.0]


def test_save_overwrites_existing_directory(tmp_path: Path) -> None:
    save_sae(StandardSAE(**hand_parts()), tmp_path)
    save_sae(TopKSAE(**hand_parts(), k=1), tmp_path)
    assert isinstance(load_sae(tmp_path), TopKSAE)


def test_load_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_sae(JumpReLUSAE(**hand_parts(), threshold=torch.zeros(3)), tmp_path)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert isinstance(load_sae(tmp_path), JumpReLUSAE)


def test_save_rejects_foreign_saes_and_bad_targets(tmp_path: Path) -> None:
    class Duck:
        d_in = 2
        d_sae = 3

    with pytest.raises(SAEError, match="Duck"):
        save_sae(Duck(), tmp_path)  # type: ignore[arg-type]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SAEError, match="not a directory"):
        save_sae(StandardSAE(**hand_parts()), a_file)
    with pytest.raises(SAEError, match="JSON"):
        save_sae(StandardSAE(**hand_parts()), tmp_path / "m", metadata={"x": object()})


# --- directories written by hand in SAELens's layouts --------------------------------------------


def write_dir(
    path: Path, cfg: dict[str, Any] | str | None, tensors: dict[str, torch.Tensor] | bytes | None
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        (path / CFG_FILENAME).write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if isinstance(tensors, bytes):
        (path / WEIGHTS_FILENAME).write_bytes(tensors)
    elif tensors is not None:
        save_file(tensors, str(path / WEIGHTS_FILENAME))
    return path


def v5_cfg(**changes: Any) -> dict[str, Any]:
    """The keys SAELens 5's ``SAEConfig.to_dict`` wrote (sae_lens/sae.py, v5.9.2)."""
    cfg: dict[str, Any] = {
        "architecture": "standard",
        "d_in": 2,
        "d_sae": 3,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_name": "blocks.8.hook_resid_pre",
        "hook_layer": 8,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "dataset_trust_remote_code": True,
        "context_size": 128,
        "normalize_activations": "none",
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not ...}


def v6_cfg(architecture: Any, **changes: Any) -> dict[str, Any]:
    """What SAELens 6's ``SAEConfig.to_dict`` writes (sae_lens/saes/sae.py)."""
    cfg: dict[str, Any] = {
        "d_in": 2,
        "d_sae": 3,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12"},
        "architecture": architecture,
    }
    if architecture == "topk":
        cfg.update(k=2, rescale_acts_by_decoder_norm=False)
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not ...}


def test_load_v5_standard(tmp_path: Path) -> None:
    sae = load_sae(write_dir(tmp_path, v5_cfg(), hand_parts()))
    assert isinstance(sae, StandardSAE) and sae.apply_b_dec_to_input
    assert sae.encode(X).tolist() == [2.0, 0.0, 0.5]


def test_load_v5_oldest_keys_default_like_saelens(tmp_path: Path) -> None:
    # no architecture, "activation_fn" and no apply_b_dec_to_input: SAELens defaults to
    # standard / relu / True; a boolean normalize_activations false means "none"
    cfg = v5_cfg(
        architecture=...,
        activation_fn_str=...,
        apply_b_dec_to_input=...,
        normalize_activations=False,
    )
    cfg["activation_fn"] = "relu"
    cfg["hook_point"] = cfg.pop("hook_name")
    sae = load_sae(write_dir(tmp_path, cfg, hand_parts()))
    assert isinstance(sae, StandardSAE) and sae.apply_b_dec_to_input is True


def test_load_v5_topk_is_standard_with_topk_activation(tmp_path: Path) -> None:
    cfg = v5_cfg(
        activation_fn_str="topk", activation_fn_kwargs={"k": 1}, apply_b_dec_to_input=False
    )
    sae = load_sae(write_dir(tmp_path, cfg, hand_parts()))
    assert isinstance(sae, TopKSAE) and sae.k == 1
    assert sae.encode(X).tolist() == [5.0, 0.0, 0.0]


def test_load_v5_jumprelu(tmp_path: Path) -> None:
    parts = {**hand_parts(), "threshold": torch.tensor([5.0, 0.5, -1.0])}
    sae = load_sae(
        write_dir(tmp_path, v5_cfg(architecture="jumprelu", apply_b_dec_to_input=False), parts)
    )
    assert isinstance(sae, JumpReLUSAE)
    assert sae.encode(X).tolist() == [0.0, 1.0, 0.0]


def test_load_v5_all_ones_scaling_factor_is_dropped(tmp_path: Path) -> None:
    parts = {**hand_parts(), "scaling_factor": torch.ones(3)}
    sae = load_sae(write_dir(tmp_path, v5_cfg(), parts))
    assert torch.equal(sae.W_dec, W_DEC)


@pytest.mark.parametrize("name", ["scaling_factor", "finetuning_scaling_factor"])
def test_load_v5_finetuning_scaling_factor_is_folded(name: str, tmp_path: Path) -> None:
    scale = torch.tensor([2.0, 0.5, 3.0])
    parts = {**hand_parts(), name: scale}
    sae = load_sae(write_dir(tmp_path, v5_cfg(finetuning_scaling_factor=True), parts))
    f = torch.tensor([1.0, 2.0, 3.0])
    # SAELens 5: decode(f) = (f * scale) @ W_dec + b_dec
    assert torch.allclose(sae.decode(f), (f * scale) @ W_DEC + B_DEC)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_load_v6_layouts(arch: str, tmp_path: Path) -> None:
    parts = hand_parts()
    if arch == "jumprelu":
        parts["threshold"] = torch.tensor([4.9, 0.5, -1.0])
    sae = load_sae(write_dir(tmp_path, v6_cfg(arch), parts))
    assert type(sae).kind == {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    assert sae.apply_b_dec_to_input is False
    assert sae.encode(X).tolist() == [5.0, 1.0, 0.0]


def test_load_v6_log_threshold_and_dtype_spelling(tmp_path: Path) -> None:
    parts = {**hand_parts(), "log_threshold": torch.log(torch.tensor([4.9, 0.5, 2.0]))}
    sae = load_sae(write_dir(tmp_path, v6_cfg("jumprelu", dtype="torch.float64"), parts))
    assert isinstance(sae, JumpReLUSAE) and sae.dtype == torch.float64
    assert torch.allclose(sae.threshold, torch.tensor([4.9, 0.5, 2.0], dtype=torch.float64))
    assert torch.allclose(sae.encode(X), torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64))


def test_load_v6_hook_z_and_null_normalisation(tmp_path: Path) -> None:
    cfg = v6_cfg("standard", reshape_activations="hook_z", normalize_activations=None)
    assert isinstance(load_sae(write_dir(tmp_path, cfg, hand_parts())), StandardSAE)


def test_load_topk_k_in_both_places_must_agree(tmp_path: Path) -> None:
    ok = v6_cfg("topk", k=2, activation_fn_kwargs={"k": 2})
    assert load_sae(write_dir(tmp_path / "ok", ok, hand_parts())).params()["k"] == 2
    bad = v6_cfg("topk", k=2, activation_fn_kwargs={"k": 1})
    with pytest.raises(SAEError, match="'k'"):
        load_sae(write_dir(tmp_path / "bad", bad, hand_parts()))


# --- bad directories ------------------------------------------------------------------------------


def _weights_with(**changes: Any) -> dict[str, Any]:
    parts = hand_parts()
    for k, v in changes.items():
        if v is None:
            del parts[k]
        else:
            parts[k] = v
    return parts


# (case id, cfg or None for no cfg.json, weights or None for no weights file, fragments of the message)
BAD_DIRS: list[tuple[str, Any, Any, list[str]]] = [
    ("no cfg.json", None, hand_parts(), [CFG_FILENAME, "missing"]),
    ("cfg not json", "{not json", hand_parts(), [CFG_FILENAME, "not valid JSON"]),
    ("cfg not object", "[1, 2]", hand_parts(), [CFG_FILENAME, "JSON object"]),
    ("no weights", v6_cfg("standard"), None, [WEIGHTS_FILENAME, "missing"]),
    ("corrupt weights", v6_cfg("standard"), b"\x00garbage", [WEIGHTS_FILENAME, "safetensors"]),
    (
        "clt",
        v6_cfg("clt"),
        hand_parts(),
        [CFG_FILENAME, "'architecture'", "'clt'", "gated, jumprelu"],
    ),
    ("bad arch type", v6_cfg(["standard"]), hand_parts(), [CFG_FILENAME, "'architecture'"]),
    (
        "tanh-relu",
        v5_cfg(activation_fn_str="tanh-relu"),
        hand_parts(),
        [CFG_FILENAME, "'activation_fn_str'", "tanh-relu"],
    ),
    ("no d_in", v6_cfg("standard", d_in=...), hand_parts(), [CFG_FILENAME, "'d_in'", "missing"]),
    ("str d_sae", v6_cfg("standard", d_sae="3"), hand_parts(), [CFG_FILENAME, "'d_sae'"]),
    (
        "layer_norm",
        v6_cfg("standard", normalize_activations="layer_norm"),
        hand_parts(),
        ["'normalize_activations'", "layer_norm"],
    ),
    (
        "reshape",
        v6_cfg("standard", reshape_activations="weird"),
        hand_parts(),
        ["'reshape_activations'", "weird"],
    ),
    (
        "apply not bool",
        v6_cfg("standard", apply_b_dec_to_input="yes"),
        hand_parts(),
        ["'apply_b_dec_to_input'"],
    ),
    ("bad dtype", v6_cfg("standard", dtype="int8"), hand_parts(), ["'dtype'", "int8"]),
    ("topk no k", v6_cfg("topk", k=...), hand_parts(), [CFG_FILENAME, "'k'", "missing"]),
    ("topk k zero", v6_cfg("topk", k=0), hand_parts(), [CFG_FILENAME, "'k'"]),
    ("topk k too big", v6_cfg("topk", k=9), hand_parts(), [WEIGHTS_FILENAME, "k=9"]),
    (
        "rescale",
        v6_cfg("topk", rescale_acts_by_decoder_norm=True),
        hand_parts(),
        ["'rescale_acts_by_decoder_norm'"],
    ),
    ("no W_dec", v6_cfg("standard"), _weights_with(W_dec=None), [WEIGHTS_FILENAME, "'W_dec'"]),
    ("no threshold", v6_cfg("jumprelu"), hand_parts(), [WEIGHTS_FILENAME, "'threshold'"]),
    (
        "gated weights",
        v6_cfg("standard"),
        _weights_with(b_gate=torch.zeros(3)),
        [WEIGHTS_FILENAME, "unexpected", "'b_gate'"],
    ),
    (
        "b_enc shape",
        v6_cfg("standard"),
        _weights_with(b_enc=torch.zeros(4)),
        [WEIGHTS_FILENAME, "'b_enc'", "[4]", "[3]"],
    ),
    (
        "W_dec shape",
        v6_cfg("standard"),
        _weights_with(W_dec=torch.zeros(2, 3)),
        [WEIGHTS_FILENAME, "'W_dec'", "[2, 3]", "[3, 2]"],
    ),
    (
        "cfg disagrees",
        v6_cfg("standard", d_sae=4),
        hand_parts(),
        [WEIGHTS_FILENAME, "'W_enc'", "d_sae=4"],
    ),
    (
        "unexpected scale",
        v5_cfg(),
        _weights_with(scaling_factor=torch.full((3,), 2.0)),
        ["'scaling_factor'", "finetuning_scaling_factor"],
    ),
    (
        "threshold shape",
        v6_cfg("jumprelu"),
        _weights_with(threshold=torch.zeros(2)),
        [WEIGHTS_FILENAME, "'threshold'", "[2]"],
    ),
]


@pytest.mark.parametrize(
    ("case", "cfg", "weights", "fragments"), BAD_DIRS, ids=[c[0] for c in BAD_DIRS]
)
def test_bad_directories_name_the_offender(
    case: str, cfg: Any, weights: Any, fragments: list[str], tmp_path: Path
) -> None:
    directory = write_dir(tmp_path / "sae", cfg, weights)
    with pytest.raises(SAEError) as info:
        load_sae(directory)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (case, fragment, msg)


def test_missing_directory_and_file_path(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    a_file = tmp_path / "cfg.json"
    a_file.write_text("{}")
    with pytest.raises(SAEError, match="is not a directory"):
        load_sae(a_file)
