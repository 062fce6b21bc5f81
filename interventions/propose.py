"""Map a family the package does not know: propose a map from the module tree, then check it.

:func:`propose_architecture` reads a model's module names and types (the repeated block
list, the input embedding, the norms, each block's attention and MLP and their output
projections) and tries the few readings a block can have (the block's output added to
the residual directly, through a post-norm, or through the output projection when the
block adds the residual itself). :func:`check_architecture` runs one forward pass with
plain hooks and holds a map to the shapes it promises and to the residual identity
``resid_post[L] = resid_pre[L] + attn_out[L] + mlp_out[L]``.

>>> import interventions as iv
>>> from interventions.propose import propose_architecture, check_architecture
>>> # model = AutoModelForCausalLM.from_config(...)   # a family with no built-in map
>>> # arch = propose_architecture(model)             # raises if no reading checks out
>>> # iv.register_architecture(arch)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from interventions.architectures import ArchitectureMap
from interventions.errors import UnknownArchitecture

_NORM_WORDS = ("norm", "ln")


@dataclass(frozen=True)
class ArchitectureCheck:
    """What :func:`check_architecture` found: ``ok`` and, if not, each ``problem``."""

    arch: ArchitectureMap
    identity_error: tuple[float, ...]  # max |resid_post - (resid_pre + attn + mlp)| per layer
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _is_norm(name: str, module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    leaf = name.rsplit(".", 1)[-1].lower()
    return "norm" in cls or (any(w in leaf for w in _NORM_WORDS) and not list(module.children()))


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return int(weight.shape[1])
    if (
        isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and "linear" in type(module).__name__.lower()
    ):
        return int(weight.shape[0])
    return None


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if not lists:
        raise UnknownArchitecture(
            f"{type(model).__name__}: no list of repeated blocks found; map it by hand with "
            "iv.register_architecture"
        )
    return max(lists, key=lambda item: len(item[1]))


def _child(block: nn.Module, words: tuple[str, ...]) -> str | None:
    """The first child named like ``words`` that holds modules of its own (not a norm)."""
    for name, m in block.named_children():
        if any(w in name.lower() for w in words) and list(m.children()) and not _is_norm(name, m):
            return name
    return None


def _last_projection(block: nn.Module, prefix: str, width: int) -> str | None:
    found = None
    for name, m in block.named_modules():
        if (not prefix or name == prefix or name.startswith(prefix + ".")) and _out_features(
            m
        ) == width:
            found = name
    return found


def propose_architecture(model: nn.Module, *, name: str | None = None) -> ArchitectureMap:
    """Propose a map for ``model`` from its module tree; the first reading that passes
    :func:`check_architecture` is returned, otherwise :class:`UnknownArchitecture` lists
    what each reading got wrong.

    >>> propose_architecture(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    interventions.errors.UnknownArchitecture: Linear: no list of repeated blocks found; map it by hand with iv.register_architecture
    """
    layers_name, layers = _layer_list(model)
    modules = dict(model.named_modules())
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embed_module = get_embeddings() if callable(get_embeddings) else None
    embed = next((n for n, m in modules.items() if m is embed_module), None)
    if embed is None:
        embed = next((n for n, m in modules.items() if isinstance(m, nn.Embedding)), None)
    in_layers = (layers_name + ".",)
    norms = [
        n
        for n, m in modules.items()
        if n and not n.startswith(in_layers) and "emb" not in n.lower() and _is_norm(n, m)
    ]
    block = layers[0]
    attn = _child(block, ("attn", "attention"))
    width = getattr(embed_module, "embedding_dim", None) if embed_module is not None else None
    if embed is None or not norms or attn is None or not isinstance(width, int):
        raise UnknownArchitecture(
            f"{type(model).__name__}: cannot find the embedding, final norm or attention "
            f"(embed={embed}, norms={norms}, attention={attn}); map it by hand"
        )
    attn_proj = _last_projection(block, attn, width)
    mlp = _child(block, ("mlp", "ffn", "feed_forward", "moe"))
    mlp_down = _last_projection(block, mlp, width) if mlp else None
    if mlp is None:  # OPT-style: the MLP's linears sit on the block itself
        direct = [n for n, m in block.named_children() if _out_features(m) == width]
        mlp = mlp_down = direct[-1] if direct else None
    if attn_proj is None or mlp is None:
        raise UnknownArchitecture(
            f"{type(model).__name__}: cannot find the attention output projection or the MLP "
            f"in {layers_name}.0; map it by hand"
        )
    sub = dict(block.named_modules())
    router = f"{mlp}.gate" if f"{mlp}.experts" in sub and f"{mlp}.gate" in sub else None
    if router is not None:
        mlp_down = None
    post = [n for n, m in block.named_children() if n.startswith("post") and _is_norm(n, m)]
    attn_outs = [None, attn_proj, *[n for n in post if "att" in n]]
    mlp_outs = [None, mlp_down, *[n for n in post if "att" not in n]]
    base = ArchitectureMap(
        name=name or getattr(getattr(model, "config", None), "model_type", None) or "proposed",
        model_types=(str(getattr(getattr(model, "config", None), "model_type", "proposed")),),
        layers=layers_name,
        embed=embed,
        final_norm=norms[-1],
        attn=attn,
        attn_out_proj=attn_proj,
        mlp=mlp,
        mlp_down_proj=mlp_down,
        router=router,
    )
    problems: list[str] = []
    tried: set[ArchitectureMap] = set()
    for a_out, m_out, flat in itertools.product(attn_outs, mlp_outs, (False, True)):
        if m_out is None and mlp_down is None and router is None:
            continue
        a_out = None if a_out == attn else a_out
        m_out = None if m_out == mlp else m_out
        arch = replace(base, attn_out=a_out, mlp_out=m_out, flat_mlp=flat)
        if arch in tried:
            continue
        tried.add(arch)
        result = check_architecture(model, arch)
        if result.ok:
            return arch
        problems.append(
            f"attn_out={arch.attn_out_module}, mlp_out={arch.mlp_out_module}, flat_mlp={flat}: "
            + "; ".join(result.problems)
        )
    raise UnknownArchitecture(
        f"{type(model).__name__}: no proposed map passed the check:\n  " + "\n  ".join(problems)
    )


def _tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    for key in ("hidden_states", "input", "x"):
        if isinstance(value, dict) and isinstance(value.get(key), torch.Tensor):
            return value[key]
    raise TypeError(f"no tensor in a value of type {type(value).__name__}")


def check_architecture(
    model: nn.Module,
    arch: ArchitectureMap,
    *,
    tokens: torch.Tensor | None = None,
    rtol: float = 1e-4,
) -> ArchitectureCheck:
    """Run ``model`` once with plain hooks and check ``arch``: every path exists, every
    residual-stream site is ``(batch, pos, d_model)``, and per layer
    ``resid_post = resid_pre + attn_out + mlp_out`` within ``rtol`` of the residual's size.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> import interventions as iv
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10))
    >>> check_architecture(model, iv.architectures()["gpt2"]).ok
    True
    """
    modules = dict(model.named_modules())
    layers = modules.get(arch.layers)
    problems: list[str] = []
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        return ArchitectureCheck(arch, (), (f"layers={arch.layers!r} is not a module list",))
    n = len(layers)
    paths = {"embed": arch.embed, "final_norm": arch.final_norm}
    for i in range(n):
        for site, rel in (
            ("attn_out", arch.attn_out_module),
            ("mlp_out", arch.mlp_out_module),
            ("head", arch.attn_out_proj),
            ("mlp_hidden", arch.mlp_down_proj),
            ("router", arch.router),
        ):
            if rel is not None:
                paths[f"{site}{i}"] = f"{arch.layers}.{i}.{rel}"
    missing = sorted(p for p in paths.values() if p not in modules)
    if missing:
        return ArchitectureCheck(arch, (), (f"no such modules: {', '.join(missing)}",))
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(key: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[key] = _tensor(output).detach().clone()  # Falcon adds into it afterwards

        return hook

    def keep_input(key: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            seen[key] = _tensor(args if args else kwargs).detach()

        return hook

    try:
        for i in range(n):
            block = layers[i]
            handles.append(block.register_forward_pre_hook(keep_input(f"pre{i}"), with_kwargs=True))
            handles.append(block.register_forward_hook(keep(f"post{i}")))
            handles.append(modules[paths[f"attn_out{i}"]].register_forward_hook(keep(f"attn{i}")))
            handles.append(modules[paths[f"mlp_out{i}"]].register_forward_hook(keep(f"mlp{i}")))
        vocab = getattr(getattr(model, "config", None), "vocab_size", 16)
        ids = tokens if tokens is not None else torch.arange(3, 8).remainder(vocab)[None]
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(ids.to(device))
    finally:
        for handle in handles:
            handle.remove()
    errors: list[float] = []
    for i in range(n):
        pre, post, attn, mlp = (seen[f"{k}{i}"].float() for k in ("pre", "post", "attn", "mlp"))
        if arch.flat_mlp:  # one row per token
            mlp = mlp.reshape(*pre.shape[:-1], mlp.shape[-1])
        shapes = {t.shape for t in (pre, post, attn, mlp)}
        if len(shapes) != 1:
            problems.append(
                f"layer {i}: residual sites differ in shape {sorted(map(tuple, shapes))}"
            )
            errors.append(float("inf"))
            continue
        err = float((post - (pre + attn.to(pre.device) + mlp.to(pre.device))).abs().max())
        errors.append(err)
        if err > rtol * max(1.0, float(post.abs().max())):
            problems.append(
                f"layer {i}: resid_post != resid_pre + attn_out + mlp_out (by {err:.3g})"
            )
    return ArchitectureCheck(arch, tuple(errors), tuple(problems))
