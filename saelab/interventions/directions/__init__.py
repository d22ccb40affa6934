"""Directions from contrastive sets: difference in means (and PCA) at every layer and chosen positions.

Modules, one job each: `storage` (the `DirectionSet` folder format, with provenance), `positions`
(post-instruction positions and position labels), `collection` (activations of a prompt set),
`building` (`mean_difference`, `pca_direction`) and `logits` (last-position logits, log-odds).
Prompt formatting, padding and batch encoding live in `saelab.core.prompts`.
"""

from saelab.core.prompts import EncodedBatch, Position, encode
from saelab.errors import DirectionFileError
from saelab.interventions.directions.building import mean_difference, pca_direction, pca_directions
from saelab.interventions.directions.collection import collect_activations, resid_pre_hooks
from saelab.interventions.directions.logits import last_logits, log_odds
from saelab.interventions.directions.positions import post_instruction_positions, resolve_positions
from saelab.interventions.directions.storage import DirectionSet

__all__ = [
    "DirectionFileError",
    "DirectionSet",
    "EncodedBatch",
    "Position",
    "collect_activations",
    "encode",
    "last_logits",
    "log_odds",
    "mean_difference",
    "pca_direction",
    "pca_directions",
    "post_instruction_positions",
    "resid_pre_hooks",
    "resolve_positions",
]
