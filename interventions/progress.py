"""Progress bars for long executions: tqdm, shown only when a run takes more than a moment."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], enabled: bool | None, *, desc: str, total: int | None = None
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar that appears after one second.

    ``enabled=None`` shows it only on an interactive terminal; ``False`` never.

    >>> list(progress([1, 2], enabled=False, desc="x"))
    [1, 2]
    """
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, delay=1.0, leave=False)
