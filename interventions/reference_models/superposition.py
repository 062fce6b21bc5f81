"""A toy model of superposition (Elhage et al. 2022) and an SAE that finds its features.

The model squeezes ``n = 20`` sparse features through a ``d = 5`` bottleneck with tied
weights, exactly as in the paper::

    h  = W x                 # down: nn.Linear(20, 5, bias=False), W = down.weight [5, 20]
    x' = ReLU(W^T h + b)     # up: TiedDecoder sharing W, with its own bias b [20]; relu

Each feature is active with probability ``FEATURE_PROBABILITY = 0.05`` with a magnitude
uniform in ``[0, 1]`` (:func:`feature_batch`), and the reconstruction loss weighs feature
``i`` by its importance ``IMPORTANCE_DECAY ** i`` (``0.9 ** i``).  At this sparsity the
model represents about 15 of the 20 features in 5 dimensions (columns of ``W`` with norm
~1.1; the least important columns collapse to ~0): superposition.  Feature ``i`` is
written into the hidden space along column ``W[:, i]``, which is therefore the *true
feature direction* of feature ``i``.

A ReLU SAE (:class:`interventions.StandardSAE`, ``d_sae = 40``, decoder rows of unit
norm) trained on the hidden activations ``h`` (the raw site ``"down.output"``) with an
L1-penalised reconstruction loss recovers those directions: :func:`feature_recovery` gives,
for each true feature, the largest cosine between its column of ``W`` and any SAE decoder
row.  Measured on seeds 0 / 1 / 2:

=========================================  ========  ========  ========
                                           seed 0    seed 1    seed 2
=========================================  ========  ========  ========
represented features (column norm >= 0.5)  14        15        15
most important features all represented    0-11      0-13      0-13
min / mean cosine over represented         0.976 /   0.969 /   0.954 /
                                           0.990     0.992     0.989
represented features with cosine > 0.9     14/14     15/15     15/15
=========================================  ========  ========  ========

(The dropped features' columns have norm ~0.01, so their cosines, 0.69-0.95, are noise.)

The model is a plain :class:`torch.nn.Module` with no architecture map, so experiments use
raw sites (``"down.output"``, ``"up.output"``, ``"relu.output"``) and runs with
``inputs=`` a float tensor ``[batch, 20]``.  Training the model takes 4-40 s and the SAE
6-45 s on one CPU core, depending on the machine's load.

Committed files (``weights/superposition/``): ``config.json`` (model settings, training
settings, seeds), ``model.safetensors`` (``down.weight``, ``up.bias``), and the SAE in
SAELens's layout, ``cfg.json`` + ``sae_weights.safetensors`` (so
``interventions.load_sae`` reads the directory too).  Nothing is pickled.

Command line::

    python -m interventions.reference_models.superposition --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from interventions.sae import StandardSAE, load_sae, save_sae

__all__ = [
    "D_HIDDEN",
    "D_SAE",
    "FEATURE_PROBABILITY",
    "HIDDEN_SITE",
    "IMPORTANCE_DECAY",
    "N_FEATURES",
    "REPRESENTED_NORM",
    "WEIGHTS_DIR",
    "TiedDecoder",
    "ToyModel",
    "feature_batch",
    "feature_directions",
    "feature_recovery",
    "format_recovery",
    "importance",
    "load_superposition",
    "load_superposition_model",
    "main",
    "represented_features",
    "save_superposition",
    "train_sae",
    "train_superposition",
]

# --------------------------------------------------------------------------- constants

N_FEATURES: int = 20
D_HIDDEN: int = 5
FEATURE_PROBABILITY: float = 0.05
IMPORTANCE_DECAY: float = 0.9

MODEL_STEPS: int = 5000
MODEL_BATCH_SIZE: int = 1024
MODEL_LR: float = 1e-3

D_SAE: int = 40
SAE_STEPS: int = 6000
SAE_BATCH_SIZE: int = 1024
SAE_LR: float = 3e-3
#: L1 coefficient on the feature activations (decoder rows have unit norm).  Smaller values
#: (1e-2 .. 3e-2) reconstruct better but blend the ~15 packed directions; 0.2 (6000 steps) gave
#: cosine > 0.95 for every represented feature on seeds 0-2.
SAE_L1: float = 0.2

#: The raw site the SAE reads and writes: the bottleneck activation ``h``.
HIDDEN_SITE: str = "down.output"
#: A feature counts as represented when its column of ``W`` has at least this norm
#: (represented columns have norm ~1.0-1.15, dropped ones ~0.01).
REPRESENTED_NORM: float = 0.5

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights" / "superposition"
_MODEL_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"


def importance(n_features: int = N_FEATURES, decay: float = IMPORTANCE_DECAY) -> torch.Tensor:
    """Importance of each feature in the loss: ``decay ** i``, shape ``[n_features]``."""
    return decay ** torch.arange(n_features, dtype=torch.float32)


# --------------------------------------------------------------------------- model


class TiedDecoder(nn.Module):
    """``h @ weight + bias``: the transpose of an encoder's weight, shared, plus a bias.

    ``weight`` is the encoder's own :class:`~torch.nn.Parameter` (``[d_hidden,
    n_features]``), registered here too, so the two modules always hold the same tensor.
    """

    def __init__(self, weight: nn.Parameter, n_features: int) -> None:
        super().__init__()
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(n_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight + self.bias


class ToyModel(nn.Module):
    """``x' = ReLU(W^T W x + b)`` with named submodules ``down``, ``up``, ``relu``.

    ``forward(x)`` takes features ``[..., n_features]`` and returns their reconstruction.
    """

    def __init__(self, n_features: int = N_FEATURES, d_hidden: int = D_HIDDEN) -> None:
        super().__init__()
        self.n_features = n_features
        self.d_hidden = d_hidden
        self.down = nn.Linear(n_features, d_hidden, bias=False)
        nn.init.xavier_normal_(self.down.weight)
        self.up = TiedDecoder(self.down.weight, n_features)  # type: ignore[arg-type]
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.up(self.down(x)))


def feature_directions(model: ToyModel) -> torch.Tensor:
    """The true feature directions in the hidden space: ``W``'s columns, ``[n, d]``."""
    return model.down.weight.detach().T.clone()


