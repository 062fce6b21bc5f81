"""The main job: an activation-patching sweep and a steering run, on any causal LM.

Default model: the bundled induction model (2-layer attention-only Llama trained by
:mod:`interventions.reference_models.induction`), so it needs no download::

    python -m interventions.demo                 # or: ./dev demo
    python -m interventions.demo --model gpt2    # any HF causal LM, for users with the hub

The task is induction on random tokens, which works on any language model: a sequence
``[BOS, A, A[:-1]]`` predicts ``A[-1]`` by copying. The corrupted sequence changes the
first occurrence of the last token, so nothing can be copied. Patching clean activations
into the corrupted run shows where the copying information sits: the changed token in
the embeddings, the position after it once a previous-token head has moved it there, and
the final position at the end.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import interventions as iv
from interventions.architectures import describe
from interventions.plots import format_table, heatmap


def induction_prompts(
    vocab: int, half: int, batch: int, seed: int, bos: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupted token ids ``[batch, 2*half (+1 with BOS)]`` and the answer ids."""
    g = torch.Generator().manual_seed(seed)
    low = 1 if bos == 0 else 0
    rows, corrupt_rows, answers = [], [], []
    for _ in range(batch):
        perm = torch.randperm(vocab - low, generator=g)[: half + 1] + low
        a, spare = perm[:half], perm[half]
        prefix = [bos] if bos is not None else []
        clean = torch.tensor(prefix + a.tolist() + a[:-1].tolist())
        corrupt = clean.clone()
        corrupt[len(prefix) + half - 2] = spare  # first occurrence of the final token
        rows.append(clean)
        corrupt_rows.append(corrupt)
        answers.append(int(a[-1]))
    return torch.stack(rows), torch.stack(corrupt_rows), torch.tensor(answers)


def patching_sweep(
    model: torch.nn.Module, clean: torch.Tensor, corrupt: torch.Tensor, answers: torch.Tensor
) -> tuple[torch.Tensor, list[str], iv.Graph, iv.Results]:
    """Patch each residual-stream site at each position from clean into corrupt.

    Returns a ``[sites, positions]`` score: 0 = the corrupted logit of the answer, 1 = clean.
    """
    info = describe(model)
    assert info.n_layers is not None
    sites = [("resid_pre", layer) for layer in range(info.n_layers)]
    sites.append(("resid_post", info.n_layers - 1))
    g = iv.Graph()
    clean_run = g.run("clean", tokens=clean)
    corrupt_run = g.run("corrupt", tokens=corrupt)
    clean_run.read("logits", pos=-1, name="clean_logits")
    corrupt_run.read("logits", pos=-1, name="corrupt_logits")
    seq = clean.shape[1]
    for site, layer in sites:
        value = clean_run.read(site, layer=layer)
        for pos in range(seq):
            run = g.run(f"patch.{site}.{layer}.{pos}", tokens=corrupt)
            run.patch(site, layer=layer, pos=pos, value=value)
            run.read("logits", pos=-1, name=f"{site}.{layer}.{pos}")
    res = iv.run(g, model)
    rows = torch.arange(len(answers))

    def answer_logit(name: str) -> torch.Tensor:
        return res[name][rows, answers]

    clean_l, corrupt_l = answer_logit("clean_logits"), answer_logit("corrupt_logits")
    scores = torch.zeros(len(sites), seq)
    for i, (site, layer) in enumerate(sites):
        for pos in range(seq):
            patched = answer_logit(f"{site}.{layer}.{pos}")
            scores[i, pos] = ((patched - corrupt_l) / (clean_l - corrupt_l)).mean()
    labels = [f"{site}[{layer}]" for site, layer in sites]
    return scores, labels, g, res


def steering(
    model: torch.nn.Module, prompt: torch.Tensor, token: int, new_tokens: int, strength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate with and without adding the unembedding direction of ``token``."""
    info = describe(model)
    assert info.n_layers is not None
    layer = info.n_layers - 1
    unembed = model.get_output_embeddings()  # type: ignore[operator]
    direction = unembed.weight[token].detach().float()
    direction = direction / direction.norm()
    probe = iv.Graph()
    probe.run("p", tokens=prompt).read("resid_post", layer=layer, name="r")
    scale = strength * float(iv.run(probe, model)["r"].norm(dim=-1).mean())
    g = iv.Graph()
    g.run("plain", tokens=prompt, max_new_tokens=new_tokens)
    steered = g.run("steered", tokens=prompt, max_new_tokens=new_tokens)
    steered.add("resid_post", layer=layer, direction=direction, scale=scale)
    res = iv.run(g, model)
    return res["plain.generated"], res["steered.generated"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m interventions.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model", default="induction", help="bundled name, HF hub name or local path"
    )
    parser.add_argument(
        "--out", default="out/demo", help="directory for the PNG, graph and results"
    )
    parser.add_argument("--half", type=int, default=6, help="length of the repeated segment")
    parser.add_argument("--batch", type=int, default=16, help="prompts averaged per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model, _ = iv.load_model(args.model)
    info = describe(model)
    if info.vocab is None:
        parser.error(f"{args.model}: the model config has no vocab_size")
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    bos = bos if isinstance(bos, int) and args.model == "induction" else None
    clean, corrupt, answers = induction_prompts(info.vocab, args.half, args.batch, args.seed, bos)
    out = Path(args.out)

    print(f"model: {args.model} ({info.class_name}, {info.n_layers} layers, {info.n_heads} heads)")
    print(f"task: copy a repeated segment of {args.half} random tokens; batch of {args.batch}")
    scores, labels, graph, res = patching_sweep(model, clean, corrupt, answers)
    positions = [str(p) for p in range(clean.shape[1])]
    print("\nactivation patching, clean -> corrupted (1 = restores the clean answer logit):")
    print(format_table(scores, labels, positions))
    changed = int((clean[0] != corrupt[0]).nonzero()[0])
    print(f"(the corrupted token sits at position {changed}; the answer is read at the last)")
    png = heatmap(
        scores,
        out / "patching.png",
        row_labels=labels,
        col_labels=[f"{p}{'*' if p == changed else ''}" for p in range(clean.shape[1])],
        title=f"Residual patching on {args.model}: restored answer logit",
        colorbar_label="0 = corrupted, 1 = clean",
    )
    graph.save(str(out / "sweep.json"))
    res.save(out / "sweep_results")

    prompt = clean[:1]
    token = int(answers[1])
    plain, steered = steering(model, prompt, token, new_tokens=8, strength=4.0)
    print(f"\nsteering: add the unembedding direction of token {token} to the last residual stream")
    print(f"  prompt     {prompt[0].tolist()}")
    print(f"  plain    → {plain[0].tolist()}")
    print(f"  steered  → {steered[0].tolist()}  ({int((steered == token).sum())}/8 are {token})")
    print(f"\nwrote {png}, {out / 'sweep.json'} (the graph) and {out / 'sweep_results'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
