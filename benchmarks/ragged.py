"""Prompts of different lengths: a read-and-patch workload and a streamed dataset.

1. **Ragged read-and-patch** (issue 10's target): 256 clean/corrupt pairs of 12-19 tokens
   each; the clean run's ``resid_pre[L]`` at each prompt's last token is patched into the
   corrupted run, whose last-token logits are read. Contenders:

   * ``one prompt at a time``: hand-written hooks, one forward per prompt (baseline a);
   * ``hand-padded hooks``: hand-written hooks on right-padded batches with attention
     masks, gathering each row's last real token (baseline b, the usual careful idiom);
   * ``interventions[backend]``: one graph; the planner groups prompts by length.

   Targets: <= 1.1x (b) and >= 3x faster than (a).

2. **Streaming** over N prompts (a mean of ``resid_post[L]`` over every real token):
   ``iv.run(chunk_size=, reduce=)`` against a hand-written batched loop (padded batches,
   a masked running sum) in two forms: the usual one, whose forward runs to the logits,
   and the best one, whose hook raises once it has the read, so layers after ``L`` are
   not computed (the torch and nnsight backends do that once a forward's runs are done).
   Target: >= 0.9x the throughput, peak memory flat in N (each N measured in a fresh
   process; printed for N = 500, 2000, 5000).

Every contender's numbers are checked against the baseline's before timing.

    .venv/bin/python benchmarks/ragged.py [--quick] [--repeats 3] [--skip-stream | --only-stream]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch
from _common import (  # type: ignore[import-not-found]
    ROOT,
    Contender,
    build_gpt2,
    check_round,
    fmt_s,
    fmt_x,
    label,
    max_abs_diff,
    median,
    ratio,
    setup,
    table,
    timed_rounds,
)

import interventions as iv

LAYER = 3


def pairs(n: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = [], []
    for _ in range(n):
        k = int(torch.randint(12, 20, (1,), generator=g))
        row = torch.randint(0, vocab, (k,), generator=g)
        other = row.clone()
        other[-3] = (other[-3] + 1) % vocab
        clean.append(row.tolist())
        corrupt.append(other.tolist())
    return clean, corrupt


def blocks(model: Any) -> Any:
    return model.transformer.h


def one_at_a_time(model: Any, clean: list[list[int]], corrupt: list[list[int]]) -> torch.Tensor:
    out = []
    block = blocks(model)[LAYER]
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for a, b in zip(clean, corrupt, strict=True):

            def grab(_m: Any, args: Any) -> None:
                saved["h"] = args[0][:, -1].clone()

            handle = block.register_forward_pre_hook(grab)
            try:
                model(torch.tensor([a]))
            finally:
                handle.remove()

            def put(_m: Any, args: Any) -> Any:
                x = args[0].clone()
                x[:, -1] = saved["h"]
                return (x, *args[1:])

            handle = block.register_forward_pre_hook(put)
            try:
                logits = model(torch.tensor([b]), logits_to_keep=1).logits[:, -1]
            finally:
                handle.remove()
            out.append(logits)
    return torch.cat(out)


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return ids, mask, lengths - 1


def hand_padded(
    model: Any, clean: list[list[int]], corrupt: list[list[int]], batch: int = 64
) -> torch.Tensor:
    out = []
    block = blocks(model)[LAYER]
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(clean), batch):
            ci, cm, cl = padded(clean[start : start + batch])
            ki, km, kl = padded(corrupt[start : start + batch])
            rows = torch.arange(ci.shape[0])

            def grab(_m: Any, args: Any, rows: Any = rows, last: Any = cl) -> None:
                saved["h"] = args[0][rows, last].clone()

            handle = block.register_forward_pre_hook(grab)
            try:
                model(ci, attention_mask=cm)
            finally:
                handle.remove()

            def put(_m: Any, args: Any, rows: Any = rows, last: Any = kl) -> Any:
                x = args[0].clone()
                x[rows, last] = saved["h"]
                return (x, *args[1:])

            handle = block.register_forward_pre_hook(put)
            try:
                logits = model(ki, attention_mask=km).logits
            finally:
                handle.remove()
            out.append(logits[rows, kl])
    return torch.cat(out)


def ours(
    model: Any, clean: list[list[int]], corrupt: list[list[int]], backend: str
) -> torch.Tensor:
    g = iv.Graph()
    a = g.run("clean", tokens=clean)
    b = g.run("corrupt", tokens=corrupt)
    b.patch("resid_pre", layer=LAYER, pos=-1, value=a.read("resid_pre", layer=LAYER, pos=-1))
    b.read("logits", pos=-1, name="end")
    return iv.run(g, model, backend=backend)["end"]


STREAM = """
import json, resource, sys, time
sys.path.insert(0, {bench!r})
import torch
from _common import build_gpt2, setup
import interventions as iv
mode, n, quick = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
setup(threads=2)
model = build_gpt2(quick)
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(1)
rows = [torch.randint(0, vocab, (int(torch.randint(12, 33, (1,), generator=g)),),
        generator=g).tolist() for _ in range(n)]
