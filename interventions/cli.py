"""The ``interventions`` command line.

::

    interventions run SPEC.json --model NAME_OR_PATH [--backend torch] [--remote] --out DIR
    interventions validate SPEC.json --model NAME_OR_PATH [--backend torch]
    interventions show SPEC.json
    interventions backends
    interventions patch-sweep --model M --clean ... --corrupt ... --answer ... --out DIR
    interventions logit-lens --model M --prompt ... --out DIR
    interventions steer --model M --prompt ... --layer L --token-direction ID --scale S
    interventions sae-dashboard --model M --sae PATH [--sae-id ID] --features 3 17 \
        (--prompts-file FILE | --prompt ... | --prompt-ids ...) --out DIR

Exit codes scripts can rely on: 0 success; 2 usage error or missing file; 3 malformed
spec; 4 the spec does not fit the model or backend (site, shape, capability); 5 the
backend failed while running; 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_SPEC, EXIT_INVALID, EXIT_RUN = 0, 1, 2, 3, 4, 5


class UsageError(Exception):
    """A usage problem found after argument parsing (exit code 2)."""


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"expected comma-separated token ids, got {text!r}") from None


def _load_graph(path: str) -> Any:
    from interventions.graph import Graph

    if not Path(path).is_file():
        raise UsageError(f"spec file {path!r} does not exist")
    return Graph.load(path)


def _model(name: str) -> tuple[Any, Any]:
    from interventions.execute import load_model

    return load_model(name)


def _tokens(args: argparse.Namespace, which: str, tokenizer: Any) -> Any:
    ids = getattr(args, f"{which}_ids", None)
    text = getattr(args, which, None)
    if (ids is None) == (text is None):
        raise UsageError(f"give exactly one of --{which} TEXT or --{which}-ids IDS")
    if ids is not None:
        return [_ids(x) for x in ids]
    if tokenizer is None:
        raise UsageError(f"--{which} TEXT needs a model with a tokenizer; use --{which}-ids")
    return list(text or [])


def _one_token(value: str | None, tokenizer: Any, what: str) -> int | None:
    if value is None:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    if tokenizer is None:
        raise UsageError(f"--{what} {value!r}: give a token id (the model has no tokenizer)")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UsageError(f"--{what} {value!r} is {len(ids)} tokens; give one token or an id")
    return int(ids[0])


def cmd_run(args: argparse.Namespace) -> int:
    import interventions as iv

    graph = _load_graph(args.spec)
    options: dict[str, Any] = {}
    if args.remote:
        options["remote"] = True
    if args.remote:
        res = iv.run(graph, args.model, backend=args.backend, **options)
    else:
        model, tokenizer = _model(args.model)
        res = iv.run(graph, model, backend=args.backend, tokenizer=tokenizer, **options)
    out = res.save(args.out)
    print(res)
    print(f"wrote {out / 'results.safetensors'} and {out / 'summary.json'}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    import interventions as iv

    graph = _load_graph(args.spec)
    model, tokenizer = _model(args.model)
    plan = iv.validate(graph, model, tokenizer=tokenizer, backend=args.backend)
    print(
        f"ok: {len(graph.runs)} runs, {len(graph.ops)} ops fit {plan.info.class_name} on {args.backend}"
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    print(_load_graph(args.spec))
    return EXIT_OK


def cmd_backends(args: argparse.Namespace) -> int:
    import interventions as iv

    table: dict[str, Any] = {}
    for name, caps in iv.backend_capabilities().items():
        table[name] = caps if isinstance(caps, str) else caps.describe()
    if args.json:
        print(json.dumps(table, indent=2))
        return EXIT_OK
    for name, caps in table.items():
        if isinstance(caps, str):
            print(f"{name}: unavailable ({caps})")
            continue
        flags = [k for k in ("generation", "gradients", "remote", "raw_modules") if caps[k]]
        print(
            f"{name}: ops={','.join(caps['ops'])} sites={','.join(caps['views'])} {' '.join(flags)}"
        )
    return EXIT_OK


def cmd_patch_sweep(args: argparse.Namespace) -> int:
    from interventions.recipes import Metric, activation_patching

    model, tokenizer = _model(args.model)
    clean, corrupt = _tokens(args, "clean", tokenizer), _tokens(args, "corrupt", tokenizer)
    answer = _one_token(args.answer, tokenizer, "answer")
    wrong = _one_token(args.wrong, tokenizer, "wrong")
    if answer is None:
        raise UsageError("--answer TOKEN is required (the token the clean input should predict)")
    metric = Metric.logit_diff(answer, wrong) if wrong is not None else Metric.logit(answer)
    result = activation_patching(
        model,
        clean,
        corrupt,
        metric,
        site=args.site,
        direction=args.direction,
        backend=args.backend,
        tokenizer=tokenizer,
    )
    print(result.table())
    out = Path(args.out)
    labels = None
    if result.site != "head" and tokenizer is not None and isinstance(clean[0], str):
        ids = tokenizer(clean[0])["input_ids"]
        labels = [f"{i}:{tokenizer.decode([t])!r}" for i, t in enumerate(ids)]
    png = result.heatmap(out / "patching.png", col_labels=labels)
    result.graph.save(str(out / "sweep.json"))
    (out / "scores.json").write_text(
        json.dumps(
            {"rows": result.rows, "cols": result.cols, "scores": result.scores.tolist()}, indent=2
        )
    )
    print(f"wrote {png}, {out / 'scores.json'} and {out / 'sweep.json'}")
    return EXIT_OK


def cmd_logit_lens(args: argparse.Namespace) -> int:
    import torch

    from interventions.plots import heatmap
    from interventions.recipes import logit_lens

    model, tokenizer = _model(args.model)
    tokens = _tokens(args, "prompt", tokenizer)
    lens = logit_lens(model, tokens[:1], k=args.k, backend=args.backend, tokenizer=tokenizer)

    def decode(t: int) -> str:
        return repr(tokenizer.decode([t])) if tokenizer is not None else str(t)

    print(lens.table(decode=decode))
    final = lens.top_tokens[-1, :, 0]  # the model's own prediction at each position
    probs = lens.logits[:, 0].softmax(-1)
    grid = torch.stack(
        [probs[layer, torch.arange(len(final)), final] for layer in range(len(probs))]
    )
    png = heatmap(
        grid,
        Path(args.out) / "logit_lens.png",
        row_labels=[f"layer {layer}" for layer in range(len(probs))],
        col_labels=[f"{p}→{decode(int(t))}" for p, t in enumerate(final)],
        title="Logit lens: probability of the final prediction",
        center=None,
        colorbar_label="probability",
    )
    print(f"wrote {png}")
    return EXIT_OK


def cmd_steer(args: argparse.Namespace) -> int:
    import torch

    from interventions.recipes import contrastive_direction, steer

    model, tokenizer = _model(args.model)
    prompt = _tokens(args, "prompt", tokenizer)
    if args.token_direction is not None:
        token = _one_token(args.token_direction, tokenizer, "token-direction")
        direction = model.get_output_embeddings().weight[token].detach().float()
        direction = direction / direction.norm()
    elif args.contrast is not None:
        direction = contrastive_direction(
            model,
            [args.contrast[0]],
            [args.contrast[1]],
            layer=args.layer,
            tokenizer=tokenizer,
            backend=args.backend,
        )
    elif args.direction_file is not None:
        from safetensors.torch import load_file

        tensors = load_file(args.direction_file)
        if len(tensors) != 1:
            raise UsageError(
                f"{args.direction_file} must hold exactly one tensor, has {sorted(tensors)}"
            )
        direction = next(iter(tensors.values())).float()
    else:
        raise UsageError(
            "give a direction: --token-direction, --contrast POS NEG or --direction-file"
        )
    result = steer(
        model,
        prompt[:1],
        direction,
        layer=args.layer,
        scale=args.scale,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        tokenizer=tokenizer,
    )

    def show(ids: torch.Tensor, texts: Sequence[str]) -> str:
        return repr(texts[0]) if texts else str(ids[0].tolist())

    print(f"plain   → {show(result.plain, result.plain_text)}")
    print(f"steered → {show(result.steered, result.steered_text)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interventions", description="Run intervention graphs and recipes on any backend."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
        if model:
            p.add_argument("--model", required=True, help="bundled name, HF hub name or local path")
        p.add_argument("--backend", default="torch", help="torch, nnsight or pyvene")

    p = sub.add_parser("run", help="run a graph; write results.safetensors + summary.json")
    p.add_argument("spec")
    common(p)
    p.add_argument("--remote", action="store_true", help="run on an NDIF host (nnsight)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a graph against a model without running it")
    p.add_argument("spec")
    common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="print a graph, one line per op")
    p.add_argument("spec")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("backends", help="list backends and what they support")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("patch-sweep", help="activation patching heat map (layer x position)")
    common(p)
    for which in ("clean", "corrupt"):
        p.add_argument(f"--{which}", nargs="+", help=f"{which} prompt(s)")
        p.add_argument(f"--{which}-ids", nargs="+", help=f"{which} token ids, comma-separated")
    p.add_argument("--answer", help="the clean answer token (text or id)")
    p.add_argument("--wrong", help="a wrong answer token: the metric becomes a logit difference")
    p.add_argument("--site", default="resid_pre")
    p.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_patch_sweep)

    p = sub.add_parser("logit-lens", help="decode every layer's residual stream")
    common(p)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompt-ids", nargs="+")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_logit_lens)

    p = sub.add_parser("steer", help="generate with and without a steering direction")
    common(p)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompt-ids", nargs="+")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--token-direction", help="steer toward this token's unembedding")
    p.add_argument("--contrast", nargs=2, metavar=("POSITIVE", "NEGATIVE"))
    p.add_argument("--direction-file", help="a safetensors file with one direction tensor")
    p.set_defaults(func=cmd_steer)
    _add_sae_dashboard(sub)
    return parser


# -- sae-dashboard (one block: the parser, the command) ----------------------------------


def _add_sae_dashboard(sub: Any) -> None:
    p = sub.add_parser("sae-dashboard", help="feature dashboard: dashboard.html + neuronpedia.json")
    p.add_argument("--model", required=True, help="bundled name, HF hub name or local path")
    p.add_argument("--backend", default="torch", help="torch, nnsight or pyvene")
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

    model, tokenizer = _model(args.model)
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


def main(argv: Sequence[str] | None = None) -> int:
    from interventions.errors import (
        ExecutionError,
        InterventionError,
        SpecError,
        UnsupportedOp,
        ValidationError,
    )

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"interventions {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as exc:
        print(f"interventions {args.command}: bad spec: {exc}", file=sys.stderr)
        return EXIT_SPEC
    except (ValidationError, UnsupportedOp) as exc:
        print(f"interventions {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ExecutionError as exc:
        print(f"interventions {args.command}: run failed: {exc}", file=sys.stderr)
        return EXIT_RUN
    except InterventionError as exc:
        print(f"interventions {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID if "cannot load model" not in str(exc) else EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
