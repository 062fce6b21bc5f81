"""Remote runs: a graph sent to a model host (NDIF) as one request, and jobs that outlive
the client.

``iv.run(graph, model, backend="nnsight", remote=True)`` sends the whole graph — every
run, every stage — as one request and waits for it; ``iv.submit`` sends the same request
and returns a :class:`Job` at once. A job's ``id`` is the host's request id: write it
down, and any process can collect the result later with ``Job.attach(id).result()``.
The request carries what the result needs to describe itself (graph fingerprint, read
names, model class), so an attached job returns the same :class:`Results`, provenance
included, as the process that submitted it would have.

The core imports no backend: a backend that can run remotely offers ``submit`` and
``attach`` (see :class:`RemoteBackend`) and returns a handle (:class:`RemoteHandle`).
Host and API key follow the backend library's own conventions (for nnsight:
``NDIF_HOST``, ``NDIF_API_KEY`` and nnsight's config file).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from interventions.errors import InterventionError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from interventions.plan import Plan
    from interventions.results import Results

# a job id is an NDIF request id; anything else is refused before a request is made
_ID_CHARS = frozenset("0123456789abcdefABCDEF-_")


@runtime_checkable
class RemoteHandle(Protocol):
    """One remote request, as the backend that sent it sees it."""

    id: str
    host: str
    model_key: str

    def status(self) -> str:
        """The host's latest status: RECEIVED, QUEUED, RUNNING, COMPLETED, ERROR, ..."""
        ...

    def wait(self, timeout: float | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Block until the result is in: (tensors by read name, the echoed request data)."""
        ...


@runtime_checkable
class RemoteBackend(Protocol):
    """What a backend offers beyond ``execute`` to run graphs on a remote host."""

    def submit(
        self, plan: Plan, model: nn.Module, *, wait: bool, echo: dict[str, Any], **options: Any
    ) -> RemoteHandle:
        """Send the plan as one request; ``echo`` comes back with the result."""
        ...

    def attach(self, job_id: str, **options: Any) -> RemoteHandle:
        """A handle on a request submitted earlier, by its id."""
        ...


def remote_backend(impl: Any, name: str) -> RemoteBackend:
    """``impl`` as a :class:`RemoteBackend`, or a clear error naming who can run remotely."""
    if getattr(getattr(impl, "capabilities", None), "remote", False) and isinstance(
        impl, RemoteBackend
    ):
        return impl
    from interventions.backends import backend_capabilities

    able = [
        n for n, caps in backend_capabilities().items() if not isinstance(caps, str) and caps.remote
    ]
    raise InterventionError(
        f"backend {name!r} cannot run remotely; backends that can: {', '.join(able) or 'none'}"
    )


def results_from(
    tensors: Mapping[str, torch.Tensor], echo: Mapping[str, Any], handle: RemoteHandle
) -> Results:
    """Results of a finished remote request, with the provenance it carried there and back."""
    from interventions.results import Provenance, Results

    versions = dict(echo.get("versions", {}))
    provenance = Provenance(
        graph=str(echo.get("graph", "-")),
        model_class=str(echo.get("model_class", "-")),
        model_config=str(echo.get("model_config", "-")),
        backend=str(echo.get("backend", "-")),
        versions=tuple(sorted((str(k), str(v)) for k, v in versions.items())),
        # the model key this client asked for, and the one the answer carries back
        remote=(
            ("answered_model_key", str(echo.get("model_key", "-"))),
            ("host", handle.host),
            ("job_id", handle.id),
            ("model_key", handle.model_key),
        ),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    masks: dict[str, torch.Tensor] = {}
    if echo.get("assemblies"):
        from interventions.assembly import assemble, assemblies_from

        tensors, masks = assemble(assemblies_from(echo["assemblies"]), tensors)
    wanted = [str(name) for name in echo.get("wanted", list(tensors))]
    return Results(
        {k: tensors[k] for k in wanted if k in tensors},
        provenance,
        masks={k: m for k, m in masks.items() if k in wanted},
    )


class Job:
    """A remote run that was submitted without waiting for it.

    ``job.id`` is the host's id for the request: print it, store it, and collect the
    result from any process, even after this one has exited, with
    ``Job.attach(id).result()``. Nothing is lost when the submitting client dies: the
    host keeps the job's status and result (NDIF keeps them in its object store).
    """

    def __init__(self, handle: RemoteHandle, backend: str) -> None:
        self._handle = handle
        self.backend = backend
        self._results: Results | None = None

    @property
    def id(self) -> str:
        """The host's job id (an NDIF request id)."""
        return self._handle.id

    @property
    def host(self) -> str:
        return self._handle.host

    @property
    def model_key(self) -> str:
        return self._handle.model_key

    def status(self) -> str:
        """The host's latest status for the job (one request to the host)."""
        if self._results is not None:
            return "COMPLETED"
        return self._handle.status()

    def result(self, timeout: float | None = 600.0) -> Results:
        """Wait (at most ``timeout`` seconds) for the job and return its :class:`Results`.

        Raises :class:`~interventions.errors.RemoteTimeout` if it is not done by then
        (the job goes on; call ``result`` again), or the :class:`RemoteError` subclass
        that says why it failed.
        """
        if self._results is None:
            tensors, echo = self._handle.wait(timeout)
            self._results = results_from(tensors, echo, self._handle)
        return self._results

    @classmethod
    def attach(
        cls,
        job_id: str,
        *,
        backend: str = "nnsight",
        host: str | None = None,
        api_key: str | None = None,
    ) -> Job:
        """Re-attach to a job by its id (from this process or any other).

        ``host`` and ``api_key`` default to the backend library's configuration
        (``NDIF_HOST`` and ``NDIF_API_KEY`` for nnsight), as when it was submitted.
        """
        from interventions.backends import get_backend

        job_id = str(job_id).strip()
        if not job_id or not set(job_id) <= _ID_CHARS or len(job_id) > 100:
            raise InterventionError(f"{job_id!r} is not a job id (expected an NDIF request id)")
        impl = remote_backend(get_backend(backend), backend)
        options: dict[str, Any] = {}
        if host is not None:
            options["host"] = host
        if api_key is not None:
            options["api_key"] = api_key
        return cls(impl.attach(job_id, **options), backend)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, host={self.host!r}, backend={self.backend!r})"