def represented_features(model: ToyModel, min_norm: float = REPRESENTED_NORM) -> torch.Tensor:
    """``BoolTensor [n_features]``: features whose column of ``W`` has norm ``>= min_norm``."""
    return model.down.weight.detach().norm(dim=0) >= min_norm


# --------------------------------------------------------------------------- data


def feature_batch(
    batch_size: int,
    generator: torch.Generator,
    *,
    n_features: int = N_FEATURES,
    probability: float = FEATURE_PROBABILITY,
) -> torch.Tensor:
    """Sparse feature vectors ``[batch_size, n_features]``: each entry is non-zero with
    ``probability``, with a magnitude uniform in ``[0, 1]`` (a function of ``generator``)."""
    magnitude = torch.rand(batch_size, n_features, generator=generator)
    active = torch.rand(batch_size, n_features, generator=generator) < probability
    return magnitude * active


# --------------------------------------------------------------------------- training


def _with_threads(num_threads: int | None) -> int:
    old = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return old


def train_superposition(
    seed: int = 0,
    steps: int = MODEL_STEPS,
    *,
    batch_size: int = MODEL_BATCH_SIZE,
    lr: float = MODEL_LR,
    num_threads: int | None = 1,
    log: bool = False,
) -> ToyModel:
    """Train the toy model with the importance-weighted squared error, deterministically.

    ``torch.manual_seed(seed)`` fixes the initialisation and a ``torch.Generator`` seeded
    with ``seed`` the data, so equal arguments (and thread count) give equal weights.
    Returns the model in eval mode.
    """
    old_threads = _with_threads(num_threads)
    try:
        torch.manual_seed(seed)
        model = ToyModel()
        weight = importance()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for step in range(steps):
            x = feature_batch(batch_size, gen)
            loss = ((model(x) - x) ** 2 * weight).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log and (step % 1000 == 0 or step == steps - 1):
                print(f"model step {step:5d}  loss {loss.item():.5f}", flush=True)
        return model.eval()
    finally:
        torch.set_num_threads(old_threads)


def train_sae(
    model: ToyModel,
    seed: int = 0,
    steps: int = SAE_STEPS,
    *,
    d_sae: int = D_SAE,
    batch_size: int = SAE_BATCH_SIZE,
    lr: float = SAE_LR,
    l1: float = SAE_L1,
    num_threads: int | None = 1,
    log: bool = False,
) -> StandardSAE:
    """Train a ReLU SAE on the model's hidden activations ``h = down(x)``.

    Loss: ``|| decode(encode(h)) - h ||^2 + l1 * sum(f)``, with ``f = relu((h - b_dec) W_enc
    + b_enc)`` (``apply_b_dec_to_input``); the decoder rows are renormalised to unit norm
    after every Adam step (linear learning-rate decay to 0).  The decoder rows start as the
    directions of ``d_sae`` random non-negligible activations and the encoder as their
    transpose.  Data come from a ``torch.Generator`` seeded with ``seed + 1000``
    (independent of the model's training stream).  Returns the SAE as
    :class:`~interventions.StandardSAE` (float32).
    """
    old_threads = _with_threads(num_threads)
    try:
        torch.manual_seed(seed)
        down = model.down.weight.detach()
        gen = torch.Generator().manual_seed(seed + 1000)

        def hidden(n: int) -> torch.Tensor:
            return feature_batch(n, gen) @ down.T

        pool = hidden(64 * d_sae)
        pool = pool[pool.norm(dim=-1) > 0.2]
        if pool.shape[0] < d_sae:
            raise RuntimeError("too few non-zero activations to initialise the SAE")
        W_dec = nn.Parameter(F.normalize(pool[:d_sae], dim=-1))
        W_enc = nn.Parameter(W_dec.detach().T.clone())
        b_enc = nn.Parameter(torch.zeros(d_sae))
        b_dec = nn.Parameter(torch.zeros(model.d_hidden))
        params = [W_enc, b_enc, W_dec, b_dec]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
        for step in range(steps):
            h = hidden(batch_size)
            f = torch.relu((h - b_dec) @ W_enc + b_enc)
            recon = f @ W_dec + b_dec
            mse = ((recon - h) ** 2).sum(-1).mean()
            loss = mse + l1 * f.sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=-1, keepdim=True))
            if log and (step % 1000 == 0 or step == steps - 1):
                print(f"sae step {step:5d}  loss {loss.item():.5f}  mse {mse.item():.5f}")
        return StandardSAE(
            W_enc.detach().clone(),
            b_enc.detach().clone(),
            W_dec.detach().clone(),
            b_dec.detach().clone(),
            apply_b_dec_to_input=True,
        )
    finally:
        torch.set_num_threads(old_threads)


