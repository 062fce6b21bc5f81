"""The closed set of operations. Frozen plain data: strings, numbers, tuples, tensor keys.

No op holds a callable or a tensor: tensors live in the graph's tensor table and ops name
them (:class:`Const`), so a graph prints, compares and serialises as data.

=============  =================================================================
``read``       record a site's value under a name (it can flow into other runs)
``patch``      overwrite with a value read in another run, or with a constant
``ablate``     zero, mean (over a reference run), or resample (from a reference run)
``add``        add ``scale * direction`` (steering)
``project_out``remove the component along a direction (or a subspace)
``scale``      multiply by a factor
``sae_splice`` encode with an SAE, edit features, decode; keep, drop or detach the error
``edge_patch`` change one edge of the computational graph: add (an upstream node's output
               elsewhere - its output here) into one downstream input only
``grad``       record the gradient, at a site, of a metric of the run's logits (summed
               over its prompts); the forward pass is unchanged
=============  =================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

from interventions.errors import SpecError, check_name, choices_text
from interventions.sites import Select, Site


@dataclass(frozen=True)
class Ref:
    """A value read in another run, by the read's name."""

    read: str


@dataclass(frozen=True)
class Const:
    """A constant tensor, by its key in the graph's tensor table."""

    tensor: str


Value: TypeAlias = Ref | Const

AblateMethod = Literal["zero", "mean", "resample"]
EdgeMethod = Literal["patch", "zero", "mean"]
ErrorTerm = Literal["keep", "drop", "detach"]
EditMode = Literal["set", "scale", "clamp"]
ABLATE_METHODS: tuple[str, ...] = get_args(AblateMethod)
ERROR_TERMS: tuple[str, ...] = get_args(ErrorTerm)
EDIT_MODES: tuple[str, ...] = get_args(EditMode)
EDGE_METHODS: tuple[str, ...] = get_args(EdgeMethod)
# where an edge starts: the embeddings (the residual stream entering layer 0), one head's
# output (its ``head`` value times its slice of the output projection) or an MLP's output
EDGE_UPSTREAM_SITES: tuple[str, ...] = ("resid_pre", "head", "mlp_out")


