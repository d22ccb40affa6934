"""explain_features end to end on the tiny analysed store with the real LocalClient: what lands in the
store (explanations with provenance, scores with controls), resume, redo, byte-identical reruns, and
the recorded failures."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from saelab.analysis.store import FeatureStore, flagged
from saelab.errors import DataError
from saelab.explain.clients import LocalClient
from saelab.explain.explainer import PROMPT_VERSION
from saelab.explain.pipeline import ExplainConfig, explain_features, score_explanations

SMALL = dict(n_features=3, n_explain=4, n_test=4, n_random=4, n_hard=4, max_new_tokens=6, n_bootstrap=100)


@pytest.fixture(scope="module")
def client(analysed):
    return LocalClient(lm=analysed[0], batch_size=8)


def fresh(analysed, tmp_path, name="features.db"):
    path = tmp_path / name
    shutil.copy(analysed[2], path)
    return path


class Interrupting:
    """The local client, failing on its `fail_at`-th logprobs call (a judge crashing mid-run)."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def generate(self, *args, **kwargs):
        return self.inner.generate(*args, **kwargs)

    def logprobs(self, prompts, candidates):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner.logprobs(prompts, candidates)

    def embed(self, texts):
        return self.inner.embed(texts)

    def describe(self):
        return self.inner.describe()


class Junk:
    """An explainer that answers nothing usable."""

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, seed=0):
        return ["..." for _ in prompts]

    def describe(self):
        return {"kind": "junk"}


def test_explain_features_writes_labels_and_controlled_scores(analysed, client, tmp_path):
    lm, sae, _ = analysed
    path = fresh(analysed, tmp_path)
    cfg = ExplainConfig(**SMALL)
    summary = explain_features(path, lm, sae, client, client, cfg, progress=True)
    with FeatureStore(path) as store:
        top = [r["idx"] for r in store.list_features(sort="density", limit=3, include_dead=False)]
        assert summary["features"] == summary["explained"] == top and summary["skipped"] == []
        assert summary["scored"] == 3 * 4 and summary["failures"] == []
        for idx in top:
            (e,) = store.explanations(idx)
            assert e["kind"] == "auto" and e["text"].strip()
            source = e["source"]
            assert source["explainer"] == client.describe() and source["prompt_version"] == PROMPT_VERSION
            assert source["config"] == cfg.to_dict() and source["seed"] == 0 and source["settings_key"]
            assert source["example_ids"] == source["examples"]["explain"] and len(source["example_ids"]) == 4
            assert set(e["scores"]) == {"detection", "fuzzing", "embedding", "surprisal"}
            for name, s in e["scores"].items():
                assert s["chance"] == 0.5 and 0 <= s["shuffled"] <= 1 and s["n"] > 0
                assert s["flagged"] == flagged(s["score"], s["shuffled"], s["ci_low"], s["chance"])
                assert s["flagged"] == summary["scores"][idx][0][name]["flagged"]
                shuffled_text = s["details"]["shuffled_explanation"]
                others = {store.explanations(o)[0]["text"] for o in top if o != idx}
                assert shuffled_text in others
        before = store.dump()
    # a finished run is a no-op
    again = explain_features(path, lm, sae, client, client, cfg, progress=False)
    assert again["skipped"] == top and again["explained"] == [] and again["scored"] == 0
    with FeatureStore(path) as store:
        assert store.dump() == before
    # the same seed on another copy gives byte-identical scores and labels
    other = fresh(analysed, tmp_path, "other.db")
    explain_features(other, lm, sae, client, client, cfg, progress=False)
    with FeatureStore(other) as store:
        dump = store.dump()
    assert dump["scores"] == before["scores"]
    labels = [r[:4] for r in dump["explanations"]]  # id, feature, kind, text (not the creation time)
    assert labels == [r[:4] for r in before["explanations"]]
    # redo explains and scores anew beside the old ones
    redo = explain_features(path, lm, sae, client, client, cfg, redo=True, progress=False)
    assert redo["explained"] == top and redo["scored"] == 12
    with FeatureStore(path) as store:
        assert all(len(store.explanations(i)) == 2 for i in top)


