"""Scorers of explanations, each reporting its score beside its chance and shuffled-label controls.

`SCORERS` maps a name to its scorer; `get_scorer(name)` is the lookup with a clear error. Every scorer
is one module here; see `saelab.explain.scorers.base` for the controls and the flag rule.
"""

from __future__ import annotations

from saelab.errors import DataError
from saelab.explain.scorers.base import (
    SCORER_VERSION,
    Measurement,
    Scorer,
    ScoreResult,
    accuracy,
    auc,
    balanced_accuracy,
    bootstrap_ci,
)
from saelab.explain.scorers.detection import Detection
from saelab.explain.scorers.embedding import Embedding
from saelab.explain.scorers.fuzzing import Fuzzing
from saelab.explain.scorers.surprisal import Surprisal

SCORERS: dict[str, Scorer] = {s.name: s for s in (Detection(), Fuzzing(), Embedding(), Surprisal())}

__all__ = [
    "SCORERS",
    "SCORER_VERSION",
    "Detection",
    "Embedding",
    "Fuzzing",
    "Measurement",
    "ScoreResult",
    "Scorer",
    "Surprisal",
    "accuracy",
    "auc",
    "balanced_accuracy",
    "bootstrap_ci",
    "get_scorer",
]


def get_scorer(name: str) -> Scorer:
    """The scorer called `name`, or a DataError listing the names there are."""
    if name not in SCORERS:
        raise DataError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}.")
    return SCORERS[name]
