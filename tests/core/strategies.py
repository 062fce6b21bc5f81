"""Hypothesis strategies for random, valid intervention graphs built through the public API.

Every graph is made the way a user makes one (``iv.Graph()``, ``g.run(...)``, then
``read``/``patch``/``ablate``/``add``/``project_out``/``scale``/``sae_splice`` on the run
handles), so a strategy failure is a builder failure.

>>> from tests.core.strategies import graphs
>>> strategy = graphs(n_layers=2, n_heads=4, d_model=32, seq=7, vocab=64)

What a drawn graph guarantees:

* it passes ``Graph.check()``, and its runs have no dependency cycle;
* every layer, batch, position, head and hidden index is in range for the given sizes (a
  ``seq``-token prompt, ``batch`` items per run; generating runs count positions the way
  :func:`interventions.plan.generation_positions` does);
* constants and directions broadcast to the region their op selects, ``project_out``
  directions are ``[w]`` or ``[k, w]`` and SAEs read ``w`` wide vectors, where ``w`` is the
  last axis of the selected region; patched-in values from other runs fit the region;
* every op kind, every selector form (int, negative int, list, tuple, ``range``, 0-d and
  1-d int tensors, ``slice`` and ``Span`` with ``None`` bounds and steps), ``head=`` only
  on the ``head``/``attn_pattern`` sites, raw module sites, values flowing between runs,
  constants of several dtypes and shapes (with NaN, inf, -0.0 and odd NaN payloads, and
  scalars such as 1.8e308 that overflow float32, unless ``nonfinite=False``), mean/resample ablations over source runs, and SAE splices with
  ``FeatureEdit.set/scale/clamp`` and ``error`` keep/drop/detach can all occur. Tensor
  objects (token ids, directions, SAEs) are sometimes reused by several runs or ops.

What it does not guarantee: that a given model has the raw module paths in
``raw_sites``, that text prompts tokenize to ``seq`` tokens (pass ``text_words`` with a
word-level tokenizer's vocabulary for that), or that ``inputs=`` runs suit the model. A
conformance suite narrows these with the keyword arguments (``run_kinds``, ``raw_sites``,
``generation``, ``nonfinite``, ``d_mlp``) and can still ``validate`` each graph.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

import interventions as iv
from interventions.ops import FeatureEdit, Ref
from interventions.plan import generation_positions
from interventions.selection import selected_shape
from interventions.sites import RESIDUAL, STANDARD_SITES, Select, Site, Span

__all__ = [
    "CONST_DTYPES",
    "DEFAULT_SITES",
    "GRAD_OP_KINDS",
    "MOE_SITES",
    "OP_KINDS",
    "RAW_SITES",
    "RUN_KINDS",
    "Sizes",
    "graphs",
    "names",
    "tensors",
]

OP_KINDS = ("read", "patch", "ablate", "add", "project_out", "scale", "sae_splice")
# grad ops (a metric of the logits per run) are drawn only when asked for
GRAD_OP_KINDS = (*OP_KINDS, "grad")
RUN_KINDS = ("tokens", "text", "inputs")
RAW_SITES = ("transformer.h.0.mlp.output", "output")
CONST_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)
MOE_SITES = ("router_logits", "experts_chosen", "expert_out")
DEFAULT_SITES = tuple(n for n in STANDARD_SITES if n not in MOE_SITES)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NAME_CHARS = string.ascii_letters + string.digits + "_-.:/"

# Bit patterns of NaNs that are not the default quiet NaN (payloads, negative sign).
_ODD_NANS: dict[torch.dtype, tuple[torch.dtype, tuple[int, ...]]] = {
    torch.float32: (torch.int32, (0x7FC00001, -0x003FFFFF, 0x7F800001)),
    torch.float64: (torch.int64, (0x7FF8000000000001, -0x0007FFFFFFFFFFFF)),
    torch.float16: (torch.int16, (0x7E01, -0x01FF)),
    torch.bfloat16: (torch.int16, (0x7FC1, -0x003F)),
}


@dataclass(frozen=True)
class Sizes:
    """Model sizes the indices of a drawn graph must respect."""

    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 32
    seq: int = 7
    vocab: int = 64
    d_mlp: int = 128

    def width(self, site: Site) -> int:
        """Size of the hidden (last) axis of a site; raw sites are taken as ``d_model``."""
        if site.is_raw:
            return self.d_model
        return {
            "head": max(1, self.d_model // self.n_heads),
            "mlp_hidden": self.d_mlp,
            "logits": self.vocab,
        }.get(site.name, self.d_model)


@dataclass
class _RunInfo:
    handle: iv.RunHandle
    batch: int
    prompt: int
    new_tokens: int | None

    @property
    def generates(self) -> bool:
        return self.new_tokens is not None

    @property
    def fed(self) -> int:
        """Positions fed to the model: the prompt plus all generated tokens but the last."""
        return self.prompt + (self.new_tokens - 1 if self.new_tokens else 0)


@dataclass
class _ReadInfo:
    name: str
    run: str
    site: Site
    select: Select


@dataclass
class _State:
    graph: iv.Graph
    sizes: Sizes
    runs: dict[str, _RunInfo] = field(default_factory=dict)
    reads: list[_ReadInfo] = field(default_factory=list)
    needs: dict[str, set[str]] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    token_tensors: list[torch.Tensor] = field(default_factory=list)
    consts: list[torch.Tensor] = field(default_factory=list)
    saes: list[Any] = field(default_factory=list)
    sites: tuple[str, ...] = ()
    metrics: dict[str, tuple[Any, int]] = field(default_factory=dict)  # grad: per run

    def depends(self, run: str, other: str) -> bool:
        """Whether ``run`` needs ``other``, directly or through other runs."""
        todo, seen = [run], set()
        while todo:
            r = todo.pop()
            if r == other:
                return True
            if r not in seen:
                seen.add(r)
                todo.extend(self.needs.get(r, ()))
        return False

    def can_source(self, target: str, source: str) -> bool:
        """Whether ``target`` may take values from ``source`` without a run cycle."""
        return source != target and not self.depends(source, target)


# --- small pieces ---------------------------------------------------------------------------


def names() -> st.SearchStrategy[str]:
    """Valid run and read names: letters, digits and ``_-.:/``."""
    return st.one_of(
        st.sampled_from(["clean", "corrupt", "a", "b", "x.y", "run-1", "r/2", "α", "ok:3"]),
        st.text(alphabet=NAME_CHARS, min_size=1, max_size=12),
    )


def _fresh_name(draw: st.DrawFn, taken: set[str]) -> str:
    name = draw(names())
    while name in taken:
        name += draw(st.sampled_from(NAME_CHARS))
    taken.add(name)
    return name


def _float(draw: st.DrawFn, extreme: bool = True) -> float:
    """A finite float, sometimes an int; with ``extreme`` also -0.0, subnormals, huge ones."""
    if not extreme:
        return draw(st.floats(-4.0, 4.0, allow_nan=False) | st.integers(-3, 3))
    return draw(
        st.one_of(
            st.floats(-4.0, 4.0, allow_nan=False),
            st.sampled_from([0.0, -0.0, 1.0, 5e-324, -1e308, 1.7976931348623157e308, 1e-7]),
            st.integers(-3, 3),
            st.floats(allow_nan=False, allow_infinity=False),
        )
    )


@st.composite
def tensors(
    draw: st.DrawFn,
    shape: Sequence[int],
    dtypes: Sequence[torch.dtype] = CONST_DTYPES,
    nonfinite: bool = True,
) -> torch.Tensor:
    """A tensor of ``shape``: random values, plus a few special ones when ``nonfinite``."""
    dtype = draw(st.sampled_from(list(dtypes)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if dtype.is_floating_point:
        t = (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * 3).to(dtype)
    else:
        t = torch.randint(-(2**40), 2**40, tuple(shape), generator=gen, dtype=dtype)
    n = t.numel()
    if n and dtype.is_floating_point:
        flat = t.view(-1)
        specials = [0.0, -0.0, torch.finfo(dtype).max, torch.finfo(dtype).tiny]
        if nonfinite:
            specials += [float("nan"), float("inf"), float("-inf")]
        for _ in range(draw(st.integers(0, 3))):
            i = draw(st.integers(0, n - 1))
            flat[i] = draw(st.sampled_from(specials))
        if nonfinite and draw(st.booleans()):
            bits_dtype, patterns = _ODD_NANS[dtype]
            flat.view(bits_dtype)[draw(st.integers(0, n - 1))] = draw(st.sampled_from(patterns))
    return t


def _index_form(draw: st.DrawFn, items: list[int]) -> Any:
    """The same list selector spelled as a list, tuple, range or 1-d tensor."""
    form = draw(st.sampled_from(["list", "tuple", "tensor", "range"]))
    if form == "tuple":
        return tuple(items)
    if form == "tensor":
        return torch.tensor(items, dtype=draw(st.sampled_from([torch.int64, torch.int32])))
    if form == "range" and len(items) >= 2:
        step = items[1] - items[0]
        if step and all(b - a == step for a, b in itertools.pairwise(items)):
            return range(items[0], items[-1] + (1 if step > 0 else -1), step)
    return list(items)


def _selector(
    draw: st.DrawFn, size: int, *, positions: bool = False, prompt: int = 0, fed: int = 0
) -> Any:
    """A selector for one axis of ``size`` entries (``None`` half of the time).

    ``positions`` draws for the pos axis of a generating run, where negative indices count
    from the end of the prompt and slice steps must be positive.
    """
    if size <= 0 or draw(st.integers(0, 9)) < 5:
        return None
    lo = -prompt if positions else -size
    hi = fed if positions else size
    kind = draw(st.sampled_from(["int", "int", "list", "slice", "span", "tensor0"]))
    if kind == "int":
        return draw(st.integers(lo, hi - 1))
    if kind == "tensor0":
        return torch.tensor(draw(st.integers(lo, hi - 1)))
    if kind == "list":
        # Distinct entries: a patch through repeated indices has no single right answer.
        items = draw(st.lists(st.integers(lo, hi - 1), min_size=1, max_size=3))
        seen: set[int] = set()
        unique = []
        for i in items:
            # the entry an index names: from the prompt's end in generation, else modulo
            key = (i + prompt if i < 0 else i) if positions else i % size
            if key not in seen:
                seen.add(key)
                unique.append(i)
        return _index_form(draw, unique)
    bound = st.none() | st.integers(lo - 1, hi + 1)
    step = (
        st.none() | st.integers(1, 3)
        if positions
        else st.none() | st.integers(1, 3) | st.integers(-3, -1)
    )
    for _ in range(20):
        start, stop, stp = draw(bound), draw(bound), draw(step)
        span = Span(start, stop, stp)
        chosen = (
            generation_positions(span, prompt, fed) if positions else span.indices(size)
        ) or []
        if chosen and all(0 <= p < (fed if positions else size) for p in chosen):
            return slice(start, stop, stp) if kind == "slice" else span
    return None


def _select(
    draw: st.DrawFn,
    st8: _State,
    run: _RunInfo,
    site: Site,
    *,
    keep_hidden: bool = False,
) -> dict[str, Any]:
    """Selector keyword arguments for an op at ``site`` of ``run``."""
    sizes = st8.sizes
    out: dict[str, Any] = {
        "batch": _selector(draw, run.batch),
        "pos": _selector(draw, run.fed, positions=run.generates, prompt=run.prompt, fed=run.fed),
    }
    if site.name in ("head", "attn_pattern") and not site.is_raw:
        out["head"] = _selector(draw, sizes.n_heads)
    last = run.fed if site.name == "attn_pattern" else sizes.width(site)
    dims = _selector(draw, last)
    if keep_hidden and (
        isinstance(dims, int) or (isinstance(dims, torch.Tensor) and dims.ndim == 0)
    ):
        dims = [int(dims)]
    out["dims"] = dims
    return {k: v for k, v in out.items() if v is not None}


def _region(st8: _State, run: _RunInfo, site: Site, select: Select) -> tuple[int, ...]:
    """Shape of what ``select`` picks at ``site`` in ``run`` (mirrors ``validate``)."""
    sizes = st8.sizes
    axes = RESIDUAL if site.is_raw else site.kind.axes
    dims = {
        "batch": run.batch,
        "pos": run.fed,
        "key_pos": run.fed,
        "head": sizes.n_heads,
        "hidden": sizes.width(site),
    }
    shape = [dims[a] for a in axes]
    if run.generates and select.pos is not None:
        positions = generation_positions(select.pos, run.prompt, run.fed) or []
        pos: Any = positions[0] if isinstance(select.pos, int) else tuple(positions)
        select = Select(select.batch, pos, select.head, select.dims)
    return selected_shape(select, axes, shape)


def _fits(value: tuple[int, ...], region: tuple[int, ...]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(value, region)) == tuple(region)
    except RuntimeError:
        return False


# Not drawn yet: their per-backend support differs (nnsight: per-head inputs and
# attn_scores; pyvene: attn_scores) and their shapes need head counts by site;
# tests/adapters/*/test_attention_*.py and test_attn_scores.py cover them.
_ATTENTION_INTERNALS = frozenset(
    {"resid_mid", "q", "k", "v", "q_input", "k_input", "v_input", "attn_scores"}
)


def _site(draw: st.DrawFn, st8: _State, raw_sites: Sequence[str], *, writable: bool) -> Any:
    """A site spelled as ``(name, layer)`` arguments, or as a :class:`Site` object."""
    names_ = [
        n
        for n in st8.sites
        if (STANDARD_SITES[n].writable or not writable) and n not in _ATTENTION_INTERNALS
    ]
    choices = names_ + list(raw_sites)
    name = draw(st.sampled_from(choices))
    if name in STANDARD_SITES and STANDARD_SITES[name].layered:
        layer = draw(st.integers(0, st8.sizes.n_layers - 1))
    else:
        layer = None
    site = Site(name, layer)
    spelled: Any = (site, None) if draw(st.integers(0, 4)) == 0 else (name, layer)
    return site, spelled


def _site_args(spelled: tuple[Any, int | None], draw: st.DrawFn) -> tuple[tuple, dict]:
    """Positional/keyword spelling of a site for a run-handle method."""
    name, layer = spelled
    if layer is None:
        return (name,), {}
    if draw(st.booleans()):
        return (name, layer), {}
    return (name,), {"layer": layer}


def _const_shape(draw: st.DrawFn, region: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``region``: a suffix of it with some axes set to 1."""
    k = draw(st.integers(0, min(len(region), 3)))
    suffix = region[len(region) - k :]
    return tuple(1 if draw(st.integers(0, 3)) == 0 else n for n in suffix)


