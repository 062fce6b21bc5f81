"""Small models trained by this repository for mechanisms with a known answer.

They load by short name anywhere a model name is accepted (``iv.run(g, "induction")``,
``--model induction``) from weights committed under ``weights/``; each module has the
script that reproduces its weights from a seed.
"""

from __future__ import annotations

import importlib
from typing import Any

REFERENCE_MODELS: dict[str, str] = {
    "induction": "interventions.reference_models.induction:load_induction_model",
}


def load_reference(name: str) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` for a bundled reference model name, else ``None``.

    The reference models work on token ids; their tokenizer is ``None``.
    """
    target = REFERENCE_MODELS.get(name)
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    model = getattr(importlib.import_module(module_name), attr)()
    return model, None
