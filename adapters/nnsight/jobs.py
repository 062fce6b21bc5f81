"""One request on an NDIF host, from submission to result: :class:`_NdifJob`, the handle
behind :class:`interventions.Job`.

A blocking run waits on its ``/subscribe`` websocket (and is sent again, a bounded
number of times, if the host loses it); a submitted one is polled over HTTP. The host's
failure descriptions are sorted into typed errors: not deployed, timed out, lost, or
the graph raising on the host (with its traceback).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from interventions.errors import (
    JobLost,
    ModelNotDeployed,
    RemoteError,
    RemoteExecutionError,
    RemoteTimeout,
)

from . import decode
from .decode import _DEFAULT_MAX_RESULT_BYTES
from .ndif import _backoff, _Ndif, _timeout_of

# an ERROR is the trace raising on the host (its traceback).
_NOT_DEPLOYED = ("CANT_ACCOMMODATE", "not deployed", "Repository Not Found", "describe_checkpoint")
_LOST = (
    "cancelled or preempted",
    "evicted",
    "Please try again later",
    "Actor died",
    "actor died",
    "RayActorError",
)


class _NdifJob:
    """One request on an NDIF host: the handle behind :class:`interventions.Job`."""

    def __init__(
        self,
        client: _Ndif,
        job_id: str,
        *,
        compress: bool,
        timeout: float,
        max_result_bytes: int = _DEFAULT_MAX_RESULT_BYTES,
        socket: Any = None,
        resend: Any = None,
    ) -> None:
        self.client = client
        self.id = job_id
        self.compress = compress
        self.timeout = timeout
        self.max_result_bytes = max_result_bytes
        self.socket = socket  # the /subscribe websocket of a blocking run
        self.resend = resend  # sends the request again (blocking runs): (socket, job id)
        self.resent = 0
        self.last: str = "RECEIVED"
        self.meta: dict[str, Any] | None = None  # what the run cost the host (NDIF's meta)

    @property
    def host(self) -> str:
        return self.client.host

    @property
    def model_key(self) -> str:
        return self.client.model_key or "?"

    def status(self) -> str:
        if self.socket is not None:
            return self.last
        response = self.client.status(self.id)
        if response is not None:
            self.last = response.status.value
        return self.last

    def wait(self, timeout: float | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        import time

        # 0: look once and do not wait (Job.result(timeout=0)); None: the job's own limit
        limit = self.timeout if timeout is None else _timeout_of(timeout, allow_zero=True)
        deadline = time.monotonic() + limit
        while True:
            try:
                response = self._wait_socket(deadline) if self.socket else self._poll(deadline)
                break
            except JobLost:
                # the host lost a blocking run (replica died, connection dropped): send it
                # again, a bounded number of times, within the same deadline
                self.close()
                if self.resend is None or self.resent >= self.client.retries:
                    raise
                self.resent += 1
                time.sleep(min(_backoff(self.resent), 4.0, max(deadline - time.monotonic(), 0)))
                self.socket, self.id = self.resend()
                self.last = "RECEIVED"
            except BaseException:
                self.close()
                raise
            finally:
                if self.last in ("COMPLETED", "ERROR"):
                    self.close()
        self.close()
        self.meta = response.meta
        data = response.data
        if isinstance(data, (bytes, bytearray)):
            blob = bytes(data)
        elif isinstance(data, str) and data:
            blob = self.client.download(data, self.id)
        else:
            raise self.client.error(
                JobLost, "the host reported the job complete but sent no result", job_id=self.id
            )
        with self.client.context(self.id):
            values, echo = decode.load_result(blob, self.compress, self.max_result_bytes)
        if not self.client.model_key and echo.get("model_key"):
            # a job attached by id: what it asked for is known only from the request's
            # echo. Never overwritten otherwise: provenance records the key asked for
            # (this) and the key that came back (the echo's) side by side.
            self.client.model_key = str(echo["model_key"])
        return values, echo

    def _timeout(self, limit: float) -> RemoteTimeout:
        how = (
            "collect it later with iv.Job.attach(id).result()"
            if self.socket is None
            else "a blocking run's result arrives only on its connection: use iv.submit for "
            "long jobs, or a larger timeout="
        )
        return self.client.error(  # type: ignore[return-value]
            RemoteTimeout,
            f"the job did not finish within {limit:.0f}s (last status {self.last})",
            job_id=self.id,
            hint=f"It may still be running; {how}",
        )

    def _poll(self, deadline: float) -> Any:
        import time

        from nnsight.schema.response import Status

        delay = 0.02
        while True:
            response = self.client.status(self.id)
            if response is not None:
                self.last = response.status.value
                if response.status == Status.COMPLETED:
                    return response
                if response.status == Status.ERROR:
                    raise self._failure(response.description)
            now = time.monotonic()
            if now >= deadline:
                raise self._timeout(self.timeout)
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 1.5, 1.0)

    def _wait_socket(self, deadline: float) -> Any:
        import time

        import websocket
        from nnsight.schema.response import Status

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(self.timeout)
            self.socket.settimeout(min(remaining, 5.0))
            try:
                message = self.socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError) as exc:
                raise self.client.error(
                    JobLost,
                    f"the connection to the host closed while the job ran ({type(exc).__name__})",
                    job_id=self.id,
                    hint="The host may have restarted. A blocking run's result arrives only on "
                    "its connection: run it again, or use iv.submit to keep jobs across "
                    "connection failures",
                ) from None
            with self.client.context(self.id):
                if isinstance(message, (bytes, bytearray)):
                    response = decode.load_frame(bytes(message), self.max_result_bytes)
                else:
                    fields = decode.json_object(message, "a websocket message")
                    if "session_id" in fields and "status" not in fields:
                        continue  # the session's greeting, repeated
                    response = decode.response(fields, "a websocket message")
            self.last = response.status.value
            if response.status == Status.COMPLETED:
                return response
            if response.status == Status.ERROR:
                raise self._failure(response.description)

    def _failure(self, description: str) -> RemoteError:
        text = description or "no description"
        if any(marker in text for marker in _NOT_DEPLOYED):
            return self.client.error(
                ModelNotDeployed,
                "the host has no deployment of this model (and did not deploy one): "
                f"{text.strip().splitlines()[-1][:300]}",
                job_id=self.id,
                hint="Deploy the model on the host (scripts/ndif/deploy.py for a local NDIF), "
                "or check that model_key= names a deployed model",
            )
        if "execution timeout" in text:
            return self.client.error(
                RemoteTimeout,
                f"the host stopped the job: {text.strip()[:300]}",
                job_id=self.id,
                hint="Split the graph (max_batch=) or ask the host for a longer timeout",
            )
        if any(marker in text for marker in _LOST):
            return self.client.error(
                JobLost,
                f"the host lost the job: {text.strip()[:300]}",
                job_id=self.id,
                hint="Its replica was stopped or restarted; run the graph again",
            )
        last = text.strip().splitlines()[-1] if text.strip() else text
        return self.client.error(
            RemoteExecutionError,
            f"the graph raised on the host: {last[:300]}",
            job_id=self.id,
            hint="The remote traceback below shows where. If the graph runs locally, check "
            "that the host's model is the one it was validated against (model_key=)",
            remote_traceback=text,
        )

    def close(self) -> None:
        if self.socket is not None:
            with contextlib.suppress(Exception):
                self.socket.close()
            self.socket = None
