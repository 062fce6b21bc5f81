"""The built-in SAE kinds, each held to a formula written out here.

Every kind reads ``x [..., d_in]``. With ``constant_norm_rescale`` (SAELens's
``normalize_activations: constant_norm_rescale``) the input is first scaled per vector by
``s = sqrt(d_in) / ||x||`` and the reconstruction divided by the same ``s``. Then
``x' = x - b_dec`` when ``apply_b_dec_to_input`` is set (``x' = x`` otherwise) and
``pre = x' @ W_enc + b_enc``:

==================  =======================  ==============================================
class               ``kind``                 features ``f``
==================  =======================  ==============================================
StandardSAE         ``relu``                 ``relu(pre)``
JumpReLUSAE         ``jumprelu``             ``relu(pre) * (pre > threshold)``
TopKSAE             ``topk``                 ``relu`` of the ``k`` largest of ``pre``, else 0
BatchTopKSAE        ``batchtopk``            as JumpReLU with its learned ``threshold``
GatedSAE            ``gated``                ``(x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc *
                                             exp(r_mag)) + b_mag)``
Transcoder          ``transcoder``           ``relu(x @ W_enc + b_enc)``
JumpReLUTranscoder  ``jumprelu_transcoder``  ``relu(pre) * (pre > threshold)``, ``pre = x @
                                             W_enc + b_enc``
SkipTranscoder      ``skip_transcoder``      ``relu(x @ W_enc + b_enc)``
==================  =======================  ==============================================

SAEs decode with ``f @ W_dec + b_dec`` (``[..., d_in]``). Transcoders write another width,
``d_out``: ``f @ W_dec + b_dec`` with ``W_dec [d_sae, d_out]``, plus ``x @ W_skip.T`` for a
skip transcoder; they never subtract ``b_dec`` from their input (it has the output's width).

BatchTopK keeps, at training time, the ``k * n`` largest activations over a batch of ``n``
vectors (:func:`batch_topk`), so a vector's features would depend on what else is in its
batch. Like SAELens, it runs at inference with the threshold it learned, which makes a
splice independent of how a backend batches prompts; ``encode_batch`` gives the batch rule.

The instances are frozen dataclasses of tensors; ``to`` returns a new instance. Inputs are
cast to the SAE's dtype, as SAELens does.

>>> import torch
>>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
>>> sae.encode(torch.tensor([1.0, -1.0])).tolist()
[1.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import torch
from torch import Tensor

from interventions.errors import SAEError, suggest
from interventions.sae.base import SAE, _AffineSAE
from interventions.sae.info import SAEInfo

__all__ = [
    "SAE",
    "SAE_KINDS",
    "AnySAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "JumpReLUTranscoder",
    "SkipTranscoder",
    "StandardSAE",
    "TopKSAE",
    "Transcoder",
    "batch_topk",
    "sae_from_parts",
]


def _jumprelu(pre: Tensor, threshold: Tensor) -> Tensor:
    return torch.relu(pre) * (pre > threshold).to(pre.dtype)


def _with_threshold(sae: _AffineSAE, d_in: int, d_sae: int) -> dict[str, list[int]]:
    return {**_AffineSAE._expected_shapes(sae, d_in, d_sae), "threshold": [d_sae]}


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
    constant_norm_rescale: bool = False
    info: SAEInfo | None = field(default=None, compare=False)

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
    constant_norm_rescale: bool = False
    info: SAEInfo | None = field(default=None, compare=False)

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        return _with_threshold(self, d_in, d_sae)

    def _activation(self, pre: Tensor) -> Tensor:
        return _jumprelu(pre, self.threshold)

    def _kernel_act(self) -> str:
        return "jumprelu"

    def _kernel_extra(self) -> Any:
        return self.threshold


def _check_k(sae: _AffineSAE, k: object, integral: bool) -> None:
    name = type(sae).__name__
    if isinstance(k, bool) or not isinstance(k, int if integral else (int, float)):
        raise SAEError(f"{name}: k must be {'an int' if integral else 'a number'}, got {k!r}")
    if not 0 < k <= sae.d_sae or (integral and k < 1):
        raise SAEError(f"{name}: k={k} is outside {'[1' if integral else '(0'}, d_sae={sae.d_sae}]")


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
    constant_norm_rescale: bool = False
    info: SAEInfo | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k(self, self.k, integral=True)

    def _activation(self, pre: Tensor) -> Tensor:
        top = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def _kernel_act(self) -> str:
        return "topk"

    def _kernel_extra(self) -> Any:
        return int(self.k)


def batch_topk(pre: Tensor, k: float) -> Tensor:
    """BatchTopK: keep the ``int(k * n)`` largest of ``relu(pre)`` over all ``n`` vectors.

    >>> import torch
    >>> batch_topk(torch.tensor([[3.0, 1.0], [2.0, -1.0]]), k=1).tolist()
    [[3.0, 0.0], [2.0, 0.0]]
    """
    acts = torch.relu(pre)
    flat = acts.reshape(-1)
    n = flat.numel() // max(int(acts.shape[-1]), 1)
    keep = min(max(int(k * n), 0), flat.numel())
    top = torch.topk(flat, keep, dim=-1, sorted=False)
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)


@dataclass(frozen=True, eq=False, repr=False)
class BatchTopKSAE(_AffineSAE):
    """BatchTopK SAE: ``k`` features per vector on average over a batch (training), and at
    inference ``relu(pre) * (pre > threshold)`` with the learned threshold, as SAELens.

    >>> import torch
    >>> sae = BatchTopKSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2),
    ...                    threshold=torch.full((2,), 0.5), k=1.0)
    >>> sae.encode(torch.tensor([0.4, 0.6])).tolist(), sae.encode_batch(torch.eye(2)).tolist()
    ([0.0, 0.6000000238418579], [[1.0, 0.0], [0.0, 1.0]])
    """

    kind: ClassVar[str] = "batchtopk"

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor
    k: float
    apply_b_dec_to_input: bool = False
    constant_norm_rescale: bool = False
    info: SAEInfo | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k(self, self.k, integral=False)

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        return _with_threshold(self, d_in, d_sae)

    def _activation(self, pre: Tensor) -> Tensor:
        return _jumprelu(pre, self.threshold)

    def encode_batch(self, x: Tensor) -> Tensor:
        """Features by the batch rule: :func:`batch_topk` over all vectors of ``x``."""
        return batch_topk(self.pre_activation(x), self.k)

    def _kernel_act(self) -> str:
        return "jumprelu"

    def _kernel_extra(self) -> Any:
        return self.threshold


@dataclass(frozen=True, eq=False, repr=False)
class GatedSAE(_AffineSAE):
    """Gated SAE (Rajamanoharan et al. 2024; SAELens's ``gated``): a gate decides which
    features fire, a magnitude path sharing ``W_enc`` (scaled by ``exp(r_mag)``) how much.

    ``b_enc`` is the gate's bias (SAELens's ``b_gate``).

    >>> import torch
    >>> sae = GatedSAE(torch.eye(2), torch.tensor([0.0, -5.0]), torch.eye(2), torch.zeros(2),
    ...                r_mag=torch.zeros(2), b_mag=torch.ones(2))
    >>> sae.encode(torch.tensor([1.0, 1.0])).tolist()
    [2.0, 0.0]
    """

    kind: ClassVar[str] = "gated"

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    r_mag: Tensor
    b_mag: Tensor
    apply_b_dec_to_input: bool = False
    constant_norm_rescale: bool = False
    info: SAEInfo | None = field(default=None, compare=False)

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        shapes = _AffineSAE._expected_shapes(self, d_in, d_sae)
        return {**shapes, "r_mag": [d_sae], "b_mag": [d_sae]}

    def magnitude_weights(self) -> Tensor:
        """``W_enc * exp(r_mag)``: the magnitude path's encoder."""
        return self.W_enc * torch.exp(self.r_mag)

    def pre_activation(self, x: Tensor) -> Tensor:
        """The magnitude path's pre-activation ``x' @ (W_enc * exp(r_mag)) + b_mag``."""
        return self.sae_in(x) @ self.magnitude_weights() + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        """``(x' @ W_enc + b_enc > 0) * relu(pre_activation(x))``."""
        xin = self.sae_in(x)
        gate = (xin @ self.W_enc + self.b_enc > 0).to(xin.dtype)
        return gate * torch.relu(xin @ self.magnitude_weights() + self.b_mag)

    def _kernel_act(self) -> str:
        return "gated"

    def _kernel_extra(self) -> Any:
        return (self.magnitude_weights(), self.b_mag)