def test_an_interrupted_run_resumes_to_the_same_scores(analysed, client, tmp_path):
    lm, sae, _ = analysed
    cfg = ExplainConfig(**SMALL, scorers=("detection", "surprisal"))
    whole = fresh(analysed, tmp_path, "whole.db")
    explain_features(whole, lm, sae, client, client, cfg, progress=False)
    path = fresh(analysed, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        explain_features(path, lm, sae, client, Interrupting(client, fail_at=4), cfg, progress=False)
    with FeatureStore(path) as store:
        partial = len(store.dump()["scores"])
    assert 0 < partial < 6
    resumed = explain_features(path, lm, sae, client, client, cfg, progress=False)
    assert resumed["explained"] == [] and resumed["scored"] == 6 - partial
    with FeatureStore(path) as a, FeatureStore(whole) as b:
        assert a.dump()["scores"] == b.dump()["scores"]


def test_chosen_features_failures_and_refusals(analysed, client, tmp_path):
    lm, sae, _ = analysed
    path = fresh(analysed, tmp_path)
    with FeatureStore(path) as store:
        live = [
            r["idx"] for r in store.list_features(sort="idx", descending=False, limit=2, include_dead=False)
        ]
    junk = explain_features(
        path, lm, sae, Junk(), client, ExplainConfig(**SMALL, features=live), progress=False
    )
    assert [f["feature"] for f in junk["failures"]] == live and junk["scored"] == 0
    assert all(f["stage"] == "explain" and f["raw"] == "..." for f in junk["failures"])
    with FeatureStore(path) as store:
        assert store.dump()["explanations"] == []
    with pytest.raises(DataError, match="at least two latents"):
        explain_features(
            path, lm, sae, client, client, ExplainConfig(**SMALL, features=live[:1]), progress=False
        )
    with pytest.raises(DataError, match="latent 4096"):
        explain_features(path, lm, sae, client, client, ExplainConfig(features=[4096]), progress=False)
    with pytest.raises(DataError, match="unknown scorer"):
        ExplainConfig(scorers=("detection", "simulation"))
    with pytest.raises(DataError, match="n_test"):
        ExplainConfig(n_test=0)
    # scoring only (no scorers): labels are written, nothing scored, one latent is enough
    only = explain_features(
        path, lm, sae, client, client, ExplainConfig(**SMALL, features=live[:1], scorers=()), progress=False
    )
    assert only["explained"] == live[:1] and only["scored"] == 0


def test_explaining_latents_together_gives_what_one_at_a_time_gives(analysed, client):
    """The pipeline sends a group of latents' prompts in one generate call; each label is the one a
    call of its own gives (greedy decoding of left-padded prompts on a float32 model)."""
    from saelab.explain.examples import build_examples
    from saelab.explain.explainer import Explainer

    lm, sae, store_path = analysed
    explainer = Explainer(client, max_new_tokens=6)
    with FeatureStore(store_path) as store:
        idxs = [r["idx"] for r in store.list_features(sort="density", limit=3, include_dead=False)]
        sets = [build_examples(store, i, lm, sae, 4, 4, 2, 2, seed=0).explain for i in idxs]
    together = explainer.explain_many(sets, n=1, seed=0)
    alone = [explainer.explain(s, n=1, seed=0) for s in sets]
    assert [[r.raw for r in rs] for rs in together] == [[r.raw for r in rs] for rs in alone]
    assert [rs[0].source for rs in together] == [rs[0].source for rs in alone]
    assert together[0][0].source["method"] == "auto"


def test_stored_labels_of_any_kind_are_scored_beside_the_same_controls(analysed, client, tmp_path):
    lm, sae, _ = analysed
    path = fresh(analysed, tmp_path)
    with FeatureStore(path) as store:
        top = [r["idx"] for r in store.list_features(sort="density", limit=3, include_dead=False)]
        for i, idx in enumerate(top):
            store.add_explanation(idx, f"w{10 + i} words", "human", {"by": "test"})
    cfg = ExplainConfig(**SMALL, scorers=("detection", "embedding"))
    summary = score_explanations(path, lm, sae, client, cfg, kinds=("human",), progress=False)
    assert summary["features"] == top and summary["scored"] == 6 and summary["explained"] == []
    with FeatureStore(path) as store:
        for idx in top:
            (e,) = store.explanations(idx)
            assert set(e["scores"]) == {"detection", "embedding"}
            shuffled = e["scores"]["detection"]["details"]["shuffled_explanation"]
            assert shuffled != e["text"] and shuffled.endswith(" words")
        before = store.dump()
    again = score_explanations(path, lm, sae, client, cfg, kinds=("human",), progress=False)
    assert again["scored"] == 0  # resumable: nothing to redo
    with FeatureStore(path) as store:
        assert store.dump() == before
    # auto labels are not touched when only human ones are asked for, and vice versa
    explain_features(path, lm, sae, client, client, ExplainConfig(**SMALL, scorers=()), progress=False)
    only_human = score_explanations(path, lm, sae, client, cfg, kinds=("human",), progress=False)
    assert only_human["scored"] == 0
    with pytest.raises(DataError, match="kinds must be"):
        score_explanations(path, lm, sae, client, cfg, kinds=("robot",), progress=False)
    with pytest.raises(DataError, match="at least two latents"):
        score_explanations(path, lm, sae, client, ExplainConfig(**SMALL, features=top[:1]), kinds=("human",))


def test_a_latent_with_no_examples_is_a_recorded_failure_and_writes_nothing(analysed, client, tmp_path):
    lm, sae, _ = analysed
    path = fresh(analysed, tmp_path)
    with FeatureStore(path) as store:
        live = [r["idx"] for r in store.list_features(sort="density", limit=3, include_dead=False)]
    dead, live = live[0], live[1:]
    with sqlite3.connect(path) as db:  # a latent whose examples were never stored
        db.execute("DELETE FROM examples WHERE feature = ?", (dead,))
    summary = explain_features(
        path, lm, sae, client, client, ExplainConfig(**SMALL, features=[dead, *live]), progress=False
    )
    assert {"feature": dead, "stage": "examples", "error": "no activating examples stored"} in summary[
        "failures"
    ]
    assert summary["explained"] == live
    with FeatureStore(path) as store:
        assert store.explanations(dead) == [] and all(store.explanations(i) for i in live)


@pytest.mark.parametrize("fault", ["unreachable", "bad_key", "empty", "junk", "no_logprobs"])
def test_a_failing_endpoint_is_a_clear_error_that_leaves_the_store_whole(
    analysed, client, tmp_path, fault, monkeypatch
):
    """An endpoint that cannot be reached, refuses the key, or answers nothing or junk stops the run with
    a ClientError; what was written before (whole labels, whole scores) stays, nothing is half-written,
    and a rerun with a working judge finishes with what an uninterrupted run writes."""
    from saelab.errors import ClientError
    from saelab.explain.clients import make_client
    from tests.openai_server import closed_port, serve

    lm, sae, _ = analysed
    cfg = ExplainConfig(**SMALL, scorers=("detection", "embedding"))
    whole = fresh(analysed, tmp_path, "whole.db")
    explain_features(whole, lm, sae, client, client, cfg, progress=False)
    path = fresh(analysed, tmp_path)
    with serve(client, model="tiny", api_key="sk-right") as server:
        url = f"http://127.0.0.1:{closed_port()}/v1" if fault == "unreachable" else server.url
        if fault in ("empty", "junk", "no_logprobs"):
            server.faults.mode = fault
        monkeypatch.setenv("SAELAB_TEST_JUDGE_KEY", "sk-wrong" if fault == "bad_key" else "sk-right")
        judge = make_client(
            f"openai:tiny@{url}", api_key_env="SAELAB_TEST_JUDGE_KEY", max_retries=0, timeout=10
        )
        with pytest.raises(ClientError):
            explain_features(path, lm, sae, client, judge, cfg, progress=False)
    with FeatureStore(path) as store:  # opens: a valid store
        dump = store.dump()
    assert len(dump["explanations"]) == 3  # the labels were written whole before the judge was called
    assert all(row[3] for row in dump["explanations"])
    resumed = explain_features(path, lm, sae, client, client, cfg, progress=False)
    assert resumed["explained"] == []  # nothing explained twice
    with FeatureStore(path) as a, FeatureStore(whole) as b:
        assert a.dump()["scores"] == b.dump()["scores"]


def test_the_http_client_gives_the_labels_and_scores_the_local_one_gives(analysed, client, tmp_path):
    """Explainer and judge through an OpenAI-compatible server that wraps the same local model: the
    same labels and, up to the server's float rounding, the same scores and controls."""
    from saelab.explain.clients import make_client
    from tests.openai_server import serve

    lm, sae, _ = analysed
    cfg = ExplainConfig(**SMALL)
    local_db, http_db = fresh(analysed, tmp_path, "local.db"), fresh(analysed, tmp_path, "http.db")
    explain_features(local_db, lm, sae, client, client, cfg, progress=False)
    with serve(client, model="tiny") as server:
        http = make_client(f"openai:tiny@{server.url}", max_retries=0, timeout=30)
        explain_features(http_db, lm, sae, http, http, cfg, progress=False)
    with FeatureStore(local_db) as a, FeatureStore(http_db) as b:
        n = a.count_features()
        left = [e for i in range(n) for e in a.explanations(i)]
        right = [e for i in range(n) for e in b.explanations(i)]
    assert [(e["feature"], e["text"]) for e in left] == [(e["feature"], e["text"]) for e in right] != []
    for x, y in zip(left, right, strict=True):
        assert set(x["scores"]) == set(y["scores"]) == set(cfg.scorers)
        for name, s in x["scores"].items():
            for field in ("score", "shuffled", "chance"):
                assert s[field] == pytest.approx(y["scores"][name][field], abs=1e-3), (name, field)
