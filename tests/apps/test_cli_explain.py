"""`saelab explain` end to end on a tiny model: train, analyse, explain and score into the store, resume,
and refuse bad input with one paragraph."""

from __future__ import annotations

import pytest

from saelab.analysis.store import FeatureStore
from tests.helpers import refused, run, save_model, write_corpus

HOOK = "blocks.1.hook_resid_post"
SMALL = ["--n-explain", 4, "--n-test", 4, "--n-random", 3, "--n-hard", 3, "--dtype", "float32"]


@pytest.fixture(scope="module")
def analysed_sae(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    model = save_model(root / "model", hidden=32)
    corpus = write_corpus(root / "corpus.jsonl", n_docs=400)
    code, _, err = run(
        "train", "--run-dir", root / "run", "--model", model, "--data", corpus, "--no-eval", "--dtype",
        "float32", "--tokens", 1024, "--batch-size", 128, "--width", 32, "--k", 4, "--hook", HOOK,
        "--context-size", 32,
    )  # fmt: skip
    assert code == 0, err
    sae = root / "run" / "saes" / "topk-k4-w32"
    code, _, err = run("analyze", sae, "--dtype", "float32", "--tokens", 1024)
    assert code == 0, err
    return sae


def test_explain_writes_scored_labels_and_resumes(analysed_sae):
    code, out, err = run("explain", analysed_sae, "--features", 2, "--scorer", "embedding", *SMALL)
    assert code == 0, err
    assert "2 latents (2 explained now)" in out and "embedding" in out
    with FeatureStore(analysed_sae / "features.db", create=False) as store:
        labelled = [i for i in range(32) if store.explanations(i)]
        assert len(labelled) == 2
        for idx in labelled:
            (label,) = store.explanations(idx)
            assert label["kind"] == "auto" and label["text"]
            assert label["source"]["prompt_version"] and label["source"]["seed"] == 0
            score = label["scores"]["embedding"]
            assert 0.0 <= score["score"] <= 1.0 and score["chance"] == 0.5
            assert score["shuffled"] is not None and score["ci_low"] <= score["score"] <= score["ci_high"]
    # the same settings again: nothing is redone
    code, out, err = run("explain", analysed_sae, "--features", 2, "--scorer", "embedding", *SMALL)
    assert code == 0, err
    assert "2 latents (0 explained now)" in out
    with FeatureStore(analysed_sae / "features.db", create=False) as store:
        assert sum(len(store.explanations(i)) for i in range(32)) == 2


def test_explain_refuses_bad_input(analysed_sae, tmp_path):
    assert "unknown LM client spec" in refused("explain", analysed_sae, "--judge", "gpt4", *SMALL)
    assert "saelab analyze" in refused("explain", analysed_sae, "--db", tmp_path / "none.db", *SMALL)
    assert "latent 999" in refused("explain", analysed_sae, "--feature", 999, "--feature", 1, *SMALL)
    message = refused(
        "explain", analysed_sae, "--judge", "openai:m@http://127.0.0.1:9/v1", "--scorer", "embedding",
        "--features", 2, "--db", analysed_sae / "features.db", "--redo", *SMALL,
    )  # fmt: skip
    assert "127.0.0.1:9" in message


def test_self_explanations_are_stored_and_scored(analysed_sae):
    code, out, err = run(
        "explain", analysed_sae, "--method", "self", "--features", 2, "--scorer", "embedding",
        "--explanations", 2, "--self-layer", 0, "--self-scale", 1, "--self-scale", 4, *SMALL,
    )  # fmt: skip
    assert code == 0, err
    with FeatureStore(analysed_sae / "features.db", create=False) as store:
        labels = [e for i in range(32) for e in store.explanations(i) if e["kind"] == "self"]
    failures = out.count("(explain)")
    assert len(labels) + failures == 4  # two samples for each of two latents, junk ones recorded
    for label in labels:
        source = label["source"]
        assert source["method"] == "self" and source["layer"] == 0 and source["scale"] in (1.0, 4.0)
        assert [p["scale"] for p in source["sweep"]] == [0.0, 1.0, 4.0]
        assert "embedding" in label["scores"] and label["scores"]["embedding"]["chance"] == 0.5


def test_human_labels_are_scored(analysed_sae):
    with FeatureStore(analysed_sae / "features.db", create=False) as store:
        live = [r["idx"] for r in store.list_features(sort="density", limit=2, include_dead=False)]
        for i, idx in enumerate(live):
            store.set_explanation(idx, f"w{i} and w{i + 1}")
    code, out, err = run("explain", analysed_sae, "--method", "human", "--features", 2, "--scorer", "detection",
                         *SMALL)  # fmt: skip
    assert code == 0, err
    with FeatureStore(analysed_sae / "features.db", create=False) as store:
        for idx in live:
            (human,) = [e for e in store.explanations(idx) if e["kind"] == "human"]
            assert human["scores"]["detection"]["chance"] == 0.5


def test_dreams_are_stored_and_shown(analysed_sae):
    code, out, err = run(
        "explain", analysed_sae, "--method", "dream", "--features", 2, "--dream-iterations", 2,
        "--dream-children", 2, "--dream-length", 4, "--dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    assert "2 latents dreamed (2 now)" in out and "dataset max" in out
    with FeatureStore(analysed_sae / "features.db", create=False) as store:
        dreamed = [i for i in range(32) if store.dreams(i)]
        assert len(dreamed) == 2 and all(len(d["token_ids"]) == 4 for i in dreamed for d in store.dreams(i))
    code, out, err = run(
        "explain", analysed_sae, "--method", "dream", "--features", 2, "--dream-iterations", 2,
        "--dream-children", 2, "--dream-length", 4, "--dtype", "float32",
    )  # fmt: skip
    assert code == 0 and "(0 now)" in out  # resumed: nothing redone
    assert "--method 'robot' is unknown" in refused("explain", analysed_sae, "--method", "robot")
    assert "--dream-position 'first'" in refused(
        "explain", analysed_sae, "--method", "dream", "--dream-position", "first"
    )
