"""A thin HTTP and websocket client for one NDIF host.

Every exchange is bounded in time; connection failures and 502-504 answers are retried
with backoff (:func:`_backoff`); HTTP errors become typed :class:`RemoteError`\\ s that
name host, model key and job id. What is sent is nnsight's own request (its envelope
and serialized session); what comes back is decoded by :mod:`.decode`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

from interventions.errors import (
    InterventionError,
    JobLost,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteError,
    RemoteTimeout,
)

from . import decode

_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the host
_READ_TIMEOUT = 60.0  # seconds for one HTTP exchange
_DEFAULT_TIMEOUT = 600.0  # seconds for a whole remote run, unless timeout= says otherwise
# Extra attempts after a transient failure (refused, reset, 502-504), waiting
# _backoff(1), _backoff(2), ... in between: about 15 s in all by default, because an NDIF
# API answers 503 "compute backend is reconnecting" for some seconds after a disturbance.
_DEFAULT_RETRIES = 5
_TRANSIENT_STATUS = frozenset({502, 503, 504})
_AUTH_STATUS = frozenset({400, 401, 403})
_AUTH_HINT = (
    "Set NDIF_API_KEY (or api_key=, or nnsight's config: "
    "nnsight.CONFIG.set_default_api_key) to a key this host accepts"
)


def _config_host_key(host: str | None, api_key: str | None) -> tuple[str, str]:
    """Host and API key as nnsight resolves them: arguments, else NDIF_HOST /
    NDIF_API_KEY, else nnsight's config file."""
    from nnsight.schema.config import CONFIG

    found_host = host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST
    found_key = api_key if api_key is not None else (os.environ.get("NDIF_API_KEY") or "")
    found_key = found_key or CONFIG.API.APIKEY or ""
    found_host = str(found_host).rstrip("/")
    if not found_host.startswith(("http://", "https://")):
        raise RemoteConnectionError(
            f"invalid host {found_host!r}",
            host=found_host,
            hint="An NDIF host is a URL starting with http:// or https:// (NDIF_HOST)",
        )
    return found_host, str(found_key)


