"""Fuzzing: are the marked tokens the ones the explanation is about?

Items: each activating test example twice, once with the tokens the latent fires on marked (label 1),
once with as many other tokens marked, chosen at random (seeded, label 0); an example on whose every
token the latent fires has no wrong marking and is left out. The decision and margin are as in
detection; headline: balanced accuracy (chance 0.5).
"""

from __future__ import annotations

import random

import numpy as np

from saelab.errors import DataError
from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet, format_example
from saelab.explain.scorers.base import Measurement, Scorer, judge_text, yes_no_logprobs

PROMPT = (
    "A feature of a language model fires on some tokens. Its explanation: {explanation}\n\n"
    "In this text, some tokens are marked <<like this>>:\n{text}\n\n"
    "Are the marked tokens the ones the explanation describes? Answer Yes or No."
)


def wrong_marks(n_tokens: int, right: tuple[int, ...], rng: random.Random) -> list[int] | None:
    """As many token indices as `right`, none of them in `right` (fewer if not enough); None if none left."""
    others = [i for i in range(n_tokens) if i not in set(right)]
    if not others or not right:
        return None
    return sorted(rng.sample(others, min(len(right), len(others))))


class Fuzzing(Scorer):
    name = "fuzzing"
    metric = "balanced_accuracy"

    def measure(
        self, explanations: list[str], examples: ExampleSet, client: LMClient, seed: int
    ) -> list[Measurement]:
        rng = random.Random(seed * 1_000_003 + examples.feature)
        texts, labels, ids = [], [], []
        for e in examples.test:
            wrong = wrong_marks(len(e.tokens), e.marked, rng)
            if wrong is None:
                continue
            texts += [format_example(e), format_example(e, marked=wrong)]
            labels += [True, False]
            ids += [[e.id, 1], [e.id, 0]]
        if not texts:
            raise DataError(
                f"fuzzing of latent {examples.feature} needs activating test examples with tokens on which "
                "the latent does not fire; it has none."
            )
        prompts = [
            judge_text(client, [{"role": "user", "content": PROMPT.format(explanation=x, text=t)}])
            for x in explanations
            for t in texts
        ]
        margins = yes_no_logprobs(client, prompts).reshape(len(explanations), len(texts))
        labels = np.array(labels)
        return [Measurement(labels, m, m > 0, ids) for m in margins]
