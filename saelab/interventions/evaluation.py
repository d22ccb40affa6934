"""Does steering work? Sweep a strength, and measure how often completions mention the topic and how fluent they stay.

For every strength the same prompts are completed with the same seed (so strength 0 of an additive
intervention reproduces the unsteered completions exactly), and two figures are recorded:

- the **mention rate**: the share of completions that mention the topic, by keyword match
  (`mention_rate`);
- the **loss**: the mean per-token cross-entropy of the completions under the *unsteered* model
  (`completion_loss`), a fluency check: steering that wrecks the text raises it sharply.

A good strength raises the mention rate while the loss stays near the unsteered one;
`best_strength` picks the smallest strength that reaches a target rate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from saelab.core.data import DataConfig
from saelab.core.fileio import save_figure
from saelab.core.models import HookedLM
from saelab.errors import DataError
from saelab.interventions.generation import GenerationConfig, completion_loss, generate
from saelab.interventions.hooks import Intervention, steer

Keyword = str | re.Pattern


# ---- mention rate ------------------------------------------------------------------------------
def _keyword_regex(keyword: Keyword) -> str:
    """One keyword as a regex source: patterns as given, plain words as whole words (plural allowed)."""
    if isinstance(keyword, re.Pattern):
        return f"(?:{keyword.pattern})"
    if not isinstance(keyword, str) or not keyword.strip():
        raise DataError(
            f"keyword {keyword!r} is not a non-empty string or compiled regex; give words like 'ocean'."
        )
    words = [re.escape(w) for w in keyword.split()]
    return r"(?<![^\W_])" + r"\s+".join(words) + r"(?:s|es)?(?![^\W_])"


def keyword_pattern(keywords: Iterable[Keyword]) -> re.Pattern:
    """A case-insensitive regex matching any keyword (see `mention_rate` for the rule)."""
    if isinstance(keywords, str | re.Pattern):
        keywords = [keywords]
    sources = [_keyword_regex(k) for k in keywords]
    if not sources:
        raise DataError("no keywords given: name at least one word that marks the topic, e.g. 'ocean'.")
    try:
        return re.compile("|".join(sources), re.IGNORECASE)
    except re.error as err:  # e.g. a pattern with global inline flags, which only work at the start
        raise DataError(
            f"the keyword patterns cannot be combined into one regex ({err}); drop inline flags such as "
            "(?i) from compiled patterns (matching is case-insensitive already)."
        ) from None


def mentions(text: str, keywords: Iterable[Keyword]) -> bool:
    """Whether `text` mentions any keyword (see `mention_rate`)."""
    return bool(keyword_pattern(keywords).search(text))


def mention_rate(texts: Sequence[str], keywords: Iterable[Keyword]) -> float:
    """Share of `texts` (0 to 1) that mention at least one of `keywords`.

    Matching is case-insensitive and whole-word-ish: a plain keyword matches where it is not glued to
    other letters or digits, optionally followed by a plural "s"/"es" ("wave" matches "Waves," and
    "wave-like" but not "microwave" or "seaweed" for "sea"); a multi-word keyword ("salt water")
    matches across any whitespace. A compiled `re.Pattern` is used as it is, case-insensitively,
    for anything else (stems, alternations).
    """
    texts = list(texts)
    if not texts:
        raise DataError("no texts to score: the mention rate of zero completions is undefined.")
    pattern = keyword_pattern(keywords)
    return sum(bool(pattern.search(t)) for t in texts) / len(texts)


# ---- sweep -------------------------------------------------------------------------------------
@dataclass
class SweepPoint:
    """Completions at one strength, with their mention rate and their loss under the unsteered model."""

    strength: float
    mention_rate: float
    loss: float  # mean per-token CE of the completions under the unsteered model; nan if all are empty
    completions: list[str]

    def to_dict(self, prompts: Sequence[str], n_samples: int = 3) -> dict:
        return {
            "strength": self.strength,
            "mention_rate": self.mention_rate,
            "loss": None if math.isnan(self.loss) else self.loss,
            "samples": [
                {"prompt": p, "completion": c}
                for p, c in list(zip(prompts, self.completions, strict=True))[:n_samples]
            ],
        }


@dataclass
class SweepResult:
    """A steering sweep: one `SweepPoint` per strength, plus what is needed to reproduce it."""

    points: list[SweepPoint]
    prompts: list[str]
    keywords: list[str]
    config: dict  # the GenerationConfig
    meta: dict = field(default_factory=dict)  # free-form: hook, layer, method, vector norm, ...

    @property
    def strengths(self) -> list[float]:
        return [p.strength for p in self.points]

    @property
    def rates(self) -> list[float]:
        return [p.mention_rate for p in self.points]

    @property
    def losses(self) -> list[float]:
        return [p.loss for p in self.points]

    def point(self, strength: float) -> SweepPoint:
        """The point at `strength` (a clear error if the sweep did not include it)."""
        for p in self.points:
            if p.strength == strength:
                return p
        raise DataError(f"strength {strength} is not in this sweep; it has {self.strengths}.")

    def to_dict(self, n_samples: int = 3, all_completions: bool = False) -> dict:
        """JSON-ready: every figure, `n_samples` sample completions per strength (or all of them)."""
        points = []
        for p in self.points:
            row = p.to_dict(self.prompts, n_samples)
            if all_completions:
                row["completions"] = list(p.completions)
            points.append(row)
        return {
            "keywords": [k.pattern if isinstance(k, re.Pattern) else k for k in self.keywords],
            "n_prompts": len(self.prompts),
            "generation": self.config,
            **self.meta,
            "points": points,
        }

    def save(self, path, n_samples: int = 3, all_completions: bool = True) -> Path:
        """Write `to_dict` as JSON (parent folders created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(n_samples, all_completions), indent=2) + "\n")
        return path

    def table(self) -> str:
        """A plain-text table: strength, mention rate, loss."""
        lines = [f"{'strength':>10}  {'mention':>8}  {'loss':>7}"]
        lines += [f"{p.strength:>10.4g}  {p.mention_rate:>8.0%}  {p.loss:>7.3f}" for p in self.points]
        return "\n".join(lines)


