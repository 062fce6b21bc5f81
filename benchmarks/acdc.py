"""ACDC on the induction reference model: speculatively batched passes against the
one-edge-per-forward loop (``batch_size=1``: Conmy et al.'s loop, one candidate run per
graph), measured in the same process, interleaved, medians over rounds.

Both give the same circuit (checked before timing: the same edges, scores within 1e-4).
Reported: passes (graphs run; the planner makes each one forward pass of the candidates
and one of the corrupt run), candidate runs (forward-equivalents of the prompts), wall
time, the median per-round wall ratio against the loop, and the circuit's faithfulness.
Target (issue 11): >= 5x faster than the loop.

    .venv/bin/python benchmarks/acdc.py [--repeats 3] [--prompts 16 4] [--batch-sizes 8 32]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import (  # type: ignore[import-not-found]
    Contender,
    check_round,
    fmt_s,
    fmt_x,
    label,
    load_average,
    median,
    ratio,
    setup,
    table,
    timed_rounds,
    versions,
)

from interventions.circuits.acdc import acdc
from interventions.circuits.circuit import Circuit
from interventions.circuits.evaluate import score_circuit
from interventions.circuits.tasks import task_data
from interventions.reference_models.induction import load_induction_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup(args.threads)
    print(versions())
    print(f"load average {load_average()}; {args.threads} thread(s)")
    model = load_induction_model()
    for n in args.prompts:
        bench(model, n, args)


def bench(model: Any, n: int, args: argparse.Namespace) -> None:
    clean, corrupt, metric = task_data("induction", n=n, seed=0)

    def make(bs: int) -> Any:
        return lambda: acdc(model, clean, corrupt, metric, threshold=args.threshold, batch_size=bs)

    loop = Contender("one edge per forward (batch_size=1)", make(1))
    contenders = [loop] + [
        Contender(f"batched (batch_size={b})", make(b)) for b in args.batch_sizes
    ]
    label(contenders)
    want: dict[str, Circuit] = {}

    def compare(c: Contender, got: Circuit) -> str:
        want.setdefault("c", got)
        ref = want["c"]
        if got.edges != ref.edges:
            raise AssertionError(f"{len(got.edges)} edges against {len(ref.edges)}")
        diff = max((abs(a - b) for a, b in zip(got.scores, ref.scores, strict=True)), default=0)
        if diff > 1e-4:
            raise AssertionError(f"scores differ by {diff:.2e}")
        found[c.name] = got
        return f"same {len(got.edges)} edges"

    found: dict[str, Circuit] = {}
    print(f"\n{n} prompts x {clean.shape[1]} positions, threshold {args.threshold}:")
    check_round(contenders, compare)
    timed_rounds(contenders, args.repeats, compare)
    rows = []
    base_passes = found[loop.name].stat("passes")
    for c in contenders:
        circ = found[c.name]
        rows.append(
            [
                c.name,
                f"{circ.stat('passes'):.0f}",
                fmt_x(base_passes / circ.stat("passes")),
                f"{circ.stat('runs'):.0f}",
                fmt_s(median(c.times)),
                fmt_x(1 / ratio(c, loop)) if c is not loop else "1.00x",
                fmt_x(1 / ratio(c, loop, cpu=True)) if c is not loop else "1.00x",
                c.check,
            ]
        )
    print(
        table(
            rows,
            [
                "contender",
                "passes",
                "fewer passes",
                "runs",
                "wall s",
                "speed-up",
                "cpu speed-up",
                "check",
            ],
        )
    )
    circ = found[loop.name]
    s = score_circuit(model, circ, clean, corrupt, metric)
    print(
        f"circuit: {len(circ.edges)} of 110 edges, faithfulness {s.faithfulness:.3f}, "
        f"completeness {s.completeness:.3f}"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
