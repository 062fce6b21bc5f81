"""What every ``interventions`` command shares: exit codes, argument helpers, the model.

Kept apart from :mod:`interventions.cli` so the command modules import it, not each other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_SPEC, EXIT_INVALID, EXIT_RUN, EXIT_OUTPUT = range(7)
# commands whose inputs are all arguments: a bad value there is a usage error (exit 2)
ARGUMENT_COMMANDS = ("patch-sweep", "logit-lens", "steer", "circuit")
DTYPES = ("float32", "float16", "bfloat16")


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


def _model(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from interventions.execute import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = load_model(args.model, dtype=dtype)
    if dtype is not None:
        model = model.to(dtype)  # bundled models load in float32
    if args.device:
        try:
            model = model.to(args.device)
        except (RuntimeError, ValueError, AssertionError) as exc:
            raise UsageError(f"--device {args.device!r}: {exc}") from None
    return model, tokenizer


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {path!r} is a file; give a folder (it is created if missing)")
    return out


def _picture(draw: Any, *args: Any, **kwargs: Any) -> Path | None:
    """Draw a picture; without matplotlib say so and go on (the data is saved already)."""
    from interventions.errors import InterventionError, OutputError

    try:
        return Path(draw(*args, **kwargs))
    except InterventionError as exc:
        if not isinstance(exc.__cause__, ImportError):
            raise
        print(f"note: no picture ({exc})", file=sys.stderr)
        return None
    except OSError as exc:
        raise OutputError(f"cannot write the picture: {exc.strerror or exc}") from None


def _tokens(args: argparse.Namespace, which: str, tokenizer: Any) -> Any:
    ids = getattr(args, f"{which}_ids", None)
    text = getattr(args, which, None)
    if (ids is None) == (text is None):
        raise UsageError(f"give exactly one of --{which} TEXT or --{which}-ids IDS")
    if ids is not None:
        return [_ids(x) for x in ids]
    if tokenizer is None:
        raise UsageError(f"this model has no tokenizer; pass --{which}-ids instead of --{which}")
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
