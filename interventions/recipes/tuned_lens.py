"""The tuned lens (Belrose et al. 2023): per-layer affine translators, then the logit lens.

Translator ``l`` maps the residual stream after layer ``l`` to ``h + h @ W_l.T + b_l``
(``W_l``, ``b_l`` start at zero, so an untrained lens is the logit lens), trained to
minimise the KL divergence from the model's final next-token distribution to the decoded
one, ``KL(final || decode(translate_l(h_l)))`` averaged over every token of a dataset.
The last layer's translator stays the identity: its lens is the model's own output.

Reads come from any backend, in batches; training decodes with the local model's final
norm and unembedding (checked against the model's own logits first, so a family whose
head does more, e.g. logit soft-capping, is refused by name), so training needs local
weights. Applying a lens (:func:`tuned_lens`, :func:`lens_kl`) is a graph: the translated
residual is patched into the last block's output and the model decodes it, exactly like
:func:`~interventions.recipes.logit_lens`, on every backend.

Translators save and load as plain safetensors (``translators.<l>.weight`` /
``translators.<l>.bias``), nothing pickled.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=20)).eval()
>>> data = torch.randint(0, 20, (16, 6), generator=torch.Generator().manual_seed(0))
>>> lens = train_tuned_lens(model, data, steps=20)
>>> table = lens_kl(model, data, lens)
>>> bool((table.tuned <= table.logit + 1e-6).all())
True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes._dataset import Batch, Dataset, batches
from interventions.recipes.inputs import Tokens, _model, as_tokens
from interventions.recipes.lens import LogitLens

FORMAT = "interventions.tuned_lens/1"
#: The local decoder must reproduce the model's logits to this tolerance before training.
DECODER_ATOL = 1e-4


@dataclass(frozen=True, eq=False)
class TunedLens:
    """One affine translator per layer: ``h -> h + h @ weights[l].T + biases[l]``."""

    weights: tuple[torch.Tensor, ...]  # per layer [d, d]
    biases: tuple[torch.Tensor, ...]  # per layer [d]

    @classmethod
    def identity(cls, n_layers: int, d_model: int) -> TunedLens:
        """The untrained lens: the logit lens."""
        zeros = tuple(torch.zeros(d_model, d_model) for _ in range(n_layers))
        return cls(zeros, tuple(torch.zeros(d_model) for _ in range(n_layers)))

    def translate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The translated residual of ``layer`` (any leading shape, last axis ``d``)."""
        w, b = self.weights[layer].to(h), self.biases[layer].to(h)
        return h + h @ w.T + b

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the translators as one safetensors file; return its path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            tensors[f"translators.{layer}.weight"] = w.contiguous()
            tensors[f"translators.{layer}.bias"] = b.contiguous()
        save_file(
            tensors, str(out), metadata={"format": FORMAT, "n_layers": str(len(self.weights))}
        )
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TunedLens:
        """Read translators written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise SpecError(f"{path} is not a tuned lens file (format {meta.get('format')!r})")
        tensors = load_file(str(path))
        n = int(meta["n_layers"])
        return cls(
            tuple(tensors[f"translators.{layer}.weight"] for layer in range(n)),
            tuple(tensors[f"translators.{layer}.bias"] for layer in range(n)),
        )


def _residuals(
    model: nn.Module, batch: Batch, n_layers: int, backend: str, opts: dict[str, Any]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's residual ``[b, seq, d]`` and the final logits ``[b, seq, vocab]``."""
    g = Graph()
    r = batch.add_run(g, "base")
    for layer in range(n_layers):
        r.read("resid_post", layer=layer, name=f"resid.{layer}")
    r.read("logits", name="logits")
    res = run(g, model, backend=backend, **opts)
    return [res[f"resid.{layer}"].float() for layer in range(n_layers)], res["logits"].float()


