"""What recipes take as prompts: ids, texts, or prompts of different lengths, and the
model (a name loads it; a remote run needs only its structure).

Any iterable of prompts works too: a ``datasets.Dataset`` column (a list-like of texts or
of lists of ids), a generator, rows that are tensors; it is read once, in order.

>>> as_prompts([[1, 2, 3], [4, 5]], None, "x")
[[1, 2, 3], [4, 5]]
>>> as_prompts([[1, 2], [4, 5]], None, "x").shape
torch.Size([2, 2])
>>> as_prompts((row for row in [[1, 2, 3], [4, 5]]), None, "x")
[[1, 2, 3], [4, 5]]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from interventions.errors import SpecError
from interventions.execute import load_model, load_structure
from interventions.plan import tokenize

Tokens = (
    torch.Tensor
    | Sequence[int]
    | Sequence[Sequence[int]]
    | str
    | Sequence[str]
    | Iterable[str]
    | Iterable[Sequence[int]]
)
Prompts = torch.Tensor | list[list[int]]


def materialize(value: Any, what: str) -> Any:
    """``value`` as a list when it is some other iterable of prompts (a ``datasets``
    column, a generator, a tuple); rows that are tensors become lists of ids. Tensors,
    strings and lists of ids pass through."""
    if isinstance(value, (torch.Tensor, str)):
        return value
    if isinstance(value, list) and not any(isinstance(v, torch.Tensor) for v in value):
        return value
    if not isinstance(value, Iterable):
        raise SpecError(
            f"{what}: expected token ids, texts or an iterable of prompts, got "
            f"{type(value).__name__}"
        )
    rows = list(value)
    if rows and all(isinstance(r, torch.Tensor) and r.ndim <= 1 for r in rows):
        if all(r.ndim == 0 for r in rows):
            return [int(r) for r in rows]
        return [r.tolist() for r in rows]
    return rows


def as_prompts(value: Tokens, tokenizer: Any, what: str) -> Prompts:
    """Token ids ``[batch, seq]``, or one list of ids per prompt when their lengths differ
    (text needs a tokenizer). ``value`` may be any iterable of prompts."""
    value = materialize(value, what)
    if isinstance(value, str) or (
        isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value)
    ):
        from interventions.plan import tokenize_rows
        from interventions.runs import Run

        texts = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
        rows = tokenize_rows(Run(what, text=texts), tokenizer)
    elif (
        isinstance(value, Sequence)
        and value
        and all(isinstance(v, (Sequence, torch.Tensor)) for v in value)
        and len({len(v) for v in value}) > 1  # type: ignore[arg-type]
    ):
        rows = [torch.as_tensor(v, dtype=torch.long).tolist() for v in value]
    else:
        return as_tokens(value, tokenizer, what)
    if len({len(r) for r in rows}) == 1:
        return torch.tensor(rows, dtype=torch.long)
    return rows


def n_prompts(prompts: Prompts) -> int:
    return int(prompts.shape[0]) if isinstance(prompts, torch.Tensor) else len(prompts)


def _lengths(prompts: Prompts) -> list[int]:
    if isinstance(prompts, torch.Tensor):
        return [int(prompts.shape[1])] * int(prompts.shape[0])
    return [len(r) for r in prompts]


def as_tokens(value: Tokens, tokenizer: Any, what: str) -> torch.Tensor:
    """Token ids ``[batch, seq]`` from ids or text (text needs a tokenizer)."""
    value = materialize(value, what)
    if isinstance(value, str) or (
        isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value)
    ):
        from interventions.spec import Run

        texts = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
        return tokenize(Run(what, text=texts), tokenizer)
    ids = torch.as_tensor(value, dtype=torch.long)
    return ids.unsqueeze(0) if ids.ndim == 1 else ids


def _model(
    model: nn.Module | str, tokenizer: Any, run_options: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """The model (a remote run needs only its structure: the host has the weights)."""
    if isinstance(model, str):
        remote = bool((run_options or {}).get("remote"))
        loaded, loaded_tok = load_structure(model) if remote else load_model(model)
        return loaded, tokenizer if tokenizer is not None else loaded_tok
    return model, tokenizer


def as_pairs(clean: Tokens, corrupt: Tokens, tokenizer: Any) -> tuple[Prompts, Prompts]:
    """Clean and corrupted prompts (see :func:`as_prompts`), which pair up one to one
    (their lengths may differ).

    >>> as_pairs([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 7]], None)
    ([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 7]])
    """
    clean_ids = as_prompts(clean, tokenizer, "clean")
    corrupt_ids = as_prompts(corrupt, tokenizer, "corrupt")
    if n_prompts(clean_ids) != n_prompts(corrupt_ids):
        raise SpecError(
            f"clean and corrupted inputs must hold as many prompts, got {n_prompts(clean_ids)} "
            f"and {n_prompts(corrupt_ids)}"
        )
    return clean_ids, corrupt_ids


def check_twins(clean: Prompts, corrupt: Prompts, recipe: str) -> None:
    """Each clean prompt and its corrupted twin have one length (prompts may differ from
    each other): for recipes that patch whole positions from one into the other."""
    for i, (a, b) in enumerate(zip(_lengths(clean), _lengths(corrupt), strict=True)):
        if a != b:
            raise SpecError(
                f"{recipe} patches every position of a corrupted prompt into its clean twin, "
                f"so each pair needs one length: prompt {i} has {a} clean and {b} "
                "corrupted tokens (pairs may differ from each other)"
            )


def prompt_rows(prompts: Prompts) -> list[list[int]]:
    """Each prompt's ids as a list."""
    return prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(r) for r in prompts]
