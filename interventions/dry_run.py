"""A shape-only dry run: what the raw module sites of a graph hold, and what the model's
first layer receives, learned before anything runs.

A raw module site (``'<module path>.output'`` or ``.input``) has no shape that a config
could tell, and a plain ``nn.Module`` says nothing about the inputs it takes. :func:`probe`
calls the model's forward once for a run's input shape on *fake* tensors
(``torch._subclasses.FakeTensorMode``), every weight and buffer swapped for a fake one for
the call (``torch.func.functional_call``): each op computes only the shape and dtype of
its result, so no weight is read and nothing the size of an activation is allocated,
whatever the model's size. Forward hooks on just the modules the graph touches record the shape of
the tensor there (the one a backend would see: a tuple's first tensor, an output's
``logits``), a pre-hook on the first layer with weights records what it receives, and the
forward stops as soon as all of that is known. Results are cached per model and run shape.

It leaves the model as it found it: the same parameters, buffers, submodules and tensor
attributes with the same values (no op touches a real one; anything the forward assigned
is put back), no hook, and the run lock
(:func:`interventions.locks.model_lock`) held while its hooks are on, so no other thread's
run sees them. Hooks a user installed on the model see the fake call (their tensors are
``FakeTensor``s).

Fallback: a forward that fails on fake tensors (an op with no fake kernel, such as the
grouped expert matmul of some mixture-of-experts models, or a data-dependent branch)
leaves the modules it had not reached unknown (``None``), and validation checks ops there
as it did before the dry run (no shape checks); modules reached before the failure are
checked. Models dispatched by accelerate (offload hooks that load weights when a module
runs) are not dry run at all. The first call of a module is the one recorded.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> found = probe(net, torch.zeros(3, 4), call="positional", points={("1", "output")})
>>> found.shapes[("1", "output")], found.first.path, found.first.dtype
((3, 8), '0', torch.float32)
"""

from __future__ import annotations

import collections
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from interventions.devices import input_device
from interventions.locks import model_lock

Point = tuple[str, Literal["output", "input"]]  # (module path, side), as Site.raw_parts
Call = Literal["hf_ids", "positional"]

# torch layers whose kernels need the input in the weights' own dtype (a matmul or a
# convolution: float16 into a float32 Linear fails); norms accept lower precisions
_SAME_DTYPE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.rnn.RNNBase)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_INPUT_KEYS = ("hidden_states", "input", "x", "input_ids", "inputs_embeds")


@dataclass(frozen=True)
class FirstLayer:
    """What the first layer with weights received in a dry run."""

    path: str
    kind: str  # its class name
    dtype: torch.dtype  # of the tensor it received
    shape: tuple[int, ...]
    is_input: bool  # the tensor is the run's input itself (not computed from it)
    weight_dtype: torch.dtype | None  # its floating weights' dtype (None: none)
    same_dtype: bool  # its kernel needs the input in ``weight_dtype`` exactly
    in_width: int | None  # a Linear's in_features
    vocab: int | None  # an embedding's num_embeddings


@dataclass(frozen=True)
class Probe:
    """Shapes seen at each requested point (``None``: not reached), and the first layer."""

    shapes: dict[Point, tuple[int, ...] | None]
    first: FirstLayer | None
    failure: str | None = None  # why the fake forward stopped early, when it failed


class _Enough(BaseException):
    """Raised by a hook once everything asked for is known: the forward stops there.

    A BaseException, so that model code catching ``Exception`` does not swallow it.
    """


def _plain(value: Any) -> torch.Tensor | None:
    """The tensor a backend sees in a module's output (as the torch reference finds it)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    logits = getattr(value, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor a backend sees at a module's input (its first tensor argument)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in _INPUT_KEYS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


def _first_layer(path: str, module: nn.Module, x: torch.Tensor, fed: torch.Tensor) -> FirstLayer:
    floats = [p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()]
    return FirstLayer(
        path=path,
        kind=type(module).__name__,
        dtype=x.dtype,
        shape=tuple(x.shape),
        is_input=x is fed,
        weight_dtype=floats[0] if floats else None,
        same_dtype=isinstance(module, _SAME_DTYPE),
        in_width=module.in_features if isinstance(module, nn.Linear) else None,
        vocab=module.num_embeddings if isinstance(module, _EMBEDDINGS) else None,
    )


class _Snapshot:
    """Every module's parameters, buffers, submodules and tensor attributes, to put back
    whatever a forward assigned (a rotary cache, a buffer registered on the fly)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [
            (
                m,
                dict(m._parameters),
                dict(m._buffers),
                dict(m._modules),
                {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)},
            )
            for m in model.modules()
        ]

    def restore(self) -> None:
        for module, params, buffers, modules, tensors in self.saved:
            for now, before in (
                (module._parameters, params),
                (module._buffers, buffers),
                (module._modules, modules),
            ):
                if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                    now.clear()
                    now.update(before)  # type: ignore[arg-type]
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and tensors.get(key) is not value:
                    if key in tensors:
                        setattr(module, key, tensors[key])
                    else:
                        delattr(module, key)


