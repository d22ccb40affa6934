"""Explain and score many latents into the feature store, resumably.

`explain_features` runs in two passes over the chosen latents (by default the `n_features` most
frequent live ones):

1. explain: an explanation method writes `n_explanations` labels per latent, each added to the store
   with its provenance (the method's own record, the whole `ExplainConfig`, the example ids, a settings
   key). Method "auto" is the explainer LM reading each latent's activating examples (`build_examples`;
   latents are sent to it in groups, so a local model decodes several prompts in one batch); method
   "self" is the model describing the latent's decoder direction injected into its own residual stream
   (`SelfExplainer`), which needs no examples to explain, only to score;
2. score: each new label with every chosen scorer, beside its controls (`score_latents`).

`score_explanations` runs the second pass alone on labels already in the store (human ones, say, or a
planted dictionary's true labels), so every kind of label is measured the same way.

The shuffled control of a label is a seeded choice among the first labels (of the same kinds) of the
OTHER latents in the run, so a run needs at least two. Every write is one store transaction
(`add_explanation`, `set_score`). Resume: a latent whose labels of this kind carry this run's settings
key is not explained again, and a label already scored by a scorer with the same scoring key (judge,
scorer version, seed, bootstrap, example settings) is not scored again, so an interrupted run picks up
where it stopped and a finished one is a no-op. `redo=True` explains and scores anew (the old labels
stay, newest last). Junk completions and latents that cannot be explained or scored (no stored
examples, no non-activating window) are recorded in the summary's ``failures``, never written.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from saelab.analysis.store import KINDS, FeatureStore
from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.errors import DataError
from saelab.explain.clients.base import LMClient
from saelab.explain.examples import ExampleSet, build_examples, live_latents
from saelab.explain.explainer import PROMPT_VERSION, Explainer, ExplanationResult
from saelab.explain.scorers import SCORER_VERSION, get_scorer

GROUP = 8  # latents whose explainer prompts go to the client together (one batch on a local model)


class DirectionExplainer(Protocol):
    """What method "self" needs: labels of a decoder direction (`SelfExplainer` is one)."""

    def settings(self) -> dict: ...

    def explain(self, direction: torch.Tensor, n: int, seed: int) -> list[ExplanationResult]: ...


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

    def example_settings(self) -> dict:
        """What decides a latent's example sets (and so its scores)."""
        return {k: getattr(self, k) for k in ("n_explain", "n_test", "n_random", "n_hard", "seed")}


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


def choose_latents(store: FeatureStore, features: Sequence[int] | None, n_features: int) -> list[int]:
    """`features` (each checked to exist), or the `n_features` most frequent live latents."""
    if features is not None:
        chosen = list(dict.fromkeys(int(i) for i in features))
        for i in chosen:
            if store.feature(i) is None:
                raise DataError(f"latent {i} is not in the feature store {store.path}.")
        return chosen
    rows = store.list_features(sort="density", descending=True, limit=n_features, include_dead=False)
    return [r["idx"] for r in rows]


def _new_summary() -> dict:
    return {
        "features": [],
        "explained": [],
        "skipped": [],
        "scored": 0,
        "failures": [],
        "scores": {},
        "new": [],
    }


class _Examples:
    """Each latent's example sets, built once on first use (explaining and scoring share them)."""

    def __init__(self, store: FeatureStore, lm: HookedLM, dictionary: Dictionary, cfg: ExplainConfig):
        self.store, self.lm, self.dictionary, self.cfg = store, lm, dictionary, cfg
        self.live, self.vocab = live_latents(store), store.vocab()

    def __call__(self, latent: _Latent) -> ExampleSet:
        if latent.examples is None:
            cfg = self.cfg
            latent.examples = build_examples(
                self.store, latent.idx, self.lm, self.dictionary, cfg.n_explain, cfg.n_test, cfg.n_random,
                cfg.n_hard, cfg.seed, vocab=self.vocab, batch_size=cfg.batch_size, live=self.live,
            )  # fmt: skip
        return latent.examples


