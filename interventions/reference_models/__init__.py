"""Small models trained by this repository for mechanisms with a known answer.

They load by short name anywhere a model name is accepted (``iv.run(g, "induction")``,
``--model induction``) from weights committed under ``weights/``; each module has the
script that reproduces its weights from a seed.

* ``induction``: a 2-layer attention-only Llama with previous-token and induction heads;
* ``ioi``: a 3-layer GPT-2 trained on indirect object identification, with its word-level
  tokenizer;
* ``superposition``: the toy model of superposition (20 features through 5 dimensions), a
  plain ``nn.Module`` whose inputs are feature vectors (raw sites only); its SAE loads with
  :func:`interventions.reference_models.superposition.load_superposition`.
"""

from __future__ import annotations

import importlib
from typing import Any

REFERENCE_MODELS: dict[str, str] = {
    "induction": "interventions.reference_models.induction:load_induction_model",
    "ioi": "interventions.reference_models.ioi:load_ioi_model",
    "superposition": "interventions.reference_models.superposition:load_superposition_model",
}


def load_reference(name: str) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` for a bundled reference model name, else ``None``.

    A loader returns either a model (the tokenizer is then ``None``: the model works on
    token ids or tensors) or a ``(model, tokenizer)`` pair.
    """
    target = REFERENCE_MODELS.get(name)
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    loaded = getattr(importlib.import_module(module_name), attr)()
    if isinstance(loaded, tuple):
        model, tokenizer = loaded
        return model, tokenizer
    return loaded, None
