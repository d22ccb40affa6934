"""Surprisal (delphi): does stating the explanation make activating windows likelier to the judge?

Items as in detection. The margin of an item is log P(text | a prefix stating the explanation) minus
log P(text | a neutral prefix), summed over the text's tokens; a good explanation raises it more for
activating windows. Headline: AUC activating vs non-activating (chance 0.5). The neutral prefix is
scored once for all explanations.
"""

from __future__ import annotations

import numpy as np

from saelab.errors import DataError
from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet
from saelab.explain.scorers.base import Measurement, Scorer, activating_and_not

PREFIX = "The following text is an example of {explanation}.\nText:"
NEUTRAL = "The following text is an example of text.\nText:"


class Surprisal(Scorer):
    name = "surprisal"
    metric = "auc"

    def measure(
        self, explanations: list[str], examples: ExampleSet, client: LMClient, seed: int
    ) -> list[Measurement]:
        items = activating_and_not(examples, "the surprisal score")
        texts = [" " + e.text.strip() for e in items]
        if any(t == " " for t in texts):
            raise DataError(f"latent {examples.feature} has an example window with no text to score.")
        prompts = [PREFIX.format(explanation=x.strip().rstrip(".")) for x in explanations] + [NEUTRAL]
        lps = np.array(client.logprobs(prompts, texts), dtype=float)  # [prompt, text]
        labels = np.array([e.activating for e in items])
        ids = [[e.id, int(e.activating)] for e in items]
        return [Measurement(labels, row - lps[-1], None, ids) for row in lps[:-1]]