def explain_features(
    store_path: str | Path,
    lm: HookedLM,
    dictionary: Dictionary,
    explainer: LMClient | Explainer | DirectionExplainer,
    judge: LMClient,
    cfg: ExplainConfig | None = None,
    redo: bool = False,
    progress: bool = True,
) -> dict:
    """Explain and score the chosen latents into the store at `store_path` (see the module docstring).

    `explainer` is an LM client or `Explainer` (method "auto"), or a `DirectionExplainer` such as
    `saelab.explain.selfexplain.SelfExplainer` (method "self").
    Returns {"features", "explained", "skipped", "scored", "failures", "scores": {idx: [{"id", "text",
    scorer: {score, chance, shuffled, ci_low, ci_high, flagged}}]}}."""
    cfg = cfg or ExplainConfig()
    if not isinstance(explainer, Explainer) and not hasattr(explainer, "generate"):
        method, record = "self", {"self_explainer": explainer.settings()}
    else:
        if not isinstance(explainer, Explainer):
            explainer = Explainer(
                explainer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                show_values=cfg.show_values,
            )  # fmt: skip
        method = "auto"
        record = {"prompt": PROMPT_VERSION, "explainer": explainer.client.describe(),
                  "settings": explainer.settings(cfg.n_explanations)}  # fmt: skip
    dictionary = dictionary.to(lm.device).eval()
    # What makes a stored explanation the same as this run's: its resume key.
    per_latent = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_PER_LATENT}
    explain_key = _key(record | {"method": method, "config": per_latent})
    summary = _new_summary()
    with FeatureStore(store_path, create=False) as store:
        chosen = choose_latents(store, cfg.features, cfg.n_features)
        if cfg.scorers and len(chosen) < 2:
            raise DataError(_TWO)
        summary["features"] = chosen
        examples_of = _Examples(store, lm, dictionary, cfg)
        latents = [_Latent(i) for i in chosen]
        pending = []
        for latent in latents:
            done = [
                e for e in store.explanations(latent.idx)
                if e["kind"] == method and e["source"].get("settings_key") == explain_key
            ]  # fmt: skip
            if done and not redo:
                latent.explanations = [
                    {"id": e["id"], "text": e["text"]} for e in sorted(done, key=lambda e: e["id"])
                ]
                summary["skipped"].append(latent.idx)
            else:
                pending.append(latent)

        def write(latent: _Latent, results: list[ExplanationResult], examples: ExampleSet | None) -> None:
            for result in results:
                if result.text is None:
                    summary["failures"].append(
                        {"feature": latent.idx, "stage": "explain", "error": result.error,
                         "sample": result.source.get("sample"), "raw": result.raw}
                    )  # fmt: skip
                    continue
                source = result.source | {"config": cfg.to_dict(), "settings_key": explain_key}
                if examples is not None:
                    source["examples"] = examples.ids()
                eid = store.add_explanation(latent.idx, result.text, method, source)
                latent.explanations.append({"id": eid, "text": result.text})
                summary["new"].append({"id": eid, "text": result.text})
            summary["explained"].append(latent.idx)

        bar = tqdm(total=len(pending), desc=f"explain ({method})", unit="latent", disable=not progress)
        if method == "self":
            for latent in pending:
                direction = dictionary.W_dec[latent.idx].detach()
                write(latent, explainer.explain(direction, cfg.n_explanations, cfg.seed), None)
                bar.update()
        else:
            for start in range(0, len(pending), GROUP):
                group, sets = [], []
                for latent in pending[start : start + GROUP]:
                    examples = examples_of(latent)
                    if examples.explain:
                        group.append(latent)
                        sets.append(examples)
                    else:
                        summary["failures"].append({"feature": latent.idx, "stage": "examples",
                                                    "error": "no activating examples stored"})  # fmt: skip
                results = explainer.explain_many([s.explain for s in sets], cfg.n_explanations, cfg.seed)
                for latent, examples, found in zip(group, sets, results, strict=True):
                    write(latent, found, examples)
                bar.update(len(pending[start : start + GROUP]))
        bar.close()

        if cfg.scorers:
            labelled = [lat for lat in latents if lat.explanations]
            _score(store, labelled, judge, cfg, examples_of, {"explained_by": explain_key}, summary, redo,
                   progress)  # fmt: skip
    return summary


def score_explanations(
    store_path: str | Path,
    lm: HookedLM,
    dictionary: Dictionary,
    judge: LMClient,
    cfg: ExplainConfig | None = None,
    kinds: Sequence[str] = KINDS,
    redo: bool = False,
    progress: bool = True,
) -> dict:
    """Score the labels of `kinds` already stored for the chosen latents (every scorer of `cfg`, each
    beside chance and another latent's label of the same kinds); resumable like `explain_features`.
    Returns the same summary (nothing in "explained")."""
    cfg = cfg or ExplainConfig()
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise DataError(f"kinds must be some of {', '.join(KINDS)}, got {list(kinds)!r}.")
    if not cfg.scorers:
        raise DataError("no scorers chosen; name at least one of detection, fuzzing, embedding, surprisal.")
    dictionary = dictionary.to(lm.device).eval()
    summary = _new_summary()
    with FeatureStore(store_path, create=False) as store:
        chosen = choose_latents(store, cfg.features, cfg.n_features)
        summary["features"] = chosen
        latents = []
        for idx in chosen:
            found = sorted((e for e in store.explanations(idx) if e["kind"] in kinds), key=lambda e: e["id"])
            latent = _Latent(idx, explanations=[{"id": e["id"], "text": e["text"]} for e in found])
            if latent.explanations:
                latents.append(latent)
            else:
                summary["skipped"].append(idx)
        if len(latents) < 2:
            raise DataError(_TWO)
        _score(store, latents, judge, cfg, _Examples(store, lm, dictionary, cfg), {"kinds": sorted(kinds)},
               summary, redo, progress)  # fmt: skip
    return summary


