"""SAELens's on-disk format: a directory (``cfg.json`` + ``sae_weights.safetensors``) or a
single ``.safetensors`` file, read and written with safetensors only (nothing is unpickled).

Both config layouts are read: SAELens 5 (flat keys, ``activation_fn_str`` and
``activation_fn_kwargs``) and SAELens 6 (``architecture``, ``k`` at top level, a
``metadata`` block). ``save_sae`` writes the SAELens 6 layout, which SAELens's
``SAE.load_from_disk`` reads back.

==========================  =====================  ==========================================
SAELens ``architecture``    kind                   tensors on disk
==========================  =====================  ==========================================
``standard``                ``relu`` (or ``topk``  W_enc b_enc W_dec b_dec
                            with SAELens 5's
                            ``activation_fn: topk``)
``jumprelu``                ``jumprelu``           ... + ``threshold`` (or ``log_threshold``)
``topk``                    ``topk``               W_enc b_enc W_dec b_dec
``batchtopk``               ``batchtopk``          ... + ``threshold`` (SAELens saves trained
                                                   BatchTopK SAEs as ``jumprelu``)
``gated``                   ``gated``              W_enc b_gate r_mag b_mag W_dec b_dec
``transcoder``              ``transcoder``         W_enc b_enc W_dec b_dec (``d_out`` wide)
``jumprelu_transcoder``     ``jumprelu_transcoder``  ... + ``threshold``
``skip_transcoder``         ``skip_transcoder``    ... + ``W_skip``
==========================  =====================  ==========================================

``normalize_activations``: ``none`` (or null); ``constant_norm_rescale`` (kept as a setting of
the SAE); ``expected_average_only_in``, whose scaling factor is folded into the weights when
one is known (``norm_scaling_factor``, from a release table or the config) and is otherwise
the identity at inference, as in SAELens 6.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from interventions.errors import SAEError, suggest
from interventions.sae.info import SAEInfo, info_from_cfg
from interventions.sae.kinds import AnySAE, TopKSAE, sae_from_parts

__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "load_sae_dir", "load_sae_file", "save_sae"]

CFG_FILENAME = "cfg.json"
"""Name of the config file in an SAELens directory."""

WEIGHTS_FILENAME = "sae_weights.safetensors"
"""Name of the weights file in an SAELens directory."""

# The version written into ``metadata.sae_lens_version`` by ``save_sae``. SAELens chooses
# its config parser from this field (below 6.0.0, or absent, means the old flat layout);
# 6.0.0 is the first release whose layout ``save_sae`` writes.
_SAELENS_LAYOUT_VERSION = "6.0.0"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# SAELens ``architecture`` values, and the kind each becomes.
_ARCHITECTURES = {
    "standard": "relu",
    "jumprelu": "jumprelu",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "gated": "gated",
    "transcoder": "transcoder",
    "jumprelu_transcoder": "jumprelu_transcoder",
    "skip_transcoder": "skip_transcoder",
}
# What ``save_sae`` writes for each kind; BatchTopK is saved as JumpReLU, as SAELens does.
_ARCHITECTURE_OF_KIND = {
    **{kind: arch for arch, kind in _ARCHITECTURES.items()},
    "batchtopk": "jumprelu",
}
# Tensor names on disk that differ from the field names.
_FILE_NAME = {"gated": {"b_enc": "b_gate"}}
_NORMALISATIONS = ("none", "constant_norm_rescale", "expected_average_only_in")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _cfg_error(cfg_path: Path, key: str, problem: str) -> SAEError:
    return SAEError(f"{cfg_path}: key {key!r} {problem}")


def _cfg_int(cfg: Mapping[str, Any], key: str, cfg_path: Path) -> int:
    if key not in cfg:
        raise _cfg_error(cfg_path, key, "is missing")
    value = cfg[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _cfg_error(cfg_path, key, f"must be a positive integer, got {value!r}")
    return value


def _read_json(cfg_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_cfg(path: Path) -> tuple[dict[str, Any], Path]:
    if not path.exists():
        raise SAEError(f"SAE directory {path} does not exist")
    if not path.is_dir():
        raise SAEError(
            f"{path} is not a directory; expected an SAELens directory with "
            f"{CFG_FILENAME} and {WEIGHTS_FILENAME}, or a .safetensors file"
        )
    cfg_path = path / CFG_FILENAME
    if not cfg_path.is_file():
        raise SAEError(f"{cfg_path} is missing: an SAELens directory needs {CFG_FILENAME}")
    return _read_json(cfg_path), cfg_path


def _normalisation(cfg: Mapping[str, Any], cfg_path: Path) -> str:
    norm = cfg.get("normalize_activations")
    if norm in (None, False, "none"):
        return "none"
    if norm is True:  # an old boolean spelling
        norm = "expected_average_only_in"
    if norm not in _NORMALISATIONS:
        raise _cfg_error(
            cfg_path,
            "normalize_activations",
            f"is {norm!r}, which is not supported{suggest(str(norm), _NORMALISATIONS)}; "
            f"supported: {', '.join(_NORMALISATIONS)}",
        )
    return str(norm)


def _parse_cfg(cfg: Mapping[str, Any], cfg_path: Path) -> tuple[str, dict[str, Any], bool]:
    """The kind, the ``params()`` and whether a fine-tuning scaling factor is expected."""
    architecture = cfg.get("architecture", "standard")  # SAELens's default for old files
    if not isinstance(architecture, str) or architecture not in _ARCHITECTURES:
        raise _cfg_error(
            cfg_path,
            "architecture",
            f"is {architecture!r}, which is not supported"
            f"{suggest(str(architecture), _ARCHITECTURES)}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}",
        )
    act_key = "activation_fn_str" if "activation_fn_str" in cfg else "activation_fn"
    activation = cfg.get(act_key)
    if activation not in (None, "relu", "topk"):
        raise _cfg_error(
            cfg_path, act_key, f"is {activation!r}, which is not supported; supported: relu, topk"
        )
    kind = _ARCHITECTURES[architecture]
    if activation == "topk":
        if architecture != "standard" and architecture != "topk":
            raise _cfg_error(
                cfg_path, act_key, f"is 'topk', which contradicts architecture {architecture!r}"
            )
        kind = "topk"  # SAELens 5 stored TopK SAEs as architecture "standard" + this

    for key in ("d_in", "d_sae"):
        _cfg_int(cfg, key, cfg_path)
    transcoder = kind.endswith("transcoder")
    params: dict[str, Any] = {}
    if not transcoder:
        apply_b_dec = cfg.get("apply_b_dec_to_input", True)  # SAELens's default, 5 and 6
        if not isinstance(apply_b_dec, bool):
            raise _cfg_error(
                cfg_path, "apply_b_dec_to_input", f"must be true or false, got {apply_b_dec!r}"
            )
        params["apply_b_dec_to_input"] = apply_b_dec
    norm = _normalisation(cfg, cfg_path)
    if norm == "constant_norm_rescale":
        if transcoder:
            raise _cfg_error(
                cfg_path, "normalize_activations", "'constant_norm_rescale' is for SAEs only"
            )
        params["constant_norm_rescale"] = True

    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none", "hook_z"):
        raise _cfg_error(
            cfg_path, "reshape_activations", f"is {reshape!r}; supported: 'none', 'hook_z'"
        )
    if kind in ("topk", "batchtopk"):
        params["k"] = _parse_k(cfg, cfg_path, integral=kind == "topk")
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise _cfg_error(
                cfg_path,
                "rescale_acts_by_decoder_norm",
                "is true, which is not supported: fold the decoder norms into the weights "
                "first (SAELens: sae.fold_W_dec_norm())",
            )
    scaling = cfg.get("finetuning_scaling_factor", False)
    if not isinstance(scaling, bool):
        raise _cfg_error(
            cfg_path, "finetuning_scaling_factor", f"must be true or false, got {scaling!r}"
        )
    return kind, params, scaling


def _parse_k(cfg: Mapping[str, Any], cfg_path: Path, integral: bool) -> int | float:
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise _cfg_error(cfg_path, "activation_fn_kwargs", f"must be an object, got {kwargs!r}")
    candidates: dict[str, int | float] = {}
    for where, source in (("k", cfg), ("activation_fn_kwargs.k", kwargs)):
        if "k" not in source:
            continue
        value = source["k"]
        if integral:
            candidates[where] = _cfg_int(source, "k", cfg_path)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            candidates[where] = float(value)
        else:
            raise _cfg_error(cfg_path, "k", f"must be a positive number, got {value!r}")
    if not candidates:
        raise _cfg_error(
            cfg_path, "k", "is missing: a TopK SAE needs 'k' (or activation_fn_kwargs.k)"
        )
    if len(set(candidates.values())) > 1:
        raise _cfg_error(cfg_path, "k", f"disagrees with activation_fn_kwargs.k: {candidates}")
    return next(iter(candidates.values()))


def _parse_dtype(cfg: Mapping[str, Any], cfg_path: Path) -> torch.dtype | None:
    name = cfg.get("dtype")
    if name is None:
        return None
    if not isinstance(name, str) or name.removeprefix("torch.") not in _DTYPES:
        raise _cfg_error(cfg_path, "dtype", f"is {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name.removeprefix("torch.")]


def _read_weights(weights_path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not weights_path.is_file():
        raise SAEError(f"{weights_path} is missing: an SAELens directory needs {WEIGHTS_FILENAME}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise SAEError(f"{weights_path} is not a readable safetensors file: {exc}") from exc


def _wanted(kind: str) -> list[str]:
    from interventions.sae.base import _META_FIELDS, _NON_TENSOR_FIELDS
    from interventions.sae.kinds import SAE_KINDS

    skip = _NON_TENSOR_FIELDS | _META_FIELDS
    return [f.name for f in dataclasses.fields(SAE_KINDS[kind]) if f.name not in skip]


def _build(
    cfg: Mapping[str, Any],
    cfg_path: Path,
    raw: dict[str, Tensor],
    weights_path: Path,
    *,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    norm_scaling_factor: float | None,
    info: SAEInfo | None,
) -> AnySAE:
    kind, params, scaling_expected = _parse_cfg(cfg, cfg_path)
    target_dtype = dtype if dtype is not None else _parse_dtype(cfg, cfg_path)
    if target_dtype is not None and not target_dtype.is_floating_point:
        raise SAEError(f"load_sae: dtype must be a float dtype, got {target_dtype}")
    renames = _FILE_NAME.get(kind, {})
    for field_name, file_name in renames.items():
        if file_name in raw:
            raw[field_name] = raw.pop(file_name)
    wanted = _wanted(kind)
    if "threshold" in wanted and "threshold" not in raw and "log_threshold" in raw:
        raw["threshold"] = torch.exp(raw.pop("log_threshold"))
    if kind == "batchtopk" and "threshold" not in raw and "topk_threshold" in raw:
        raw["threshold"] = torch.ones_like(raw["b_enc"]) * raw.pop("topk_threshold").double()
    architecture = cfg.get("architecture", "standard")
    missing = [renames.get(key, key) for key in wanted if key not in raw]
    if missing:
        raise SAEError(
            f"{weights_path}: missing tensor {', '.join(repr(m) for m in missing)} for "
            f"architecture {architecture!r} (found: {', '.join(sorted(raw)) or 'nothing'})"
        )
    for scale_key in [key for key in ("scaling_factor", "finetuning_scaling_factor") if key in raw]:
        scale = raw.pop(scale_key)
        if torch.all(scale == 1):
            continue  # SAELens drops an all-ones factor, whatever the config says
        if not scaling_expected:
            raise SAEError(
                f"{weights_path}: tensor {scale_key!r} is present but {cfg_path.name} has "
                "finetuning_scaling_factor false"
            )
        if list(scale.shape) != [raw["W_dec"].shape[0]]:
            raise SAEError(
                f"{weights_path}: tensor {scale_key!r} has shape {_shape(scale)}, "
                f"expected [{raw['W_dec'].shape[0]}]"
            )
        # SAELens 5 decodes (f * scale) @ W_dec, which equals f @ (scale[:, None] * W_dec).
        raw["W_dec"] = raw["W_dec"] * scale.to(raw["W_dec"].dtype)[:, None]
    extra = sorted(set(raw) - set(wanted))
    if extra:
        raise SAEError(
            f"{weights_path}: unexpected tensor {', '.join(repr(e) for e in extra)} for "
            f"architecture {architecture!r}; expected: "
            f"{', '.join(renames.get(w, w) for w in wanted)}"
        )
    if norm_scaling_factor is None and isinstance(cfg.get("norm_scaling_factor"), (int, float)):
        norm_scaling_factor = float(cfg["norm_scaling_factor"])
    if _normalisation(cfg, cfg_path) == "expected_average_only_in" and norm_scaling_factor:
        # SAELens folds the factor s (the SAE saw s * x): W_enc * s, W_dec / s, b_dec / s.
        s = float(norm_scaling_factor)
        raw["W_enc"], raw["W_dec"], raw["b_dec"] = (
            raw["W_enc"] * s,
            raw["W_dec"] / s,
            raw["b_dec"] / s,
        )
    tensors = {
        key: raw[key].to(device=device, dtype=target_dtype or raw["W_enc"].dtype) for key in wanted
    }
    try:
        sae = sae_from_parts(kind, tensors, params)
    except SAEError as exc:
        raise SAEError(f"{weights_path}: {exc}") from exc
    for key, got in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        expected = _cfg_int(cfg, key, cfg_path)
        if got != expected:
            raise SAEError(
                f"{weights_path}: tensor 'W_enc' has shape {_shape(sae.W_enc)}, "
                f"but {cfg_path.name} says {key}={expected}"
            )
    if info is None:
        info = info_from_cfg(cfg)
    return sae.with_info(info) if info is not None else sae


def load_sae_dir(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    norm_scaling_factor: float | None = None,
    info: SAEInfo | None = None,
) -> AnySAE:
    """Load an SAE from a local SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

    See :func:`interventions.sae.load_sae`, which also takes files and release names.
    """
    path = Path(path)
    cfg, cfg_path = _read_cfg(path)
    weights_path = path / WEIGHTS_FILENAME
    raw, _ = _read_weights(weights_path)
    return _build(
        cfg,
        cfg_path,
        raw,
        weights_path,
        device=device,
        dtype=dtype,
        norm_scaling_factor=norm_scaling_factor,
        info=info,
    )


def load_sae_file(
    path: str | Path,
    *,
    cfg: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    norm_scaling_factor: float | None = None,
    info: SAEInfo | None = None,
) -> AnySAE:
    """Load an SAE from one ``.safetensors`` file.

    The config is ``cfg`` if given, else the SAELens config that ``save_sae(...,
    single_file=True)`` stores in the file's header (key ``cfg``), else a ``cfg.json`` next
    to the file.
    """
    path = Path(path)
    if not path.is_file():
        raise SAEError(f"SAE file {path} does not exist")
    raw, header = _read_weights(path)
    if cfg is None and "cfg" in header:
        try:
            cfg = json.loads(header["cfg"])
        except json.JSONDecodeError as exc:
            raise SAEError(f"{path}: header key 'cfg' is not valid JSON: {exc}") from exc
        if not isinstance(cfg, dict):
            raise SAEError(f"{path}: header key 'cfg' must hold a JSON object")
    if cfg is None and (path.parent / CFG_FILENAME).is_file():
        cfg = _read_json(path.parent / CFG_FILENAME)
    if cfg is None:
        raise SAEError(
            f"{path}: no config: the file's header has no 'cfg' and there is no "
            f"{CFG_FILENAME} beside it; pass cfg={{'architecture': ..., 'd_in': ..., "
            "'d_sae': ...}}"
        )
    return _build(
        dict(cfg),
        path,
        raw,
        path,
        device=device,
        dtype=dtype,
        norm_scaling_factor=norm_scaling_factor,
        info=info,
    )


def sae_cfg(sae: AnySAE, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SAELens 6 ``cfg.json`` content for ``sae``.

    >>> import torch
    >>> from interventions.sae.kinds import StandardSAE
    >>> sae_cfg(StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2)))["architecture"]
    'standard'
    """
    meta = {**(sae.info.saelens_metadata() if sae.info is not None else {})}
    meta.update(dict(metadata or {}))
    cfg: dict[str, Any] = {
        "architecture": _ARCHITECTURE_OF_KIND[sae.kind],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": _dtype_name(sae.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": sae.b_dec_in,
        "normalize_activations": "constant_norm_rescale" if sae.rescale else "none",
        "reshape_activations": "none",
        "metadata": {**meta, "sae_lens_version": _SAELENS_LAYOUT_VERSION},
    }
    if isinstance(sae, TopKSAE):
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
        out = sae.info.hook_name_out if sae.info is not None else None
        cfg["hook_name_out"] = out or ""
    return cfg


