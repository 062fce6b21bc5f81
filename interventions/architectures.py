"""Standard site names -> module paths, one map per model family, in an open registry.

A map is a few strings. To add a family, describe where its blocks live and register it
under the ``config.model_type`` values it covers::

    import interventions as iv
    iv.register_architecture(iv.ArchitectureMap(
        name="my-family", model_types=("my_model",),
        layers="model.blocks", embed="model.tok_emb", final_norm="model.ln_f",
        attn="attn", attn_out_proj="attn.out", mlp="ffn", mlp_down_proj="ffn.down",
    ))

Everything below the layer list is relative to one layer. Sizes (layers, heads, widths)
are read from the model's config and modules, so a map needs no numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from interventions.errors import (
    SpecError,
    UnknownArchitecture,
    UnknownSite,
    ValidationError,
    choices_text,
    excerpt,
    suggest,
)
from interventions.routing import RoutingRule
from interventions.sites import KV_HEAD_SITES, STANDARD_SITES, Site

# How a tensor at a hook point is seen: "plain", "heads" (split into query heads),
# "attn_weights", "attn_scores" (the input of softmax inside the attention module), "logits", "tokens" (an MLP fed (batch * pos, d) rows, as OPT's),
# "router_logits" / "router_choice" (a mixture-of-experts gate), "resid" (plain, but writes
# go into the tensor itself so the residual connection sees them too), a q/k/v view of a
# projection's output (interventions.attention.QKV_VIEWS) or a per-head-input view of one
# ("split_" + it).
View = str

_WHY_MISSING = {
    "mlp_hidden": "its MLP has no per-token down projection, e.g. fused experts",
    "router_logits": "it is not a mixture-of-experts family",
    "experts_chosen": "it is not a mixture-of-experts family",
    "expert_out": "it is not a mixture-of-experts family with fused experts",
}


@dataclass(frozen=True)
class ArchitectureMap:
    """Where the standard sites live in one model family (paths are dotted module names).

    ``attn`` and ``mlp`` are the blocks' modules; ``attn_out`` and ``mlp_out`` (default:
    those modules) are the modules whose outputs are added to the residual stream, for
    families that norm a block's output before the add (Gemma-2/3, OLMo-2) or add the
    residual inside the block (BLOOM). ``mlp_down_proj=None`` means the family has no
    per-token down projection (fused mixture-of-experts), so no ``mlp_hidden`` site;
    ``router`` names a mixture-of-experts gate (its output: logits, weights, expert ids);
    ``routing`` is the rule that gate turns logits into ids and weights by, which writes to
    ``router_logits`` and ``experts_chosen`` re-run (no rule: those sites are read only).
    ``flat_mlp`` says the MLP modules see one row per token (OPT); the adapters view those
    rows as ``(batch, pos, width)``.

    >>> ArchitectureMap("toy", ("toy",), "blocks", "emb", "norm", "attn", "attn.o",
    ...                 "mlp", "mlp.down").attn_out_module
    'attn'
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    attn: str
    attn_out_proj: str
    mlp: str
    mlp_down_proj: str | None
    attn_out: str | None = None
    mlp_out: str | None = None
    router: str | None = None
    # fused MoE experts (transformers' ``*Experts``: gate_up_proj [E, 2F, d], down_proj
    # [E, d, F], act_fn; called as experts(x, top_k_index, top_k_weights))
    experts: str | None = None
    routing: RoutingRule | None = None
    flat_mlp: bool = False  # the MLP sees (batch * pos, d) rows, as OPT's fc1/fc2 do
    attn_norm: str | None = None
    mlp_norm: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    qkv_layout: Literal["stacked", "per_head"] = "stacked"

    def __post_init__(self) -> None:
        if not self.model_types:
            raise SpecError(f"architecture {self.name!r} must list at least one model_type")

    @property
    def attn_out_module(self) -> str:
        return self.attn_out or self.attn

    @property
    def mlp_out_module(self) -> str:
        return self.mlp_out or self.mlp


