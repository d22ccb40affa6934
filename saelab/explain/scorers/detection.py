"""Detection: does the judge say an (unmarked) window matches the explanation?

Items: the activating test examples (label 1) and the random and hard non-activating ones (label 0).
One prompt per item; the decision is yes when log P(yes) > log P(no), and the margin
log P(yes) - log P(no) gives the AUC. Headline: balanced accuracy (chance 0.5 whatever the mix).
"""

from __future__ import annotations

import numpy as np

from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet
from saelab.explain.scorers.base import Measurement, Scorer, activating_and_not, judge_text, yes_no_logprobs

PROMPT = (
    "A feature of a language model fires on some texts. Its explanation: {explanation}\n\n"
    "Text: {text}\n\n"
    "Does this text match the explanation? Answer Yes or No."
)


class Detection(Scorer):
    name = "detection"
    metric = "balanced_accuracy"

    def measure(
        self, explanations: list[str], examples: ExampleSet, client: LMClient, seed: int
    ) -> list[Measurement]:
        items = activating_and_not(examples, "detection")
        labels = np.array([e.activating for e in items])
        prompts = [
            judge_text(client, [{"role": "user", "content": PROMPT.format(explanation=x, text=e.text)}])
            for x in explanations
            for e in items
        ]
        margins = yes_no_logprobs(client, prompts).reshape(len(explanations), len(items))
        ids = [[e.id, int(e.activating)] for e in items]
        return [Measurement(labels, m, m > 0, ids) for m in margins]
