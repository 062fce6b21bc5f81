"""Loading SAEs by name: SAELens's pretrained releases, through ``huggingface_hub``.

A release (SAELens's ``pretrained_saes.yaml`` conventions) is a Hugging Face repository
holding one SAELens directory per SAE: ``sae_id`` names the SAE, ``path`` is its folder in
the repository, and the SAE's hook name (from its ``cfg.json``, else from the release) gives
the site. Files come through ``hf_hub_download``, so its cache (``HF_HUB_CACHE``), offline
mode (``HF_HUB_OFFLINE=1``) and revisions all apply. A small table of well-known releases is
built in (:data:`RELEASES`); pass an :class:`SAERelease` for any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interventions.errors import SAEError, suggest
from interventions.sae.disk import CFG_FILENAME, WEIGHTS_FILENAME, load_sae_dir, load_sae_file
from interventions.sae.info import SAEInfo, info_from_cfg
from interventions.sae.kinds import AnySAE

__all__ = ["RELEASES", "SAEEntry", "SAERelease", "load_sae"]


@dataclass(frozen=True)
class SAEEntry:
    """One SAE of a release: its id, its folder in the repository and its hook."""

    sae_id: str
    path: str
    hook_name: str | None = None
    norm_scaling_factor: float | None = None
    neuronpedia_id: str | None = None


@dataclass(frozen=True)
class SAERelease:
    """A release: a Hugging Face repository of SAELens directories for one model.

    >>> r = SAERelease.layered("org/saes", "gpt2", "blocks.{layer}.hook_resid_pre", range(2))
    >>> [e.sae_id for e in r.saes]
    ['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_pre']
    """

    repo_id: str
    model: str
    saes: tuple[SAEEntry, ...]
    hf_model: str | None = None  # the Hugging Face name of ``model`` when they differ

    @classmethod
    def layered(
        cls,
        repo_id: str,
        model: str,
        hook: str,
        layers: Iterable[int],
        *,
        path: str | None = None,
        sae_id: str | None = None,
        hf_model: str | None = None,
        neuronpedia: str | None = None,
    ) -> SAERelease:
        """One SAE per layer; ``hook``, ``path`` and ``sae_id`` are templates in ``{layer}``
        (``path`` and ``sae_id`` default to the hook)."""
        entries = tuple(
            SAEEntry(
                sae_id=(sae_id or hook).format(layer=layer),
                path=(path or hook).format(layer=layer),
                hook_name=hook.format(layer=layer),
                neuronpedia_id=neuronpedia.format(layer=layer) if neuronpedia else None,
            )
            for layer in layers
        )
        return cls(repo_id, model, entries, hf_model)

    def entry(self, sae_id: str, release: str) -> SAEEntry:
        for e in self.saes:
            if e.sae_id == sae_id:
                return e
        ids = [e.sae_id for e in self.saes]
        shown = ", ".join(ids[:8]) + (", ..." if len(ids) > 8 else "")
        raise SAEError(
            f"release {release!r} has no SAE {sae_id!r}{suggest(sae_id, ids)}; its SAEs: {shown}"
        )


def _gpt2_res_jb() -> SAERelease:
    pre = SAERelease.layered(
        "jbloom/GPT2-Small-SAEs-Reformatted",
        "gpt2-small",
        "blocks.{layer}.hook_resid_pre",
        range(12),
        hf_model="gpt2",
        neuronpedia="gpt2-small/{layer}-res-jb",
    )
    post = SAEEntry("blocks.11.hook_resid_post", "blocks.11.hook_resid_post",
                    "blocks.11.hook_resid_post")  # fmt: skip
    return SAERelease(pre.repo_id, pre.model, (*pre.saes, post), pre.hf_model)


RELEASES: dict[str, SAERelease] = {
    "gpt2-small-res-jb": _gpt2_res_jb(),
    "gpt2-small-resid-post-v5-32k": SAERelease.layered(
        "jbloom/GPT2-Small-OAI-v5-32k-resid-post-SAEs",
        "gpt2-small",
        "blocks.{layer}.hook_resid_post",
        range(12),
        path="v5_32k_layer_{layer}",
        hf_model="gpt2",
    ),
    "gpt2-small-resid-post-v5-128k": SAERelease.layered(
        "jbloom/GPT2-Small-OAI-v5-128k-resid-post-SAEs",
        "gpt2-small",
        "blocks.{layer}.hook_resid_post",
        range(12),
        path="v5_128k_layer_{layer}",
        hf_model="gpt2",
    ),
    "mistral-7b-res-wg": SAERelease.layered(
        "JoshEngels/Mistral-7B-Residual-Stream-SAEs",
        "mistral-7b",
        "blocks.{layer}.hook_resid_pre",
        (8, 16, 24),
        path="mistral_7b_layer_{layer}",
        hf_model="mistralai/Mistral-7B-v0.1",
    ),
}
"""Built-in releases by SAELens's release name (SAELens-format repositories only)."""