def _const(draw: st.DrawFn, st8: _State, shape: tuple[int, ...], nonfinite: bool) -> torch.Tensor:
    for t in st8.consts:  # reuse one tensor object for several ops now and then
        if tuple(t.shape) == shape and draw(st.integers(0, 3)) == 0:
            return t
    t = draw(tensors(shape, CONST_DTYPES, nonfinite))
    st8.consts.append(t)
    return t


def _sae(draw: st.DrawFn, st8: _State, d_in: int) -> Any:
    for sae in st8.saes:
        if sae.d_in == d_in and draw(st.booleans()):
            return sae
    kind = draw(st.sampled_from(["relu", "jumprelu", "topk"]))
    d_sae = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    parts = {
        "W_enc": rand(d_in, d_sae),
        "b_enc": rand(d_sae),
        "W_dec": rand(d_sae, d_in),
        "b_dec": rand(d_in),
    }
    flag = draw(st.booleans())
    if kind == "relu":
        sae = iv.StandardSAE(**parts, apply_b_dec_to_input=flag)
    elif kind == "jumprelu":
        sae = iv.JumpReLUSAE(**parts, threshold=rand(d_sae).abs(), apply_b_dec_to_input=flag)
    else:
        sae = iv.TopKSAE(**parts, k=draw(st.integers(1, d_sae)), apply_b_dec_to_input=flag)
    st8.saes.append(sae)
    return sae


