"""Client side: a validated plan compiled into stages of per-run programs (plain data).

How runs map to traces
----------------------
Runs are scheduled into *stages*, each one nnsight trace (one batched forward, or one
``generate`` call), in the plan's dependency order:

* forward runs of equal prompt length share a trace, one ``tracer.invoke`` per run;
* generating runs with equal prompt length and ``max_new_tokens`` share a ``generate``
  trace, one invoke per run, with ``tracer.iter`` walking the decoding steps;
* runs fed by ``inputs=`` tensors, and every run of a plain ``nn.Module`` (whose
  generic envoy cannot batch invokes), get a trace of their own.

A value that flows between runs (a ``patch`` from another run's read, the reference
run of a mean or resample ablation) stays inside the trace when producer and consumer
share a stage: both invokes touch the same module, and a ``tracer.barrier`` per
(producer, module) makes the consumer wait until the producer has recorded it. A flow
between different modules, or out of a generating run, sends the consumer to a later
stage; the value then waits in the executor's store (for NDIF, inside one session).
Different prompt lengths never share a trace: padding would move positions and
change the numbers.

What is resolved here
---------------------
Everything the core knows: sites become module paths and sides, selectors become plain
tuples (``int``, tuples of ints, ``slice``), generation selectors are rewritten per
decoding step, resample draws, SAE weights (float32) and the orthonormal bases of
``project_out`` are computed. :mod:`.program` runs the result with torch alone.

Generation: an op applies on the prompt pass and on every generated step, with
absolute positions (negative ones counted from the end of the prompt), exactly like
the torch reference; reads keep every fed position and are selected at the end.
Decoding is greedy with a KV cache, so step ``k > 0`` feeds exactly position
``prompt + k - 1``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from interventions.apply import orthonormal_basis
from interventions.architectures import HookPoint, ModelInfo
from interventions.attention import QKV_VIEWS, SPLIT_VIEWS
from interventions.devices import input_device
from interventions.ops import (
    Ablate,
    Add,
    Const,
    EdgePatch,
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
from interventions.plan import Plan, absolute_select, resample_indices, step_select
from interventions.sae import sae_from_parts
from interventions.sites import Index, Select, Site, Span

Location = tuple[str, str]  # (module path, "input" | "output")


def _event_order(model: nn.Module) -> dict[Location, int]:
    """When each module's input and output are reached, assuming children run in order.

    A module's input comes before anything inside it and its output after everything
    inside it. Registration order is not always execution order (Gemma-2/3 and OLMo-2
    register their post-norms after the MLP; a llama layer registers its norms last), so
    this is only the fallback of :func:`_observed_order` for modules its probe misses.
    """
    order: dict[Location, int] = {}
    stack: list[tuple[str, nn.Module, bool]] = [("", model, False)]
    seen: set[int] = set()
    while stack:
        name, module, done = stack.pop()
        if done:
            order[(name, "output")] = len(order)
            continue
        if id(module) in seen:
            continue
        seen.add(id(module))
        order[(name, "input")] = len(order)
        stack.append((name, module, True))
        children = [
            (f"{name}.{child}" if name else child, m) for child, m in module.named_children()
        ]
        for child_name, child in reversed(children):
            stack.append((child_name, child, False))
    return order


# model -> (its modules' ids, how the probe fed it, the order seen): the probe runs once
# per model and input kind, again if a module was swapped
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], str, dict[Location, int]]]
_PROBED = weakref.WeakKeyDictionary()


def _observed_order(model: nn.Module, plan: Plan) -> dict[Location, int]:
    """Module inputs and outputs in the order one small forward pass reaches them.

    Modules can run out of registration order (post-norm blocks, llama's norms), and a
    trace must touch them in execution order, so every plan is ordered by a probe: one
    batch item, one token, plain hooks removed at once; its result is kept per model.
    Modules the probe never reaches keep their registration order, after the others.
    """
    static = _event_order(model)
    if not plan.order:
        return static
    run = plan.graph.runs[plan.order[0]]
    mode = "inputs" if run.inputs is not None else "hf" if plan.info.is_hf else "tokens"
    modules = tuple(id(m) for m in model.modules())
    cached = _PROBED.get(model)
    if cached is not None and cached[0] == modules and cached[1] == mode:
        return cached[2]
    x = plan.inputs[run.name][:1]
    seen: dict[Location, int] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def recorder(where: Location) -> Any:
        def hook(*_: Any) -> None:
            seen.setdefault(where, len(seen))

        return hook

    device = input_device(model)
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(recorder((name, "input"))))
            handles.append(module.register_forward_hook(recorder((name, "output"))))
        with torch.no_grad():
            if mode == "inputs":
                model(x.to(device))
            elif mode == "hf":
                model(input_ids=x[:, :1].to(device), use_cache=False)
            else:
                model(x[:, :1].to(device))
    except Exception:  # the real run will report what is wrong with the model
        return static
    finally:
        for handle in handles:
            handle.remove()
    tail = len(seen)
    order = {loc: seen.get(loc, tail + i) for loc, i in static.items()}
    _PROBED[model] = (modules, mode, order)
    return order


def _encode_index(index: Index) -> Any:
    if isinstance(index, Span):
        return slice(index.start, index.stop, index.step)
    return index


def _encode_select(select: Select) -> tuple[tuple[str, Any], ...]:
    """A selector as plain data: (field, int | tuple of ints | slice) pairs."""
    return tuple((name, _encode_index(index)) for name, index in select.items())


def _axes_hint(site: Site) -> tuple[str, ...] | None:
    """The axis names of a standard site; ``None`` for raw sites (named by their ndim)."""
    return None if site.is_raw else tuple(site.kind.axes)


@dataclass
class _Entry:
    """An op of one run at one hook point, or a capture of the site for another run."""

    op: Op | None
    site: Site
    # "live": this run's own value of an edge's upstream node; "block": the block input
    # the per-head inputs of the layer ``site.layer`` need
    extra: str = ""


@dataclass
class _RunCode:
    """Everything the trace needs for one run, except envoys (bound at execution)."""

    name: str
    kind: str  # "fwd", "gen" or "single"
    generates: bool
    key: tuple[int, ...]
    rows: int
    prompt: int
    steps: list[list[tuple[Location, list[tuple[Any, ...]]]]]  # per step: locations
    swapped: set[Location]  # locations edited by replacing the value (raw sites)
    concat: list[tuple[str, tuple[str, ...] | None, tuple[tuple[str, Any], ...]]]
    locations: dict[str, Location]  # produced name / capture key -> where it is produced
    waits: dict[Location, list[str]] = field(default_factory=dict)
    signals: dict[Location, list[str]] = field(default_factory=dict)
    grads: bool = False  # a backward pass at the logits (a trace of its own)

    @property
    def empty(self) -> bool:
        """A forward pass with nothing to do or record (generation always records)."""
        return not self.generates and not any(self.steps)


@dataclass
class _Stage:
    kind: str
    key: tuple[int, ...]
    runs: list[_RunCode] = field(default_factory=list)
    barriers: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.runs)


def _capture_key(run: str, site: Site) -> str:
    return f"{run}|{site}"


def _live_key(run: str, site: Site) -> str:
    return f"{run}|live|{site}"


def _block_key(run: str, layer: int | None) -> str:
    return f"{run}|block|{layer}"


class _Compiler:
    """Turns a validated plan into stages of plain-data programs."""

    def __init__(self, plan: Plan, model: nn.Module, batched: bool) -> None:
        self.plan = plan
        self.info: ModelInfo = plan.info
        self.graph = plan.graph
        self.batched = batched
        # registration order is execution order except for raw sites and the families
        # whose attn_out/mlp_out are other modules (post-norms registered after the MLP)
        arch = plan.info.arch
        moved = arch is not None and (arch.attn_out is not None or arch.mlp_out is not None)
        raw = any(op.site.is_raw for op in plan.graph.ops)
        self.order = _observed_order(model, plan) if raw or moved else _event_order(model)
        self._saes: dict[str, tuple[Any, ...]] = {}
        self._bases: dict[str, torch.Tensor] = {}
        self.producers = plan.producers

    def location(self, site: Site) -> tuple[Location, HookPoint]:
        point = self.info.hook_point(site)
        return (point.module, point.io), point

    # -- per-op instructions ----------------------------------------------------------

    def sae_params(self, key: str, op: SAESplice) -> tuple[Any, ...]:
        if key not in self._saes:
            spec = self.graph.saes[key]
            tensors = {param: self.graph.tensors[k] for param, k in spec.tensors}
            sae = sae_from_parts(spec.kind, tensors, dict(spec.params)).to(dtype=torch.float32)
            self._saes[key] = sae.kernel()  # the canonical form: no per-kind code here
        edits = tuple((e.mode, list(e.features), e.value, e.low, e.high) for e in op.edits)
        return (*self._saes[key], edits, op.error)

    def basis(self, key: str) -> torch.Tensor:
        """Orthonormal columns spanning a project_out direction, as the reference builds them."""
        if key not in self._bases:
            self._bases[key] = orthonormal_basis(self.graph.tensors[key])
        return self._bases[key]

    def instruction(self, op: Op, view: str, select: Select, run: str) -> tuple[Any, ...]:
        axes = _axes_hint(op.site)
        sel = _encode_select(select)
        tensors = self.graph.tensors
        if isinstance(op, Read):
            return ("read", view, axes, sel, op.name)
        if isinstance(op, Grad):  # the gradient of the run's metric (see run_code)
            return ("grad", view, axes, sel, op.name)
        if isinstance(op, Patch):
            if isinstance(op.value, Const):
                return ("patch", view, axes, sel, tensors[op.value.tensor])
            assert isinstance(op.value, Ref)
            aligned = self.plan.aligned(op.value.read)
            return ("patchref", view, axes, sel, op.value.read, aligned)
        if isinstance(op, Ablate):
            if op.method == "zero":
                return ("ablate", view, axes, sel, "zero", None, None)
            assert op.source is not None
            key = _capture_key(op.source, op.site)
            if op.method == "mean":
                dims = (0,) if op.per_position else (0, 1)
                return ("ablate", view, axes, sel, "mean", key, dims)
            draws = resample_indices(
                op.seed, self.plan.batch_size(run), self.plan.batch_size(op.source)
            )
            return ("ablate", view, axes, sel, "resample", key, draws)
        if isinstance(op, Add):
            return ("add", view, axes, sel, tensors[op.direction.tensor], float(op.scale))
        if isinstance(op, ProjectOut):
            return ("project", view, axes, sel, self.basis(op.direction.tensor))
        if isinstance(op, Scale):
            return ("scale", view, axes, sel, float(op.factor))
        if isinstance(op, SAESplice):
            # a cross-site splice reads its source's capture, made earlier in this forward
            source = None if op.source is None else _capture_key(op.run, op.source)
            return ("sae", view, axes, sel, self.sae_params(op.sae, op), op.features, source)
        if isinstance(op, EdgePatch):
            return self.edge_instruction(op, view, sel, run)
        raise AssertionError(f"unknown op {op!r}")  # pragma: no cover - closed set

    # -- attention internals: per-head inputs and edge patches ---------------------------

    def internal_locations(self, run: str) -> dict[Location, list[tuple[HookPoint, list[_Entry]]]]:
        """The run's hook points by location, in the reference's order: ops first, then
        captures, then the live values of its edges' upstream nodes, each point in the
        order it first appears. At a q/k/v projection (q, k, v and the per-head inputs are
        views of its output) the reference applies ops in graph order, one run of
        consecutive ops at one view at a time, so a point there starts a new group whenever
        an op at another view of the module came between. A layer with a per-head input
        records its block input after the run's edits there."""
        plan = self.plan
        items = [(self.location(op.site)[1], _Entry(op, op.site)) for op in plan.ops_of(run)]
        items += [(self.location(s)[1], _Entry(None, s)) for s in plan.captures_of(run)]
        live = {op.upstream for op in plan.ops_of(run) if isinstance(op, EdgePatch)}
        items += [(self.location(s)[1], _Entry(None, s, "live")) for s in sorted(live, key=str)]
        by_location: dict[Location, list[tuple[HookPoint, list[_Entry]]]] = {}
        for point, entry in items:
            groups = by_location.setdefault((point.module, point.io), [])
            internal = point.view in QKV_VIEWS or point.view in SPLIT_VIEWS
            same = [g for g in groups if g[0] == point]
            if internal and groups and groups[-1][0] == point:
                groups[-1][1].append(entry)
            elif not internal and same:
                same[0][1].append(entry)
            else:
                groups.append((point, [entry]))
        arch = self.info.arch
        layers = sorted(
            {p.layer for gs in by_location.values() for p, _ in gs if p.layer is not None}
        )
        for layer in layers:
            assert arch is not None
            block = f"{arch.layers}.{layer}"
            entry = _Entry(None, Site("resid_pre", layer), "block")
            # last at the block input: after this run's edits there (resid_pre)
            by_location.setdefault((block, "input"), []).append(
                (HookPoint(block, "input"), [entry])
            )
        return by_location

    def internal_instruction(self, entry: _Entry, point: HookPoint, run: str) -> tuple[Any, ...]:
        """Record a block input (``block``) or this run's value of an edge's upstream
        node (``live``), for the per-head inputs and edge patches later in the pass."""
        if entry.extra == "block":
            return ("record", point.view, _block_key(run, entry.site.layer))
        return ("record", point.view, _live_key(run, entry.site))

    def split_instruction(
        self, point: HookPoint, run: str, subs: list[tuple[Any, ...]], step: int
    ) -> tuple[Any, ...]:
        """Ops at a per-head input: applied to each head's copy of the block input, then
        written as ``W_h (norm(x_h') - norm(x))`` into the projection's output."""
        arch = self.info.arch
        assert arch is not None and arch.attn_norm is not None and point.layer is not None
        norm = f"{arch.layers}.{point.layer}.{arch.attn_norm}"
        view = point.view.removeprefix("split_")
        copies = f"{run}|copies|{step}|{point.module}|{point.view}"  # kept for later groups
        block = _block_key(run, point.layer)
        return ("split", view, block, norm, point.module, tuple(subs), copies)

    def edge_instruction(
        self, op: EdgePatch, view: str, sel: tuple[tuple[str, Any], ...], run: str
    ) -> tuple[Any, ...]:
        arch = self.info.arch
        assert arch is not None
        w_o = None
        if op.upstream_head is not None:
            w_o = f"{arch.layers}.{op.upstream.layer}.{arch.attn_out_proj}"
        source = None if op.source is None else _capture_key(op.source, op.upstream)
        return (
            "edge",
            view,
            _axes_hint(op.site),
            sel,
            _live_key(run, op.upstream),
            source,
            op.method,
            op.upstream_head,
            w_o,
        )

    # -- per-run programs -------------------------------------------------------------

    def run_code(self, run: str) -> _RunCode:
        plan, graph = self.plan, self.graph
        graph_run = graph.runs[run]
        by_location = self.internal_locations(run)
        grads = [op for op in plan.ops_of(run) if isinstance(op, Grad)]
        objective: tuple[Location, tuple[Any, ...]] | None = None
        if grads:
            # the metric of the logits, then one backward pass to every grad op's tensor
            first = grads[0]
            loc, point = self.location(Site("logits"))
            groups = by_location.setdefault(loc, [])
            if not any(p == point for p, _ in groups):
                groups.append((point, []))
            tensors = self.graph.tensors
            wrong = None if first.wrong is None else tensors[first.wrong.tensor]
            objective = (
                loc,
                ("objective", point.view, first.metric, tensors[first.answer.tensor], wrong,
                 first.metric_pos),
            )  # fmt: skip
        locations = sorted(by_location, key=lambda loc: self.order.get(loc, len(self.order)))

        prompt = plan.prompt_length(run)
        generating = graph_run.generates
        n_steps = graph_run.max_new_tokens or 1
        fed = prompt + (n_steps - 1 if generating else 0)
        produced: dict[str, Location] = {}
        concat: list[tuple[str, tuple[str, ...] | None, tuple[tuple[str, Any], ...]]] = []
        steps: list[list[tuple[Location, list[tuple[Any, ...]]]]] = []
        # Standard sites are edited in place (each run's own rows of the live tensor).
        # A raw module path can name a tensor something else still holds (GPT-2 keeps
        # `ln_2`'s input as the residual), so edits there go to a copy swapped in.
        swapped = {
            loc
            for loc, groups in by_location.items()
            for _, entries in groups
            for e in entries
            if e.op is not None and not isinstance(e.op, Read) and e.site.is_raw
        }
        if grads:  # autograd keeps the out-of-place form: every edit goes to a copy
            swapped = set(by_location)
        for step in range(n_steps):
            offset, length = (0, prompt) if step == 0 else (prompt + step - 1, 1)
            step_locations: list[tuple[Location, list[tuple[Any, ...]]]] = []
            for loc in locations:
                instrs: list[tuple[Any, ...]] = []
                for point, entries in by_location[loc]:
                    target = instrs
                    if point.view in SPLIT_VIEWS:  # ops on each head's copy of the input
                        target = []
                    for entry in entries:
                        if entry.extra:
                            target.append(self.internal_instruction(entry, point, run))
                            continue
                        if entry.op is None:
                            key = _capture_key(run, entry.site)
                            target.append(("capture", point.view, key))
                            produced[key] = loc
                            continue
                        op = entry.op
                        for name in produces(op):
                            produced[name] = loc
                        if isinstance(op, Read) and generating:
                            # every fed position is kept; the selector applies at the end,
                            # with positions absolute (negative: from the end of the prompt)
                            target.append(("keep", point.view, op.name))
                            if step == 0:
                                at_end = absolute_select(op.select, prompt, fed)
                                concat.append(
                                    (op.name, _axes_hint(op.site), _encode_select(at_end))
                                )
                            continue
                        select: Select | None = op.select
                        if generating:
                            select = step_select(op.select, prompt, fed, offset, length)
                        if select is None:
                            continue
                        target.append(self.instruction(op, point.view, select, run))
                    if point.view in SPLIT_VIEWS and target:
                        instrs.append(self.split_instruction(point, run, target, step))
                if objective is not None and loc == objective[0] and step == 0:
                    instrs.append(objective[1])
                if instrs:
                    step_locations.append((loc, instrs))
            steps.append(step_locations)
        while steps and not steps[-1]:
            steps.pop()  # nothing to do at the last steps: do not wait for them

        batch_key: tuple[int, ...]
        if not self.batched or graph_run.inputs is not None:
            kind, batch_key = "single", ()
        elif grads:  # its own trace: one backward pass over its own rows
            kind, batch_key = "fwd", (prompt, -1 - plan.order.index(run))
        elif generating:
            kind, batch_key = "gen", (prompt, n_steps)
            if graph_run.sampling is not None:  # a seeded generate of its own
                batch_key = (*batch_key, -1 - plan.order.index(run))
        else:
            kind, batch_key = "fwd", (prompt,)
        return _RunCode(
            name=run,
            kind=kind,
            generates=generating,
            key=batch_key,
            rows=plan.batch_size(run),
            prompt=prompt,
            steps=steps,
            swapped=swapped,
            concat=concat,
            locations=produced,
            grads=bool(grads),
        )

    def dependencies(self, run: str) -> list[tuple[str, str, Location]]:
        """(producer run, produced key, consumer location) for each value ``run`` takes in."""
        out = []
        for op in self.plan.ops_of(run):
            loc = self.location(op.site)[0]
            if isinstance(op, Patch) and isinstance(op.value, Ref):
                out.append((self.producers[op.value.read].run, op.value.read, loc))
            elif isinstance(op, Ablate) and op.source is not None:
                out.append((op.source, _capture_key(op.source, op.site), loc))
            elif isinstance(op, EdgePatch) and op.source is not None:
                out.append((op.source, _capture_key(op.source, op.upstream), loc))
        return out

    def stages(self, max_batch: int | None) -> list[_Stage]:
        stages: list[_Stage] = []
        where: dict[str, int] = {}
        codes: dict[str, _RunCode] = {}
        for run in self.plan.order:
            code = self.run_code(run)
            codes[run] = code
            deps = self.dependencies(run)
            lower = 0
            shared: list[tuple[str, str, Location]] = []  # flows that may stay in one trace
            for producer, key, loc in deps:
                source = codes[producer]
                same_place = (
                    code.kind == "fwd"
                    and source.kind == "fwd"
                    and source.key == code.key
                    and source.locations.get(key) == loc
                )
                lower = max(lower, where[producer] + (0 if same_place else 1))
                if same_place:
                    shared.append((producer, key, loc))
            if code.empty and not code.locations:
                continue  # a forward pass nobody observes changes nothing
            limit = max_batch
            if limit is None and self.plan.budget is not None:
                # the planner's budget bounds a trace too: merging its batches into one
                # invoke set would build the forward it was told not to build
                limit = self.plan.budget.rows(code.prompt, self.info)
            index = next(
                (
                    i
                    for i in range(lower, len(stages))
                    if code.kind != "single"
                    and stages[i].kind == code.kind
                    and stages[i].key == code.key
                    and (limit is None or stages[i].rows + code.rows <= limit)
                ),
                None,
            )
            if index is None:
                stages.append(_Stage(code.kind, code.key))
                index = len(stages) - 1
            stage = stages[index]
            stage.runs.append(code)
            where[run] = index
            for producer, _key, loc in shared:
                if where[producer] != index:
                    continue
                barrier = f"{producer}@{loc[0]}.{loc[1]}"
                if barrier not in stage.barriers:
                    stage.barriers[barrier] = 1
                    codes[producer].signals.setdefault(loc, []).append(barrier)
                waits = code.waits.setdefault(loc, [])
                if barrier not in waits:
                    waits.append(barrier)
                    stage.barriers[barrier] += 1
        return stages
