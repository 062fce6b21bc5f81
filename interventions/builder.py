"""The builder: :class:`RunHandle` puts ops on one run of a graph, one method per op.

It needs only what :class:`GraphBuilder` names (the graph's ``ops``, ``add`` and its
tensor and SAE tables), so it imports nothing from :mod:`interventions.spec`, whose
``GraphSpec.run`` hands it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from interventions.errors import SpecError
from interventions.ops import (
    Ablate,
    Add,
    Const,
    FeatureEdit,
    Grad,
    Op,
    Patch,
    ProjectOut,
    Read,
    Ref,
    SAESplice,
    Scale,
    produces,
)
from interventions.sites import IndexLike, Select, Site

if TYPE_CHECKING:
    from interventions.sae.base import SAE


class GraphBuilder(Protocol):
    """What a :class:`RunHandle` uses of its graph."""

    ops: list[Op]

    def add(self, op: Op) -> Op: ...

    def _add_tensor(self, tensor: torch.Tensor) -> str: ...

    def _add_sae(self, sae: SAE) -> str: ...


class MetricLike(Protocol):
    """What :meth:`RunHandle.grad` reads of a metric (``iv.recipes.Metric`` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def answer(self) -> torch.Tensor | None: ...

    @property
    def wrong(self) -> torch.Tensor | None: ...


class RunHandle:
    """Puts ops on one run of a graph. Returned by :meth:`Graph.run`."""

    def __init__(self, graph: GraphBuilder, name: str) -> None:
        self.graph = graph
        self.name = name

    def __repr__(self) -> str:
        return f"<run {self.name!r}>"

    def _default_name(self, prefix: str, s: Site, select: Select) -> str:
        """``<prefix><site>.<layer>`` (plus ``.h<head>`` for one head), with ``:2``, ``:3``
        ... appended while the name is taken by another op's output."""
        name = f"{prefix}{s.name}" + ("" if s.layer is None else f".{s.layer}")
        if isinstance(select.head, int):
            name += f".h{select.head}"
        taken = {n for op in self.graph.ops for n in produces(op)}
        base, i = name, 1
        while name in taken:
            i += 1
            name = f"{base}:{i}"
        return name

    def _site(self, site: str | Site, layer: int | None) -> Site:
        if isinstance(site, Site):
            if layer is not None and layer != site.layer:
                raise SpecError(f"site {site} given with a different layer={layer}")
            return site
        return Site(site, layer)

    def _const(self, tensor: Any, what: str, ids: bool = False) -> Const:
        # ``ids``: expert ids (experts_chosen) keep an integer dtype; everything else is float
        if not isinstance(tensor, torch.Tensor):
            try:
                tensor = torch.as_tensor(tensor, dtype=None if ids else torch.float32)
            except (TypeError, ValueError, RuntimeError) as exc:
                hint = ""
                if isinstance(tensor, str):
                    hint = (
                        f"; to use a value read in another run, pass the Ref that read() "
                        f"returned, or iv.Ref({tensor!r})"
                    )
                raise SpecError(
                    f"{what} must be a tensor, got {type(tensor).__name__}{hint}"
                ) from exc
        if ids and not tensor.is_floating_point() and tensor.dtype != torch.bool:
            tensor = tensor.long()
        elif not tensor.is_floating_point():
            tensor = tensor.float()
        return Const(self.graph._add_tensor(tensor))

    def read(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        name: str | None = None,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> Ref:
        """Record a site's value. Returns a reference that can be patched into other runs.

        The default name is ``"<run>.<site>.<layer>"`` (plus ``.h<head>`` for one head).
        """
        s = self._site(site, layer)
        select = Select.make(batch=batch, pos=pos, head=head, dims=dims)
        if name is None:
            name = self._default_name(f"{self.name}.", s, select)
        self.graph.add(Read(self.name, s, select, name))
        return Ref(name)

    def patch(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        value: Ref | torch.Tensor,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> None:
        """Overwrite the selection with a value read in another run, or a constant tensor.

        A value read with no selector is *aligned*: the patch's selector picks the same
        entries from it. A value read with a selector is placed as it is (broadcasting).
        """
        s = self._site(site, layer)
        ids = s.name == "experts_chosen"  # expert ids stay integers
        v: Ref | Const = value if isinstance(value, Ref) else self._const(value, "patch value", ids)
        self.graph.add(
            Patch(
                self.name,
                s,
                Select.make(batch=batch, pos=pos, head=head, dims=dims),
                v,
            )
        )

    def ablate(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        method: str = "zero",
        source: RunHandle | str | None = None,
        per_position: bool = False,
        seed: int = 0,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> None:
        """Zero the selection, or replace it by the mean over / a resample from ``source``.

        ``mean`` averages the source run's values over its batch and, unless
        ``per_position``, over positions too. ``resample`` gives each batch item the
        values of a source item drawn with ``seed``.
        """
        src = source.name if isinstance(source, RunHandle) else source
        self.graph.add(
            Ablate(
                self.name,
                self._site(site, layer),
                Select.make(batch=batch, pos=pos, head=head, dims=dims),
                method,  # type: ignore[arg-type]
                src,
                per_position,
                seed,
            )
        )

    def add(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        direction: torch.Tensor,
        scale: float = 1.0,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> None:
        """Add ``scale * direction`` to the selection (steering)."""
        self.graph.add(
            Add(
                self.name,
                self._site(site, layer),
                Select.make(batch=batch, pos=pos, head=head, dims=dims),
                self._const(direction, "direction"),
                float(scale),
            )
        )

    def project_out(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        direction: torch.Tensor,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> None:
        """Remove the component along ``direction`` ([d]) or a subspace ([k, d] rows)."""
        self.graph.add(
            ProjectOut(
                self.name,
                self._site(site, layer),
                Select.make(batch=batch, pos=pos, head=head, dims=dims),
                self._const(direction, "direction"),
            )
        )

    def scale(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        factor: float,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> None:
        """Multiply the selection by ``factor``."""
        self.graph.add(
            Scale(
                self.name,
                self._site(site, layer),
                Select.make(batch=batch, pos=pos, head=head, dims=dims),
                float(factor),
            )
        )

    def grad(
        self,
        site: str | Site,
        layer: int | None = None,
        *,
        metric: MetricLike,
        metric_pos: int = -1,
        name: str | None = None,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> str:
        """Record the gradient at the selection of ``metric`` of this run's logits at
        ``metric_pos``, summed over the run's prompts; returns the result's name
        (default ``"<run>.grad.<site>.<layer>"``). ``metric``: a ``logit_diff``,
        ``logit``, ``prob`` or ``logprob`` :class:`~interventions.recipes.Metric` (its
        kind and token ids: one per prompt, or one for all). The backward pass runs
        where the model runs, remotely too; see :class:`~interventions.ops.Grad`.

        >>> import torch, interventions as iv
        >>> from interventions.recipes import Metric
        >>> g = iv.Graph()
        >>> g.run("r", tokens=[[1, 2, 3]]).grad("resid_pre", 0, metric=Metric.logit(5))
        'r.grad.resid_pre.0'
        """
        s = self._site(site, layer)
        kind = getattr(metric, "kind", None)
        if not isinstance(kind, str) or not isinstance(
            getattr(metric, "answer", None), torch.Tensor
        ):
            raise SpecError(
                "grad: metric= must be a Metric of the logits (logit_diff, logit, prob, logprob) "
                f"with answer token ids, got {metric!r:.80}"
            )

        def ids(value: torch.Tensor | None) -> Const | None:
            if value is None:
                return None
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise SpecError(f"grad: metric token ids must be integers, got {value.dtype}")
            t = value if value.dtype == torch.long else value.long()
            return Const(self.graph._add_tensor(t if t.ndim == 1 else t.reshape(-1)))

        answer = ids(metric.answer)
        assert answer is not None
        select = Select.make(batch=batch, pos=pos, head=head, dims=dims)
        if name is None:
            name = self._default_name(f"{self.name}.grad.", s, select)
        self.graph.add(
            Grad(self.name, s, select, name, kind, answer, ids(metric.wrong), metric_pos)  # type: ignore[arg-type]
        )
        return name

    def sae_splice(
        self,
        site: str | Site | None = None,
        layer: int | None = None,
        *,
        sae: SAE,
        edits: Sequence[FeatureEdit] = (),
        error: str = "keep",
        features: str | None = None,
        source: str | Site | None = None,
        source_layer: int | None = None,
        batch: IndexLike = None,
        pos: IndexLike = None,
        head: IndexLike = None,
        dims: IndexLike = None,
    ) -> Ref | None:
        """Replace the selection by the SAE's reconstruction after feature ``edits``.

        ``error="keep"`` adds back ``x - decode(encode(x))`` (so no edits = no change);
        ``"drop"`` leaves the bare reconstruction; ``"detach"`` keeps it without gradient.
        ``features="name"`` records the unedited feature activations as a result.

        Gradients: ``keep`` and ``detach`` give identical forward values but different
        gradients. With ``keep`` the error term is differentiable, so the gradient reaches
        ``x`` unchanged along it and, with no edits, the features' gradient is exactly
        zero (``W_dec`` is added and subtracted). With ``detach`` (SAELens's convention:
        its error term carries no gradient) it flows only through the SAE: the features'
        gradient is ``W_dec @ grad``. Gradient recipes default to ``detach`` and warn
        (:class:`~interventions.errors.SAEErrorGradientWarning`) when given ``keep``.

        With no ``site``, the SAE's own (``sae.info``, e.g. from ``iv.load_sae``) is used.
        ``pos=slice(1, None)`` keeps position 0 (the BOS token) out of the splice.

        Cross-site transcoders: with ``source`` (and ``source_layer``), the SAE reads that
        site, earlier in the same forward pass and at the same selection (after this run's
        other ops there), and writes its reconstruction at ``site``; the error term is
        ``x_site - reconstruction``. A transcoder whose ``info`` names a different output
        site (``hook_name_out``) gets both from it when ``site`` is not given.

        >>> import torch, transformers, interventions as iv
        >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=4, n_head=1))
        >>> tc = iv.Transcoder(torch.eye(4), torch.zeros(4), torch.zeros(4, 4), torch.zeros(4))
        >>> g = iv.Graph()
        >>> r = g.run("r", tokens=[[1, 2]])
        >>> r.sae_splice("mlp_out", 0, sae=tc, source="resid_pre", source_layer=0, error="drop")
        >>> _ = r.read("mlp_out", 0, name="out")
        >>> iv.run(g, model)["out"].abs().max().item()  # the transcoder writes zeros
        0.0
        """
        info = getattr(sae, "info", None)
        if (
            site is None
            and source is None
            and info is not None
            and info.site is not None
            and info.site_out is not None
            and (info.site_out, info.layer_out) != (info.site, info.layer)
        ):
            site, layer = info.site_out, info.layer_out
            source, source_layer = info.site, info.layer
        if site is None:
            info = getattr(sae, "info", None)
            if info is None or info.site is None:
                hook = getattr(info, "hook_name", None)
                raise SpecError(
                    "sae_splice: no site given, and the SAE does not say where it belongs"
                    + (f" (its hook {hook!r} has no standard site)" if hook else "")
                    + "; pass a site, e.g. sae_splice('resid_pre', 8, sae=...)"
                )
            site, layer = info.site, info.layer if layer is None else layer
        key = self.graph._add_sae(sae)
        self.graph.add(
            SAESplice(
                self.name,
                self._site(site, layer),
                Select.make(batch=batch, pos=pos, head=head, dims=dims),
                key,
                tuple(edits),
                error,  # type: ignore[arg-type]
                features,
                None if source is None else self._site(source, source_layer),
            )
        )
        return Ref(features) if features is not None else None
