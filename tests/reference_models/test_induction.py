"""Tests for the induction reference model (fast: no full training run)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest
import torch
from transformers import LlamaForCausalLM

from interventions.reference_models import induction as ind

# Thresholds for the committed checkpoint; the measured values are far from them
# (accuracy ~1.0, induction heads >0.85 vs <0.01, previous-token heads >0.7 vs <0.1).
MIN_ACCURACY = 0.9
HEAD_THRESHOLD = 0.5
MIN_MARGIN = 0.4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: for a model this small, more threads only add contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@cache
def _committed() -> LlamaForCausalLM:
    return ind.load_induction_model()


@cache
def _report() -> ind.InductionReport:
    return ind.evaluate_induction_model(_committed())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- data


def test_config_is_small_llama() -> None:
    cfg = ind.make_induction_config()
    assert cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads) == (ind.NUM_LAYERS, ind.NUM_HEADS)
    assert (cfg.hidden_size, cfg.vocab_size) == (ind.HIDDEN_SIZE, ind.VOCAB_SIZE)
    assert cfg.intermediate_size == ind.INTERMEDIATE_SIZE


def _brute_force_predictable(row: list[int]) -> list[bool]:
    """Target i+1 is predictable iff the bigram (row[i], row[i+1]) occurred earlier."""
    return [
        any(row[j] == row[i] and row[j + 1] == row[i + 1] for j in range(i))
        for i in range(len(row) - 1)
    ]


def test_induction_batch_layout() -> None:
    seq_len = ind.TRAIN_SEQ_LEN
    tokens = ind.induction_batch(64, seq_len, _gen())
    assert tokens.shape == (64, seq_len) and tokens.dtype == torch.long
    assert (tokens[:, 0] == ind.BOS_TOKEN_ID).all()
    assert (tokens[:, 1:] != ind.BOS_TOKEN_ID).all()
    assert int(tokens.max()) < ind.VOCAB_SIZE
    mask = ind.predictable_targets(tokens)
    n_repeated = set()
    for row, row_mask in zip(tokens.tolist(), mask.tolist(), strict=True):
        counts = {t: row.count(t) for t in row}
        assert max(counts.values()) == 2  # every token occurs once or twice
        repeated = sum(c == 2 for c in counts.values())
        assert ind.MIN_SEGMENT_LEN <= repeated <= (seq_len - 1) // 2 * ind.MAX_SEGMENTS
        assert row_mask == _brute_force_predictable(row)
        assert 1 <= sum(row_mask) <= repeated - 1
        n_repeated.add(repeated)
    assert len(n_repeated) > 10  # the amount of repetition really varies


def test_induction_batch_single_segment() -> None:
    seq_len = 48
    tokens = ind.induction_batch(32, seq_len, _gen(1), max_segments=1)
    lengths = set()
    for row, row_mask in zip(tokens.tolist(), ind.predictable_targets(tokens), strict=True):
        seg_len = seq_len - len(set(row))  # every segment token occurs exactly twice
        assert ind.MIN_SEGMENT_LEN <= seg_len <= (seq_len - 1) // 2
        # the repeated tokens form one contiguous block, twice
        pos = [i for i, t in enumerate(row) if row.count(t) == 2]
        a, b = pos[:seg_len], pos[seg_len:]
        assert a == list(range(a[0], a[0] + seg_len)) and b == list(range(b[0], b[0] + seg_len))
        assert [row[i] for i in a] == [row[i] for i in b]
        # predictable: the second copy after its first token
        assert row_mask.nonzero().flatten().tolist() == [i - 1 for i in b[1:]]
        lengths.add(seg_len)
    assert len(lengths) > 5


def test_induction_batch_is_deterministic() -> None:
    a = ind.induction_batch(8, 40, _gen(7))
    b = ind.induction_batch(8, 40, _gen(7))
    c = ind.induction_batch(8, 40, _gen(8))
    with pytest.raises(ValueError):
        ind.induction_batch(1, 4, _gen())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_repeated_tokens_layout() -> None:
    h = 9
    tokens = ind.repeated_tokens(5, h, _gen())
    assert tokens.shape == (5, 1 + 2 * h)
    assert (tokens[:, 0] == ind.BOS_TOKEN_ID).all()
    assert torch.equal(tokens[:, 1 : h + 1], tokens[:, h + 1 :])
    for row in tokens[:, 1 : h + 1].tolist():
        assert len(set(row)) == h and ind.BOS_TOKEN_ID not in row
    mask = ind.predictable_targets(tokens)
    assert mask.sum(dim=1).tolist() == [h - 1] * 5
    with pytest.raises(ValueError):
        ind.repeated_tokens(1, ind.VOCAB_SIZE, _gen())


# --------------------------------------------------------------------------- scores


def test_scores_on_synthetic_patterns() -> None:
    """The score helpers read the right entries: check on hand-made attention patterns."""
    h, n = 6, 1 + 2 * 6
    eye = torch.eye(n)
    prev = torch.zeros(n, n)
    prev[0, 0] = 1.0
    prev[torch.arange(1, n), torch.arange(0, n - 1)] = 1.0
    induct = eye.clone()
    for i in range(h + 1, n):
        induct[i] = 0.0
        induct[i, i - h + 1] = 1.0
    # [layers=1, batch=1, heads=3, T, T]: self, previous-token, induction
    pats = torch.stack([eye, prev, induct])[None, None]
    ind_scores = ind.induction_scores(pats, h)
    prev_scores = ind.previous_token_scores(pats, h)
    assert ind_scores.tolist() == [[0.0, 0.0, 1.0]]
    assert prev_scores.tolist() == [[0.0, 1.0, 0.0]]
    # per-layer sequence input, as returned by ``outputs.attentions``
    assert torch.equal(ind.induction_scores([pats[0]], h), ind_scores)
    with pytest.raises(ValueError):
        ind.induction_scores(pats, h + 1)


# --------------------------------------------------------------------------- training


def test_training_is_deterministic_smoke() -> None:
    kwargs = {"steps": 20, "batch_size": 8, "seq_len": 32}
    a = ind.train_induction_model(seed=3, **kwargs)  # type: ignore[arg-type]
    b = ind.train_induction_model(seed=3, **kwargs)  # type: ignore[arg-type]
    c = ind.train_induction_model(seed=4, **kwargs)  # type: ignore[arg-type]
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    for layer in a.model.layers:  # MLPs stay zero and frozen
        for p in layer.mlp.parameters():
            assert not p.requires_grad and not p.any()
    assert not a.training


# --------------------------------------------------------------------------- committed model


def test_committed_model_files() -> None:
    names = sorted(p.name for p in ind.WEIGHTS_DIR.iterdir())
    assert names == ["config.json", "model.safetensors"]
    assert sum((ind.WEIGHTS_DIR / n).stat().st_size for n in names) < 1_000_000


def test_committed_model_loads_attention_only() -> None:
    model = _committed()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config._attn_implementation == "eager"
    for layer in model.model.layers:
        for p in layer.mlp.parameters():
            assert not p.any()
    # loading twice is deterministic
    tokens = ind.repeated_tokens(2, 8, _gen())
    with torch.no_grad():
        again = ind.load_induction_model()(input_ids=tokens).logits
        assert torch.equal(model(input_ids=tokens).logits, again)


def test_committed_model_copies() -> None:
    assert _report().accuracy > MIN_ACCURACY
    model = _committed()
    for h in (4, 12, 30):  # short and long repeats, inside the trained range
        tokens = ind.repeated_tokens(16, h, _gen(h))
        assert ind.repeated_half_accuracy(model, tokens, h) > MIN_ACCURACY


def _split(scores: torch.Tensor) -> tuple[list[tuple[int, int]], float, float]:
    """Heads above HEAD_THRESHOLD, the lowest of them and the highest of the rest."""
    flat = [((i, j), v) for i, row in enumerate(scores.tolist()) for j, v in enumerate(row)]
    top = [(k, v) for k, v in flat if v > HEAD_THRESHOLD]
    rest = [v for _, v in flat if v <= HEAD_THRESHOLD]
    return [k for k, _ in top], min(v for _, v in top), max(rest)


def test_committed_model_has_induction_heads() -> None:
    heads, low, high = _split(_report().induction)
    assert heads and all(layer == 1 for layer, _ in heads)
    assert low - high > MIN_MARGIN


def test_committed_model_has_previous_token_heads() -> None:
    heads, low, high = _split(_report().previous_token)
    assert heads and all(layer == 0 for layer, _ in heads)
    assert low - high > MIN_MARGIN


def test_attention_patterns_leave_sdpa_models_alone() -> None:
    model = ind.load_induction_model(attn_implementation="sdpa")
    tokens = ind.repeated_tokens(2, 6, _gen())
    pats = ind.attention_patterns(model, tokens)
    assert pats.shape == (ind.NUM_LAYERS, 2, ind.NUM_HEADS, 13, 13)
    assert torch.allclose(pats.sum(-1), torch.ones(()))
    assert model.config._attn_implementation == "sdpa"


def _accuracy_without(heads: list[tuple[int, int]]) -> float:
    """Repeated-half accuracy with the given heads' outputs zeroed (plain torch hooks)."""
    model, h = _committed(), ind.EVAL_HALF_LEN
    head_dim = ind.HIDDEN_SIZE // ind.NUM_HEADS
    handles = []
    for layer in {layer for layer, _ in heads}:
        cols = [
            c for lh, hh in heads if lh == layer for c in range(hh * head_dim, (hh + 1) * head_dim)
        ]

        def zero(module: torch.nn.Module, args: tuple[torch.Tensor], cols: list[int] = cols):
            x = args[0].clone()
            x[..., cols] = 0.0
            return (x,)

        o_proj = model.model.layers[layer].self_attn.o_proj
        handles.append(o_proj.register_forward_pre_hook(zero))
    try:
        return ind.repeated_half_accuracy(model, ind.repeated_tokens(32, h, _gen(5)), h)
    finally:
        for handle in handles:
            handle.remove()


def test_committed_model_needs_its_heads() -> None:
    prev_heads, _, _ = _split(_report().previous_token)
    ind_heads, _, _ = _split(_report().induction)
    others = [(0, h) for h in range(ind.NUM_HEADS) if (0, h) not in prev_heads]
    assert _accuracy_without(prev_heads) < 0.3
    assert _accuracy_without(ind_heads) < 0.1
    assert _accuracy_without(others) > MIN_ACCURACY
