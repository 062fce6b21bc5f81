"""The public intervention graph: the data of ``spec`` plus the services above it.

The core has one direction. At the bottom are the data types (``sites``, ``ops``,
``spec``: runs, ops and the builder); above them validation, planning, printing and
serialization, each importing the data and never this module. :class:`Graph` is the
thin façade on top, so that ``g.validate(model)``, ``g.to_json()``, ``Graph.load(path)``
and ``print(g)`` read naturally; each method only delegates.

>>> import torch, interventions as iv
>>> g = iv.Graph()
>>> clean = g.run("clean", tokens=torch.tensor([[1, 2, 3]]))
>>> corrupt = g.run("corrupt", tokens=torch.tensor([[1, 4, 3]]))
>>> h = clean.read("resid_post", layer=0)
>>> corrupt.patch("resid_post", layer=0, pos=-1, value=h)
>>> _ = corrupt.read("logits", pos=-1, name="patched")
>>> print(g)  # doctest: +NORMALIZE_WHITESPACE
Graph(2 runs, 3 ops)
  run clean    tokens=%t0 int64[1, 3]
  run corrupt  tokens=%t1 int64[1, 3]
  %clean.resid_post.0 = read clean resid_post[0]
  patch corrupt resid_post[0] pos=-1 <- %clean.resid_post.0
  %patched = read corrupt logits pos=-1

A value read in one run can flow into another (``patch(value=h)``). Ops on the same
site of a run apply in the order they were added; a read sees the ops added before it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interventions import deserialize, printing, serialize, validation
from interventions.spec import GraphSpec, Run, RunHandle
from interventions.tensorfile import MAX_TENSOR_BYTES

__all__ = ["Graph", "Run", "RunHandle"]


class Graph(GraphSpec):
    """An experiment as data: runs, ops and a table of named tensors and SAEs."""

    def validate(
        self, model: nn.Module, *, tokenizer: Any = None, backend: str | None = None
    ) -> None:
        """Check the graph against a model before anything runs; raise a clear error.

        See :func:`interventions.validation.validate` (and ``iv.check_graph_saes`` to
        measure the SAEs it splices).
        """
        validation.validate(self, model, tokenizer=tokenizer, backend=backend)

    def fingerprint(self) -> str:
        """SHA-256 of the graph's JSON and tensor bytes: equal graphs, equal fingerprints."""
        return serialize.fingerprint(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        """The graph as JSON text; tensors travel inline as a base64 safetensors blob.

        Use :meth:`save` for a JSON file with a ``.safetensors`` sidecar instead.
        """
        return serialize.to_json(self, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes, *, directory: str | None = None) -> Graph:
        """Parse :meth:`to_json` or :meth:`save` output; a sidecar is looked up in ``directory``."""
        return deserialize.from_json(text, directory=directory, into=cls)

    def save(self, path: str) -> None:
        """Write ``path`` (JSON) and the tensors to a sidecar ``<stem>.safetensors`` beside it."""
        serialize.save(self, path)

    @classmethod
    def load(cls, path: str, *, max_tensor_bytes: int | None = None) -> Graph:
        """Read a graph written by :meth:`save`. Nothing is unpickled or imported.

        The sidecar's header is checked against the graph before its data is read; its
        tensors may hold at most ``max_tensor_bytes`` (default 4 GiB; raise it on purpose).
        """
        return deserialize.load(
            path, into=cls, max_tensor_bytes=max_tensor_bytes or MAX_TENSOR_BYTES
        )

    def __str__(self) -> str:
        return printing.format_graph(self)
