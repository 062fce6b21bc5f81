"""Where an intervention happens: sites, and selectors that narrow them.

A site is spelled one of two ways:

* a **standard name** that means the same on every supported architecture
  (``resid_post`` at ``layer=5``), resolved through :mod:`interventions.architectures`;
* a **raw module path** ending in ``.output`` or ``.input`` (``"transformer.h.3.mlp.output"``,
  or just ``"output"`` for the root module), which works on any ``torch.nn.Module``.

Every site has named axes. Residual-stream sites are ``(batch, pos, d_model)``; ``head``,
``q``, ``k`` and ``v`` are ``(batch, pos, head, d_head)``; the per-head inputs ``q_input``,
``k_input`` and ``v_input`` are ``(batch, pos, head, d_model)``; ``attn_pattern`` is
``(batch, head, pos, key_pos)`` with ``pos`` the query position, and so is ``attn_scores``,
the pre-softmax scores. With grouped-query
attention ``k``, ``v``, ``k_input`` and ``v_input`` have one entry per key-value head, and
``head=`` there counts key-value heads (query head ``h`` reads key-value head
``h // (n_heads // n_kv_heads)``). A :class:`Select` narrows axes by name: ``batch``, ``pos``,
``head`` and ``dims`` (the last, hidden axis). An ``int`` selector drops its axis, the way
numpy indexing does; lists, ranges and slices keep it. Several list selectors select
their outer product (``pos=[1, 2], head=[0, 3]`` is four (pos, head) pairs).

>>> sel = Select.make(pos=-1, head=[0, 2])
>>> sel
Select(pos=-1, head=(0, 2))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeAlias

import torch

from interventions.errors import (
    SpecError,
    UnknownSite,
    check_name,
    choices_text,
    excerpt,
    suggest,
)

Axis = Literal["batch", "pos", "head", "key_pos", "hidden"]


@dataclass(frozen=True)
class Span:
    """A slice that can be hashed, compared and written to JSON."""

    start: int | None = None
    stop: int | None = None
    step: int | None = None

    def indices(self, size: int) -> list[int]:
        if self.step == 0:
            raise SpecError("a slice step cannot be zero")
        return list(range(size)[slice(self.start, self.stop, self.step)])

    def __repr__(self) -> str:
        parts = ["" if v is None else str(v) for v in (self.start, self.stop, self.step)]
        return ":".join(parts[:2] if self.step is None else parts)


@dataclass(frozen=True)
class PerPrompt:
    """Positions chosen prompt by prompt: row ``i`` of a run takes ``positions[i]``.

    Positions count like every other position selector, in each prompt's own tokens:
    non-negative ones from its first token, negative ones from its last. ``squeeze``
    (one position per prompt, as :func:`per_prompt` and ``iv.token_positions`` give)
    drops the position axis the way an int selector does; a list per prompt keeps it.

    >>> per_prompt([3, 5, 4])
    PerPrompt((3, 5, 4))
    >>> Select.make(pos=[[1, 2], [0, 3]]).pos
    PerPrompt(((1, 2), (0, 3)))
    """

    positions: tuple[tuple[int, ...], ...]
    squeeze: bool = False

    def __post_init__(self) -> None:
        rows = self.positions
        if not isinstance(rows, tuple) or not rows:
            raise SpecError("a per-prompt selector needs at least one prompt's positions")
        for i, row in enumerate(rows):
            if (
                not isinstance(row, tuple)
                or not row
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in row)
            ):
                raise SpecError(
                    f"per-prompt positions: prompt {i} has {row!r:.80}; expected a non-empty "
                    "list of ints"
                )
        if self.squeeze and any(len(row) != 1 for row in rows):
            raise SpecError("per-prompt positions with squeeze=True take one position per prompt")
        counts = {len(row) for row in rows}
        if len(counts) > 1:
            raise SpecError(
                f"per-prompt positions: every prompt needs the same number of positions, got "
                f"{sorted(counts)}; pad with a repeated position or use one run per count"
            )

    def row(self, i: int) -> int | tuple[int, ...]:
        """Prompt ``i``'s selector as a plain index (an int when squeezed)."""
        return self.positions[i][0] if self.squeeze else self.positions[i]

    def __len__(self) -> int:
        return len(self.positions)

    def __repr__(self) -> str:
        shown = tuple(r[0] for r in self.positions) if self.squeeze else self.positions
        return f"PerPrompt({shown!r})"


