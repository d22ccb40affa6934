"""What every scorer shares: the result with its two controls, the metrics, the bootstrap, the judge prompt.

A scorer turns (explanation, examples) into one number per scored item plus, for the yes/no scorers, a
decision per item; `Scorer.score` then measures the real explanation and a shuffled one (another latent's
label, chosen by the caller) on the SAME items with the SAME code, and reports:

* ``score``: the headline metric (balanced accuracy for the yes/no scorers, AUC for the others);
* ``chance``: what a constant or uninformative judge gets on this exact item mix: 0.5 for balanced
  accuracy (whatever the class balance) and for AUC. Plain accuracy is in ``details`` beside its own
  chance, the majority-class share, because that is what answering "no" always earns (SAEBench's
  fixture: 0.714);
* ``shuffled``: the headline metric of the shuffled explanation;
* ``ci_low`` / ``ci_high``: a seeded percentile bootstrap (95%, `n_bootstrap` resamples of the items);
* ``flagged``: `saelab.analysis.store.flagged`: the score does not beat ``shuffled``, or its CI reaches
  down to it (the store applies the same rule when it reads the row back).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from saelab.analysis.store import flagged
from saelab.errors import DataError
from saelab.explain.clients.base import LMClient, format_chat
from saelab.explain.examples import ExampleSet

SCORER_VERSION = 1  # bump when a prompt or a metric changes: stored scores record it


@dataclass
class ScoreResult:
    """One scorer's score of one explanation beside its chance and shuffled-label controls."""

    scorer: str
    score: float
    chance: float
    shuffled: float
    ci_low: float | None
    ci_high: float | None
    n: int
    details: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return flagged(self.score, self.shuffled, self.ci_low, self.chance)

    def store_kwargs(self) -> dict:
        """The keyword arguments of `FeatureStore.set_score` (with `scorer`)."""
        return {
            "scorer": self.scorer, "score": self.score, "chance": self.chance, "shuffled": self.shuffled,
            "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n, "details": self.details,
        }  # fmt: skip


@dataclass
class Measurement:
    """Per item: its label (1 = activating / correctly marked), the judge's margin, its yes/no decision."""

    labels: np.ndarray
    margins: np.ndarray
    decisions: np.ndarray | None = None
    items: list[list] = field(default_factory=list)  # [example id, label] per item, for details


# -- metrics ----------------------------------------------------------------------------------------
def auc(labels: np.ndarray, margins: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive's margin > a negative's), ties counting one half."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = np.asarray(margins, float)[labels], np.asarray(margins, float)[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise DataError("AUC needs both positive and negative items; score on more examples.")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def balanced_accuracy(labels: np.ndarray, decisions: np.ndarray) -> float:
    """Mean of the true-positive and true-negative rates: 0.5 for any constant answer."""
    labels, decisions = np.asarray(labels, dtype=bool), np.asarray(decisions, dtype=bool)
    if labels.all() or not labels.any():
        raise DataError("balanced accuracy needs both positive and negative items; score on more examples.")
    return float((decisions[labels].mean() + (~decisions[~labels]).mean()) / 2)


def accuracy(labels: np.ndarray, decisions: np.ndarray) -> float:
    return float((np.asarray(labels, dtype=bool) == np.asarray(decisions, dtype=bool)).mean())


def bootstrap_ci(metric, labels, values, n_bootstrap: int, seed: int) -> tuple[float | None, float | None]:
    """95% percentile interval of `metric(labels, values)` over item resamples (seeded); resamples with
    one class only are skipped. None, None when n_bootstrap is 0 or no resample is usable."""
    if n_bootstrap <= 0:
        return None, None
    labels, values = np.asarray(labels), np.asarray(values)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_bootstrap):
        pick = rng.integers(0, len(labels), len(labels))
        chosen = labels[pick].astype(bool)
        if chosen.all() or not chosen.any():
            continue
        stats.append(metric(labels[pick], values[pick]))
    if not stats:
        return None, None
    lo, hi = np.percentile(np.asarray(stats), [2.5, 97.5])
    return float(lo), float(hi)


