"""ACDC (Conmy et al. 2023): prune a model's edges one at a time by patching, batched.

ACDC walks the edges from the logits backwards, downstream inputs in reverse forward
order (the logits, the last MLP, the last layer's heads' ``v``, ``k`` and ``q`` inputs,
...), and for each input its incoming edges, latest upstream first. It tentatively
removes each edge on top of the edges already removed (patches it from the corrupt run,
or ablates it) and keeps it removed when the metric moves less than ``threshold``:

* ``Metric.kl()``: the increase of ``KL(clean || circuit)`` of the next-token
  distributions at ``pos`` (Conmy et al.'s default);
* a logit metric (``logit_diff``, ``logit``, ``prob``, ``logprob``): the absolute change
  of its batch mean (their ``abs_value_threshold`` form).

The decisions are ACDC's own, edge by edge, but one pass tests many edges (speculative
batching): a graph of up to ``batch_size`` candidate runs, run ``i`` removing the next
``i + 1`` undecided edges on top of the current circuit (the guess: each is removed),
which the planner batches into one forward pass. Walking the runs in order checks each
guess against the metric of the run before it; at the first edge that must stay, the rest
of the window is tested again in the next pass. So the result equals the
one-edge-per-forward loop (``batch_size=1``) exactly, in ``1 + (edges kept)`` passes or
fewer per window. An edge into a node whose every outgoing edge is already removed needs
no run: that node's output reaches nothing, so removing its inputs changes nothing.

A ``guide`` makes better guesses: the edges it names are guessed kept (the later runs of
the window leave them in place), the others removed. Each guess is still checked, so the
circuit is the same whatever the guide; a good one only saves passes and the runs that
follow a wrong guess. ``guide="eap_ig"`` guesses from EAP-IG scores (an edge is guessed
kept when its estimated effect reaches ``threshold``; a logit metric and a backend with
gradients only); ``guide=<Circuit>`` takes the edges of any circuit, e.g. ACDC's own at
a nearby threshold or on other prompts.

>>> import torch, transformers
>>> from interventions.recipes import Metric
>>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20)
>>> torch.manual_seed(0); model = transformers.GPT2LMHeadModel(cfg).eval()  # doctest: +ELLIPSIS
<...>
>>> c = acdc(model, [[1, 2, 3]], [[1, 4, 3]], Metric.kl(), threshold=1e-6)
>>> c.method, c.stat("passes") <= c.stat("runs") + 1
('acdc(threshold=1e-06, kl, resample)', True)
>>> acdc(model, [[1, 2, 3]], [[1, 4, 3]], Metric.kl(), threshold=1e-6, guide=c).edges == c.edges
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from interventions.architectures import ModelInfo, describe
from interventions.circuits.circuit import ABLATIONS, Ablation, Circuit, ablation_op
from interventions.circuits.edges import Edge, Node, all_edges
from interventions.errors import SpecError, choices_text
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes.metrics import Metric

__all__ = ["GUIDES", "acdc", "check_pair", "metric_value"]

Guide = Literal["eap_ig"]
GUIDES: tuple[str, ...] = ("eap_ig",)
GUIDE_STEPS = 4  # EAP-IG points of the guide: plain EAP (1) is flat at a saturated metric
GUIDE_PASSES = 2  # edge_attribution's graphs: the corrupt run's outputs, the gradient pass


def check_pair(clean: Any, corrupt: Any, ablation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[prompts, positions]`` of the clean and corrupt runs, of one shape."""
    if ablation not in ABLATIONS:
        raise SpecError(f"unknown ablation {ablation!r}; ablations: {choices_text(ABLATIONS)}")
    out = []
    for what, value in (("clean", clean), ("corrupt", corrupt)):
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if t.ndim != 2 or t.is_floating_point():
            raise SpecError(
                f"{what}: expected token ids [prompts, positions], got {tuple(t.shape)}"
            )
        out.append(t)
    if out[0].shape != out[1].shape:
        raise SpecError(
            f"clean {tuple(out[0].shape)} and corrupt {tuple(out[1].shape)} token ids must "
            "have one shape: prompts are paired row by row and position by position"
        )
    return out[0], out[1]


