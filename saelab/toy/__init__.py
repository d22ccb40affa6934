"""Ground truth for everything else: toy models of superposition and synthetic data with known features.

- `tms`: Elhage et al.'s toy model x' = ReLU(W^T W x + b), its sparsity sweeps, the phase diagram of
  one extra feature, and feature dimensionality.
- `synthetic`: known feature directions and sparse coefficients, as an activation source the trainer
  of `saelab.training` reads like any other.
- `recovery`: how well a dictionary recovered the known features (MMCS, recovered share, ...).
- `bench`: every dictionary family against the ground truth (`saelab toy bench`).
- `planted`: a dictionary of a real model whose latents are known token indicators (digits, animal
  words, ...), whose true labels measure explainers and judges (`benchmarks/acceptance_planted.py`).
"""

from saelab.toy.recovery import max_cosines, recovery_scores
from saelab.toy.synthetic import GroundTruth, SyntheticActivations, SyntheticConfig

__all__ = ["GroundTruth", "SyntheticActivations", "SyntheticConfig", "max_cosines", "recovery_scores"]
