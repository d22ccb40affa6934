"""dream_latents on the tiny analysed store: fronts stored with their run's record, resume, redo, the
same seed giving the same prompts, and refusals that leave the store as it was."""

from __future__ import annotations

import shutil

import pytest

from saelab.analysis.store import FeatureStore
from saelab.errors import DataError
from saelab.explain.dream_latents import dream_latents, run_key
from saelab.explain.dreaming import DreamConfig, log_lambdas

TINY = dict(
    seq_len=4, population=2, lambdas=log_lambdas(2), iterations=3, children=2, top_k=8, restart_every=2
)


def fresh(analysed, tmp_path, name="features.db"):
    path = tmp_path / name
    shutil.copy(analysed[2], path)
    return path


def test_fronts_are_stored_resumed_and_redone(analysed, tmp_path):
    lm, sae, _ = analysed
    path = fresh(analysed, tmp_path)
    cfg = DreamConfig(**TINY)
    summary = dream_latents(path, lm, sae, cfg, n_features=2, progress=False)
    assert summary["dreamed"] == summary["features"] and len(summary["features"]) == 2
    key = run_key(lm, sae, cfg, "last")
    with FeatureStore(path) as store:
        for idx in summary["features"]:
            rows = store.dreams(idx)
            assert rows and all(r["run_key"] == key and len(r["token_ids"]) == 4 for r in rows)
            ces = [r["cross_entropy"] for r in rows]
            acts = [r["activation"] for r in rows]
            assert ces == sorted(ces) and acts == sorted(acts)  # a front: more activation costs fluency
            source = rows[0]["source"]
            assert source["method"] == "dream" and source["config"]["seed"] == 0
            assert source["dataset_max"] == store.feature(idx)["max_act"]
            assert summary["fronts"][idx]["best"] == max(acts)
        before = store.dump()["dreams"]
    again = dream_latents(path, lm, sae, cfg, n_features=2, progress=False)
    assert again["skipped"] == summary["features"] and again["dreamed"] == []
    other = fresh(analysed, tmp_path, "other.db")
    dream_latents(other, lm, sae, cfg, n_features=2, progress=False)
    with FeatureStore(other) as store:
        same = store.dump()["dreams"]
    strip = lambda rows: [r[1:8] for r in rows]  # noqa: E731  (not the id, source timing or time)
    assert strip(same) == strip(before)  # the same seed: the same prompts and values
    redo = dream_latents(path, lm, sae, cfg, n_features=2, redo=True, progress=False)
    assert redo["dreamed"] == summary["features"]
    with FeatureStore(path) as store:
        assert len(store.dump()["dreams"]) == len(before)  # replaced, not added


def test_bad_settings_and_latents_leave_the_store_as_it_was(analysed, tmp_path):
    lm, sae, _ = analysed
    path = fresh(analysed, tmp_path)
    with FeatureStore(path) as store:
        before = store.dump()
    with pytest.raises(DataError, match="latent 4096"):
        dream_latents(path, lm, sae, DreamConfig(**TINY), features=[4096], progress=False)
    with pytest.raises(DataError, match="population"):
        dream_latents(path, lm, sae, DreamConfig(**{**TINY, "population": 3}), progress=False)
    with FeatureStore(path) as store:
        assert store.dump() == before