def _check_choice(value: object, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise SpecError(f"unknown {what} {value!r}; expected one of {choices_text(choices)}")


def _unsigned_zero(obj: object, *names: str) -> None:
    """Store -0.0 as 0.0: they compare equal, so they must print and hash alike too."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, float) and value == 0.0:
            object.__setattr__(obj, name, 0.0)


def _check_finite(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(f"{what} must be finite, got {value!r}")


@dataclass(frozen=True)
class FeatureEdit:
    """An edit of SAE feature activations: ``set`` to a value, ``scale`` by a factor, or
    ``clamp`` into ``[low, high]``.

    >>> FeatureEdit.set(7, 4.0)
    FeatureEdit(features=(7,), mode='set', value=4.0, low=None, high=None)
    """

    features: tuple[int, ...]
    mode: EditMode
    value: float | None = None
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        _unsigned_zero(self, "value", "low", "high")
        _check_choice(self.mode, EDIT_MODES, "feature edit mode")
        if not self.features or not all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in self.features
        ):
            raise SpecError(
                f"feature edit: features must be non-negative ints, got {self.features!r}"
            )
        if self.mode in ("set", "scale"):
            _check_finite(self.value, f"feature edit {self.mode!r} value")
            if self.low is not None or self.high is not None:
                raise SpecError(f"feature edit {self.mode!r} takes value=, not low=/high=")
        else:
            if self.value is not None:
                raise SpecError("feature edit 'clamp' takes low= and/or high=, not value=")
            if self.low is None and self.high is None:
                raise SpecError("feature edit 'clamp' needs low= or high=")
            for bound in (self.low, self.high):
                if bound is not None:
                    _check_finite(bound, "clamp bound")
            if self.low is not None and self.high is not None and self.low > self.high:
                raise SpecError(f"clamp: low={self.low} > high={self.high}")

    @classmethod
    def set(cls, features: int | tuple[int, ...] | list[int], value: float) -> FeatureEdit:
        return cls(_features(features), "set", value=float(value))

    @classmethod
    def scale(cls, features: int | tuple[int, ...] | list[int], factor: float) -> FeatureEdit:
        return cls(_features(features), "scale", value=float(factor))

    @classmethod
    def clamp(
        cls,
        features: int | tuple[int, ...] | list[int],
        low: float | None = None,
        high: float | None = None,
    ) -> FeatureEdit:
        return cls(
            _features(features),
            "clamp",
            low=None if low is None else float(low),
            high=None if high is None else float(high),
        )


def _features(features: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)


@dataclass(frozen=True)
class SAESpec:
    """An SAE stored in a graph: its kind, settings and the keys of its tensors."""

    kind: str
    params: tuple[tuple[str, int | float | bool], ...]
    tensors: tuple[tuple[str, str], ...]  # (parameter name, key in the tensor table)


@dataclass(frozen=True)
class Read:
    run: str
    site: Site
    select: Select
    name: str


@dataclass(frozen=True)
class Patch:
    run: str
    site: Site
    select: Select
    value: Value


@dataclass(frozen=True)
class Ablate:
    run: str
    site: Site
    select: Select
    method: AblateMethod = "zero"
    source: str | None = None  # reference run, for mean and resample
    per_position: bool = False  # mean: keep positions apart instead of averaging over them
    seed: int = 0  # resample: which reference items are drawn

    def __post_init__(self) -> None:
        _check_choice(self.method, ABLATE_METHODS, "ablation method")
        if self.method == "zero" and self.source is not None:
            raise SpecError("ablate 'zero' takes no source run")
        if self.method != "zero" and self.source is None:
            raise SpecError(f"ablate {self.method!r} needs source=<a reference run>")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SpecError(f"ablate seed must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class Add:
    run: str
    site: Site
    select: Select
    direction: Const
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_finite(self.scale, "add scale")
        _unsigned_zero(self, "scale")


@dataclass(frozen=True)
class ProjectOut:
    run: str
    site: Site
    select: Select
    direction: Const


@dataclass(frozen=True)
class Scale:
    run: str
    site: Site
    select: Select
    factor: float

    def __post_init__(self) -> None:
        _check_finite(self.factor, "scale factor")
        _unsigned_zero(self, "factor")


@dataclass(frozen=True)
class SAESplice:
    """Replace a selection by an SAE's reconstruction (after ``edits``), with the error
    term ``x - decode(encode(x))`` added back (``keep``), left out (``drop``) or added as a
    constant with no gradient (``detach``, SAELens's convention). ``keep`` and ``detach``
    agree in value and differ in gradient: see :meth:`RunHandle.sae_splice`.

    With a ``source`` site (a cross-site transcoder) the SAE encodes that site's value, taken
    earlier in the same forward pass at the same selection, and its reconstruction replaces
    the selection at ``site``; the error term is then ``x_site - reconstruction``."""

    run: str
    site: Site
    select: Select
    sae: str  # key in the graph's SAE table
    edits: tuple[FeatureEdit, ...] = ()
    error: ErrorTerm = "keep"
    features: str | None = None  # name under which to record the (unedited) feature acts
    source: Site | None = None  # where the SAE reads, when not at ``site`` (transcoders)

    def __post_init__(self) -> None:
        _check_choice(self.error, ERROR_TERMS, "SAE error term")
        if self.source is not None and not isinstance(self.source, Site):
            raise SpecError(f"sae_splice source must be a Site, got {self.source!r}")
        if self.source is not None and self.source == self.site:
            raise SpecError(f"sae_splice source {self.source} is its own site; leave source out")


@dataclass(frozen=True)
class EdgePatch:
    """Patch one edge: add ``(upstream's output in source - upstream's output here)`` into
    the downstream input ``site`` alone (``zero``: minus its output here; ``mean``: its
    output averaged over the source run's rows and positions, minus its output here).

    ``upstream`` is ``resid_pre`` at layer 0 (the embeddings), ``head`` at a layer with
    ``upstream_head`` (that head's output ``head[..., h, :] @ W_O[h]``, no bias) or
    ``mlp_out`` at a layer. ``site`` is where the downstream node reads the residual
    stream: a per-head input (``q_input``/``k_input``/``v_input`` with ``head=``), or the
    input of the MLP's or the final norm (a raw ``<norm>.input`` site, which unlike
    ``resid_mid`` leaves the residual stream itself alone). "Here" is this very run: the
    upstream node's output after every other edit of the run, so edges patched together
    compose (ACDC's convention). Build them with :mod:`interventions.circuits`.
    """

    run: str
    site: Site
    select: Select
    upstream: Site
    upstream_head: int | None = None
    method: EdgeMethod = "patch"
    source: str | None = None

    def __post_init__(self) -> None:
        _check_choice(self.method, EDGE_METHODS, "edge patch method")
        if self.method == "zero" and self.source is not None:
            raise SpecError("edge_patch 'zero' takes no source run")
        if self.method != "zero" and self.source is None:
            raise SpecError(f"edge_patch {self.method!r} needs source=<another run>")
        _check_choice(self.upstream.name, EDGE_UPSTREAM_SITES, "edge upstream site")
        if self.upstream.name == "resid_pre" and self.upstream.layer != 0:
            raise SpecError(
                f"edge_patch: the embeddings node is resid_pre at layer 0, not {self.upstream}"
            )
        head = self.upstream_head
        if (self.upstream.name == "head") != (head is not None):
            raise SpecError(
                f"edge_patch: upstream_head= is needed for a 'head' upstream and only there "
                f"(upstream {self.upstream}, upstream_head={head!r})"
            )
        if head is not None and (not isinstance(head, int) or isinstance(head, bool) or head < 0):
            raise SpecError(f"edge_patch: upstream_head must be a non-negative int, got {head!r}")


GradMetric = Literal["logit_diff", "logit", "prob", "logprob"]
GRAD_METRICS: tuple[str, ...] = get_args(GradMetric)


@dataclass(frozen=True)
class Grad:
    """Record, under ``name``, the gradient at ``site`` (the selected entries) of
    ``metric`` of this run's logits at position ``metric_pos``, summed over the run's
    prompts (so each prompt's rows hold its own metric's gradient; divide for a mean).

    The metric is data, so the backward pass can run where the model runs (on NDIF):
    ``logit`` is ``logits[answer]``, ``logit_diff`` ``logits[answer] - logits[wrong]``,
    ``prob`` / ``logprob`` the softmax / log-softmax at ``answer``; ``answer`` and
    ``wrong`` are int64 ``[prompts]`` (or ``[1]``) token ids in the tensor table. The
    gradient is taken of the site's value as the rest of the forward pass sees it (after
    this run's other ops there), through every path to the logits. Every ``grad`` of one
    run names the same metric: one backward pass per run.
    """

    run: str
    site: Site
    select: Select
    name: str
    metric: GradMetric
    answer: Const
    wrong: Const | None = None
    metric_pos: int = -1

    def __post_init__(self) -> None:
        _check_choice(self.metric, GRAD_METRICS, "grad metric")
        if (self.metric == "logit_diff") != (self.wrong is not None):
            raise SpecError(
                f"grad metric {self.metric!r}: wrong= token ids go with 'logit_diff' and only there"
            )
        pos = self.metric_pos
        if not isinstance(pos, int) or isinstance(pos, bool):
            raise SpecError(f"grad metric_pos must be an int, got {pos!r:.40}")

    @property
    def objective(self) -> tuple[str, Const, Const | None, int]:
        """What every ``grad`` of one run must share: (metric, answer, wrong, metric_pos)."""
        return (self.metric, self.answer, self.wrong, self.metric_pos)


Op: TypeAlias = Read | Patch | Ablate | Add | ProjectOut | Scale | SAESplice | EdgePatch | Grad

OP_KINDS: dict[str, type] = {
    "read": Read,
    "patch": Patch,
    "ablate": Ablate,
    "add": Add,
    "project_out": ProjectOut,
    "scale": Scale,
    "sae_splice": SAESplice,
    "edge_patch": EdgePatch,
    "grad": Grad,
}
KIND_OF: dict[type, str] = {cls: kind for kind, cls in OP_KINDS.items()}


def op_kind(op: Op) -> str:
    """The op's kind name, as written in JSON and in capability tables."""
    return KIND_OF[type(op)]


def produces(op: Op) -> list[str]:
    """Result names an op records."""
    if isinstance(op, (Read, Grad)):
        return [op.name]
    if isinstance(op, SAESplice) and op.features is not None:
        return [op.features]
    return []


def source_run(op: Op) -> str | None:
    """The run whose whole site an op takes its value from (a mean or resample ablation,
    an edge patch), which must therefore run first."""
    if isinstance(op, (Ablate, EdgePatch)):
        return op.source
    return None


def depends_on(op: Op) -> list[str]:
    """Read names an op consumes (values flowing in from other runs)."""
    if isinstance(op, Patch) and isinstance(op.value, Ref):
        return [op.value.read]
    return []


def tensor_keys(op: Op) -> list[str]:
    """Keys of the tensor table an op refers to directly."""
    if isinstance(op, Patch) and isinstance(op.value, Const):
        return [op.value.tensor]
    if isinstance(op, (Add, ProjectOut)):
        return [op.direction.tensor]
    if isinstance(op, Grad):
        return [op.answer.tensor] + ([op.wrong.tensor] if op.wrong is not None else [])
    return []


def check_op_names(op: Op) -> None:
    """Raise :class:`SpecError` if any name in ``op`` is longer than ``MAX_NAME``.

    Run, read, source, SAE and tensor names and the site name are all bounded, so no
    suggestion or message ever works on a huge string.
    """
    kind = KIND_OF.get(type(op), type(op).__name__)
    check_name(getattr(op, "run", None), f"{kind} run")
    site = getattr(op, "site", None)
    check_name(getattr(site, "name", None), f"{kind} site name")
    for field in ("name", "source", "sae", "features"):
        check_name(getattr(op, field, None), f"{kind} {field}")
    for field in ("value", "direction", "answer", "wrong"):
        value = getattr(op, field, None)
        check_name(getattr(value, "read", None), f"{kind} {field} ref")
        check_name(getattr(value, "tensor", None), f"{kind} {field} tensor")
