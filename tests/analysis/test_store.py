"""saelab.analysis.store: schema checks, paging and search queries, and all-or-nothing writes."""

from __future__ import annotations

import sqlite3

import pytest

from saelab.analysis.store import SCHEMA_VERSION, FeatureStore, FeatureStoreError

N = 30


def _features(n: int = N):
    for i in range(n):
        dead = i % 10 == 0
        yield {
            "idx": i,
            "density": 0.0 if dead else (i % 7) / 100 + i / 10_000,
            "mean_act": 1.0 + i,
            "max_act": 0.0 if dead else float((i * 13) % 31),
            "n_active": 0 if dead else i,
            "hist": [i, 0, 1],
            "neighbours": [[(i + 1) % n, 0.5]],
        }


def _examples(n: int = N):
    for i in range(n):
        for rank in range(2):
            token = 5 if (i, rank) == (3, 0) else 7 if i in (3, 4) and rank == 1 else 1
            yield {"feature": i, "kind": "top", "quantile": None, "rank": rank, "value": 2.0 - rank,
                   "context_id": rank, "position": 1, "token": token, "tokens": [1, token],
                   "values": [0.0, 2.0 - rank]}  # fmt: skip
        yield {"feature": i, "kind": "quantile", "quantile": 0, "rank": 0, "value": 0.1, "context_id": 9,
               "position": 1, "token": 6, "tokens": [1, 6], "values": [0.0, 0.1]}  # fmt: skip


def _filled(path) -> FeatureStore:
    store = FeatureStore(path)
    store.begin_analysis(
        {"config": {"top_k": 2}}, vocab=["<bos>", "the", "cat", "dog", "hot", " dog", "x", "dogma"]
    )
    progress = {"batches": 3, "contexts": 12, "tokens": 100}
    store.write_results(_features(), _examples(), [(1, 2, 5), (1, 3, 9)], progress)
    return store


def test_round_trip_of_one_feature(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        f = store.feature(1)
        assert f["hist"] == [1, 0, 1] and f["neighbours"] == [[2, 0.5]] and f["explanation"] is None
        assert f["coactivation"] == [{"other": 3, "count": 9}, {"other": 2, "count": 5}]
        assert store.feature(N) is None
        assert [e["rank"] for e in store.examples(1, "top")] == [0, 1]
        assert store.examples(1, "quantile")[0]["tokens"] == [1, 6]
        assert store.meta()["config"] == {"top_k": 2} and store.meta()["schema_version"] == SCHEMA_VERSION
        assert store.progress() == {"status": "complete", "batches": 3, "contexts": 12, "tokens": 100,
                                    "state_file": None}  # fmt: skip


def test_list_features_sorts_filters_and_pages(tmp_path):
    expected = sorted(_features(), key=lambda f: (-f["max_act"], f["idx"]))
    with _filled(tmp_path / "f.db") as store:
        page = store.list_features(sort="max_act", descending=True, offset=5, limit=7)
        assert [f["idx"] for f in page] == [f["idx"] for f in expected[5:12]]
        by_density = store.list_features(sort="density", descending=False, limit=N, include_dead=False)
        assert [f["density"] for f in by_density] == sorted(f["density"] for f in by_density)
        assert len(by_density) == N - 3 and all(f["n_active"] > 0 for f in by_density)
        window = store.list_features(min_density=0.02, max_density=0.04, limit=N)
        assert window and all(0.02 <= f["density"] <= 0.04 for f in window)
        assert store.count_features(min_density=0.02, max_density=0.04) == len(window)
        assert store.count_features() == N and store.count_features(include_dead=False) == N - 3
        with pytest.raises(ValueError, match="sort must be"):
            store.list_features(sort="density; DROP TABLE features")


def test_search_tokens_matches_the_activating_token_of_top_examples(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        hits = store.search_tokens("dog")  # tokens 5 (' dog') and 7 ('dogma')
        assert hits == [{"idx": 3, "matches": 2}, {"idx": 4, "matches": 1}]
        assert sorted(h["idx"] for h in store.search_tokens("the", limit=N)) == [
            i for i in range(N) if i != 3
        ]
        assert store.search_tokens("x") == []  # token 6 is only in quantile examples
        assert store.search_tokens("dogma") == [{"idx": 3, "matches": 1}, {"idx": 4, "matches": 1}]


def test_explanations_survive_a_rewrite_and_are_searchable(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        store.set_explanation(4, "Fires on 100% of dog tokens")
        store.set_explanation(5, "cats")
        assert store.feature(4)["explanation"] == "Fires on 100% of dog tokens"
        assert [r["idx"] for r in store.search_explanations("DOG")] == [4]
        assert [r["idx"] for r in store.search_explanations("100%")] == [4]
        assert store.search_explanations("1_0") == []  # LIKE wildcards are taken literally
        store.write_results(_features(), _examples(), [], {"batches": 1, "contexts": 1, "tokens": 1})
        assert store.list_features(sort="idx", descending=False, limit=6)[5]["explanation"] == "cats"
        store.set_explanation(5, None)
        assert store.feature(5)["explanation"] is None


def test_failed_write_keeps_the_previous_results(tmp_path):
    path = tmp_path / "f.db"
    with _filled(path) as store:
        before = store.dump()

        def broken():
            yield from _examples(3)
            raise RuntimeError("interrupted")

        with pytest.raises(RuntimeError, match="interrupted"):
            store.write_results(_features(5), broken(), [], {"batches": 9, "contexts": 9, "tokens": 9})
        assert store.dump() == before
    with FeatureStore(path) as reopened:
        assert reopened.dump() == before


def test_foreign_corrupt_and_wrong_version_files_are_refused(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("not a database at all, just some text that is long enough to have a header" * 20)
    with pytest.raises(FeatureStoreError, match="not a saelab feature store.*re-run"):
        FeatureStore(text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(FeatureStoreError, match="no meta table"):
        FeatureStore(other)
    old = tmp_path / "old.db"
    FeatureStore(old).close()
    with sqlite3.connect(old) as db:
        db.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(FeatureStoreError, match=f"schema version 0.*reads version {SCHEMA_VERSION}"):
        FeatureStore(old)
    with pytest.raises(FeatureStoreError, match="No feature store"):
        FeatureStore(tmp_path / "missing.db", create=False)