@contextmanager
def _quiet_fake_kernels() -> Iterator[None]:
    """Silence torch's log line for an op without a fake kernel (the fallback handles it)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _device(model: nn.Module) -> torch.device:
    params = list(model.parameters())
    if params and all(p.device.type == "meta" for p in params):
        return torch.device("meta")  # a structure without weights (a remote model)
    return input_device(model)


def _dispatched(model: nn.Module) -> bool:
    """Accelerate's hooks (device maps, offload) would load weights when a module runs."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


_CACHE: weakref.WeakKeyDictionary[nn.Module, collections.OrderedDict[Any, Probe]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_SIZE = 32
_CACHE_GUARD = threading.Lock()


def _stamp(model: nn.Module) -> tuple[Any, ...]:
    """What a cached probe depends on: the module tree and every weight's shape and dtype."""
    return (
        tuple(map(id, model.modules())),
        tuple((id(p), tuple(p.shape), p.dtype, p.device) for p in model.parameters()),
    )


def probe(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    call: Call,
    points: set[Point] | frozenset[Point],
    first: bool = True,
) -> Probe:
    """Dry run ``model`` on a fake tensor shaped like ``inputs`` (see the module's notes).

    ``call`` is how backends call the model: ``"hf_ids"`` (``model(input_ids=ids,
    use_cache=False)``) or ``"positional"`` (``model(x)``). ``points`` are the raw module
    sites whose shapes are wanted; ``first`` asks for what the first layer with weights
    receives. Nothing here raises for the model's sake: what the forward could not reach
    is ``None``.

    >>> import torch
    >>> emb = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    >>> probe(emb, torch.zeros(2, 5, dtype=torch.long), call="positional",
    ...       points={("", "output")}).shapes
    {('', 'output'): (2, 5, 3)}
    """
    key = (call, tuple(inputs.shape), inputs.dtype, frozenset(points), first, _stamp(model))
    with _CACHE_GUARD:
        runs = _CACHE.get(model)
        cached = None if runs is None else runs.get(key)
    if cached is not None:
        return cached
    found = _probe(model, inputs, call, frozenset(points), first)
    with _CACHE_GUARD:
        runs = _CACHE.setdefault(model, collections.OrderedDict())
        runs[key] = found
        while len(runs) > _CACHE_SIZE:
            runs.popitem(last=False)
    return found


def _probe(
    model: nn.Module, inputs: torch.Tensor, call: Call, points: frozenset[Point], want_first: bool
) -> Probe:
    shapes: dict[Point, tuple[int, ...] | None] = dict.fromkeys(points)
    if _dispatched(model):
        return Probe(shapes, None, "the model is dispatched by accelerate")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    seen: set[Point] = set()
    first: list[FirstLayer] = []
    fed: list[torch.Tensor] = []

    def done() -> bool:
        return len(seen) == len(points) and (bool(first) or not want_first)

    def record(point: Point, x: torch.Tensor | None) -> None:
        if point not in seen:
            seen.add(point)
            shapes[point] = None if x is None else tuple(x.shape)
        if done():
            raise _Enough

    def output_hook(point: Point) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record(point, _plain(output))

        return hook

    def input_hook(point: Point) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            record(point, _input_of(args, kwargs))

        return hook

    def first_hook(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            x = _input_of(args, kwargs)
            if first or x is None:
                return
            first.append(_first_layer(path, module, x, fed[0]))
            if done():
                raise _Enough

        return hook

    failure = None
    with model_lock(model):
        snapshot = _Snapshot(model)
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for path, io in sorted(points):
                module = model.get_submodule(path) if path else model
                if io == "output":
                    handles.append(module.register_forward_hook(output_hook((path, io))))
                else:
                    handles.append(
                        module.register_forward_pre_hook(input_hook((path, io)), with_kwargs=True)
                    )
            if want_first:
                for path, module in model.named_modules():
                    leaf = not any(True for _ in module.children())
                    if leaf and any(True for _ in module.parameters(recurse=False)):
                        handles.append(
                            module.register_forward_pre_hook(first_hook(path), with_kwargs=True)
                        )
            if not done():
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                # every weight and buffer swapped for a fake for the call: an op on real
                # tensors alone would otherwise run for real (and an in-place one, such as
                # batch norm's counter in train mode, would change the model)
                fakes: dict[str, torch.Tensor] = {
                    name: mode.from_tensor(t)
                    for named in (model.named_parameters, model.named_buffers)
                    for name, t in named(remove_duplicate=False)
                }
                with _quiet_fake_kernels(), mode, torch.no_grad():
                    x = torch.empty(inputs.shape, dtype=inputs.dtype, device=_device(model))
                    fed.append(x)
                    args, kwargs = (
                        ((), {"input_ids": x, "use_cache": False})
                        if call == "hf_ids"
                        else ((x,), {})
                    )
                    functional_call(model, fakes, args, kwargs, tie_weights=False, strict=False)
        except _Enough:
            pass
        except Exception as exc:  # the fallback: what was not reached stays unknown
            failure = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            for handle in handles:
                handle.remove()
            snapshot.restore()
    return Probe(shapes, first[0] if first else None, failure)


def first_layer_problem(run: str, layer: FirstLayer, inputs: torch.Tensor) -> str | None:
    """Why the run's forward would fail at the model's first layer, or ``None``.

    The rules are torch's own: an embedding takes int64 or int32 ids below its size; a
    layer with floating weights takes floating inputs (not integers, bools or float8,
    which is a storage format torch layers do not compute in), and a matmul or convolution
    layer takes exactly its weights' dtype (under autocast this last rule is left out).

    >>> import torch
    >>> net = torch.nn.Linear(4, 2)
    >>> x = torch.zeros(1, 4, dtype=torch.long)
    >>> print(first_layer_problem("a", probe(net, x, call="positional", points=set()).first, x))
    run 'a': the model (Linear, float32 weights) receives int64 [1, 4] \
(the run's input); it takes float32: convert the input (inputs.to(torch.float32))
    """
    where = f"run {run!r}: " + (
        f"the model's first layer {layer.path!r}" if layer.path else "the model"
    )
    got = f"{str(layer.dtype).removeprefix('torch.')} {list(layer.shape)}"
    origin = "the run's input" if layer.is_input else "computed from the run's input"
    if layer.vocab is not None:
        if layer.dtype not in (torch.int64, torch.int32):
            return (
                f"{where} ({layer.kind} of {layer.vocab}) takes token ids (int64 or int32) but "
                f"receives {got} ({origin}); pass integer ids"
            )
        if layer.is_input and inputs.numel():
            low, high = int(inputs.min()), int(inputs.max())
            if low < 0 or high >= layer.vocab:
                return (
                    f"{where} ({layer.kind} of {layer.vocab}) takes ids in 0..{layer.vocab - 1}, "
                    f"found {low}..{high}"
                )
        return None
    wanted = layer.weight_dtype
    if wanted is not None:
        name = str(wanted).removeprefix("torch.")
        unusable = not layer.dtype.is_floating_point or layer.dtype.itemsize == 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
        autocast = torch.is_autocast_enabled(device) or torch.is_autocast_enabled("cpu")
        mismatch = layer.same_dtype and layer.dtype != wanted and not autocast
        if (unusable and wanted.itemsize > 1) or mismatch:
            return (
                f"{where} ({layer.kind}, {name} weights) receives {got} ({origin}); it takes "
                f"{name}: convert the input (inputs.to(torch.{name}))"
            )
    if layer.in_width is not None and (not layer.shape or layer.shape[-1] != layer.in_width):
        return (
            f"{where} ({layer.kind}) takes vectors of size {layer.in_width} on the last axis "
            f"but receives {got} ({origin})"
        )
    return None