layer = {layer}
class Stop(Exception):
    pass
start = time.perf_counter()
if mode == "ours":
    graph = iv.Graph()
    graph.run("data", tokens=rows).read("resid_post", layer=layer, name="acts")
    mean = iv.run(graph, model, chunk_size=64, reduce={{"acts": "token_mean"}})["acts"]
else:
    total, count = 0.0, 0
    block = model.transformer.h[layer]
    order = sorted(range(n), key=lambda i: len(rows[i]))
    with torch.no_grad():
        for s in range(0, n, 64):
            chunk = [rows[i] for i in order[s : s + 64]]
            lengths = torch.tensor([len(r) for r in chunk])
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, : len(r)] = torch.tensor(r)
            mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
            seen = {{}}

            def keep(m, a, o):
                seen["x"] = o[0] if isinstance(o, tuple) else o
                if mode == "hand_stop":
                    raise Stop  # the rest of the forward changes nothing read

            h = block.register_forward_hook(keep)
            try:
                model(ids, attention_mask=mask.long(), logits_to_keep=1)
            except Stop:
                pass
            finally:
                h.remove()
            total = total + (seen["x"] * mask[..., None]).sum((0, 1))
            count += int(mask.sum())
    mean = total / count
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_mib": peak / 1024, "mean": mean[:8].tolist()}}))
"""


def stream(mode: str, n: int, quick: bool) -> dict[str, Any]:
    code = STREAM.format(bench=str(ROOT / "benchmarks"), layer=1 if quick else LAYER)
    out = subprocess.run(
        [sys.executable, "-c", code, mode, str(n), "1" if quick else "0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, fewer prompts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--only-stream", action="store_true")
    args = parser.parse_args()
    setup(threads=2)
    global LAYER
    if args.quick:
        LAYER = 1
    if args.only_stream:
        streaming(args.quick)
        return
    model = build_gpt2(args.quick)
    n = 64 if args.quick else 256
    clean, corrupt = pairs(n, model.config.vocab_size)
    base_a = Contender("one prompt at a time (hooks)", lambda: one_at_a_time(model, clean, corrupt))
    base_b = Contender("hand-padded hooks + masks", lambda: hand_padded(model, clean, corrupt))
    contenders = [base_a, base_b] + [
        Contender(f"interventions[{b}]", lambda b=b: ours(model, clean, corrupt, b))
        for b in ("torch", "nnsight", "pyvene")
    ]
    label(contenders)
    want = one_at_a_time(model, clean, corrupt)

    def compare(c: Contender, got: torch.Tensor) -> str:
        diff = max_abs_diff(got, want)
        if diff > 1e-3:
            raise AssertionError(f"max |diff| {diff:.2e} against one prompt at a time")
        return f"agrees (max |diff| {diff:.1e})"

    print(f"ragged read-and-patch: {n} pairs of 12-19 tokens, resid_pre[{LAYER}] at pos=-1")
    check_round(contenders, compare)
    timed_rounds(contenders, args.repeats, compare)
    rows = []
    for c in contenders:
        if c.error or not c.times:
            rows.append([c.name, "-", "-", "-", c.error or ""])
            continue
        rows.append(
            [
                c.name,
                fmt_s(median(c.times)),
                fmt_x(ratio(c, base_b)),
                fmt_x(ratio(base_a, c)),
                c.check,
            ]
        )
    print(table(rows, ["contender", "median", "vs hand-padded (b)", "speed-up over (a)", "check"]))
    if not args.skip_stream:
        streaming(args.quick)


def streaming(quick: bool) -> None:
    print("\nstreaming a token mean of resid_post (chunks of 64), each N in a fresh process")
    srows = []
    sizes = (200, 500, 1000) if quick else (500, 2000, 5000)
    for size in sizes:
        mine, hand = stream("ours", size, quick), stream("hand", size, quick)
        best = stream("hand_stop", size, quick)
        diff = max(
            abs(x - y) for o in (hand, best) for x, y in zip(mine["mean"], o["mean"], strict=True)
        )
        srows.append(
            [
                str(size),
                fmt_s(hand["seconds"]),
                fmt_s(best["seconds"]),
                fmt_s(mine["seconds"]),
                fmt_x(hand["seconds"] / mine["seconds"]),
                fmt_x(best["seconds"] / mine["seconds"]),
                f"{hand['peak_mib']:.0f} / {best['peak_mib']:.0f} MiB",
                f"{mine['peak_mib']:.0f} MiB",
                f"{diff:.1e}",
            ]
        )
    print(
        table(
            srows,
            [
                "N",
                "hand loop",
                "hand, stops early",
                "interventions",
                "throughput vs hand",
                "vs hand stopping",
                "peak (hand / stopping)",
                "peak (ours)",
                "max |diff|",
            ],
        )
    )


if __name__ == "__main__":
    main()
