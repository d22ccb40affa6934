"""Model diffing with crosscoders: which latents two models share and which one of them alone has.

- `latents`: per-latent relative decoder norm Δnorm and its tags (shared / A-only / B-only / other),
  the cosine between the members' decoders, and Latent Scaling (ν^ε, ν^r; Minder et al. 2025) in
  one streaming pass.
- `plots`: the Δnorm histogram and the ν^ε against ν^r scatter.
- `synthetic`: paired activations of two synthetic "models" with shared and planted model-specific
  features (the activation source kind "paired_synthetic"), and scores against that ground truth.

The crosscoders themselves are dictionary families (`crosscoder`, `crosscoder_batchtopk`).
"""

from saelab.diffing.latents import (
    LatentDiff,
    diff_latents,
    latent_scaling,
    relative_decoder_norm,
    tag_latents,
)
from saelab.diffing.synthetic import PairedGroundTruth, PairedSyntheticActivations, PairedSyntheticConfig

__all__ = [
    "LatentDiff",
    "PairedGroundTruth",
    "PairedSyntheticActivations",
    "PairedSyntheticConfig",
    "diff_latents",
    "latent_scaling",
    "relative_decoder_norm",
    "tag_latents",
]