def per_prompt(positions: Sequence[int] | Sequence[Sequence[int]]) -> PerPrompt:
    """A per-prompt position selector: one int per prompt (the position axis is dropped,
    like ``pos=-1``) or one list per prompt (kept).

    >>> per_prompt([4, 6]).row(1)
    6
    """
    items = list(positions)
    if items and all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        return PerPrompt(tuple((p,) for p in items if isinstance(p, int)), squeeze=True)
    if isinstance(positions, torch.Tensor) and positions.ndim == 1:
        return PerPrompt(tuple((int(p),) for p in positions), squeeze=True)
    rows = []
    for row in items:
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, torch.Tensor)):
            raise SpecError(f"per_prompt: expected ints or lists of ints, got {row!r:.80}")
        rows.append(tuple(int(p) if isinstance(p, torch.Tensor) else p for p in row))
    return PerPrompt(tuple(rows))


Index: TypeAlias = int | tuple[int, ...] | Span | PerPrompt | None
IndexLike: TypeAlias = (
    int | Sequence[int] | Sequence[Sequence[int]] | slice | range | Span | PerPrompt | None
)


def as_index(value: Any, what: str) -> Index:
    """Normalise a user selector (int, list, tuple, range, slice, Span, None) to an Index.

    Only ``pos`` may be chosen prompt by prompt (a :class:`PerPrompt`, or a list of lists).
    """
    if value is None or isinstance(value, Span):
        return value
    if isinstance(value, PerPrompt) or (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, (list, tuple)) for v in value)
    ):
        if what != "pos":
            raise SpecError(
                f"selector {what}=: only pos= can be chosen prompt by prompt, not {what}="
            )
        return value if isinstance(value, PerPrompt) else per_prompt(value)
    if isinstance(value, bool):
        raise SpecError(f"selector {what}={value!r}: expected an int, a list of ints or a slice")
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        return int(value)
    if isinstance(value, slice):
        for part in (value.start, value.stop, value.step):
            if part is not None and (not isinstance(part, int) or isinstance(part, bool)):
                raise SpecError(f"selector {what}={value!r}: slice bounds must be ints or None")
        if value.step == 0:
            raise SpecError(f"selector {what}={value!r}: slice step cannot be zero")
        return Span(value.start, value.stop, value.step)
    if isinstance(value, range):
        return tuple(value)
    if isinstance(value, (list, tuple)) or (
        isinstance(value, torch.Tensor) and value.ndim == 1 and not value.is_floating_point()
    ):
        items = [int(v) if isinstance(v, torch.Tensor) else v for v in value]
        if not items:
            raise SpecError(f"selector {what}=[]: an empty list selects nothing")
        for item in items:
            if not isinstance(item, int) or isinstance(item, bool):
                raise SpecError(f"selector {what}={value!r}: list items must be ints")
        return tuple(items)
    raise SpecError(
        f"selector {what}={value!r}: expected an int, a list of ints, a range or a slice"
    )


