"""A tiny attention-only Llama that learns induction heads on CPU.

The model is a standard :class:`transformers.LlamaForCausalLM` (2 layers x 4 heads,
hidden size 64, vocabulary 128) whose MLPs are zeroed and frozen, so every layer is
attention-only while the checkpoint stays an ordinary Llama checkpoint that any library
can open with ``from_pretrained``.  It is trained for 2000 AdamW steps on sequences of
distinct random tokens in which one to three segments are repeated (:func:`induction_batch`),
with the loss on the predictable tokens only (:func:`predictable_targets`); the only way to
predict them is to copy, which the model learns with a layer-0 previous-token head and
layer-1 induction heads.  Training takes under two minutes of CPU time on one core.

Evaluation data layout (:func:`repeated_tokens`)::

    position:  0     1 .. h        h+1 .. 2h
    token:     BOS   A[0..h-1]     A[0..h-1]

``A`` is ``h = half_len`` distinct random non-BOS tokens.  With that layout:

* **induction score** of a head: mean attention weight from every query position ``i`` of
  the second copy (``h+1 <= i <= 2h``) to key position ``i - h + 1``, the token that
  followed the previous occurrence of the current token;
* **previous-token score**: mean attention from every query ``i`` with ``2 <= i <= 2h``
  to ``i - 1`` (position 1 is skipped because its previous token is BOS, which many heads
  use as a resting place);
* **repeated-half accuracy**: fraction of positions ``h+1 <= i <= 2h-1`` where the argmax
  of the logits equals the next token ``tokens[i+1]`` (the first token of the second copy
  is not predictable and is excluded).

These quantities are computed by hand from eager attention patterns
(``output_attentions=True``) and serve as an independent oracle for tests.

The committed checkpoint (seed 0, :func:`load_induction_model`) scores, with
:func:`evaluate_induction_model`: accuracy 1.000; induction heads L1H0-L1H3 (0.966-0.994,
every other head <= 0.015); previous-token head L0H2 (0.941, every other head <= 0.147).
Zeroing L0H2 drops the accuracy to ~0.1, zeroing all of layer 1 to ~0; the four layer-1
heads are redundant (any one of them suffices).  Copying stays perfect up to
``half_len = 60`` (twice the trained length) and degrades beyond.

Command line::

    python -m interventions.reference_models.induction --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "BOS_TOKEN_ID",
    "DEFAULT_STEPS",
    "EVAL_HALF_LEN",
    "HIDDEN_SIZE",
    "INDUCTION_CONFIG",
    "INTERMEDIATE_SIZE",
    "MAX_POSITION_EMBEDDINGS",
    "MAX_SEGMENTS",
    "MIN_SEGMENT_LEN",
    "NUM_HEADS",
    "NUM_LAYERS",
    "TRAIN_BATCH_SIZE",
    "TRAIN_SEQ_LEN",
    "VOCAB_SIZE",
    "WEIGHTS_DIR",
    "InductionReport",
    "attention_patterns",
    "evaluate_induction_model",
    "format_report",
    "freeze_mlps",
    "induction_batch",
    "induction_scores",
    "load_induction_model",
    "main",
    "make_induction_config",
    "predictable_targets",
    "previous_token_scores",
    "repeated_half_accuracy",
    "repeated_tokens",
    "save_induction_model",
    "train_induction_model",
]

# --------------------------------------------------------------------------- constants

VOCAB_SIZE: int = 128
HIDDEN_SIZE: int = 64
NUM_LAYERS: int = 2
NUM_HEADS: int = 4
#: MLPs exist (it is a normal Llama) but are tiny, zeroed and frozen.
INTERMEDIATE_SIZE: int = 4
MAX_POSITION_EMBEDDINGS: int = 256
#: Token 0 is BOS; data tokens are drawn from ``1 .. VOCAB_SIZE - 1``.
BOS_TOKEN_ID: int = 0

#: Training sequence length, BOS included.
TRAIN_SEQ_LEN: int = 64
TRAIN_BATCH_SIZE: int = 32
#: Shortest repeated segment in :func:`induction_batch`.
MIN_SEGMENT_LEN: int = 2
#: Largest number of repeated segments per :func:`induction_batch` row.
MAX_SEGMENTS: int = 3
DEFAULT_STEPS: int = 2000
LEARNING_RATE: float = 3e-3
WEIGHT_DECAY: float = 0.01
WARMUP_STEPS: int = 100
#: Default ``half_len`` for evaluation with :func:`repeated_tokens`.
EVAL_HALF_LEN: int = 24

INDUCTION_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_HEADS,
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": None,
    "pad_token_id": None,
    "attention_dropout": 0.0,
}

#: Where the committed seed-0 checkpoint lives.
WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights" / "induction"


def make_induction_config() -> LlamaConfig:
    """Return the :class:`LlamaConfig` of the induction reference model."""
    return LlamaConfig(**INDUCTION_CONFIG)


# --------------------------------------------------------------------------- data


def _rand_int(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in ``[low, high]`` (inclusive) drawn from ``generator``."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _log_uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    """Integer in ``[low, high]`` whose logarithm is (roughly) uniform, from ``generator``."""
    u = float(torch.rand((), generator=generator).item())
    value = math.exp(math.log(low) + u * (math.log(high + 1) - math.log(low)))
    return min(high, int(value))


def _distinct_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct random non-BOS tokens."""
    return torch.randperm(VOCAB_SIZE - 1, generator=generator)[:n] + 1


