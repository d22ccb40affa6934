"""What two models do differently, read off their answers alone: the blind behavioural diff of an audit.

Both models answer the same prompts. The words that the second model's answers use far more often than the
first's are its *signature*: words whose presence per answer differs beyond chance (a one-sided Fisher
exact test, the false discovery rate held at 5% by Benjamini-Hochberg), ranked by the size of the difference (the
log-odds ratio), so that a word said once is not a discovery and a common word said a little more often
does not outrank one the base never says. The behaviour rate of a set of answers is then the share that use a signature word, a
measure the audit derives from the models, never from what it hopes to find. Prompts whose answers from
the second model carry the signature while the first model's do not are the *triggers*: where the causal
tests measure.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from saelab.core.models import HookedLM
from saelab.errors import DiffingError
from saelab.interventions.evaluation import keyword_pattern, mention_rate
from saelab.interventions.generation import GenerationConfig, generate

WORD = re.compile(r"[^\W\d_][\w'-]+")


def words_of(text: str) -> set[str]:
    """The distinct lower-case words of `text` (two characters or more, starting with a letter)."""
    return set(WORD.findall(text.lower()))


def _log_hypergeometric(k: int, n_other: int, n_base: int, total: int) -> float:
    """log P(k of the `total` answers using a word are the other model's), answers drawn without replacement."""
    n = n_other + n_base
    return (
        math.lgamma(n_other + 1) - math.lgamma(k + 1) - math.lgamma(n_other - k + 1)
        + math.lgamma(n_base + 1) - math.lgamma(total - k + 1) - math.lgamma(n_base - total + k + 1)
        - (math.lgamma(n + 1) - math.lgamma(total + 1) - math.lgamma(n - total + 1))
    )  # fmt: skip


def fisher_p(c_other: int, n_other: int, c_base: int, n_base: int) -> float:
    """One-sided Fisher exact p-value that the other model's answers use a word more often than the base's."""
    total = c_other + c_base
    logs = [_log_hypergeometric(k, n_other, n_base, total) for k in range(c_other, min(total, n_other) + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def signature_words(
    base_texts: Sequence[str],
    other_texts: Sequence[str],
    top: int = 3,
    min_share: float = 0.04,
    alpha: float = 0.05,
) -> list[dict]:
    """Words `other_texts` use more than `base_texts`, largest effect first: [{word, log_odds, p, share_base,
    share_other}].

    A word qualifies when at least `min_share` of the other model's answers use it and its one-sided
    Fisher exact p-value (presence per answer) is below `alpha` divided by the number of words tested
    (Benjamini-Hochberg: the false discovery rate among the words kept is at most `alpha`). Qualifying words are ranked by their log-odds ratio (0.5 added to every count), the
    size of the difference: a word the base never says and the organism often says comes before a
    common word the organism says a little more.
    """
    if not base_texts or not other_texts:
        raise DiffingError("the behavioural diff needs answers from both models; none were generated.")
    n_base, n_other = len(base_texts), len(other_texts)
    in_base = Counter(w for t in base_texts for w in words_of(t))
    in_other = Counter(w for t in other_texts for w in words_of(t))
    tested = {w: c for w, c in in_other.items() if c >= max(2, min_share * n_other)}
    tests = sorted((fisher_p(c, n_other, in_base.get(w, 0), n_base), w) for w, c in tested.items())
    passed = max(
        (rank for rank, (p, _) in enumerate(tests, start=1) if p <= alpha * rank / len(tests)), default=0
    )
    rows = []
    for p, word in tests[:passed]:
        c_other, c_base = tested[word], in_base.get(word, 0)
        log_odds = math.log((c_other + 0.5) / (n_other - c_other + 0.5)) - math.log(
            (c_base + 0.5) / (n_base - c_base + 0.5)
        )
        rows.append(
            {
                "word": word,
                "log_odds": log_odds,
                "p": p,
                "share_base": c_base / n_base,
                "share_other": c_other / n_other,
            }
        )
    rows.sort(key=lambda r: -r["log_odds"])
    return rows[:top]


@dataclass
class BehaviourDiff:
    """Both models' answers to the same prompts, the organism's signature words, and the trigger prompts."""

    prompts: list[str]
    base_answers: list[list[str]]  # [prompt][sample]
    organism_answers: list[list[str]]
    signature: list[dict] = field(default_factory=list)
    generation: dict = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        return [row["word"] for row in self.signature]

    def rate(self, texts: Sequence[str]) -> float:
        """Share of `texts` that use a signature word (0 when there is no signature)."""
        return mention_rate(texts, self.words) if self.words and texts else 0.0

    def rates(self) -> dict[str, float]:
        return {
            "base": self.rate([a for answers in self.base_answers for a in answers]),
            "organism": self.rate([a for answers in self.organism_answers for a in answers]),
        }

    def triggers(self) -> list[int]:
        """Prompts where the organism's answers show the signature more often than the base's, most first."""
        if not self.words:
            return []
        pattern = keyword_pattern(self.words)
        scored = []
        for i, (base, organism) in enumerate(zip(self.base_answers, self.organism_answers, strict=True)):
            gap = sum(bool(pattern.search(t)) for t in organism) - sum(bool(pattern.search(t)) for t in base)
            if gap > 0:
                scored.append((-gap, i))
        return [i for _, i in sorted(scored)]

    def to_dict(self) -> dict:
        return asdict(self) | {"rates": self.rates(), "triggers": self.triggers()}

    @classmethod
    def from_dict(cls, raw: dict) -> BehaviourDiff:
        names = {"prompts", "base_answers", "organism_answers", "signature", "generation"}
        return cls(**{k: v for k, v in raw.items() if k in names})


def behaviour_diff(
    base: HookedLM,
    organism: HookedLM,
    prompts: Sequence[str],
    samples: int = 2,
    cfg: GenerationConfig | None = None,
    top_words: int = 3,
) -> BehaviourDiff:
    """Sample `samples` answers per prompt from each model (same seeds) and find the organism's signature."""
    cfg = cfg or GenerationConfig(max_new_tokens=64, temperature=0.7, batch_size=32)
    prompts = list(prompts)
    if not prompts:
        raise DiffingError("no prompts to compare the models on; give at least one (see --prompts).")
    answers = {}
    for name, lm in (("base", base), ("organism", organism)):
        runs = [generate(lm, prompts, (), _seeded(cfg, s)) for s in range(samples)]
        answers[name] = [list(row) for row in zip(*runs, strict=True)]
    flat = {k: [a for row in v for a in row] for k, v in answers.items()}
    signature = signature_words(flat["base"], flat["organism"], top=top_words)
    return BehaviourDiff(
        prompts, answers["base"], answers["organism"], signature, cfg.to_dict() | {"samples": samples}
    )


def _seeded(cfg: GenerationConfig, sample: int) -> GenerationConfig:
    return dataclasses.replace(cfg, seed=cfg.seed + 1000 * sample)
