"""The diagnostic commands: input attribution, tuned lens, probes and SAE dashboards.

Each is a thin layer over its recipe; :func:`add_tool_parsers` adds their subcommands to
the ``interventions`` parser (:mod:`interventions.cli`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from interventions.cli_circuit import add_circuit_parser
from interventions.cli_common import (
    EXIT_OK,
    UsageError,
    _model,
    _one_token,
    _out_dir,
    _picture,
    _tokens,
)


def add_tool_parsers(sub: Any, common: Any) -> None:
    """The subcommands of this module, on the parser's ``sub`` (with ``common`` options)."""
    _add_diagnostics(sub, common)
    _add_sae_dashboard(sub, common)
    add_circuit_parser(sub, common)


def _lines(path: str) -> list[str]:
    if not Path(path).is_file():
        raise UsageError(f"file {path!r} does not exist")
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def cmd_attribute(args: argparse.Namespace) -> int:
    from interventions.recipes import Metric, input_attribution

    model, tokenizer = _model(args)
    prompt = _tokens(args, "prompt", tokenizer)
    answer = _one_token(args.answer, tokenizer, "answer")
    wrong = _one_token(args.wrong, tokenizer, "wrong")
    assert answer is not None  # --answer is required
    metric = Metric.logit(answer) if wrong is None else Metric.logit_diff(answer, wrong)
    result = input_attribution(
        model,
        prompt,
        metric,
        method=args.method,
        steps=args.steps,
        backend=args.backend,
        tokenizer=tokenizer,
    )
    decode = (lambda t: tokenizer.decode([t])) if tokenizer is not None else None
    for i in range(len(result.tokens)):
        print(f"prompt {i} ({args.method}):")
        print(result.text(i, decode))
        if result.baseline_values is not None:
            print(f"completeness error: {float(result.completeness_error[i]):.2e}")
    if args.out:
        from interventions.tensorfile import write_atomic

        out = _out_dir(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {  # the data first, then the picture
            "method": result.method,
            "prompts": [
                {
                    "tokens": list(result.tokens[i]),
                    "scores": result.scores[i].tolist(),
                    "metric": float(result.metric_values[i]),
                    **(
                        {"completeness_error": float(result.completeness_error[i])}
                        if result.baseline_values is not None
                        else {}
                    ),
                }
                for i in range(len(result.tokens))
            ],
        }
        write_atomic(out / "attribution.json", json.dumps(data, indent=2).encode())
        png = _picture(result.plot, out / "attribution.png", 0, decode)
        wrote = [str(p) for p in (png, out / "attribution.json") if p is not None]
        print(f"wrote {', '.join(wrote)}")
    return EXIT_OK


def cmd_tuned_lens(args: argparse.Namespace) -> int:
    from interventions.recipes import TunedLens, lens_kl, train_tuned_lens

    model, tokenizer = _model(args)
    evaluate = _lines(args.prompts)
    if args.load:
        lens = TunedLens.load(args.load)
    else:
        if not args.train_prompts:
            raise UsageError("give --train-prompts FILE to train, or --load LENS.safetensors")
        lens = train_tuned_lens(
            model,
            _lines(args.train_prompts),
            steps=args.steps,
            backend=args.backend,
            tokenizer=tokenizer,
        )
    table = lens_kl(model, evaluate, lens, backend=args.backend, tokenizer=tokenizer)
    print(table.table())
    from interventions.tensorfile import write_atomic

    out = _out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = lens.save(out / "tuned_lens.safetensors")
    (out / "kl.txt").write_text(table.table() + "\n")  # the data first, then the picture
    kl = {"n_tokens": table.n_tokens, "layers": table.rows()}
    write_atomic(out / "kl.json", json.dumps(kl, indent=2).encode())
    png = _picture(table.plot, out / "lens_kl.png")
    wrote = [str(p) for p in (saved, png, out / "kl.txt", out / "kl.json") if p is not None]
    print(f"wrote {', '.join(wrote)}")
    return EXIT_OK


def cmd_probe(args: argparse.Namespace) -> int:
    from interventions.recipes import probe_sweep

    model, tokenizer = _model(args)
    prompts = _lines(args.prompts)
    try:
        labels = [float(v) if args.kind == "ridge" else int(v) for v in _lines(args.labels)]
    except ValueError:
        raise UsageError(f"{args.labels}: one number per line expected") from None
    sweep = probe_sweep(
        model,
        prompts,
        labels,
        site=args.site,
        layers=args.layers,
        kind=args.kind,
        control=args.control,
        backend=args.backend,
        tokenizer=tokenizer,
    )
    print(sweep.table())
    if args.out:
        from interventions.tensorfile import write_atomic

        out = _out_dir(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "probe_sweep.json", json.dumps(sweep.rows(), indent=2).encode())
        png = _picture(sweep.plot, out / "probe_sweep.png")
        wrote = [str(p) for p in (png, out / "probe_sweep.json") if p is not None]
        print(f"wrote {', '.join(wrote)}")
    return EXIT_OK


def _add_diagnostics(sub: Any, common: Any) -> None:
    p = sub.add_parser("attribute", help="input attribution of a metric to the prompt tokens")
    common(p)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompt-ids", nargs="+")
    p.add_argument("--answer", required=True, help="the answer token (text or id)")
    p.add_argument("--wrong", help="a wrong token: the metric becomes a logit difference")
    p.add_argument(
        "--method",
        default="integrated_gradients",
        choices=["saliency", "input_x_gradient", "integrated_gradients"],
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("tuned-lens", help="train/load a tuned lens; KL table vs the logit lens")
    common(p)
    p.add_argument("--train-prompts", help="a text file, one prompt a line")
    p.add_argument("--load", help="translators saved earlier (safetensors)")
    p.add_argument("--prompts", required=True, help="held-out prompts, one a line")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tuned_lens)

    p = sub.add_parser("probe", help="a linear probe per layer, with a control")
    common(p)
    p.add_argument("--prompts", required=True, help="a text file, one prompt a line")
    p.add_argument("--labels", required=True, help="a text file, one label a line")
    p.add_argument("--site", default="resid_post")
    p.add_argument("--layers", type=int, nargs="+")
    p.add_argument("--kind", default="logistic", choices=["logistic", "ridge"])
    p.add_argument(
        "--control",
        default="shuffle",
        choices=["shuffle", "task", "none"],
        help="shuffled labels, or a control task (a random label per token at the position)",
    )
    p.add_argument("--out")
    p.set_defaults(func=cmd_probe)


def _add_sae_dashboard(sub: Any, common: Any) -> None:
    p = sub.add_parser("sae-dashboard", help="feature dashboard: dashboard.html + neuronpedia.json")
    common(p)
    p.add_argument("--sae", required=True, help="an SAE directory or .safetensors, or a release")
    p.add_argument("--sae-id", help="the SAE's id within the release given as --sae")
    p.add_argument("--features", type=int, nargs="+", required=True)
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompt-ids", nargs="+")
    p.add_argument("--site", help="the site (default: the SAE's own)")
    p.add_argument("--layer", type=int)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--exclude-bos", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sae_dashboard)


def cmd_sae_dashboard(args: argparse.Namespace) -> int:
    from interventions.sae.dashboard import harvest_features
    from interventions.sae.hub import load_sae

    model, tokenizer = _model(args)
    if args.prompts_file is not None:
        if args.prompt or args.prompt_ids:
            raise UsageError("give one of --prompts-file, --prompt or --prompt-ids")
        if not Path(args.prompts_file).is_file():
            raise UsageError(f"prompts file {args.prompts_file!r} does not exist")
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts: Any = [line for line in lines if line.strip()]
        if tokenizer is None:
            raise UsageError("--prompts-file needs a model with a tokenizer; use --prompt-ids")
    else:
        prompts = _tokens(args, "prompt", tokenizer)
    if args.sae_id is not None:
        sae = load_sae(release=args.sae, sae_id=args.sae_id)
    else:
        if not Path(args.sae).exists():
            raise UsageError(f"SAE {args.sae!r} does not exist; for a release add --sae-id")
        sae = load_sae(args.sae)
    dash = harvest_features(
        model,
        sae,
        prompts,
        args.features,
        site=args.site,
        layer=args.layer,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        top_k=args.top_k,
        context=args.context,
        exclude_bos=args.exclude_bos,
        backend=args.backend,
    )
    html_path, json_path = dash.save(args.out)
    print(f"wrote {html_path} and {json_path} ({dash.n_prompts} prompts, {dash.n_tokens} tokens)")
    return EXIT_OK
