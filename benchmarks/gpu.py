"""Issue 14: the workloads on one CUDA GPU, in bf16, against hand-written hooks and peers.

Models (random weights, bf16, built from configs: no downloads): a GPT-2-small shape and a
~1.1B-parameter Llama shape (16 layers, d_model 2048, 32 heads / 8 KV heads, d_mlp 8192,
vocab 32000). Workloads on each, every contender timed in this process, interleaved:

* ``sweep``: resid_pre patch sweep, every layer x position of a 32-token prompt pair
  (package recipe on each backend vs the hand-batched hook optimum);
* ``reads``: resid_post of every layer, batch 8 x 128 tokens;
* ``sae``: an SAE (16k features) spliced at a middle layer, error kept, last position's
  logits read;
* ``steer``: a direction added to resid_post at a middle layer, logits read.

Circuit discovery, on the GPT-2-small shape only (torch backend; 4 prompt pairs of 16
tokens; the logit difference of two tokens at the last position):

* ``acdc``: :func:`interventions.circuits.acdc.acdc` over the edges into the logits from
  the last 4 layers' heads and MLPs (52 on GPT-2 small; every other edge stays in place;
  a pass costs mostly Python, so the loop takes seconds per ten edges), threshold
  ``ACDC_THRESHOLD``: the
  speculatively batched passes (``batch_size=8``) against the one-edge-per-forward loop
  (``batch_size=1``), the baseline of its row, and the same with ``guide="eap_ig"`` (its
  passes counted), timed once each after one warm-up (the loop alone is one pass per
  tested edge); the circuits' edges are compared (bf16: a
  score within rounding of the threshold may flip, which the row says);
* ``eap``: :func:`interventions.circuits.eap.edge_attribution` over every edge (EAP,
  two passes), against one plain forward and backward of the same prompts (its floor).

For each: median seconds over rounds (``torch.cuda.synchronize`` around every call), the
ratio to the hand-written hooks (or the row's baseline), and
``torch.cuda.max_memory_allocated`` during the call. Run: ``python benchmarks/gpu.py``
(about 4-6 minutes on one modern GPU); ``--quick`` for one small model and 2 rounds.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

NO_CUDA = (
    "benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing to run"
)


def build(shape: str, quick: bool) -> nn.Module:
    """A random-weight bf16 model of ``shape`` ("gpt2" or "llama-1b") on the GPU."""
    import transformers as t

    if shape == "gpt2":
        config: Any = t.GPT2Config(n_layer=2, n_embd=128, n_head=4) if quick else t.GPT2Config()
        cls: Any = t.GPT2LMHeadModel
    else:
        size = (
            dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2)
            if quick
            else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
        )
        config = t.LlamaConfig(
            num_attention_heads=32 if not quick else 8,
            num_key_value_heads=8 if not quick else 2,
            vocab_size=32000,
            max_position_embeddings=2048,
            **size,
        )
        cls = t.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config)
    return model.to(torch.bfloat16).eval()


def blocks(model: nn.Module) -> nn.ModuleList:
    inner: Any = getattr(model, "transformer", None) or model.model
    return inner.h if hasattr(inner, "h") else inner.layers


def timed(fn: Callable[[], Any], rounds: int, warm_up: bool = True) -> tuple[float, float, Any]:
    """Median seconds over ``rounds`` (after one warm-up call unless ``warm_up=False``) and
    the peak GPU memory (GiB)."""
    out = fn() if warm_up else None
    torch.cuda.synchronize()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return statistics.median(times), peak, out


# ---------------------------------------------------------------------------------------
# Hand-written hooks: the baselines


def hooks_reads(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [
        b.register_forward_hook(
            lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        for b in blocks(model)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return seen


def hooks_edit(
    model: nn.Module, ids: torch.Tensor, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, tuple):
            return (edit(out[0]), *out[1:])
        return edit(out)

    handle = blocks(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        handle.remove()


def hooks_sweep(model: nn.Module, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    from benchmarks._common import default_chunk, hooks_patch_sweep

    n_layers, seq = len(blocks(model)), clean.shape[1]
    cells = [(layer, pos) for layer in range(n_layers) for pos in range(seq)]
    chunk = default_chunk(model, len(cells) + 1, seq)
    return hooks_patch_sweep(model, clean, corrupt, cells, chunk, last_logits_only=True)[2]


# ---------------------------------------------------------------------------------------
# The package


def package(workload: str, model: nn.Module, backend: str, data: dict[str, Any]) -> Any:
    import interventions as iv
    from interventions.recipes import Metric, activation_patching

    if workload == "sweep":
        metric = Metric.logit_diff(int(data["clean"][0, -1]), int(data["corrupt"][0, -1]))
        return activation_patching(model, data["clean"], data["corrupt"], metric, backend=backend)
    g = iv.Graph()
    r = g.run("a", tokens=data["ids"])
    layer = data["layer"]
    if workload == "reads":
        for i in range(data["n_layers"]):
            r.read("resid_post", layer=i, name=f"r{i}")
    elif workload == "sae":
        r.sae_splice("resid_post", layer=layer, sae=data["sae"], error="keep")
        r.read("logits", pos=-1, name="out")
    else:
        r.add("resid_post", layer=layer, direction=data["direction"], scale=4.0)
        r.read("logits", pos=-1, name="out")
    return iv.run(g, model, backend=backend)


def workloads(model: nn.Module, quick: bool) -> dict[str, Any]:
    import interventions as iv

    d = model.config.hidden_size
    vocab = model.config.vocab_size
    n_layers = len(blocks(model))
    g = torch.Generator().manual_seed(0)
    seq = 16 if quick else 32
    clean = torch.randint(0, vocab, (1, seq), generator=g)
    corrupt = torch.randint(0, vocab, (1, seq), generator=g)
    width = 1024 if quick else 16384
    sae = iv.StandardSAE(
        torch.randn(d, width, generator=g) / d**0.5,
        torch.zeros(width),
        torch.randn(width, d, generator=g) / width**0.5,
        torch.zeros(d),
    )
    return {
        "clean": clean.cuda(),
        "corrupt": corrupt.cuda(),
        "ids": torch.randint(0, vocab, (8, 32 if quick else 128), generator=g).cuda(),
        "n_layers": n_layers,
        "layer": n_layers // 2,
        "sae": sae,
        "direction": torch.randn(d, generator=g),
    }


def baseline(workload: str, model: nn.Module, data: dict[str, Any]) -> Callable[[], Any]:
    if workload == "sweep":
        return lambda: hooks_sweep(model, data["clean"], data["corrupt"])
    if workload == "reads":
        return lambda: hooks_reads(model, data["ids"])
    if workload == "sae":
        sae = data["sae"]
        dtype = next(model.parameters()).dtype
        w_enc, b_enc = sae.W_enc.cuda().to(dtype), sae.b_enc.cuda().to(dtype)
        w_dec, b_dec = sae.W_dec.cuda().to(dtype), sae.b_dec.cuda().to(dtype)

        def splice(x: torch.Tensor) -> torch.Tensor:
            recon = torch.relu(x @ w_enc + b_enc) @ w_dec + b_dec
            return recon + (x - recon)  # error term kept, as the package does

        return lambda: hooks_edit(model, data["ids"], data["layer"], splice)
    direction = data["direction"].cuda().to(next(model.parameters()).dtype)
    return lambda: hooks_edit(model, data["ids"], data["layer"], lambda x: x + 4.0 * direction)


# ---------------------------------------------------------------------------------------
# Circuit discovery: ACDC (batched passes vs one edge per forward) and EAP

ACDC_THRESHOLD = 0.05  # on the logit difference of the random-weight model
ACDC_BATCH = 8


def circuit_data(
    model: nn.Module, prompts: int = 4, seq: int = 16, last_layers: int = 4
) -> dict[str, Any]:
    """Paired clean/corrupt prompts (``prompts`` x ``seq`` tokens, on the model's device),
    a logit-difference metric and ACDC's candidate edges: every edge into the logits from
    a head or MLP of the ``last_layers`` last layers."""
    from interventions.architectures import describe
    from interventions.circuits.edges import all_edges
    from interventions.recipes import Metric

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    config: Any = model.config
    vocab = config.vocab_size
    clean = torch.randint(0, vocab, (prompts, seq), generator=g).to(device)
    corrupt = torch.randint(0, vocab, (prompts, seq), generator=g).to(device)
    first = len(blocks(model)) - last_layers
    every = all_edges(describe(model))
    return {
        "clean": clean,
        "corrupt": corrupt,
        "metric": Metric.logit_diff(int(clean[0, -1]), int(corrupt[0, -1])),
        "edges": [
            e
            for e in every
            if e.downstream.kind == "logits"
            and e.upstream.layer is not None  # not embed
            and e.upstream.layer >= first
        ],
    }


def run_acdc(
    model: nn.Module, data: dict[str, Any], batch_size: int, guide: str | None = None
) -> Any:
    """ACDC over ``data``'s candidate edges, ``batch_size`` candidate runs per pass."""
    from interventions.circuits.acdc import acdc

    return acdc(
        model,
        data["clean"],
        data["corrupt"],
        data["metric"],
        threshold=ACDC_THRESHOLD,
        edges=data["edges"],
        batch_size=batch_size,
        guide=guide,  # type: ignore[arg-type]
    )


def run_eap(model: nn.Module, data: dict[str, Any]) -> Any:
    """EAP scores of every edge of ``model`` on ``data``'s prompts."""
    from interventions.circuits.eap import edge_attribution

    return edge_attribution(model, data["clean"], data["corrupt"], data["metric"])


def forward_backward(model: nn.Module, data: dict[str, Any]) -> None:
    """One plain forward and backward of the clean prompts' metric: EAP's floor."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=data["clean"], use_cache=False).logits[:, -1].float()
    data["metric"](logits).mean().backward()
    model.zero_grad(set_to_none=True)


def passes(circuit: Any) -> int:
    """How many graphs ACDC ran to find ``circuit``, its guide's included."""
    return int(circuit.stat("passes") + circuit.stat("guide_passes"))


def same_circuit(a: Any, b: Any) -> str:
    """Whether two ACDC circuits keep the same edges, in words for the table."""
    if set(a.edges) == set(b.edges):
        return f"same {len(a.edges)} edges"
    return f"{len(set(a.edges) ^ set(b.edges))} edges differ (bf16 near the threshold)"


def bench_circuits(shape: str, model: nn.Module, rounds: int) -> list[tuple[str, ...]]:
    """The ``acdc`` and ``eap`` rows (torch backend)."""
    data = circuit_data(model)
    rows: list[tuple[str, ...]] = []
    warm = {**data, "edges": data["edges"][-4:]}
    for batch_size in (1, ACDC_BATCH):  # warm-up: 4 edges each
        run_acdc(model, warm, batch_size)
    loop_s, loop_mem, loop = timed(lambda: run_acdc(model, data, 1), 1, warm_up=False)
    label = f"loop (batch_size=1, {passes(loop)} passes)"
    rows.append((shape, "acdc", label, f"{loop_s:.4f}", "1.00", f"{loop_mem:.2f}"))
    s, mem, fast = timed(lambda: run_acdc(model, data, ACDC_BATCH), 1, warm_up=False)
    label = f"torch (batch_size={ACDC_BATCH}, {passes(fast)} passes)"
    rows.append((shape, "acdc", label, f"{s:.4f}", f"{s / loop_s:.2f}", f"{mem:.2f}"))
    s, mem, guided = timed(lambda: run_acdc(model, data, ACDC_BATCH, "eap_ig"), 1, warm_up=False)
    label = f"torch (batch_size={ACDC_BATCH}, guide=eap_ig, {passes(guided)} passes)"
    rows.append((shape, "acdc", label, f"{s:.4f}", f"{s / loop_s:.2f}", f"{mem:.2f}"))
    print(f"  {shape} acdc done: {same_circuit(fast, loop)}, guided {same_circuit(guided, loop)}")
    base_s, base_mem, _ = timed(lambda: forward_backward(model, data), rounds)
    rows.append((shape, "eap", "fwd+bwd", f"{base_s:.4f}", "1.00", f"{base_mem:.2f}"))
    s, mem, _ = timed(lambda: run_eap(model, data), rounds)
    rows.append((shape, "eap", "torch", f"{s:.4f}", f"{s / base_s:.2f}", f"{mem:.2f}"))
    print(f"  {shape} eap done", flush=True)
    return rows


def bench_shape(shape: str, quick: bool, rounds: int, backends: list[str]) -> list[tuple[str, ...]]:
    """Every workload on one model shape: the hooks baseline, then each package backend."""
    model = build(shape, quick)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"\n{shape}: {params:.2f}B parameters", flush=True)
    data = workloads(model, quick)
    rows: list[tuple[str, ...]] = []
    for workload in ("sweep", "reads", "sae", "steer"):
        base_s, base_mem, _ = timed(baseline(workload, model, data), rounds)
        rows.append((shape, workload, "hooks", f"{base_s:.4f}", "1.00", f"{base_mem:.2f}"))
        for backend in backends:
            fn = functools.partial(package, workload, model, backend, data)
            try:
                s, mem, _ = timed(fn, rounds)
            except Exception as exc:  # a backend not installed or failing: say so, go on
                rows.append((shape, workload, backend, f"failed: {exc}"[:80], "", ""))
                continue
            rows.append((shape, workload, backend, f"{s:.4f}", f"{s / base_s:.2f}", f"{mem:.2f}"))
        print(f"  {shape} {workload} done", flush=True)
    if shape == "gpt2":
        rows += bench_circuits(shape, model, rounds)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--backends", default="torch,nnsight,pyvene", help="comma-separated package backends"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from benchmarks._common import quiet

    quiet()
    rounds = args.rounds or (2 if args.quick else 5)
    shapes = ("gpt2",) if args.quick else ("gpt2", "llama-1b")
    backends = [b for b in args.backends.split(",") if b]
    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; bf16; {rounds} rounds")
    rows: list[tuple[str, ...]] = []
    for shape in shapes:
        rows += bench_shape(shape, args.quick, rounds, backends)
        torch.cuda.empty_cache()
    header = ("model", "workload", "contender", "median s", "x hooks", "peak GiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
