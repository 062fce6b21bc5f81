"""A small GPT-2 trained on indirect object identification (Wang et al. 2022, scaled down).

The task: in ``"when Mary and John went to the store , John gave a drink to"`` the next
word is ``Mary``, the name that is *not* repeated.  The model is a standard
:class:`transformers.GPT2LMHeadModel` (3 layers x 4 heads, width 64, tied embeddings,
no dropout) over a word-level vocabulary of 59 words: ``<pad> <bos> <unk>``, 24 names and
the template words (:func:`make_tokenizer`, a ``tokenizers`` WordLevel model wrapped in
:class:`~transformers.PreTrainedTokenizerFast` that prepends ``<bos>``; it is saved next
to the weights, so ``AutoTokenizer.from_pretrained`` loads it offline).  Prompts come
from five templates (:data:`TEMPLATES`) of different lengths, 15, 17, 12, 19 and 14
tokens with ``<bos>``, in both name orders (ABB and BAB).  Each template records where
its names sit (:class:`Template`): ``n1`` and ``n2`` (the first two names, IO and S1 in
either order), ``s2`` (the repeated name) and ``end`` (the last position, where the
answer is predicted).

Clean/corrupted pairs differ only at ``s2``: the corrupted prompt repeats neither name
but names a third person ``C`` (``"... , Alice gave a drink to"``), so the answer is no
longer determined.  :func:`ioi_batch` gives ``[n, length]`` tensors of one template;
:func:`ioi_dataset` gives prompts of every template (lists of ids of different lengths,
for ragged runs) with their ``s2`` and ``end`` as per-prompt positions.  The model is
trained on both (see :func:`train_ioi_model`): IO on clean prompts, IO or S with one
half each on corrupted ones, every template mixed in each batch.  3000 steps take about 4
minutes of CPU time on one core (7-20 minutes of wall time on a loaded 2-core machine).

The metric is the logit difference IO - S.  Measured on seeds 0 / 1 / 2 (500 prompts of
every template; patching: 16 prompts of template 0, and 40 prompts of all five
templates in one ragged run pair at per-prompt positions, the tests' prompts):

=====================================  ===========  ===========  ===========
                                       seed 0       seed 1       seed 2
=====================================  ===========  ===========  ===========
accuracy (argmax = IO), every template 1.000        1.000        1.000
logit difference, clean                9.53         10.33        12.31
mean abs logit difference, corrupted   0.09         0.08         0.08
template 0, s2 / end / other:
resid_pre[0]                           1.00/0/0     1.00/0/0     1.00/0/0
resid_pre[1]                           1.00/0/0     1.00/0/0     1.00/0/0
resid_pre[2]                           0.32/0.46/0  0.63/0.33/0  0.57/0.37/0
resid_post[2]                          0/1.00/0     0/1.00/0     0/1.00/0
all five templates, s2 / end / after:
resid_pre[0]                           1.00/0/0     1.00/0/0     1.00/0/0
resid_pre[1]                           1.00/0/0     1.00/0/0     1.00/0/0
resid_pre[2]                           0.55/0.30/0  0.73/0.20/0  0.64/0.26/0
resid_post[2]                          0/1.00/0     0/1.00/0     0/1.00/0
attribution r (resid_pre, denoise)     0.33         0.27         0.20
attribution r (resid_pre, noise)       0.72         0.62         0.71
=====================================  ===========  ===========  ===========

("other" is the largest absolute score at any other position, "after" the score at the
token after ``s2``; both at most 0.001.)  So residual-stream activation patching (clean
into corrupted, 0 = corrupted, 1 = clean) finds the mechanism of the paper in small, in
every template: the fact that S is repeated lives at ``s2`` in the early layers and has
moved to ``end`` by the last layer; no other position matters.  Attribution patching
tracks the sweep better when noising (gradient at the clean run) than when denoising:
the model is trained to be indifferent between IO and S whenever S2 is a third name, so
the metric is flat around the corrupted run and its gradient misses the early-layer
``s2`` cells, whose exact score is 1.  The committed weights are seed 0.

Command line::

    python -m interventions.reference_models.ioi --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from interventions.reference_models.ioi_data import (
    _ID,
    BOS,
    NAMES,
    PAD,
    TEMPLATES,
    UNK,
    VOCAB,
    IOIBatch,
    IOIDataset,
    Template,
    ioi_batch,
    ioi_dataset,
    ioi_texts,
    pad_right,
)

__all__ = [
    "BOS",
    "DEFAULT_STEPS",
    "NAMES",
    "PAD",
    "PATCHING_PROMPTS",
    "PATCHING_SEED",
    "TEMPLATES",
    "UNK",
    "VOCAB",
    "WEIGHTS_DIR",
    "IOIBatch",
    "IOIDataset",
    "Template",
    "evaluate_ioi_model",
    "ioi_batch",
    "ioi_dataset",
    "ioi_texts",
    "load_ioi_model",
    "main",
    "make_ioi_config",
    "make_tokenizer",
    "pad_right",
    "patching_report",
    "patching_summary",
    "save_ioi_model",
    "train_ioi_model",
]

# --------------------------------------------------------------------------- model config

NUM_LAYERS: int = 3
NUM_HEADS: int = 4
HIDDEN_SIZE: int = 64
MAX_POSITIONS: int = 32

DEFAULT_STEPS: int = 3000
TRAIN_BATCH_SIZE: int = 64
LEARNING_RATE: float = 1e-2
WEIGHT_DECAY: float = 0.01
WARMUP_STEPS: int = 100

#: Prompts of :func:`patching_report` (and of the tests): ``n`` and generator seed.
PATCHING_PROMPTS: int = 16
PATCHING_SEED: int = 7

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights" / "ioi"


def make_ioi_config() -> GPT2Config:
    """The :class:`GPT2Config` of the IOI reference model."""
    return GPT2Config(
        vocab_size=len(VOCAB),
        n_positions=MAX_POSITIONS,
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=NUM_HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=_ID[BOS],
        eos_token_id=_ID[BOS],
        pad_token_id=_ID[PAD],
        tie_word_embeddings=True,
    )


@cache
def _tokenizer_object() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(_ID), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, _ID[BOS])]
    )
    return tok


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer: whitespace-separated words, ``<bos>`` prepended.

    >>> tok = make_tokenizer()
    >>> tok.decode(tok("when Mary and John").input_ids)
    '<bos> when Mary and John'
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(),
        bos_token=BOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )


# --------------------------------------------------------------------------- measurement


def _last_logits(model: GPT2LMHeadModel, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """The logits at each prompt's last token, ``[n, vocab]``, in one right-padded pass."""
    ids, last = pad_right(prompts)
    mask = (torch.arange(ids.shape[1]) <= last[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits[torch.arange(len(prompts)), last].float()


def _final_logits(model: GPT2LMHeadModel, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    with torch.no_grad():
        return _last_logits(model, prompts)


def evaluate_ioi_model(
    model: GPT2LMHeadModel, *, n: int = 500, seed: int = 12345, template: int | None = None
) -> dict[str, float]:
    """Accuracy and logit differences on a fixed :func:`ioi_dataset` (``n`` prompts per
    template, every template or only ``template``).

    ``accuracy``: argmax over the whole vocabulary is IO on clean prompts;
    ``logit_diff``: mean ``logit(IO) - logit(S)`` on clean prompts; ``corrupt_logit_diff``:
    the same on corrupted prompts (~0 when the model cannot tell the answer).
    """
    chosen = range(len(TEMPLATES)) if template is None else [template]
    data = ioi_dataset(n * len(chosen), torch.Generator().manual_seed(seed), chosen)
    rows = torch.arange(len(data))
    lc, lx = _final_logits(model, data.clean), _final_logits(model, data.corrupt)
    answer, wrong = data.answer, data.wrong
    return {
        "accuracy": float((lc.argmax(-1) == answer).float().mean()),
        "logit_diff": float((lc[rows, answer] - lc[rows, wrong]).mean()),
        "corrupt_logit_diff": float((lx[rows, answer] - lx[rows, wrong]).mean()),
        "corrupt_abs_logit_diff": float((lx[rows, answer] - lx[rows, wrong]).abs().mean()),
    }


def patching_summary(scores: torch.Tensor, template: Template) -> list[dict[str, float]]:
    """Per row of a layer x position patching table: the score at ``s2``, at ``end``, and
    the largest absolute score at any other position."""
    out = []
    others = [p for p in range(scores.shape[1]) if p not in (template.s2, template.end)]
    for row in scores:
        out.append(
            {
                "s2": float(row[template.s2]),
                "end": float(row[template.end]),
                "other": float(row[others].abs().max()),
            }
        )
    return out


# --------------------------------------------------------------------------- training


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_ioi_model(
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    log: bool = False,
    *,
    batch_size: int = TRAIN_BATCH_SIZE,
    corrupt_weight: float = 1.0,
    lr: float = LEARNING_RATE,
    num_threads: int | None = 1,
) -> GPT2LMHeadModel:
    """Train the IOI reference model from scratch, deterministically.

    Each AdamW step draws ``batch_size`` clean/corrupted pairs from :func:`ioi_dataset`
    (every template, random names and orders: prompts of different lengths, padded on the
    right in one forward pass, which leaves each prompt's logits exact) and minimises the
    cross-entropy of each prompt's last position: against IO on the clean prompt, plus ``corrupt_weight`` times the
    cross-entropy against "IO or S, one half each" on the corrupted prompt, whose answer is
    undetermined.  That second term matters: trained on clean prompts only, the model
    learns a shortcut (such as "answer N1 unless S2 is N1") that picks IO or S on a
    corrupted prompt with a logit difference of +-5..10, which makes the normalised
    patching scores (divided by the clean - corrupted difference of each prompt)
    meaningless.

    ``torch.manual_seed(seed)`` fixes the initialisation and a ``torch.Generator`` seeded
    with ``seed`` the data, so equal arguments and thread counts give equal weights.
    ``num_threads`` is set for the run and restored (``None`` leaves it alone); one thread
    is also the fastest for a model this small (two threads were ~10x slower per step on
    a loaded 2-core machine).  Returns the model in eval mode.
    """
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(make_ioi_config())
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": WEIGHT_DECAY},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=(0.9, 0.98),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        start = time.perf_counter()
        for step in range(steps):
            data = ioi_dataset(batch_size, gen)
            logp = _last_logits(model, data.clean + data.corrupt).log_softmax(-1)
            rows, answer, wrong = torch.arange(batch_size), data.answer, data.wrong
            clean_lp, corrupt_lp = logp[:batch_size], logp[batch_size:]
            # clean: IO; corrupted: IO or S with probability 1/2 each (undetermined)
            undetermined = 0.5 * (corrupt_lp[rows, answer] + corrupt_lp[rows, wrong])
            loss = -clean_lp[rows, answer].mean() - corrupt_weight * undetermined.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if log and (step % 250 == 0 or step == steps - 1):
                model.eval()
                ev = evaluate_ioi_model(model, n=200)
                model.train()
                print(
                    f"step {step:5d}  loss {loss.item():.4f}  acc {ev['accuracy']:.3f}  "
                    f"ld {ev['logit_diff']:.2f}  corrupt |ld| {ev['corrupt_abs_logit_diff']:.2f}  "
                    f"{time.perf_counter() - start:6.1f}s",
                    flush=True,
                )
        return model.eval()
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------- save / load


def save_ioi_model(model: GPT2LMHeadModel, out: str | Path) -> Path:
    """Save the model (``config.json`` + ``model.safetensors``) and the tokenizer in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    make_tokenizer().save_pretrained(out)
    # name the class every transformers version knows (5.x writes its own backend's name)
    tok_cfg = out / "tokenizer_config.json"
    settings = json.loads(tok_cfg.read_text())
    settings.pop("backend", None)
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return out


def load_ioi_model(path: str | Path | None = None) -> tuple[GPT2LMHeadModel, Any]:
    """``(model, tokenizer)`` from the committed weights (or ``path``), offline, eval mode."""
    from transformers import AutoTokenizer

    directory = str(WEIGHTS_DIR if path is None else path)
    model = GPT2LMHeadModel.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- CLI


def patching_report(
    model: GPT2LMHeadModel,
    template: int = 0,
    n: int = PATCHING_PROMPTS,
    seed: int = PATCHING_SEED,
    backend: str = "torch",
) -> str:
    """The residual patching sweep and attribution patching on ``n`` prompts, as text.

    ``resid_pre`` of every layer and ``resid_post`` of the last (clean into corrupted,
    logit difference, 0 = corrupted, 1 = clean), summarised per layer by
    :func:`patching_summary`; then the Pearson correlation of attribution patching with
    the exact ``resid_pre`` sweep, denoising and noising.  The defaults are the prompts
    the tests use.
    """
    from interventions.recipes import Metric, activation_patching, attribution_patching

    clean, corrupt, answer, wrong = ioi_batch(n, torch.Generator().manual_seed(seed), template)
    metric = Metric.logit_diff(answer, wrong)
    tpl = TEMPLATES[template]
    lines = [f"template {template} ({n} prompts): s2 = {tpl.s2}, end = {tpl.end}"]
    for site, layers in (("resid_pre", None), ("resid_post", [-1])):
        res = activation_patching(
            model, clean, corrupt, metric, site=site, layers=layers, backend=backend
        )
        for label, row in zip(res.rows, patching_summary(res.scores, tpl), strict=True):
            lines.append(
                f"  {label:14s} s2 {row['s2']:+.3f}  end {row['end']:+.3f}  "
                f"other max|.| {row['other']:.3f}"
            )
    for direction in ("denoise", "noise"):
        attr = attribution_patching(
            model, clean, corrupt, metric, direction=direction, compare_exact=True, backend=backend
        )
        lines.append(
            f"  attribution vs exact (resid_pre, {direction}): r = {attr.correlation:.3f}, "
            f"max error {attr.max_error:.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Train, save and evaluate the IOI reference model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--quiet", action="store_true", help="no training log")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the model in --out")
    parser.add_argument("--no-patching", action="store_true", help="skip the patching report")
    args = parser.parse_args(argv)

    out = args.out
    if not args.eval_only:
        start = time.perf_counter()
        model = train_ioi_model(seed=args.seed, steps=args.steps, log=not args.quiet)
        elapsed = time.perf_counter() - start
        out = save_ioi_model(model, args.out)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        print(
            f"trained seed {args.seed} for {args.steps} steps in {elapsed:.1f}s -> {out} ({size} B)"
        )
    reloaded, tokenizer = load_ioi_model(out)
    clean = ioi_batch(8, torch.Generator().manual_seed(1), 0)[0]
    if not args.eval_only:
        with torch.no_grad():
            same = torch.equal(model(input_ids=clean).logits, reloaded(input_ids=clean).logits)
        print(f"reload gives identical logits: {same}")
    text_ids = tokenizer(ioi_texts(clean), return_tensors="pt").input_ids
    print(f"tokenizer round trip: {torch.equal(text_ids, clean)}")
    for template in (None, *range(len(TEMPLATES))):
        ev = evaluate_ioi_model(reloaded, template=template)
        print(f"template {template}:", {k: round(v, 4) for k, v in ev.items()})
    if not args.no_patching:
        for template in range(len(TEMPLATES)):
            print(patching_report(reloaded, template))


if __name__ == "__main__":
    main()