def _edits(draw: st.DrawFn, d_sae: int, extreme: bool) -> list[FeatureEdit]:
    edits = []
    for _ in range(draw(st.integers(0, 3))):
        feats = draw(st.lists(st.integers(0, d_sae - 1), min_size=1, max_size=3, unique=True))
        spelled: Any = feats[0] if len(feats) == 1 and draw(st.booleans()) else feats
        mode = draw(st.sampled_from(["set", "scale", "clamp", "direct"]))
        if mode == "set":
            edits.append(FeatureEdit.set(spelled, _float(draw, extreme)))
        elif mode == "scale":
            edits.append(FeatureEdit.scale(spelled, _float(draw, extreme)))
        elif mode == "clamp":
            a, b = sorted([draw(st.floats(-5, 5)), draw(st.floats(-5, 5))])
            low, high = draw(
                st.sampled_from([(a, b), (a, None), (None, b), (0.0, 0.0), (-0.0, abs(b))])
            )
            edits.append(FeatureEdit.clamp(spelled, low=low, high=high))
        else:  # the dataclass itself, with an int value as a user might write it
            edits.append(FeatureEdit(tuple(feats), "set", draw(st.integers(-3, 3))))
    return edits


# --- runs and ops ---------------------------------------------------------------------------


def _add_run(
    draw: st.DrawFn,
    st8: _State,
    batch: int,
    run_kinds: Sequence[str],
    generation: bool,
    text_words: Sequence[str] | None,
    nonfinite: bool,
) -> None:
    sizes = st8.sizes
    name = _fresh_name(draw, st8.taken)
    kind = draw(st.sampled_from(list(run_kinds)))
    new_tokens = None
    if kind != "inputs" and generation and draw(st.integers(0, 3)) == 0:
        # one new token: only the prompt pass runs, so every op in the graph stays valid
        # (per-position values cannot apply to generated steps); multi-step generation is
        # covered in tests/adapters/torch/test_generation.py
        new_tokens = 1
    g = st8.graph
    if kind == "tokens":
        reuse = [t for t in st8.token_tensors if t.shape[0] == batch]
        if reuse and draw(st.integers(0, 2)) == 0:
            ids: Any = draw(st.sampled_from(reuse))  # one tensor shared by two runs
        else:
            gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
            ids = torch.randint(0, sizes.vocab, (batch, sizes.seq), generator=gen)
            ids = ids.to(draw(st.sampled_from([torch.int64, torch.int32])))
            st8.token_tensors.append(ids)
            form = draw(st.sampled_from(["tensor", "list", "flat"]))
            if form == "list":
                ids = ids.tolist()
            elif form == "flat" and batch == 1:
                ids = ids[0] if draw(st.booleans()) else ids[0].tolist()
        handle = g.run(name, tokens=ids, max_new_tokens=new_tokens)
    elif kind == "text":
        if text_words is not None:
            words = st.sampled_from(list(text_words))
            prompt = st.lists(words, min_size=sizes.seq, max_size=sizes.seq).map(" ".join)
        else:
            prompt = st.text(min_size=1, max_size=30)
        texts = draw(st.lists(prompt, min_size=batch, max_size=batch))
        text: Any = texts[0] if batch == 1 and draw(st.booleans()) else texts
        handle = g.run(name, text=text, max_new_tokens=new_tokens)
    else:
        inputs = draw(tensors((batch, sizes.seq, sizes.d_model), FLOAT_DTYPES, nonfinite))
        handle = g.run(name, inputs=inputs)
    st8.runs[name] = _RunInfo(handle, batch, sizes.seq, new_tokens)
    st8.needs[name] = set()