def save_sae(
    sae: AnySAE,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    single_file: bool = False,
) -> Path:
    """Write ``sae`` as an SAELens directory that ``load_sae`` and SAELens can read.

    The directory is created if needed; ``cfg.json`` and ``sae_weights.safetensors`` are
    overwritten. ``metadata`` (JSON-serialisable, e.g. ``{"hook_name": ...}``) goes into the
    config's ``metadata`` block, after what ``sae.info`` says. A BatchTopK SAE is written as
    a JumpReLU SAE with its threshold, as SAELens does. With ``single_file=True``, ``path``
    is one ``.safetensors`` file holding the config in its header. Returns ``path``.

    >>> import tempfile, torch
    >>> from interventions.sae.kinds import StandardSAE
    >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted(p.name for p in save_sae(sae, tmp).iterdir())
    ['cfg.json', 'sae_weights.safetensors']
    """
    from interventions.sae.kinds import SAE_KINDS

    if type(sae) not in SAE_KINDS.values():
        raise SAEError(
            f"save_sae: can only save the built-in SAEs "
            f"({', '.join(c.__name__ for c in SAE_KINDS.values())}), got {type(sae).__name__}"
        )
    path = Path(path)
    try:
        text = json.dumps(sae_cfg(sae, metadata), indent=2)
    except TypeError as exc:
        raise SAEError(f"save_sae: metadata is not JSON-serialisable: {exc}") from exc
    renames = _FILE_NAME.get(sae.kind, {})
    # Own, contiguous CPU copies: safetensors refuses tensors that share storage.
    state = {
        renames.get(key, key): t.detach().to("cpu").clone().contiguous()
        for key, t in sae.tensors().items()
    }
    if single_file:
        if path.exists() and path.is_dir():
            raise SAEError(f"save_sae: {path} is a directory; single_file=True writes a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"cfg": text})
        return path
    if path.exists() and not path.is_dir():
        raise SAEError(f"save_sae: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / WEIGHTS_FILENAME))
    (path / CFG_FILENAME).write_text(text + "\n", encoding="utf-8")
    return path
