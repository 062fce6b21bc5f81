"""Sparse autoencoders (SAEs): three inference-only kinds and SAELens's on-disk format.

An SAE maps an activation ``x [..., d_in]`` to sparse features ``f [..., d_sae]`` and back.
The three built-in kinds share one affine encoder and decoder and differ only in the
activation applied to the pre-activation ``pre = x' @ W_enc + b_enc``, where
``x' = x - b_dec`` when ``apply_b_dec_to_input`` is set and ``x' = x`` otherwise:

============  ==========  ==================================================================
class         ``kind``    features
============  ==========  ==================================================================
StandardSAE   ``relu``    ``relu(pre)``
JumpReLUSAE   ``jumprelu``  ``relu(pre) * (pre > threshold)`` (SAELens also applies the ReLU)
TopKSAE       ``topk``    ``relu`` of the ``k`` largest entries of ``pre``, zeros elsewhere
============  ==========  ==================================================================

and all decode with ``f @ W_dec + b_dec``. The instances are frozen dataclasses of tensors;
``to`` returns a new instance. Inputs are cast to the SAE's dtype, as SAELens does.

``load_sae`` reads a local directory in SAELens's format (``cfg.json`` next to
``sae_weights.safetensors``), with either the config layout of SAELens 5 (flat keys,
``activation_fn_str`` and ``activation_fn_kwargs``) or that of SAELens 6 (``architecture``,
``k`` at top level, a ``metadata`` block). ``save_sae`` writes the SAELens 6 layout, which
SAELens's ``SAE.load_from_disk`` reads back. Weights are read with safetensors only; nothing
is ever unpickled.

>>> import torch
>>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
>>> sae.encode(torch.tensor([1.0, -1.0])).tolist()
[1.0, 0.0]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from interventions.errors import SAEError, suggest

__all__ = [
    "CFG_FILENAME",
    "SAE",
    "SAE_KINDS",
    "WEIGHTS_FILENAME",
    "AnySAE",
    "JumpReLUSAE",
    "StandardSAE",
    "TopKSAE",
    "load_sae",
    "sae_from_parts",
    "save_sae",
]

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

_T = TypeVar("_T", bound="_AffineSAE")


@runtime_checkable
class SAE(Protocol):
    """What the rest of the library needs from a sparse autoencoder.

    Any object with these members works, not only the built-in classes.

    >>> import torch
    >>> isinstance(StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2)), SAE)
    True
    """

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads and writes."""
        ...

    @property
    def d_sae(self) -> int:
        """Number of features."""
        ...

    def encode(self, x: Tensor) -> Tensor:
        """Map ``x [..., d_in]`` to features ``[..., d_sae]``."""
        ...

    def decode(self, f: Tensor) -> Tensor:
        """Map features ``f [..., d_sae]`` back to ``[..., d_in]``."""
        ...


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


