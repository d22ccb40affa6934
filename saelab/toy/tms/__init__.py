"""Toy Models of Superposition (Elhage et al. 2022), reproduced on a CPU in minutes.

- `model`: the toy model x' = ReLU(W^T W x + b), its sparse features and its loss.
- `train`: the batched training run (`TMSConfig`, `train_toy_model`) and the held-out loss.
- `geometry`: what a trained W looks like (norms, interference, dimensionality, polygons, phases).
- `superposition`, `phases`, `dimensions`: the paper's three experiments; `suite`: all of them.
- `results` (shared recipe, JSON output) and `plots` (the figures) serve the experiments.
"""

from saelab.toy.tms.dimensions import (
    DIMENSIONALITY_INVERSE_DENSITIES,
    QUICK_DIMENSIONALITY_INVERSE_DENSITIES,
    dimensionality,
)
from saelab.toy.tms.geometry import (
    PHASES,
    REPRESENTED_NORM,
    STICKY_FRACTIONS,
    SUPERPOSITION_INTERFERENCE,
    classify_extra_feature,
    feature_dimensionality,
    feature_norms,
    max_abs_cosine,
    polygon_angles,
    represented,
    superposition_interference,
)
from saelab.toy.tms.model import ToyModel, reconstruction_loss, sample_features
from saelab.toy.tms.phases import phase_diagram
from saelab.toy.tms.results import EXPERIMENT_LR
from saelab.toy.tms.suite import run_all
from saelab.toy.tms.superposition import QUICK_SWEEP_DENSITIES, SWEEP_DENSITIES, sparsity_sweep
from saelab.toy.tms.train import LR_SCHEDULES, TMSConfig, instance_losses, train_toy_model

__all__ = [
    "DIMENSIONALITY_INVERSE_DENSITIES",
    "EXPERIMENT_LR",
    "LR_SCHEDULES",
    "PHASES",
    "QUICK_DIMENSIONALITY_INVERSE_DENSITIES",
    "QUICK_SWEEP_DENSITIES",
    "REPRESENTED_NORM",
    "STICKY_FRACTIONS",
    "SUPERPOSITION_INTERFERENCE",
    "SWEEP_DENSITIES",
    "TMSConfig",
    "ToyModel",
    "classify_extra_feature",
    "dimensionality",
    "feature_dimensionality",
    "feature_norms",
    "instance_losses",
    "max_abs_cosine",
    "phase_diagram",
    "polygon_angles",
    "reconstruction_loss",
    "represented",
    "run_all",
    "sample_features",
    "sparsity_sweep",
    "superposition_interference",
    "train_toy_model",
]