@dataclass(frozen=True, eq=False, repr=False)
class Transcoder(_AffineSAE):
    """ReLU transcoder: ``relu(x @ W_enc + b_enc) @ W_dec + b_dec``, written ``d_out`` wide.

    >>> import torch
    >>> tc = Transcoder(torch.eye(2), torch.zeros(2), torch.ones(2, 3), torch.zeros(3))
    >>> tc.forward(torch.tensor([1.0, -1.0])).tolist()
    [1.0, 1.0, 1.0]
    """

    kind: ClassVar[str] = "transcoder"
    transcoder: ClassVar[bool] = True

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    info: SAEInfo | None = field(default=None, compare=False)

    def _activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)


@dataclass(frozen=True, eq=False, repr=False)
class JumpReLUTranscoder(_AffineSAE):
    """JumpReLU transcoder: features ``relu(pre) * (pre > threshold)``, written ``d_out`` wide.

    >>> import torch
    >>> tc = JumpReLUTranscoder(torch.eye(2), torch.zeros(2), torch.ones(2, 1), torch.zeros(1),
    ...                         threshold=torch.full((2,), 0.5))
    >>> tc.forward(torch.tensor([0.4, 0.6])).tolist()
    [0.6000000238418579]
    """

    kind: ClassVar[str] = "jumprelu_transcoder"
    transcoder: ClassVar[bool] = True

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor
    info: SAEInfo | None = field(default=None, compare=False)

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        return _with_threshold(self, d_in, d_sae)

    def _activation(self, pre: Tensor) -> Tensor:
        return _jumprelu(pre, self.threshold)

    def _kernel_act(self) -> str:
        return "jumprelu"

    def _kernel_extra(self) -> Any:
        return self.threshold


