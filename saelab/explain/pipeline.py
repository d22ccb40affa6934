"""Explain and score many latents into the feature store, resumably.

`explain_features` runs in two passes over the chosen latents (by default the `n_features` most
frequent live ones):

1. explain: build each latent's example sets (`build_examples`), ask the explainer for
   `n_explanations` labels, and add each as an 'auto' explanation whose source records the explainer,
   the prompt version, the example ids, the seed, the whole `ExplainConfig` and a settings key;
2. score: each explanation with every chosen scorer, beside its controls; the shuffled label is a
   seeded choice among the first explanations of the OTHER chosen latents, so it needs at least two.

Every write is one store transaction (`add_explanation`, `set_score`). Resume: a latent whose 'auto'
explanations carry this run's settings key is not explained again, and an explanation already scored by a
scorer with the same scoring key (judge, scorer version, seed, bootstrap) is not scored again, so an
interrupted run picks up where it stopped and a finished one is a no-op. `redo=True` explains and scores
anew (the old explanations stay, newest last). Junk completions are recorded in the summary's
``failures``, never written.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from saelab.analysis.store import FeatureStore
from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.errors import DataError
from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet, build_examples, live_latents
from saelab.explain.explainer import PROMPT_VERSION, Explainer
from saelab.explain.scorers import SCORER_VERSION, get_scorer


@dataclass
class ExplainConfig:
    """What to explain and how; serialised whole into every explanation's provenance."""

    features: list[int] | None = None  # None: the n_features most frequent live latents
    n_features: int = 100
    n_explain: int = 40
    n_test: int = 50
    n_random: int = 50
    n_hard: int = 50
    show_values: bool = False
    n_explanations: int = 1
    temperature: float | None = None  # None: greedy for one explanation, 0.7 for several
    max_new_tokens: int = 48
    scorers: tuple[str, ...] = ("detection", "fuzzing", "embedding", "surprisal")
    n_bootstrap: int = 1000
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("n_features", "n_explain", "n_test", "n_explanations", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} is {value!r}; use a whole number >= 1.")
        for name in ("n_random", "n_hard", "n_bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise DataError(f"{name} is {value!r}; use a whole number >= 0.")
        self.scorers = tuple(self.scorers)
        for name in self.scorers:
            get_scorer(name)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scorers"] = list(self.scorers)
        return out


_NOT_PER_LATENT = ("features", "n_features", "scorers", "n_bootstrap")  # do not change a latent's labels
_SUMMARY_FIELDS = ("score", "chance", "shuffled", "ci_low", "ci_high", "flagged")
_TWO = (
    "the shuffled-label control scores another latent's explanation, so at least two latents must be "
    "explained; choose more features (or no scorers)."
)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class _Latent:
    idx: int
    examples: ExampleSet | None = None
    explanations: list[dict] = field(default_factory=list)  # {"id", "text"}


def _choose(store: FeatureStore, cfg: ExplainConfig) -> list[int]:
    if cfg.features is not None:
        chosen = list(dict.fromkeys(int(i) for i in cfg.features))
        for i in chosen:
            if store.feature(i) is None:
                raise DataError(f"latent {i} is not in the feature store {store.path}.")
        return chosen
    rows = store.list_features(sort="density", descending=True, limit=cfg.n_features, include_dead=False)
    return [r["idx"] for r in rows]


def explain_features(
    store_path: str | Path,
    lm: HookedLM,
    dictionary: Dictionary,
    explainer: LMClient | Explainer,
    judge: LMClient,
    cfg: ExplainConfig | None = None,
    redo: bool = False,
    progress: bool = True,
) -> dict:
    """Explain and score the chosen latents into the store at `store_path` (see the module docstring).

    Returns {"features", "explained", "skipped", "scored", "failures", "scores": {idx: [{"id", "text",
    scorer: {score, chance, shuffled, ci_low, ci_high, flagged}}]}}."""
    cfg = cfg or ExplainConfig()
    if not isinstance(explainer, Explainer):
        explainer = Explainer(
            explainer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            show_values=cfg.show_values,
        )  # fmt: skip
    dictionary = dictionary.to(lm.device).eval()
    # What makes a stored explanation (or score) the same as this run's: its resume keys.
    per_latent = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_PER_LATENT}
    explain_key = _key(
        {"prompt": PROMPT_VERSION, "explainer": explainer.client.describe(),
         "settings": explainer.settings(cfg.n_explanations), "config": per_latent}
    )  # fmt: skip
    score_key = _key(
        {"judge": judge.describe(), "version": SCORER_VERSION, "seed": cfg.seed,
         "n_bootstrap": cfg.n_bootstrap, "examples": explain_key}
    )  # fmt: skip
    summary: dict = {
        "features": [],
        "explained": [],
        "skipped": [],
        "scored": 0,
        "failures": [],
        "scores": {},
    }
    with FeatureStore(store_path, create=False) as store:
        chosen = _choose(store, cfg)
        if cfg.scorers and len(chosen) < 2:
            raise DataError(_TWO)
        summary["features"] = chosen
        live, vocab = live_latents(store), store.vocab()
        latents = [_Latent(i) for i in chosen]

        def examples_of(latent: _Latent) -> ExampleSet:
            if latent.examples is None:
                latent.examples = build_examples(
                    store, latent.idx, lm, dictionary, cfg.n_explain, cfg.n_test, cfg.n_random, cfg.n_hard,
                    cfg.seed, vocab=vocab, batch_size=cfg.batch_size, live=live,
                )  # fmt: skip
            return latent.examples

        # 1. explain
        for latent in tqdm(latents, desc="explain", unit="latent", disable=not progress):
            done = [
                e for e in store.explanations(latent.idx)
                if e["kind"] == "auto" and e["source"].get("settings_key") == explain_key
            ]  # fmt: skip
            if done and not redo:
                latent.explanations = [
                    {"id": e["id"], "text": e["text"]} for e in sorted(done, key=lambda e: e["id"])
                ]
                summary["skipped"].append(latent.idx)
                continue
            examples = examples_of(latent)
            if not examples.explain:
                summary["failures"].append({"feature": latent.idx, "stage": "examples",
                                            "error": "no activating examples stored"})  # fmt: skip
                continue
            for result in explainer.explain(examples.explain, cfg.n_explanations, cfg.seed):
                if result.text is None:
                    summary["failures"].append(
                        {"feature": latent.idx, "stage": "explain", "error": result.error,
                         "sample": result.source["sample"], "raw": result.raw}
                    )  # fmt: skip
                    continue
                source = result.source | {"config": cfg.to_dict(), "settings_key": explain_key,
                                           "examples": examples.ids()}  # fmt: skip
                eid = store.add_explanation(latent.idx, result.text, "auto", source)
                latent.explanations.append({"id": eid, "text": result.text})
            summary["explained"].append(latent.idx)

        # 2. score, each explanation beside its controls
        labelled = [lat for lat in latents if lat.explanations] if cfg.scorers else []
        if len(labelled) == 1:
            raise DataError(_TWO)
        for latent in tqdm(labelled, desc="score", unit="latent", disable=not progress):
            others = [lat.explanations[0]["text"] for lat in labelled if lat.idx != latent.idx]
            rng = random.Random(cfg.seed * 1_000_003 + latent.idx)
            stored = {e["id"]: e["scores"] for e in store.explanations(latent.idx)}
            rows = []
            for k, explanation in enumerate(latent.explanations):
                shuffled = others[rng.randrange(len(others))]
                row = {"id": explanation["id"], "text": explanation["text"]}
                for name in cfg.scorers:
                    old = stored.get(explanation["id"], {}).get(name)
                    if old is not None and not redo and (old["details"] or {}).get("score_key") == score_key:
                        row[name] = {f: old[f] for f in _SUMMARY_FIELDS}
                        continue
                    try:
                        result = get_scorer(name).score(
                            explanation["text"], examples_of(latent), judge, shuffled,
                            seed=cfg.seed + k, n_bootstrap=cfg.n_bootstrap,
                        )  # fmt: skip
                    except DataError as e:
                        summary["failures"].append({"feature": latent.idx, "stage": name, "error": str(e),
                                                    "explanation_id": explanation["id"]})  # fmt: skip
                        continue
                    result.details["score_key"] = score_key
                    store.set_score(explanation["id"], **result.store_kwargs())
                    summary["scored"] += 1
                    row[name] = {f: getattr(result, f) for f in _SUMMARY_FIELDS}
                rows.append(row)
            summary["scores"][latent.idx] = rows
    return summary