def _download(
    release: SAERelease,
    entry: SAEEntry,
    *,
    revision: str | None,
    cache_dir: str | Path | None,
    local_files_only: bool,
) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise SAEError(
            "load_sae(release=...) needs huggingface_hub: pip install huggingface_hub"
        ) from exc
    folder = entry.path.strip("/")
    paths = []
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        filename = f"{folder}/{name}" if folder else name
        try:
            paths.append(
                hf_hub_download(
                    release.repo_id,
                    filename,
                    revision=revision,
                    cache_dir=str(cache_dir) if cache_dir is not None else None,
                    local_files_only=local_files_only,
                )
            )
        except Exception as exc:  # network, offline cache miss, missing file: all named
            raise SAEError(
                f"could not get {filename!r} of {release.repo_id!r}"
                f"{f' at revision {revision!r}' if revision else ''}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
    return Path(paths[0]).parent


def load_sae(
    path: str | Path | None = None,
    *,
    release: str | SAERelease | None = None,
    sae_id: str | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cfg: dict[str, Any] | None = None,
) -> AnySAE:
    """Load an SAE: from an SAELens directory, a ``.safetensors`` file, or a release by name.

    ``load_sae(path)`` reads a local directory (``cfg.json`` + ``sae_weights.safetensors``) or
    a single ``.safetensors`` file (its config from ``cfg``, the file's header or a
    ``cfg.json`` beside it). ``load_sae(release=..., sae_id=...)`` downloads the SAE's
    folder of a release (a name of :data:`RELEASES`, or an :class:`SAERelease`) through
    ``huggingface_hub``, at ``revision``; offline (``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True``) it reads the cache only. The SAE's ``info`` carries its model,
    hook and site, so ``run.sae_splice(sae=sae)`` needs no site. Tensors are cast to
    ``dtype`` (else the config's) and put on ``device`` (default CPU). Raises ``SAEError``
    naming the file and key at fault.

    >>> import tempfile, torch
    >>> from interventions.sae import TopKSAE, save_sae
    >>> sae = TopKSAE(torch.eye(3), torch.zeros(3), torch.eye(3), torch.zeros(3), k=1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_sae(sae, tmp, metadata={"hook_name": "blocks.1.hook_resid_post"})
    ...     loaded = load_sae(tmp)
    >>> loaded.kind, loaded.k, loaded.info.where
    ('topk', 1, 'resid_post[1]')
    """
    if release is None:
        if path is None:
            raise SAEError("load_sae: pass a path, or release= and sae_id=")
        if sae_id is not None or revision is not None:
            raise SAEError("load_sae: sae_id= and revision= go with release=, not with a path")
        p = Path(path)
        if p.suffix == ".safetensors":
            return load_sae_file(p, cfg=cfg, device=device, dtype=dtype)
        if cfg is not None:
            raise SAEError("load_sae: cfg= is for single .safetensors files")
        return load_sae_dir(p, device=device, dtype=dtype)
    if path is not None:
        raise SAEError("load_sae: pass either a path or release=, not both")
    if isinstance(release, str):
        name = release
        if name not in RELEASES:
            raise SAEError(
                f"unknown SAE release {name!r}{suggest(name, RELEASES)}; built-in releases: "
                f"{', '.join(sorted(RELEASES))}; or pass an iv.sae.SAERelease"
            )
        table = RELEASES[name]
    elif isinstance(release, SAERelease):
        name, table = release.repo_id, release
    else:
        raise SAEError(f"load_sae: release must be a name or an SAERelease, got {release!r}")
    if sae_id is None:
        ids = [e.sae_id for e in table.saes]
        raise SAEError(f"load_sae: release {name!r} needs sae_id=; its SAEs: {', '.join(ids[:8])}")
    entry = table.entry(sae_id, name)
    folder = _download(
        table, entry, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    sae = load_sae_dir(
        folder, device=device, dtype=dtype, norm_scaling_factor=entry.norm_scaling_factor
    )
    from interventions.sae.disk import _read_json

    found = info_from_cfg(_read_json(folder / CFG_FILENAME)) or SAEInfo()
    hook = found.hook_name or entry.hook_name
    info = SAEInfo.from_hook(
        hook,
        found.hook_name_out,
        model_name=table.hf_model or table.model,
        release=name,
        sae_id=sae_id,
        neuronpedia_id=entry.neuronpedia_id or found.neuronpedia_id,
        prepend_bos=found.prepend_bos,
    )
    return sae.with_info(info)
