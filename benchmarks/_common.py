"""Shared parts of the benchmark scripts: models, prompts, peers' wrappers, the timer, tables.

Nothing here is timed by itself. Every script measures its baseline in the same process,
interleaved with the contenders (one call of each per round, the order rotated every
round), and reports medians over rounds and the median of the per-round ratios.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------
# Environment, model, prompts


def quiet() -> None:
    """Silence library chatter (warnings, transformers logging) so the tables stay readable."""
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    quiet()


def build_gpt2(quick: bool) -> nn.Module:
    """GPT-2-small-shaped model with random weights (fp32, eval); a tiny one with ``quick``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        config = GPT2Config(
            n_layer=2,
            n_head=4,
            n_embd=64,
            vocab_size=512,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        config = GPT2Config()  # 12 layers, 12 heads, d_model 768, vocab 50257: GPT-2 small
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def describe_model(model: nn.Module) -> str:
    c = model.config  # type: ignore[attr-defined]
    n = sum(p.numel() for p in model.parameters())
    return (
        f"GPT2LMHeadModel(random init, fp32, eval): {c.n_layer} layers, d_model {c.n_embd}, "
        f"{c.n_head} heads, vocab {c.vocab_size}, {n / 1e6:.1f}M parameters"
    )


def prompt_pair(vocab: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean prompt of ``seq`` random tokens and a corrupted copy differing at 2 positions
    (an IOI-like name swap), both ``[1, seq]``."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, vocab, (1, seq), generator=g)
    corrupt = clean.clone()
    for p in (seq // 4, seq // 2):
        corrupt[0, p] = (clean[0, p] + 1 + torch.randint(0, vocab - 20, (1,), generator=g)) % (
            vocab - 10
        ) + 10
    return clean, corrupt


def word_tokenizer(vocab: int) -> Any:
    """A real (fast) HF tokenizer over ``vocab`` made-up words ``t0 t1 ...``, built offline.

    The peers' wrappers want a tokenizer object even when they are fed token ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # type: ignore[assignment]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="t0", pad_token="t0", eos_token="t0", bos_token="t0"
    )


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy for a peer library that changes the model it wraps (nnsight installs
    state in every module, pyvene freezes parameters and strips hooks, TransformerLens's
    bridge swaps submodules and switches to eager attention)."""
    return copy.deepcopy(model).eval()


def nnsight_model(model: nn.Module, vocab: int) -> Any:
    """nnsight 0.8's wrapper around a model object (no hub): ``TransformersModel``."""
    from nnsight.modeling.transformers import TransformersModel

    return TransformersModel(
        private_copy(model), task="text-generation", tokenizer=word_tokenizer(vocab)
    )


def tl_bridge(model: nn.Module) -> Any:
    """TransformerLens 4's ``TransformerBridge`` around a local HF model object, offline."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    m = private_copy(model)
    bridge = build_bridge_from_module(m, type(m).__name__, hf_config=m.config)
    bridge.eval()
    return bridge


def greedy_config(max_new_tokens: int) -> Any:
    """Greedy decoding of exactly ``max_new_tokens`` tokens (no stop at EOS): the package's
    own setting, so hand-written and package generations decode alike."""
    from interventions.hf import greedy_config as package_greedy_config

    return package_greedy_config(max_new_tokens)


def versions() -> str:
    out = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for name in ("transformers", "nnsight", "pyvene", "transformer_lens"):
        try:
            from importlib.metadata import version

            dist = {"transformer_lens": "transformer-lens"}.get(name, name)
            out.append(f"{name} {version(dist)}")
        except Exception:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:  # pragma: no cover
        return "?"
    return f"{one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cpus"


# ---------------------------------------------------------------------------------------
# Timing


@dataclass
class Contender:
    """One way of doing the work: ``fn()`` does it once and returns something checkable."""

    name: str
    fn: Callable[[], Any]
    group: str = ""
    info: bool = False  # shown for information; no target applies
    times: list[float] = field(default_factory=list)  # wall-clock seconds per round
    cpu: list[float] = field(default_factory=list)  # CPU seconds of this process per round
    tag: str = ""  # short label in progress lines, set by label()
    error: str | None = None
    check: str = ""  # result of the agreement check
    ok: bool = True


def label(contenders: Sequence[Contender]) -> None:
    """Number the contenders; progress lines name them by number."""
    for i, c in enumerate(contenders):
        c.tag = f"[{i}]"


def short_error(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def call_timed(fn: Callable[[], Any]) -> tuple[float, Any, float]:
    """Wall-clock seconds, the result, and the CPU seconds this process spent (all threads).

    CPU time is much less disturbed than wall time by other processes on a shared machine
    (with one thread it is close to the work done); with several OpenMP threads it also
    counts their spinning while they wait for each other.
    """
    gc.collect()
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    return t1 - t0, out, time.process_time() - c0


def check_round(
    contenders: Sequence[Contender],
    compare: Callable[[Contender, Any], str],
    *,
    verbose: bool = True,
) -> None:
    """Run every contender once (this also warms it up) and check what it computes.

    ``compare(contender, result)`` returns a description and raises on disagreement. A
    contender that raises is marked and left out of the timed rounds; one that disagrees is
    kept but flagged.
    """
    for c in contenders:
        try:
            seconds, result, _ = call_timed(c.fn)
        except Exception as exc:
            c.error = short_error(exc)
            c.ok = False
            if verbose:
                print(f"  {c.tag:>4} {c.name:<40} ERROR {c.error}", flush=True)
            continue
        try:
            c.check = compare(c, result)
        except Exception as exc:
            c.check = "MISMATCH " + short_error(exc, 200)
            c.ok = False
        if verbose:
            print(f"  {c.tag:>4} {c.name:<40} {seconds:8.2f} s (warm-up)  {c.check}", flush=True)


def timed_rounds(
    contenders: Sequence[Contender],
    repeats: int,
    compare: Callable[[Contender, Any], str] | None = None,
    *,
    verbose: bool = True,
) -> None:
    """``repeats`` rounds; each calls every (working) contender once, the order rotated
    (and reversed every other round). With ``compare``, every result is checked again, so a
    contender that breaks on a second call (state left behind) is caught."""
    live = [c for c in contenders if c.error is None]
    for r in range(repeats):
        k = r % max(len(live), 1)
        order = live[k:] + live[:k]
        if r % 2:
            order = order[::-1]
        for c in order:
            if c.error is not None:
                continue
            try:
                seconds, result, cpu = call_timed(c.fn)
            except Exception as exc:
                c.error = f"round {r + 1}: " + short_error(exc)
                continue
            c.times.append(seconds)
            c.cpu.append(cpu)
            if compare is not None:
                try:
                    compare(c, result)
                except Exception as exc:
                    c.ok = False
                    c.check = f"MISMATCH in round {r + 1}: " + short_error(exc, 200)
        if verbose:
            done = "  ".join(f"{c.tag} {c.times[-1]:.2f}" for c in live if c.times)
            print(f"  round {r + 1}/{repeats} (s): {done}", flush=True)


def profile(fn: Callable[[], Any], top: int = 15, sort: str = "tottime") -> str:
    """cProfile one call of ``fn``; the ``top`` functions by ``sort``, as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    gc.collect()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats(sort)
    stats.print_stats(top)
    text = out.getvalue()
    # keep the summary line and the table, drop pstats' preamble
    lines = [ln for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "function calls" in ln]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(keep + lines[start:])


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(c: Contender, base: Contender, *, cpu: bool = False) -> float:
    """Median over rounds of this contender's time / the baseline's time in the same round
    (wall-clock, or with ``cpu`` CPU time)."""
    mine, theirs = (c.cpu, base.cpu) if cpu else (c.times, base.times)
    pairs = [a / b for a, b in zip(mine, theirs, strict=False) if b > 0]
    return median(pairs)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    cols = list(zip(*([header, *rows]), strict=True))
    widths = [max(len(str(x)) for x in col) for col in cols]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [
            str(x).ljust(w) if j == 0 else str(x).rjust(w)
            for j, (x, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_s(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def fmt_x(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def agree(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    """assert_close within ``tol`` (absolute and relative); returns the max difference."""
    got = got.detach().cpu()
    want = want.detach().cpu()
    torch.testing.assert_close(
        got.to(want.dtype) if got.is_floating_point() else got,
        want,
        atol=tol,
        rtol=tol,
        msg=lambda m: f"{name}: {m}",
    )
    if not got.is_floating_point():
        return "identical"
    return f"agrees (max |diff| {max_abs_diff(got, want):.1e} <= {tol:g})"


# ---------------------------------------------------------------------------------------
# The hand-written plain-hooks code shared by both scripts


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.h  # type: ignore[attr-defined,return-value]


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def hooks_capture_resid_pre(
    model: nn.Module, ids: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward of ``ids``: last-position logits and every block's input (resid_pre)."""
    cache: dict[int, torch.Tensor] = {}

    def grab(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cache[layer] = _hidden(args, kwargs)

        return hook

    handles = [
        b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks(model))
    ]
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return logits, [cache[i] for i in range(len(cache))]


def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def hooks_patch_sweep(
    model: nn.Module,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    cells: Sequence[tuple[int, int]],
    chunk: int,
    *,
    last_logits_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hand-batched optimum: one clean forward capturing resid_pre of every layer, then
    batched forwards of corrupted copies (row 0 unpatched, row 1+i patched at ``cells[i]``),
    ``chunk`` rows per forward, patched in place by one forward pre-hook per block.

    Returns last-position logits of the clean run, the corrupted run and every cell.
    """
    clean_logits, resid = hooks_capture_resid_pre(model, clean)
    rows: list[tuple[int, int] | None] = [None, *cells]
    outs: list[torch.Tensor] = []
    keep = {"logits_to_keep": 1} if last_logits_only else {}
    for part in chunks(len(rows), chunk):
        per_layer: dict[int, tuple[list[int], list[int]]] = {}
        for j, i in enumerate(part):
            cell = rows[i]
            if cell is not None:
                layer, pos = cell
                per_layer.setdefault(layer, ([], []))[0].append(j)
                per_layer[layer][1].append(pos)

        def patcher(layer: int, r: list[int], p: list[int]) -> Callable[..., None]:
            r_t, p_t = torch.tensor(r), torch.tensor(p)
            values = resid[layer][0, p_t]  # [n, d_model]

            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                _hidden(args, kwargs)[r_t, p_t] = values

            return hook

        handles = [
            blocks(model)[layer].register_forward_pre_hook(patcher(layer, r, p), with_kwargs=True)
            for layer, (r, p) in per_layer.items()
        ]
        try:
            with torch.no_grad():
                ids = corrupt.expand(len(part), -1)
                outs.append(model(input_ids=ids, use_cache=False, **keep).logits[:, -1])
        finally:
            for h in handles:
                h.remove()
    logits = torch.cat(outs)
    return clean_logits, logits[:1], logits[1:]


def hooks_naive_sweep(
    model: nn.Module,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    cells: Sequence[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward per patch, each with one hook (plus the clean and corrupted runs)."""
    clean_logits, resid = hooks_capture_resid_pre(model, clean)
    with torch.no_grad():
        corrupt_logits = model(input_ids=corrupt, use_cache=False).logits[:, -1]
    outs = []
    for layer, pos in cells:

        def hook(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            layer: int = layer,
            pos: int = pos,
        ) -> None:
            _hidden(args, kwargs)[:, pos] = resid[layer][:, pos]

        handle = blocks(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                outs.append(model(input_ids=corrupt, use_cache=False).logits[:, -1])
        finally:
            handle.remove()
    return clean_logits, corrupt_logits, torch.cat(outs)


def default_chunk(model: nn.Module, rows: int, seq: int) -> int:
    """How many rows this package puts into one forward pass under its default ``Budget``,
    so that every batched contender uses the same chunking."""
    from interventions.architectures import describe
    from interventions.batching import Budget, bytes_per_item

    budget = Budget()
    limit = rows
    if budget.max_items is not None:
        limit = min(limit, budget.max_items)
    if budget.max_bytes is not None:
        limit = min(limit, max(1, budget.max_bytes // bytes_per_item(seq, describe(model))))
    return limit