# -- judge prompts ----------------------------------------------------------------------------------
def judge_text(client: LMClient, messages: Sequence[dict]) -> str:
    """A chat as the plain text `logprobs` takes: the local chat template, else role: content turns."""
    return format_chat(getattr(client, "tokenizer", None), messages)


def yes_no(prompt: str) -> tuple[str, str]:
    """The two answers as they continue `prompt` (a leading space unless the prompt ends in whitespace)."""
    return ("Yes", "No") if prompt[-1:].isspace() else (" Yes", " No")


def yes_no_logprobs(client: LMClient, prompts: list[str]) -> np.ndarray:
    """[n] log P(yes) - log P(no) for each prompt."""
    if not prompts:
        return np.zeros(0)
    out = np.zeros(len(prompts))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(yes_no(p), []).append(i)
    for candidates, where in groups.items():
        lps = client.logprobs([prompts[i] for i in where], list(candidates))
        for i, (yes, no) in zip(where, lps, strict=True):
            out[i] = yes - no
    return out


class Scorer(ABC):
    """`measure` gives per-item margins for several explanations at once; `score` adds the controls."""

    name = "scorer"
    metric = "auc"  # the headline: "auc" or "balanced_accuracy"

    @abstractmethod
    def measure(
        self, explanations: list[str], examples: ExampleSet, client: LMClient, seed: int
    ) -> list[Measurement]:
        """One Measurement per explanation, all on the same items (one batch of client calls)."""

    def headline(self, m: Measurement) -> float:
        return (
            balanced_accuracy(m.labels, m.decisions)
            if self.metric == "balanced_accuracy"
            else auc(m.labels, m.margins)
        )

    def score(
        self,
        explanation: str,
        examples: ExampleSet,
        client: LMClient,
        shuffled_explanation: str,
        seed: int = 0,
        n_bootstrap: int = 1000,
    ) -> ScoreResult:
        """The explanation's score beside its chance (0.5) and the shuffled explanation's score."""
        for text in (explanation, shuffled_explanation):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{self.name} needs non-blank explanations, got {text!r}.")
        real, control = self.measure([explanation, shuffled_explanation], examples, client, seed)
        score, shuffled = self.headline(real), self.headline(control)
        if self.metric == "balanced_accuracy":
            ci = bootstrap_ci(balanced_accuracy, real.labels, real.decisions, n_bootstrap, seed)
        else:
            ci = bootstrap_ci(auc, real.labels, real.margins, n_bootstrap, seed)
        positives = int(np.asarray(real.labels, bool).sum())
        details = {
            "metric": self.metric,
            "chance_rule": "0.5: a constant or uninformative judge on this item mix",
            "n_positive": positives,
            "n_negative": len(real.labels) - positives,
            "shuffled_explanation": shuffled_explanation,
            "judge": client.describe(),
            "scorer_version": SCORER_VERSION,
            "seed": seed,
            "n_bootstrap": n_bootstrap,
        }
        if real.decisions is not None:
            majority = max(positives, len(real.labels) - positives) / len(real.labels)
            details |= {
                "auc": auc(real.labels, real.margins),
                "auc_chance": 0.5,
                "auc_shuffled": auc(control.labels, control.margins),
                "accuracy": accuracy(real.labels, real.decisions),
                "accuracy_chance": majority,
                "accuracy_shuffled": accuracy(control.labels, control.decisions),
            }
        details["items"] = [
            [*item, round(float(a), 6), round(float(b), 6)]
            for item, a, b in zip(real.items, real.margins, control.margins, strict=True)
        ]  # [example id, label, margin, shuffled margin]
        return ScoreResult(self.name, score, 0.5, shuffled, ci[0], ci[1], len(real.labels), details)


def activating_and_not(examples: ExampleSet, what: str) -> list:
    """The items a scorer compares: the held-out activating examples, then the non-activating ones;
    both kinds are needed for an AUC or a balanced accuracy to mean anything."""
    if not examples.test or not examples.non_activating:
        raise DataError(
            f"{what} of latent {examples.feature} needs activating and non-activating examples; "
            f"it has {len(examples.test)} and {len(examples.non_activating)}."
        )
    return examples.test + examples.non_activating
