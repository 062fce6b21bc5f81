"""Recipes: ordinary functions that build graphs and reduce their results.

Because they only build graphs, every recipe runs on every backend, locally or remotely.

==========================  ==========================================================
activation_patching         layer x position (or head) sweeps, denoising or noising
path_patching               sender heads -> receiver heads (or logits)
attribution_patching        the gradient approximation of a sweep (3 forward-equivalents)
logit_lens                  each layer's residual decoded by the model's own head
direct_logit_attribution    heads' and MLPs' direct share of a logit difference
head_scores                 previous-token, duplicate-token and induction heads
contrastive_direction, steer, sae_feature_direction    steering
feature_activations, top_activating, feature_attribution, feature_ablation    SAEs
ablate_components           zero / mean / resample ablation over a dataset
probe, probe_sweep          linear probes, held-out split, shuffled or control-task control
input_attribution           saliency, input x gradient, integrated gradients on tokens
train_tuned_lens, tuned_lens, lens_kl    the tuned lens against the logit lens
==========================  ==========================================================
"""

from interventions.recipes.ablation import ablate_components
from interventions.recipes.attribution import InputAttribution, input_attribution
from interventions.recipes.features import (
    feature_ablation,
    feature_activations,
    feature_attribution,
    top_activating,
)
from interventions.recipes.heads import HeadScores, head_scores, repeated_random_tokens
from interventions.recipes.lens import (
    LogitAttribution,
    LogitLens,
    direct_logit_attribution,
    logit_lens,
)
from interventions.recipes.metrics import Metric, normalized
from interventions.recipes.patching import PatchingResult, activation_patching
from interventions.recipes.patching_grads import AttributionResult, attribution_patching
from interventions.recipes.patching_paths import path_patching
from interventions.recipes.probes import ProbeResult, ProbeSweep, probe, probe_sweep
from interventions.recipes.steering import (
    SteeringResult,
    contrastive_direction,
    sae_feature_direction,
    steer,
)
from interventions.recipes.tuned_lens import (
    LensKL,
    TunedLens,
    lens_kl,
    train_tuned_lens,
    tuned_lens,
)

__all__ = [
    "AttributionResult",
    "HeadScores",
    "InputAttribution",
    "LensKL",
    "LogitAttribution",
    "LogitLens",
    "Metric",
    "PatchingResult",
    "ProbeResult",
    "ProbeSweep",
    "SteeringResult",
    "TunedLens",
    "ablate_components",
    "activation_patching",
    "attribution_patching",
    "contrastive_direction",
    "direct_logit_attribution",
    "feature_ablation",
    "feature_activations",
    "feature_attribution",
    "head_scores",
    "input_attribution",
    "lens_kl",
    "logit_lens",
    "normalized",
    "path_patching",
    "probe",
    "probe_sweep",
    "repeated_random_tokens",
    "sae_feature_direction",
    "steer",
    "top_activating",
    "train_tuned_lens",
    "tuned_lens",
]
