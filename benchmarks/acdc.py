"""ACDC on the induction reference model: the package's speculatively batched passes
against a hand-written one-edge-per-forward loop (Conmy et al.'s loop), measured in the
same process, interleaved, medians over rounds.

The baseline, ``hand loop``, is plain torch on the Llama modules, no ``interventions``
code: one forward of the corrupt prompts caches every node's output, then one forward per
tested edge, in ACDC's order, computes each downstream input (each head's own q, k, v
input, each MLP's and the final norm's input) as the residual stream plus, for every edge
removed so far into it, (the upstream's corrupt output - its output in this forward);
heads are batched (one einsum per projection, attention for all heads at once), and the
copies of the residual stream are made only for inputs that have removed edges. It skips
edges into nodes whose every outgoing edge is removed, as the package does, so both test
the same edges. The package's own ``batch_size=1`` loop is reported too, and each batch
size with ``guide="eap_ig"`` (EAP-IG guesses which edges stay; its two passes are counted
in the passes column, its gradient points are not in the runs column, its time is in the
wall time). ``--oracle-guide`` adds a guide that is never wrong (the loop's own circuit):
the floor of passes and runs that guessing can reach.

All give the same circuit (checked every call: the same edges, scores within 1e-4).
Reported: passes (graphs run, or forwards of the hand loop; the planner makes each graph
one forward pass of the candidates and one of the corrupt run), candidate runs
(forward-equivalents of the prompts), wall time, the median per-round wall ratio against
the hand loop, and the circuit's faithfulness. Target (issue 11): >= 5x faster than the
loop.

    .venv/bin/python benchmarks/acdc.py [--repeats 3] [--prompts 16 4] [--batch-sizes 8 32]
        [--oracle-guide]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import (  # type: ignore[import-not-found]
    Contender,
    check_round,
    fmt_s,
    fmt_x,
    label,
    load_average,
    median,
    ratio,
    setup,
    table,
    timed_rounds,
    versions,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from interventions.architectures import describe
from interventions.circuits.acdc import acdc
from interventions.circuits.circuit import Circuit
from interventions.circuits.edges import all_edges
from interventions.circuits.evaluate import score_circuit
from interventions.circuits.tasks import task_data
from interventions.reference_models.induction import load_induction_model

Key = tuple[Any, ...]  # ("embed",), ("head", L, H), ("mlp", L)


def _hand_forward(
    model: Any,
    ids: torch.Tensor,
    removed: dict[Key, list[Key]],
    bad: dict[Key, torch.Tensor] | None,
) -> tuple[torch.Tensor, dict[Key, torch.Tensor]]:
    """(last-position logits, node outputs) of the Llama ``model`` with the edges
    ``removed[input] = [upstreams]`` patched from the corrupt outputs ``bad``."""
    cfg = model.config
    n, n_kv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    outs: dict[Key, torch.Tensor] = {}

    def delta(key: Key) -> torch.Tensor | None:
        ups = removed.get(key)
        if not ups:
            return None
        assert bad is not None
        return sum(bad[u] - outs[u] for u in ups)  # type: ignore[return-value]

    def project(
        norm: Any, resid: torch.Tensor, part: str, count: int, weight: torch.Tensor
    ) -> torch.Tensor:
        """[b, heads, p, dh]: each head's projection of its own input copy (shared when
        no edge into that part of this layer is removed)."""
        deltas = {h: d for h in range(count) if (d := delta((part, layer, h))) is not None}
        if not deltas:
            out = norm(resid) @ weight.T
            return out.unflatten(-1, (count, dh)).transpose(1, 2)
        x = resid.unsqueeze(2).repeat(1, 1, count, 1)
        for h, d in deltas.items():
            x[:, :, h] += d
        return torch.einsum("bphd,hed->bhpe", norm(x), weight.view(count, dh, -1))

    inner = model.model
    resid = inner.embed_tokens(ids)
    outs[("embed",)] = resid
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    cos, sin = inner.rotary_emb(resid, positions)
    p = ids.shape[1]
    causal = torch.ones(p, p, dtype=torch.bool).tril()
    for layer, block in enumerate(inner.layers):
        attn, norm = block.self_attn, block.input_layernorm
        q = project(norm, resid, "q", n, attn.q_proj.weight)
        k = project(norm, resid, "k", n_kv, attn.k_proj.weight)
        v = project(norm, resid, "v", n_kv, attn.v_proj.weight)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(n // n_kv, 1), v.repeat_interleave(n // n_kv, 1)
        scores = (q @ k.transpose(-1, -2)) * dh**-0.5
        z = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [b, h, p, dh]
        w_o = attn.o_proj.weight.view(-1, n, dh)  # [d, h, dh]
        heads = torch.einsum("bhpe,dhe->bhpd", z, w_o)
        for h in range(n):
            outs[("head", layer, h)] = heads[:, h]
        resid = resid + heads.sum(1)
        d = delta(("mlp", layer))
        mlp_in = resid if d is None else resid + d
        outs[("mlp", layer)] = block.mlp(block.post_attention_layernorm(mlp_in))
        resid = resid + outs[("mlp", layer)]
    d = delta(("logits",))
    final = resid if d is None else resid + d
    return model.lm_head(inner.norm(final[:, -1])), outs


def _key(node: Any, part: str | None = None) -> Key:
    if node.kind == "embed":
        return ("embed",)
    if node.kind == "logits":
        return ("logits",)
    if node.kind == "mlp":
        return ("mlp", node.layer)
    return (part, node.layer, node.head) if part else ("head", node.layer, node.head)


def hand_acdc(
    model: Any, clean: torch.Tensor, corrupt: torch.Tensor, answer: torch.Tensor, threshold: float
) -> Circuit:
    """Conmy et al.'s loop by hand (logit metric, ``abs`` change, resample ablation)."""
    every = all_edges(describe(model))
    rows = torch.arange(clean.shape[0])
    outgoing: dict[Any, set[Any]] = {}
    for e in every:
        outgoing.setdefault(e.upstream, set()).add(e)
    _, bad = _hand_forward(model, corrupt, {}, None)

    def metric(removed: list[Any]) -> float:
        table: dict[Key, list[Key]] = {}
        for e in removed:
            table.setdefault(_key(e.downstream, e.input), []).append(_key(e.upstream))
        logits, _ = _hand_forward(model, clean, table, bad)
        return float(logits[rows, answer].mean())

    current = metric([])
    removed: list[Any] = []
    gone: set[Any] = set()
    kept: dict[Any, float] = {}
    forwards = 1
    for e in reversed(every):
        down = e.downstream
        if down.kind != "logits" and outgoing[down] <= gone:
            removed.append(e)  # a dead node's input: removing it changes nothing
            gone.add(e)
            continue
        value = metric([*removed, e])
        forwards += 1
        if abs(value - current) < threshold:
            removed.append(e)
            gone.add(e)
            current = value
        else:
            kept[e] = abs(value - current)
    edges = [e for e in every if e in kept]
    return Circuit(
        tuple(edges),
        tuple(kept[e] for e in edges),
        "hand",
        stats=(("passes", float(forwards + 1)), ("runs", float(forwards - 1))),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--oracle-guide",
        action="store_true",
        help="also time a guide that is never wrong (the hand loop's circuit): the floor",
    )
    args = parser.parse_args()
    setup(args.threads)
    print(versions())
    print(f"load average {load_average()}; {args.threads} thread(s)")
    model = load_induction_model()
    for n in args.prompts:
        bench(model, n, args)


