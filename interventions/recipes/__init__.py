"""Recipes: ordinary functions that build graphs and reduce their results.

Because they only build graphs, every recipe runs on every backend, locally or remotely.
"""

from interventions.recipes.metrics import Metric, normalized
from interventions.recipes.patching import (
    AttributionResult,
    PatchingResult,
    activation_patching,
    attribution_patching,
    path_patching,
)

__all__ = [
    "AttributionResult",
    "Metric",
    "PatchingResult",
    "activation_patching",
    "attribution_patching",
    "normalized",
    "path_patching",
]