def _read(draw: st.DrawFn, st8: _State, run: _RunInfo, raw_sites: Sequence[str]) -> None:
    writable = run.generates  # attention patterns cannot be read while generating
    site, spelled = _site(draw, st8, raw_sites, writable=writable)
    select = _select(draw, st8, run, site)
    name = _fresh_name(draw, st8.taken) if draw(st.booleans()) else None
    args, kwargs = _site_args(spelled, draw)
    ref = run.handle.read(*args, name=name, **kwargs, **select)
    st8.taken.add(ref.read)
    op = st8.graph.ops[-1]
    st8.reads.append(_ReadInfo(ref.read, op.run, op.site, op.select))


def _ref_for(draw: st.DrawFn, st8: _State, run: _RunInfo, site: Site, select: Select) -> Ref | None:
    """A value read in another run that fits the region ``select`` picks at ``site``."""
    region = _region(st8, run, site, select)
    sizes = st8.sizes

    def fits(read: _ReadInfo) -> bool:
        src = st8.runs[read.run]
        if not st8.can_source(run.handle.name, read.run):
            return False
        try:
            return fits_shape(read, src)
        except IndexError:  # the patch's positions do not exist in the source run
            return False

    def fits_shape(read: _ReadInfo, src: _RunInfo) -> bool:
        if read.select.is_all:  # aligned: the patch's selector picks from it
            same_shape = (read.site.is_raw and site.is_raw) or (
                not read.site.is_raw
                and not site.is_raw
                and read.site.kind.axes == site.kind.axes
                and sizes.width(read.site) == sizes.width(site)
            )
            return same_shape and _fits(_region(st8, src, site, select), region)
        return _fits(_region(st8, src, read.site, read.select), region)

    usable = [r for r in st8.reads if r.run != run.handle.name and fits(r)]
    if usable and draw(st.booleans()):
        read = draw(st.sampled_from(usable))
    else:
        sources = [
            r
            for name, r in st8.runs.items()
            if st8.can_source(run.handle.name, name) and not r.generates
        ]
        if not sources:
            return None
        src = draw(st.sampled_from(sources))
        name = _fresh_name(draw, st8.taken)
        src.handle.read(site, name=name)
        read = _ReadInfo(name, src.handle.name, site, Select())
        st8.reads.append(read)
        if not fits(read):
            return None
    st8.needs[run.handle.name].add(read.run)
    return Ref(read.name)


