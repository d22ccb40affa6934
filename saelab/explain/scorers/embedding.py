"""Embedding: is the explanation closer to activating windows than to non-activating ones?

Items as in detection. The margin of an item is the cosine between `client.embed` of the explanation
and of the window's plain text (for the local client: the model's mean-pooled last hidden states).
Headline: AUC activating vs non-activating (chance 0.5). Example embeddings are computed once for all
explanations.
"""

from __future__ import annotations

import numpy as np
import torch

from saelab.errors import DataError
from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet
from saelab.explain.scorers.base import Measurement, Scorer


class Embedding(Scorer):
    name = "embedding"
    metric = "auc"

    def measure(
        self, explanations: list[str], examples: ExampleSet, client: LMClient, seed: int
    ) -> list[Measurement]:
        items = examples.test + examples.non_activating
        if not examples.test or not examples.non_activating:
            raise DataError(
                f"the embedding score of latent {examples.feature} needs activating and non-activating "
                f"examples; it has {len(examples.test)} and {len(examples.non_activating)}."
            )
        vectors = client.embed([e.text for e in items] + list(explanations)).float()
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        texts, queries = vectors[: len(items)], vectors[len(items) :]
        cosines = (queries @ texts.T).double().numpy()
        labels = np.array([e.activating for e in items])
        ids = [[e.id, int(e.activating)] for e in items]
        return [Measurement(labels, c, None, ids) for c in cosines]
