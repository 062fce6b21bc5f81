"""Issue 4: a patch sweep on a real NDIF server, against hand-written nnsight remote code.

Workload: a GPT-2-shaped model (random weights, fp32; see ``--model``) saved with
``save_pretrained`` and deployed on a local NDIF stack (``scripts/ndif``: NDIF 0.1.2, Ray,
Redis, PostgreSQL and an S3 stand-in, all on 127.0.0.1, the model on the CPU). One prompt
pair; resid_pre patched clean -> corrupted at every layer x position; metric = logit
difference at the last position.

Contenders, interleaved in this process (one call each per round, order rotated):

* ``nnsight by hand: one session`` (the baseline): the sweep written by hand as one
  nnsight remote session -- a clean trace saving every layer's resid_pre, then one trace
  with the corrupted run and one invoke per patch;
* ``interventions: activation_patching(remote=True)``: the recipe, sent as one request;
* ``nnsight by hand: one trace per patch`` (``--naive``): the idiomatic loop, one remote
  trace per patch (information only).

Before timing, each contender's score grid is held to the baseline's
(``assert_close(atol=rtol=1e-4)``). Requests are counted at the client (POSTs to the
host's ``/request``). Then the latency of one minimal request (one read of one run) is
measured both ways.

Run: ``.venv/bin/python benchmarks/remote_sweep.py`` (starts and stops its own stack;
``--state DIR`` reuses a running one, ``--quick`` for a tiny model and 1 round).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as cm
import torch

ROOT = cm.ROOT
SCRIPTS = ROOT / "scripts" / "ndif"
VENV = Path(os.environ.get("NDIF_VENV", ROOT / ".ndif-venv"))

MODELS = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 512},
    "small": {"n_layer": 6, "n_head": 8, "n_embd": 256, "vocab_size": 4096},
    "gpt2": {},  # GPT-2 small: 12 layers, d_model 768, vocab 50257
}


def build(kind: str, directory: Path) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=128, bos_token_id=0, eos_token_id=0, **MODELS[kind])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    cm.word_tokenizer(config.vocab_size).save_pretrained(directory)
    return model


class Counter:
    """POSTs to the host's /request, made by nnsight's client and by this package's."""

    def __init__(self) -> None:
        from interventions.adapters import nnsight as nns
        from nnsight.intervention.backends.remote import RemoteBackend

        self.n = 0
        for cls, name in ((RemoteBackend, "_post"), (nns._Ndif, "post")):
            original = getattr(cls, name)

            def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.n += 1
                return _original(*args, **kwargs)

            setattr(cls, name, counted)

    def during(self, fn: Any) -> tuple[int, Any]:
        before = self.n
        out = fn()
        return self.n - before, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--seq", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latency-rounds", type=int, default=20)
    parser.add_argument("--state", type=Path, default=None, help="reuse a running stack")
    parser.add_argument("--naive", action="store_true", help="also time one request per patch")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.model, args.seq, args.repeats, args.latency_rounds = "tiny", 6, 1, 3
    cm.setup()
    work = Path(tempfile.mkdtemp(prefix="remote-sweep-"))
    python = str(VENV / "bin" / "python")
    state_dir = args.state
    started = False
    if state_dir is None:
        subprocess.run(["bash", str(SCRIPTS / "install.sh")], check=True, timeout=1800)
        state_dir = work / "state"
        t0 = time.perf_counter()
        subprocess.run(
            [python, str(SCRIPTS / "stack.py"), "start", "--state", str(state_dir)],
            check=True, timeout=600, capture_output=True,
        )  # fmt: skip
        started = True
        print(f"stack started in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        run(args, state_dir, work, python)
    finally:
        if started:
            subprocess.run(
                [python, str(SCRIPTS / "stack.py"), "stop", "--state", str(state_dir)],
                timeout=120, capture_output=True,
            )  # fmt: skip


def run(args: argparse.Namespace, state_dir: Path, work: Path, python: str) -> None:
    state = json.loads((state_dir / "state.json").read_text())
    os.environ["NDIF_HOST"] = state["url"]
    os.environ["NDIF_API_KEY"] = state["api_key"]
    checkpoint = work / f"gpt2-{args.model}"
    local = build(args.model, checkpoint)
    t0 = time.perf_counter()
    deployed = subprocess.run(
        [python, str(SCRIPTS / "deploy.py"), str(checkpoint), "--state", str(state_dir)],
        check=True, timeout=600, capture_output=True, text=True,
    )  # fmt: skip
    print(f"model deployed in {time.perf_counter() - t0:.1f} s", flush=True)
    print(cm.describe_model(local))
    model_key = deployed.stdout.strip().splitlines()[-1]

    from nnsight.modeling.huggingface import _ID_CACHE
    from nnsight.modeling.transformers import TransformersModel
    from nnsight.schema.config import CONFIG
    from transformers import AutoTokenizer

    import interventions as iv
    from interventions.recipes import Metric, activation_patching

    CONFIG.APP.REMOTE_LOGGING = False
    _ID_CACHE[str(checkpoint)] = str(checkpoint)
    lm = TransformersModel(
        str(checkpoint), task="text-generation", tokenizer=AutoTokenizer.from_pretrained(checkpoint)
    )
    assert lm.to_model_key() == model_key
    n_layer, vocab = local.config.n_layer, local.config.vocab_size
    clean, corrupt = cm.prompt_pair(vocab, args.seq)
    a, b = int(clean[0, -1]) % vocab, (int(clean[0, -1]) + 1) % vocab
    metric = Metric.logit_diff(a, b)
    seq = args.seq

    def scores(clean_logits: Any, corrupt_logits: Any, cells: Any) -> torch.Tensor:
        m_clean = metric(clean_logits, reference=clean_logits)
        m_corrupt = metric(corrupt_logits, reference=clean_logits)
        out = torch.zeros(n_layer, seq)
        for (layer, pos), logits in cells.items():
            m = metric(logits, reference=clean_logits)
            out[layer, pos] = ((m - m_corrupt) / (m_clean - m_corrupt)).mean()
        return out

    def ours() -> torch.Tensor:
        result = activation_patching(
            str(checkpoint), clean, corrupt, metric, backend="nnsight", remote=True
        )
        return result.scores

    def by_hand_session() -> torch.Tensor:
        import nnsight

        with lm.session(remote=True):
            with lm.trace(clean):
                acts = [lm.transformer.h[layer].input.clone() for layer in range(n_layer)]
                clean_logits = lm.lm_head.output[:, -1].save()
            with lm.trace() as tracer:
                with tracer.invoke(corrupt):
                    corrupt_logits = lm.lm_head.output[:, -1].save()
                outs = nnsight.save([])
                for layer in range(n_layer):
                    for pos in range(seq):
                        with tracer.invoke(corrupt):
                            lm.transformer.h[layer].input[:, pos] = acts[layer][:, pos]
                            outs.append(lm.lm_head.output[:, -1])
        cells = {(i // seq, i % seq): x for i, x in enumerate(outs)}
        return scores(clean_logits, corrupt_logits, cells)

    def by_hand_naive() -> torch.Tensor:
        import nnsight

        with lm.trace(clean, remote=True):
            acts = nnsight.save([lm.transformer.h[layer].input for layer in range(n_layer)])
            clean_logits = lm.lm_head.output[:, -1].save()
        with lm.trace(corrupt, remote=True):
            corrupt_logits = lm.lm_head.output[:, -1].save()
        cells = {}
        for layer in range(n_layer):
            for pos in range(seq):
                value = acts[layer][:, pos]
                with lm.trace(corrupt, remote=True):
                    lm.transformer.h[layer].input[:, pos] = value
                    out = lm.lm_head.output[:, -1].save()
                cells[(layer, pos)] = out
        return scores(clean_logits, corrupt_logits, cells)

    counter = Counter()
    contenders = [
        cm.Contender("nnsight by hand: one session", by_hand_session),
        cm.Contender("interventions: activation_patching(remote)", ours),
    ]
    if args.naive:
        contenders.append(
            cm.Contender("nnsight by hand: one trace per patch", by_hand_naive, info=True)
        )
    cm.label(contenders)
    want = by_hand_session()
    requests: dict[str, int] = {}

    def compare(c: cm.Contender, got: Any) -> str:
        return cm.agree(c.name, got, want, 1e-4)

    print(f"\nsweep: {n_layer} layers x {seq} positions = {n_layer * seq} patches, one prompt pair")
    for c in contenders:
        requests[c.name], _ = counter.during(c.fn)
    cm.check_round(contenders, compare)
    cm.timed_rounds(contenders, args.repeats, compare)
    base = contenders[0]
    rows = []
    for c in contenders:
        rows.append(
            [
                c.name,
                str(requests[c.name]),
                cm.fmt_s(cm.median(c.times)) if c.times else "-",
                cm.fmt_x(cm.ratio(c, base)) if c.times and c is not base else "1.00x",
                c.check or c.error or "",
            ]
        )
    print()
    print(cm.table(rows, ["contender", "requests", "median", "vs baseline", "check"]))

    # the latency of one minimal request, both ways
    g = iv.Graph()
    g.run("x", tokens=clean).read("logits", pos=-1, name="last")

    def tiny_ours() -> Any:
        return iv.run(g, str(checkpoint), backend="nnsight", remote=True)["last"]

    def tiny_hand() -> Any:
        with lm.trace(clean, remote=True):
            out = lm.lm_head.output[:, -1].save()
        return out

    tiny = [cm.Contender("nnsight by hand: one trace", tiny_hand),
            cm.Contender("interventions: iv.run(remote=True)", tiny_ours)]  # fmt: skip
    cm.label(tiny)
    reference = tiny_hand()
    cm.check_round(tiny, lambda c, got: cm.agree(c.name, got, reference, 1e-5), verbose=False)
    cm.timed_rounds(tiny, args.latency_rounds, verbose=False)
    print()
    print(
        cm.table(
            [[c.name, cm.fmt_s(cm.median(c.times)), cm.fmt_x(cm.ratio(c, tiny[0]))] for c in tiny],
            ["one request (one read)", "median latency", "vs baseline"],
        )
    )
    print(f"\n{cm.versions()}\n{cm.load_average()}")


if __name__ == "__main__":
    main()
