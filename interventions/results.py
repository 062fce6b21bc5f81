"""Results: named tensors, plus how they were made.

>>> import torch
>>> r = Results({"x": torch.zeros(2)}, Provenance(graph="abc", model_class="M", model_config="-",
...             backend="torch", versions=(("torch", torch.__version__),)))
>>> r["x"].shape
torch.Size([2])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from interventions.errors import (
    MAX_NAME,
    OutputError,
    ResultsError,
    choices_text,
    excerpt,
    suggest,
)
from interventions.tensorfile import MAX_TENSOR_BYTES, read_tensors, write_atomic

MAX_SUMMARY_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Provenance:
    """How a result was made: which graph, model, backend and library versions."""

    graph: str  # Graph.fingerprint()
    model_class: str
    model_config: str  # SHA-256 of the model config's JSON, or "-" without a config
    backend: str
    versions: tuple[tuple[str, str], ...]
    remote: tuple[tuple[str, str], ...] = ()  # host, model key, job id for remote runs
    created: str = field(default="")

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["versions"] = dict(self.versions)
        out["remote"] = dict(self.remote)
        return out


_MASK = "__mask__:"  # how masks of padded results are stored beside them


class Results(Mapping[str, torch.Tensor]):
    """A read-only mapping from read names to tensors, with :class:`Provenance`."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        provenance: Provenance,
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._tensors = dict(tensors)
        self.provenance = provenance
        self._masks = dict(masks or {})

    def mask(self, name: str) -> torch.Tensor | None:
        """Which entries of a padded result are real: bool ``[batch, positions]``.

        A read over whole positions of prompts of different lengths is padded with
        zeros to the longest prompt (see :mod:`interventions.ragged`); every other result
        is ``None`` here: all of it is real.
        """
        self[name]  # a clear error for a name that is not a result
        return self._masks.get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(
                f"no result {name!r}{suggest(name, self._tensors)}; results: "
                f"{choices_text(self._tensors) or 'none'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        # Mapping's default tries ``self[name]``, whose miss builds a "did you mean" message
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        lines = [
            f"Results(backend={self.provenance.backend!r}, graph={self.provenance.graph[:12]})"
        ]
        for name, t in self._tensors.items():
            lines.append(f"  {name}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)}")
        return "\n".join(lines)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``results.safetensors`` and ``summary.json`` (provenance, shapes) to a dir.

        Each file is written to a temporary name and renamed, so a reader never sees a
        part of one; a write that fails (disk full, permissions) raises
        :class:`OutputError` and leaves the previous files as they were.
        """
        from safetensors.torch import save

        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise OutputError(f"cannot write results to {str(out)!r}: it is a file, not a folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create results folder {str(out)!r}: {exc.strerror or exc}"
            ) from None
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._tensors.items()}
        masks = {k: m.detach().cpu().contiguous() for k, m in self._masks.items()}
        summary: dict[str, Any] = {
            "provenance": self.provenance.to_dict(),
            "results": {
                k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                for k, v in tensors.items()
            },
        }
        if masks:  # padded results (prompts of different lengths): which entries are real
            summary["masks"] = {
                k: {"dtype": "bool", "shape": list(m.shape)} for k, m in masks.items()
            }
        stored = {**tensors, **{_MASK + k: m for k, m in masks.items()}}
        write_atomic(out / "results.safetensors", save(stored))
        write_atomic(out / "summary.json", json.dumps(summary, indent=2).encode())
        return out

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, max_tensor_bytes: int = MAX_TENSOR_BYTES
    ) -> Results:
        """Read what :meth:`save` wrote. A malformed folder raises :class:`ResultsError`
        naming the file and the field; ``results.safetensors`` is checked from its header
        against ``summary.json`` before its data is read (at most ``max_tensor_bytes``)."""
        src = Path(directory)
        summary = _read_summary(src / "summary.json")
        where = f"{str(src / 'summary.json')!r}"
        if not isinstance(summary, dict) or not (
            {"provenance", "results"} <= set(summary) <= {"provenance", "results", "masks"}
        ):
            raise ResultsError(
                f"{where}: expected an object with provenance and results (and masks)"
            )
        prov = _provenance(summary["provenance"], f"{where} provenance")
        declared = _declared(summary["results"], f"{where} results")
        masked = _declared(summary.get("masks", {}), f"{where} masks")
        if set(masked) - set(declared) or any(d != "bool" for d, _ in masked.values()):
            raise ResultsError(f"{where} masks: bool masks of declared results only")
        tensors = read_tensors(
            src / "results.safetensors",
            {**declared, **{_MASK + k: v for k, v in masked.items()}},
            what=f"{str(src / 'results.safetensors')!r}",
            max_bytes=max_tensor_bytes,
            error=ResultsError,
            field=f"{where} results.",
            declared_by="summary.json",
        )
        masks = {k: tensors[_MASK + k] for k in masked}
        return cls({k: tensors[k] for k in declared}, prov, masks=masks)


_PROVENANCE_TEXT = ("graph", "model_class", "model_config", "backend")


def _read_summary(path: Path) -> Any:
    try:
        if not path.is_file():
            raise ResultsError(f"{str(path)!r} is missing or not a regular file")
        if path.stat().st_size > MAX_SUMMARY_BYTES:
            raise ResultsError(f"{str(path)!r} is larger than {MAX_SUMMARY_BYTES} bytes")
        text = path.read_bytes()
    except OSError as exc:
        raise ResultsError(f"{str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ResultsError(f"{str(path)!r}: not valid JSON ({str(exc)[:100]})") from None


def _pairs(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ResultsError(f"{where}: expected an object of strings, got {excerpt(value)}")
    return tuple(sorted(value.items()))


def _provenance(value: Any, where: str) -> Provenance:
    allowed = {*_PROVENANCE_TEXT, "versions", "remote", "created"}
    if not isinstance(value, dict):
        raise ResultsError(f"{where}: expected an object, got {type(value).__name__}")
    unknown = sorted(map(str, set(value) - allowed))
    if unknown:
        raise ResultsError(
            f"{where}: unknown field(s) {choices_text(excerpt(u, 40)[1:-1] for u in unknown)}; "
            f"fields: {choices_text(sorted(allowed))}"
        )
    missing = [k for k in (*_PROVENANCE_TEXT, "versions") if k not in value]
    if missing:
        raise ResultsError(f"{where}: missing {choices_text(missing)}")
    for key in (*_PROVENANCE_TEXT, "created"):
        if not isinstance(value.get(key, ""), str):
            raise ResultsError(f"{where}.{key}: expected a string, got {excerpt(value[key])}")
    return Provenance(
        graph=value["graph"],
        model_class=value["model_class"],
        model_config=value["model_config"],
        backend=value["backend"],
        versions=_pairs(value["versions"], f"{where}.versions"),
        remote=_pairs(value.get("remote", {}), f"{where}.remote"),
        created=value.get("created", ""),
    )


def _declared(value: Any, where: str) -> dict[str, tuple[str, list[int]]]:
    if not isinstance(value, dict):
        raise ResultsError(f"{where}: expected an object, got {type(value).__name__}")
    out: dict[str, tuple[str, list[int]]] = {}
    for name, meta in value.items():
        if len(name) > MAX_NAME:
            raise ResultsError(f"{where}: result name {excerpt(name)} is too long")
        if (
            not isinstance(meta, dict)
            or set(meta) != {"dtype", "shape"}
            or not isinstance(meta["dtype"], str)
            or not isinstance(meta["shape"], list)
            or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in meta["shape"]
            )
        ):
            raise ResultsError(
                f"{where}.{excerpt(name)[1:-1]}: expected {{dtype, shape}}, got {excerpt(meta)}"
            )
        out[name] = (meta["dtype"], meta["shape"])
    return out
