"""What validation's shape-only dry run costs (issue 13, item 6).

A graph with raw module sites (or a plain ``nn.Module``'s inputs) is validated with a dry
run on fake tensors (:mod:`interventions.dry_run`). On a GPT-2-small-shaped model (random
weights, 8 prompts x 64 tokens) this times, interleaved in rounds:

* ``validate, standard sites``: a graph of standard sites (no dry run): the baseline;
* ``validate, raw site in layer 0``: the dry run stops after layer 0's MLP;
* ``validate, raw site at lm_head``: the dry run goes through the whole forward;
* ``validate, lm_head again (cached)``: the same run shape, the cached measurement;
* ``iv.run, standard sites``: the real forward of the baseline graph, for scale.

Uncached contenders clear the dry run's cache first. Prints median milliseconds and the
median per-round ratio to the baseline and to the real run.

    .venv/bin/python benchmarks/dry_run.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import (  # type: ignore[import-not-found]
    Contender,
    build_gpt2,
    check_round,
    describe_model,
    label,
    load_average,
    median,
    ratio,
    setup,
    table,
    timed_rounds,
)

import interventions as iv
from interventions import dry_run


def graph(site: str, ids: torch.Tensor, **select: Any) -> iv.Graph:
    g = iv.Graph()
    g.run("a", tokens=ids).read(site, name="x", pos=-1, **select)
    return g


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup()
    model = build_gpt2(args.quick)
    vocab = model.config.vocab_size
    ids = torch.randint(
        0, vocab, (8, 16 if args.quick else 64), generator=torch.Generator().manual_seed(0)
    )
    print(describe_model(model), f"| prompts {list(ids.shape)} |", load_average())
    standard = graph("resid_post", ids, layer=1)
    early = graph("transformer.h.0.mlp.output", ids)
    late = graph("lm_head.output", ids)

    def cold(g: iv.Graph) -> Any:
        """Validate with an empty dry-run cache, then put the cache back as it was."""
        saved = dict(dry_run._CACHE)
        dry_run._CACHE.clear()
        try:
            return iv.validate(g, model)
        finally:
            dry_run._CACHE.clear()
            dry_run._CACHE.update(saved)

    contenders = [
        Contender("validate, standard sites", lambda: iv.validate(standard, model)),
        Contender("validate, raw site in layer 0", lambda: cold(early)),
        Contender("validate, raw site at lm_head", lambda: cold(late)),
        Contender("validate, lm_head again (cached)", lambda: iv.validate(late, model)),
        Contender("iv.run, standard sites", lambda: iv.run(standard, model), info=True),
    ]
    label(contenders)

    def compare(c: Contender, result: Any) -> str:
        if isinstance(result, iv.Results):
            return f"x {list(result['x'].shape)}"
        return f"plan of {len(result.order)} run(s)"

    check_round(contenders, compare)
    timed_rounds(contenders, args.repeats, compare)
    base, real = contenders[0], contenders[-1]
    rows = [
        [
            c.name,
            f"{1000 * median(c.times):.1f}",
            f"{ratio(c, base):.2f}x",
            f"{ratio(c, real):.3f}x",
            c.error or c.check,
        ]
        for c in contenders
    ]
    print(table(rows, ["contender", "median ms", "/ validate", "/ real run", "check"]))


if __name__ == "__main__":
    main()
