"""What every backend does alike to a HuggingFace model, so their numbers stay equal.

Kept in the core (transformers is imported lazily) rather than copied into each adapter:
greedy generation of exactly ``max_new_tokens``, eager attention while patterns are read,
probing a forward signature for a keyword, and asking for the last logits only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def greedy_config(max_new_tokens: int) -> Any:
    """A generation config that decodes greedily for exactly ``max_new_tokens`` tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        # An empty list, not None: generate() fills None from model.generation_config, and
        # would then stop at the model's EOS token and return fewer tokens.
        eos_token_id=[],
        pad_token_id=0,
    )


def generation_config(max_new_tokens: int, sampling: Any = None) -> Any:
    """Greedy decoding (``sampling=None``), or sampling with exactly the filters asked for
    (no top-k of 50 or other defaults taken from the model), for ``max_new_tokens``."""
    config = greedy_config(max_new_tokens)
    if sampling is not None:
        config.do_sample = True
        config.temperature = sampling.temperature
        config.top_k = sampling.top_k or 0  # 0: no top-k filter
        config.top_p = 1.0 if sampling.top_p is None else sampling.top_p
    return config


@contextlib.contextmanager
def seeded(sampling: Any, offset: int = 0) -> Iterator[None]:
    """Seed torch's generators from ``sampling.seed`` for the block and restore the
    global random state after it (a no-op for greedy runs)."""
    if sampling is None:
        yield
        return
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling.seed + offset)
        yield


def accepts(model: nn.Module, keyword: str) -> bool:
    """Whether the model's forward accepts ``keyword``."""
    if "forward" in vars(model):  # replaced on the instance (accelerate): not cached, as a
        return _signature_has(model.forward, keyword)  # cache would keep the module alive
    return _accepts(type(model).forward, keyword)


@functools.lru_cache(maxsize=256)
def _accepts(forward: Callable[..., Any], keyword: str) -> bool:
    """``inspect.signature`` costs about 0.2 ms a call, and every run asks."""
    return _signature_has(forward, keyword)


def _signature_has(forward: Any, keyword: str) -> bool:
    try:
        return keyword in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def logits_kwargs(model: nn.Module, keep: int | None) -> dict[str, int]:
    """Forward keywords that compute only the last ``keep`` positions' logits (``{}`` when
    ``keep`` is None or the model has no such option); see ``Plan.logits_to_keep``.

    >>> logits_kwargs(nn.Linear(2, 2), 1)
    {}
    """
    return {"logits_to_keep": keep} if keep is not None and accepts(model, "logits_to_keep") else {}


@contextlib.contextmanager
def eager_attention(model: nn.Module, needed: bool) -> Iterator[None]:
    """Switch a HuggingFace model to eager attention for the block, then restore it.

    Falcon with ALiBi gets one fix while it is eager (:func:`falcon_alibi_attention`), so
    that eager attention computes what its SDPA attention computes.
    """
    if not needed or getattr(model, "config", None) is None:
        yield
        return
    configs: list[Any] = [getattr(m, "config", None) for m in model.modules()]
    saved = [(c, getattr(c, "_attn_implementation", None)) for c in configs if c is not None]
    handles: list[Any] = []
    try:
        for c, _ in saved:
            c._attn_implementation = "eager"
        for module in falcon_alibi_attention(model):
            handles.append(module.register_forward_pre_hook(_mask_without_alibi, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for c, impl in saved:
            c._attn_implementation = impl


def falcon_alibi_attention(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a Falcon model with ALiBi (``[]`` for any other model).

    transformers (5.x) folds ALiBi, scaled by ``1 / sqrt(d_head)``, into the attention mask
    it hands every layer, for SDPA; its eager attention adds ALiBi to ``q k^T`` itself as
    well, so eager attention, the only one that shows patterns and scores, counts ALiBi
    twice (the symptom of transformers issue 29946, fixed in 4.40, back again). While the
    model is eager, a pre-hook on each of these modules keeps only the mask's masked
    entries (``torch.finfo(dtype).min``; 0 elsewhere), so ALiBi is counted once, as the
    model's SDPA attention and the original Falcon-RW count it.

    >>> import transformers
    >>> config = transformers.FalconConfig(
    ...     num_hidden_layers=1, hidden_size=8, num_attention_heads=2, alibi=True
    ... )
    >>> len(falcon_alibi_attention(transformers.FalconForCausalLM(config)))
    1
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "falcon" or not getattr(config, "alibi", False):
        return []
    return [m for m in model.modules() if type(m).__name__ == "FalconAttention"]


def _mask_without_alibi(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    mask = kwargs.get("attention_mask")
    if kwargs.get("alibi") is None or mask is None or not mask.is_floating_point():
        return None
    masked = mask == torch.finfo(mask.dtype).min
    return args, {**kwargs, "attention_mask": mask.masked_fill(~masked, 0.0)}


def empty_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` turns ordinary text into no tokens at all.

    transformers returns such a tokenizer for a model saved without tokenizer files.

    >>> empty_tokenizer(lambda text, add_special_tokens=True: {"input_ids": []})
    True
    """
    try:
        ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    except Exception:  # a tokenizer that cannot even be called is no tokenizer either
        return True
    return len(ids) == 0
