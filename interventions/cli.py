"""The ``interventions`` command line.

::

    interventions run SPEC.json --model NAME_OR_PATH [--backend torch] [--remote] --out DIR
    interventions validate SPEC.json --model NAME_OR_PATH [--backend torch]
    interventions show SPEC.json
    interventions backends
    interventions patch-sweep --model M --clean ... --corrupt ... --answer ... --out DIR
    interventions logit-lens --model M --prompt ... --out DIR
    interventions steer --model M --prompt ... --layer L --token-direction ID --scale S
    interventions attribute --model M --prompt ... --answer TOK [--method ...] [--out DIR]
    interventions tuned-lens --model M --train-prompts FILE --prompts FILE --out DIR
    interventions probe --model M --prompts FILE --labels FILE [--layers ...] --out DIR
    interventions sae-dashboard --model M --sae PATH [--sae-id ID] --features 3 17 \
        (--prompts-file FILE | --prompt ... | --prompt-ids ...) --out DIR

Exit codes scripts can rely on: 0 success; 2 usage error (a bad argument, a missing
file, ``--out`` naming a file); 3 malformed spec; 4 the spec does not fit the model or
backend (site, shape, capability); 5 the backend failed while running; 6 an output could
not be written (disk full, permissions; nothing half-written is left); 1 anything else.

``--help`` and ``--version`` do not import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from interventions.cli_common import (
    ARGUMENT_COMMANDS,
    DTYPES,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_RUN,
    EXIT_SPEC,
    EXIT_USAGE,
    UsageError,
    _load_graph,
    _model,
    _one_token,
    _out_dir,
    _picture,
    _tokens,
)
from interventions.cli_tools import add_tool_parsers


def cmd_run(args: argparse.Namespace) -> int:
    import interventions as iv

    graph = _load_graph(args.spec)
    out_dir = _out_dir(args.out)
    options: dict[str, Any] = {}
    if args.remote:
        options["remote"] = True
    if args.remote:
        res = iv.run(graph, args.model, backend=args.backend, **options)
    else:
        model, tokenizer = _model(args)
        res = iv.run(graph, model, backend=args.backend, tokenizer=tokenizer, **options)
    out = res.save(out_dir)
    print(res)
    print(f"wrote {out / 'results.safetensors'} and {out / 'summary.json'}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    import interventions as iv

    graph = _load_graph(args.spec)
    model, tokenizer = _model(args)
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
    from interventions.sites import STANDARD_SITES

    print(f"standard sites: {', '.join(STANDARD_SITES)} (layered ones take a layer)")
    print("raw sites: any module path + '.output' or '.input', e.g. 'transformer.h.0.mlp.output'")
    for name, caps in table.items():
        if isinstance(caps, str):
            print(f"{name}: unavailable ({caps})")
            continue
        flags = [k for k in ("generation", "gradients", "remote", "raw_modules") if caps[k]]
        print(
            f"{name}: ops={','.join(caps['ops'])} views={','.join(caps['views'])} {' '.join(flags)}"
        )
    return EXIT_OK


def cmd_patch_sweep(args: argparse.Namespace) -> int:
    from interventions.recipes import Metric, activation_patching

    out = _out_dir(args.out)
    model, tokenizer = _model(args)
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
    from interventions.tensorfile import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    result.graph.save(str(out / "sweep.json"))  # the data first, then the picture
    scores = {"rows": result.rows, "cols": result.cols, "scores": result.scores.tolist()}
    write_atomic(out / "scores.json", json.dumps(scores, indent=2).encode())
    labels = None
    if result.site != "head" and tokenizer is not None and isinstance(clean[0], str):
        ids = tokenizer(clean[0])["input_ids"]
        labels = [f"{i}:{tokenizer.decode([t])!r}" for i, t in enumerate(ids)]
    png = _picture(result.heatmap, out / "patching.png", col_labels=labels)
    wrote = [str(p) for p in (png, out / "scores.json", out / "sweep.json") if p is not None]
    print(f"wrote {', '.join(wrote)}")
    return EXIT_OK


def cmd_logit_lens(args: argparse.Namespace) -> int:
    import torch

    from interventions.plots import heatmap
    from interventions.recipes import logit_lens

    out = _out_dir(args.out)
    model, tokenizer = _model(args)
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
    png = _picture(
        heatmap,
        grid,
        out / "logit_lens.png",
        row_labels=[f"layer {layer}" for layer in range(len(probs))],
        col_labels=[f"{p}→{decode(int(t))}" for p, t in enumerate(final)],
        title="Logit lens: probability of the final prediction",
        center=None,
        colorbar_label="probability",
    )
    if png is not None:
        print(f"wrote {png}")
    return EXIT_OK


def cmd_steer(args: argparse.Namespace) -> int:
    import torch

    from interventions.recipes import contrastive_direction, steer

    model, tokenizer = _model(args)
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
    print(
        _effect(
            model,
            prompt[:1],
            direction,
            args,
            tokenizer,
            changed=not torch.equal(result.plain, result.steered),
        )
    )
    return EXIT_OK


def _effect(
    model: Any,
    prompt: Any,
    direction: Any,
    args: argparse.Namespace,
    tokenizer: Any,
    *,
    changed: bool,
) -> str:
    """How large the steering was next to the residual stream it was added to."""
    import interventions as iv
    from interventions.recipes.inputs import as_tokens

    probe = iv.Graph()
    probe.run("p", tokens=as_tokens(prompt, tokenizer, "prompt")).read(
        "resid_post", args.layer, name="r"
    )
    norm = float(iv.run(probe, model, backend="torch")["r"].norm(dim=-1).mean())
    unit = float(direction.norm())
    added = abs(args.scale) * unit
    text = (
        f"effect: added a vector of norm {added:.3g} at resid_post[{args.layer}], whose mean "
        f"norm is {norm:.3g} ({added / norm if norm else float('inf'):.2g}x)"
    )
    if not changed and unit > 0:
        text += f"; the output did not change: try --scale {4 * norm / unit:.3g} (4x the norm)"
    return text


# --- diagnostic tools: input attribution, tuned lens, probes (issue 16) -----------------


def build_parser() -> argparse.ArgumentParser:
    from interventions._version import __version__

    parser = argparse.ArgumentParser(
        prog="interventions", description="Run intervention graphs and recipes on any backend."
    )
    parser.add_argument("--version", action="version", version=f"interventions {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
        if model:
            p.add_argument("--model", required=True, help="bundled name, HF hub name or local path")
        p.add_argument("--backend", default="torch", help="torch, nnsight or pyvene")
        if model:
            p.add_argument("--device", help="put the model here first, e.g. cuda, cuda:1, mps")
            p.add_argument("--dtype", choices=DTYPES, help="cast the model to this dtype first")

    p = sub.add_parser("run", help="run a graph; write results.safetensors + summary.json")
    p.add_argument("spec")
    common(p)
    p.add_argument("--remote", action="store_true", help="run on an NDIF host (nnsight)")
    p.add_argument("--out", required=True, help="folder for the results (created if missing)")
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
    p.add_argument(
        "--site",
        default="resid_pre",
        help="standard site to patch at every layer and position (resid_pre, resid_post, "
        "attn_out, mlp_out, or head for layer x head); see `interventions backends`",
    )
    p.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_patch_sweep)

    p = sub.add_parser("logit-lens", help="decode every layer's residual stream")
    common(p)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompt-ids", nargs="+")
    p.add_argument("--k", type=int, default=3, help="how many top tokens to show per layer")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_logit_lens)

    p = sub.add_parser("steer", help="generate with and without a steering direction")
    common(p)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--prompt-ids", nargs="+")
    p.add_argument("--layer", type=int, required=True, help="steer resid_post of this layer")
    p.add_argument(
        "--scale",
        type=float,
        default=4.0,
        help="multiplies the direction (unit length for --token-direction) added at every "
        "position; the effect size next to the residual norm is printed",
    )
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--token-direction", help="steer toward this token's unembedding")
    p.add_argument("--contrast", nargs=2, metavar=("POSITIVE", "NEGATIVE"))
    p.add_argument("--direction-file", help="a safetensors file with one direction tensor")
    p.set_defaults(func=cmd_steer)
    add_tool_parsers(sub, common)
    return parser


# -- sae-dashboard (one block: the parser, the command) ----------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from interventions.errors import (
        ExecutionError,
        InterventionError,
        OutputError,
        SpecError,
        UnsupportedOp,
        ValidationError,
    )

    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"interventions {args.command}"
    arguments = args.command in ARGUMENT_COMMANDS
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SpecError, ValidationError, UnsupportedOp) as exc:
        if arguments:  # no spec file: the arguments built the graph
            print(f"{command}: bad argument: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, SpecError):
            print(f"{command}: bad spec: {exc}", file=sys.stderr)
            return EXIT_SPEC
        print(f"{command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except ExecutionError as exc:
        print(f"{command}: run failed: {exc}", file=sys.stderr)
        return EXIT_RUN
    except OutputError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except InterventionError as exc:
        print(f"{command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INVALID if "cannot load model" not in str(exc) else EXIT_USAGE
    except OSError as exc:  # a file given on the command line cannot be read or written
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_OUTPUT


if __name__ == "__main__":
    raise SystemExit(main())