def induction_batch(
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    max_segments: int = MAX_SEGMENTS,
) -> torch.LongTensor:
    """Training data: distinct random tokens in which a few segments occur twice.

    Each row starts with BOS and contains ``k`` segments, ``k`` uniform in
    ``[1, max_segments]``, each of which occurs exactly twice; all other tokens are distinct
    filler.  Segment lengths are log-uniform in ``[MIN_SEGMENT_LEN, (seq_len - 1) // 2]``
    (capped by the room left), so short repeats are frequent.  The two copies of every
    segment and the filler tokens are shuffled into a random order, so repeats appear at
    random offsets, may be adjacent and may interleave.  With ``max_segments=1`` a row is
    ``[BOS, x..., S, y..., S, z...]``.

    Several and short repeats matter: with one (mostly long) segment per row the model
    sometimes settles on a shifted circuit (a layer-0 head looking 7-9 tokens back) that
    copies long repeats but has near-zero induction and previous-token scores.

    The predictable tokens are given by :func:`predictable_targets`.

    Args:
        batch_size: number of rows.
        seq_len: length of each row, BOS included.
        generator: source of randomness (the output is a function of its state).
        max_segments: largest number of repeated segments per row.

    Returns:
        ``LongTensor`` of shape ``[batch_size, seq_len]``.
    """
    max_seg = (seq_len - 1) // 2
    if max_seg < MIN_SEGMENT_LEN:
        raise ValueError(f"seq_len={seq_len} too short for a segment of {MIN_SEGMENT_LEN}")
    if seq_len - 1 - MIN_SEGMENT_LEN > VOCAB_SIZE - 1:
        raise ValueError(f"seq_len={seq_len} needs more distinct tokens than the vocabulary")
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    bos = torch.tensor([BOS_TOKEN_ID])
    out = torch.empty(batch_size, seq_len, dtype=torch.long)
    for row in range(batch_size):
        n_segments = _rand_int(1, max_segments, generator)
        room = seq_len - 1
        lengths: list[int] = []
        for _ in range(n_segments):
            high = min(max_seg, room // 2)
            if high < MIN_SEGMENT_LEN:
                break
            lengths.append(_log_uniform_int(MIN_SEGMENT_LEN, high, generator))
            room -= 2 * lengths[-1]
        toks = _distinct_tokens(sum(lengths) + room, generator)
        segments = list(torch.split(toks, [*lengths, room]))
        filler = segments.pop()
        items = [seg for seg in segments for _ in range(2)] + list(filler.split(1))
        order = torch.randperm(len(items), generator=generator).tolist()
        out[row] = torch.cat([bos, *(items[i] for i in order)])
    return out  # type: ignore[return-value]


def predictable_targets(tokens: torch.Tensor) -> torch.Tensor:
    """Which next-token targets can be predicted by copying: ``BoolTensor [batch, T - 1]``.

    Entry ``[b, i]`` is True when the bigram ``(tokens[b, i], tokens[b, i + 1])`` already
    occurred at some earlier ``(j, j + 1)``, i.e. when an induction head can predict the
    target ``tokens[b, i + 1]``.  For :func:`induction_batch` and :func:`repeated_tokens` rows
    this is exactly the second copy of the repeat minus its first token.
    """
    cur, nxt = tokens[:, :-1], tokens[:, 1:]
    n = cur.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)  # [i, j]: j < i
    same_bigram = (cur[:, :, None] == cur[:, None, :]) & (nxt[:, :, None] == nxt[:, None, :])
    return (same_bigram & earlier).any(dim=-1)


