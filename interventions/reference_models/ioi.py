"""A small GPT-2 trained on indirect object identification (Wang et al. 2022, scaled down).

The task: in ``"when Mary and John went to the store , John gave a drink to"`` the next
word is ``Mary``, the name that is *not* repeated.  The model is a standard
:class:`transformers.GPT2LMHeadModel` (3 layers x 4 heads, width 64, tied embeddings,
no dropout) over a word-level vocabulary of 60 words: ``<pad> <bos> <unk>``, 24 names and
the template words (:func:`make_tokenizer`, a ``tokenizers`` WordLevel model wrapped in
:class:`~transformers.PreTrainedTokenizerFast` that prepends ``<bos>``; it is saved next
to the weights, so ``AutoTokenizer.from_pretrained`` loads it offline).  Prompts come
from five templates (:data:`TEMPLATES`), every one 15 tokens long with ``<bos>``, in
both name orders (ABB and BAB).  Each template records where its names sit
(:class:`Template`): ``n1`` and ``n2`` (the first two names, IO and S1 in either
order), ``s2`` (the repeated name) and ``end`` (the last position, where the answer is
predicted).

Clean/corrupted pairs (:func:`ioi_batch`) differ only at ``s2``: the corrupted prompt
repeats neither name but names a third person ``C`` (``"... , Alice gave a drink to"``),
so the answer is no longer determined.  The model is trained on both (see
:func:`train_ioi_model`): IO on clean prompts, IO or S with one half each on corrupted
ones.  3000 steps take 2-7 minutes on one CPU core, depending on the machine's load.

The metric is the logit difference IO - S.  Measured on seeds 0 / 1 / 2 (500 prompts of
every template; 16 prompts of template 0 for patching, the tests' prompts):

=====================================  ===========  ===========  ===========
                                       seed 0       seed 1       seed 2
=====================================  ===========  ===========  ===========
accuracy (argmax = IO)                 1.000        1.000        1.000
logit difference, clean                8.19         10.88        6.64
mean abs logit difference, corrupted   0.11         0.09         0.24
resid_pre[0]:  s2 / end / other        1.00/0/0     1.00/0/0     1.00/0/0
resid_pre[1]:  s2 / end / other        1.01/0/0     1.00/0/0     1.00/0/0
resid_pre[2]:  s2 / end / other        0.29/0.60/0  0.97/0.01/0  0.16/0.67/0
resid_post[2]: s2 / end / other        0/1.00/0     0/1.00/0     0/1.00/0
attribution r (resid_pre, denoise)     0.43         0.57         0.74
attribution r (resid_pre, noise)       0.90         0.88         0.93
=====================================  ===========  ===========  ===========

("other" is the largest absolute score at any other position, at most 0.004.)  So
residual-stream activation patching (clean into corrupted, 0 = corrupted, 1 = clean)
finds the mechanism of the paper in small: the fact that S is repeated lives at ``s2``
in the early layers and has moved to ``end`` by the last layer (within layer 2 for
seed 1); no other position matters.  Attribution patching tracks the sweep well when
noising (gradient at the clean run) but poorly when denoising: the model is trained to
be indifferent between IO and S whenever S2 is a third name, so the metric is flat
around the corrupted run and its gradient misses the early-layer ``s2`` cells, whose
exact score is 1.  The committed weights are seed 0.

Command line::

    python -m interventions.reference_models.ioi --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = [
    "BOS",
    "DEFAULT_STEPS",
    "NAMES",
    "PAD",
    "PATCHING_PROMPTS",
    "PATCHING_SEED",
    "SEQ_LEN",
    "TEMPLATES",
    "UNK",
    "VOCAB",
    "WEIGHTS_DIR",
    "IOIBatch",
    "Template",
    "evaluate_ioi_model",
    "ioi_batch",
    "ioi_texts",
    "load_ioi_model",
    "main",
    "make_ioi_config",
    "make_tokenizer",
    "patching_report",
    "patching_summary",
    "save_ioi_model",
    "train_ioi_model",
]

# --------------------------------------------------------------------------- vocabulary

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "Sarah", "James", "Emma",
    "David", "Lucy", "Paul", "Anna", "Mark", "Kate", "Peter", "Laura",
    "Sam", "Julia", "Ben", "Rose", "Dan", "Nina", "Max", "Eva",
)  # fmt: skip


@dataclass(frozen=True)
class Template:
    """A prompt with three name slots; ``text`` uses ``{N1}``, ``{N2}``, ``{S2}``.

    Positions count ``<bos>`` as position 0.
    """

    text: str

    @property
    def words(self) -> tuple[str, ...]:
        return (BOS, *self.text.split())

    def _pos(self, slot: str) -> int:
        return self.words.index("{" + slot + "}")

    @property
    def n1(self) -> int:
        """Position of the first name (IO in ABB order, S1 in BAB order)."""
        return self._pos("N1")

    @property
    def n2(self) -> int:
        """Position of the second name."""
        return self._pos("N2")

    @property
    def s2(self) -> int:
        """Position of the repeated name (the only position where clean and corrupt differ)."""
        return self._pos("S2")

    @property
    def end(self) -> int:
        """The last position, whose next-token prediction is the answer."""
        return len(self.words) - 1

    def fill(self, n1: str, n2: str, s2: str) -> str:
        """The prompt text (without ``<bos>``)."""
        return self.text.format(N1=n1, N2=n2, S2=s2)


TEMPLATES: tuple[Template, ...] = (
    Template("when {N1} and {N2} went to the store , {S2} gave a drink to"),
    Template("then , {N1} and {N2} had a long argument , afterwards {S2} said to"),
    Template("{N1} and {N2} went to the park . later {S2} handed the ball to"),
    Template("while {N1} and {N2} were at the office , {S2} sent an email to"),
    Template("{N1} and {N2} were talking . {S2} was tired so gave a gift to"),
)
#: Every prompt is this many tokens long, ``<bos>`` included.
SEQ_LEN: int = 15


def _vocab() -> tuple[str, ...]:
    words: list[str] = [PAD, BOS, UNK, *NAMES]
    for template in TEMPLATES:
        for word in template.words[1:]:
            if not word.startswith("{") and word not in words:
                words.append(word)
    return tuple(words)


VOCAB: tuple[str, ...] = _vocab()
_ID = {w: i for i, w in enumerate(VOCAB)}
_NAME_IDS = torch.tensor([_ID[n] for n in NAMES])

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


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class IOIBatch:
    """Names behind an :func:`ioi_batch` (each ``[n]`` token ids), for analysis."""

    io: torch.Tensor
    s: torch.Tensor
    c: torch.Tensor
    abb: torch.Tensor
    """True where the order is ``IO .. S .. S`` (else ``S .. IO .. S``)."""
    template: torch.Tensor
    """Index into :data:`TEMPLATES` of each row."""


def _sample(
    n: int, generator: torch.Generator, template: int | None
) -> tuple[torch.Tensor, torch.Tensor, IOIBatch]:
    names = torch.stack([torch.randperm(len(NAMES), generator=generator)[:3] for _ in range(n)])
    io, s, c = (_NAME_IDS[names[:, k]] for k in range(3))
    abb = torch.rand(n, generator=generator) < 0.5
    if template is None:
        tpl = torch.randint(len(TEMPLATES), (n,), generator=generator)
    else:
        tpl = torch.full((n,), int(template), dtype=torch.long)
    clean = torch.empty(n, SEQ_LEN, dtype=torch.long)
    corrupt = torch.empty(n, SEQ_LEN, dtype=torch.long)
    for row in range(n):
        t = TEMPLATES[int(tpl[row])]
        ids = torch.tensor([_ID.get(w, -1) for w in t.words])
        first, second = (io[row], s[row]) if abb[row] else (s[row], io[row])
        ids[t.n1], ids[t.n2], ids[t.s2] = first, second, s[row]
        clean[row] = ids
        ids = ids.clone()
        ids[t.s2] = c[row]
        corrupt[row] = ids
    return clean, corrupt, IOIBatch(io, s, c, abb, tpl)


def ioi_batch(
    n: int, generator: torch.Generator, template: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(clean_ids, corrupt_ids, answer_ids, wrong_ids)`` for ``n`` random IOI prompts.

    ``clean_ids`` and ``corrupt_ids`` are ``[n, SEQ_LEN]`` and differ only at the template's
    ``s2`` position (the repeated name S in the clean prompt, a third name C in the
    corrupted one); ``answer_ids`` is IO and ``wrong_ids`` S, each ``[n]``.  Three distinct
    names per row, a random order (ABB or BAB) and, with ``template=None``, a random
    template per row (all templates have the same length); else every row uses
    ``TEMPLATES[template]``.  The output is a function of ``generator``'s state.
    """
    if template is not None and not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be in 0..{len(TEMPLATES) - 1}, got {template}")
    clean, corrupt, info = _sample(n, generator, template)
    return clean, corrupt, info.io, info.s


