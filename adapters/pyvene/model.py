"""The wrapper pyvene sees around the user's model, and the guard that puts back what
pyvene changes on the model (training flags, ``requires_grad``, hook tables).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from interventions.hf import logits_kwargs

from .classes import _StepClock

# Hook tables of an nn.Module that pyvene (or a failed run) may leave changed.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _first_tensor_of_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    for key in ("input_ids", "inputs_embeds"):
        if x is None and isinstance(kwargs.get(key), torch.Tensor):
            x = kwargs[key]
    return x


# Where the torch reference finds a module's input tensor when it is passed by keyword.
_INPUT_KEYS = ("hidden_states", "input", "x", "input_ids", "inputs_embeds")


def _prepare_input(copy: bool, module: nn.Module, args: Any, kwargs: Any) -> Any:
    """Pre-hook run just before pyvene's at an input site.

    pyvene takes a module's input from ``args[0]``, or else from the *first* keyword
    argument; the reference looks for ``hidden_states``, ``input``, ... by name. For a call
    by keywords this puts the reference's choice first. With ``copy`` the module gets a
    private copy of the tensor, so pyvene's in-place write cannot reach the caller's.
    """
    if args:
        if copy and isinstance(args[0], torch.Tensor):
            return (args[0].clone(), *args[1:]), kwargs
        return None
    key = next((k for k in _INPUT_KEYS if isinstance(kwargs.get(k), torch.Tensor)), None)
    if key is None or (not copy and next(iter(kwargs)) == key):
        return None
    value = kwargs[key].clone() if copy else kwargs[key]
    return args, {key: value, **{k: v for k, v in kwargs.items() if k != key}}


def _private_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: hand on a copy of the tensor pyvene will write into."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0].clone(), *output[1:])
    if isinstance(output, dict) and output:
        key = next(iter(output))
        if isinstance(output[key], torch.Tensor):
            output[key] = output[key].clone()
    return None


class _Wrapped(nn.Module):
    """What pyvene wraps: the user's model as ``.model``, called like the torch reference.

    pyvene freezes what it wraps (``model.eval()`` and ``requires_grad=False`` on every
    parameter, in ``IntervenableModel.__init__``). The wrapper shields the user's model
    from that: it lists no parameters and keeps ``train``/``eval`` to itself. It holds no
    state beyond the current run's call settings, and installs its helper hooks (the
    generation clock; private copies at raw write sites) only for the duration of a call.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)  # pyvene reads it; None for plain modules
        self.hf_call = False
        self.logits_to_keep: int | None = None
        self.clock: _StepClock | None = None
        self.inputs: list[tuple[nn.Module, bool]] = []  # input sites, and whether to copy
        self.private_outputs: list[nn.Module] = []
        # the model's own hooks (the user's, transformers'): pyvene removes every hook of
        # the model when a call starts, so they are put back for the call, ahead of pyvene's
        self.foreign_hooks: list[tuple[nn.Module, str, list[tuple[Any, Any]]]] = []
        self.blocks: list[tuple[nn.Module, Any]] = []  # (block, pre-hook recording its input)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return iter(())

    def train(self, mode: bool = True) -> _Wrapped:
        self.training = mode  # not passed on to the user's model
        return self

    def forward(self, inputs: torch.Tensor) -> Any:
        with self._helpers():
            if self.hf_call:
                keep = logits_kwargs(self.model, self.logits_to_keep)
                return self.model(input_ids=inputs, use_cache=False, **keep)
            return self.model(inputs)

    def generate(self, **kwargs: Any) -> Any:
        with self._helpers():
            return self.model.generate(**kwargs)  # type: ignore[operator]

    def _tick(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        assert self.clock is not None
        x = _first_tensor_of_args(args, kwargs)
        self.clock.advance(int(x.shape[1]) if x is not None and x.ndim >= 2 else 1)

    @contextlib.contextmanager
    def _helpers(self) -> Iterator[None]:
        handles: list[torch.utils.hooks.RemovableHandle] = []
        restored = _restore_foreign(self.foreign_hooks)
        try:
            if self.clock is not None:
                handles.append(
                    self.model.register_forward_pre_hook(self._tick, with_kwargs=True, prepend=True)
                )
            for module, copy in self.inputs:
                hook = functools.partial(_prepare_input, copy)
                handles.append(
                    module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
                )
            for module in self.private_outputs:
                handles.append(module.register_forward_hook(_private_output, prepend=True))
            for module, hook in self.blocks:
                # after pyvene's hooks (registered before this call): the block input as
                # edited in this run (resid_pre), which the per-head inputs start from
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for table, keys in restored:
                for key in keys:
                    table.pop(key, None)


def _restore_foreign(
    hooks: list[tuple[nn.Module, str, list[tuple[Any, Any]]]],
) -> list[tuple[dict[Any, Any], list[Any]]]:
    """Put the model's own hooks that pyvene removed back in front of their tables (they
    ran before ours in the reference too); returns what was put back, to take out again."""
    restored: list[tuple[dict[Any, Any], list[Any]]] = []
    for module, attr, items in hooks:
        table = module.__dict__.get(attr)
        if table is None:
            continue
        missing = [(k, h) for k, h in items if k not in table]
        if not missing:
            continue
        rest = list(table.items())
        table.clear()
        table.update(missing)
        table.update(rest)
        restored.append((table, [k for k, _ in missing]))
    return restored


# ---------------------------------------------------------------------------------------
# Model state: what pyvene changes, put back


class _ModelGuard:
    """Snapshot of training flags, ``requires_grad`` and hook tables; restores them.

    The wrapper already keeps pyvene's freeze away from the model, and pyvene removes its
    own hooks; the guard is the backstop that makes "no state left" hold whatever pyvene
    or a failure did (pyvene also drops hooks it did not install).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.params = [p for m in self.modules for p in m._parameters.values() if p is not None]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.hooks: dict[tuple[int, str], list[tuple[Any, Any]]] = {}
        for i, module in enumerate(self.modules):
            attrs = module.__dict__
            for attr in _HOOK_TABLES:
                table = attrs.get(attr)
                if table:
                    self.hooks[(i, attr)] = list(table.items())

    def own_hooks(self) -> list[tuple[nn.Module, str, list[tuple[Any, Any]]]]:
        """The model's forward hooks and pre-hooks as they were before the run."""
        return [
            (self.modules[i], attr, items)
            for (i, attr), items in self.hooks.items()
            if attr in ("_forward_hooks", "_forward_pre_hooks")
        ]

    def restore(self) -> None:
        for module, training in zip(self.modules, self.training, strict=True):
            if module.training != training:
                module.training = training
        for param, flag in zip(self.params, self.requires_grad, strict=True):
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        for i, module in enumerate(self.modules):
            attrs = module.__dict__
            for attr in _HOOK_TABLES:
                table = attrs.get(attr)
                expected = self.hooks.get((i, attr))
                if table is None or (not table and expected is None):
                    continue
                if list(table.items()) != (expected or []):
                    table.clear()
                    table.update(expected or [])
