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

import torch

from interventions.errors import InterventionError, choices_text, suggest


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
        """Write ``results.safetensors`` and ``summary.json`` (provenance, shapes) to a dir."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._tensors.items()}
        stored = dict(tensors)
        stored.update({_MASK + k: m.contiguous() for k, m in self._masks.items()})
        save_file(stored, str(out / "results.safetensors"))
        summary = {
            "provenance": self.provenance.to_dict(),
            "results": {
                k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                for k, v in tensors.items()
            },
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Results:
        """Read what :meth:`save` wrote."""
        from safetensors.torch import load_file

        src = Path(directory)
        try:
            summary = json.loads((src / "summary.json").read_text())
            tensors = load_file(str(src / "results.safetensors"))
            p = summary["provenance"]
            prov = Provenance(
                graph=p["graph"],
                model_class=p["model_class"],
                model_config=p["model_config"],
                backend=p["backend"],
                versions=tuple(sorted(p["versions"].items())),
                remote=tuple(sorted(p.get("remote", {}).items())),
                created=p.get("created", ""),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InterventionError(f"cannot load results from {str(src)!r}: {exc}") from None
        order = list(summary.get("results", tensors))
        masks = {k[len(_MASK) :]: t for k, t in tensors.items() if k.startswith(_MASK)}
        return cls({k: tensors[k] for k in order if k in tensors}, prov, masks=masks)