def score_means(summary: dict) -> dict[str, dict]:
    """Per scorer, over the labels a summary scored: the mean score, shuffled control and chance, how many
    labels, and the share that beat their controls (not flagged)."""
    out: dict[str, dict] = {}
    for rows in summary["scores"].values():
        for row in rows:
            for name, s in row.items():
                if isinstance(s, dict):
                    out.setdefault(name, []).append(s)
    return {
        name: {
            "score": sum(s["score"] for s in found) / len(found),
            "shuffled": sum(s["shuffled"] for s in found) / len(found),
            "chance": sum(s["chance"] for s in found) / len(found),
            "n": len(found),
            "beat_controls": sum(not s["flagged"] for s in found) / len(found),
        }
        for name, found in out.items()
    }


LIVE = ExplainConfig(
    n_explain=20, n_test=10, n_random=5, n_hard=5, scorers=("detection", "embedding", "surprisal"),
    n_bootstrap=500,
)  # fmt: skip


def explain_now(
    store_path: str | Path,
    lm: HookedLM,
    dictionary: Dictionary,
    explainer: LMClient | Explainer | DirectionExplainer,
    judge: LMClient,
    idx: int,
    cfg: ExplainConfig = LIVE,
    n_controls: int = 64,
) -> dict:
    """Explain latent `idx` now (new labels beside any old ones) and score the new labels, each beside
    chance and a label another latent already has in the store (the best label of up to `n_controls`
    others, best-scored first). With no other label stored yet, the most frequent other live latent is
    explained first (same method) to serve as the control. Returns the summary of `explain_features`."""
    cfg = replace(cfg, features=[int(idx)])
    with FeatureStore(store_path, create=False) as store:
        if store.feature(int(idx)) is None:
            raise DataError(f"latent {idx} is not in the feature store {store.path}.")
        rows = store.list_features(sort="score", limit=n_controls + 1, include_dead=False)
        controls = {r["idx"]: r["best"]["text"] for r in rows if r["best"] and r["idx"] != idx}
        if not controls:
            other = next((r["idx"] for r in store.list_features(sort="density", limit=2, include_dead=False)
                          if r["idx"] != idx), None)  # fmt: skip
            if other is None:
                raise DataError(
                    f"latent {idx} is the only live latent in {store.path}: a score needs another latent's "
                    "label as its shuffled control."
                )
    if not controls:
        first = explain_features(store_path, lm, dictionary, explainer, judge, replace(cfg, features=[other],
                                 scorers=()), progress=False)  # fmt: skip
        with FeatureStore(store_path, create=False) as store:
            found = store.explanations(other)
        controls = {other: found[0]["text"]} if found else {}
        if not controls:
            raise DataError(
                f"no label could be made for latent {other} to serve as the shuffled control "
                f"({'; '.join(f['error'] for f in first['failures']) or 'no reason given'})."
            )
    summary = explain_features(store_path, lm, dictionary, explainer, judge, replace(cfg, scorers=()),
                               redo=True, progress=False)  # fmt: skip
    labelled = [_Latent(int(idx), explanations=list(summary["new"]))]
    if cfg.scorers and labelled[0].explanations:
        with FeatureStore(store_path, create=False) as store:
            dictionary = dictionary.to(lm.device).eval()
            _score(store, labelled, judge, cfg, _Examples(store, lm, dictionary, cfg),
                   {"live": True, "controls": sorted(controls)}, summary, False, False, controls)  # fmt: skip
    return summary


def _score(
    store: FeatureStore,
    latents: list[_Latent],
    judge: LMClient,
    cfg: ExplainConfig,
    examples_of: Callable[[_Latent], ExampleSet],
    extra_key: dict,
    summary: dict,
    redo: bool,
    progress: bool,
    controls: dict[int, str] | None = None,
) -> None:
    """Score every explanation of `latents` with each scorer, beside chance and a shuffled label: one of
    `controls` ({latent: label} of other latents) if given, else the first label of another of `latents`."""
    if controls is None and len(latents) == 1:
        raise DataError(_TWO)
    score_key = _key(
        {"judge": judge.describe(), "version": SCORER_VERSION, "seed": cfg.seed,
         "n_bootstrap": cfg.n_bootstrap, "examples": cfg.example_settings()} | extra_key
    )  # fmt: skip
    for latent in tqdm(latents, desc="score", unit="latent", disable=not progress):
        if controls is None:
            others = [lat.explanations[0]["text"] for lat in latents if lat.idx != latent.idx]
        else:
            others = [text for idx, text in sorted(controls.items()) if idx != latent.idx]
        if not others:
            raise DataError(_TWO)
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
