"""Issue 11: edge attribution patching (EAP) over every edge, against hand-written EAP.

Workload: the GPT-2-small-shaped model (random weights, fp32, CPU), a batch of 8 prompt
pairs of 16 tokens (each corrupted copy differs at 2 positions), metric = mean logit
difference at the last position; every edge of the model is scored (upstream: the
embeddings, 144 heads, 12 MLPs; downstream: each head's q, k and v input, each MLP's input,
the logits; 32,491 edges).

Contenders, all in this process, interleaved (one call each per round, order rotated):

* ``plain forward``: one forward of the clean batch, no gradients, last logits only
  (the unit of "forward equivalents");
* ``plain forward + backward``: one forward with gradients and one backward of the
  metric down to the embeddings (no parameter gradients): the unit of "forward+backward
  equivalents", and the baseline of the memory column;
* ``hooks: hand-written EAP`` (the baseline of the time column): plain torch hooks cache
  the upstream outputs of a no-grad corrupt forward and of the clean forward with
  gradients; one backward gives the gradient at each q/k/v projection's output, each MLP
  norm's input and the final norm's input; the per-head q/k/v input gradients are the
  attention norm's vector-Jacobian product of those (written out), and the scores are one
  einsum per downstream layer over the upstream nodes before it;
* ``interventions: edge_attribution (EAP)``, the package's recipe.

Before timing, the package's 32,491 scores are held to the hand-written ones with
``torch.testing.assert_close`` (atol 1e-4 x the largest |score|, rtol 1e-3). Forward
passes are counted by a hook on the transformer during one extra call of each. Peak memory
is measured in a child process per contender: the peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs`` after a warm-up call and ``malloc_trim``) above the
resident set before the call (``tracemalloc`` does not see torch's CPU allocations).

Run: ``.venv/bin/python benchmarks/eap.py`` (a few minutes on 2 cores), or ``--quick``
(tiny model, 1 repeat, < 60 s). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import torch
from torch import nn

TARGET_VS_HAND = 1.2
TARGET_FORWARDS = 3
BATCH = 8

# ---------------------------------------------------------------------------------------
# Workload


def workload(quick: bool, seq: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Any]:
    """The model, clean and corrupt ids ``[8, seq]`` and the answer / wrong ids ``[8]``."""
    model = cm.build_gpt2(quick)
    vocab = model.config.vocab_size  # type: ignore[union-attr]
    pairs = [cm.prompt_pair(vocab, seq, seed=i) for i in range(BATCH)]
    clean = torch.cat([c for c, _ in pairs])
    corrupt = torch.cat([x for _, x in pairs])
    with torch.no_grad():
        lc = model(input_ids=clean, use_cache=False).logits[:, -1]
        lx = model(input_ids=corrupt, use_cache=False).logits[:, -1]
    answer, wrong = lc.argmax(-1), lx.argmax(-1)
    same = answer == wrong
    wrong[same] = lc.topk(2).indices[same, 1]
    return model, clean, corrupt, (answer, wrong)


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    return (logits[rows, answer] - logits[rows, wrong]).mean()


# ---------------------------------------------------------------------------------------
# Plain forward, plain forward + backward


def plain_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]


def plain_forward_backward(
    model: nn.Module, ids: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor
) -> torch.Tensor:
    """The metric's gradient with respect to the embeddings (block 0's input)."""
    blocks = cm.blocks(model)
    held: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        held.append(cm._hidden(args, kwargs))

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logit_diff(logits, answer, wrong), held)
    return grad


# ---------------------------------------------------------------------------------------
# Hand-written EAP with plain hooks (GPT-2 modules, no library code)


def _layer_norm_vjp(norm: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g @ d norm(x) / dx`` for a LayerNorm; ``x`` [..., d] broadcasts against ``g``
    [..., k, d] (one cotangent per head copy)."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    inv = torch.rsqrt(var + norm.eps)
    xhat = ((x - mu) * inv).unsqueeze(-2)
    u = g * norm.weight
    mean_u = u.mean(-1, keepdim=True)
    mean_ux = (u * xhat).mean(-1, keepdim=True)
    return (u - mean_u - xhat * mean_ux) * inv.unsqueeze(-2)


def hand_eap(
    model: nn.Module,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    answer: torch.Tensor,
    wrong: torch.Tensor,
) -> torch.Tensor:
    """Every edge's EAP score, in the order of ``all_edges`` (per layer: q, k, v inputs of
    each head from each earlier upstream node, then the MLP's input; then the logits)."""
    cfg = model.config  # type: ignore[attr-defined]
    n_heads, d = cfg.n_head, cfg.n_embd
    d_head = d // n_heads
    blocks = cm.blocks(model)
    transformer = model.transformer  # type: ignore[attr-defined]

    def capture(grad: bool) -> tuple[dict[str, Any], list[Any]]:
        store: dict[str, Any] = {"z": {}, "mlp": {}, "qkv": {}, "ln1": {}, "mlp_in": {}}
        handles = []

        def embed(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            store["embed"] = cm._hidden(args, kwargs).detach()

        handles.append(blocks[0].register_forward_pre_hook(embed, with_kwargs=True))
        for i, block in enumerate(blocks):

            def z(module: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
                store["z"][i] = args[0].detach()

            def mlp(module: nn.Module, args: Any, out: torch.Tensor, i: int = i) -> None:
                store["mlp"][i] = out.detach()

            handles.append(block.attn.c_proj.register_forward_pre_hook(z))
            handles.append(block.mlp.register_forward_hook(mlp))
            if grad:

                def ln1(module: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
                    store["ln1"][i] = args[0].detach()

                def qkv(module: nn.Module, args: Any, out: torch.Tensor, i: int = i) -> None:
                    store["qkv"][i] = out

                def mlp_in(module: nn.Module, args: tuple[Any, ...], i: int = i) -> Any:
                    x = args[0].clone()  # the MLP's input alone, not the residual stream
                    store["mlp_in"][i] = x
                    return (x,)

                handles.append(block.ln_1.register_forward_pre_hook(ln1))
                handles.append(block.attn.c_attn.register_forward_hook(qkv))
                handles.append(block.ln_2.register_forward_pre_hook(mlp_in))
        if grad:

            def final(module: nn.Module, args: tuple[Any, ...]) -> None:
                store["final"] = args[0]

            handles.append(transformer.ln_f.register_forward_pre_hook(final))
        return store, handles

    runs = {}
    for name, ids in (("corrupt", corrupt), ("clean", clean)):
        store, handles = capture(grad=name == "clean")
        try:
            if name == "corrupt":
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
            else:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        runs[name] = store
    c, x = runs["clean"], runs["corrupt"]
    n_layers = len(blocks)
    wanted = [c["qkv"][i] for i in range(n_layers)] + [c["mlp_in"][i] for i in range(n_layers)]
    grads = torch.autograd.grad(logit_diff(logits, answer, wrong), [*wanted, c["final"]])
    g_qkv, g_mlp, g_final = grads[:n_layers], grads[n_layers:-1], grads[-1]

    with torch.no_grad():
        # upstream differences (corrupt - clean), in forward order: [U, b, p, d]
        diffs = [x["embed"] - c["embed"]]
        for i, block in enumerate(blocks):
            dz = (x["z"][i] - c["z"][i]).unflatten(-1, (n_heads, d_head))
            w_o = block.attn.c_proj.weight.view(n_heads, d_head, d)
            diffs += list(torch.einsum("bphe,hed->hbpd", dz, w_o))
            diffs.append(x["mlp"][i] - c["mlp"][i])
        up = torch.stack(diffs).flatten(1)  # [U, b*p*d]
        out = []
        for i, block in enumerate(blocks):
            n_up = 1 + i * (n_heads + 1)
            # per-head q/k/v input gradients: the norm's vjp of each head's projection grad
            g = g_qkv[i].unflatten(-1, (3, n_heads, d_head))
            w = block.attn.c_attn.weight.view(d, 3, n_heads, d_head)
            g_ln = torch.einsum("bpthe,dthe->bpthd", g, w).flatten(2, 3)  # [b, p, 3H, d]
            g_in = _layer_norm_vjp(block.ln_1, c["ln1"][i], g_ln)  # [b, p, 3H, d]
            # one matrix product per input (an einsum over two axes is far slower on CPU)
            g_in = g_in.permute(2, 0, 1, 3).reshape(3 * n_heads, -1)
            out.append((g_in @ up[:n_up].T).flatten())
            out.append(up[: n_up + n_heads] @ g_mlp[i].flatten())
        out.append(up @ g_final.flatten())
        return torch.cat(out)


# ---------------------------------------------------------------------------------------
# Forward counting and memory


def count_forwards(model: nn.Module, fn: Callable[[], Any]) -> float:
    """Forwards of the model in one call of ``fn``, in batches of ``BATCH`` rows (a forward
    of two stacked batches counts 2)."""
    rows = [0]

    def count(module: nn.Module, args: Any, kwargs: Any) -> None:
        x = args[0] if args else kwargs.get("input_ids")
        rows[0] += int(x.shape[0]) if isinstance(x, torch.Tensor) else BATCH

    handle = model.transformer.register_forward_pre_hook(count, with_kwargs=True)  # type: ignore[union-attr]
    try:
        fn()
    finally:
        handle.remove()
    return rows[0] / BATCH


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_above_start(fn: Callable[[], Any]) -> float:
    """MiB of resident memory at the peak of ``fn()`` above the resident set before it."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    start = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - start) / 1024


# ---------------------------------------------------------------------------------------


def contenders_for(
    model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor, answer: Any, wrong: Any
) -> list[cm.Contender]:
    from interventions.circuits.eap import edge_attribution
    from interventions.recipes import Metric

    metric = Metric.logit_diff(answer, wrong)

    def ours() -> torch.Tensor:
        return torch.tensor(edge_attribution(model, clean, corrupt, metric).scores)

    return [
        cm.Contender("plain forward", lambda: plain_forward(model, clean), "unit", info=True),
        cm.Contender(
            "plain forward + backward",
            lambda: plain_forward_backward(model, clean, answer, wrong),
            "unit",
            info=True,
        ),
        cm.Contender(
            "hooks: hand-written EAP",
            lambda: hand_eap(model, clean, corrupt, answer, wrong),
            "baseline",
        ),
        cm.Contender("interventions: edge_attribution (EAP)", ours, "ours"),
    ]


def memory_child(name: str, quick: bool, seq: int, threads: int) -> None:
    cm.setup(threads)
    model, clean, corrupt, (answer, wrong) = workload(quick, seq)
    c = next(c for c in contenders_for(model, clean, corrupt, answer, wrong) if c.name == name)
    c.fn()  # warm-up: one-time allocations and caches
    peak = peak_above_start(c.fn)
    print(json.dumps({"name": name, "peak_mib": peak}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repeat (< 60 s)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    ap.add_argument("--seq", type=int, default=16, help="prompt length (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 quick)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--profile", action="store_true", help="cProfile one call of edge_attribution")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.quick, args.seq, threads)
        return 0
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    cm.setup(threads)
    started = time.perf_counter()
    from interventions.architectures import describe
    from interventions.circuits.edges import all_edges

    model, clean, corrupt, (answer, wrong) = workload(args.quick, args.seq)
    n_edges = len(all_edges(describe(model)))
    print("edge attribution patching benchmark (issue 11)")
    print(f"  model    {cm.describe_model(model)}")
    print(
        f"  workload EAP over all {n_edges} edges, {BATCH} prompt pairs x {args.seq} tokens, "
        "metric mean logit diff at the last position"
    )
    print(f"  versions {cm.versions()}")
    print(f"  threads  {torch.get_num_threads()}; load average {cm.load_average()}")
    print(f"  rounds   1 check/warm-up round + {repeats} timed rounds, interleaved\n")

    everything = contenders_for(model, clean, corrupt, answer, wrong)
    cm.label(everything)
    unit, unit_fb, base, ours = everything
    reference: dict[str, torch.Tensor] = {}

    def compare(c: cm.Contender, result: Any) -> str:
        if c is base:
            reference["scores"] = result
            return (
                f"reference: {result.numel()} scores, max |score| {float(result.abs().max()):.3g}"
            )
        if c is ours:
            want = reference["scores"]
            tol = 1e-4 * float(want.abs().max())
            torch.testing.assert_close(result, want, atol=tol, rtol=1e-3)
            return f"agrees (max |diff| {cm.max_abs_diff(result, want):.1e}, atol {tol:.1e})"
        return "-"

    print(
        f"check: the package's {n_edges} scores vs the hand-written EAP's "
        "(assert_close, atol 1e-4 x max |score|, rtol 1e-3)"
    )
    cm.check_round(everything, compare)
    passes = {c.name: count_forwards(model, c.fn) for c in everything if c.error is None}
    print()

    if args.profile and ours.error is None:
        for sort in ("tottime", "cumulative"):
            print(f"profile of one call: {ours.name}, top 20 by {sort}")
            print(cm.profile(ours.fn, 20, sort))
            print()

    print(f"timing: {repeats} rounds (the numbers in brackets are the contenders above)")
    cm.timed_rounds(everything, repeats, compare)
    print()

    memory: dict[str, float] = {}
    if not args.no_memory:
        print("peak memory: one child process per contender")
        for c in everything:
            cmd = [sys.executable, __file__, "--memory-child", c.name, "--seq", str(args.seq)]
            cmd += ["--threads", str(threads)] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=cm.ROOT, check=False)
            if out.returncode != 0:
                print(f"  {c.tag} {c.name}: failed: {out.stderr.strip()[-300:]}")
                continue
            memory[c.name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
            print(f"  {c.tag} {c.name:<40} {memory[c.name]:8.1f} MiB above the start")
        print()

    print(
        "wall = median wall-clock s; cpu = median CPU s of this process; ratios are medians "
        "of per-round ratios (wall); passes = forwards of the model in one call, in batches of 8 rows"
    )
    mem_base = memory.get(unit_fb.name)
    rows = []
    for c in everything:
        if not c.times:
            rows.append([c.name, "-", "-", "-", "-", "-", "-", "-", "error: " + (c.error or "?")])
            continue
        mem = memory.get(c.name)
        mem_ratio = mem / mem_base if mem is not None and mem_base else float("nan")
        verdict = ""
        if c is base:
            verdict = "baseline (scores checked against it)"
        elif c is ours:
            r = cm.ratio(c, base)
            ok = r <= TARGET_VS_HAND and passes.get(c.name, 99) <= TARGET_FORWARDS
            verdict = (
                f"{'OK' if ok else 'OVER'} (targets: <= {TARGET_VS_HAND}x hand-written, "
                f"<= {TARGET_FORWARDS} passes)"
            )
            if not c.ok:
                verdict += "; SCORES DIFFER: " + c.check
        rows.append(
            [
                c.name,
                cm.fmt_s(cm.median(c.times)),
                cm.fmt_s(cm.median(c.cpu)),
                f"{passes[c.name]:g}" if c.name in passes else "-",
                cm.fmt_x(cm.ratio(c, unit)),
                cm.fmt_x(cm.ratio(c, unit_fb)),
                cm.fmt_x(cm.ratio(c, base)),
                "-" if mem is None else f"{mem:.0f} ({cm.fmt_x(mem_ratio)})",
                verdict,
            ]
        )
    header = [
        "contender",
        "wall s",
        "cpu s",
        "passes",
        "vs fwd",
        "vs fwd+bwd",
        "vs hand",
        "peak MiB (vs fwd+bwd)",
        "verdict",
    ]
    print(cm.table(rows, header))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
