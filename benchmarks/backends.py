"""Issue 3: each adapter against hand-written code for its own backend.

For every workload there are four or more ways to do it: hand-written plain hooks,
hand-written nnsight, hand-written pyvene, and this package on the matching backend
(torch, nnsight, pyvene). All run in this process, interleaved (one call of each per
round, order rotated), and each adapter is reported as the median over rounds of its time
divided by its hand-written counterpart's time in the same round (target <= 1.05x).

Workloads, on the GPT-2-small-shaped model (random weights, fp32, CPU):

a. reads: every layer's resid_post for one batch (8 prompts x 18 tokens);
b. sweep: the 12 x 18 resid_pre patch sweep of ``patch_sweep.py``, each backend in its
   best batched form, every one asking the model for the last position's logits only
   (``logits_to_keep=1``, as the adapters do): hooks = the hand-batched optimum; nnsight =
   one trace per chunk with
   the corrupted copies stacked and patched by indexed writes; pyvene =
   ``VanillaIntervention`` with ``source_representations`` over a batch (one call per
   layer, its 18 positions as 18 batch rows);
c. sae: a random ReLU SAE (d_sae = 4 x 768) spliced into resid_post of layer 6 with the
   error term kept (8 x 18 tokens; full logits out);
d. steer: a vector added to resid_post of layer 6 at every position while generating 20
   greedy tokens (4 prompts x 18 tokens).

Every implementation's output is checked against the hand-written hooks' before timing.
If an adapter is missing or fails on a workload, its cell shows the error and the rest
goes on, so the script picks the adapters up as they start working.

Run: ``.venv/bin/python benchmarks/backends.py`` (a few minutes on 2 idle cores), or
``--quick`` (tiny model, 1 repeat, < 60 s). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import torch

TARGET = 1.05
BACKENDS = ("torch", "nnsight", "pyvene")
HAND = {"torch": "hooks", "nnsight": "nnsight", "pyvene": "pyvene"}


@dataclass
class Workload:
    key: str
    title: str
    tol: float
    inner: int  # calls per timed sample (short workloads are repeated to be measurable)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 repeat (< 60 s)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    ap.add_argument(
        "--only", default="", help="comma-separated workloads to run (reads,sweep,sae,steer)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 2; 1 with --quick, where tiny ops on a busy machine "
        "would mostly measure OpenMP waiting)",
    )
    args = ap.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    threads = args.threads if args.threads is not None else (1 if args.quick else 2)
    cm.setup(threads)
    started = time.perf_counter()

    model = cm.build_gpt2(args.quick)
    n_layers, d_model, vocab = model.config.n_layer, model.config.n_embd, model.config.vocab_size
    seq = 8 if args.quick else 18
    batch = 8
    gen_batch, new_tokens = 4, 20
    mid = n_layers // 2  # layer 6 of 12
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    gen_ids = ids[:gen_batch]
    clean, corrupt = cm.prompt_pair(vocab, seq)
    cells = [(layer, pos) for layer in range(n_layers) for pos in range(seq)]
    chunk = cm.default_chunk(model, len(cells) + 2, seq)
    with torch.no_grad():
        answer = int(model(clean).logits[0, -1].argmax())
        wrong = int(model(corrupt).logits[0, -1].argmax())
    if answer == wrong:
        wrong = (answer + 1) % vocab
    sae = random_sae(d_model, 4 * d_model, seed=2)
    with torch.no_grad():
        _, resid = cm.hooks_capture_resid_pre(model, gen_ids)
    steer = torch.randn(d_model, generator=torch.Generator().manual_seed(3))
    # a direction about as long as the residual stream at that layer, so it changes tokens
    steer = steer / steer.norm() * float(resid[mid].norm(dim=-1).mean())

    inner = 1 if args.quick else 5  # calls per timed sample of the short workloads
    workloads = {
        "reads": Workload(
            "reads", f"a. read resid_post of all {n_layers} layers, {batch} x {seq}", 1e-4, inner
        ),
        "sweep": Workload(
            "sweep",
            f"b. resid_pre patch sweep, {n_layers} x {seq} = {len(cells)} patches, rows of {chunk}",
            1e-3,
            1,
        ),
        "sae": Workload(
            "sae",
            f"c. SAE splice (d_sae {4 * d_model}, error kept) at resid_post[{mid}], {batch} x {seq}",
            1e-3,
            inner,
        ),
        "steer": Workload(
            "steer",
            f"d. steering at resid_post[{mid}], every position, {new_tokens} greedy tokens, {gen_batch} x {seq}",
            0,
            1,
        ),
    }
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    if only:
        unknown = [w for w in only if w not in workloads]
        if unknown:
            ap.error(f"unknown workloads {unknown}; choose from {list(workloads)}")
        workloads = {k: v for k, v in workloads.items() if k in only}

    print("backends benchmark (issue 3): each adapter vs hand-written code for its backend")
    print(f"  model    {cm.describe_model(model)}")
    print(f"  versions {cm.versions()}")
    print(f"  threads  {torch.get_num_threads()}; load average {cm.load_average()}")
    print(f"  rounds   1 check/warm-up round + {repeats} timed rounds, interleaved")
    for w in workloads.values():
        extra = f", each sample = {w.inner} calls" if w.inner > 1 else ""
        print(f"  {w.title}{extra}")
    print()

    # --- the hand-written code per backend (each peer wraps a private copy of the model) ---
    hand: dict[str, dict[str, Callable[[], Any]]] = {k: {} for k in workloads}
    setup_errors: dict[str, str] = {}
    hand_setups = {
        "hooks": lambda: hooks_impl(
            model, ids, clean, corrupt, cells, chunk, sae, mid, steer, gen_ids, new_tokens
        ),
        "nnsight": lambda: nnsight_impl(
            model, ids, clean, corrupt, cells, chunk, sae, mid, steer, gen_ids, new_tokens
        ),
        "pyvene": lambda: pyvene_impl(
            model, ids, clean, corrupt, sae, mid, steer, gen_ids, new_tokens
        ),
    }
    for lib, make in hand_setups.items():
        try:
            impls = make()
        except Exception as exc:
            setup_errors[lib] = cm.short_error(exc, 300)
            continue
        for k in workloads:
            hand[k][lib] = impls[k]

    # --- this package --------------------------------------------------------------------
    def ours(backend: str) -> dict[str, Callable[[], Any]]:
        return package_impl(
            model, ids, clean, corrupt, answer, wrong, sae, mid, steer, gen_ids, new_tokens, backend
        )

    # --- contenders ------------------------------------------------------------------------
    contenders: list[cm.Contender] = []
    pairs: dict[tuple[str, str], tuple[cm.Contender, cm.Contender]] = {}
    metric_ids = (answer, wrong)
    for key, w in workloads.items():
        for backend in BACKENDS:
            lib = HAND[backend]
            if lib in hand[key]:
                h = cm.Contender(
                    f"{key}: {lib} (hand-written)", repeat(hand[key][lib], w.inner), key
                )
            else:
                h = cm.Contender(f"{key}: {lib} (hand-written)", lambda: None, key)
                h.error = "setup failed: " + setup_errors.get(lib, "?")
            a = cm.Contender(
                f"{key}: interventions[{backend}]", repeat(ours(backend)[key], w.inner), key
            )
            pairs[(key, backend)] = (h, a)
            contenders += [h, a]
    cm.label(contenders)

    # --- check ------------------------------------------------------------------------------
    print("check: every output vs the hand-written hooks' (assert_close; tokens: identical)")
    reference: dict[str, torch.Tensor] = {}

    def compare(c: cm.Contender, result: Any) -> str:
        key = c.group
        out = summarize(key, result, metric_ids)
        if c.name == f"{key}: hooks (hand-written)":
            reference[key] = out
            return f"reference {key} {tuple(out.shape)}"
        if key not in reference:
            raise RuntimeError("the hand-written hooks reference failed")
        return cm.agree(c.name, out, reference[key], workloads[key].tol)

    for c in contenders:
        if c.error is not None:
            print(f"  {c.tag:>4} {c.name:<40} ERROR {c.error}")
    cm.check_round([c for c in contenders if c.error is None], compare)
    print()

    # --- timing ---------------------------------------------------------------------------
    print(f"timing: {repeats} rounds (the numbers in brackets are the contenders above)")
    cm.timed_rounds(contenders, repeats, compare)
    print()

    # --- report -----------------------------------------------------------------------------
    print(
        f"adapter / hand-written, per workload and backend (target <= {TARGET}x). wall = "
        "wall-clock, cpu = CPU seconds of this process (steadier on a busy machine); seconds "
        "are medians per call, ratios medians of per-round ratios"
    )
    rows = []
    for key, w in workloads.items():
        for backend in BACKENDS:
            h, a = pairs[(key, backend)]
            hs = cm.fmt_s(cm.median(h.times) / w.inner) if h.times else "error"
            as_ = cm.fmt_s(cm.median(a.times) / w.inner) if a.times else "error"
            if h.times and a.times:
                r, rc = cm.ratio(a, h), cm.ratio(a, h, cpu=True)
                verdict = f"{'OK' if r <= TARGET else 'OVER'}"
                rs, rcs = cm.fmt_x(r), cm.fmt_x(rc)
            else:
                rs = rcs = "-"
                verdict = "; ".join(
                    f"{who}: {c.error}" for who, c in (("hand", h), ("adapter", a)) if c.error
                )[:140]
            for who, c in (("hand", h), ("adapter", a)):
                if not c.ok:
                    verdict += f"; {who} output differs"
            rows.append([key if backend == "torch" else "", backend, hs, as_, rs, rcs, verdict])
    header = ["workload", "backend", "hand wall s", "ours wall s", "ratio", "cpu ratio", "verdict"]
    print(cm.table(rows, header))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


def repeat(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    if n == 1:
        return fn

    def many() -> Any:
        out = None
        for _ in range(n):
            out = fn()
        return out

    return many


def summarize(key: str, result: Any, metric_ids: tuple[int, int]) -> torch.Tensor:
    """What is compared across implementations, as one tensor."""
    if key == "sweep":  # [rows, vocab] last-position logits, or a [layers, seq] grid
        if isinstance(result, torch.Tensor) and result.ndim == 2 and result.shape[-1] > 64:
            return result[:, metric_ids[0]] - result[:, metric_ids[1]]
        return result.reshape(-1)
    return result


# ---------------------------------------------------------------------------------------
# A random ReLU SAE


def random_sae(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.01,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.01,
    }


def sae_splice(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """encode, decode, add the error term back: what a hand-written splice does."""
    f = torch.relu(x @ p["W_enc"] + p["b_enc"])
    recon = f @ p["W_dec"] + p["b_dec"]
    return recon + (x - recon)


# ---------------------------------------------------------------------------------------
# Hand-written: plain hooks


def hooks_impl(
    model: Any,
    ids: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    cells: list[tuple[int, int]],
    chunk: int,
    sae: dict[str, torch.Tensor],
    mid: int,
    steer: torch.Tensor,
    gen_ids: torch.Tensor,
    new_tokens: int,
) -> dict[str, Callable[[], Any]]:
    blocks = cm.blocks(model)
    n_layers, seq = len(blocks), clean.shape[1]

    def reads() -> torch.Tensor:
        out: dict[int, torch.Tensor] = {}
        handles = [
            b.register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o))
            for i, b in enumerate(blocks)
        ]
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return torch.stack([out[i] for i in range(n_layers)])

    def sweep() -> torch.Tensor:
        _, _, patched = cm.hooks_patch_sweep(
            model, clean, corrupt, cells, chunk, last_logits_only=True
        )
        return patched  # [cells, vocab]

    def sae_run() -> torch.Tensor:
        h = blocks[mid].register_forward_hook(lambda m, a, o: sae_splice(o, sae))
        try:
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits
        finally:
            h.remove()

    def steer_run() -> torch.Tensor:
        h = blocks[mid].register_forward_hook(lambda m, a, o: o + steer)
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=gen_ids,
                    attention_mask=torch.ones_like(gen_ids),
                    generation_config=cm.greedy_config(new_tokens),
                )
        finally:
            h.remove()
        return out[:, gen_ids.shape[1] :]

    del seq
    return {"reads": reads, "sweep": sweep, "sae": sae_run, "steer": steer_run}


# ---------------------------------------------------------------------------------------
# Hand-written: nnsight 0.8


def nnsight_impl(
    model: Any,
    ids: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    cells: list[tuple[int, int]],
    chunk: int,
    sae: dict[str, torch.Tensor],
    mid: int,
    steer: torch.Tensor,
    gen_ids: torch.Tensor,
    new_tokens: int,
) -> dict[str, Callable[[], Any]]:
    import nnsight

    nm = cm.nnsight_model(model, model.config.vocab_size)
    n_layers = model.config.n_layer
    gen_config = cm.greedy_config(new_tokens)

    def reads() -> torch.Tensor:
        with torch.no_grad(), nm.trace(ids, use_cache=False):
            hs = nnsight.save([nm.transformer.h[i].output for i in range(n_layers)])
        return torch.stack(hs)

    def sweep() -> torch.Tensor:
        with torch.no_grad():
            with nm.trace(clean, use_cache=False):
                clean_hs = nnsight.save([nm.transformer.h[i].input for i in range(n_layers)])
            rows: list[tuple[int, int] | None] = [None, *cells]
            outs = []
            for part in cm.chunks(len(rows), chunk):
                per_layer: dict[int, tuple[list[int], list[int]]] = {}
                for j, i in enumerate(part):
                    cell = rows[i]
                    if cell is not None:
                        per_layer.setdefault(cell[0], ([], []))[0].append(j)
                        per_layer[cell[0]][1].append(cell[1])
                plan = [
                    (layer, torch.tensor(r), torch.tensor(p))
                    for layer, (r, p) in sorted(per_layer.items())
                ]
                with nm.trace(corrupt.expand(len(part), -1), use_cache=False, logits_to_keep=1):
                    for layer, r, p in plan:
                        nm.transformer.h[layer].input[r, p] = clean_hs[layer][0, p]
                    logits = nm.lm_head.output[:, -1].save()
                outs.append(logits)
        return torch.cat(outs)[1:]

    def sae_run() -> torch.Tensor:
        with torch.no_grad(), nm.trace(ids, use_cache=False):
            x = nm.transformer.h[mid].output
            nm.transformer.h[mid].output = sae_splice(x, sae)
            logits = nm.lm_head.output.save()
        return logits

    def steer_run() -> torch.Tensor:
        with (
            torch.no_grad(),
            nm.generate(
                gen_ids, attention_mask=torch.ones_like(gen_ids), generation_config=gen_config
            ) as tracer,
        ):
            for _ in tracer.iter[:new_tokens]:
                nm.transformer.h[mid].output = nm.transformer.h[mid].output + steer
            out = tracer.result.save()
        return out[:, gen_ids.shape[1] :]

    return {"reads": reads, "sweep": sweep, "sae": sae_run, "steer": steer_run}


# ---------------------------------------------------------------------------------------
# Hand-written: pyvene 0.1.8


def pyvene_impl(
    model: Any,
    ids: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    sae: dict[str, torch.Tensor],
    mid: int,
    steer: torch.Tensor,
    gen_ids: torch.Tensor,
    new_tokens: int,
) -> dict[str, Callable[[], Any]]:
    import pyvene as pv

    pm = cm.private_copy(model)
    n_layers, seq = model.config.n_layer, clean.shape[1]

    def collector(component: str, n_pos: int) -> Any:
        return pv.IntervenableModel(
            [
                {
                    "layer": layer,
                    "component": component,
                    "unit": "pos",
                    "max_number_of_units": n_pos,
                    "intervention_type": pv.CollectIntervention,
                }
                for layer in range(n_layers)
            ],
            model=pm,
        )

    read_all = collector("block_output", ids.shape[1])
    read_clean = collector("block_input", seq)
    patchers = [
        pv.IntervenableModel(
            {
                "layer": layer,
                "component": "block_input",
                "unit": "pos",
                "max_number_of_units": 1,
                "intervention_type": pv.VanillaIntervention,
            },
            model=pm,
        )
        for layer in range(n_layers)
    ]

    class SAESplice(pv.SourcelessIntervention):  # type: ignore[misc]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(keep_last_dim=True, **kwargs)

        def forward(
            self, base: torch.Tensor, source: Any = None, subspaces: Any = None, **kw: Any
        ) -> torch.Tensor:
            return sae_splice(base, sae)

    splicer = pv.IntervenableModel(
        pv.IntervenableConfig(
            representations=[
                pv.RepresentationConfig(
                    layer=mid, component="block_output", intervention=SAESplice()
                )
            ]
        ),
        model=pm,
    )
    steerer = pv.IntervenableModel(
        {"layer": mid, "component": "block_output", "intervention_type": pv.AdditionIntervention},
        model=pm,
    )
    gen_config = cm.greedy_config(new_tokens)

    def reads() -> torch.Tensor:
        with torch.no_grad():
            (_, acts), _ = read_all(
                {"input_ids": ids},
                unit_locations={"base": [[list(range(ids.shape[1]))] * ids.shape[0]] * n_layers},
            )
        return torch.stack(acts)

    def sweep() -> torch.Tensor:
        outs = []
        with torch.no_grad():
            (_, clean_hs), _ = read_clean(
                {"input_ids": clean}, unit_locations={"base": [[list(range(seq))]] * n_layers}
            )
            outs.append(pm(input_ids=corrupt, use_cache=False, logits_to_keep=1).logits[:, -1])
            for layer in range(n_layers):
                # one call per layer: its seq positions are seq batch rows
                _, patched = patchers[layer](
                    # the base dict is the model's keyword arguments
                    {"input_ids": corrupt.expand(seq, -1), "logits_to_keep": 1},
                    unit_locations={"sources->base": (None, [[[p] for p in range(seq)]])},
                    source_representations=clean_hs[layer][0].unsqueeze(1),
                    use_cache=False,
                )
                outs.append(patched.logits[:, -1])
        return torch.cat(outs)[1:]

    def sae_run() -> torch.Tensor:
        with torch.no_grad():
            _, out = splicer({"input_ids": ids}, use_cache=False)
        return out.logits

    def steer_run() -> torch.Tensor:
        with torch.no_grad():
            _, out = steerer.generate(
                {"input_ids": gen_ids, "attention_mask": torch.ones_like(gen_ids)},
                intervene_on_prompt=True,
                source_representations=steer,
                generation_config=gen_config,
            )
        return out[:, gen_ids.shape[1] :]

    return {"reads": reads, "sweep": sweep, "sae": sae_run, "steer": steer_run}


# ---------------------------------------------------------------------------------------
# This package


def package_impl(
    model: Any,
    ids: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    answer: int,
    wrong: int,
    sae: dict[str, torch.Tensor],
    mid: int,
    steer: torch.Tensor,
    gen_ids: torch.Tensor,
    new_tokens: int,
    backend: str,
) -> dict[str, Callable[[], Any]]:
    import interventions as iv
    from interventions.recipes import Metric, activation_patching

    n_layers = model.config.n_layer
    metric = Metric.logit_diff(answer, wrong)
    standard_sae = iv.StandardSAE(sae["W_enc"], sae["b_enc"], sae["W_dec"], sae["b_dec"])

    def reads() -> torch.Tensor:
        g = iv.Graph()
        run = g.run("a", tokens=ids)
        for layer in range(n_layers):
            run.read("resid_post", layer=layer, name=f"r{layer}")
        res = iv.run(g, model, backend=backend)
        return torch.stack([res[f"r{layer}"] for layer in range(n_layers)])

    def sweep() -> torch.Tensor:
        res = activation_patching(
            model, clean, corrupt, metric, site="resid_pre", backend=backend, normalize=False
        )
        return res.scores

    def sae_run() -> torch.Tensor:
        g = iv.Graph()
        run = g.run("a", tokens=ids)
        run.sae_splice("resid_post", layer=mid, sae=standard_sae, error="keep")
        run.read("logits", name="logits")
        return iv.run(g, model, backend=backend)["logits"]

    def steer_run() -> torch.Tensor:
        g = iv.Graph()
        g.run("s", tokens=gen_ids, max_new_tokens=new_tokens).add(
            "resid_post", layer=mid, direction=steer
        )
        return iv.run(g, model, backend=backend)["s.generated"]

    return {"reads": reads, "sweep": sweep, "sae": sae_run, "steer": steer_run}


if __name__ == "__main__":
    raise SystemExit(main())