@dataclass(frozen=True)
class Select:
    """Which entries of a site an op touches. ``None`` means the whole axis."""

    batch: Index = None
    pos: Index = None
    head: Index = None
    dims: Index = None

    @classmethod
    def make(
        cls,
        *,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> Select:
        return cls(
            batch=as_index(batch, "batch"),
            pos=as_index(pos, "pos"),
            head=as_index(head, "head"),
            dims=as_index(dims, "dims"),
        )

    def __post_init__(self) -> None:
        for name in ("batch", "head", "dims"):
            if isinstance(getattr(self, name), PerPrompt):
                raise SpecError(f"selector {name}=: only pos= can be chosen prompt by prompt")

    @property
    def is_all(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def items(self) -> list[tuple[str, Index]]:
        return [
            (f.name, getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) is not None
        ]

    def __repr__(self) -> str:
        return f"Select({', '.join(f'{k}={v!r}' for k, v in self.items())})"

    def describe(self) -> str:
        """Compact text for printing graphs: ``pos=-1 head=(0, 2)``."""
        return " ".join(f"{k}={v!r}" for k, v in self.items())


# Which axis of a site each selector field addresses.
_SELECT_AXIS = {"batch": "batch", "pos": "pos", "head": "head", "dims": "hidden"}


@dataclass(frozen=True)
class SiteKind:
    """What a standard site means: its axes, whether it has a layer, and if it can be written."""

    axes: tuple[Axis, ...]
    layered: bool
    writable: bool = True
    doc: str = ""


RESIDUAL: tuple[Axis, ...] = ("batch", "pos", "hidden")
HEADS: tuple[Axis, ...] = ("batch", "pos", "head", "hidden")

# Sites whose head axis counts key-value heads (grouped-query attention).
KV_HEAD_SITES = frozenset({"k", "v", "k_input", "v_input"})

STANDARD_SITES: dict[str, SiteKind] = {
    "embed": SiteKind(
        RESIDUAL,
        False,
        doc="output of the token embedding module (GPT-2: before position embeddings are "
        "added; Gemma: already scaled by sqrt(d_model), as transformers 5 does it there)",
    ),
    "resid_pre": SiteKind(RESIDUAL, True, doc="residual stream entering a block"),
    "resid_post": SiteKind(RESIDUAL, True, doc="residual stream leaving a block"),
    "attn_out": SiteKind(RESIDUAL, True, doc="attention block output, before the residual add"),
    "mlp_out": SiteKind(RESIDUAL, True, doc="MLP block output, before the residual add"),
    "head": SiteKind(
        HEADS,
        True,
        doc="per-head attention output before the output projection",
    ),
    "attn_pattern": SiteKind(
        ("batch", "head", "pos", "key_pos"),
        True,
        writable=False,
        doc="attention probabilities (query pos x key pos); read only, eager attention",
    ),
    "attn_scores": SiteKind(
        ("batch", "head", "pos", "key_pos"),
        True,
        doc="pre-softmax attention scores, exactly the tensor the model's eager attention "
        "hands softmax (scaled, masked: score + dtype min; ALiBi and soft-capping included)",
    ),
    "mlp_hidden": SiteKind(
        RESIDUAL, True, doc="MLP hidden activation, input of the down projection"
    ),
    "resid_mid": SiteKind(
        RESIDUAL, True, doc="residual between attention and MLP; written in place (all see it)"
    ),
    "q": SiteKind(HEADS, True, doc="per-head queries, before rotary embeddings (TL hook_q)"),
    "k": SiteKind(HEADS, True, doc="keys by key-value head, before rotary embeddings"),
    "v": SiteKind(HEADS, True, doc="values by key-value head"),
    "q_input": SiteKind(
        HEADS, True, doc="each query head's own copy of the block input, before the norm"
    ),
    "k_input": SiteKind(HEADS, True, doc="each key-value head's own copy of its key input"),
    "v_input": SiteKind(HEADS, True, doc="each key-value head's own copy of its value input"),
    "final_norm": SiteKind(RESIDUAL, False, doc="output of the final normalisation"),
    "logits": SiteKind(RESIDUAL, False, doc="the model's output logits"),
    # mixture-of-experts families only. The router returns its ids and weights already
    # computed: a write re-runs the family's routing rule (interventions.routing)
    "router_logits": SiteKind(
        RESIDUAL,
        True,
        doc="MoE router logits, one per expert on the last axis (before softmax/top-k); a "
        "write re-routes: the family's rule picks the experts and weights from the new logits",
    ),
    "experts_chosen": SiteKind(
        RESIDUAL,
        True,
        doc="MoE experts chosen per token (int64 ids), one per top-k slot on the last axis; "
        "patch it (ids from another run or a constant) and the weights of the new ids come "
        "from the router's own logits by the family's rule",
    ),
    # the head axis counts experts here (select them with head=)
    "expert_out": SiteKind(
        HEADS,
        True,
        doc="MoE: each expert's own output for every token, before its routing weight "
        "(batch, pos, expert, d_model); the block adds weight x output for the chosen ones",
    ),
}

RAW_SUFFIXES = (".output", ".input")

# TransformerLens hook names accepted as aliases of standard sites with the same meaning
# ("{layer}" is the block index). Resolved when a Site is made, so graphs, printing and
# JSON only ever hold the standard name. TransformerLens hooks left out have no standard
# site of the same meaning (hook_rot_q/k, hook_attn_scores, whose masked entries are -inf where attn_scores
# holds the model's own score + dtype min, hook_pos_embed,
# ln_final.hook_normalized, which is before the final norm's weight and bias, ...).
TRANSFORMER_LENS_HOOKS: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "head": "blocks.{layer}.attn.hook_z",
    "attn_pattern": "blocks.{layer}.attn.hook_pattern",
    "mlp_hidden": "blocks.{layer}.mlp.hook_post",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "q_input": "blocks.{layer}.hook_q_input",
    "k_input": "blocks.{layer}.hook_k_input",
    "v_input": "blocks.{layer}.hook_v_input",
}


def transformer_lens_alias(name: str) -> tuple[str, int | None] | None:
    """The standard site (and layer) a TransformerLens hook name means, else ``None``.

    >>> transformer_lens_alias("blocks.3.attn.hook_z")
    ('head', 3)
    >>> transformer_lens_alias("blocks.3.attn.hook_q")
    ('q', 3)
    >>> transformer_lens_alias("blocks.3.attn.hook_rot_q") is None
    True
    """
    for site, template in TRANSFORMER_LENS_HOOKS.items():
        before, _, after = template.partition("{layer}")
        if not after:
            if name == template:
                return site, None
            continue
        if name.startswith(before) and name.endswith(after):
            middle = name[len(before) : len(name) - len(after)]
            if middle.isdigit():
                return site, int(middle)
    return None


@dataclass(frozen=True)
class Site:
    """A place in a model: a standard name (with a layer) or a raw module path.

    >>> Site("resid_post", 5)
    Site('resid_post', layer=5)
    >>> Site("transformer.h.0.mlp.output").is_raw
    True
    """

    name: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"site name must be a non-empty string, got {excerpt(self.name)}")
        check_name(self.name, "site name")
        if self.layer is not None and (
            not isinstance(self.layer, int) or isinstance(self.layer, bool)
        ):
            raise SpecError(f"site {self.name!r}: layer must be an int, got {self.layer!r}")
        if not self.is_raw and self.name not in STANDARD_SITES:
            self._resolve_alias()
        if self.is_raw:
            path = self.raw_parts[0]
            if path and not all(part.isidentifier() or part.isdigit() for part in path.split(".")):
                raise SpecError(
                    f"raw site {self.name!r}: a module path is dotted names and indices, "
                    "like 'transformer.h.0.mlp.output'"
                )
            if self.layer is not None:
                raise SpecError(
                    f"raw module site {self.name!r} takes no layer; put the layer in the path"
                )
            return
        kind = STANDARD_SITES.get(self.name)
        if kind is None:
            raise UnknownSite(
                f"{self.name!r} is not a site{suggest(self.name, STANDARD_SITES) or '.'} "
                f"Standard sites: {choices_text(STANDARD_SITES)}; or a module path ending in "
                f"'.output' or '.input'"
            )
        if kind.layered and self.layer is None:
            raise SpecError(f"site {self.name!r} needs a layer, e.g. layer=0")
        if not kind.layered and self.layer is not None:
            raise SpecError(f"site {self.name!r} has no layer; drop layer={self.layer}")

    def _resolve_alias(self) -> None:
        """Replace a TransformerLens hook name by the standard name and layer it means."""
        alias = transformer_lens_alias(self.name)
        if alias is None:
            if self.name.startswith(("blocks.", "hook_")):
                hooks = ", ".join(TRANSFORMER_LENS_HOOKS.values())
                raise UnknownSite(
                    f"{self.name!r} is not a TransformerLens hook with a standard site of the "
                    f"same meaning; aliases: {hooks}. Standard sites: "
                    f"{choices_text(STANDARD_SITES)}"
                )
            return
        name, layer = alias
        if self.layer is not None and self.layer != layer:
            raise SpecError(
                f"site {self.name!r} names layer {layer} but was given layer={self.layer}"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "layer", layer)

    @property
    def is_raw(self) -> bool:
        return self.name in ("output", "input") or self.name.endswith(RAW_SUFFIXES)

    @property
    def raw_parts(self) -> tuple[str, Literal["output", "input"]]:
        """For a raw site, the module path ('' for the root) and which side is hooked."""
        path, _, io = self.name.rpartition(".")
        if self.name in ("output", "input"):
            path, io = "", self.name
        return path, "output" if io == "output" else "input"

    @property
    def kind(self) -> SiteKind:
        if self.is_raw:
            return SiteKind(RESIDUAL, layered=False, doc="raw module tensor")
        return STANDARD_SITES[self.name]

    def __repr__(self) -> str:
        return f"Site({self.name!r}" + ("" if self.layer is None else f", layer={self.layer}") + ")"

    def __str__(self) -> str:
        return self.name if self.layer is None else f"{self.name}[{self.layer}]"
