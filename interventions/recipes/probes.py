"""Linear probes: what a site encodes, with a held-out split and a control.

:func:`probe` reads one site over a dataset (in batches, any backend), fits a linear
probe on a training split and scores it on the held-out rest; the same fit on a control
is what a probe of this capacity gets with no signal at all, so ``selectivity =
test_score - control_score`` (Hewitt and Liang 2019). Two controls: ``"shuffle"`` (the
labels permuted) and ``"task"``, Hewitt and Liang's control task: every input *type*
(the token at the probed position, or the input itself) gets one label drawn at random
from the labels' own distribution, so the control has the real task's structure (one
label per type) but none of its content, and a probe that scores well on it is
memorising types. :func:`probe_sweep` probes a site at every layer: a table and a plot.

Fitting is plain torch (no new dependency, runs where the activations are, deterministic
in float64): ``logistic`` is multinomial logistic regression with an L2 penalty, solved
by L-BFGS; ``ridge`` is ridge regression in closed form. Features are standardised with
the training split's mean and standard deviation. Scores: accuracy (``logistic``), R²
(``ridge``).

>>> import torch
>>> x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
>>> w, b = fit_logistic(x, (x[:, 0] > 0).long(), l2=1e-3)
>>> bool((((x @ w.T + b).argmax(-1)) == (x[:, 0] > 0).long()).float().mean() > 0.95)
True
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from interventions.architectures import describe
from interventions.errors import SpecError, choices_text
from interventions.execute import run
from interventions.graph import Graph
from interventions.recipes._dataset import Dataset, batches, token_rows
from interventions.recipes.inputs import _model, materialize
from interventions.sites import Site

ProbeKind = Literal["logistic", "ridge"]
PROBE_KINDS: tuple[str, ...] = ("logistic", "ridge")
CONTROLS: tuple[str, ...] = ("shuffle", "task", "none")


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: ``(weight [classes, d], bias [classes])``.

    Minimises mean cross-entropy ``+ l2 * |weight|²`` with L-BFGS (strong Wolfe line
    search) in float64, from zeros: the problem is convex, so the answer is unique.
    """
    x64 = x.double()
    classes = int(y.max()) + 1 if y.numel() else 1
    weight = torch.zeros(max(classes, 2), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(max(classes, 2), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x64 @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def fit_ridge(
    x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression in closed form: ``(weight [outputs, d], bias [outputs])``.

    >>> x = torch.tensor([[0.0], [1.0], [2.0]])
    >>> w, b = fit_ridge(x, 3 * x[:, 0] + 1, l2=0.0)
    >>> [round(float(w), 4), round(float(b), 4)]
    [3.0, 1.0]
    """
    x64, y64 = x.double(), y.double().reshape(len(y), -1)
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc + l2 * len(x64) * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc).T  # [outputs, d]
    return weight.float(), (my - weight @ mx).float()


def _score(kind: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    out = x @ w.T + b
    if kind == "logistic":
        return float((out.argmax(-1) == y).float().mean())
    target = y.float().reshape(len(y), -1)
    residual = (target - out).pow(2).sum()
    total = (target - target.mean(0)).pow(2).sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """A probe's held-out score against its control (accuracy, or R² for ridge)."""

    site: str
    kind: str
    train_score: float
    test_score: float
    control_score: float  # the same probe fitted and scored on the control's labels
    chance: float  # the majority class's share of the test split (logistic); 0 (ridge)
    weight: torch.Tensor  # [classes or outputs, d], on standardised features
    bias: torch.Tensor
    mean: torch.Tensor  # [d]: the standardisation the weights expect
    std: torch.Tensor  # [d]
    n_train: int
    n_test: int
    control: str = "shuffle"  # which control: shuffle, task (Hewitt & Liang) or none
    n_types: int | None = None  # control task: how many distinct input types

    @property
    def selectivity(self) -> float:
        """``test_score - control_score``: what the site adds over a probe of no signal."""
        return self.test_score - self.control_score

    def predict(self, activations: torch.Tensor) -> torch.Tensor:
        """Class ids (logistic) or values (ridge) for activations ``[n, d]``."""
        out = ((activations.float() - self.mean) / self.std) @ self.weight.T + self.bias
        return out.argmax(-1) if self.kind == "logistic" else out.squeeze(-1)


def read_site(
    model: nn.Module,
    site: str,
    dataset: Dataset,
    *,
    layer: int | None = None,
    pos: int | None = -1,
    batch_size: int = 64,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> torch.Tensor:
    """A site's activations ``[N, d]`` over a dataset, read in batches, in dataset order.

    Token models read one position per prompt (``pos``, default the last); a plain
    ``nn.Module`` (raw sites) reads its whole output per input row.
    """
    plain = Site(site, layer).is_raw and describe(model).n_layers is None
    parts: list[tuple[tuple[int, ...], torch.Tensor]] = []
    for batch in batches(dataset, batch_size=batch_size, tokenizer=tokenizer, plain=plain):
        g = Graph()
        select = {} if plain else {"pos": pos}
        batch.add_run(g, "probe").read(site, layer=layer, name="x", **select)
        x = run(g, model, backend=backend, tokenizer=tokenizer, **run_options)["x"]
        parts.append((batch.indices, x.detach().float().reshape(len(batch.indices), -1)))
    n = sum(len(i) for i, _ in parts)
    out = torch.zeros(n, parts[0][1].shape[1])
    for indices, x in parts:
        out[list(indices)] = x
    return out


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < test_fraction < 1.0:
        raise SpecError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise SpecError(f"{n} examples are too few to split into train and test")
    return order[n_test:], order[:n_test]


def control_task(
    labels: torch.Tensor, types: Sequence[Hashable], *, seed: int = 0
) -> tuple[torch.Tensor, int]:
    """Hewitt and Liang's control task: one random label per input type.

    Each distinct type gets a label drawn once (with ``seed``) from the empirical
    distribution of ``labels``; every example of that type gets it. Returns the control
    labels ``[N]`` and the number of types.

    >>> y = torch.tensor([0, 1, 0, 1, 1, 0])
    >>> c, n = control_task(y, ["a", "b", "a", "c", "b", "a"])
    >>> n, c[0] == c[2] == c[5], c[1] == c[4]
    (3, tensor(True), tensor(True))
    """
    if len(types) != len(labels):
        raise SpecError(f"{len(types)} control types for {len(labels)} examples")
    ids: dict[Hashable, int] = {}
    which = torch.tensor([ids.setdefault(t, len(ids)) for t in types], dtype=torch.long)
    draws = torch.randint(
        0, len(labels), (len(ids),), generator=torch.Generator().manual_seed(seed)
    )
    return labels[draws][which], len(ids)


def _types(dataset: Dataset, pos: int | None, tokenizer: Any, plain: bool) -> list[Hashable]:
    """Each example's type for the control task: the token at ``pos`` (the whole prompt
    when ``pos`` is None); for a plain model's input tensor, the input row itself."""
    if plain:
        assert isinstance(dataset, torch.Tensor)
        rows = dataset.detach().reshape(len(dataset), -1).cpu()
        return [tuple(r.tolist()) for r in rows]
    tokens = token_rows(dataset, tokenizer)
    if pos is None:
        return [tuple(r) for r in tokens]
    return [r[pos] for r in tokens]


def fit_probe(
    activations: torch.Tensor,
    labels: torch.Tensor | Sequence[float],
    *,
    kind: ProbeKind = "logistic",
    site: str = "",
    test_fraction: float = 0.25,
    control: str = "shuffle",
    control_types: Sequence[Hashable] | None = None,
    l2: float = 1e-3,
    seed: int = 0,
) -> ProbeResult:
    """Fit and score a probe on activations already read (``[N, d]``).

    ``control="task"`` needs ``control_types``: each example's type (a token id, a word,
    any hashable), see :func:`control_task`.
    """
    if kind not in PROBE_KINDS:
        raise SpecError(f"unknown probe kind {kind!r}; kinds: {choices_text(PROBE_KINDS)}")
    if control not in CONTROLS:
        raise SpecError(f"unknown control {control!r}; controls: {choices_text(CONTROLS)}")
    if control == "task" and control_types is None:
        raise SpecError("control='task' needs control_types= (one type per example)")
    y = torch.as_tensor(labels)
    y = y.long() if kind == "logistic" else y.float()
    if len(y) != len(activations):
        raise SpecError(f"{len(y)} labels for {len(activations)} examples")
    if kind == "logistic" and int(y.min()) < 0:
        raise SpecError("logistic probe labels are class ids 0, 1, ...")
    train, test = _split(len(y), test_fraction, seed)
    mean = activations[train].mean(0)
    std = activations[train].std(0).clamp_min(1e-6)
    x = (activations - mean) / std

    def fit(labels_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "logistic":
            return fit_logistic(x[train], labels_[train], l2=l2)
        return fit_ridge(x[train], labels_[train], l2=l2)

    w, b = fit(y)
    control_score = float("nan")
    n_types: int | None = None
    if control != "none":
        if control == "shuffle":
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
            fake = y[perm]
        else:
            assert control_types is not None
            fake, n_types = control_task(y, control_types, seed=seed + 2)
        cw, cb = fit(fake)
        control_score = _score(kind, x[test], fake[test], cw, cb)
    chance = 0.0
    if kind == "logistic":
        chance = float(torch.bincount(y[test]).max()) / len(test)
    return ProbeResult(
        site,
        kind,
        _score(kind, x[train], y[train], w, b),
        _score(kind, x[test], y[test], w, b),
        control_score,
        chance,
        w,
        b,
        mean,
        std,
        len(train),
        len(test),
        control,
        n_types,
    )


def probe(
    model: nn.Module | str,
    site: str,
    dataset: Dataset,
    labels: torch.Tensor | Sequence[float],
    *,
    layer: int | None = None,
    pos: int | None = -1,
    kind: ProbeKind = "logistic",
    test_fraction: float = 0.25,
    control: str = "shuffle",
    control_types: Sequence[Hashable] | None = None,
    l2: float = 1e-3,
    seed: int = 0,
    batch_size: int = 64,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> ProbeResult:
    """Read ``site`` (at ``layer``, position ``pos``) over ``dataset`` and probe it for
    ``labels`` (class ids for ``logistic``, numbers for ``ridge``), with a held-out split
    and a control. Runs on every backend (reads only).

    ``control``: ``"shuffle"`` (the labels permuted), ``"task"`` (Hewitt and Liang's
    control task: a random label per input type; the types are ``control_types``, by
    default the token at ``pos``, or for a plain model each distinct input row) or
    ``"none"``.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Identity())  # the site sees x itself
    >>> x = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    >>> p = probe(model, "0.output", x, (x[:, 0] > 0).long())
    >>> p.test_score > 0.9, abs(p.control_score - 0.5) < 0.15
    (True, True)
    """
    model, tokenizer = _model(model, tokenizer, run_options)
    dataset = materialize(dataset, "dataset")  # a generator or a datasets column: read once
    acts = read_site(
        model,
        site,
        dataset,
        layer=layer,
        pos=pos,
        batch_size=batch_size,
        backend=backend,
        tokenizer=tokenizer,
        **run_options,
    )
    if control == "task" and control_types is None:
        plain = Site(site, layer).is_raw and describe(model).n_layers is None
        control_types = _types(dataset, pos, tokenizer, plain)
    name = site if layer is None else f"{site}[{layer}]"
    return fit_probe(
        acts,
        labels,
        kind=kind,
        site=name,
        test_fraction=test_fraction,
        control=control,
        control_types=control_types,
        l2=l2,
        seed=seed,
    )


@dataclass(frozen=True, eq=False)
class ProbeSweep:
    """One probe per layer of a site."""

    results: tuple[ProbeResult, ...]

    def table(self) -> str:
        """Layers as rows: train, test, control, selectivity (and chance for logistic)."""
        head = f"{'site':<16} {'train':>7} {'test':>7} {'control':>8} {'select.':>8} {'chance':>7}"
        lines = [head]
        for r in self.results:
            lines.append(
                f"{r.site:<16} {r.train_score:7.3f} {r.test_score:7.3f} "
                f"{r.control_score:8.3f} {r.selectivity:+8.3f} {r.chance:7.3f}"
            )
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """The table as plain data (JSON-ready): one dict per layer."""
        return [
            {
                "site": r.site,
                "kind": r.kind,
                "train": r.train_score,
                "test": r.test_score,
                "control": r.control,
                "control_score": r.control_score,
                "selectivity": r.selectivity,
                "chance": r.chance,
                "n_train": r.n_train,
                "n_test": r.n_test,
            }
            for r in self.results
        ]

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Test and control scores per layer as a line plot PNG."""
        from interventions.plots import _pyplot

        plt = _pyplot()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(self.results) + 2), 3), dpi=110)
        xs = list(range(len(self.results)))
        ax.plot(xs, [r.test_score for r in self.results], marker="o", label="probe (test)")
        control = self.results[0].control if self.results else "control"
        ax.plot(
            xs, [r.control_score for r in self.results], marker="x", label=f"control ({control})"
        )
        if self.results and self.results[0].kind == "logistic":
            ax.plot(xs, [r.chance for r in self.results], ls=":", color="grey", label="chance")
        ax.set_xticks(xs, labels=[r.site for r in self.results], rotation=45, ha="right")
        ax.set_ylabel("accuracy" if self.results[0].kind == "logistic" else "R²")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out


def probe_sweep(
    model: nn.Module | str,
    dataset: Dataset,
    labels: torch.Tensor | Sequence[float],
    *,
    site: str = "resid_post",
    layers: Sequence[int] | None = None,
    pos: int = -1,
    kind: ProbeKind = "logistic",
    test_fraction: float = 0.25,
    control: str = "shuffle",
    control_types: Sequence[Hashable] | None = None,
    l2: float = 1e-3,
    seed: int = 0,
    batch_size: int = 64,
    backend: str = "torch",
    tokenizer: Any = None,
    **run_options: Any,
) -> ProbeSweep:
    """:func:`probe` at every layer (or ``layers``) of a standard site, same split."""
    model, tokenizer = _model(model, tokenizer, run_options)
    dataset = materialize(dataset, "dataset")
    n_layers = describe(model).n_layers
    if n_layers is None:
        raise SpecError("a probe sweep needs a model with an architecture map (standard sites)")
    chosen = list(range(n_layers)) if layers is None else list(layers)
    results = tuple(
        probe(
            model,
            site,
            dataset,
            labels,
            layer=layer,
            pos=pos,
            kind=kind,
            test_fraction=test_fraction,
            control=control,
            control_types=control_types,
            l2=l2,
            seed=seed,
            batch_size=batch_size,
            backend=backend,
            tokenizer=tokenizer,
            **run_options,
        )
        for layer in chosen
    )
    return ProbeSweep(results)