def feature_recovery(sae: StandardSAE, model: ToyModel) -> torch.Tensor:
    """Per true feature, the largest cosine between ``W[:, i]`` and any SAE decoder row.

    Returns ``[n_features]``.  Only represented features (:func:`represented_features`)
    have a meaningful direction; the others' columns are ~0 and their cosines are noise.
    """
    true = F.normalize(feature_directions(model), dim=-1)  # [n, d]
    dec = F.normalize(sae.W_dec.detach().float(), dim=-1)  # [d_sae, d]
    return (true @ dec.T).max(dim=-1).values


# --------------------------------------------------------------------------- save / load


def save_superposition(
    model: ToyModel, sae: StandardSAE, out: str | Path, *, info: dict[str, Any] | None = None
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``cfg.json``, ``sae_weights.safetensors``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        "down.weight": model.down.weight.detach().contiguous(),
        "up.bias": model.up.bias.detach().contiguous(),
    }
    save_file(tensors, str(out / _MODEL_FILE))
    config = {
        "model": "ToyModel",
        "n_features": model.n_features,
        "d_hidden": model.d_hidden,
        "feature_probability": FEATURE_PROBABILITY,
        "importance_decay": IMPORTANCE_DECAY,
        "sae_site": HIDDEN_SITE,
        **(info or {}),
    }
    (out / _CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_sae(sae, out, metadata={"hook_name": HIDDEN_SITE, "model_name": "superposition"})
    return out


def load_superposition_model(path: str | Path | None = None) -> ToyModel:
    """The committed toy model (or the one saved at ``path``), in eval mode."""
    directory = WEIGHTS_DIR if path is None else Path(path)
    config = json.loads((directory / _CONFIG_FILE).read_text())
    model = ToyModel(int(config["n_features"]), int(config["d_hidden"]))
    tensors = load_file(str(directory / _MODEL_FILE))
    with torch.no_grad():
        model.down.weight.copy_(tensors["down.weight"])
        model.up.bias.copy_(tensors["up.bias"])
    return model.eval()


def load_superposition(path: str | Path | None = None) -> tuple[ToyModel, StandardSAE]:
    """``(model, sae)`` from the committed weights (or from ``path``)."""
    directory = WEIGHTS_DIR if path is None else Path(path)
    sae = load_sae(directory)
    if not isinstance(sae, StandardSAE):  # pragma: no cover - the file says "standard"
        raise TypeError(f"expected a StandardSAE in {directory}, got {type(sae).__name__}")
    return load_superposition_model(directory), sae


# --------------------------------------------------------------------------- CLI


def format_recovery(cosines: torch.Tensor, represented: torch.Tensor) -> str:
    """One line per feature: importance rank, represented or not, best cosine."""
    lines = []
    for i, (cos, rep) in enumerate(zip(cosines.tolist(), represented.tolist(), strict=True)):
        lines.append(f"  feature {i:2d}  {'represented' if rep else 'dropped    '}  cos {cos:.3f}")
    n_rep = int(represented.sum())
    good = int((cosines[represented] > 0.9).sum())
    lines.append(f"represented {n_rep}/{len(cosines)}; recovered (cos > 0.9) {good}/{n_rep}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Train, save and evaluate the toy model and its SAE."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=MODEL_STEPS)
    parser.add_argument("--sae-steps", type=int, default=SAE_STEPS)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--quiet", action="store_true", help="no training log")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = train_superposition(args.seed, args.steps, log=not args.quiet)
    t_model = time.perf_counter() - start
    sae = train_sae(model, args.seed, args.sae_steps, log=not args.quiet)
    t_sae = time.perf_counter() - start - t_model
    info = {"seed": args.seed, "steps": args.steps, "sae_steps": args.sae_steps}
    out = save_superposition(model, sae, args.out, info=info)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"trained seed {args.seed}: model {t_model:.1f}s, SAE {t_sae:.1f}s -> {out} ({size} B)")
    model2, sae2 = load_superposition(out)
    x = feature_batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.equal(model(x), model2(x)) and torch.equal(sae.W_dec, sae2.W_dec)
    print(f"reload is identical: {same}")
    print(format_recovery(feature_recovery(sae2, model2), represented_features(model2)))


if __name__ == "__main__":
    main()
