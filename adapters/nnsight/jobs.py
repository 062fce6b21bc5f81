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

from .decode import _load_frame, _load_result
from .ndif import _backoff, _Ndif

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
        socket: Any = None,
        resend: Any = None,
    ) -> None:
        self.client = client
        self.id = job_id
        self.compress = compress
        self.timeout = timeout
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

        limit = self.timeout if timeout is None else float(timeout)
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
        try:
            saved = _load_result(blob, self.compress)
            result = saved["result"]
            values, echo = dict(result["values"]), dict(result["echo"] or {})
        except Exception as exc:
            raise self.client.error(
                RemoteError,
                f"the job's result cannot be read ({type(exc).__name__}: {exc})",
                job_id=self.id,
            ) from None
        if echo.get("model_key"):
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
        import json
        import time

        import websocket
        from nnsight.schema.response import ResponseModel, Status

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
            if isinstance(message, (bytes, bytearray)):
                response = _load_frame(bytes(message))
            else:
                try:
                    response = ResponseModel.model_validate_json(message)
                except ValueError:
                    if "session_id" in json.loads(message):
                        continue
                    raise
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