def repeated_tokens(batch: int, half_len: int, generator: torch.Generator) -> torch.LongTensor:
    """Evaluation sequences ``[BOS, A, A]``: ``half_len`` distinct random tokens, twice.

    Returns a ``LongTensor`` of shape ``[batch, 1 + 2 * half_len]``; position 0 is BOS, the
    first copy of ``A`` occupies positions ``1..half_len`` and the second copy positions
    ``half_len + 1 .. 2 * half_len``.  This is the layout assumed by
    :func:`induction_scores`, :func:`previous_token_scores` and
    :func:`repeated_half_accuracy`.  Training rows are :data:`TRAIN_SEQ_LEN` long, so
    ``half_len <= 31`` is in distribution (the model still copies well up to about 60).
    """
    if not 2 <= half_len <= VOCAB_SIZE - 1:
        raise ValueError(f"half_len must be in [2, {VOCAB_SIZE - 1}], got {half_len}")
    halves = torch.stack([_distinct_tokens(half_len, generator) for _ in range(batch)])
    bos = torch.full((batch, 1), BOS_TOKEN_ID, dtype=torch.long)
    return torch.cat([bos, halves, halves], dim=1)  # type: ignore[return-value]


def _check_layout(tokens: torch.Tensor, half_len: int) -> None:
    """Raise unless ``tokens`` has the :func:`repeated_tokens` layout for ``half_len``."""
    if tokens.ndim != 2 or tokens.shape[1] != 1 + 2 * half_len:
        raise ValueError(
            f"expected tokens of shape [batch, {1 + 2 * half_len}], got {tuple(tokens.shape)}"
        )


# --------------------------------------------------------------------------- measurement


