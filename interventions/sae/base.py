"""The shared base of the built-in SAE kinds: shapes, validation, affine maps, conversion.

The kinds themselves, and their formulas, are in :mod:`interventions.sae.kinds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from interventions.errors import SAEError, suggest
from interventions.sae.info import SAEInfo

__all__ = ["SAE"]

_T = TypeVar("_T", bound="_AffineSAE")


@runtime_checkable
class SAE(Protocol):
    """What the rest of the library needs from a sparse autoencoder.

    Any object with these members works, not only the built-in classes.

    >>> import torch
    >>> from interventions.sae import StandardSAE
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


# Field names that are settings rather than tensors, across all built-in kinds.
_NON_TENSOR_FIELDS = frozenset({"apply_b_dec_to_input", "k", "constant_norm_rescale"})
# Fields that describe the SAE (where it was trained) and are neither tensors nor settings.
_META_FIELDS = frozenset({"info"})
# Settings without a default, which ``from_parts`` insists on.
_REQUIRED_PARAMS = frozenset({"k"})


class _AffineSAE:
    """Shared code of the built-in kinds: validation, affine maps, conversion.

    Subclasses are frozen dataclasses that declare their tensors first, then their
    settings (``k``, ``apply_b_dec_to_input``, ``constant_norm_rescale``).
    """

    kind: ClassVar[str]
    transcoder: ClassVar[bool] = False
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    info: SAEInfo | None

    # --- shape -----------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads."""
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        """Number of features."""
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        """Width of what the SAE writes: ``d_in``, except for transcoders."""
        return int(self.W_dec.shape[1]) if self.W_dec.ndim == 2 else self.d_in

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (inputs are cast to it)."""
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.W_enc.device

    @property
    def b_dec_in(self) -> bool:
        """Whether ``b_dec`` is subtracted from the input before encoding."""
        return bool(getattr(self, "apply_b_dec_to_input", False))

    @property
    def rescale(self) -> bool:
        """Whether inputs are scaled to norm ``sqrt(d_in)`` (``constant_norm_rescale``)."""
        return bool(getattr(self, "constant_norm_rescale", False))

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        d_out = self.d_out if self.transcoder else d_in
        return {"b_enc": [d_sae], "W_dec": [d_sae, d_out], "b_dec": [d_out]}

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
        if self.transcoder and (self.W_dec.ndim != 2 or self.W_dec.shape[1] == 0):
            raise SAEError(
                f"{name}: tensor 'W_dec' has shape {_shape(self.W_dec)}, "
                f"expected [d_sae={d_sae}, d_out > 0]"
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
        for flag in ("apply_b_dec_to_input", "constant_norm_rescale"):
            if hasattr(self, flag) and not isinstance(getattr(self, flag), bool):
                raise SAEError(f"{name}: {flag} must be a bool, got {getattr(self, flag)!r}")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        width = f"d_out={self.d_out}, " if self.transcoder else ""
        return (
            f"{type(self).__name__}(d_in={self.d_in}, d_sae={self.d_sae}, {width}"
            f"dtype={self.dtype}, device={self.device}, {settings})"
        ).replace(", )", ")")

    # --- maps ------------------------------------------------------------------------------

    def _check_width(self, t: Tensor, width: int, what: str) -> Tensor:
        if not isinstance(t, Tensor):
            raise SAEError(f"{type(self).__name__}: {what} must be a torch.Tensor")
        if t.ndim == 0 or t.shape[-1] != width:
            raise SAEError(
                f"{type(self).__name__}: {what} has shape {_shape(t)}, expected [..., {width}]"
            )
        return t.to(dtype=self.W_enc.dtype)

    def input_scale(self, x: Tensor) -> Tensor | None:
        """``sqrt(d_in) / ||x||`` per vector (``[..., 1]``) under ``constant_norm_rescale``.

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(4), torch.zeros(4), torch.eye(4), torch.zeros(4),
        ...                   constant_norm_rescale=True)
        >>> sae.input_scale(torch.tensor([0.0, 0.0, 0.0, 4.0])).tolist()
        [0.5]
        """
        if not self.rescale:
            return None
        x = self._check_width(x, self.d_in, "input x")
        return (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)

    def sae_in(self, x: Tensor) -> Tensor:
        """``x'``: the input after rescaling and the ``b_dec`` subtraction, ``[..., d_in]``."""
        x = self._check_width(x, self.d_in, "input x")
        scale = self.input_scale(x)
        if scale is not None:
            x = x * scale
        if self.b_dec_in:
            x = x - self.b_dec
        return x

    def pre_activation(self, x: Tensor) -> Tensor:
        """The affine part of ``encode``: ``x' @ W_enc + b_enc``, ``[..., d_sae]``.

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.ones(2), torch.eye(2), torch.zeros(2))
        >>> sae.pre_activation(torch.tensor([1.0, -3.0])).tolist()
        [2.0, -2.0]
        """
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def _activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Features of ``x [..., d_in]``, shape ``[..., d_sae]``, in the SAE's dtype."""
        return self._activation(self.pre_activation(x))

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec`` for features ``f [..., d_sae]`` (before any un-rescaling).

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), 2 * torch.eye(2), torch.ones(2))
        >>> sae.decode(torch.tensor([1.0, 0.0])).tolist()
        [3.0, 1.0]
        """
        f = self._check_width(f, self.d_sae, "features f")
        return f @ self.W_dec + self.b_dec

    def reconstruct(self, f: Tensor, x: Tensor) -> Tensor:
        """What a splice writes for features ``f`` of input ``x``: ``decode(f)``, divided by
        ``input_scale(x)`` under ``constant_norm_rescale``, plus a skip transcoder's
        ``x @ W_skip.T``.

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> x = torch.tensor([1.0, -1.0])
        >>> sae.reconstruct(sae.encode(x), x).tolist()
        [1.0, 0.0]
        """
        out = self.decode(f)
        scale = self.input_scale(x)
        if scale is not None:
            out = out / scale
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``reconstruct(encode(x), x)``: the SAE's reconstruction (a transcoder's output)."""
        return self.reconstruct(self.encode(x), x)

    def kernel(self) -> tuple[Any, ...]:
        """The SAE in the canonical form backends evaluate without importing this package:
        ``(act, W_enc, b_enc, W_dec, b_dec, extra, b_in, W_skip, rescale)``.

        ``act`` is ``relu``, ``jumprelu`` (``extra`` = threshold), ``topk`` (``extra`` = k)
        or ``gated`` (``b_enc`` = ``b_gate``, ``extra`` = (magnitude weights, ``b_mag``));
        ``b_in`` is subtracted from the (rescaled) input or is None; ``W_skip`` [d_out, d_in]
        or None. ``forward`` equals evaluating this form (the conformance suite holds both).
        """
        return (
            self._kernel_act(),
            self.W_enc,
            self.b_enc,
            self.W_dec,
            self.b_dec,
            self._kernel_extra(),
            self.b_dec if self.b_dec_in else None,
            getattr(self, "W_skip", None),
            self.rescale,
        )

    def _kernel_act(self) -> str:
        return "relu"

    def _kernel_extra(self) -> Any:
        return None

    # --- conversion ------------------------------------------------------------------------

    def with_info(self: _T, info: SAEInfo | None) -> _T:
        """The same SAE described by ``info`` (its model, hook and site).

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> sae.with_info(SAEInfo(site="resid_pre", layer=3)).info.where
        'resid_pre[3]'
        """
        if info is not None and not isinstance(info, SAEInfo):
            raise SAEError(f"{type(self).__name__}: info must be an SAEInfo, got {info!r}")
        return replace(self, info=info)  # type: ignore[type-var]

    def tensors(self) -> dict[str, Tensor]:
        """The SAE's tensors by field name (the tensors themselves, not copies).

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> sorted(sae.tensors())
        ['W_dec', 'W_enc', 'b_dec', 'b_enc']
        """
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if f.name not in _NON_TENSOR_FIELDS | _META_FIELDS
        }

    def params(self) -> dict[str, int | float | bool]:
        """The SAE's non-tensor settings by field name (``constant_norm_rescale`` only when
        set, so graphs of SAEs without it keep their content and hash).

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> sae.params()
        {'apply_b_dec_to_input': False}
        """
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
            if f.name in _NON_TENSOR_FIELDS
            and not (f.name == "constant_norm_rescale" and not getattr(self, f.name))
        }

    @classmethod
    def from_parts(cls: type[_T], tensors: Mapping[str, Tensor], params: Mapping[str, Any]) -> _T:
        """Rebuild an SAE from ``tensors()`` and ``params()`` dictionaries.

        >>> import torch
        >>> from interventions.sae import SAEInfo, StandardSAE
        >>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
        >>> StandardSAE.from_parts(sae.tensors(), sae.params()).d_sae
        2
        """
        names = [f.name for f in fields(cls) if f.name not in _META_FIELDS]  # type: ignore[arg-type]
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
        >>> from interventions.sae import SAEInfo, StandardSAE
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
