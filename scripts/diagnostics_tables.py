"""The headline tables of the diagnostic tools (issue 16), on the bundled reference models.

1. Probes on the toy model of superposition: held-out accuracy on represented features
   (column norm ~1.1) and dropped ones (~0.01), against both controls (shuffled labels,
   and Hewitt and Liang's control task: a random label per distinct input).
2. Integrated gradients on the IOI model: the completeness error against ``steps``.
3. The tuned lens against the logit lens on the IOI model: per-layer KL to the final
   distribution on held-out prompts of all five templates (12-19 tokens).

Run: ``.venv/bin/python scripts/diagnostics_tables.py [--out DIR]`` (CPU, about a minute;
``--out`` also writes the tuned-lens KL picture and the probe sweep data).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from interventions.recipes import Metric, input_attribution, lens_kl, probe, train_tuned_lens
from interventions.reference_models import ioi
from interventions.reference_models import superposition as sp

N, DISTINCT = 2000, 400


def _feature_data(feature: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` rows (``DISTINCT`` inputs, each repeated), ``feature`` on in half of them."""
    g = torch.Generator().manual_seed(0)
    x = sp.feature_batch(DISTINCT, g)
    on = torch.rand(DISTINCT, generator=g) < 0.5
    x[:, feature] = torch.where(on, 0.5 + 0.5 * torch.rand(DISTINCT, generator=g), 0.0)
    rows = torch.arange(N) % DISTINCT
    return x[rows], on.long()[rows]


def probe_table() -> str:
    model = sp.load_superposition_model()
    norms = model.down.weight.detach().norm(dim=0)
    order = norms.argsort(descending=True).tolist()
    features = order[:3] + order[-3:]  # three represented, three dropped
    head = (
        f"{'feature':>7} {'|W_i|':>6} {'test':>6} {'shuffle':>8} {'sel.':>6} "
        f"{'task':>6} {'sel.':>6} {'types':>6}"
    )
    lines = [head]
    for f in features:
        x, y = _feature_data(f)
        shuffle = probe(model, sp.HIDDEN_SITE, x, y, control="shuffle")
        task = probe(model, sp.HIDDEN_SITE, x, y, control="task")
        lines.append(
            f"{f:>7} {float(norms[f]):6.3f} {shuffle.test_score:6.3f} "
            f"{shuffle.control_score:8.3f} {shuffle.selectivity:+6.3f} "
            f"{task.control_score:6.3f} {task.selectivity:+6.3f} {task.n_types:>6}"
        )
    return "\n".join(lines)


def completeness_table() -> str:
    model, _ = ioi.load_ioi_model()
    data = ioi.ioi_dataset(10, torch.Generator().manual_seed(1))  # 12-19 tokens
    metric = Metric.logit_diff(data.answer, data.wrong)
    unk = ioi.VOCAB.index(ioi.UNK)
    lines = [
        f"{'baseline':>8} {'steps':>5} {'max error':>10} {'mean error':>11} {'|m(x)-m(b)|':>12}"
    ]
    for name, baseline in (("zero", "zero"), ("<unk>", unk)):
        for steps in (16, 64, 256):
            ig = input_attribution(model, list(data.clean), metric, steps=steps, baseline=baseline)
            assert ig.baseline_values is not None
            err = ig.completeness_error
            change = (ig.metric_values - ig.baseline_values).abs().mean()
            lines.append(
                f"{name:>8} {steps:>5} {float(err.max()):10.2e} {float(err.mean()):11.2e} "
                f"{float(change):12.3f}"
            )
    return "\n".join(lines)


def lens_table(out: Path | None) -> str:
    model, _ = ioi.load_ioi_model()
    train = ioi.ioi_dataset(256, torch.Generator().manual_seed(0)).clean
    test = ioi.ioi_dataset(128, torch.Generator().manual_seed(2)).clean
    lens = train_tuned_lens(model, list(train), steps=120, lr=1e-3, tokens_per_step=1024)
    table = lens_kl(model, list(test), lens)
    if out is not None:
        try:
            table.plot(out / "lens_kl.png", title="IOI model: KL(final || lens), held-out")
        except Exception as exc:  # no matplotlib: the table is the result
            print(f"note: no picture ({exc})")
    return table.table() + f"\n({table.n_tokens} held-out tokens, 128 prompts of 5 templates)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--tables", nargs="+", default=["probes", "ig", "lens"], choices=["probes", "ig", "lens"]
    )
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for key, title, make in (
        ("probes", "Probes on the superposition model (logistic, 25% held out)", probe_table),
        ("ig", "Integrated gradients on the IOI model (10 prompts)", completeness_table),
        (
            "lens",
            "Tuned lens vs logit lens on the IOI model (KL nats)",
            lambda: lens_table(args.out),
        ),
    ):
        if key not in args.tables:
            continue
        start = time.perf_counter()
        text = make()
        print(f"## {title}  [{time.perf_counter() - start:.1f} s]\n{text}\n", flush=True)


if __name__ == "__main__":
    main()
