r"""The pyvene backend: each run of a plan becomes one pyvene ``IntervenableModel``.

The files:

================  =======================================================================
``backend``       :class:`PyveneBackend`, the version check, and running one run
``compiler``      one run of a plan -> pyvene ``RepresentationConfig``\ s (:func:`_compile`)
``classes``       the intervention classes (subclasses of pyvene's, built on first use)
                  and the per-run context they share
``model``         the wrapper pyvene sees around the user's model, and the guard that
                  puts the model's state back
``internals``     per-head inputs of q/k/v and edge patches (interventions of their own)
================  =======================================================================

How a graph maps onto pyvene (0.1.8's native, hook-based backend):

* **Model.** pyvene wraps a thin :class:`_Wrapped` module around the user's model. The
  wrapper gives pyvene the ``config`` attribute it reads (``None`` for a plain
  ``nn.Module``, so raw modules work), makes the root module addressable (pyvene cannot
  name the root of the model it wraps: ``"model.output"`` is the root's output), calls
  the model the way the torch reference does, and shields it from pyvene's freeze.
* **Sites.** Every hook point (``ModelInfo.hook_point``) becomes a
  ``RepresentationConfig`` whose ``component`` is the raw module path with ``.output`` or
  ``.input`` (``"model.transformer.h.0.mlp.output"``). No ``unit_locations`` are given, so
  pyvene hands each intervention the whole site tensor (``keep_last_dim=True`` keeps its
  shape) and writes the returned tensor back; the intervention narrows it with the
  selector through :func:`interventions.selection.take` / :func:`~interventions.selection.put`,
  the same code as the reference. This is what makes negative positions, lists, slices,
  heads, batch items and hidden-dim slices all work, for every family and every raw
  module, instead of the subset pyvene's per-family ``unit``/``max_number_of_units``
  machinery can express. The ``head`` site is the output projection's input, viewed as
  ``[batch, pos, head, d_head]`` inside the intervention.
* **Ops.** One representation per op. They are grouped by hook point in order of first
  use and keep graph order within a point, exactly like the reference's hooks (pyvene
  runs the hooks of a module in registration order):

  ==================  ===================================================================
  ``read``            pyvene's own ``CollectIntervention`` (reads of one point with no
                      write between share one); the selector is applied after the run, as
                      in the reference, so generation can concatenate steps. With
                      ``grad=True``: :class:`ReadIntervention`, which routes the forward
                      through the recorded region so gradients reach it
  ``patch``           :class:`PatchIntervention`, an interchange: the value is pyvene's
                      *source*. A value read in another run is passed as precomputed
                      ``source_representations`` (the source run is never re-run); a
                      constant is the intervention's ``source_representation`` buffer
  ablate, add, ...    :class:`OpIntervention`, a ``SourcelessIntervention`` applying the
                      reference semantics (:func:`interventions.apply.apply_op`)
  ==================  ===================================================================

* **Values between runs.** Runs execute in plan order; a read's value is kept and given to
  later runs as ``source_representations``; whole-site captures feed mean and resample
  ablations.
* **Generation.** ``IntervenableModel.generate`` with no ``unit_locations`` and
  ``intervene_on_prompt=True`` runs every intervention on the prompt pass and on each
  generated step; a step clock (the model's input length, as in the torch reference)
  turns absolute positions into positions of the current step (:func:`step_select`).

In-place writes. pyvene writes an intervention's result *into* the hooked tensor. On the
standard sites nothing else holds that tensor when it is written, so this equals the
reference's "replace the value". Where something else may hold it, the wrapper first gives
the hooked module a private copy (a pre-hook or hook installed just before pyvene's, for
the duration of the call): on raw module sites, whose caller may reuse the tensor
(``x + block(x)`` with a write on ``block.input``), and with ``grad=True`` at every written
point, since autograd may have saved the tensor (GPT-2's ``o_proj`` input is a view of the
SDPA output). For a module called by keywords only, the same pre-hook puts first the
keyword the reference would use (pyvene takes the first one).

Hygiene. pyvene's ``IntervenableModel`` puts what it wraps in eval mode and sets
``requires_grad=False`` on its parameters; the wrapper lists no parameters and keeps
``train``/``eval`` to itself, so the user's model runs as the user left it. pyvene also
removes *every* forward hook and pre-hook of the model when it runs. The adapter snapshots
training flags, ``requires_grad`` and the hook tables before a plan runs and restores them
afterwards, whether or not the run failed: the user's own hooks come back (they do not fire
during a pyvene run).

Attention internals: ``q``/``k``/``v`` are views of their projection's output inside the
interventions; ``resid_mid`` is written into the residual stream (no private copy); the
per-head inputs and edge patches run in :mod:`.internals`, with the reference arithmetic.

Not supported: ``attn_pattern`` and ``attn_scores``. pyvene hands interventions only the
first element of a module's output, and the attention weights are the second; only some
families pass them through a module of their own (GPT-2's ``attn_dropout``), and
capabilities are per backend. The scores never leave the attention function at all.
Nor the MoE sites: the router's logits and ids are the first and third items of its
output tuple, and a write must hand the experts new ids and weights together, which an
intervention on one output item cannot; ``expert_out`` is computed, not a module output.
"""

from .backend import SUPPORTED_PYVENE, PyveneBackend, check_version, installed_version

__all__ = ["SUPPORTED_PYVENE", "PyveneBackend", "check_version", "installed_version"]