def bench(model: Any, n: int, args: argparse.Namespace) -> None:
    clean, corrupt, metric = task_data("induction", n=n, seed=0)

    def make(bs: int, guide: Any = None) -> Any:
        return lambda: acdc(
            model, clean, corrupt, metric, threshold=args.threshold, batch_size=bs, guide=guide
        )

    answer = metric.answer
    loop = Contender(
        "hand loop (one edge per forward)",
        lambda: hand_acdc(model, clean, corrupt, answer, args.threshold),
    )
    contenders = [loop, Contender("interventions, batch_size=1", make(1))]
    for b in args.batch_sizes:
        contenders += [
            Contender(f"interventions, batch_size={b}", make(b)),
            Contender(f"interventions, batch_size={b}, guide=eap_ig", make(b, "eap_ig")),
        ]
    if args.oracle_guide:  # the floor: a guide that is never wrong (the loop's own circuit)
        oracle = hand_acdc(model, clean, corrupt, answer, args.threshold)
        contenders += [
            Contender(f"interventions, batch_size={b}, oracle guide", make(b, oracle))
            for b in args.batch_sizes
        ]
    label(contenders)
    want: dict[str, Circuit] = {}

    def compare(c: Contender, got: Circuit) -> str:
        want.setdefault("c", got)
        ref = want["c"]
        if got.edges != ref.edges:
            raise AssertionError(f"{len(got.edges)} edges against {len(ref.edges)}")
        diff = max((abs(a - b) for a, b in zip(got.scores, ref.scores, strict=True)), default=0)
        if diff > 1e-4:
            raise AssertionError(f"scores differ by {diff:.2e}")
        found[c.name] = got
        return f"same {len(got.edges)} edges"

    found: dict[str, Circuit] = {}
    print(f"\n{n} prompts x {clean.shape[1]} positions, threshold {args.threshold}:")
    check_round(contenders, compare)
    timed_rounds(contenders, args.repeats, compare)
    rows = []
    base_passes = found[loop.name].stat("passes")
    for c in contenders:
        circ = found[c.name]
        passes = circ.stat("passes") + (circ.stat("guide_passes") if c is not loop else 0)
        rows.append(
            [
                c.name,
                f"{passes:.0f}",
                fmt_x(base_passes / passes),
                f"{circ.stat('runs'):.0f}",
                fmt_s(median(c.times)),
                fmt_x(1 / ratio(c, loop)) if c is not loop else "1.00x",
                fmt_x(1 / ratio(c, loop, cpu=True)) if c is not loop else "1.00x",
                c.check,
            ]
        )
    print(
        table(
            rows,
            [
                "contender",
                "passes",
                "fewer passes",
                "runs",
                "wall s",
                "speed-up",
                "cpu speed-up",
                "check",
            ],
        )
    )
    circ = found[loop.name]
    s = score_circuit(model, circ, clean, corrupt, metric)
    print(
        f"circuit: {len(circ.edges)} of 110 edges, faithfulness {s.faithfulness:.3f}, "
        f"completeness {s.completeness:.3f}"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
