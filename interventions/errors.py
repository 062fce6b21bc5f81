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
    ├── ResultsError                  a results folder is malformed (names the file and field)
    ├── OutputError                   an output cannot be written (disk full, permissions)
    ├── ExecutionError                a backend failed while running (the model is left clean)
    │   └── RemoteExecutionError      the graph raised on the remote host (its traceback attached)
    └── RemoteError                   a remote (NDIF) run failed; names host, model key, job id
        ├── RemoteConnectionError     the host cannot be reached (refused, wrong host, no route)
        ├── RemoteAuthError           the host refused the API key (HTTP 400, 401, 403)
        ├── ModelNotDeployed          the host serves no deployment under the model key
        ├── RemoteExecutionError      (see above)
        ├── RemoteTimeout             no answer in time; the job may still finish (Job.attach)
        ├── JobLost                   the host lost the job (restart, replica killed, expired)
        ├── MalformedResponse         the host's answer is not what NDIF sends (bad JSON, archive, ...)
        └── ResultTooLarge            a result over max_result_bytes (checked before it is loaded)

Errors that cross a network travel as type name, message and traceback text, never as
pickled classes.

One warning, not an error: ``SAEErrorGradientWarning`` (a ``UserWarning``), when a
gradient recipe is asked to splice an SAE with its error term kept (``error="keep"``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterventionError(Exception):
    """Base class of every error raised on purpose by ``interventions``."""


class SAEErrorGradientWarning(UserWarning):
    """A gradient recipe spliced an SAE with ``error="keep"``: gradient flows through the
    error term, so feature gradients are not SAELens's (whose error term carries none,
    like ``error="detach"``)."""


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


class ResultsError(InterventionError):
    """A results folder cannot be read or is malformed; names the file and the field."""


class OutputError(InterventionError):
    """An output (results, graph, picture) cannot be written: disk full, permissions, a
    file where a folder should be. Nothing half-written is left under the final name."""


class ExecutionError(InterventionError):
    """A backend failed while running a graph. The model holds no hooks afterwards."""


class RemoteError(InterventionError):
    """A remote run failed. Names the host, the model key and the job id (when known).

    ``hint`` says what to do about it; ``remote_traceback`` holds the server's traceback
    text for errors raised inside the trace (never a pickled exception).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        model_key: str | None = None,
        job_id: str | None = None,
        hint: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        self.message = message
        self.host = host
        self.model_key = model_key
        self.job_id = job_id
        self.hint = hint
        self.remote_traceback = remote_traceback
        super().__init__(self._text())

    def _text(self) -> str:
        where = [f"host {self.host}" if self.host else "host ?"]
        where.append(f"model {self.model_key}" if self.model_key else "model ?")
        where.append(f"job {self.job_id}" if self.job_id else "no job id (nothing was queued)")
        text = f"{self.message} [{', '.join(where)}]"
        if self.hint:
            text += f". {self.hint}"
        if self.remote_traceback:
            text += f"\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return text

    def __reduce__(self) -> tuple[object, ...]:  # keep keyword fields across pickling
        return (_rebuild_remote, (type(self), self.message, self.__dict__.copy()))


def _rebuild_remote(cls: type[RemoteError], message: str, fields: dict[str, object]) -> RemoteError:
    error = cls.__new__(cls)
    error.__dict__.update(fields)
    Exception.__init__(error, error._text())
    return error


class RemoteConnectionError(RemoteError):
    """The remote host cannot be reached: connection refused, unknown host, no route."""


class RemoteAuthError(RemoteError):
    """The remote host refused the API key (HTTP 400, 401 or 403)."""


class ModelNotDeployed(RemoteError):
    """The remote host has no deployment under the model key the request named."""


class RemoteExecutionError(RemoteError, ExecutionError):
    """The graph's trace raised on the remote host; ``remote_traceback`` has its traceback."""


class RemoteTimeout(RemoteError):
    """No answer within the timeout. The job may still finish: re-attach by its id."""


class JobLost(RemoteError):
    """The remote host lost the job (it restarted, its replica died, or the job expired)."""


class MalformedResponse(RemoteError):
    """The host's answer is not what NDIF sends: bad JSON, wrong types, a corrupt or
    truncated archive or compression stream, a pickle naming objects. The message says
    which message was malformed and how."""


class ResultTooLarge(RemoteError):
    """A remote result is larger than ``max_result_bytes`` once decompressed; refused
    before it is decompressed or loaded (raise the option to accept it)."""


MAX_NAME = 1000  # characters in any name: run, read, site, module path, tensor or SAE key
_SUGGEST_LIMIT = 200  # longer words get no "did you mean" (difflib is quadratic)


def excerpt(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters, with the full length noted.

    Errors quote names through this, so a hostile 50 MB name gives a short message.

    >>> excerpt("resid_post")
    "'resid_post'"
    >>> excerpt("x" * 1000, limit=10)
    "'xxxxxxxxx... (1000 characters)"
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[: limit - 1]!r}"[:-1] + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(value: object, what: str) -> None:
    """Raise :class:`SpecError` if ``value`` is a string longer than :data:`MAX_NAME`.

    >>> check_name("a" * 2000, "run name")
    Traceback (most recent call last):
    ...
    interventions.errors.SpecError: run name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa... (2000 characters) is longer than 1000 characters
    """
    if isinstance(value, str) and len(value) > MAX_NAME:
        raise SpecError(f"{what} {excerpt(value, 40)} is longer than {MAX_NAME} characters")


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``.

    Words longer than 200 characters get no suggestion (the search would be quadratic).

    >>> suggest("resid_psot", ["resid_pre", "resid_post"])
    "; did you mean 'resid_post'?"
    """
    if not isinstance(word, str) or len(word) > _SUGGEST_LIMIT:
        return ""
    close = difflib.get_close_matches(
        word, [c for c in choices if len(c) <= _SUGGEST_LIMIT], n=1, cutoff=0.6
    )
    return f"; did you mean {close[0]!r}?" if close else ""


def choices_text(choices: Iterable[str]) -> str:
    """Comma-separated listing of valid choices, used at the end of messages."""
    return ", ".join(str(c) for c in choices)