class _AffineSAE:
    """Shared code of the built-in kinds: validation, affine maps, conversion.

    Subclasses are frozen dataclasses that declare the fields below first, then their own
    extra fields, then ``apply_b_dec_to_input``.
    """

    kind: ClassVar[str]
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    apply_b_dec_to_input: bool

    # --- shape -----------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads and writes."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (inputs are cast to it)."""
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.W_enc.device

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        return {
            "W_enc": [d_in, d_sae],
            "b_enc": [d_sae],
            "W_dec": [d_sae, d_in],
            "b_dec": [d_in],
        }

    def __post_init__(self) -> None:
        name = type(self).__name__
        tensors = self.tensors()
        for key, value in tensors.items():
            if not isinstance(value, Tensor):
                raise SAEError(
                    f"{name}: tensor {key!r} must be a torch.Tensor, got {type(value).__name__}"
                )
        if self.W_enc.ndim != 2:
            raise SAEError(
                f"{name}: tensor 'W_enc' has shape {_shape(self.W_enc)}, "
                "expected 2 dimensions [d_in, d_sae]"
            )
        d_in, d_sae = self.d_in, self.d_sae
        if d_in == 0 or d_sae == 0:
            raise SAEError(
                f"{name}: tensor 'W_enc' has shape {_shape(self.W_enc)}, "
                "expected d_in > 0 and d_sae > 0"
            )
        for key, expected in self._expected_shapes(d_in, d_sae).items():
            got = _shape(tensors[key])
            if got != expected:
                raise SAEError(
                    f"{name}: tensor {key!r} has shape {got}, expected {expected} "
                    f"(d_in={d_in}, d_sae={d_sae} from W_enc)"
                )
        for key, value in tensors.items():
            if not value.is_floating_point():
                raise SAEError(f"{name}: tensor {key!r} has dtype {value.dtype}, expected a float")
            if value.dtype != self.W_enc.dtype:
                raise SAEError(
                    f"{name}: tensor {key!r} has dtype {value.dtype}, "
                    f"expected {self.W_enc.dtype} like W_enc"
                )
            if value.device != self.W_enc.device:
                raise SAEError(
                    f"{name}: tensor {key!r} is on {value.device}, "
                    f"expected {self.W_enc.device} like W_enc"
                )
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise SAEError(
                f"{name}: apply_b_dec_to_input must be a bool, got {self.apply_b_dec_to_input!r}"
            )

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return (
            f"{type(self).__name__}(d_in={self.d_in}, d_sae={self.d_sae}, "
            f"dtype={self.dtype}, device={self.device}, {settings})"
        )

    # --- maps ------------------------------------------------------------------------------

    def _check_width(self, t: Tensor, width: int, what: str) -> Tensor:
        if not isinstance(t, Tensor):
            raise SAEError(f"{type(self).__name__}: {what} must be a torch.Tensor")
        if t.ndim == 0 or t.shape[-1] != width:
            raise SAEError(
                f"{type(self).__name__}: {what} has shape {_shape(t)}, expected [..., {width}]"
            )
        return t.to(dtype=self.W_enc.dtype)

    def pre_activation(self, x: Tensor) -> Tensor:
        """The affine part of ``encode``: ``x' @ W_enc + b_enc``, ``[..., d_sae]``.

        >>> import torch
        >>> sae = StandardSAE(torch.eye(2), torch.ones(2), torch.eye(2), torch.zeros(2))
        >>> sae.pre_activation(torch.tensor([1.0, -3.0])).tolist()
        [2.0, -2.0]
        """
        x = self._check_width(x, self.d_in, "input x")
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def _activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Features of ``x [..., d_in]``, shape ``[..., d_sae]``, in the SAE's dtype."""
        return self._activation(self.pre_activation(x))

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` of features ``f [..., d_sae]``.

        >>> import torch
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), 2 * torch.eye(2), torch.ones(2))
        >>> sae.decode(torch.tensor([1.0, 0.0])).tolist()
        [3.0, 1.0]
        """
        f = self._check_width(f, self.d_sae, "features f")
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``: the SAE's reconstruction of ``x``."""
        return self.decode(self.encode(x))

    # --- conversion ------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """The SAE's tensors by field name (the tensors themselves, not copies).

        >>> import torch
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> sorted(sae.tensors())
        ['W_dec', 'W_enc', 'b_dec', 'b_enc']
        """
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if f.name not in _NON_TENSOR_FIELDS
        }

    def params(self) -> dict[str, int | float | bool]:
        """The SAE's non-tensor settings by field name.

        >>> import torch
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> sae.params()
        {'apply_b_dec_to_input': False}
        """
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if f.name in _NON_TENSOR_FIELDS
        }

    @classmethod
    def from_parts(cls: type[_T], tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> _T:
        """Rebuild an SAE from ``tensors()`` and ``params()`` dictionaries.

        >>> import torch
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> StandardSAE.from_parts(sae.tensors(), sae.params()).d_sae
        2
        """
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        tensor_names = [n for n in names if n not in _NON_TENSOR_FIELDS]
        param_names = [n for n in names if n in _NON_TENSOR_FIELDS]
        for given, allowed, what in (
            (tensors, tensor_names, "tensor"),
            (params, param_names, "param"),
        ):
            for key in given:
                if key not in allowed:
                    raise SAEError(
                        f"{cls.__name__}: unexpected {what} {key!r}"
                        f"{suggest(str(key), allowed)}; expected {what}s: {allowed}"
                    )
        missing = [n for n in tensor_names if n not in tensors]
        missing += [n for n in param_names if n not in params and n in _REQUIRED_PARAMS]
        if missing:
            raise SAEError(f"{cls.__name__}: missing {', '.join(repr(m) for m in missing)}")
        return cls(**dict(tensors), **dict(params))

    def to(
        self: _T,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> _T:
        """A new SAE with the tensors moved to ``device`` and cast to ``dtype``.

        >>> import torch
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> sae.to(dtype=torch.float64).W_enc.dtype
        torch.float64
        """
        if dtype is not None and not dtype.is_floating_point:
            raise SAEError(f"{type(self).__name__}.to: dtype must be a float dtype, got {dtype}")
        moved = {
            key: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            for key, t in self.tensors().items()
        }
        return replace(self, **moved)  # type: ignore[type-var]


# Field names that are settings rather than tensors, across all built-in kinds.
_NON_TENSOR_FIELDS = frozenset({"apply_b_dec_to_input", "k"})
# Settings without a default, which ``from_parts`` insists on.
_REQUIRED_PARAMS = frozenset({"k"})


@dataclass(frozen=True, eq=False, repr=False)
class StandardSAE(_AffineSAE):
    """ReLU SAE: ``f = relu(pre)``; SAELens's ``standard`` architecture.

    >>> import torch
    >>> W = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    >>> sae = StandardSAE(W, torch.zeros(2), torch.eye(2), torch.zeros(2))
    >>> sae.encode(torch.tensor([2.0, 1.0])).tolist()
    [2.0, 0.0]
    """

    kind: ClassVar[str] = "relu"

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    apply_b_dec_to_input: bool = False

    def _activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)


@dataclass(frozen=True, eq=False, repr=False)
class JumpReLUSAE(_AffineSAE):
    """JumpReLU SAE: ``f = relu(pre) * (pre > threshold)``, as SAELens computes it.

    A feature fires only when its pre-activation is strictly above its threshold; the
    ReLU only matters for features with a negative threshold.

    >>> import torch
    >>> sae = JumpReLUSAE(
    ...     torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2), torch.tensor([0.5, 0.5])
    ... )
    >>> sae.encode(torch.tensor([0.4, 0.6])).tolist()
    [0.0, 0.6000000238418579]
    """

    kind: ClassVar[str] = "jumprelu"

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor
    apply_b_dec_to_input: bool = False

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        return {**super()._expected_shapes(d_in, d_sae), "threshold": [d_sae]}

    def _activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)


@dataclass(frozen=True, eq=False, repr=False)
class TopKSAE(_AffineSAE):
    """TopK SAE: the ``k`` largest pre-activations of each vector, through a ReLU.

    Everything else is zero, so at most ``k`` features are non-zero (fewer when some of the
    ``k`` largest are negative). Ties are broken as ``torch.topk`` breaks them.

    >>> import torch
    >>> sae = TopKSAE(torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3), k=2)
    >>> sae.encode(torch.tensor([3.0, 1.0, 2.0])).tolist()
    [3.0, 0.0, 2.0]
    """

    kind: ClassVar[str] = "topk"

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    k: int
    apply_b_dec_to_input: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool):
            raise SAEError(f"TopKSAE: k must be an int, got {self.k!r}")
        if not 1 <= self.k <= self.d_sae:
            raise SAEError(f"TopKSAE: k={self.k} is outside [1, d_sae={self.d_sae}]")

    def _activation(self, pre: Tensor) -> Tensor:
        top = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


AnySAE: TypeAlias = StandardSAE | JumpReLUSAE | TopKSAE
"""Any of the built-in SAE classes."""

SAE_KINDS: dict[str, type[StandardSAE] | type[JumpReLUSAE] | type[TopKSAE]] = {
    cls.kind: cls for cls in (StandardSAE, JumpReLUSAE, TopKSAE)
}
"""Built-in SAE classes by their ``kind``."""


def sae_from_parts(kind: str, tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> AnySAE:
    """Build a built-in SAE of ``kind`` from tensor and settings dictionaries.

    >>> import torch
    >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
    >>> type(sae_from_parts(sae.kind, sae.tensors(), sae.params())).__name__
    'StandardSAE'
    """
    cls = SAE_KINDS.get(kind)
    if cls is None:
        raise SAEError(
            f"unknown SAE kind {kind!r}{suggest(str(kind), SAE_KINDS)}; "
            f"valid kinds: {', '.join(sorted(SAE_KINDS))}"
        )
    return cls.from_parts(tensors, params)


# --- SAELens directories ---------------------------------------------------------------------

# SAELens ``architecture`` values read by ``load_sae``, and the kind each becomes.
_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_ARCHITECTURE_OF_KIND = {kind: arch for arch, kind in _ARCHITECTURES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _read_cfg(path: Path) -> tuple[dict[str, Any], Path]:
    if not path.exists():
        raise SAEError(f"SAE directory {path} does not exist")
    if not path.is_dir():
        raise SAEError(
            f"{path} is not a directory; expected an SAELens directory with "
            f"{CFG_FILENAME} and {WEIGHTS_FILENAME}"
        )
    cfg_path = path / CFG_FILENAME
    if not cfg_path.is_file():
        raise SAEError(f"{cfg_path} is missing: an SAELens directory needs {CFG_FILENAME}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SAEError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg, cfg_path


def _parse_cfg(cfg: Mapping[str, Any], cfg_path: Path) -> tuple[str, dict[str, Any], bool]:
    """The kind, the ``params()`` and whether a fine-tuning scaling factor is expected.

    Reads both layouts: SAELens 5 (``activation_fn_str`` / ``activation_fn``, ``k`` inside
    ``activation_fn_kwargs``, ``architecture`` possibly absent) and SAELens 6
    (``architecture`` and ``k`` at top level).
    """
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
        if architecture == "jumprelu":
            raise _cfg_error(
                cfg_path, act_key, "is 'topk', which contradicts architecture 'jumprelu'"
            )
        kind = "topk"  # SAELens 5 stored TopK SAEs as architecture "standard" + this

    for key in ("d_in", "d_sae"):
        _cfg_int(cfg, key, cfg_path)

    apply_b_dec = cfg.get("apply_b_dec_to_input", True)  # SAELens's default, 5 and 6 alike
    if not isinstance(apply_b_dec, bool):
        raise _cfg_error(
            cfg_path, "apply_b_dec_to_input", f"must be true or false, got {apply_b_dec!r}"
        )
    params: dict[str, Any] = {"apply_b_dec_to_input": apply_b_dec}

    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):
        shown = "expected_average_only_in" if norm is True else norm
        raise _cfg_error(
            cfg_path,
            "normalize_activations",
            f"is {shown!r}, which is not supported: only 'none' (or null) is; fold the "
            "normalisation into the weights before loading",
        )
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in (None, "none", "hook_z"):
        raise _cfg_error(
            cfg_path, "reshape_activations", f"is {reshape!r}; supported: 'none', 'hook_z'"
        )

    if kind == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise _cfg_error(cfg_path, "activation_fn_kwargs", f"must be an object, got {kwargs!r}")
        candidates = {}
        if "k" in cfg:
            candidates["k"] = _cfg_int(cfg, "k", cfg_path)
        if "k" in kwargs:
            candidates["activation_fn_kwargs.k"] = _cfg_int(kwargs, "k", cfg_path)
        if not candidates:
            raise _cfg_error(
                cfg_path, "k", "is missing: a TopK SAE needs 'k' (or activation_fn_kwargs.k)"
            )
        if len(set(candidates.values())) > 1:
            raise _cfg_error(cfg_path, "k", f"disagrees with activation_fn_kwargs.k: {candidates}")
        params["k"] = next(iter(candidates.values()))
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


def _parse_dtype(cfg: Mapping[str, Any], cfg_path: Path) -> torch.dtype | None:
    name = cfg.get("dtype")
    if name is None:
        return None
    if not isinstance(name, str) or name.removeprefix("torch.") not in _DTYPES:
        raise _cfg_error(cfg_path, "dtype", f"is {name!r}; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name.removeprefix("torch.")]


def _read_weights(weights_path: Path) -> dict[str, Tensor]:
    if not weights_path.is_file():
        raise SAEError(f"{weights_path} is missing: an SAELens directory needs {WEIGHTS_FILENAME}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise SAEError(f"{weights_path} is not a readable safetensors file: {exc}") from exc


def load_sae(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AnySAE:
    """Load an SAE from a local SAELens directory (``cfg.json`` + ``sae_weights.safetensors``).

    Supported ``architecture`` values are ``standard``, ``jumprelu`` and ``topk`` (and
    SAELens 5's ``standard`` with ``activation_fn_str: "topk"``). JumpReLU thresholds may be
    stored as ``threshold`` or ``log_threshold``; a SAELens 5 fine-tuning scaling factor is
    folded into ``W_dec``. The tensors are cast to ``dtype``, else to the config's ``dtype``,
    and put on ``device`` (default CPU). SAEs on ``hook_z`` read flattened inputs
    ``[..., n_heads * d_head]``. Raises ``SAEError`` naming the file and key at fault.

    >>> import tempfile, torch
    >>> sae = TopKSAE(torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3), k=1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_sae(sae, tmp)
    ...     loaded = load_sae(tmp)
    >>> loaded.kind, loaded.k
    ('topk', 1)
    """
    path = Path(path)
    cfg, cfg_path = _read_cfg(path)
    kind, params, scaling_expected = _parse_cfg(cfg, cfg_path)
    target_dtype = dtype if dtype is not None else _parse_dtype(cfg, cfg_path)
    if target_dtype is not None and not target_dtype.is_floating_point:
        raise SAEError(f"load_sae: dtype must be a float dtype, got {target_dtype}")
    weights_path = path / WEIGHTS_FILENAME
    raw = _read_weights(weights_path)

    wanted = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if kind == "jumprelu":
        if "threshold" not in raw and "log_threshold" in raw:
            raw["threshold"] = torch.exp(raw.pop("log_threshold"))
        wanted.append("threshold")
    missing = [key for key in wanted if key not in raw]
    if missing:
        raise SAEError(
            f"{weights_path}: missing tensor {', '.join(repr(m) for m in missing)} for "
            f"architecture {cfg.get('architecture', 'standard')!r} "
            f"(found: {', '.join(sorted(raw)) or 'nothing'})"
        )

    scale_keys = [key for key in ("scaling_factor", "finetuning_scaling_factor") if key in raw]
    for scale_key in scale_keys:
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
            f"architecture {cfg.get('architecture', 'standard')!r}; expected: {', '.join(wanted)}"
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
    return sae


def save_sae(sae: AnySAE, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` as an SAELens directory that ``load_sae`` and SAELens can read.

    The directory is created if needed; ``cfg.json`` and ``sae_weights.safetensors`` are
    overwritten. ``metadata`` (JSON-serialisable, e.g. ``{"hook_name": ...}``) goes into the
    config's ``metadata`` block. Returns the directory.

    >>> import tempfile, torch
    >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted(p.name for p in save_sae(sae, tmp).iterdir())
    ['cfg.json', 'sae_weights.safetensors']
    """
    if not isinstance(sae, (StandardSAE, JumpReLUSAE, TopKSAE)):
        raise SAEError(
            f"save_sae: can only save the built-in SAEs "
            f"({', '.join(c.__name__ for c in SAE_KINDS.values())}), got {type(sae).__name__}"
        )
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SAEError(f"save_sae: {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)

    cfg: dict[str, Any] = {
        "architecture": _ARCHITECTURE_OF_KIND[sae.kind],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": _dtype_name(sae.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {**dict(metadata or {}), "sae_lens_version": _SAELENS_LAYOUT_VERSION},
    }
    if isinstance(sae, TopKSAE):
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    try:
        text = json.dumps(cfg, indent=2)
    except TypeError as exc:
        raise SAEError(f"save_sae: metadata is not JSON-serialisable: {exc}") from exc

    # Own, contiguous CPU copies: safetensors refuses tensors that share storage.
    state = {key: t.detach().to("cpu").clone().contiguous() for key, t in sae.tensors().items()}
    save_file(state, str(path / WEIGHTS_FILENAME))
    (path / CFG_FILENAME).write_text(text + "\n", encoding="utf-8")
    return path