def metric_value(metric: Metric, logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The batch mean of ``metric`` on ``logits`` ``[prompts, vocab]`` (KL against the
    clean ``reference`` logits)."""
    if metric.kind == "kl":
        return float(metric(logits, reference).mean())
    return float(metric(logits).mean())


def _outgoing(info: ModelInfo) -> dict[Node, frozenset[Edge]]:
    out: dict[Node, set[Edge]] = {}
    for e in all_edges(info):
        out.setdefault(e.upstream, set()).add(e)
    return {n: frozenset(es) for n, es in out.items()}


def _blocks(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as runs of consecutive ones, ``(start, stop)``.

    >>> _blocks([0, 1, 2, 5, 6, 9])
    [(0, 3), (5, 7), (9, 10)]
    """
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _guessed_kept(
    model: nn.Module,
    guide: Circuit | str | None,
    ids: torch.Tensor,
    bad: torch.Tensor,
    metric: Metric,
    threshold: float,
    pos: int,
    candidates: Sequence[Edge],
    backend: str,
    run_options: dict[str, Any],
) -> frozenset[Edge]:
    """The edges guessed kept: none without a guide, a circuit's edges, or the candidates
    whose EAP-IG score reaches ``threshold``."""
    if guide is None:
        return frozenset()
    if isinstance(guide, Circuit):
        return frozenset(guide.edges)
    if guide not in GUIDES:
        raise SpecError(
            f"unknown guide {guide!r}; guides: {choices_text(GUIDES)}, a Circuit, or None"
        )
    if metric.kind == "kl":
        raise SpecError(
            "guide='eap_ig' estimates a logit metric's change, not KL's (its gradient "
            "vanishes at the clean run); give guide=<Circuit> or None"
        )
    if not candidates:
        return frozenset()
    from interventions.circuits.eap import edge_attribution

    with torch.enable_grad():
        scored = edge_attribution(
            model, ids, bad, metric, steps=GUIDE_STEPS, pos=pos, edges=candidates,
            backend=backend, **run_options,
        )  # fmt: skip
    return frozenset(
        e for e, s in zip(scored.edges, scored.scores, strict=True) if abs(s) >= threshold
    )


def acdc(
    model: nn.Module,
    clean: torch.Tensor | Sequence[Sequence[int]],
    corrupt: torch.Tensor | Sequence[Sequence[int]],
    metric: Metric,
    *,
    threshold: float = 0.01,
    ablation: Ablation = "resample",
    pos: int = -1,
    edges: Sequence[Edge] | None = None,
    batch_size: int = 8,
    guide: Circuit | Guide | None = None,
    backend: str = "torch",
    **run_options: Any,
) -> Circuit:
    """The edges ACDC keeps, each scored by the metric change its removal was measured to
    cause (see the module docstring); ``edges``: the candidates (default every edge; the
    others stay in place).

    ``ablation``: ``resample`` (patch the edge from the corrupt run, row by row), ``mean``
    (the upstream output averaged over the corrupt run's prompts and positions) or
    ``zero``. The circuit's ``stats`` count ``passes`` (graphs run, the first one the
    clean run alone; the planner batches each into one forward pass of the candidates and
    one of the corrupt run, more when they pass its memory budget), ``runs`` (candidate
    runs, each a forward-equivalent of ``[prompts, positions]``), ``tested`` and ``free``
    edges (no run needed), ``misses`` (wrong guesses), ``guide_passes`` (the guide's own:
    EAP-IG's two, or none) and the final ``metric``. ``batch_size``: at most that many candidate
    runs per pass (halved after a wrong guess, doubled back after a right one).
    ``guide``: which edges to guess kept (see the module docstring); it changes the
    passes, never the circuit.
    """
    ids, bad = check_pair(clean, corrupt, ablation)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
        raise SpecError(f"threshold must be a non-negative number, got {threshold!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise SpecError(f"batch_size must be a positive int, got {batch_size!r}")
    info = describe(model)
    every = all_edges(info)
    known = set(every)
    candidates = every if edges is None else list(edges)
    for e in candidates:
        if e not in known:
            raise SpecError(f"edge {e} is not an edge of this model")
    guessed_kept = _guessed_kept(
        model, guide, ids, bad, metric, threshold, pos, candidates, backend, run_options
    )
    order = sorted(candidates, key=every.index, reverse=True)
    outgoing = _outgoing(info)
    kind: Literal["kl", "abs"] = "kl" if metric.kind == "kl" else "abs"

    def _live(removal: list[Edge]) -> set[Edge]:
        gone = set(removal)
        dead = {n for n, out in outgoing.items() if out <= gone}
        return {e for e in removal if e.downstream not in dead}

    n = int(ids.shape[0])

    def evaluate(removals: list[list[Edge]]) -> list[float]:
        """Metric of each run that removes ``removals[i]``, one graph (one pass): the
        candidates stacked in one run, candidate ``i`` its rows ``i*n .. (i+1)*n``, each
        edge patched once over each block of consecutive candidates that remove it. So the
        graph holds one op per edge and block (not per candidate and edge): an edge guessed
        removed is in every later run of the window, one block."""
        g = Graph()
        if ablation != "zero":
            g.run("corrupt", tokens=bad)
        k = len(removals)
        g.run("cands", tokens=ids.repeat(k, 1)).read("logits", pos=pos, name="cands")
        # an edge into a dead node needs no op (that node's output reaches nothing)
        live = [[e for e in rs if e in keep] for rs in removals for keep in [_live(rs)]]
        who: dict[Edge, list[int]] = {}
        for i, rs in enumerate(live):
            for e in rs:
                who.setdefault(e, []).append(i)
        for e, cands in who.items():
            for a, b in _blocks(cands):
                # a block of candidates' rows, each candidate paired with the source's rows
                rows = (a * n, b * n) if k > 1 else None
                g.add(ablation_op(info, e, "cands", ablation, rows))
        logits = run(g, model, backend=backend, **run_options)["cands"]
        return [metric_value(metric, logits[i * n : (i + 1) * n], reference) for i in range(k)]

    g = Graph()
    g.run("clean", tokens=ids).read("logits", pos=pos, name="clean")
    reference = run(g, model, backend=backend, **run_options)["clean"]
    current = metric_value(metric, reference, reference)
    passes, runs_done, free, misses = 1, 0, 0, 0
    removed: list[Edge] = []
    kept: dict[Edge, float] = {}
    todo = list(order)
    window = batch_size
    while todo:
        # the window: the next undecided edges, each guessed kept or removed, up to
        # batch_size runs; run j removes the edges guessed removed before it, and its own
        guess: list[Edge] = []
        runs: list[int] = []  # index into guess of each run's edge
        removals: list[list[Edge]] = []
        assumed = list(removed)  # the removals the window's guesses add up to so far
        gone = set(removed)
        for e in todo:
            down = e.downstream
            if down.kind != "logits" and outgoing[down] <= gone:
                guess.append(e)  # a dead node's input: removing it changes nothing
                assumed.append(e)
                gone.add(e)
                continue
            if len(runs) == window:
                break
            guess.append(e)
            runs.append(len(guess) - 1)
            removals.append([*assumed, e])
            if e not in guessed_kept:
                assumed.append(e)
                gone.add(e)
        values = evaluate(removals) if runs else []
        if runs:
            passes += 1
            runs_done += len(runs)
        decided = len(guess)
        by_run = dict(zip(runs, values, strict=True))
        for j, e in enumerate(guess):
            if j not in by_run:
                removed.append(e)
                free += 1
                continue
            value = by_run[j]
            change = value - current if kind == "kl" else abs(value - current)
            remove = change < threshold
            if remove:
                removed.append(e)
                current = value
            else:
                kept[e] = float(change)
            if remove == (e in guessed_kept):  # a wrong guess: the later runs assumed it
                misses += 1
                decided = j + 1
                break
        # a wrong guess wastes the rest of the window: halve it after one, double it back
        window = max(1, window // 2) if decided < len(guess) else min(batch_size, 2 * window)
        todo = todo[decided:]
    edges_kept = [e for e in every if e in kept]
    abl = ablation
    return Circuit(
        tuple(edges_kept),
        tuple(kept[e] for e in edges_kept),
        f"acdc(threshold={threshold:g}, {metric.kind}, {abl})",
        stats=(
            ("passes", float(passes)),
            ("runs", float(runs_done)),
            ("tested", float(len(order) - free)),
            ("free", float(free)),
            ("misses", float(misses)),
            ("guide_passes", float(GUIDE_PASSES if isinstance(guide, str) and order else 0)),
            ("metric", current),
        ),
    )
