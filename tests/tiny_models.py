"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn

VOCAB = 64
SEQ = 32


def _cfg(name: str):
    import transformers as t

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if name == "gpt2":
        return t.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=SEQ, **common)
    if name == "gpt_neox":
        return t.GPTNeoXConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_size=32,
            intermediate_size=64,
            max_position_embeddings=SEQ,
            **common,
        )
    llama_like = dict(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=SEQ,
        **common,
    )
    if name == "llama":
        return t.LlamaConfig(**llama_like)
    if name == "mistral":
        return t.MistralConfig(**llama_like)
    if name == "qwen2":
        return t.Qwen2Config(**llama_like)
    if name == "gemma":
        return t.GemmaConfig(head_dim=16, **llama_like)
    # sliding-window layers (window 4 < the 7-token prompts) next to full-attention ones,
    # attention-logit and final-logit soft-capping at their defaults
    sliding = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    if name == "gemma2":
        return t.Gemma2Config(head_dim=8, **sliding, **llama_like)
    if name == "gemma3":
        return t.Gemma3TextConfig(head_dim=8, **sliding, **llama_like)
    if name == "qwen3":
        return t.Qwen3Config(head_dim=8, **llama_like)
    if name == "phi3":
        return t.Phi3Config(**llama_like)
    if name == "olmo2":
        return t.Olmo2Config(**llama_like)
    if name == "gptj":
        return t.GPTJConfig(n_layer=2, n_head=4, n_embd=32, n_positions=SEQ, rotary_dim=4, **common)
    if name == "opt":
        return t.OPTConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_size=32,
            ffn_dim=48,
            word_embed_proj_dim=32,
            max_position_embeddings=SEQ,
            **common,
        )
    if name == "bloom":
        return t.BloomConfig(n_layer=2, n_head=4, hidden_size=32, **common)
    falcon = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, **common)
    if name == "falcon":  # falcon-7b: parallel attention and MLP, one norm, multi-query
        return t.FalconConfig(**falcon)
    if name == "falcon_new":  # falcon-40b: parallel, two norms (ln_attn, ln_mlp), grouped kv
        return t.FalconConfig(new_decoder_architecture=True, num_kv_heads=2, **falcon)
    if name == "falcon_seq":  # falcon-rw style sequential block (no ALiBi here)
        return t.FalconConfig(parallel_attn=False, multi_query=False, **falcon)
    # ALiBi in place of rotary: falcon-rw's sequential block (biases, one kv head per
    # query head), and falcon-7b's parallel multi-query block with ALiBi
    alibi = dict(alibi=True, new_decoder_architecture=False, bias=True, **falcon)
    if name == "falcon_alibi":  # falcon-rw-1b / -7b
        return t.FalconConfig(parallel_attn=False, multi_query=False, **alibi)
    if name == "falcon_alibi_par":
        return t.FalconConfig(parallel_attn=True, multi_query=True, **alibi)
    moe = dict(num_experts_per_tok=2, **llama_like)
    if name == "mixtral":
        return t.MixtralConfig(num_local_experts=4, **moe)
    qwen_moe = dict(
        num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=24, **moe
    )
    if name == "qwen2_moe":
        return t.Qwen2MoeConfig(**qwen_moe)
    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(head_dim=8, **qwen_moe)
    if name == "olmoe":
        return t.OlmoeConfig(num_experts=4, **moe)
    raise KeyError(name)


FIRST_FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma")
NEW_FAMILIES = ("gemma2", "gemma3", "qwen3", "phi3", "olmo2", "gptj", "opt", "bloom")
# one model_type: three blocks with rotary positions, two with ALiBi
FALCON_FAMILIES = ("falcon", "falcon_new", "falcon_seq", "falcon_alibi", "falcon_alibi_par")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ALL_FAMILIES = FIRST_FAMILIES + NEW_FAMILIES + FALCON_FAMILIES + MOE_FAMILIES
# the per-adapter tests (hand-written module paths per family) cover the first six; the
# conformance suite, the family tests and DLA cover ALL_FAMILIES
HF_FAMILIES = FIRST_FAMILIES


BUILT: dict[str, nn.Module] = {}  # every shared model built so far, for hygiene checks


@cache
def _build(name: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_cfg(name))
    BUILT[name] = model
    return model.eval()


def hf_model(name: str) -> nn.Module:
    """A cached tiny random model of family ``name`` (eval mode, fp32)."""
    return _build(name)


class ToyNet(nn.Module):
    """A plain module with no architecture map: embed -> 2 residual MLP blocks -> head."""

    def __init__(self, vocab: int = VOCAB, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)) for _ in range(2)
        )
        self.unembed = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return self.unembed(x)


@cache
def toy_net() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet().eval()


class FailsOnRealData(ToyNet):
    """A ToyNet whose forward raises after its two blocks, on real values only.

    Validation's shape-only dry run (fake tensors, no values) measures both blocks, then
    stops at ``tolist`` unknowing, so a graph passes validation and the run fails midway,
    inside the backend, after its hooks have acted: the case hygiene tests need.
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        x.tolist()
        raise RuntimeError("the model failed on real data")


def fails_on_real_data() -> FailsOnRealData:
    torch.manual_seed(0)
    return FailsOnRealData().eval()


ALL_MODELS: dict[str, Callable[[], nn.Module]] = {
    **{name: (lambda n=name: hf_model(n)) for name in ALL_FAMILIES},
}


WORDS = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]


@cache
def word_tokenizer():
    """A whitespace word-level tokenizer over ``w4 .. w63`` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def _ours(hook: object) -> bool:
    # transformers 5 installs permanent output-capturing hooks the first time a caller
    # asks for hidden states or attentions; they belong to the model, not to a run
    return "output_capuring_hook" not in getattr(hook, "__qualname__", "")


@contextmanager
def input_shapes(module: nn.Module) -> Iterator[list[tuple[int, ...]]]:
    """The shape of the tensor ``module`` is called with, one entry per call.

    Counted by wrapping the module's ``forward`` rather than with a hook: pyvene sets the
    model's hooks aside while it runs.
    """
    seen: list[tuple[int, ...]] = []
    original = module.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(tuple(x.shape))
        return original(*args, **kwargs)

    module.forward = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del module.forward


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks left on any module of ``model`` (transformers' own
    output-capturing hooks excluded)."""
    return sum(
        sum(map(_ours, m._forward_hooks.values()))
        + sum(map(_ours, m._forward_pre_hooks.values()))
        + len(m._backward_hooks)
        for m in model.modules()
    )
