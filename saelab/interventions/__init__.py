"""Interventions: steer with features and vectors, find and remove directions, decompose vectors.

Modules, one job each: `hooks` (interventions and the `steer` context), `generation` (steered vs
unsteered side by side, fluency), `evaluation` (topic mention rate vs strength), `directions` (a
package: difference in means / PCA from contrastive prompts, the direction-set format),
`selection` (Arditi et al. direction selection), `caa` (A/B contrastive activation addition),
`probes` (logistic-regression probes and the ablation check), `orthogonalize` (weights orthogonal
to a direction), `decompose` (vectors as sparse sums of decoder rows). Prompt formatting and
activations at prompt positions live in `saelab.core.prompts`.
"""

from saelab.core.prompts import load_prompts
from saelab.interventions.decompose import (
    Decomposition,
    DecompositionError,
    Feature,
    decompose,
    encoder_then_refine,
    gradient_pursuit,
)
from saelab.interventions.directions import DirectionSet, mean_difference, pca_direction
from saelab.interventions.generation import GenerationConfig, compare, completion_loss, generate
from saelab.interventions.hooks import (
    Ablate,
    AddVector,
    CapProjection,
    ClampFeature,
    Intervention,
    InterventionError,
    ablation,
    add_feature,
    steer,
)

__all__ = [
    "Ablate",
    "AddVector",
    "CapProjection",
    "ClampFeature",
    "Decomposition",
    "DirectionSet",
    "DecompositionError",
    "Feature",
    "GenerationConfig",
    "Intervention",
    "InterventionError",
    "ablation",
    "add_feature",
    "compare",
    "completion_loss",
    "decompose",
    "encoder_then_refine",
    "generate",
    "gradient_pursuit",
    "load_prompts",
    "mean_difference",
    "pca_direction",
    "steer",
]
