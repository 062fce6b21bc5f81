"""The package's exceptions: one base class, context added at the boundary.

::

    InterventionError                 every error this package raises on purpose
    ├── SpecError                     a graph or its JSON is malformed (no model needed)
    │   └── UnknownOp                 an op kind outside the closed set
    ├── ValidationError               a well-formed graph does not fit this model
    │   ├── UnknownSite               a site name or module path the model lacks
    │   ├── UnknownArchitecture       no architecture map for a standard site name
    │   └── UnknownBackend            a backend name nobody registered
    ├── UnsupportedOp                 a backend cannot express an op (before running)
    ├── BackendVersionError           an installed backend library is out of range
    ├── SAEError                      an SAE's weights or files are unusable
    └── ExecutionError                a backend failed while running (the model is left clean)

Errors that cross a network travel as type name, message and traceback text, never as
pickled classes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterventionError(Exception):
    """Base class of every error raised on purpose by ``interventions``."""


class SpecError(InterventionError):
    """A graph, an op or its JSON form is malformed."""


class UnknownOp(SpecError):
    """An op kind outside the closed set."""


class ValidationError(InterventionError):
    """A well-formed graph does not fit the model it is checked against."""


class UnknownSite(ValidationError):
    """A site name or a raw module path that the model does not have."""


class UnknownArchitecture(ValidationError):
    """A standard site name was used on a model family with no architecture map."""


class UnknownBackend(ValidationError):
    """A backend name that nobody registered."""


class UnsupportedOp(InterventionError):
    """A backend cannot express an op of the graph; raised before anything runs."""


class BackendVersionError(InterventionError):
    """An installed backend library is outside the supported version range."""


class SAEError(InterventionError):
    """An SAE's weights, configuration or files are unusable."""


class ExecutionError(InterventionError):
    """A backend failed while running a graph. The model holds no hooks afterwards."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``.

    >>> suggest("resid_psot", ["resid_pre", "resid_post"])
    "; did you mean 'resid_post'?"
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def choices_text(choices: Iterable[str]) -> str:
    """Comma-separated listing of valid choices, used at the end of messages."""
    return ", ".join(str(c) for c in choices)