def _decoder(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    info = describe(model)
    assert info.arch is not None
    norm = model.get_submodule(info.arch.final_norm)
    unembed = model.get_output_embeddings()  # type: ignore[operator]

    def decode(h: torch.Tensor) -> torch.Tensor:
        return unembed(norm(h)).float()

    return decode


def _kl(final: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(final || logits)`` per row (natural log)."""
    p = final.log_softmax(-1)
    return (p.exp() * (p - logits.float().log_softmax(-1))).sum(-1)


def _check_model(model: nn.Module) -> int:
    n_layers = describe(model).n_layers
    if n_layers is None:
        raise SpecError("the tuned lens needs a model with an architecture map")
    return n_layers


def train_tuned_lens(
    model: nn.Module | str,
    dataset: Dataset,
    *,
    steps: int = 250,
    lr: float = 1e-3,
    batch_size: int = 32,
    tokens_per_step: int = 4096,
    seed: int = 0,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> TunedLens:
    """Train translators on every token of ``dataset`` (prompts of any lengths).

    The residuals and final logits are read once (in batches of ``batch_size`` prompts,
    on ``backend``); then ``steps`` Adam steps at ``lr``, each on ``tokens_per_step``
    tokens drawn with ``seed``, minimise the summed per-layer KL to the final
    distribution. Deterministic for a given seed and data.
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    n_layers = _check_model(model)
    opts = {"tokenizer": tokenizer, **run_options}
    decode = _decoder(model)
    hs: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    finals: list[torch.Tensor] = []
    for batch in batches(dataset, batch_size=batch_size, tokenizer=tokenizer):
        resid, logits = _residuals(model, batch, n_layers, backend, opts)
        with torch.no_grad():
            mismatch = float((decode(resid[-1]) - logits).abs().max())
        if mismatch > DECODER_ATOL:
            raise SpecError(
                f"the final norm and unembedding of {type(model).__name__} do not reproduce its "
                f"logits (max error {mismatch:.2g}); the tuned lens cannot be trained on it"
            )
        for layer in range(n_layers):
            hs[layer].append(resid[layer].reshape(-1, resid[layer].shape[-1]))
        finals.append(logits.reshape(-1, logits.shape[-1]))
    data = [torch.cat(h) for h in hs]
    target = torch.cat(finals).log_softmax(-1)
    d_model = data[0].shape[1]
    weights = [torch.zeros(d_model, d_model, requires_grad=True) for _ in range(n_layers - 1)]
    biases = [torch.zeros(d_model, requires_grad=True) for _ in range(n_layers - 1)]
    params = [p for pair in zip(weights, biases, strict=True) for p in pair]
    model_params = [p for p in model.parameters() if p.requires_grad]
    for p in model_params:
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    try:
        if params:
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                idx = torch.randint(0, len(target), (tokens_per_step,), generator=generator)
                loss = torch.zeros(())
                for layer in range(n_layers - 1):
                    h = data[layer][idx]
                    out = decode(h + h @ weights[layer].T + biases[layer])
                    loss = loss + _kl(target[idx], out).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p in model_params:
            p.requires_grad_(True)
    trained = [w.detach().clone() for w in weights] + [torch.zeros(d_model, d_model)]
    trained_b = [b.detach().clone() for b in biases] + [torch.zeros(d_model)]
    return TunedLens(tuple(trained), tuple(trained_b))


def _decode_all(
    model: nn.Module,
    batch: Batch,
    residuals: Sequence[torch.Tensor],
    n_layers: int,
    backend: str,
    opts: dict[str, Any],
) -> list[torch.Tensor]:
    """Decode each residual ``[b, seq, d]`` by patching it into the last block's output."""
    g = Graph()
    for i, h in enumerate(residuals):
        r = batch.add_run(g, f"decode.{i}")
        r.patch("resid_post", layer=n_layers - 1, value=h)
        r.read("logits", name=f"decode.{i}")
    res = run(g, model, backend=backend, **opts)
    return [res[f"decode.{i}"].float() for i in range(len(residuals))]


def tuned_lens(
    model: nn.Module | str,
    tokens: Tokens,
    lens: TunedLens,
    *,
    tokens_of_interest: Sequence[int] = (),
    k: int = 5,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> LogitLens:
    """Like :func:`~interventions.recipes.logit_lens`, with each layer translated first
    (entry ``l`` decodes ``resid_post[l]``; the last entry is the model's own output)."""
    model, tokenizer = _model(model, tokenizer, run_options)
    n_layers = _check_model(model)
    ids = as_tokens(tokens, tokenizer, "lens")
    opts = {"tokenizer": tokenizer, **run_options}
    batch = Batch(tuple(range(ids.shape[0])), tokens=ids)
    resid, final = _residuals(model, batch, n_layers, backend, opts)
    translated = [lens.translate(layer, resid[layer]) for layer in range(n_layers - 1)]
    decoded = _decode_all(model, batch, translated, n_layers, backend, opts)
    logits = torch.stack([*decoded, final])
    probs = logits.softmax(-1)
    top = probs[:, 0].topk(min(k, probs.shape[-1]), dim=-1)
    chosen = list(tokens_of_interest)
    picked = probs[..., chosen].mean(1)
    labels = tuple(f"resid_post[{layer}]" for layer in range(n_layers))
    return LogitLens(top.indices, top.values, picked, logits, tuple(chosen), Graph(), labels)


@dataclass(frozen=True, eq=False)
class LensKL:
    """Per layer, the mean KL (nats) from the final distribution to each lens's."""

    labels: tuple[str, ...]
    logit: torch.Tensor  # [layers]
    tuned: torch.Tensor  # [layers]
    n_tokens: int

    def table(self) -> str:
        """The headline table: one row per layer."""
        lines = [f"{'layer':<16} {'logit lens':>11} {'tuned lens':>11}"]
        for label, a, b in zip(self.labels, self.logit.tolist(), self.tuned.tolist(), strict=True):
            lines.append(f"{label:<16} {a:11.4f} {b:11.4f}")
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """The table as plain data (JSON-ready): one dict per layer."""
        return [
            {"layer": label, "logit_lens": a, "tuned_lens": b}
            for label, a, b in zip(
                self.labels, self.logit.tolist(), self.tuned.tolist(), strict=True
            )
        ]

    def plot(self, path: str | os.PathLike[str], *, title: str = "") -> Path:
        """Per-layer KL of the logit lens and the tuned lens as a line plot PNG (needs
        matplotlib; without it an :class:`~interventions.errors.InterventionError` whose
        cause is the ``ImportError``).

        >>> import os, tempfile
        >>> t = LensKL(("a", "b"), torch.tensor([0.5, 0.0]), torch.tensor([0.2, 0.0]), 8)
        >>> t.plot(os.path.join(tempfile.mkdtemp(), "kl.png")).stat().st_size > 0
        True
        """
        from interventions.plots import _pyplot

        plt = _pyplot()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(self.labels) + 2), 3), dpi=110)
        xs = list(range(len(self.labels)))
        ax.plot(xs, self.logit.tolist(), marker="o", label="logit lens")
        ax.plot(xs, self.tuned.tolist(), marker="s", label="tuned lens")
        ax.set_xticks(xs, labels=list(self.labels), rotation=45, ha="right")
        ax.set_ylabel("KL(final || lens), nats")
        ax.set_title(title or f"lens KL per layer ({self.n_tokens} tokens)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out


def lens_kl(
    model: nn.Module | str,
    dataset: Dataset,
    lens: TunedLens,
    *,
    batch_size: int = 32,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> LensKL:
    """Mean ``KL(final || lens)`` per layer over every token of ``dataset``, for the logit
    lens and the tuned lens, both decoded by the model through a graph."""
    model, tokenizer = _model(model, tokenizer, run_options)
    n_layers = _check_model(model)
    opts = {"tokenizer": tokenizer, **run_options}
    logit_sum = torch.zeros(n_layers, dtype=torch.float64)
    tuned_sum = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    for batch in batches(dataset, batch_size=batch_size, tokenizer=tokenizer):
        resid, final = _residuals(model, batch, n_layers, backend, opts)
        inner = resid[:-1]
        translated = [lens.translate(layer, h) for layer, h in enumerate(inner)]
        decoded = _decode_all(model, batch, [*inner, *translated], n_layers, backend, opts)
        for layer in range(n_layers - 1):
            logit_sum[layer] += _kl(final, decoded[layer]).sum().double()
            tuned_sum[layer] += _kl(final, decoded[n_layers - 1 + layer]).sum().double()
        count += final.shape[0] * final.shape[1]
    labels = tuple(f"resid_post[{layer}]" for layer in range(n_layers))
    return LensKL(labels, (logit_sum / count).float(), (tuned_sum / count).float(), count)
