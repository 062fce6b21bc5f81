"""Does an SAE fit a model and a site? Static facts, then quality measured on a probe batch.

:func:`check_sae` looks at the width (the site's against the SAE's ``d_in``), the dtypes, the
model the SAE was trained on when it says (``sae.info.model_name``), and then, over
``prompts``, reads the site and splices the SAE (one graph, any backend):

- explained variance ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (on the site);
- L0, the mean number of features that fire per vector;
- for language models, the next-token loss clean, with the SAE spliced (error dropped) and
  with the site zero-ablated, and the CE loss recovered,
  ``(loss_zero - loss_sae) / (loss_zero - loss_clean)`` (1 is perfect, 0 no better than
  zeroing the site).

An SAE below ``min_explained_variance`` or ``min_ce_recovered`` is flagged: the problems
name the SAE, the site and the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interventions.sae.kinds import AnySAE

__all__ = ["SAEFit", "check_graph_saes", "check_sae"]


@dataclass(frozen=True)
class SAEFit:
    """What :func:`check_sae` found. ``ok`` when ``problems`` is empty."""

    site: str
    d_in: int
    site_width: int | None
    explained_variance: float | None
    l0: float | None
    loss_clean: float | None
    loss_sae: float | None
    loss_zero: float | None
    problems: tuple[str, ...]

    @property
    def ce_recovered(self) -> float | None:
        """``(loss_zero - loss_sae) / (loss_zero - loss_clean)``, or None without losses."""
        if self.loss_clean is None or self.loss_sae is None or self.loss_zero is None:
            return None
        gap = self.loss_zero - self.loss_clean
        return (self.loss_zero - self.loss_sae) / gap if gap != 0 else None

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        parts = [f"SAE at {self.site}: d_in {self.d_in}"]
        for name, value in (
            ("explained variance", self.explained_variance),
            ("L0", self.l0),
            ("CE loss recovered", self.ce_recovered),
        ):
            if value is not None:
                parts.append(f"{name} {value:.3f}")
        head = ", ".join(parts)
        return head + ("; ok" if self.ok else "; PROBLEMS: " + "; ".join(self.problems))


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(
        F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )
    )


def check_sae(
    sae: AnySAE,
    model: nn.Module,
    site: str | None = None,
    prompts: Any = None,
    *,
    layer: int | None = None,
    backend: str = "torch",
    tokenizer: Any = None,
    min_explained_variance: float = 0.5,
    min_ce_recovered: float = 0.5,
    exclude_bos: bool = False,
    **options: Any,
) -> SAEFit:
    """Check that ``sae`` fits ``site`` of ``model``, measured on ``prompts``.

    ``site`` defaults to the SAE's own (``sae.info``). ``prompts`` are token ids
    ``[batch, pos]`` (or text with ``tokenizer``) for a language model, or float inputs for
    any other module (then no losses are measured). Returns an :class:`SAEFit`; nothing is
    raised for a poor fit, so print it or test ``fit.ok``. ``exclude_bos`` leaves position 0
    out of the measures and the splice.

    >>> import torch, interventions as iv
    >>> net = torch.nn.Sequential(torch.nn.Identity())
    >>> sae = iv.StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
    >>> fit = iv.check_sae(sae, net, "0.output", torch.linspace(-1, 1, 128).reshape(64, 2))
    >>> fit.d_in, fit.site_width, round(fit.explained_variance, 2) < 1.0
    (2, 2, True)
    """
    from interventions.architectures import describe
    from interventions.execute import run
    from interventions.graph import Graph

    info = getattr(sae, "info", None)
    if site is None:
        if info is None or info.site is None:
            raise ValueError("check_sae: pass site=; the SAE does not say where it belongs")
        site, layer = info.site, info.layer if layer is None else layer
    where = site if layer is None else f"{site}[{layer}]"
    problems: list[str] = []
    trained_on = getattr(info, "model_name", None)
    name = _model_name(model)
    if (
        trained_on
        and name
        and trained_on.split("/")[-1] not in name
        and name.split("/")[-1] not in trained_on
    ):
        problems.append(f"the SAE was trained on {trained_on!r}, the model is {name!r}")
    if info is not None and info.site is not None and (info.site, info.layer) != (site, layer):
        problems.append(f"the SAE was trained at {info.where}, it is checked at {where}")

    is_lm = (
        describe(model).is_hf
        and prompts is not None
        and (not isinstance(prompts, torch.Tensor) or not prompts.is_floating_point())
    )
    g = Graph()

    def new_run(name: str) -> Any:
        if isinstance(prompts, torch.Tensor) and prompts.is_floating_point():
            return g.run(name, inputs=prompts)
        if isinstance(prompts, torch.Tensor):
            return g.run(name, tokens=prompts)
        return g.run(name, text=prompts)

    clean = new_run("clean")
    clean.read(site, layer, name="x")
    if is_lm:
        clean.read("logits", name="clean")
    width = None
    try:
        acts = run(g, model, backend=backend, tokenizer=tokenizer, **options)
    except Exception as exc:
        raise type(exc)(f"check_sae at {where}: {exc}") from None
    x = acts["x"].float()
    if exclude_bos and x.ndim >= 3:
        x = x[:, 1:]
    width = int(x.shape[-1])
    sae_dtype = getattr(sae, "dtype", None)
    if width != sae.d_in:
        problems.append(f"the SAE reads vectors of size {sae.d_in}, the site {where} has {width}")
        return SAEFit(where, sae.d_in, width, None, None, None, None, None, tuple(problems))
    if sae_dtype is not None and sae_dtype != acts["x"].dtype:
        problems.append(
            f"dtype: the SAE is {sae_dtype}, the site is {acts['x'].dtype} (splices run in float32)"
        )
    f = sae.to(dtype=torch.float32).encode(x)
    recon = sae.to(dtype=torch.float32).forward(x)
    flat, rflat = x.reshape(-1, width), recon.reshape(-1, width)
    ev = 1.0 - float(
        ((flat - rflat) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum().clamp_min(1e-12)
    )
    l0 = float((f > 0).float().sum(-1).mean())
    if ev < min_explained_variance:
        problems.append(f"explained variance {ev:.3f} at {where} is below {min_explained_variance}")
    loss_clean = loss_sae = loss_zero = None
    if is_lm:
        g = g2 = Graph()  # new_run writes into g
        spliced = new_run("sae")
        spliced.sae_splice(
            site, layer, sae=sae, error="drop", pos=slice(1, None) if exclude_bos else None
        )
        spliced.read("logits", name="sae")
        zero = new_run("zero")
        zero.ablate(site, layer)
        zero.read("logits", name="zero")
        out = run(g2, model, backend=backend, tokenizer=tokenizer, **options)
        ids = prompts if isinstance(prompts, torch.Tensor) else None
        if ids is None:
            ids = torch.as_tensor(
                tokenizer(list(prompts), return_tensors="pt", padding=True)["input_ids"]
            )
        loss_clean = _next_token_loss(acts["clean"], ids)
        loss_sae = _next_token_loss(out["sae"], ids)
        loss_zero = _next_token_loss(out["zero"], ids)
    fit = SAEFit(where, sae.d_in, width, ev, l0, loss_clean, loss_sae, loss_zero, tuple(problems))
    rec = fit.ce_recovered
    if rec is not None and rec < min_ce_recovered:
        fit = SAEFit(
            where, sae.d_in, width, ev, l0, loss_clean, loss_sae, loss_zero,
            (*problems, f"CE loss recovered {rec:.3f} at {where} is below {min_ce_recovered}"),
        )  # fmt: skip
    return fit


def check_graph_saes(
    graph: Any,
    model: nn.Module,
    prompts: Any,
    *,
    backend: str = "torch",
    tokenizer: Any = None,
    strict: bool = True,
    **options: Any,
) -> dict[str, SAEFit]:
    """Validate ``graph``, then :func:`check_sae` every SAE it splices, at its site, on
    ``prompts``: the fit check on demand, before a long run.

    Returns the fits by splice (``"run.site"``). With ``strict`` (the default) an unfit SAE
    raises ``ValidationError`` naming each splice, SAE and number. Cross-site splices and
    transcoders are not measured (the check compares a site with its own reconstruction).

    >>> import torch, transformers, interventions as iv
    >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=4, n_head=1))
    >>> eye = torch.eye(4)
    >>> exact = iv.StandardSAE(torch.cat([eye, -eye], 1), torch.zeros(8),
    ...                        torch.cat([eye, -eye], 0), torch.zeros(4))  # relu(x) - relu(-x)
    >>> g = iv.Graph()
    >>> g.run("r", tokens=[[1, 2, 3]]).sae_splice("resid_pre", 0, sae=exact)
    >>> round(iv.check_graph_saes(g, model, torch.tensor([[1, 2, 3, 4]]))["r.resid_pre[0]"]
    ...       .explained_variance, 4)
    1.0
    """
    from interventions.errors import ValidationError
    from interventions.ops import SAESplice
    from interventions.sae.kinds import SAE_KINDS, sae_from_parts
    from interventions.validation import validate

    validate(graph, model, tokenizer=tokenizer, backend=backend)
    fits: dict[str, SAEFit] = {}
    problems: list[str] = []
    for op in graph.ops:
        where = f"{op.run}.{op.site}"
        if not isinstance(op, SAESplice) or op.source is not None or where in fits:
            continue
        spec = graph.saes[op.sae]
        if getattr(SAE_KINDS.get(spec.kind), "transcoder", False):
            continue
        tensors = {param: graph.tensors[key] for param, key in spec.tensors}
        sae = sae_from_parts(spec.kind, tensors, dict(spec.params))
        fit = check_sae(
            sae, model, op.site.name, prompts, layer=op.site.layer, backend=backend,
            tokenizer=tokenizer, **options,
        )  # fmt: skip
        fits[where] = fit
        problems += [f"sae_splice on {where}: SAE {op.sae!r}: {p}" for p in fit.problems]
    if strict and problems:
        raise ValidationError("unfit SAE(s): " + "; ".join(problems))
    return fits