# where every built-in mixture-of-experts family keeps its blocks, router and experts
_MOE_PATHS: dict[str, Any] = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    attn_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_down_proj=None,
    router="mlp.gate",
    experts="mlp.experts",
)

_BUILTIN: tuple[ArchitectureMap, ...] = (
    ArchitectureMap(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_out_proj="attn.c_proj",
        mlp="mlp",
        mlp_down_proj="mlp.c_proj",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        qkv_proj="attn.c_attn",
    ),
    ArchitectureMap(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        attn_out_proj="attention.dense",
        mlp="mlp",
        mlp_down_proj="mlp.dense_4h_to_h",
        attn_norm="input_layernorm",
        # no mlp_norm: with the parallel residual, attention and MLP read the same stream
        qkv_proj="attention.query_key_value",
        qkv_layout="per_head",
    ),
    ArchitectureMap(
        name="llama-like",
        # Qwen3 adds q/k norms inside attention; Phi-3 fuses q/k/v and gate/up projections
        model_types=("llama", "mistral", "qwen2", "gemma", "qwen3", "phi3"),
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        attn="self_attn",
        attn_out_proj="self_attn.o_proj",
        mlp="mlp",
        mlp_down_proj="mlp.down_proj",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        q_proj="self_attn.q_proj",
        k_proj="self_attn.k_proj",
        v_proj="self_attn.v_proj",
    ),
    ArchitectureMap(
        # each block's output is normed before the residual add: attn_out and mlp_out are
        # those norms' outputs, so resid_post = resid_pre + attn_out + mlp_out still holds
        name="post-norm",
        model_types=("gemma2", "gemma3_text", "olmo2"),
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        attn="self_attn",
        attn_out_proj="self_attn.o_proj",
        mlp="mlp",
        mlp_down_proj="mlp.down_proj",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
    ),
    ArchitectureMap(
        name="gptj",  # attention and MLP read the same normed input (parallel)
        model_types=("gptj",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_out_proj="attn.out_proj",
        mlp="mlp",
        mlp_down_proj="mlp.fc_out",
    ),
    ArchitectureMap(
        name="opt",  # no MLP module: fc1 -> activation -> fc2 sit on the layer itself
        model_types=("opt",),
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        attn="self_attn",
        attn_out_proj="self_attn.out_proj",
        mlp="fc2",
        mlp_down_proj="fc2",
        flat_mlp=True,
    ),
    ArchitectureMap(
        # BLOOM's attention and MLP modules add the residual themselves, so attn_out and
        # mlp_out are their output projections' outputs
        name="bloom",
        model_types=("bloom",),
        layers="transformer.h",
        embed="transformer.word_embeddings",
        final_norm="transformer.ln_f",
        attn="self_attention",
        attn_out_proj="self_attention.dense",
        mlp="mlp",
        mlp_down_proj="mlp.dense_4h_to_h",
        attn_out="self_attention.dense",
        mlp_out="mlp.dense_4h_to_h",
    ),
    ArchitectureMap(
        # Falcon: attention and MLP read the same normed input (falcon-7b, parallel_attn),
        # each its own norm (falcon-40b, new_decoder_architecture) or go one after the other
        # (parallel_attn=False); the block adds attention's output into the MLP's output in
        # place, so mlp_out is read before that add. q/k/v are left out: the fused
        # query_key_value's layout differs between the three (multi-query, grouped, per head)
        name="falcon",
        model_types=("falcon",),
        layers="transformer.h",
        embed="transformer.word_embeddings",
        final_norm="transformer.ln_f",
        attn="self_attention",
        attn_out_proj="self_attention.dense",
        mlp="mlp",
        mlp_down_proj="mlp.dense_4h_to_h",
    ),
    ArchitectureMap(
        # mixture of experts: mlp_out is the whole sparse block; the experts' weights are
        # fused, so there is no mlp_hidden. MixtralTopKRouter always renormalises its top-k
        # and keeps the weights float32
        name="mixtral",
        model_types=("mixtral",),
        **_MOE_PATHS,
        routing=RoutingRule(renormalize=True, weights_dtype="float32"),
    ),
    ArchitectureMap(
        # Qwen2/3-MoE (shared expert included in mlp_out) and OLMoE: their routers
        # renormalise if config.norm_topk_prob and cast the weights to the logits' dtype
        name="moe",
        model_types=("qwen2_moe", "qwen3_moe", "olmoe"),
        **_MOE_PATHS,
        routing=RoutingRule(renormalize="norm_topk_prob", weights_dtype="logits"),
    ),
)

_REGISTRY: dict[str, ArchitectureMap] = {t: m for m in _BUILTIN for t in m.model_types}
_BUILTIN_TYPES = frozenset(_REGISTRY)


def register_architecture(arch: ArchitectureMap, *, override: bool = False) -> None:
    """Register a family map for its ``model_types``. Built-in maps need ``override=True``."""
    for model_type in arch.model_types:
        if model_type in _BUILTIN_TYPES and not override:
            raise ValueError(
                f"model_type {model_type!r} has a built-in map ({_REGISTRY[model_type].name}); "
                "pass override=True to replace it"
            )
    for model_type in arch.model_types:
        _REGISTRY[model_type] = arch


def architectures() -> dict[str, ArchitectureMap]:
    """The registered maps, keyed by ``config.model_type``."""
    return dict(_REGISTRY)


@dataclass(frozen=True)
class HookPoint:
    """A resolved site: which module, which side of it, and how to view the tensor there."""

    module: str
    io: Literal["output", "input"]
    view: View = "plain"
    # set for the per-head-input views, which need their block (the path names it too)
    layer: int | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ModelInfo:
    """What validation and adapters need to know about a model, read once."""

    class_name: str
    arch: ArchitectureMap | None
    model_type: str | None
    n_layers: int | None
    n_heads: int | None
    d_model: int | None
    d_head: int | None
    d_mlp: int | None
    vocab: int | None
    module_names: frozenset[str]
    is_hf: bool
    n_experts: int | None = None  # mixture-of-experts families: experts per layer
    top_k: int | None = None  # and experts chosen per token
    n_kv_heads: int | None = None
    # learned absolute positions (GPT-2's ``n_positions``): a hard limit on how many
    # positions one forward pass may feed (rotary and ALiBi models have none here)
    max_positions: int | None = None
    # the map's routing rule resolved against the config (None: the router's writes refused)
    routing: RoutingRule | None = None

    def head_count(self, site: Site) -> int | None:
        """Size of the head axis of a site (key-value heads for k, v and their inputs)."""
        if site.name == "expert_out":
            return self.n_experts
        return self.n_kv_heads if site.name in KV_HEAD_SITES else self.n_heads

    def width(self, site: Site) -> int | None:
        """Size of the last axis of a standard site."""
        if site.is_raw:
            return None
        return {
            "mlp_hidden": self.d_mlp,
            "head": self.d_head,
            "logits": self.vocab,
            "q": self.d_head,
            "k": self.d_head,
            "v": self.d_head,
            "attn_pattern": None,
            "attn_scores": None,
            "router_logits": self.n_experts,
            "experts_chosen": self.top_k,
        }.get(site.name, self.d_model)

    def hook_point(self, site: Site) -> HookPoint:
        """Resolve a site to a module and a side, or raise a clear error."""
        if site.is_raw:
            path, io = site.raw_parts
            if path not in self.module_names:
                modules = sorted(m for m in self.module_names if m)
                raise UnknownSite(
                    f"{excerpt(path, 200)} is not a module of {self.class_name}"
                    f"{suggest(path, modules)}. Modules include: "
                    f"{choices_text(modules[:12])}{', ...' if len(modules) > 12 else ''}"
                )
            return HookPoint(path, io)
        if self.arch is None:
            raise UnknownArchitecture(
                f"standard site {site.name!r} needs an architecture map, and {self.class_name} "
                f"(model_type={self.model_type!r}) has none. Known model types: "
                f"{choices_text(sorted(_REGISTRY))}. Use a raw module path such as "
                f"'<module>.output', or register a map with iv.register_architecture"
            )
        if site.layer is not None:
            assert self.n_layers is not None
            if not 0 <= site.layer < self.n_layers:
                raise ValidationError(
                    f"site {site}: layer {site.layer} is out of range; {self.class_name} has "
                    f"layers 0..{self.n_layers - 1}"
                )
        a = self.arch
        points = standard_hook_points(a, site.layer)
        missing = {"mlp_hidden": a.mlp_down_proj, "router_logits": a.router}
        missing["experts_chosen"] = a.router
        missing["expert_out"] = a.experts
        if site.name in missing and missing[site.name] is None:
            have = [n for n in STANDARD_SITES if n not in missing or missing[n] is not None]
            raise UnknownSite(
                f"site {site}: the {a.name} map has no {site.name!r} "
                f"({_WHY_MISSING[site.name]}). Sites of {self.class_name}: {choices_text(have)}"
            )
        if site.name not in points:
            raise UnknownSite(
                f"site {site}: the {a.name} map has no {site.name!r} "
                f"({_MISSING_WHY.get(site.name, 'its map leaves the field out')}); sites of "
                f"{a.name}: {choices_text(points)}"
            )
        point = points[site.name]
        if point.module not in self.module_names:
            raise UnknownSite(
                f"site {site}: the {a.name} map points at {point.module!r}, which "
                f"{self.class_name} does not have; fix or override the architecture map"
            )
        return point


def standard_hook_points(a: ArchitectureMap, layer: int | str | None) -> dict[str, HookPoint]:
    """Where each standard site of family ``a`` lives at ``layer`` (any label: the
    crosswalk in the docs passes ``"L"``). Cached: validation asks once per op.

    >>> standard_hook_points(architectures()["gpt2"], 3)["head"]
    HookPoint(module='transformer.h.3.attn.c_proj', io='input', view='heads')
    """
    return dict(_standard_hook_points(a, layer))


@functools.lru_cache(maxsize=4096)
def _standard_hook_points(a: ArchitectureMap, layer: int | str | None) -> dict[str, HookPoint]:
    block = f"{a.layers}.{layer}"
    n = layer if isinstance(layer, int) else None
    mlp_view: View = "tokens" if a.flat_mlp else "plain"
    points: dict[str, HookPoint] = {
        "embed": HookPoint(a.embed, "output"),
        "resid_pre": HookPoint(block, "input"),
        "resid_post": HookPoint(block, "output"),
        "attn_out": HookPoint(f"{block}.{a.attn_out_module}", "output"),
        "mlp_out": HookPoint(f"{block}.{a.mlp_out_module}", "output", mlp_view),
        "head": HookPoint(f"{block}.{a.attn_out_proj}", "input", "heads"),
        "attn_pattern": HookPoint(f"{block}.{a.attn}", "output", "attn_weights"),
        # inside the attention module: the tensor its forward hands softmax
        "attn_scores": HookPoint(f"{block}.{a.attn}", "output", "attn_scores"),
        "mlp_hidden": HookPoint(f"{block}.{a.mlp_down_proj}", "input", mlp_view),
        "router_logits": HookPoint(f"{block}.{a.router}", "output", "router_logits"),
        "experts_chosen": HookPoint(f"{block}.{a.router}", "output", "router_choice"),
        "expert_out": HookPoint(f"{block}.{a.experts}", "output", "expert_out"),
        "final_norm": HookPoint(a.final_norm, "output"),
        "logits": HookPoint("", "output", "logits"),
    }
    if a.mlp_norm is not None:
        points["resid_mid"] = HookPoint(f"{block}.{a.mlp_norm}", "input", "resid")
    qkv = _qkv_points(a, block)
    for part, (module, view) in qkv.items():
        points[part] = HookPoint(module, "output", view)
        if a.attn_norm is not None:
            points[f"{part}_input"] = HookPoint(module, "output", f"split_{view}", n)
    assert set(points) <= set(STANDARD_SITES)
    return points


_MISSING_WHY = {
    "resid_mid": "no mlp_norm: attention and MLP read the same residual stream",
    "q_input": "no attn_norm or no q/k/v projections in its map",
    "k_input": "no attn_norm or no q/k/v projections in its map",
    "v_input": "no attn_norm or no q/k/v projections in its map",
    "q": "no q/k/v projections in its map",
    "k": "no q/k/v projections in its map",
    "v": "no q/k/v projections in its map",
}


def _qkv_points(a: ArchitectureMap, block: str) -> dict[str, tuple[str, View]]:
    """(module, view) of q, k and v for family ``a`` (empty when its map has neither form)."""
    if a.qkv_proj is not None:
        return {p: (f"{block}.{a.qkv_proj}", f"{a.qkv_layout}_{p}") for p in ("q", "k", "v")}
    if a.q_proj is None or a.k_proj is None or a.v_proj is None:
        return {}
    return {
        "q": (f"{block}.{a.q_proj}", "q_heads"),
        "k": (f"{block}.{a.k_proj}", "kv_heads"),
        "v": (f"{block}.{a.v_proj}", "kv_heads"),
    }


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2's transposed linear
        return int(weight.shape[0])
    return None


def describe(model: nn.Module) -> ModelInfo:
    """Read a model's family, sizes and module names (no forward pass).

    >>> import torch
    >>> describe(torch.nn.Linear(2, 3)).arch is None
    True
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None) if config is not None else None
    if text_config is not None and model_type not in _REGISTRY:
        config, model_type = text_config, getattr(text_config, "model_type", model_type)
    arch = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    modules = {name: m for name, m in model.named_modules()}
    n_layers = n_heads = d_model = d_head = d_mlp = vocab = n_kv_heads = None
    if config is not None:
        n_heads = _config_int(config, "num_attention_heads", "n_head")
        d_model = _config_int(config, "hidden_size", "n_embd", "d_model")
        vocab = _config_int(config, "vocab_size")
        d_head = _config_int(config, "head_dim")
        n_kv_heads = _config_int(config, "num_key_value_heads")
    if arch is not None:
        layers = modules.get(arch.layers)
        n_layers = len(layers) if isinstance(layers, (nn.ModuleList, nn.Sequential)) else None
        if n_layers is None and config is not None:
            n_layers = _config_int(config, "num_hidden_layers", "n_layer")
        if n_layers:
            o_proj = modules.get(f"{arch.layers}.0.{arch.attn_out_proj}")
            down = modules.get(f"{arch.layers}.0.{arch.mlp_down_proj}")
            attn_width = _in_features(o_proj) if o_proj is not None else None
            if attn_width is not None and n_heads:
                d_head = attn_width // n_heads
            d_mlp = _in_features(down) if down is not None else None
        if d_head is None and d_model and n_heads:
            d_head = d_model // n_heads
    return ModelInfo(
        class_name=type(model).__name__,
        arch=arch,
        model_type=model_type if isinstance(model_type, str) else None,
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=d_mlp,
        vocab=vocab,
        module_names=frozenset(modules),
        is_hf=config is not None and hasattr(model, "generate"),
        n_experts=_config_int(config, "num_local_experts", "num_experts")
        if config is not None
        else None,
        top_k=_config_int(config, "num_experts_per_tok") if config is not None else None,
        n_kv_heads=n_kv_heads or n_heads,
        max_positions=_config_int(config, "n_positions") if config is not None else None,
        routing=arch.routing.resolve(config) if arch is not None and arch.routing else None,
    )
