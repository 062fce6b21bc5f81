"""The per-model run lock: runs (and validation's shape-only dry run) on one model object
are serialised, never interleaved.

>>> import torch
>>> m = torch.nn.Linear(2, 2)
>>> with model_lock(m), model_lock(m):  # re-entrant
...     pass
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def model_lock(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s run lock: runs on one model object are serialised, never interleaved.

    Every backend installs hooks (or wraps modules) on the model object itself, so two
    runs at once would see each other's interventions. ``iv.run`` holds this lock from
    validation to the last hook removed, and validation's dry run
    (:mod:`interventions.dry_run`) holds it while its hooks are on the model. It is
    re-entrant (a recipe may call ``run`` while holding it) and kept in a weak map, so it
    does not keep the model alive.

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> with model_lock(m), model_lock(m):  # re-entrant
    ...     pass
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    with lock:
        yield
