"""SAE benchmarks (issue 12): feature harvesting and SAE training against hand-written loops.

1. Harvesting: ``iv.harvest_features`` (graphs in batches, top-k kept) against a hand-written
   batched loop (a forward pre-hook, ``encode``, the same top-k / density / histogram
   reductions), over N = 500, 2000 and 5000 prompts of a fixed context length. Each N runs
   in its own child process, so its peak RSS is its own: memory flat in N shows as peak RSS
   that does not grow with N. The two contenders alternate within the child (ours first,
   then the baseline, then ours again; the ratio uses the mean of ours).
2. Training: ``iv.train_sae`` (ReLU + L1) against a minimal hand-written PyTorch loop (the
   same loss, Adam, decoder renormalisation and linear decay) on the same activations,
   given to ``train_sae`` through an identity module. Tokens per second, ratio.

Ratios are ``baseline time / our time`` (>= 0.9 is the target: at most ~10% slower).

    .venv/bin/python benchmarks/saes.py            # the full run
    .venv/bin/python benchmarks/saes.py --quick    # smaller, a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import torch
import torch.nn.functional as F
from torch import nn

import interventions as iv

LAYER = 2
FEATURES = list(range(0, 64, 4))  # 16 features


def _model() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=2048, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _sae(d: int, d_sae: int) -> iv.StandardSAE:
    g = torch.Generator().manual_seed(1)
    w = F.normalize(torch.randn(d_sae, d, generator=g), dim=-1)
    return iv.StandardSAE(w.T.clone(), torch.zeros(d_sae), w, torch.zeros(d))


def _prompts(n: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 2048, (n, seq), generator=torch.Generator().manual_seed(2))


def hand_harvest(model: nn.Module, sae: Any, prompts: torch.Tensor, batch: int, k: int) -> Any:
    """The baseline: hooks, encode, per-prompt max, top-k merge, density, a histogram."""
    idx = torch.tensor(FEATURES)
    top = torch.full((len(FEATURES), k), -math.inf)
    nonzero = torch.zeros(len(FEATURES), dtype=torch.long)
    hist = torch.zeros(len(FEATURES), 32)
    got: dict[str, torch.Tensor] = {}
    h = model.transformer.h[LAYER].register_forward_pre_hook(  # type: ignore[union-attr]
        lambda m, a: got.__setitem__("x", a[0])
    )
    try:
        with torch.no_grad():
            for lo in range(0, prompts.shape[0], batch):
                model(prompts[lo : lo + batch])
                f = sae.encode(got["x"])[..., idx]  # [B, P, F]
                best = f.max(dim=1).values.T
                top = torch.cat([top, best.masked_fill(best <= 0, -math.inf)], 1).topk(k, 1).values
                flat = f.reshape(-1, len(FEATURES))
                nonzero += (flat > 0).sum(0)
                for j in range(len(FEATURES)):
                    v = flat[:, j]
                    hist[j] += torch.histc(v[v > 0], bins=32, min=0, max=10)
    finally:
        h.remove()
    return top, nonzero


def ours_harvest(model: nn.Module, sae: Any, prompts: torch.Tensor, batch: int, k: int) -> Any:
    with torch.no_grad():
        return iv.harvest_features(
            model, sae, prompts, FEATURES, site="resid_pre", layer=LAYER, batch_size=batch, top_k=k
        )


def harvest_child(n: int, quick: bool) -> None:
    cm.setup()
    model = _model()
    d = model.config.n_embd  # type: ignore[union-attr]
    sae = _sae(d, 8 * d)
    prompts = _prompts(n, 16 if quick else 24)
    batch, k = 64, 10
    ours_harvest(model, sae, prompts[:batch], batch, k)  # warm-up
    hand_harvest(model, sae, prompts[:batch], batch, k)
    times: dict[str, list[float]] = {"ours": [], "hand": []}
    results: dict[str, Any] = {}
    for name in ("ours", "hand", "ours"):
        fn = ours_harvest if name == "ours" else hand_harvest
        t = time.perf_counter()
        results[name] = fn(model, sae, prompts, batch, k)
        times[name].append(time.perf_counter() - t)
    dash, (top, nonzero) = results["ours"], results["hand"]
    ours_top = torch.tensor([[ex.max_value for ex in c.examples] for c in dash.features])
    assert ours_top.shape == top.shape, (ours_top.shape, top.shape)  # every feature fires
    torch.testing.assert_close(ours_top, top, atol=1e-4, rtol=1e-4)
    assert [c.n_nonzero for c in dash.features] == nonzero.tolist()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ours = sum(times["ours"]) / len(times["ours"])
    tokens = n * prompts.shape[1]
    print(json.dumps({"n": n, "ours": ours, "hand": times["hand"][0], "tokens": tokens,
                      "rss_mb": rss_mb}))  # fmt: skip


def _hand_train(acts: list[torch.Tensor], d_sae: int, batch: int, l1: float, lr: float) -> float:
    """Minimal ReLU + L1 SAE training loop; returns seconds."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    d = acts[0].shape[1]
    rows = acts[0][torch.randint(acts[0].shape[0], (d_sae,), generator=gen)]
    w_dec = nn.Parameter(F.normalize(rows, dim=-1))  # decoder rows from data, as train_sae
    w_enc = nn.Parameter(w_dec.detach().T.clone())
    b_enc, b_dec = nn.Parameter(torch.zeros(d_sae)), nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr)
    n_steps = sum(math.ceil(a.shape[0] / batch) for a in acts)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(1 - s / n_steps, 0.0))
    for a in acts:
        order = torch.randperm(a.shape[0], generator=gen)
        for lo in range(0, a.shape[0], batch):
            x = a[order[lo : lo + batch]]
            f = torch.relu((x - b_dec) @ w_enc + b_enc)
            recon = f @ w_dec + b_dec
            loss = ((recon - x) ** 2).sum(-1).mean() + l1 * (f * w_dec.norm(dim=-1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                w_dec.div_(w_dec.norm(dim=-1, keepdim=True))
    return time.perf_counter() - start


def training(quick: bool) -> None:
    cm.setup()
    torch.set_flush_denormal(True)  # both loops: no slow denormal arithmetic on CPU
    d, d_sae, batch = (64, 512, 512) if quick else (128, 1024, 1024)
    n_chunks = 2 if quick else 4
    g = torch.Generator().manual_seed(3)
    acts = [torch.randn(8192, d, generator=g) for _ in range(n_chunks)]
    tokens = sum(a.shape[0] for a in acts)
    net = nn.Sequential(nn.Identity())

    def ours() -> float:
        start = time.perf_counter()
        iv.train_sae(net, "0.output", acts, d_sae=d_sae, batch_size=batch, progress=False)
        return time.perf_counter() - start

    ours()  # warm-up
    _hand_train(acts[:1], d_sae, batch, 0.2, 3e-3)
    t_ours, t_hand = [], []
    for _ in range(2 if quick else 3):
        t_ours.append(ours())
        t_hand.append(_hand_train(acts, d_sae, batch, 0.2, 3e-3))
    o, h = sorted(t_ours)[len(t_ours) // 2], sorted(t_hand)[len(t_hand) // 2]
    print(f"\ntraining: ReLU+L1, d_in {d}, d_sae {d_sae}, batch {batch}, {tokens} vectors/run")
    print(f"  hand-written loop  {tokens / h:10.0f} tokens/s  ({h:.2f} s)")
    print(f"  iv.train_sae       {tokens / o:10.0f} tokens/s  ({o:.2f} s)")
    print(f"  ratio (ours / hand throughput): {h / o:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--harvest-child", type=int)
    args = parser.parse_args()
    if args.harvest_child is not None:
        harvest_child(args.harvest_child, args.quick)
        return
    sizes = (100, 300) if args.quick else (500, 2000, 5000)
    print(
        "harvesting: 16 features, top-10, GPT-2 4 layers d 128, 24-token prompts (16 quick), batch 64"
    )
    print(
        f"{'N':>6} {'hand s':>8} {'ours s':>8} {'ratio':>7} {'tok/s ours':>11} {'peak RSS MB':>12}"
    )
    for n in sizes:
        cmd = [sys.executable, __file__, "--harvest-child", str(n)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=cm.ROOT, check=False)
        if out.returncode != 0:
            print(f"{n:>6} failed: {out.stderr[-400:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{n:>6} {r['hand']:8.2f} {r['ours']:8.2f} {r['hand'] / r['ours']:6.3f}x "
            f"{r['tokens'] / r['ours']:11.0f} {r['rss_mb']:12.0f}"
        )
    training(args.quick)


if __name__ == "__main__":
    main()
