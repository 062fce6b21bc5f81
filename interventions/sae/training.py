"""Training SAEs on activations streamed through a read graph.

:func:`train_sae` reads the site with ``iv.run`` of a one-read graph per dataset batch, so
the activations can come from any backend (``backend="nnsight", remote=True`` for NDIF),
and trains with one of the standard objectives, on ``n`` activation vectors ``x``:

============  ==================================================================================
``kind``      loss (``f`` the features, ``x_hat`` the reconstruction)
============  ==================================================================================
``relu``      ``mean ||x_hat - x||^2 + l1 * mean sum_i f_i ||W_dec[i]||`` (ReLU + L1)
``topk``      ``mean ||x_hat - x||^2`` with the ``k`` largest pre-activations kept
``jumprelu``  ``mean ||x_hat - x||^2 + l0 * mean sum_i H(pre_i - threshold_i)``, the step
              ``H`` and the threshold trained by a straight-through estimator (rectangle kernel
              of width ``bandwidth``; Rajamanoharan et al. 2024)
============  ==================================================================================

Decoder rows start as the directions of random activations of the first batch (non-zero
ones), the encoder as their transpose, biases at zero; for ``relu`` the decoder rows are
renormalised to unit norm after each Adam step. The learning rate decays linearly to 0.
Checkpoints and the result are SAELens directories (:func:`~interventions.sae.save_sae`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interventions.errors import SAEError
from interventions.sae.disk import save_sae
from interventions.sae.info import SAEInfo
from interventions.sae.kinds import AnySAE, JumpReLUSAE, StandardSAE, TopKSAE

__all__ = ["TRAIN_KINDS", "TrainStats", "activation_batches", "train_sae"]

TRAIN_KINDS = ("relu", "topk", "jumprelu")
"""The objectives :func:`train_sae` knows."""


@dataclass(frozen=True)
class TrainStats:
    """What a training run did: steps, activation vectors seen, seconds, last losses."""

    steps: int
    tokens: int
    seconds: float
    loss: float
    mse: float
    l0: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class _Step(torch.autograd.Function):
    """Heaviside step ``H(z - t)`` whose threshold gradient is a rectangle-kernel estimate."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((z - threshold).abs() < eps / 2).to(z.dtype)
        return None, (-grad * near / eps).sum(dim=0), None