def ioi_texts(ids: torch.Tensor) -> list[str]:
    """The prompts of ``ids`` as text (without ``<bos>``), one string per row."""
    return [" ".join(VOCAB[i] for i in row.tolist() if VOCAB[i] != BOS) for row in ids]


# --------------------------------------------------------------------------- measurement


def _final_logits(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[:, -1].float()


def evaluate_ioi_model(
    model: GPT2LMHeadModel, *, n: int = 500, seed: int = 12345, template: int | None = None
) -> dict[str, float]:
    """Accuracy and logit differences on a fixed batch of :func:`ioi_batch` prompts.

    ``accuracy``: argmax over the whole vocabulary is IO on clean prompts;
    ``logit_diff``: mean ``logit(IO) - logit(S)`` on clean prompts; ``corrupt_logit_diff``:
    the same on corrupted prompts (~0 when the model cannot tell the answer).
    """
    clean, corrupt, answer, wrong = ioi_batch(n, torch.Generator().manual_seed(seed), template)
    rows = torch.arange(n)
    lc, lx = _final_logits(model, clean), _final_logits(model, corrupt)
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

    Each AdamW step draws ``batch_size`` clean/corrupted pairs from :func:`ioi_batch`
    (random templates, names and orders) and minimises the cross-entropy of the final
    position: against IO on the clean prompt, plus ``corrupt_weight`` times the
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
            clean, corrupt, answer, wrong = ioi_batch(batch_size, gen)
            logits = model(input_ids=torch.cat([clean, corrupt]), use_cache=False).logits
            logp = logits[:, -1].log_softmax(-1)
            rows = torch.arange(batch_size)
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
    clean = ioi_batch(8, torch.Generator().manual_seed(1))[0]
    if not args.eval_only:
        with torch.no_grad():
            same = torch.equal(model(input_ids=clean).logits, reloaded(input_ids=clean).logits)
        print(f"reload gives identical logits: {same}")
    text_ids = tokenizer(ioi_texts(clean), return_tensors="pt").input_ids
    print(f"tokenizer round trip: {torch.equal(text_ids, clean)}")
    print({k: round(v, 4) for k, v in evaluate_ioi_model(reloaded).items()})
    if not args.no_patching:
        for template in (0, 4):
            print(patching_report(reloaded, template))


if __name__ == "__main__":
    main()