def _set_attn_implementation(model: LlamaForCausalLM, name: str) -> None:
    """Switch the attention implementation (older transformers lack the public setter)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - transformers < 4.48
        model.config._attn_implementation = name


def attention_patterns(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """Eager attention probabilities of every layer: ``[layers, batch, heads, query, key]``.

    The model is switched to the eager attention implementation for the call (and switched
    back afterwards) because only eager attention materialises the probabilities.
    """
    previous = model.config._attn_implementation
    if previous != "eager":
        _set_attn_implementation(model, "eager")
    try:
        with torch.no_grad():
            out = model(input_ids=tokens, output_attentions=True, use_cache=False)
    finally:
        if previous != "eager":
            _set_attn_implementation(model, previous)
    if out.attentions is None:
        raise RuntimeError("model returned no attentions")
    return torch.stack([a.float() for a in out.attentions])


def _offset_score(patterns: torch.Tensor, queries: range, offset: int) -> torch.Tensor:
    """Mean over batch and ``queries`` of ``patterns[..., q, q - offset]``: ``[layers, heads]``."""
    q = torch.tensor(list(queries))
    vals = patterns[:, :, :, q, q - offset]  # [layers, batch, heads, n_queries]
    return vals.mean(dim=(1, 3))


def induction_scores(
    patterns: torch.Tensor | Sequence[torch.Tensor], half_len: int
) -> torch.Tensor:
    """Per-head induction score ``[layers, heads]`` from attention patterns.

    Mean attention from each query ``i`` in the second copy (``half_len+1 <= i <= 2*half_len``)
    to key ``i - half_len + 1``, on :func:`repeated_tokens` data.  ``patterns`` is
    ``[layers, batch, heads, T, T]`` (or a per-layer sequence, as ``outputs.attentions``).
    """
    pats = torch.stack(list(patterns)) if not isinstance(patterns, torch.Tensor) else patterns
    if pats.shape[-1] != 1 + 2 * half_len:
        raise ValueError(f"patterns have T={pats.shape[-1]}, expected {1 + 2 * half_len}")
    return _offset_score(pats, range(half_len + 1, 2 * half_len + 1), half_len - 1)


def previous_token_scores(
    patterns: torch.Tensor | Sequence[torch.Tensor], half_len: int
) -> torch.Tensor:
    """Per-head previous-token score ``[layers, heads]`` from attention patterns.

    Mean attention from each query ``2 <= i <= 2*half_len`` to ``i - 1`` on
    :func:`repeated_tokens` data (query 1, whose previous token is BOS, is skipped).
    """
    pats = torch.stack(list(patterns)) if not isinstance(patterns, torch.Tensor) else patterns
    if pats.shape[-1] != 1 + 2 * half_len:
        raise ValueError(f"patterns have T={pats.shape[-1]}, expected {1 + 2 * half_len}")
    return _offset_score(pats, range(2, 2 * half_len + 1), 1)


def repeated_half_accuracy(model: LlamaForCausalLM, tokens: torch.Tensor, half_len: int) -> float:
    """Next-token argmax accuracy on the second copy of :func:`repeated_tokens` data.

    Predictions at positions ``half_len+1 .. 2*half_len-1`` are compared with the tokens at
    ``half_len+2 .. 2*half_len``.
    """
    _check_layout(tokens, half_len)
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits
    preds = logits[:, half_len + 1 : 2 * half_len].argmax(dim=-1)
    target = tokens[:, half_len + 2 :]
    return float((preds == target).float().mean().item())


@dataclass(frozen=True)
class InductionReport:
    """Evaluation of an induction model on :func:`repeated_tokens` data."""

    accuracy: float
    """Repeated-half next-token accuracy (see :func:`repeated_half_accuracy`)."""
    induction: torch.Tensor
    """``[layers, heads]`` induction scores."""
    previous_token: torch.Tensor
    """``[layers, heads]`` previous-token scores."""


def evaluate_induction_model(
    model: LlamaForCausalLM,
    *,
    batch: int = 64,
    half_len: int = EVAL_HALF_LEN,
    seed: int = 12345,
) -> InductionReport:
    """Measure accuracy and per-head scores on a fixed batch of :func:`repeated_tokens`."""
    gen = torch.Generator().manual_seed(seed)
    tokens = repeated_tokens(batch, half_len, gen)
    pats = attention_patterns(model, tokens)
    return InductionReport(
        accuracy=repeated_half_accuracy(model, tokens, half_len),
        induction=induction_scores(pats, half_len),
        previous_token=previous_token_scores(pats, half_len),
    )


def format_report(report: InductionReport) -> str:
    """Human-readable table of an :class:`InductionReport`."""
    lines = [f"repeated-half accuracy: {report.accuracy:.4f}"]
    for name, table in (("induction", report.induction), ("previous-token", report.previous_token)):
        n_heads = table.shape[1]
        lines.append(f"{name} score   " + " ".join(f"  head{h}" for h in range(n_heads)))
        for layer in range(table.shape[0]):
            row = " ".join(f"{v:7.3f}" for v in table[layer].tolist())
            lines.append(f"  layer {layer}          {row}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training


def freeze_mlps(model: LlamaForCausalLM) -> None:
    """Zero and freeze every MLP (and the norm feeding it): the model becomes attention-only."""
    for layer in model.model.layers:
        for param in layer.mlp.parameters():
            with torch.no_grad():
                param.zero_()
            param.requires_grad_(False)
        layer.post_attention_layernorm.weight.requires_grad_(False)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _copy_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the predictable targets of the batch."""
    mask = predictable_targets(tokens)
    return F.cross_entropy(logits[:, :-1][mask], tokens[:, 1:][mask])