def _timeout_of(value: Any, *, allow_zero: bool = False) -> float:
    """``timeout=`` in seconds: ``None`` is the default (600 s); anything but a positive
    number (0, negative, NaN, a string) is an error, never replaced by the default.
    ``allow_zero``: 0 means "look once, do not wait" (``Job.result(timeout=0)``).

    >>> _timeout_of(None), _timeout_of(2)
    (600.0, 2.0)
    >>> _timeout_of(0)
    Traceback (most recent call last):
    ...
    interventions.errors.InterventionError: nnsight backend: timeout must be a positive number of seconds, got 0; leave it out for the default (600 s)
    """
    if value is None:
        return _DEFAULT_TIMEOUT
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise InterventionError(
            f"nnsight backend: timeout must be a positive number of seconds, got {value!r}; "
            f"leave it out for the default ({_DEFAULT_TIMEOUT:.0f} s)"
        )
    return float(value)


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1, 2, ...): 0.5, 1, 2, 4, 8, 8, ..."""
    return min(0.5 * 2 ** (attempt - 1), 8.0)


class _Ndif:
    """A small HTTP client for one NDIF host: every call bounded in time and retries."""

    def __init__(self, host: str, api_key: str, model_key: str, retries: int) -> None:
        self.host = host
        self.api_key = api_key
        self.model_key = model_key
        self.retries = max(0, int(retries))

    def error(self, cls: type[RemoteError], message: str, **fields: Any) -> RemoteError:
        fields.setdefault("host", self.host)
        fields.setdefault("model_key", self.model_key or None)
        return cls(message, **fields)

    def headers(self) -> dict[str, str]:
        import sys
        import time

        headers = {
            "ndif-timestamp": repr(time.time()),
            "nnsight-version": _nnsight_version(),
            "python-version": sys.version,
        }
        if self.api_key:
            headers["ndif-api-key"] = self.api_key
        return headers

    def call(
        self,
        method: str,
        url: str,
        *,
        job_id: str | None = None,
        retry: bool = True,
        idempotent: bool = True,
        **kw: Any,
    ) -> Any:
        """One HTTP exchange; connection failures and 502-504 are retried with backoff.

        A request that is not ``idempotent`` (a job submission) is sent again only when it
        cannot have arrived: the connection was refused, or the host answered 502-504.
        """
        import time

        import httpx

        timeout = httpx.Timeout(_READ_TIMEOUT, connect=_CONNECT_TIMEOUT)
        attempts = 1 + (self.retries if retry else 0)
        last: str = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(_backoff(attempt))
            try:
                with httpx.Client(timeout=timeout) as client:
                    response = client.request(method, url, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = f"cannot connect: {exc}"
                continue
            except httpx.TimeoutException as exc:
                raise self.error(
                    RemoteTimeout,
                    f"no answer from the host within {_READ_TIMEOUT:.0f}s ({type(exc).__name__})",
                    job_id=job_id,
                    hint="The host may be overloaded; try again later",
                ) from None
            except httpx.HTTPError as exc:  # reset, protocol errors: transient
                if not idempotent:  # the request may have arrived: sending it again could
                    raise self.error(  # run the job twice
                        RemoteConnectionError,
                        f"the connection broke while sending ({type(exc).__name__}: {exc})",
                        job_id=job_id,
                        hint="The job may or may not have been queued; run it again",
                    ) from None
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in _TRANSIENT_STATUS:
                last = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            return response
        raise self.error(
            RemoteConnectionError,
            f"the host cannot be reached after {attempts} attempt(s) ({last})",
            job_id=job_id,
            hint="Check that the host is up and that NDIF_HOST (or remote=) names it",
        )

    def post(self, blob: bytes, compress: bool, session_id: str = "") -> Any:
        from nnsight.schema.request import RequestModel
        from nnsight.schema.response import ResponseModel

        envelope = RequestModel(model_key=self.model_key, compress=compress)
        envelope.session_id = session_id
        response = self.call(
            "POST",
            f"{self.host}/request",
            idempotent=False,
            data={"data": envelope.metadata()},
            files={"blob": ("request", blob, "application/octet-stream")},
            headers=self.headers(),
        )
        self.check(response)
        try:
            return ResponseModel.model_validate_json(response.text)
        except ValueError:
            raise self.error(
                RemoteConnectionError,
                f"the host's answer to a request is not NDIF's: {response.text[:200]!r}",
                hint="Check that NDIF_HOST (or remote=) names an NDIF API",
            ) from None

    def check(self, response: Any, job_id: str | None = None) -> None:
        code = response.status_code
        if code < 400:
            return
        detail = _detail(response)
        if code in _AUTH_STATUS:
            raise self.error(
                RemoteAuthError,
                f"the host refused the API key (HTTP {code}: {detail})",
                job_id=job_id,
                hint=_AUTH_HINT,
            )
        if code in (404, 405):
            raise self.error(
                RemoteConnectionError,
                f"the host has no NDIF API at {response.request.url.path} (HTTP {code})",
                job_id=job_id,
                hint="Check that NDIF_HOST (or remote=) names an NDIF API, not another server",
            )
        raise self.error(RemoteError, f"the host answered HTTP {code}: {detail}", job_id=job_id)

    def status(self, job_id: str) -> Any:
        """The latest stored status of a non-blocking job, or None if none is stored yet."""
        response = self.call(
            "GET", f"{self.host}/response/{job_id}", job_id=job_id, headers=self.headers()
        )
        if response.status_code == 404:
            return None
        self.check(response, job_id)
        with self.context(job_id):
            return decode.response_json(response.content, "a job status")

    @contextlib.contextmanager
    def context(self, job_id: str | None) -> Iterator[None]:
        """Add host, model key and job id to the errors of decoding what the host sent."""
        try:
            yield
        except RemoteError as exc:
            if exc.host is not None:
                raise
            raise self.error(type(exc), exc.message, job_id=job_id, hint=exc.hint) from None

    def download(self, url: str, job_id: str) -> bytes:
        response = self.call("GET", url, job_id=job_id)
        if response.status_code >= 400:
            raise self.error(
                JobLost,
                f"the job's result cannot be downloaded (HTTP {response.status_code})",
                job_id=job_id,
                hint="Results expire on the host; run the graph again",
            )
        return bytes(response.content)


def _detail(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return (response.text or "").strip()[:300] or "no detail"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return str(detail)[:300]


def _nnsight_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnsight")
    except PackageNotFoundError:  # pragma: no cover
        return ""


def _subscribe(client: _Ndif) -> tuple[Any, str]:
    """Open the /subscribe websocket of a blocking run; returns (socket, session id)."""
    import json
    import time

    import websocket

    scheme, _, rest = client.host.partition("://")
    url = ("wss" if scheme == "https" else "ws") + "://" + rest + "/subscribe"
    header = [f"ndif-api-key: {client.api_key}"] if client.api_key else None
    last = ""
    for attempt in range(1 + client.retries):
        if attempt:
            time.sleep(_backoff(attempt))
        try:
            socket = websocket.create_connection(url, timeout=_CONNECT_TIMEOUT, header=header)
        except websocket.WebSocketBadStatusException as exc:
            code = int(getattr(exc, "status_code", 0) or 0)
            if code in (401, 403):
                raise client.error(
                    RemoteAuthError,
                    f"the host refused the API key (HTTP {code})",
                    hint=_AUTH_HINT,
                ) from None
            if code in _TRANSIENT_STATUS:
                last = f"HTTP {code}"
                continue
            raise client.error(
                RemoteConnectionError,
                f"the host has no NDIF websocket at /subscribe (HTTP {code})",
                hint="Check that NDIF_HOST (or remote=) names an NDIF API, not another server",
            ) from None
        except (websocket.WebSocketException, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            continue
        try:
            socket.settimeout(_READ_TIMEOUT)
            first = json.loads(socket.recv())
            return socket, str(first["session_id"])
        except Exception as exc:
            with contextlib.suppress(Exception):
                socket.close()
            raise client.error(
                RemoteConnectionError,
                f"the host's websocket does not speak NDIF's protocol ({type(exc).__name__})",
                hint="Check that NDIF_HOST (or remote=) names an NDIF API",
            ) from None
    raise client.error(
        RemoteConnectionError,
        f"the host cannot be reached after {1 + client.retries} attempt(s) ({last})",
        hint="Check that the host is up and that NDIF_HOST (or remote=) names it",
    )