class _JumpReLU(torch.autograd.Function):
    """``z * H(z - t)``: gradient to ``z`` where it fires, to ``t`` by the same estimator."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        fires = (z > threshold).to(z.dtype)
        near = ((z - threshold).abs() < eps / 2).to(z.dtype)
        return grad * fires, (-grad * threshold * near / eps).sum(dim=0), None


def activation_batches(
    model: nn.Module,
    site: str,
    dataset: Iterable[Any],
    *,
    layer: int | None = None,
    backend: str = "torch",
    tokenizer: Any = None,
    exclude_bos: bool = False,
    **options: Any,
) -> Iterator[Tensor]:
    """Activations ``[n, d]`` of ``site`` for each batch of ``dataset``, read with ``iv.run``.

    A batch is token ids (an int tensor), a float tensor of model inputs, or text (with
    ``tokenizer``). Positions are flattened into vectors; ``exclude_bos`` drops position 0.
    """
    from interventions.execute import run
    from interventions.graph import Graph

    for i, batch in enumerate(dataset):
        g = Graph()
        if isinstance(batch, Tensor) and batch.is_floating_point():
            handle = g.run(f"b{i}", inputs=batch)
        elif isinstance(batch, Tensor):
            handle = g.run(f"b{i}", tokens=batch)
        else:
            handle = g.run(f"b{i}", text=batch)
        handle.read(site, layer, name="acts")
        acts = run(g, model, backend=backend, tokenizer=tokenizer, **options)["acts"]
        if exclude_bos and acts.ndim >= 3:
            acts = acts[:, 1:]
        yield acts.detach().reshape(-1, acts.shape[-1]).float()


def _init(first: Tensor, d_sae: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    norms = first.norm(dim=-1)
    pool = first[norms > norms.mean() * 0.2] if first.shape[0] > 1 else first
    if pool.shape[0] == 0:
        raise SAEError("train_sae: the first batch of activations is all zero")
    idx = torch.randint(pool.shape[0], (d_sae,), generator=gen)
    w_dec = F.normalize(pool[idx] + 1e-3 * torch.randn(d_sae, pool.shape[1], generator=gen), dim=-1)
    return w_dec.T.clone(), w_dec


def train_sae(
    model: nn.Module,
    site: str,
    dataset: Iterable[Any],
    *,
    layer: int | None = None,
    kind: str = "relu",
    d_sae: int,
    steps: int | None = None,
    batch_size: int = 1024,
    lr: float = 3e-3,
    l1: float = 0.2,
    k: int = 8,
    l0: float = 1e-2,
    threshold: float = 1e-2,
    bandwidth: float = 1e-2,
    seed: int = 0,
    backend: str = "torch",
    tokenizer: Any = None,
    exclude_bos: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    out: str | Path | None = None,
    progress: bool | None = None,
    stats: list[TrainStats] | None = None,
    **options: Any,
) -> AnySAE:
    """Train an SAE of ``kind`` (``relu``, ``topk``, ``jumprelu``) on ``site`` of ``model``.

    ``dataset`` yields batches of model inputs (token ids, float inputs or text); each is read
    through a graph on ``backend`` (``options`` go to ``iv.run``, e.g. ``remote=True``) and
    cut into minibatches of ``batch_size`` vectors for Adam (``lr``). ``steps`` bounds the
    steps (by default one pass over ``dataset``; the dataset must then have a length for the
    learning-rate schedule). Every ``checkpoint_every`` steps the SAE is saved under
    ``checkpoint_dir/step_<n>``; the result also under ``out``. A tqdm bar shows the loss
    (``progress``, default on a terminal); ``stats`` (a list) receives a :class:`TrainStats`.

    >>> import torch, interventions as iv
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4))
    >>> data = [torch.randn(64, 3) for _ in range(4)]
    >>> sae = iv.train_sae(net, "0.output", data, d_sae=8, batch_size=32, progress=False)
    >>> sae.kind, sae.d_in, sae.d_sae
    ('relu', 4, 8)
    """
    if kind not in TRAIN_KINDS:
        raise SAEError(f"train_sae: unknown kind {kind!r}; kinds: {', '.join(TRAIN_KINDS)}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise SAEError("train_sae: checkpoint_every= needs checkpoint_dir=")
    total = steps
    if total is None:
        try:
            total = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise SAEError("train_sae: pass steps= for a dataset without a length") from None
    gen = torch.Generator().manual_seed(seed)
    batches = activation_batches(
        model, site, dataset, layer=layer, backend=backend, tokenizer=tokenizer,
        exclude_bos=exclude_bos, **options,
    )  # fmt: skip
    params: dict[str, nn.Parameter] = {}
    opt: torch.optim.Optimizer | None = None
    sched: Any = None
    step, seen, start = 0, 0, time.perf_counter()
    loss_v = mse_v = l0_v = float("nan")
    info = SAEInfo(site=site, layer=layer)
    bar = _bar(progress, total)
    try:
        for acts in batches:
            if not params:
                w_enc, w_dec = _init(acts, d_sae, gen)
                d_in = acts.shape[-1]
                params = {
                    "W_enc": nn.Parameter(w_enc),
                    "b_enc": nn.Parameter(torch.zeros(d_sae)),
                    "W_dec": nn.Parameter(w_dec),
                    "b_dec": nn.Parameter(torch.zeros(d_in)),
                }
                if kind == "jumprelu":
                    params["log_threshold"] = nn.Parameter(torch.full((d_sae,), threshold).log())
                opt = torch.optim.Adam(list(params.values()), lr=lr)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, _linear_decay(max(int(total), 1)))
            assert opt is not None
            order = torch.randperm(acts.shape[0], generator=gen)
            for lo in range(0, acts.shape[0], batch_size):
                if steps is not None and step >= steps:
                    break
                x = acts[order[lo : lo + batch_size]]
                loss, mse, l0_now = _loss(params, x, kind, l1=l1, k=k, l0=l0, bandwidth=bandwidth)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if kind == "relu":
                    with torch.no_grad():
                        params["W_dec"].div_(params["W_dec"].norm(dim=-1, keepdim=True))
                step += 1
                seen += x.shape[0]
                loss_v, mse_v, l0_v = float(loss.detach()), float(mse), float(l0_now)
                if bar is not None:
                    bar.update(1)
                    if step % 50 == 0:
                        bar.set_postfix(loss=f"{loss_v:.4g}", mse=f"{mse_v:.4g}", l0=f"{l0_v:.3g}")
                if checkpoint_every and step % checkpoint_every == 0:
                    assert checkpoint_dir is not None
                    save_sae(_result(params, kind, k, info), Path(checkpoint_dir) / f"step_{step}")
            if steps is not None and step >= steps:
                break
    finally:
        if bar is not None:
            bar.close()
    if not params:
        raise SAEError("train_sae: the dataset gave no batches")
    sae = _result(params, kind, k, info)
    if stats is not None:
        stats.append(TrainStats(step, seen, time.perf_counter() - start, loss_v, mse_v, l0_v))
    if out is not None:
        save_sae(sae, out)
    return sae


def _linear_decay(n_steps: int) -> Any:
    return lambda s: max(1.0 - s / n_steps, 0.0)


def _bar(progress: bool | None, total: int | None) -> Any:
    import sys

    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train_sae", leave=False)


def _loss(
    p: dict[str, nn.Parameter], x: Tensor, kind: str, *, l1: float, k: int, l0: float,
    bandwidth: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    if kind == "relu":
        f = torch.relu(pre)
        penalty = l1 * (f * p["W_dec"].norm(dim=-1)).sum(-1).mean()
    elif kind == "topk":
        top = torch.topk(pre, k=k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        penalty = pre.new_zeros(())
    else:
        thr = p["log_threshold"].exp()
        z = torch.relu(pre)
        f = _JumpReLU.apply(z, thr, bandwidth)
        penalty = l0 * _Step.apply(z, thr, bandwidth).sum(-1).mean()
    recon = f @ p["W_dec"] + p["b_dec"]
    mse = ((recon - x) ** 2).sum(-1).mean()
    return mse + penalty, mse.detach(), (f > 0).float().sum(-1).mean()


def _result(p: dict[str, nn.Parameter], kind: str, k: int, info: SAEInfo) -> AnySAE:
    t = {name: v.detach().clone() for name, v in p.items()}
    common = (t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"])
    sae: AnySAE
    if kind == "relu":
        sae = StandardSAE(*common, apply_b_dec_to_input=True)
    elif kind == "topk":
        sae = TopKSAE(*common, k=k, apply_b_dec_to_input=True)
    else:
        sae = JumpReLUSAE(*common, threshold=t["log_threshold"].exp(), apply_b_dec_to_input=True)
    return sae.with_info(info)