def train_induction_model(
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    log: bool = False,
    *,
    batch_size: int = TRAIN_BATCH_SIZE,
    seq_len: int = TRAIN_SEQ_LEN,
    num_threads: int | None = 1,
) -> LlamaForCausalLM:
    """Train the induction reference model from scratch, deterministically.

    Initialisation uses ``torch.manual_seed(seed)`` and the data a dedicated
    ``torch.Generator`` seeded with ``seed``, so two calls with the same arguments (on the
    same machine and ``num_threads``) produce identical weights.  The loss is next-token
    cross-entropy on :func:`induction_batch` data, restricted to the targets that can be
    predicted (:func:`predictable_targets`).  (The other targets are fresh random tokens;
    including them dilutes the signal so much that the model stays on the ``ln(127)``
    plateau for thousands of steps.)

    Args:
        seed: seed for initialisation and data.
        steps: number of AdamW steps.
        log: print loss and evaluation every few hundred steps.
        batch_size: rows per step.
        seq_len: row length, BOS included.
        num_threads: ``torch.set_num_threads`` value for the run (restored afterwards);
            ``None`` leaves the setting alone.  Results depend (at float rounding level) on
            the thread count; the default of 1 is also the fastest for a model this small
            (two threads were ~10x slower per step on a loaded 2-core machine).

    Returns:
        The trained model in eval mode, with the eager attention implementation.
    """
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        config = make_induction_config()
        model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
        freeze_mlps(model)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": WEIGHT_DECAY},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=LEARNING_RATE,
            betas=(0.9, 0.98),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        start = time.perf_counter()
        for step in range(steps):
            tokens = induction_batch(batch_size, seq_len, gen)
            logits = model(input_ids=tokens, use_cache=False).logits
            loss = _copy_loss(logits, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if log and (step % 250 == 0 or step == steps - 1):
                model.eval()
                report = evaluate_induction_model(model, batch=32)
                model.train()
                elapsed = time.perf_counter() - start
                print(
                    f"step {step:5d}  loss {loss.item():.4f}  "
                    f"rep-acc {report.accuracy:.3f}  {elapsed:6.1f}s",
                    flush=True,
                )
        model.eval()
        return model
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------- save / load


def save_induction_model(model: LlamaForCausalLM, out: str | Path) -> Path:
    """Save ``model`` as ``config.json`` + ``model.safetensors`` in ``out``; return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():  # not needed and would only add noise to the committed directory
        gen_cfg.unlink()
    return out


def load_induction_model(
    path: str | Path | None = None, *, attn_implementation: str = "eager"
) -> LlamaForCausalLM:
    """Load the committed induction model (or the one saved at ``path``) in eval mode.

    Never touches the network (``local_files_only=True``).
    """
    model = LlamaForCausalLM.from_pretrained(
        str(WEIGHTS_DIR if path is None else path),
        local_files_only=True,
        attn_implementation=attn_implementation,
    )
    model.eval()
    return model


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    """Train, save and evaluate the induction reference model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--quiet", action="store_true", help="no training log")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train_induction_model(seed=args.seed, steps=args.steps, log=not args.quiet)
    elapsed = time.perf_counter() - start
    out = save_induction_model(model, args.out)
    print(f"trained seed {args.seed} for {args.steps} steps in {elapsed:.1f}s -> {out}")

    reloaded = load_induction_model(out)
    tokens = repeated_tokens(8, EVAL_HALF_LEN, torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.equal(model(input_ids=tokens).logits, reloaded(input_ids=tokens).logits)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"reload gives identical logits: {same}; directory size {size} bytes")
    print(format_report(evaluate_induction_model(reloaded)))


if __name__ == "__main__":
    main()