def _grad(draw: st.DrawFn, st8: _State, run: _RunInfo, raw_sites: Sequence[str]) -> None:
    """A grad op on a forward token run of one prompt length, one metric per run."""
    from interventions.recipes import Metric

    spec = st8.graph.runs[run.handle.name]
    if run.generates or spec.tokens is None or spec.lengths is not None:
        _read(draw, st8, run, raw_sites)
        return
    if run.handle.name not in st8.metrics:
        ids = st.integers(0, st8.sizes.vocab - 1)
        answer = torch.tensor(draw(st.lists(ids, min_size=run.batch, max_size=run.batch)))
        kind = draw(st.sampled_from(["logit_diff", "logit", "prob", "logprob"]))
        wrong = torch.tensor([draw(ids)]) if kind == "logit_diff" else None
        pos = draw(st.integers(-run.prompt, run.prompt - 1))
        st8.metrics[run.handle.name] = (Metric(kind, answer, wrong), pos)
    metric, pos = st8.metrics[run.handle.name]
    site, spelled = _site(draw, st8, raw_sites, writable=True)
    select = _select(draw, st8, run, site)
    name = _fresh_name(draw, st8.taken) if draw(st.booleans()) else None
    args, kwargs = _site_args(spelled, draw)
    st8.taken.add(
        run.handle.grad(*args, metric=metric, metric_pos=pos, name=name, **kwargs, **select)
    )


