"""saelab.analysis.store: schema checks, paging and search queries, and all-or-nothing writes."""

from __future__ import annotations

import json
import math
import sqlite3
import warnings

import pytest

import saelab.analysis.store as store_module
from saelab.analysis.store import SCHEMA_VERSION, FeatureStore, FeatureStoreError, flagged

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


# -- schema 2: explanations of several kinds, their scores, and the upgrade from schema 1 --------------

# saelab/analysis/store.py at schema version 1, verbatim (git show at the commit before schema 2).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    idx INTEGER PRIMARY KEY, density REAL NOT NULL, mean_act REAL NOT NULL, max_act REAL NOT NULL,
    n_active INTEGER NOT NULL, hist_json TEXT, quantile_edges_json TEXT, logits_pos_json TEXT,
    logits_neg_json TEXT, logit_hist_json TEXT, neighbours_json TEXT
);
CREATE INDEX IF NOT EXISTS features_density ON features (density, idx);
CREATE INDEX IF NOT EXISTS features_max_act ON features (max_act, idx);
CREATE INDEX IF NOT EXISTS features_mean_act ON features (mean_act, idx);
CREATE INDEX IF NOT EXISTS features_n_active ON features (n_active, idx);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('top', 'quantile')), quantile INTEGER,
    rank INTEGER NOT NULL, value REAL NOT NULL, context_id INTEGER NOT NULL, position INTEGER NOT NULL,
    token INTEGER NOT NULL, tokens_json TEXT NOT NULL, values_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_feature ON examples (feature, kind);
