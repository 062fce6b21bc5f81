"""The nnsight backend: a plan compiled into nnsight traces, run locally or on NDIF.

The files, in the order a plan goes through them:

==============  =========================================================================
``compiler``    client side: a validated plan -> stages (one nnsight trace each) of
                per-run programs, plain data only (:class:`_Compiler`)
``model``       the user's model wrapped in nnsight for one ``execute``, and put back
                as it was afterwards; envoys by module path
``program``     the program that runs *inside* the trace (:func:`_run_program`); for a
                remote run its ``with`` block is what NDIF receives, as source, so it
                names only torch, nnsight, builtins and plain data
``backend``     :class:`NNsightBackend` (``execute``, ``submit``, ``attach``), the
                version check, and :class:`_Capture`, which serializes the session
``ndif``        a thin HTTP/websocket client for one NDIF host (:class:`_Ndif`)
``jobs``        one request from submission to result (:class:`_NdifJob`)
``decode``      what the host sends back, read as tensors and plain data; anything
                malformed is a typed ``MalformedResponse``, a result over
                ``max_result_bytes=`` a ``ResultTooLarge``
==============  =========================================================================

Why an NDIF client of our own rather than nnsight's ``RemoteBackend``: the request is
nnsight's own (its envelope, its serializer), but nnsight's client loads every result
and every binary status frame with ``torch.load(weights_only=False)``, that is, it
unpickles whatever the host sends; it calls ``pull_env()`` and can ship callables by
value; and it has no job handle another process can re-attach to, no bounded retries
and no typed errors. This client decodes only tensors and JSON-like data (a result with
``weights_only=True``, a frame with an unpickler that admits nothing but nnsight's
``Status``), ships nothing by value, and turns every failure into a
:class:`~interventions.errors.RemoteError` naming host, model key and job id. It does
no more than that: no streaming, no logging, no async API.

Gradients: ``grad`` ops (:class:`~interventions.ops.Grad`) run their metric and one
``torch.autograd.grad`` inside the trace, locally and on the host, in a trace of their own
with every edit on a copy. Not supported: ``grad=True`` reads that stay in the autograd
graph (the values of a remote run come back as plain tensors; use ``grad`` ops), and ops
on a module called more than once per forward pass (they bind to its first call).
Refused by name before anything runs: ``attn_scores``, which lives inside the attention
function (reachable only through nnsight's ``.source``, not built here yet), and the MoE
sites (``router_logits``, ``experts_chosen``, ``expert_out``): a write there re-runs the
family's routing rule or every expert from the fused weights, which the shipped block
would have to carry (not built here yet; the torch backend runs them). The per-head
inputs (``q_input``/``k_input``/``v_input``) and edge patches run inside the trace: the
block re-runs the attention norm on each head's edited copy, naming only torch.
"""

from .backend import SUPPORTED, NNsightBackend, check_version

# private names the tests and benchmarks reach through the package (re-exported as is)
from .backend import _Capture as _Capture
from .compiler import _Compiler as _Compiler
from .compiler import _event_order as _event_order
from .compiler import _observed_order as _observed_order
from .jobs import _NdifJob as _NdifJob
from .ndif import _DEFAULT_RETRIES as _DEFAULT_RETRIES
from .ndif import _DEFAULT_TIMEOUT as _DEFAULT_TIMEOUT
from .ndif import _backoff as _backoff
from .ndif import _config_host_key as _config_host_key
from .ndif import _Ndif as _Ndif
from .program import _run_program as _run_program

__all__ = ["SUPPORTED", "NNsightBackend", "check_version"]