def _add_op(
    draw: st.DrawFn,
    st8: _State,
    op_kinds: Sequence[str],
    raw_sites: Sequence[str],
    nonfinite: bool,
) -> None:
    run = draw(st.sampled_from(list(st8.runs.values())))
    kind = draw(st.sampled_from(list(op_kinds)))
    if kind == "read":
        _read(draw, st8, run, raw_sites)
        return
    if kind == "grad":
        _grad(draw, st8, run, raw_sites)
        return
    site, spelled = _site(draw, st8, raw_sites, writable=True)
    keep_hidden = kind in ("project_out", "sae_splice")
    sel_kwargs = _select(draw, st8, run, site, keep_hidden=keep_hidden)
    select = Select.make(**sel_kwargs)
    region = _region(st8, run, site, select)
    args, kwargs = _site_args(spelled, draw)
    kwargs.update(sel_kwargs)
    h = run.handle
    if kind == "patch":
        value: Any = None
        if draw(st.booleans()):
            value = _ref_for(draw, st8, run, site, select)
        if value is None:
            value = _const(draw, st8, _const_shape(draw, region), nonfinite)
        h.patch(*args, value=value, **kwargs)
    elif kind == "ablate":
        method = draw(st.sampled_from(["zero", "mean", "resample"]))
        sources = [
            name for name, r in st8.runs.items() if st8.can_source(h.name, name) and not r.generates
        ]
        source: Any = None
        if method != "zero" and sources:
            name = draw(st.sampled_from(sources))
            source = st8.runs[name].handle if draw(st.booleans()) else name
            st8.needs[h.name].add(name)
        else:
            method = "zero"
        h.ablate(
            *args,
            method=method,
            source=source,
            per_position=draw(st.booleans()),
            seed=draw(st.integers(0, 2**31 - 1)),
            **kwargs,
        )
    elif kind == "add":
        direction = _const(draw, st8, _const_shape(draw, region), nonfinite)
        h.add(*args, direction=direction, scale=_float(draw, nonfinite), **kwargs)
    elif kind == "project_out":
        width = region[-1]
        rows = draw(st.sampled_from([None, 1, 2]))
        shape = (width,) if rows is None else (rows, width)
        h.project_out(*args, direction=_const(draw, st8, shape, nonfinite), **kwargs)
    elif kind == "scale":
        h.scale(*args, factor=_float(draw, nonfinite), **kwargs)
    else:
        sae = _sae(draw, st8, region[-1])
        features = None
        if not run.generates and draw(st.booleans()):
            features = _fresh_name(draw, st8.taken)
        h.sae_splice(
            *args,
            sae=sae,
            edits=_edits(draw, sae.d_sae, nonfinite),
            error=draw(st.sampled_from(["keep", "drop", "detach"])),
            features=features,
            **kwargs,
        )