CREATE INDEX IF NOT EXISTS examples_token ON examples (kind, token);
CREATE TABLE IF NOT EXISTS coactivation (
    feature INTEGER NOT NULL, other INTEGER NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (feature, other)
);
CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS explanations (feature INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY CHECK (id = 0), status TEXT NOT NULL, batches INTEGER NOT NULL,
    contexts INTEGER NOT NULL, tokens INTEGER NOT NULL, state_file TEXT
);
"""


def _v1_store(path) -> None:
    """A schema 1 file written with the v1 SQL: three latents, examples, vocab, coactivation, two labels."""
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.executemany("INSERT INTO meta VALUES (?, ?)", [
            ("format", json.dumps("saelab-feature-store")), ("schema_version", "1"),
            ("hook_name", json.dumps("blocks.0.hook_resid_post")), ("hist_edges", json.dumps([0.1, 1.0])),
        ])  # fmt: skip
        db.executemany(
            "INSERT INTO features (idx, density, mean_act, max_act, n_active, hist_json) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (0, 0.5, 1.0, 2.0, 4, "[1, 2, 1]"),
                (1, 0.0, 0.0, 0.0, 0, "[0, 0, 0]"),
                (2, 0.25, 3.0, 4.0, 2, None),
            ],
        )
        db.execute(
            "INSERT INTO examples VALUES (0, 'top', NULL, 0, 2.0, 3, 1, 5, '[-1, 5, 6]', '[0, 2.0, 0.5]')"
        )
        db.executemany(
            "INSERT INTO vocab VALUES (?, ?)", enumerate(["<bos>", "a", "b", "c", "d", "dog", "s"])
        )
        db.execute("INSERT INTO coactivation VALUES (0, 2, 7)")
        db.executemany("INSERT INTO explanations VALUES (?, ?)", [(0, "dogs"), (2, "Fires on 100% of c")])
        db.execute("INSERT INTO progress VALUES (0, 'complete', 1, 2, 3, NULL)")


def _raw(path) -> dict:
    """Everything in an SQLite file, read without saelab: its schema and every table's rows."""
    with sqlite3.connect(path) as db:
        tables = [
            r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        return {
            "schema": db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
            **{t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables},
        }


def test_a_v1_store_is_upgraded_in_place_and_keeps_everything(tmp_path):
    path = tmp_path / "v1.db"
    _v1_store(path)
    before = _raw(path)
    with pytest.warns(
        UserWarning,
        match=rf"schema version 1 feature store: upgrading it in place to version {SCHEMA_VERSION}",
    ):
        store = FeatureStore(path, create=False)
    with store:
        assert store.meta()["schema_version"] == SCHEMA_VERSION
        assert store.meta()["hook_name"] == "blocks.0.hook_resid_post"
        after = _raw(path)
        for table in ("features", "examples", "vocab", "coactivation", "progress"):
            assert after[table] == before[table], table
        assert store.feature(0)["hist"] == [1, 2, 1] and store.feature(0)["coactivation"] == [
            {"other": 2, "count": 7}
        ]
        assert store.examples(0)[0]["tokens"] == [-1, 5, 6]
        assert [(e["feature"], e["kind"], e["text"]) for i in range(3) for e in store.explanations(i)] == [
            (0, "human", "dogs"), (2, "human", "Fires on 100% of c"),
        ]  # fmt: skip
        assert store.explanations(0)[0]["source"] == {"migrated_from_schema": 1}
        assert (
            store.feature(2)["explanation"] == "Fires on 100% of c"
            and store.feature(1)["explanation"] is None
        )
        assert [r["idx"] for r in store.search_explanations("100%")] == [2]
        store.set_explanation(0, "dog tokens")  # the v1 API still works on the upgraded file
        assert [e["text"] for e in store.explanations(0)] == ["dog tokens"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second open is silent: the file is the current version now
        with FeatureStore(path, create=False) as again:
            assert again.feature(0)["explanation"] == "dog tokens"


@pytest.mark.parametrize(
    "error", [RuntimeError("killed mid-upgrade"), sqlite3.OperationalError("disk I/O error")]
)
def test_a_failed_upgrade_leaves_the_v1_file_as_it_was(tmp_path, monkeypatch, error):
    path = tmp_path / "v1.db"
    _v1_store(path)
    before = _raw(path)

    def crash(db, version):  # the migration's last step, after every table was rebuilt
        raise error

    monkeypatch.setattr(store_module, "_set_version", crash)
    expected = (
        (FeatureStoreError, "unchanged") if isinstance(error, sqlite3.Error) else (RuntimeError, "killed")
    )
    with pytest.warns(UserWarning, match="upgrading"), pytest.raises(expected[0], match=expected[1]):
        FeatureStore(path, create=False)
    assert _raw(path) == before  # still schema 1, the old explanations table, no scores table
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="upgrading"), FeatureStore(path, create=False) as store:
        assert store.feature(0)["explanation"] == "dogs" and store.meta()["schema_version"] == SCHEMA_VERSION


# saelab/analysis/store.py's tables added at schema version 2, verbatim (what a v2 file holds beside v1's).
V2_TABLES = """
CREATE TABLE IF NOT EXISTS explanations (
    id INTEGER PRIMARY KEY, feature INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('human', 'auto', 'self')), text TEXT NOT NULL,
    source_json TEXT NOT NULL, created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS explanations_feature ON explanations (feature, kind, created);
CREATE TABLE IF NOT EXISTS scores (
    explanation_id INTEGER NOT NULL, scorer TEXT NOT NULL, score REAL NOT NULL, chance REAL NOT NULL,
    shuffled REAL NOT NULL, ci_low REAL, ci_high REAL, n INTEGER, details_json TEXT,
    PRIMARY KEY (explanation_id, scorer)
);
CREATE INDEX IF NOT EXISTS scores_scorer ON scores (scorer, score, explanation_id);
"""


def _v2_store(path) -> None:
    """A schema 2 file written with the v2 SQL: the v1 content, an auto label with a score."""
    _v1_store(path)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE explanations")
        db.executescript(V2_TABLES)
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        db.execute(
            "INSERT INTO explanations VALUES (7, 0, 'auto', 'dog words', '{\"seed\": 0}', '2026-01-01T00:00:00')"
        )
        db.execute("INSERT INTO scores VALUES (7, 'detection', 0.8, 0.5, 0.55, 0.7, 0.9, 20, NULL)")


def test_a_v2_store_gains_the_dreams_table_and_keeps_everything(tmp_path):
    path = tmp_path / "v2.db"
    _v2_store(path)
    before = _raw(path)
    with pytest.warns(UserWarning, match=rf"schema version 2 feature store: upgrading it in place to version {SCHEMA_VERSION} "
                      r"\(a table for dreamed prompts is added; .*nothing is lost\)"):  # fmt: skip
        store = FeatureStore(path, create=False)
    with store:
        after = _raw(path)
        for table in ("features", "examples", "vocab", "coactivation", "progress", "explanations", "scores"):
            assert after[table] == before[table], table
        assert store.meta()["schema_version"] == SCHEMA_VERSION and store.dreams(0) == []
        assert store.best_explanation(0)["scores"]["detection"]["score"] == 0.8
        store.set_dreams(0, [{"token_ids": [5, 6], "text": "dog s", "activation": 2.5, "cross_entropy": 3.0,
                              "lam": 1.0}], run_key="k")  # fmt: skip
        assert [d["text"] for d in store.dreams(0)] == ["dog s"]


def test_a_failed_v2_upgrade_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "v2.db"
    _v2_store(path)
    before = _raw(path)

    def crash(db, version):
        raise sqlite3.OperationalError("disk full")

    monkeypatch.setattr(store_module, "_set_version", crash)
    with pytest.warns(UserWarning, match="upgrading"), pytest.raises(FeatureStoreError, match="unchanged"):
        FeatureStore(path, create=False)
    assert _raw(path) == before


def test_dreams_are_stored_per_run_and_a_rerun_replaces_its_own(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        front = [
            {"token_ids": [1, 2], "text": "a b", "activation": 3.0, "cross_entropy": 5.0, "lam": 0.1},
            {"token_ids": [3], "text": "c", "activation": 1.0, "cross_entropy": 2.0, "lam": 10.0},
        ]
        ids = store.set_dreams(1, front, run_key="run-a", source={"seed": 0})
        assert len(ids) == 2
        got = store.dreams(1)
        assert [d["text"] for d in got] == ["c", "a b"]  # by cross-entropy within a run
        assert got[0]["source"] == {"seed": 0} and got[0]["token_ids"] == [3] and got[0]["run_key"] == "run-a"
        store.set_dreams(1, front[:1], run_key="run-a")  # the same run again: replaces
        assert [d["text"] for d in store.dreams(1)] == ["a b"]
        store.set_dreams(1, front[1:], run_key="run-b")  # another run: kept beside
        assert {d["run_key"] for d in store.dreams(1)} == {"run-a", "run-b"}
        assert [d["text"] for d in store.dreams(1, run_key="run-b")] == ["c"]
        assert store.dreams(2) == []
        for bad, message in [
            ({"token_ids": "ab", "text": "x", "activation": 1.0, "cross_entropy": 1.0}, "token_ids"),
            ({"token_ids": [1], "text": None, "activation": 1.0, "cross_entropy": 1.0}, "text"),
            ({"token_ids": [1], "text": "x", "activation": float("nan"), "cross_entropy": 1.0}, "activation"),
        ]:
            with pytest.raises(FeatureStoreError, match=message):
                store.set_dreams(1, [bad], run_key="run-c")
        with pytest.raises(FeatureStoreError, match="does not exist"):
            store.set_dreams(10_000, front, run_key="run-a")
        assert store.dreams(1, run_key="run-c") == []  # a refused write leaves nothing


def test_a_newer_store_is_refused(tmp_path):
    path = tmp_path / "new.db"
    FeatureStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    before = _raw(path)
    with pytest.raises(
        FeatureStoreError,
        match=f"schema version {SCHEMA_VERSION + 1}, but this saelab reads version {SCHEMA_VERSION}",
    ):
        FeatureStore(path)
    assert _raw(path) == before


def test_numpy_numbers_are_taken_and_stored_as_python_ones(tmp_path):
    np = pytest.importorskip("numpy")
    with _filled(tmp_path / "f.db") as store:
        e = store.add_explanation(np.int64(1), "np label", "auto", {"seed": 1})
        store.set_score(np.int64(e), "detection", np.float32(0.75), np.float64(0.5), 0.5, n=np.int64(12))
        assert store.explanations(1)[0]["scores"]["detection"]["n"] == 12
        assert store.best_explanation(1)["scores"]["detection"]["score"] == 0.75
        with pytest.raises(FeatureStoreError, match="score must be a finite number"):
            store.set_score(e, "detection", np.float32("nan"), 0.5, 0.5)


def test_flagged_means_not_beating_the_shuffled_control():
    assert flagged(0.5, 0.5) and flagged(0.4, 0.5) and not flagged(0.6, 0.5)
    # at chance is flagged even above a worse shuffled score; above both is not
    assert flagged(0.5, 0.495, 0.5, chance=0.5) and not flagged(0.6, 0.5, 0.55, chance=0.5)
    assert (
        flagged(0.6, 0.5, ci_low=0.5)
        and flagged(0.6, 0.5, ci_low=0.45)
        and not flagged(0.6, 0.5, ci_low=0.51)
    )


def test_explanations_of_every_kind_with_scores_and_the_best_one(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        assert store.explanations(1) == [] and store.best_explanation(1) is None
        human = store.add_explanation(1, "first human", "human")
        auto = store.add_explanation(
            1, "auto label", "auto", {"explainer_model": "m", "seed": 3, "example_ids": [1, 2]}
        )
        assert store.best_explanation(1)["id"] == human  # nothing scored: the newest human one
        store.set_explanation(2, None)
        own = store.add_explanation(2, "a self label", "self")
        newest = store.add_explanation(2, "an auto label", "auto")
        assert (
            store.best_explanation(2)["id"] == newest and store.feature(2)["explanation"] == "an auto label"
        )
        assert [e["id"] for e in store.explanations(2)] == [newest, own]
        store.set_score(own, "detection", 0.7, 0.5, 0.6, 0.65, 0.75, 50, {"per_example": [1, 0, 1]})
        assert store.best_explanation(2)["id"] == own  # a detection score beats no score
        store.set_score(auto, "detection", 0.8, 0.5, 0.55, n=40)
        store.set_score(auto, "fuzzing", 0.5, 0.5, 0.6)
        store.set_score(human, "detection", 0.75, 0.5, 0.5)
        first = store.best_explanation(1)
        assert first["id"] == auto and first["source"] == {
            "explainer_model": "m",
            "seed": 3,
            "example_ids": [1, 2],
        }
        assert first["scores"]["detection"] == {"score": 0.8, "chance": 0.5, "shuffled": 0.55, "ci_low": None,
                                                "ci_high": None, "n": 40, "details": None, "flagged": False}  # fmt: skip
        assert first["scores"]["fuzzing"]["flagged"] is True  # 0.5 does not beat its shuffled 0.6
        assert store.explanations(2)[0]["scores"]["detection"]["details"] == {"per_example": [1, 0, 1]}
        assert store.feature(1)["explanation"] == "first human"  # the label stays the human one
        assert [e["id"] for e in store.feature(1)["explanations"]] == [auto, human]
        store.set_score(auto, "detection", 0.6, 0.5, 0.55)  # replaces the earlier detection score
        assert store.best_explanation(1)["id"] == human and len(store.explanations(1)[1]["scores"]) == 2
        store.set_explanation(1, "second human")  # replaces the human label (and its scores), keeps others
        assert [(e["kind"], e["text"], bool(e["scores"])) for e in store.explanations(1)] == [
            ("auto", "auto label", True), ("human", "second human", False),
        ]  # fmt: skip
        store.set_explanation(1, None)
        assert [e["kind"] for e in store.explanations(1)] == ["auto"] and store.feature(1)[
            "explanation"
        ] == "auto label"
        assert {r[0] for r in store.dump()["scores"]} == {own, auto}  # no scores left of removed labels
        store.write_results(_features(), _examples(), [], {"batches": 1, "contexts": 1, "tokens": 1})
        assert [e["id"] for e in store.explanations(1)] == [auto]  # a re-analysis keeps them


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: s.add_explanation(N, "x", "auto"), f"feature {N} does not exist"),
        (lambda s: s.add_explanation(2**70, "x", "auto"), "must be an integer"),
        (lambda s: s.add_explanation(1, "x", "robot"), "kind must be one of human, auto, self"),
        (lambda s: s.add_explanation(1, "  ", "auto"), "non-blank"),
        (lambda s: s.add_explanation(1, "x", "auto", {"seed": math.nan}), "JSON-serialisable"),
        (lambda s: s.add_explanation(1, "x", "auto", {"f": object()}), "JSON-serialisable"),
        (lambda s: s.set_explanation(N, "x"), f"feature {N} does not exist"),
        (lambda s: s.set_score(1, "detection", math.nan, 0.5, 0.5), "score must be a finite number"),
        (lambda s: s.set_score(1, "detection", 0.9, math.inf, 0.5), "chance must be a finite number"),
        (lambda s: s.set_score(1, "detection", 0.9, 0.5, None), "shuffled must be a finite number"),
        (lambda s: s.set_score(1, "detection", 0.9, 0.5, 0.5, ci_low=0.9, ci_high=0.8), "ci_low 0.9 is above"),
        (lambda s: s.set_score(1, "detection", 0.9, 0.5, 0.5, n=-1), "non-negative integer"),
        (lambda s: s.set_score(1, "", 0.9, 0.5, 0.5), "scorer must be"),
        (lambda s: s.set_score(99, "detection", 0.9, 0.5, 0.5), "explanation 99 does not exist"),
        (lambda s: s.set_score(2**70, "detection", 0.9, 0.5, 0.5), f"explanation {2**70} does not exist"),
        (lambda s: s.set_score("1", "detection", 0.9, 0.5, 0.5), "explanation id must be an integer"),
        (lambda s: s.list_features(min_score=math.nan), "min_score must be a finite number"),
    ],
)  # fmt: skip
def test_bad_explanation_writes_are_refused_and_change_nothing(tmp_path, call, message):
    with _filled(tmp_path / "f.db") as store:
        store.add_explanation(1, "x", "auto")
        before = store.dump()
        with pytest.raises(FeatureStoreError, match=message):
            call(store)
        assert store.dump() == before


