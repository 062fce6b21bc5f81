"""The site crosswalk: this package's standard sites against TransformerLens hook names,
nnsight module paths and pyvene components, per built-in family.

``docs/crosswalk.md`` holds :func:`crosswalk_markdown`'s output between its markers (a
test checks it); ``python -m interventions.crosswalk`` prints it to paste there.

>>> from interventions.architectures import architectures
>>> rows = crosswalk_rows(architectures()["gpt2"])
>>> rows[1][:2]
('`resid_pre[L]`', '`blocks.L.hook_resid_pre`')
>>> rows[1][2:]
('`model.transformer.h[L].input`', '`model.transformer.h.L.input`')
"""

from __future__ import annotations

import re

from interventions.architectures import (
    _BUILTIN,
    _WHY_MISSING,
    ArchitectureMap,
    HookPoint,
    standard_hook_points,
)
from interventions.sites import STANDARD_SITES, TRANSFORMER_LENS_HOOKS

_NOTES = {
    "heads": " viewed as [batch, pos, head, d_head]",
    "q_heads": " viewed as [batch, pos, head, d_head]",
    "kv_heads": " viewed as [batch, pos, kv_head, d_head]",
    "stacked_q": " [..., :n_heads*d_head], by head",
    "stacked_k": " [..., n_heads*d_head : +n_kv*d_head], by kv head",
    "stacked_v": " [..., last n_kv*d_head], by kv head",
    "per_head_q": " viewed as [..., head, 3*d_head][..., :d_head]",
    "per_head_k": " viewed as [..., head, 3*d_head][..., d_head:2*d_head]",
    "per_head_v": " viewed as [..., head, 3*d_head][..., 2*d_head:]",
    "resid": " (written in place: the residual holds it)",
    "tokens": " (rows, viewed as [batch, pos, d])",
}

# a per-head input is written at its projection's output
_SPLIT_NOTE = " + W_h (norm(x_h') - norm(x)) for a changed head's copy x_h'"

_NO_TL = {
    "final_norm": "— (`ln_final.hook_normalized` is before the weight and bias)",
    "logits": "— (the model's return value)",
}


_ROUTER_ITEM = {"router_logits": 0, "router_choice": 2}  # the gate returns (logits, weights, ids)


def _nnsight(point: HookPoint | None) -> str:
    if point is None:
        return "— (not in this family's map)"
    if point.view == "attn_scores":
        return "— (torch backend only: the input of softmax inside eager attention)"
    if point.view == "logits":
        return "`model.output.logits`"
    path = re.sub(r"\.(\d+|L)(?=\.|$)", r"[\1]", point.module)
    if point.view.startswith("split_"):
        return f"`model.{path}.output`" + _SPLIT_NOTE
    if point.view in _ROUTER_ITEM:
        return (
            f"`model.{path}.output[{_ROUTER_ITEM[point.view]}]` (torch backend only here; a "
            "write re-routes by the family's rule)"
        )
    if point.view == "attn_weights":
        return f"`model.{path}.output[1]` (eager attention)"
    if point.view == "expert_out":
        return "— (torch backend only: recomputed from the fused experts' weights)"
    return f"`model.{path}.{point.io}`" + _NOTES.get(point.view, "")


def _pyvene(point: HookPoint | None) -> str:
    if point is None:
        return "— (not in this family's map)"
    if point.view in ("attn_weights", "attn_scores"):
        return "— (pyvene cannot read it)"
    if point.view in _ROUTER_ITEM or point.view == "expert_out":
        return "— (torch backend only)"
    base = f"model.{point.module}.{point.io}" if point.module else f"model.{point.io}"
    if point.view.startswith("split_"):
        return f"`{base}`" + _SPLIT_NOTE
    if point.view not in ("plain", "heads", "logits", "tokens", "resid", *_NOTES):
        return "— (not built on pyvene yet)"
    return f"`{base}`" + _NOTES.get(point.view, "")


def crosswalk_rows(arch: ArchitectureMap) -> list[tuple[str, str, str, str]]:
    """(site, TransformerLens hook, nnsight, pyvene) cells, in Markdown, for each standard
    site of ``arch``."""
    points = standard_hook_points(arch, "L")
    absent = {"mlp_hidden": arch.mlp_down_proj, "router_logits": arch.router}
    absent["experts_chosen"] = arch.router
    absent["expert_out"] = arch.experts
    rows = []
    for site, kind in STANDARD_SITES.items():
        label = f"`{site}[L]`" if kind.layered else f"`{site}`"
        if site in absent and absent[site] is None:
            why = f"— ({_WHY_MISSING[site]})"
            rows.append((label, "—", why, why))
            continue
        tl = TRANSFORMER_LENS_HOOKS.get(site)
        tl_text = f"`{tl.replace('{layer}', 'L')}`" if tl else _NO_TL.get(site, "—")
        point = points.get(site)
        rows.append((label, tl_text, _nnsight(point), _pyvene(point)))
    return rows


def crosswalk_markdown() -> str:
    """The crosswalk tables, one per built-in family, as Markdown."""
    out = []
    for arch in _BUILTIN:
        types = ", ".join(arch.model_types)
        out.append(f"### {arch.name} (`model_type`: {types})\n")
        out.append("| site | TransformerLens | nnsight | pyvene component |")
        out.append("|---|---|---|---|")
        for row in crosswalk_rows(arch):
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(crosswalk_markdown())
