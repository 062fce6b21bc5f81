"""Views of attention internals: q, k and v inside a projection's output, the per-head
inputs of q, k and v, and the pre-softmax scores (:class:`ScoresInterceptor`).

A family map (:mod:`interventions.architectures`) names the projection that makes q, k
and v; the view says where each lives in that module's output:

* ``q_heads`` / ``kv_heads``: the whole output of a ``q_proj`` (query heads) or a
  ``k_proj``/``v_proj`` (key-value heads), split into heads;
* ``stacked_q`` / ``stacked_k`` / ``stacked_v``: one fused projection laid out
  ``[q | k | v]`` (GPT-2's ``c_attn``; with grouped-query attention k and v are narrower);
* ``per_head_q`` / ...: one fused projection laid out per head ``[q_h k_h v_h]``
  (GPT-NeoX's ``query_key_value``).

:func:`qkv_view` gives that part as a ``(..., head, d_head)`` *view* of the tensor, so a
write into it is a write into the projection's output. q and k are taken before rotary
embeddings (the projection's output), on every backend, as TransformerLens's ``hook_q``.

A per-head input (``q_input``, ``k_input``, ``v_input``) is each head's own copy of the
residual stream entering the block, before the attention norm. A backend writes it by
adding, at the projection's output, ``W_h (norm(x_h') - norm(x))`` for each head ``h``:
zero for every head whose copy was not changed, and for a changed head exactly the
query (key, value) that head would compute from its own input.

>>> x = torch.arange(12.0).view(1, 12)  # [q | k | v], 2 heads of width 2
>>> qkv_view(x, "stacked_k", n_heads=2, n_kv_heads=2, d_head=2).tolist()
[[[4.0, 5.0], [6.0, 7.0]]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

QKV_VIEWS = (
    "q_heads",
    "kv_heads",
    "stacked_q",
    "stacked_k",
    "stacked_v",
    "per_head_q",
    "per_head_k",
    "per_head_v",
)
SPLIT_VIEWS = tuple(f"split_{v}" for v in QKV_VIEWS)


def qkv_view(
    x: torch.Tensor, view: str, *, n_heads: int, n_kv_heads: int, d_head: int
) -> torch.Tensor:
    """The q, k or v part of a projection output ``x`` (last axis) as ``(..., head, d_head)``.

    A view whenever ``x``'s last axis is contiguous, so writes reach ``x``.
    """
    if view == "q_heads":
        return x.unflatten(-1, (n_heads, x.shape[-1] // n_heads))
    if view == "kv_heads":
        return x.unflatten(-1, (n_kv_heads, x.shape[-1] // n_kv_heads))
    layout, _, part = view.rpartition("_")
    if layout == "stacked":
        q, kv = n_heads * d_head, n_kv_heads * d_head
        start, width = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[part]
        count = n_heads if part == "q" else n_kv_heads
        return x[..., start : start + width].unflatten(-1, (count, d_head))
    if layout == "per_head":
        j = "qkv".index(part)
        return x.unflatten(-1, (n_heads, 3 * d_head))[..., j * d_head : (j + 1) * d_head]
    raise ValueError(f"unknown q/k/v view {view!r}; views: {', '.join(QKV_VIEWS)}")


def projection_weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as ``(in, out)`` (``nn.Linear`` stores ``(out, in)``, GPT-2's
    ``Conv1D`` ``(in, out)``).

    >>> projection_weight(nn.Linear(3, 5)).shape
    torch.Size([3, 5])
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.T if isinstance(module, nn.Linear) else weight


def split_input_delta(
    norm: nn.Module,
    weight: torch.Tensor,
    x: torch.Tensor,
    new: torch.Tensor,
    view: str,
    *,
    n_heads: int,
    n_kv_heads: int,
    d_head: int,
    old: torch.Tensor | None = None,
) -> torch.Tensor:
    """What to add to a head's q (k, v) when its input copy changes from ``x`` to ``new``
    (from ``old``, the copies as earlier ops of the same pass left them, when given).

    ``x`` is the block's input ``(batch, pos, d_model)``, ``new`` the edited per-head copies
    ``(batch, pos, head, d_model)``, ``weight`` the projection's ``(in, out)`` weight and
    ``norm`` the attention norm (called with its own forward, not its hooks). Returns
    ``(batch, pos, head, d_head)``: zero exactly where a copy was not changed.
    """
    w = qkv_view(weight, view, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head)
    # the norm acts on each vector alone: the unchanged copies' norm is the block input's,
    # computed once, and an unchanged copy still gives exactly zero
    before = norm.forward(x).unsqueeze(-2) if old is None else norm.forward(old)
    change = norm.forward(new) - before
    return torch.einsum("bphd,dhe->bphe", change, w.to(change.dtype))


def head_input_delta(
    norm: nn.Module, weight: torch.Tensor, x: torch.Tensor, change: torch.Tensor
) -> torch.Tensor:
    """What to add to one head's q (k, v) when its input copy changes from ``x`` to
    ``x + change`` (both ``(rows, pos, d_model)``): ``(norm(x + change) - norm(x)) @ W_h``
    with ``weight`` that head's ``(d_model, d_head)`` slice. :func:`split_input_delta` for
    one head and some rows, at their cost alone (a circuit's edges touch few of them);
    the norm runs on ``x``'s rows both times, so an unchanged row gives exactly zero.

    >>> norm = nn.LayerNorm(4, elementwise_affine=False)
    >>> x = torch.randn(2, 3, 4)
    >>> d = head_input_delta(norm, torch.eye(4)[:, :2], x, torch.zeros(2, 3, 4))
    >>> d.shape, bool((d == 0).all())
    (torch.Size([2, 3, 2]), True)
    """
    change = norm.forward(x + change) - norm.forward(x)
    return change @ weight.to(change.dtype)


_SOFTMAXES = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


class ScoresInterceptor(torch.overrides.TorchFunctionMode):
    """Hands the pre-softmax attention scores of one attention module's forward to
    ``edit`` and softmaxes what it returns.

    The scores are exactly the tensor the module's eager attention passes to softmax:
    after scaling, soft-capping (Gemma-2) and ALiBi (BLOOM, Falcon-RW: counted once, see
    :func:`interventions.hf.falcon_alibi_attention`) and after the additive causal
    mask, whose masked entries hold ``score + torch.finfo(dtype).min`` (not ``-inf``).
    Entered by a forward pre-hook of the attention module and left by its forward hook, so
    only that module's softmax is seen; it must see exactly one (eager attention: SDPA and
    flash attention never call softmax).

    >>> seen = []
    >>> with ScoresInterceptor(lambda s: seen.append(s.clone()) or s * 0) as mode:
    ...     p = torch.softmax(torch.tensor([[0.0, 1.0]]), dim=-1)
    >>> p.tolist(), seen[0].tolist(), mode.calls
    ([[0.5, 0.5]], [[0.0, 1.0]], 1)
    """

    def __init__(self, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.edit = edit
        self.calls = 0

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _SOFTMAXES and args and isinstance(args[0], torch.Tensor):
            self.calls += 1
            if self.calls == 1:
                args = (self.edit(args[0]), *args[1:])
        return func(*args, **kwargs)
