"""What an SAE was trained on (model, hook, site), and TransformerLens hook names as sites.

SAELens names a site by its TransformerLens hook (``blocks.8.hook_resid_pre``); this
package by a standard site (``resid_pre[8]``). :func:`site_of_hook` maps one to the other:

==================================  ==================
hook                                site
==================================  ==================
``hook_embed``                      ``embed``
``blocks.L.hook_resid_pre``         ``resid_pre[L]``
``blocks.L.hook_resid_post``        ``resid_post[L]``
``blocks.L.hook_attn_out``          ``attn_out[L]``
``blocks.L.hook_mlp_out``           ``mlp_out[L]``
``blocks.L.mlp.hook_post``          ``mlp_hidden[L]``
``ln_final.hook_normalized``        ``final_norm``
==================================  ==================

Other hooks (``hook_resid_mid``, ``hook_z``, ``ln2.hook_normalized``, ...) have no standard
site; an SAE on one of them is spliced with an explicit site (a raw module path).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from interventions.errors import SAEError

__all__ = ["HOOK_SITES", "SAEInfo", "info_from_cfg", "site_of_hook"]

HOOK_SITES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "mlp.hook_post": "mlp_hidden",
}
"""Per-block TransformerLens hooks (after ``blocks.L.``) and the standard site of each."""

_GLOBAL_HOOKS = {"hook_embed": "embed", "ln_final.hook_normalized": "final_norm"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def site_of_hook(hook_name: str) -> tuple[str, int | None] | None:
    """The standard site ``(name, layer)`` of a TransformerLens hook, or None if it has none.

    >>> site_of_hook("blocks.8.hook_resid_pre")
    ('resid_pre', 8)
    >>> site_of_hook("blocks.8.hook_resid_mid") is None
    True
    """
    if hook_name in _GLOBAL_HOOKS:
        return _GLOBAL_HOOKS[hook_name], None
    match = _BLOCK.match(hook_name)
    if match is None or match.group(2) not in HOOK_SITES:
        return None
    return HOOK_SITES[match.group(2)], int(match.group(1))


@dataclass(frozen=True)
class SAEInfo:
    """Where an SAE belongs: the model and hook it was trained on, and the matching site.

    ``site``/``layer`` is where a splice reads (and, for an SAE, writes); a transcoder writes
    ``site_out``/``layer_out``. Everything is optional: unknown is None.

    >>> SAEInfo.from_hook("blocks.2.hook_mlp_out", model_name="gpt2").where
    'mlp_out[2]'
    """

    model_name: str | None = None
    hook_name: str | None = None
    site: str | None = None
    layer: int | None = None
    hook_name_out: str | None = None
    site_out: str | None = None
    layer_out: int | None = None
    release: str | None = None
    sae_id: str | None = None
    neuronpedia_id: str | None = None
    prepend_bos: bool | None = None

    @classmethod
    def from_hook(
        cls, hook_name: str | None, hook_name_out: str | None = None, **kw: Any
    ) -> SAEInfo:
        """An ``SAEInfo`` whose sites come from the hook names (see :func:`site_of_hook`)."""
        site = site_of_hook(hook_name) if hook_name else None
        out = site_of_hook(hook_name_out) if hook_name_out else None
        return cls(
            hook_name=hook_name,
            site=site[0] if site else None,
            layer=site[1] if site else None,
            hook_name_out=hook_name_out,
            site_out=out[0] if out else None,
            layer_out=out[1] if out else None,
            **kw,
        )

    @property
    def where(self) -> str | None:
        """The read site as text, e.g. ``resid_pre[8]``, or None when unknown."""
        if self.site is None:
            return None
        return self.site if self.layer is None else f"{self.site}[{self.layer}]"

    def saelens_metadata(self) -> dict[str, Any]:
        """The keys of SAELens's ``metadata`` block this info fills (for ``save_sae``)."""
        out: dict[str, Any] = {}
        if self.model_name is not None:
            out["model_name"] = self.model_name
        if self.hook_name is not None:
            out["hook_name"] = self.hook_name
        if self.neuronpedia_id is not None:
            out["neuronpedia_id"] = self.neuronpedia_id
        if self.prepend_bos is not None:
            out["prepend_bos"] = self.prepend_bos
        return out


def _text(cfg: Mapping[str, Any], key: str) -> str | None:
    meta = cfg.get("metadata")
    for source in (cfg, meta if isinstance(meta, Mapping) else {}):
        value = source.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def info_from_cfg(cfg: Mapping[str, Any], **kw: Any) -> SAEInfo | None:
    """What an SAELens config says about where the SAE belongs (top level or ``metadata``).

    >>> info_from_cfg({"metadata": {"hook_name": "blocks.0.hook_resid_post"}}).where
    'resid_post[0]'
    """
    hook = _text(cfg, "hook_name")
    model = _text(cfg, "model_name")
    meta = cfg.get("metadata")
    bos = cfg.get("prepend_bos", meta.get("prepend_bos") if isinstance(meta, Mapping) else None)
    if hook is None and model is None and not kw:
        return None
    try:
        return SAEInfo.from_hook(
            hook,
            _text(cfg, "hook_name_out"),
            model_name=kw.pop("model_name", model),
            neuronpedia_id=kw.pop("neuronpedia_id", _text(cfg, "neuronpedia_id")),
            prepend_bos=bos if isinstance(bos, bool) else None,
            **kw,
        )
    except TypeError as exc:  # pragma: no cover - a programming error in a caller
        raise SAEError(f"info_from_cfg: {exc}") from exc
