"""Dream many latents into the feature store, resumably: each latent's EPO Pareto front, stored whole.

`dream_latents` runs `saelab.explain.dreaming.dream` on each chosen latent (by default the `n_features`
most frequent live ones) and writes its front with `FeatureStore.set_dreams` in one transaction per
latent, beside the run's config, target, the latent's dataset maximum at the time, the seed and the
time taken. The run key names everything that changes a front (model, dictionary, hook, target
position, the whole `DreamConfig`), so a rerun with the same settings skips the latents already done
and an interrupted run finishes where it stopped; `redo=True` dreams them again and replaces their rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from saelab.analysis.store import FeatureStore
from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.errors import DataError
from saelab.explain.dreaming import DreamConfig, dream, latent_target
from saelab.explain.pipeline import choose_latents


def run_key(lm: HookedLM, dictionary: Dictionary, cfg: DreamConfig, position: str) -> str:
    """What makes two dreaming runs of a latent the same."""
    payload = {
        "model": lm.name, "hook": dictionary.cfg.hook_name, "d_sae": dictionary.cfg.d_sae,
        "architecture": dictionary.cfg.architecture, "position": position, "config": cfg.to_dict(),
    }  # fmt: skip
    return "dream-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dream_latents(
    store_path: str | Path,
    lm: HookedLM,
    dictionary: Dictionary,
    cfg: DreamConfig | None = None,
    features: Sequence[int] | None = None,
    n_features: int = 10,
    position: str = "last",
    redo: bool = False,
    progress: bool = True,
) -> dict:
    """Dream the chosen latents into the store (see the module docstring).

    Returns {"features", "dreamed", "skipped", "failures", "fronts": {idx: {"best", "dataset_max",
    "points", "seconds"}}}; "best" is the front's highest activation."""
    cfg = cfg or DreamConfig()
    cfg.validate()
    dictionary = dictionary.to(lm.device).eval()
    key = run_key(lm, dictionary, cfg, position)
    summary: dict = {"features": [], "dreamed": [], "skipped": [], "failures": [], "fronts": {}}
    with FeatureStore(store_path, create=False) as store:
        chosen = choose_latents(store, features, n_features)
        summary["features"] = chosen
        for idx in tqdm(chosen, desc="dream", unit="latent", disable=not progress):
            if store.dreams(idx, key) and not redo:
                summary["skipped"].append(idx)
                continue
            dataset_max = float(store.feature(idx)["max_act"])
            try:
                result = dream(lm, latent_target(dictionary, idx, position), cfg, progress=False)
            except DataError as e:
                summary["failures"].append({"feature": idx, "stage": "dream", "error": str(e)})
                continue
            rows = [
                {"token_ids": d.token_ids, "text": d.text, "activation": d.activation,
                 "cross_entropy": d.cross_entropy, "lam": d.lam}
                for d in result.front
            ]  # fmt: skip
            source = {
                "method": "dream", "config": result.config, "target": result.target, "position": position,
                "seed": cfg.seed, "seconds": round(result.seconds, 3), "evaluations": result.evaluations,
                "rejected": result.rejected, "dataset_max": dataset_max, "model": lm.name,
                "iterations": [d.iteration for d in result.front],
            }  # fmt: skip
            store.set_dreams(idx, rows, key, source)
            summary["dreamed"].append(idx)
            best = max((d.activation for d in result.front), default=None)
            summary["fronts"][idx] = {"best": best, "dataset_max": dataset_max, "points": len(rows),
                                      "seconds": result.seconds}  # fmt: skip
    return summary
