"""Sparse autoencoders (SAEs) and transcoders: kinds, SAELens's on-disk format, releases.

======================  ===================================================================
module                  what
======================  ===================================================================
``sae.kinds``           the built-in kinds and their formulas (``SAE_KINDS``)
``sae.info``            what an SAE was trained on; TransformerLens hooks as sites
``sae.disk``            SAELens directories and single ``.safetensors`` files
``sae.hub``             ``load_sae``: paths, and SAELens releases through ``huggingface_hub``
``sae.check``           ``check_sae``: does an SAE fit a model and a site
``sae.training``        ``train_sae``: train one on activations streamed through a read graph
``sae.dashboard``       ``harvest_features``: top examples, histograms, density, top logits
``sae.dashboard_html``  the static HTML page and the Neuronpedia JSON of a dashboard
======================  ===================================================================

>>> import torch
>>> sae = StandardSAE(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2))
>>> sae.encode(torch.tensor([1.0, -1.0])).tolist()
[1.0, 0.0]
"""

from interventions.sae.disk import CFG_FILENAME, WEIGHTS_FILENAME, save_sae
from interventions.sae.hub import RELEASES, SAEEntry, SAERelease, load_sae
from interventions.sae.info import SAEInfo, site_of_hook
from interventions.sae.kinds import (
    SAE,
    SAE_KINDS,
    AnySAE,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    JumpReLUTranscoder,
    SkipTranscoder,
    StandardSAE,
    TopKSAE,
    Transcoder,
    batch_topk,
    sae_from_parts,
)

__all__ = [
    "CFG_FILENAME",
    "RELEASES",
    "SAE",
    "SAE_KINDS",
    "WEIGHTS_FILENAME",
    "AnySAE",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "JumpReLUTranscoder",
    "SAEEntry",
    "SAEInfo",
    "SAERelease",
    "SkipTranscoder",
    "StandardSAE",
    "TopKSAE",
    "Transcoder",
    "batch_topk",
    "load_sae",
    "sae_from_parts",
    "save_sae",
    "site_of_hook",
]
