"""Embedding: is the explanation closer to activating windows than to non-activating ones?

Items as in detection. The margin of an item is the cosine between `client.embed` of the explanation
and of the window's plain text (for the local client: the model's mean-pooled last hidden states).
Headline: AUC activating vs non-activating (chance 0.5). Example embeddings are computed once for all
explanations.
"""

from __future__ import annotations

import numpy as np
import torch

from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet
from saelab.explain.scorers.base import Measurement, Scorer, activating_and_not


class Embedding(Scorer):
    name = "embedding"
    metric = "auc"

    def measure(
        self, explanations: list[str], examples: ExampleSet, client: LMClient, seed: int
    ) -> list[Measurement]:
        items = activating_and_not(examples, "the embedding score")
        vectors = client.embed([e.text for e in items] + list(explanations)).float()
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
        texts, queries = vectors[: len(items)], vectors[len(items) :]
        cosines = (queries @ texts.T).double().numpy()
        labels = np.array([e.activating for e in items])
        ids = [[e.id, int(e.activating)] for e in items]
        return [Measurement(labels, c, None, ids) for c in cosines]