def steering_sweep(
    lm: HookedLM,
    prompts: Sequence[str],
    make_interventions: Callable[[float], list[Intervention]],
    strengths: Iterable[float],
    keywords: Iterable[Keyword],
    cfg: GenerationConfig | None = None,
    meta: dict | None = None,
    progress: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Complete `prompts` under `make_interventions(s)` for each strength `s`, with the same seed.

    `make_interventions(0.0)` should return [] (or additions with alpha 0) to include the unsteered
    baseline. Each point's loss is scored by the unsteered model. `progress` is called with each
    point as it is done (sweeps on a CPU take minutes).
    """
    cfg = cfg or GenerationConfig()
    prompts = list(prompts)
    keywords = list(keywords) if not isinstance(keywords, str | re.Pattern) else [keywords]
    strengths = [float(s) for s in strengths]
    if not prompts:
        raise DataError("no prompts to complete; give at least one prompt.")
    if not strengths:
        raise DataError("no strengths to sweep; give at least one (0 is the unsteered baseline).")
    keyword_pattern(keywords)  # fail on bad keywords before minutes of generation
    points = []
    for s in strengths:
        completions = generate(lm, prompts, make_interventions(s), cfg)
        try:
            loss = completion_loss(lm, prompts, completions, chat=cfg.chat, batch_size=cfg.batch_size)
        except DataError:  # every completion empty: no token to score
            loss = math.nan
        point = SweepPoint(s, mention_rate(completions, keywords), loss, completions)
        points.append(point)
        if progress is not None:
            progress(point)
    return SweepResult(points, prompts, keywords, cfg.to_dict(), dict(meta or {}))


def best_strength(result: SweepResult, min_rate: float = 0.6, max_loss: float | None = None) -> float | None:
    """The smallest strength whose mention rate reaches `min_rate` (and loss is at most `max_loss`), else None."""
    for p in sorted(result.points, key=lambda p: p.strength):
        if p.mention_rate >= min_rate and (max_loss is None or p.loss <= max_loss):
            return p.strength
    return None


def plot_sweep(result: SweepResult, path, title: str | None = None, min_rate: float | None = 0.6) -> Path:
    """A PNG of mention rate (left axis) and per-token loss (right axis) against strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result.points, key=lambda p: p.strength)
    xs = [p.strength for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(xs, [100 * p.mention_rate for p in points], "o-", color="tab:blue", label="mention rate")
    if min_rate is not None:
        ax.axhline(100 * min_rate, color="tab:blue", ls=":", lw=1, label=f"goal {min_rate:.0%}")
    ax.set_xlabel("strength")
    ax.set_ylabel("completions mentioning the topic (%)", color="tab:blue")
    ax.set_ylim(-3, 103)
    ax2 = ax.twinx()
    ax2.plot(xs, [p.loss for p in points], "s--", color="tab:red", label="loss (unsteered model)")
    ax2.set_ylabel("mean per-token loss under the unsteered model", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title(title or result.meta.get("title", "steering sweep"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# ---- what an intervention costs on ordinary text ------------------------------------------------
@torch.no_grad()
def corpus_loss(
    lm: HookedLM,
    data: DataConfig,
    n_contexts: int = 64,
    interventions: Iterable[Intervention] = (),
    batch_contexts: int = 16,
) -> float:
    """Mean next-token cross-entropy of `lm` on `n_contexts` contexts of `data`, under `interventions`.

    The price of an edit on text it was not aimed at: positions the data config excludes (the attention
    sink, special tokens) are neither scored nor predicted from.
    """
    interventions = list(interventions)
    total, count = 0.0, 0
    with steer(lm, interventions):
        for input_ids, keep in data.masked_batches(lm.tokenizer, batch_contexts, max_contexts=n_contexts):
            logits = lm.forward(input_ids.to(lm.device)).float()
            nll = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), input_ids[:, 1:].to(logits.device), reduction="none"
            )
            scored = (keep[:, 1:] & keep[:, :-1]).to(nll.device)
            total += float(nll[scored].sum())
            count += int(scored.sum())
    if count == 0:
        raise DataError("the data gave no tokens to score; point it at a non-empty source.")
    return total / count
