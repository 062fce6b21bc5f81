"""What the gradient recipes share: which backends can take a gradient, refused by name.

A recipe asks for gradients with ``grad`` ops (:meth:`RunHandle.grad
<interventions.builder.RunHandle.grad>`): a metric of the logits, as data, and the sites
it is differentiated at. A backend computes them in its own forward pass (nnsight, so
remotely on NDIF too) or, when it keeps the autograd graph (``grad=True``: torch,
pyvene), the core takes them client-side; see :mod:`interventions.gradients`. A metric
that is not data (``kl``, which needs another run's logits) needs ``grad=True``.

>>> sorted(gradient_backends(grad_ops=True))
['nnsight', 'pyvene', 'torch']
"""

from __future__ import annotations

from interventions.errors import UnsupportedOp, choices_text


def gradient_backends(*, grad_ops: bool) -> list[str]:
    """Backends that run grad ops (``grad_ops=True``) or keep the autograd graph."""
    from interventions.backends import backend_capabilities

    return [
        name
        for name, caps in backend_capabilities().items()
        if not isinstance(caps, str) and (caps.gradients or (grad_ops and "grad" in caps.ops))
    ]


def require_gradients(backend: str, what: str, *, grad_ops: bool = True) -> None:
    """Raise :class:`UnsupportedOp` naming ``what`` unless ``backend`` can take its
    gradients: by grad ops (``grad_ops=True``) or only with ``grad=True`` reads."""
    from interventions.backends import get_backend

    caps = get_backend(backend).capabilities
    if caps.gradients or (grad_ops and "grad" in caps.ops):
        return
    how = "" if grad_ops else " of a metric that is not data (kl)"
    raise UnsupportedOp(
        f"{what} needs gradients{how}, which backend {backend!r} cannot compute; backends that "
        f"can: {choices_text(gradient_backends(grad_ops=grad_ops))}"
    )