@st.composite
def graphs(
    draw: st.DrawFn,
    n_layers: int = 2,
    n_heads: int = 4,
    d_model: int = 32,
    seq: int = 7,
    vocab: int = 64,
    *,
    d_mlp: int | None = None,
    batch: int | None = None,
    max_runs: int = 3,
    max_ops: int = 8,
    op_kinds: Sequence[str] = OP_KINDS,
    run_kinds: Sequence[str] = RUN_KINDS,
    raw_sites: Sequence[str] = RAW_SITES,
    generation: bool = True,
    text_words: Sequence[str] | None = None,
    nonfinite: bool = True,
    sites: Sequence[str] | None = None,
) -> iv.Graph:
    """A random valid graph for a model of the given sizes (see the module docstring).

    ``d_mlp`` defaults to ``4 * d_model``; ``batch`` (items per run, the same for every
    run) is drawn from 1..2 unless given. ``sites`` are the standard sites to draw from
    (default: every one but the mixture-of-experts router sites).
    """
    sizes = Sizes(n_layers, n_heads, d_model, seq, vocab, d_mlp or 4 * d_model)
    chosen = tuple(sites) if sites is not None else DEFAULT_SITES
    st8 = _State(iv.Graph(allow_nonfinite=nonfinite), sizes, sites=chosen)
    b = batch if batch is not None else draw(st.integers(1, 2))
    for _ in range(draw(st.integers(1, max_runs))):
        _add_run(draw, st8, b, run_kinds, generation, text_words, nonfinite)
    if op_kinds:
        for _ in range(draw(st.integers(0, max_ops))):
            _add_op(draw, st8, op_kinds, raw_sites, nonfinite)
    return st8.graph