@dataclass(frozen=True, eq=False, repr=False)
class SkipTranscoder(_AffineSAE):
    """Skip transcoder: a ReLU transcoder plus a linear skip path ``x @ W_skip.T``
    (``W_skip [d_out, d_in]``), SAELens's ``skip_transcoder``.

    >>> import torch
    >>> tc = SkipTranscoder(torch.eye(2), torch.zeros(2), torch.zeros(2, 2), torch.zeros(2),
    ...                     W_skip=2 * torch.eye(2))
    >>> tc.forward(torch.tensor([1.0, -1.0])).tolist()
    [2.0, -2.0]
    """

    kind: ClassVar[str] = "skip_transcoder"
    transcoder: ClassVar[bool] = True

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    W_skip: Tensor
    info: SAEInfo | None = field(default=None, compare=False)

    def _expected_shapes(self, d_in: int, d_sae: int) -> dict[str, list[int]]:
        shapes = _AffineSAE._expected_shapes(self, d_in, d_sae)
        return {**shapes, "W_skip": [self.d_out, d_in]}

    def _activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def reconstruct(self, f: Tensor, x: Tensor) -> Tensor:
        """``decode(f) + x @ W_skip.T``."""
        x = self._check_width(x, self.d_in, "input x")
        return self.decode(f) + x @ self.W_skip.T


AnySAE: TypeAlias = (
    StandardSAE
    | JumpReLUSAE
    | TopKSAE
    | BatchTopKSAE
    | GatedSAE
    | Transcoder
    | JumpReLUTranscoder
    | SkipTranscoder
)
"""Any of the built-in SAE classes."""

SAE_KINDS: dict[str, type[AnySAE]] = {
    cls.kind: cls
    for cls in (
        StandardSAE,
        JumpReLUSAE,
        TopKSAE,
        BatchTopKSAE,
        GatedSAE,
        Transcoder,
        JumpReLUTranscoder,
        SkipTranscoder,
    )
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