def test_list_features_sorts_and_filters_by_the_best_detection_score(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        scored = {3: 0.9, 5: 0.6, 7: 0.75, 10: 0.8}  # 10 is dead
        for idx, score in scored.items():
            store.set_score(store.add_explanation(idx, f"label {idx}", "auto"), "detection", score, 0.5, 0.55)
            store.set_score(
                store.add_explanation(idx, f"worse {idx}", "self"), "detection", score / 2, 0.5, 0.55
            )
        store.add_explanation(4, "unscored", "auto")
        best_first = store.list_features(sort="score", limit=N)
        assert [r["idx"] for r in best_first[:4]] == [3, 10, 7, 5]
        assert [r["score"] for r in best_first[:4]] == [0.9, 0.8, 0.75, 0.6]
        assert [r["idx"] for r in best_first[4:]] == [i for i in range(N) if i not in scored]  # unscored last
        worst_first = store.list_features(sort="score", descending=False, limit=5)
        assert [r["idx"] for r in worst_first] == [5, 7, 10, 3, 0]
        top = best_first[0]
        assert top["best"]["text"] == "label 3" and top["best"]["scores"]["detection"]["flagged"] is False
        assert top["explanation"] == "label 3" and top["top_tokens"] == [1, 5]
        assert best_first[4]["best"] is None and best_first[4]["explanation"] is None
        assert next(r for r in best_first if r["idx"] == 4)["best"]["text"] == "unscored"
        good = store.list_features(sort="max_act", min_score=0.75, include_dead=False, limit=N)
        assert sorted(r["idx"] for r in good) == [3, 7] and store.count_features(min_score=0.75) == 3
        assert store.count_features(min_score=0.75, include_dead=False) == 2
        assert [r["max_act"] for r in good] == sorted((r["max_act"] for r in good), reverse=True)


def test_search_explanations_ranks_whole_words_then_scores(tmp_path):
    with _filled(tmp_path / "f.db") as store:
        store.set_explanation(1, "dogma and doctrine")  # 'dog' inside a word
        store.set_score(store.add_explanation(2, "hot dog stands", "auto"), "detection", 0.6, 0.5, 0.5)
        store.set_score(store.add_explanation(3, "the word dog", "auto"), "detection", 0.9, 0.5, 0.5)
        store.add_explanation(4, "Dog, unscored", "self")
        store.set_score(store.add_explanation(5, "underdogs", "auto"), "detection", 0.99, 0.5, 0.5)
        store.add_explanation(3, "dogs again", "auto")  # a second, weaker match for latent 3
        assert store.search_explanations("dog") == [
            {"idx": 3, "explanation": "the word dog"}, {"idx": 2, "explanation": "hot dog stands"},
            {"idx": 4, "explanation": "Dog, unscored"}, {"idx": 5, "explanation": "underdogs"},
            {"idx": 1, "explanation": "dogma and doctrine"},
        ]  # fmt: skip
        assert [r["idx"] for r in store.search_explanations("dog", limit=2)] == [3, 2]
