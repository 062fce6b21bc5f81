"""``interventions circuit``: find a circuit (EAP, EAP-IG or ACDC) and write
``circuit.json`` (the data first) and ``circuit.png`` (the picture, when matplotlib is
there). Inputs are a bundled task (``--task induction|ioi``) or token ids with an answer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from interventions.cli_common import (
    EXIT_OK,
    UsageError,
    _ids,
    _model,
    _one_token,
    _out_dir,
    _picture,
)

METHODS = ("eap", "eap-ig", "acdc")


def add_circuit_parser(sub: Any, common: Any) -> None:
    p = sub.add_parser("circuit", help="find a circuit (eap, eap-ig, acdc); circuit.json + .png")
    common(p)
    p.add_argument("--method", default="acdc", choices=METHODS)
    p.add_argument("--task", choices=["induction", "ioi"], help="a reference model's own task")
    p.add_argument("--prompts", type=int, default=16, help="prompts of --task (default 16)")
    p.add_argument("--seed", type=int, default=0, help="the seed drawing --task's prompts")
    p.add_argument("--clean-ids", nargs="+", help="clean prompts: comma-separated token ids")
    p.add_argument("--corrupt-ids", nargs="+", help="corrupt prompts, paired with the clean")
    p.add_argument("--answer", help="the clean answer token (text or id), for --clean-ids")
    p.add_argument("--wrong", help="a wrong answer token: the metric becomes a logit difference")
    p.add_argument("--kl", action="store_true", help="acdc: prune by KL to the clean run")
    p.add_argument("--threshold", type=float, default=1.0, help="acdc threshold (default 1.0)")
    p.add_argument(
        "--guide",
        choices=["eap_ig"],
        default=None,
        help="acdc: guess which edges stay from EAP-IG scores (fewer passes, same circuit)",
    )
    p.add_argument(
        "--ablation",
        default="resample",
        choices=["resample", "mean", "zero"],
        help="how edges outside the circuit are removed (default: resample from corrupt)",
    )
    p.add_argument("--steps", type=int, default=8, help="eap-ig integration steps")
    p.add_argument("--top-k", type=int, default=20, help="eap, eap-ig: keep the top-k edges")
    p.add_argument("--out", required=True, help="folder for circuit.json and circuit.png")
    p.set_defaults(func=cmd_circuit)


def _inputs(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any, Any]:
    import torch

    from interventions.circuits.tasks import task_data
    from interventions.recipes import Metric

    if args.task is not None:
        if args.clean_ids or args.corrupt_ids or args.answer:
            raise UsageError("give --task, or --clean-ids/--corrupt-ids/--answer, not both")
        return task_data(args.task, n=args.prompts, seed=args.seed)
    if not (args.clean_ids and args.corrupt_ids and args.answer):
        raise UsageError("give --task NAME, or --clean-ids, --corrupt-ids and --answer")
    clean, corrupt = ([_ids(x) for x in v] for v in (args.clean_ids, args.corrupt_ids))
    if len({len(r) for r in clean + corrupt}) != 1 or len(clean) != len(corrupt):
        raise UsageError("--clean-ids and --corrupt-ids: as many prompts, all of one length")
    answer = _one_token(args.answer, tokenizer, "answer")
    wrong = _one_token(args.wrong, tokenizer, "wrong")
    assert answer is not None
    metric = Metric.logit(answer) if wrong is None else Metric.logit_diff(answer, wrong)
    return torch.tensor(clean), torch.tensor(corrupt), metric


def cmd_circuit(args: argparse.Namespace) -> int:
    from interventions.circuits.acdc import acdc
    from interventions.circuits.eap import edge_attribution
    from interventions.circuits.evaluate import score_circuit
    from interventions.recipes import Metric

    out = _out_dir(args.out)
    if args.threshold < 0 or args.top_k < 0 or args.steps < 1 or args.prompts < 1:
        raise UsageError("--threshold and --top-k must be >= 0, --steps and --prompts >= 1")
    model, tokenizer = _model(args)
    clean, corrupt, metric = _inputs(args, tokenizer)
    if args.method == "acdc":
        circuit = acdc(
            model,
            clean,
            corrupt,
            Metric.kl() if args.kl else metric,
            threshold=args.threshold,
            ablation=args.ablation,
            guide=args.guide,
            backend=args.backend,
        )
    else:
        steps = args.steps if args.method == "eap-ig" else None
        scored = edge_attribution(model, clean, corrupt, metric, steps=steps, backend=args.backend)
        circuit = scored.top(args.top_k)
    scores = score_circuit(model, circuit, clean, corrupt, metric, ablation=args.ablation)
    print(circuit)
    print(
        f"faithfulness {scores.faithfulness:.3f}, completeness {scores.completeness:.3f} "
        f"({args.ablation} ablation; metric clean {scores.clean:.3f}, circuit "
        f"{scores.circuit:.3f}, empty {scores.empty:.3f})"
    )
    out.mkdir(parents=True, exist_ok=True)
    wrote = [str(circuit.save(out / "circuit.json"))]  # the data first, then the picture
    png = _picture(circuit.draw, Path(out) / "circuit.png")
    if png is not None:
        wrote.append(str(png))
    print("wrote " + ", ".join(wrote))
    return EXIT_OK
