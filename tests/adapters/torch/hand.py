"""Independent oracles for the torch-hooks reference adapter.

Nothing here imports ``interventions.apply``, ``interventions.sites`` or
``interventions.architectures``: where each standard site lives is written down again
below from the HuggingFace modelling code, and every expected value is computed with
plain ``register_forward_hook`` / ``register_forward_pre_hook`` code that edits the
tensor with ordinary indexing. The tests then hold ``iv.run(..., backend="torch")`` to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

import interventions as iv
from tests.tiny_models import HF_FAMILIES, hf_model, hook_count, toy_net

FP32 = {"atol": 1e-5, "rtol": 1e-5}
IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])  # [2, 6]
MODELS = (*HF_FAMILIES, "toy")

# Where each standard site lives, restated from the transformers modelling code.
_LLAMA_LIKE = {
    "layers": "model.layers",
    "embed": "model.embed_tokens",
    "norm": "model.norm",
    "attn": "self_attn",
    "o_proj": "self_attn.o_proj",
    "mlp": "mlp",
    "down": "mlp.down_proj",
    "unembed": "lm_head",
}
PATHS: dict[str, dict[str, str]] = {
    "gpt2": {
        "layers": "transformer.h",
        "embed": "transformer.wte",
        "norm": "transformer.ln_f",
        "attn": "attn",
        "o_proj": "attn.c_proj",
        "mlp": "mlp",
        "down": "mlp.c_proj",
        "unembed": "lm_head",
    },
    "gpt_neox": {
        "layers": "gpt_neox.layers",
        "embed": "gpt_neox.embed_in",
        "norm": "gpt_neox.final_layer_norm",
        "attn": "attention",
        "o_proj": "attention.dense",
        "mlp": "mlp",
        "down": "mlp.dense_4h_to_h",
        "unembed": "lm_head",
    },
    **{fam: _LLAMA_LIKE for fam in ("llama", "mistral", "qwen2", "gemma")},
}

# Raw-site stand-ins for the toy net (no architecture map), keyed by standard name.
TOY_SITES: dict[str, str] = {
    "embed": "embed.output",
    "resid_pre": "blocks.1.input",  # what enters block 1
    "resid_post": "blocks.0.output",  # block 0's output, before the residual add
    "attn_out": "blocks.1.output",
    "mlp_out": "blocks.0.2.output",
    "mlp_hidden": "blocks.0.2.input",  # width 32
    "final_norm": "unembed.input",
    "logits": "output",
}


def model_of(name: str) -> nn.Module:
    return toy_net() if name == "toy" else hf_model(name)


def n_heads(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)


def where(family: str, site: str, layer: int | None) -> tuple[str, str, bool]:
    """(module path, "in" or "out", head view?) for a standard site or a raw path."""
    if site == "output":
        return "", "out", False
    if site.endswith((".output", ".input")):
        path, _, side = site.rpartition(".")
        return path, "out" if side == "output" else "in", False
    p = PATHS[family]
    block = f"{p['layers']}.{layer}"
    table = {
        "embed": (p["embed"], "out", False),
        "resid_pre": (block, "in", False),
        "resid_post": (block, "out", False),
        "attn_out": (f"{block}.{p['attn']}", "out", False),
        "mlp_out": (f"{block}.{p['mlp']}", "out", False),
        "head": (f"{block}.{p['o_proj']}", "in", True),
        "mlp_hidden": (f"{block}.{p['down']}", "in", False),
        "final_norm": (p["norm"], "out", False),
        "logits": ("", "out", False),
    }
    return table[site]


def site_of(family: str, site: str, layer: int | None = None) -> tuple[str, int | None]:
    """The (site, layer) to give the graph builder: standard on HF models, raw on the toy."""
    if family == "toy":
        return TOY_SITES[site], None
    return site, layer


Edit = Callable[[torch.Tensor], torch.Tensor | None]


def _edit(x: torch.Tensor, fn: Edit, heads: int | None) -> torch.Tensor:
    """Run ``fn`` on a copy of ``x`` (viewed per head if asked); return the new flat tensor."""
    y = x.clone()
    if heads:
        y = y.reshape(*y.shape[:-1], heads, y.shape[-1] // heads)
    out = fn(y)
    y = y if out is None else out
    if heads:
        y = y.reshape(*y.shape[:-2], y.shape[-2] * y.shape[-1])
    return y


@contextlib.contextmanager
def hooked(
    model: nn.Module, family: str, edits: Sequence[tuple[str, int | None, Edit]]
) -> Iterator[None]:
    """Hand hooks: each ``fn(x)`` edits the site's tensor in place (or returns a new one)."""
    handles = []
    try:
        for site, layer, fn in edits:
            path, side, head_view = where(family, site, layer)
            module = model.get_submodule(path) if path else model
            heads = n_heads(model) if head_view else None
            if side == "out":

                def out_hook(
                    mod: Any, args: Any, output: Any, fn: Edit = fn, h: Any = heads
                ) -> Any:
                    if isinstance(output, torch.Tensor):
                        return _edit(output, fn, h)
                    if isinstance(output, tuple):
                        return (_edit(output[0], fn, h), *output[1:])
                    output["logits"] = _edit(output["logits"], fn, h)  # a ModelOutput
                    return output

                handles.append(module.register_forward_hook(out_hook))
            else:

                def in_hook(mod: Any, args: Any, kwargs: Any, fn: Edit = fn, h: Any = heads) -> Any:
                    if args:
                        return (_edit(args[0], fn, h), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": _edit(kwargs["hidden_states"], fn, h)}

                handles.append(module.register_forward_pre_hook(in_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Plain forward pass; returns the logits."""
    with torch.no_grad():
        if getattr(model, "config", None) is None:  # the toy net
            return model(ids)
        return model(input_ids=ids, use_cache=False).logits


def logits_with(
    model: nn.Module,
    family: str,
    edits: Sequence[tuple[str, int | None, Edit]],
    ids: torch.Tensor = IDS,
) -> torch.Tensor:
    with hooked(model, family, edits):
        return forward(model, ids)


@cache
def clean_site(family: str, site: str, layer: int | None = None) -> torch.Tensor:
    """The site's tensor on ``IDS`` with no edits (cached: do not modify it)."""
    return capture(model_of(family), family, [(site, layer)])[0]


def capture(
    model: nn.Module,
    family: str,
    sites: list[tuple[str, int | None]],
    ids: torch.Tensor = IDS,
    edits: Sequence[tuple[str, int | None, Edit]] = (),
) -> list[torch.Tensor]:
    """The full tensors at ``sites`` (after ``edits`` upstream) in one plain forward pass."""
    seen: list[torch.Tensor | None] = [None] * len(sites)

    def keep(i: int) -> Edit:
        def fn(x: torch.Tensor) -> None:
            seen[i] = x.clone()

        return fn

    hooks = [*edits, *[(s, layer, keep(i)) for i, (s, layer) in enumerate(sites)]]
    logits_with(model, family, hooks, ids)
    assert all(t is not None for t in seen)
    return seen  # type: ignore[return-value]


def run(
    graph: iv.Graph, model: nn.Module, *, unbatched: bool = False, **options: Any
) -> iv.Results:
    """``iv.run`` on the torch backend, checking no hook is left behind (law 4).

    With ``unbatched=True`` the graph also runs with ``batch=False`` (one forward pass per
    run), and the two must agree: the planner's batching is then held to the same oracle.
    """
    before = hook_count(model)
    try:
        res = iv.run(graph, model, backend="torch", **options)
        if unbatched:
            alone = iv.run(graph, model, backend="torch", batch=False, **options)
            assert set(alone) == set(res)
            for name in res:
                torch.testing.assert_close(res[name], alone[name], **FP32)
        return res
    finally:
        assert hook_count(model) == before


# --- SAEs, computed by hand ---------------------------------------------------------------


@dataclass(frozen=True)
class HandSAE:
    """A ReLU SAE's weights, with the maths written out (no call into interventions.sae)."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    b_dec_in: bool = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.b_dec_in:
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def sae(self) -> iv.StandardSAE:
        return iv.StandardSAE(self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.b_dec_in)


def hand_sae(d_in: int, seed: int, b_dec_in: bool = False, d_sae: int | None = None) -> HandSAE:
    g = torch.Generator().manual_seed(seed)
    d_sae = d_sae or 2 * d_in
    return HandSAE(
        torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        torch.randn(d_sae, generator=g) * 0.1,
        torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        torch.randn(d_in, generator=g) * 0.1,
        b_dec_in,
    )


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
