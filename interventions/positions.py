"""Where a word or a token sits in each prompt: per-prompt positions for selectors.

Text runs are tokenized with ``add_special_tokens=True`` (a BOS token counts as a
position); these helpers tokenize the same way, so the positions they return select the
intended token in a ``text=`` run of the same prompts.

>>> from interventions.reference_models.ioi import make_tokenizer
>>> tok = make_tokenizer()  # word-level, prepends <bos>
>>> prompts = ["when Mary and John went to the store , John gave a drink to",
...            "then , Mary and John had a long argument , afterwards John said to"]
>>> token_positions(tok, prompts, word="John", occurrence=1)
PerPrompt((10, 12))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from interventions.errors import SpecError
from interventions.sites import PerPrompt


def _per_prompt(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (str, int)) or value is None:
        return [value] * n
    items = list(value)
    if len(items) != n:
        raise SpecError(f"token_positions: {what}= has {len(items)} entries for {n} prompts")
    return items


def _ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _token_spans(tokenizer: Any, prompt: str) -> list[tuple[int, int]]:
    """The character span of each token of ``prompt`` (special tokens: empty spans)."""
    try:
        enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        spans = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        if len(spans) == len(enc["input_ids"]):
            return spans
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass
    # no offsets (a slow tokenizer): the text each prefix of the ids decodes to
    ids = _ids(tokenizer, prompt)
    spans, end = [], 0
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        new_end = min(len(prompt), len(text))
        start = end
        while start < new_end and prompt[start].isspace():
            start += 1
        spans.append((start, new_end) if new_end > end else (end, end))
        end = max(end, new_end)
    return spans


def token_positions(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    word: str | Sequence[str] | None = None,
    token: int | Sequence[int] | None = None,
    occurrence: int | Sequence[int] = -1,
    part: str = "last",
) -> PerPrompt:
    """The position of a word (or a token id) in each prompt, as a per-prompt selector.

    ``word``: one string for every prompt or one per prompt, matched as a whole word;
    ``part`` picks its ``"first"`` or ``"last"`` token when it takes several.
    ``token``: a token id (or one per prompt) instead. ``occurrence`` picks which one
    when it occurs more than once: 0 the first, 1 the second, -1 the last (the default).
    Positions count from each prompt's first token (its BOS, when the tokenizer adds one).

    For the IOI task the second mention of the subject is
    ``token_positions(tok, prompts, word=subjects, occurrence=1)``.
    """
    if (word is None) == (token is None):
        raise SpecError("token_positions needs exactly one of word= or token=")
    if part not in ("first", "last"):
        raise SpecError(f"token_positions: part must be 'first' or 'last', got {part!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SpecError("token_positions: no prompts")
    occurrences = _per_prompt(occurrence, len(prompts), "occurrence")
    out: list[int] = []
    if token is not None:
        tokens = _per_prompt(token, len(prompts), "token")
        for i, (prompt, tid, occ) in enumerate(zip(prompts, tokens, occurrences, strict=True)):
            hits = [k for k, t in enumerate(_ids(tokenizer, prompt)) if t == tid]
            out.append(_pick(hits, occ, f"token {tid}", i, prompt))
        return PerPrompt(tuple((p,) for p in out), squeeze=True)
    words = _per_prompt(word, len(prompts), "word")
    for i, (prompt, w, occ) in enumerate(zip(prompts, words, occurrences, strict=True)):
        if not isinstance(w, str) or not w.strip():
            raise SpecError(f"token_positions: word for prompt {i} must be a non-empty string")
        pattern = r"(?<!\w)" + re.escape(w.strip()) + r"(?!\w)"
        matches = [m.span() for m in re.finditer(pattern, prompt)]
        start, end = _pick(matches, occ, f"word {w!r}", i, prompt)
        spans = _token_spans(tokenizer, prompt)
        covering = [k for k, (a, b) in enumerate(spans) if b > a and a < end and b > start]
        if not covering:
            raise SpecError(f"token_positions: no token of prompt {i} covers word {w!r}")
        out.append(covering[0] if part == "first" else covering[-1])
    return PerPrompt(tuple((p,) for p in out), squeeze=True)


def _pick(hits: list[Any], occurrence: int, what: str, i: int, prompt: str) -> Any:
    if not hits:
        raise SpecError(f"token_positions: {what} does not occur in prompt {i} ({prompt!r:.80})")
    if not -len(hits) <= occurrence < len(hits):
        raise SpecError(
            f"token_positions: prompt {i} has {len(hits)} occurrence(s) of {what}, so "
            f"occurrence={occurrence} does not exist ({prompt!r:.80})"
        )
    return hits[occurrence]
