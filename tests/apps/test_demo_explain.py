"""The demo's explanation stage on the tiny analysed store: the most frequent live latents get a label
each, scored by detection and embedding beside chance and a shuffled label; a rerun redoes nothing."""

from __future__ import annotations

import shutil

from saelab.analysis.store import FeatureStore
from saelab.cli import demo
from saelab.dictionaries.io import save_dictionary


def test_the_demo_explains_and_scores_the_most_frequent_latents(analysed, tmp_path, monkeypatch, capsys):
    lm, sae, path = analysed
    folder = save_dictionary(sae, tmp_path / "sae")
    store = folder / "features.db"
    shutil.copy(path, store)
    monkeypatch.setattr(demo, "load_lm", lambda model, device, dtype: lm)
    demo._explain(folder, store, 3, "cpu", "float32")
    out = capsys.readouterr().out
    assert "mean over labels" in out and "detection" in out and "embedding" in out
    with FeatureStore(store) as s:
        top = [r["idx"] for r in s.list_features(sort="density", limit=3, include_dead=False)]
        labelled = [i for i in top if s.explanations(i)]
        assert labelled  # junk replies of the random tiny model are recorded, not stored
        for idx in labelled:
            (e,) = s.explanations(idx)
            assert e["kind"] == "auto" and e["source"]["config"] == demo.demo_explain_config(3).to_dict()
            assert set(e["scores"]) <= {"detection", "embedding"}
        before = s.dump()
    demo._explain(folder, store, 3, "cpu", "float32")  # resumable: nothing is redone
    with FeatureStore(store) as s:
        assert s.dump()["explanations"] == before["explanations"]


def test_the_brief_summary_says_where_the_failures_were(capsys):
    from saelab.cli.explain import _print_summary

    score = {"score": 0.6, "shuffled": 0.5, "chance": 0.5, "flagged": False}
    summary = {
        "features": [1, 2, 3],
        "explained": [1, 2, 3],
        "scores": {1: [{"id": 1, "text": "digits", "detection": score}]},
        "failures": [
            {"feature": 2, "stage": "explain", "error": "the reply held no label"},
            {"feature": 3, "stage": "detection", "error": "latent 3 has no non-activating examples"},
            {"feature": 3, "stage": "embedding", "error": "latent 3 has no non-activating examples"},
        ],
    }
    _print_summary("sae", "store.db", summary, brief=True)
    out = " ".join(capsys.readouterr().out.split())
    assert "latent 1: digits" in out
    assert "3 failures (1 in explain, 1 in detection, 1 in embedding)" in out
    assert "latent 2: the reply held no label" in out
