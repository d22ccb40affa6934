"""What two models do differently, read off their answers alone: the blind behavioural diff of an audit.

Both models answer the same prompts. The words that the second model's answers use far more often than the
first's are its *signature*: ranked by the z-score of the log-odds ratio of each word's presence, with an
informative Dirichlet prior (Monroe, Colaresi and Quinn 2008, "Fightin' words"), so that a word said once
is not a discovery. The behaviour rate of a set of answers is then the share that use a signature word, a
measure the audit derives from the models, never from what it hopes to find. Prompts whose answers from
the second model carry the signature while the first model's do not are the *triggers*: where the causal
tests measure.
"""

from __future__ import annotations

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


def signature_words(
    base_texts: Sequence[str],
    other_texts: Sequence[str],
    top: int = 3,
    min_share: float = 0.04,
    min_z: float = 3.0,
    prior: float = 0.5,
) -> list[dict]:
    """Words `other_texts` use more than `base_texts`, most distinctive first: [{word, z, share_base, share_other}].

    A word qualifies when at least `min_share` of the other model's answers use it and the z-score of
    its log-odds ratio (presence per answer, Dirichlet prior `prior`) is at least `min_z`.
    """
    if not base_texts or not other_texts:
        raise DiffingError("the behavioural diff needs answers from both models; none were generated.")
    n_base, n_other = len(base_texts), len(other_texts)
    in_base = Counter(w for t in base_texts for w in words_of(t))
    in_other = Counter(w for t in other_texts for w in words_of(t))
    rows = []
    for word, c_other in in_other.items():
        if c_other < max(2, min_share * n_other):
            continue
        c_base = in_base.get(word, 0)
        log_odds = math.log((c_other + prior) / (n_other - c_other + prior)) - math.log(
            (c_base + prior) / (n_base - c_base + prior)
        )
        variance = (
            1 / (c_other + prior)
            + 1 / (n_other - c_other + prior)
            + 1 / (c_base + prior)
            + 1 / (n_base - c_base + prior)
        )
        z = log_odds / math.sqrt(variance)
        if z >= min_z:
            rows.append(
                {"word": word, "z": z, "share_base": c_base / n_base, "share_other": c_other / n_other}
            )
    rows.sort(key=lambda r: -r["z"])
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
    return GenerationConfig(**(cfg.to_dict() | {"seed": cfg.seed + 1000 * sample}))
