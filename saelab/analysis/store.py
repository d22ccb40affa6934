"""The feature store: one SQLite file per analysed dictionary, and the only module of saelab with SQL.

Dashboards and search read this file instead of re-running the model. Schema (version
`SCHEMA_VERSION`; an older file is upgraded in place when opened, in one transaction, see `_MIGRATIONS`;
a newer version is refused):

* ``meta(key TEXT PRIMARY KEY, value TEXT)``: JSON values. ``format`` (always ``FORMAT``),
  ``schema_version``, and what the analysis wrote: ``dictionary``, ``model``, ``hook_name``,
  ``data``, ``config``, ``hist_edges`` (the activation histogram bin edges shared by all latents).
* ``features(idx INTEGER PRIMARY KEY, density, mean_act, max_act, n_active, hist_json,
  quantile_edges_json, logits_pos_json, logits_neg_json, logit_hist_json, neighbours_json)``:
  one row per latent, dead ones included (n_active = 0). Indexed on density and max_act.
* ``examples(feature, kind, quantile, rank, value, context_id, position, token, tokens_json,
  values_json)``: kind 'top' (quantile NULL, rank 0 = strongest) or 'quantile'. ``token`` is the
  id of the activating token (indexed, for `search_tokens`); ``tokens_json`` / ``values_json``
  the window of token ids (-1 = padding past the context) and this latent's activations on it.
* ``coactivation(feature, other, count)``: the latents firing most often on the same tokens.
* ``vocab(id INTEGER PRIMARY KEY, text)``: each token id decoded, for display and search.
* ``explanations(id INTEGER PRIMARY KEY, feature, kind, text, source_json, created)``: several per
  latent, kind 'human', 'auto' (auto-interp) or 'self' (self-explanation); ``source_json`` records what
  made the label (explainer model, prompt version, example ids, seed, settings); ``created`` is an ISO
  UTC time. Kept when an analysis is re-written.
* ``scores(explanation_id, scorer, score, chance, shuffled, ci_low, ci_high, n, details_json)``: one
  row per explanation and scorer ('detection', 'fuzzing', 'embedding', 'surprisal', ...), with its two
  controls measured the same way: ``chance`` (the baseline of that example mix) and ``shuffled`` (the
  score of another latent's label). A score is *flagged* (see `flagged`) when it does not beat
  ``shuffled``. The *best* explanation of a latent is the one with the highest detection score; with
  none scored, the newest human one; else the newest.
* ``dreams(id INTEGER PRIMARY KEY, feature, tokens_json, text, activation, cross_entropy, lam, run_key,
  source_json, created)``: prompts optimised to make a latent fire (fluent dreaming, EPO): one row per
  prompt on a run's Pareto front of activation against cross-entropy; ``run_key`` names the run's
  settings (a rerun with the same key replaces its rows), ``source_json`` holds the run's config,
  target, seed and timing. Kept when an analysis is re-written. (Added in schema 3.)
* ``members(feature, member, decoder_norm, logits_pos_json, logits_neg_json, logit_hist_json)``: a
  crosscoder's latents, one row per latent and member (model): ||d_i^m|| in the normalised space the
  crosscoder was trained in (what tags a latent; an example's activation times it is what the latent
  writes into that member), and the logit effects of d_i^m through that member's own unembedding.
  ``meta.members`` names the members. (Added in schema 4; empty for other dictionaries.)
* ``latent_diff(feature PRIMARY KEY, tag, delta_norm, cosine, nu_eps, nu_r, fired)``: model diffing of
  a two-member crosscoder (saelab.diffing): tag shared / a_only / b_only / other from Δnorm, the
  decoder cosine, and Latent Scaling's ν when known (NULL otherwise). Written by the analysis from the
  decoders and by `set_latent_diff` (``saelab diff``); ``meta.latent_diff`` records its source.
  Indexed on tag and on delta_norm. (Added in schema 4.)
* ``progress(id = 0, status, batches, contexts, tokens, state_file)``: 'running' while an
  analysis is under way (its accumulator state lives in ``state_file``), 'complete' after.

Every write is one transaction: an interrupted or failed write leaves the previous state.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import numbers
import re
import sqlite3
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from saelab.errors import FeatureStoreError

FORMAT = "saelab-feature-store"
SCHEMA_VERSION = 4
SORT_KEYS = ("density", "max_act", "mean_act", "n_active", "idx", "score", "delta_norm")
KINDS = ("human", "auto", "self")
DETECTION = "detection"  # the scorer that ranks explanations ("best") and sorts the feature list

_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY CHECK (id = 0), status TEXT NOT NULL, batches INTEGER NOT NULL,
    contexts INTEGER NOT NULL, tokens INTEGER NOT NULL, state_file TEXT
);
"""
# What schema 2 added to version 1 (whose explanations table was `(feature PRIMARY KEY, text)`).
_V2_TABLES = """
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
# What schema 3 added to version 2.
_V3_TABLES = """
CREATE TABLE IF NOT EXISTS dreams (
    id INTEGER PRIMARY KEY, feature INTEGER NOT NULL, tokens_json TEXT NOT NULL, text TEXT NOT NULL,
    activation REAL NOT NULL, cross_entropy REAL NOT NULL, lam REAL, run_key TEXT NOT NULL,
    source_json TEXT NOT NULL, created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dreams_feature ON dreams (feature, run_key);
"""
# What schema 4 added to version 3: crosscoder latents' members and model-diffing tags.
_V4_TABLES = """
CREATE TABLE IF NOT EXISTS members (
    feature INTEGER NOT NULL, member INTEGER NOT NULL, decoder_norm REAL NOT NULL, logits_pos_json TEXT,
    logits_neg_json TEXT, logit_hist_json TEXT, PRIMARY KEY (feature, member)
);
CREATE TABLE IF NOT EXISTS latent_diff (
    feature INTEGER PRIMARY KEY, tag TEXT NOT NULL, delta_norm REAL NOT NULL, cosine REAL, nu_eps REAL,
    nu_r REAL, fired INTEGER
);
CREATE INDEX IF NOT EXISTS latent_diff_tag ON latent_diff (tag, feature);
CREATE INDEX IF NOT EXISTS latent_diff_delta_norm ON latent_diff (delta_norm, feature);
"""
_SCHEMA += _V2_TABLES + _V3_TABLES + _V4_TABLES
_DIFF_FIELDS = ("tag", "delta_norm", "cosine", "nu_eps", "nu_r", "fired")

# The best explanation first: highest detection score, then human before others, then newest.
_BEST_ORDER = "s.score IS NULL, s.score DESC, e.kind = 'human' DESC, e.created DESC, e.id DESC"
_WITH_DETECTION = f"explanations e LEFT JOIN scores s ON s.explanation_id = e.id AND s.scorer = '{DETECTION}'"
_SCORE_FIELDS = ("score", "chance", "shuffled", "ci_low", "ci_high", "n")

_FEATURE_COLUMNS = (
    "idx", "density", "mean_act", "max_act", "n_active", "hist_json", "quantile_edges_json",
    "logits_pos_json", "logits_neg_json", "logit_hist_json", "neighbours_json",
)  # fmt: skip
_EXAMPLE_COLUMNS = (
    "feature", "kind", "quantile", "rank", "value", "context_id", "position", "token", "tokens_json",
    "values_json",
)  # fmt: skip
_JSON_FIELDS = {
    "hist_json": "hist",
    "quantile_edges_json": "quantile_edges",
    "logits_pos_json": "logits_pos",
    "logits_neg_json": "logits_neg",
    "logit_hist_json": "logit_hist",
    "neighbours_json": "neighbours",
    "tokens_json": "tokens",
    "values_json": "values",
}


def _decode_row(row: sqlite3.Row) -> dict:
    """A row as a dict with its JSON columns parsed (and renamed without the _json suffix)."""
    out = {}
    for key in row.keys():
        value = row[key]
        if key in _JSON_FIELDS:
            out[_JSON_FIELDS[key]] = None if value is None else json.loads(value)
        else:
            out[key] = value
    return out


def _encoded(row: dict, columns: tuple[str, ...]) -> tuple:
    """The row's values in column order, with lists/dicts for JSON columns dumped to text."""
    values = []
    for column in columns:
        value = row.get(_JSON_FIELDS.get(column, column), row.get(column))
        if column in _JSON_FIELDS and value is not None and not isinstance(value, str):
            value = json.dumps(value)
        values.append(value)
    return tuple(values)


def flagged(score: float, shuffled: float, ci_low: float | None = None, chance: float | None = None) -> bool:
    """Whether a score fails to beat its controls: it is at or below the shuffled score, or its
    confidence interval reaches down to it (another latent's label would do as well), or it is at or
    below chance (a constant judge at 0.5 would otherwise "beat" a shuffled 0.495)."""
    if chance is not None and score <= chance:
        return True
    return score <= shuffled or (ci_low is not None and ci_low <= shuffled)


def _now() -> str:
    """An ISO UTC time with microseconds: `created` orders a latent's explanations newest first."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _set_version(db: sqlite3.Connection, version: int) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (json.dumps(version),))


def _run_script(db: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2 inside the caller's transaction: each v1 label becomes a 'human' explanation."""
    db.execute("ALTER TABLE explanations RENAME TO explanations_v1")
    _run_script(db, _V2_TABLES)
    db.execute(
        "INSERT INTO explanations (feature, kind, text, source_json, created) "
        "SELECT feature, 'human', text, ?, ? FROM explanations_v1 ORDER BY feature",
        (json.dumps({"migrated_from_schema": 1}), _now()),
    )
    db.execute("DROP TABLE explanations_v1")
    _set_version(db, 2)


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Schema 2 -> 3 inside the caller's transaction: the dreams table (nothing else changes)."""
    _run_script(db, _V3_TABLES)
    _set_version(db, 3)


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Schema 3 -> 4 inside the caller's transaction: the crosscoder tables (nothing else changes)."""
    _run_script(db, _V4_TABLES)
    _set_version(db, 4)


# version -> the step to the next one; an old file runs every step from its version, in one transaction.
_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}
_WHAT_CHANGES = {
    1: "its explanations become 'human' ones",
    2: "a table for dreamed prompts is added",
    3: "tables for crosscoder members and model-diffing tags are added",
}


def _finite(name: str, value, optional: bool = False) -> float | None:
    """`value` as a float, refusing NaN, infinities and non-numbers with a message naming the field."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise FeatureStoreError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _member_values(member: dict) -> tuple:
    """One member of a latent as a `members` row's values after (feature, member)."""
    return (
        _finite("decoder_norm", member.get("decoder_norm")),
        *(None if member.get(k) is None else json.dumps(member[k]) for k in ("logits_pos", "logits_neg", "logit_hist")),
    )  # fmt: skip


def _diff_values(latent, diff: dict) -> tuple:
    """A latent's model-diffing figures as a `latent_diff` row; NaN or None ν (no data) become NULL."""
    tag = diff.get("tag")
    if not isinstance(tag, str) or not tag:
        raise FeatureStoreError(f"latent {latent}: tag must be a non-empty string, got {tag!r}")
    optional = []
    for name in ("cosine", "nu_eps", "nu_r"):
        v = diff.get(name)
        optional.append(None if v is None or (isinstance(v, float) and math.isnan(v)) else _finite(name, v))
    fired = diff.get("fired")
    return (latent, tag, _finite("delta_norm", diff.get("delta_norm")), *optional,
            None if fired is None else int(fired))  # fmt: skip


def _json_text(name: str, value) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise FeatureStoreError(f"{name} must be JSON-serialisable (no NaN): {e}") from None


class FeatureStore:
    """Open (or create) the feature store at `path`; refuses files that are not one of this version."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise FeatureStoreError(
                f"No feature store at {self.path}. Run the feature analysis for the dictionary first "
                "(saelab.analysis.features.analyze), or check the path."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (see `transaction`), never implicit.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise FeatureStoreError(
                f"{self.path} is not a saelab feature store: SQLite cannot read it ({e}). It is corrupt or "
                "another kind of file; delete it (or pick another path) and re-run the feature analysis."
            ) from None
        if not tables:
            with self.transaction() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('format', ?)", (json.dumps(FORMAT),))
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
            return
        if "meta" not in tables:
            raise self._foreign("it has no meta table")
        meta = {r[0]: r[1] for r in self._db.execute("SELECT key, value FROM meta")}
        if meta.get("format") != json.dumps(FORMAT):
            raise self._foreign(f"its meta table names format {meta.get('format')}")
        version = json.loads(meta.get("schema_version", "null"))
        if version in _MIGRATIONS:
            self._upgrade(version)
        elif version != SCHEMA_VERSION:
            raise FeatureStoreError(
                f"{self.path} is a feature store of schema version {version}, but this saelab reads version "
                f"{SCHEMA_VERSION}. Re-run the feature analysis to rebuild it (or use the saelab that wrote it)."
            )

    def _upgrade(self, version: int) -> None:
        """Upgrade an older file in place, every step in one transaction: on any failure it stays as it was."""
        changes = "; ".join(_WHAT_CHANGES[v] for v in range(version, SCHEMA_VERSION))
        warnings.warn(
            f"{self.path} is a schema version {version} feature store: upgrading it in place to version "
            f"{SCHEMA_VERSION} ({changes}; nothing is lost).",
            UserWarning,
            stacklevel=4,
        )
        try:
            with self.transaction() as db:
                current = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                start = json.loads(current[0])  # another process may have upgraded it meanwhile
                while start in _MIGRATIONS:
                    _MIGRATIONS[start](db)
                    start += 1
        except sqlite3.Error as e:
            raise FeatureStoreError(
                f"Could not upgrade {self.path} from schema version {version} to {SCHEMA_VERSION} ({e}); the "
                "file is unchanged. Make it writable (or copy it somewhere writable) and open it again."
            ) from None

    def _foreign(self, why: str) -> FeatureStoreError:
        return FeatureStoreError(
            f"{self.path} is an SQLite database but not a saelab feature store ({why}). Pass the .db file "
            "written by the feature analysis, or choose a new path so that nothing else is overwritten."
        )

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together, or (on any exception) not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- writing --------------------------------------------------------------------------------
    def begin_analysis(self, meta: dict, vocab: list[str] | None = None) -> None:
        """Start a (re-)analysis: new meta and vocab, old results dropped, progress 'running'."""
        with self.transaction() as db:
            self._write_meta(db, meta)
            if vocab is not None:
                db.execute("DELETE FROM vocab")
                db.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(vocab))
            for table in ("features", "examples", "coactivation", "members", "latent_diff", "progress"):
                db.execute(f"DELETE FROM {table}")
            db.execute("INSERT INTO progress VALUES (0, 'running', 0, 0, 0, NULL)")

    @staticmethod
    def _write_meta(db: sqlite3.Connection, meta: dict) -> None:
        reserved = {"format", "schema_version"} & set(meta)
        if reserved:
            raise ValueError(f"meta keys {sorted(reserved)} are written by the store itself")
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in meta.items())
        )

    def set_progress(self, batches: int, contexts: int, tokens: int, state_file: str | None) -> None:
        """Record how far a running analysis got (its state file holds the accumulators)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO progress VALUES (0, 'running', ?, ?, ?, ?)",
                (batches, contexts, tokens, state_file),
            )

    def write_results(
        self,
        features: Iterable[dict],
        examples: Iterable[dict],
        coactivation: Iterable[tuple[int, int, int]],
        progress: dict,
        meta: dict | None = None,
    ) -> None:
        """Replace all results and mark the analysis complete, in one transaction.

        A crosscoder's feature rows also carry ``members`` (per member: decoder_norm, logits_pos,
        logits_neg, logit_hist) and ``diff`` (tag, delta_norm, cosine, nu_eps, nu_r, fired, or None)."""
        members: list[tuple] = []
        diffs: list[tuple] = []

        def feature_rows():  # members and diff rows are set aside as the features stream past
            for row in features:
                for m, member in enumerate(row.get("members") or ()):
                    members.append((row["idx"], m, *_member_values(member)))
                if row.get("diff"):
                    diffs.append(_diff_values(row["idx"], row["diff"]))
                yield _encoded(row, _FEATURE_COLUMNS)

        with self.transaction() as db:
            if meta:
                self._write_meta(db, meta)
            for table in ("features", "examples", "coactivation", "members", "latent_diff"):
                db.execute(f"DELETE FROM {table}")
            marks = ", ".join("?" * len(_FEATURE_COLUMNS))
            db.executemany(
                f"INSERT INTO features ({', '.join(_FEATURE_COLUMNS)}) VALUES ({marks})", feature_rows()
            )
            db.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?, ?)", members)
            db.executemany("INSERT INTO latent_diff VALUES (?, ?, ?, ?, ?, ?, ?)", diffs)
            marks = ", ".join("?" * len(_EXAMPLE_COLUMNS))
            db.executemany(
                f"INSERT INTO examples ({', '.join(_EXAMPLE_COLUMNS)}) VALUES ({marks})",
                (_encoded(row, _EXAMPLE_COLUMNS) for row in examples),
            )
            db.executemany("INSERT INTO coactivation VALUES (?, ?, ?)", coactivation)
            db.execute(
                "INSERT OR REPLACE INTO progress VALUES (0, 'complete', ?, ?, ?, NULL)",
                (progress["batches"], progress["contexts"], progress["tokens"]),
            )

    def set_latent_diff(self, rows: Iterable[dict], source: dict | None = None) -> int:
        """Replace the model-diffing figures (``saelab diff``'s rows: latent, tag, delta_norm, cosine,
        nu_eps, nu_r, fired) in one transaction; returns how many latents were written. Refused unless
        every row names a stored latent, so figures of another crosscoder cannot land here."""
        values = [_diff_values(r.get("latent"), r) for r in rows]
        with self.transaction() as db:
            n = db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
            bad = [v[0] for v in values if not (isinstance(v[0], int) and 0 <= v[0] < n)]
            if bad or (values and len(values) != n):
                raise FeatureStoreError(
                    f"the diff rows do not match {self.path}: it holds {n} latents, the rows name {len(values)}"
                    + (f" (unknown latents {bad[:5]})" if bad else "")
                    + ". Write the diff of the crosscoder this store was analysed from, or re-run saelab analyze."
                )
            db.execute("DELETE FROM latent_diff")
            db.executemany("INSERT INTO latent_diff VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            self._write_meta(db, {"latent_diff": source or {}})
        return len(values)

    def latent_diff_counts(self) -> dict[str, int]:
        """Latents per tag (empty for a store without model-diffing figures)."""
        rows = self._db.execute("SELECT tag, COUNT(*) FROM latent_diff GROUP BY tag ORDER BY tag")
        return {r[0]: r[1] for r in rows}

    def _require_feature(self, db: sqlite3.Connection, idx) -> int:
        if isinstance(idx, bool) or not isinstance(idx, numbers.Integral) or not -(2**63) <= idx < 2**63:
            raise FeatureStoreError(f"feature index must be an integer, got {idx!r}")
        idx = int(idx)
        if db.execute("SELECT 1 FROM features WHERE idx = ?", (idx,)).fetchone() is None:
            n = db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
            raise FeatureStoreError(f"feature {idx} does not exist in {self.path} ({n} latents stored)")
        return idx

    @staticmethod
    def _delete_explanations(db: sqlite3.Connection, where: str, params: tuple) -> None:
        ids = [r[0] for r in db.execute(f"SELECT id FROM explanations WHERE {where}", params)]
        db.executemany("DELETE FROM scores WHERE explanation_id = ?", ((i,) for i in ids))
        db.executemany("DELETE FROM explanations WHERE id = ?", ((i,) for i in ids))

    def set_explanation(self, idx: int, text: str | None) -> None:
        """Set a latent's human explanation, replacing its human ones (None removes them); other kinds stay."""
        if text is not None and not isinstance(text, str):
            raise FeatureStoreError(f"an explanation must be text, got {type(text).__name__}")
        with self.transaction() as db:
            if text is not None:
                idx = self._require_feature(db, idx)
            self._delete_explanations(db, "feature = ? AND kind = 'human'", (idx,))
            if text is not None:
                db.execute(
                    "INSERT INTO explanations (feature, kind, text, source_json, created) VALUES (?, 'human', ?, ?, ?)",
                    (idx, text, json.dumps({"via": "set_explanation"}), _now()),
                )

    def add_explanation(self, idx: int, text: str, kind: str, source: dict | None = None) -> int:
        """Add one more explanation of a latent (several per latent and kind); returns its id.

        `source` records what made it: explainer model, prompt version, example ids, seed, settings."""
        if kind not in KINDS:
            raise FeatureStoreError(f"explanation kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(text, str) or not text.strip():
            raise FeatureStoreError(f"an explanation must be non-blank text, got {text!r}")
        if source is not None and not isinstance(source, dict):
            raise FeatureStoreError(f"source must be a dict, got {type(source).__name__}")
        source_json = _json_text("source", source or {})
        with self.transaction() as db:
            idx = self._require_feature(db, idx)
            cursor = db.execute(
                "INSERT INTO explanations (feature, kind, text, source_json, created) VALUES (?, ?, ?, ?, ?)",
                (idx, kind, text, source_json, _now()),
            )
            return int(cursor.lastrowid)

    def set_score(
        self,
        explanation_id: int,
        scorer: str,
        score: float,
        chance: float,
        shuffled: float,
        ci_low: float | None = None,
        ci_high: float | None = None,
        n: int | None = None,
        details: dict | None = None,
    ) -> None:
        """Record (or replace) one scorer's score of an explanation beside its two controls: `chance`
        (the baseline of the example mix) and `shuffled` (another latent's label scored the same way)."""
        if not isinstance(scorer, str) or not scorer.strip():
            raise FeatureStoreError(f"scorer must be a non-blank name, got {scorer!r}")
        values = [
            _finite(name, v) for name, v in (("score", score), ("chance", chance), ("shuffled", shuffled))
        ]
        lo, hi = _finite("ci_low", ci_low, optional=True), _finite("ci_high", ci_high, optional=True)
        if lo is not None and hi is not None and lo > hi:
            raise FeatureStoreError(f"ci_low {lo} is above ci_high {hi}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise FeatureStoreError(f"n (examples scored) must be a non-negative integer, got {n!r}")
        details_json = None if details is None else _json_text("details", details)
        if isinstance(explanation_id, bool) or not isinstance(explanation_id, numbers.Integral):
            raise FeatureStoreError(f"explanation id must be an integer, got {explanation_id!r}")
        explanation_id = int(explanation_id)
        with self.transaction() as db:
            known = (
                -(2**63) <= explanation_id < 2**63
                and db.execute("SELECT 1 FROM explanations WHERE id = ?", (explanation_id,)).fetchone()
            )
            if not known:
                raise FeatureStoreError(f"explanation {explanation_id!r} does not exist in {self.path}")
            db.execute(
                "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (explanation_id, scorer, *values, lo, hi, None if n is None else int(n), details_json),
            )

    def set_dreams(self, idx: int, dreams: list[dict], run_key: str, source: dict | None = None) -> list[int]:
        """Store one dreaming run of a latent: `dreams` are {token_ids, text, activation, cross_entropy,
        lam} rows (its Pareto front). Rows of an earlier run with the same `run_key` are replaced, in one
        transaction; returns the new rows' ids."""
        if not isinstance(run_key, str) or not run_key.strip():
            raise FeatureStoreError(f"run_key must be a non-blank string, got {run_key!r}")
        source_json = _json_text("source", source or {})
        rows = []
        for i, d in enumerate(dreams):
            tokens = d.get("token_ids")
            if not isinstance(tokens, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens
            ):
                raise FeatureStoreError(f"dream {i}: token_ids must be a list of integers, got {tokens!r}")
            if not isinstance(d.get("text"), str):
                raise FeatureStoreError(f"dream {i}: text must be a string, got {d.get('text')!r}")
            rows.append((
                json.dumps([int(t) for t in tokens]), d["text"],
                _finite(f"dream {i} activation", d.get("activation")),
                _finite(f"dream {i} cross_entropy", d.get("cross_entropy")),
                _finite(f"dream {i} lam", d.get("lam"), optional=True),
            ))  # fmt: skip
        with self.transaction() as db:
            idx = self._require_feature(db, idx)
            db.execute("DELETE FROM dreams WHERE feature = ? AND run_key = ?", (idx, run_key))
            created = _now()
            return [
                int(db.execute(
                    "INSERT INTO dreams (feature, tokens_json, text, activation, cross_entropy, lam, run_key, "
                    "source_json, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (idx, *row, run_key, source_json, created),
                ).lastrowid)
                for row in rows
            ]  # fmt: skip

    def dreams(self, idx: int, run_key: str | None = None) -> list[dict]:
        """A latent's dreamed prompts (those of one run with `run_key`), newest run first, then by
        cross-entropy: {id, token_ids, text, activation, cross_entropy, lam, run_key, source, created}."""
        where, params = ("feature = ?", (idx,)) if run_key is None else (
            "feature = ? AND run_key = ?", (idx, run_key))  # fmt: skip
        rows = self._db.execute(
            f"SELECT * FROM dreams WHERE {where} ORDER BY created DESC, run_key, cross_entropy, id", params
        )
        return [
            {"id": r["id"], "token_ids": json.loads(r["tokens_json"]), "text": r["text"],
             "activation": r["activation"], "cross_entropy": r["cross_entropy"], "lam": r["lam"],
             "run_key": r["run_key"], "source": json.loads(r["source_json"]), "created": r["created"]}
            for r in rows
        ]  # fmt: skip

    # -- reading --------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {r["key"]: json.loads(r["value"]) for r in self._db.execute("SELECT key, value FROM meta")}

    def progress(self) -> dict | None:
        row = self._db.execute("SELECT * FROM progress WHERE id = 0").fetchone()
        return None if row is None else {k: row[k] for k in row.keys() if k != "id"}

    def vocab(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT text FROM vocab ORDER BY id")]

    def feature(self, idx: int) -> dict | None:
        """Everything stored about one latent (examples excluded: see `examples`), or None.

        ``explanation`` is its newest human label, else its best explanation's text (what v1 called
        the explanation); ``explanations`` all of them, best first, each with its scores; ``dreams`` its
        dreamed prompts (see `dreams`); ``members`` a crosscoder latent's rows per member (else []) and
        ``diff`` its model-diffing figures (else None)."""
        row = self._db.execute("SELECT * FROM features WHERE idx = ?", (idx,)).fetchone()
        if row is None:
            return None
        out = _decode_row(row)
        out["explanations"] = self.explanations(idx)
        out["explanation"] = self._label(out["explanations"])
        out["dreams"] = self.dreams(idx)
        out["members"] = self.members(idx)
        diff = self._db.execute(
            f"SELECT {', '.join(_DIFF_FIELDS)} FROM latent_diff WHERE feature = ?", (idx,)
        ).fetchone()
        out["diff"] = None if diff is None else dict(diff)
        out["coactivation"] = [
            {"other": r["other"], "count": r["count"]}
            for r in self._db.execute(
                "SELECT other, count FROM coactivation WHERE feature = ? ORDER BY count DESC, other", (idx,)
            )
        ]
        return out

    def members(self, idx: int) -> list[dict]:
        """A crosscoder latent's rows per member model: {member, decoder_norm, logits_pos, logits_neg,
        logit_hist}, by member; [] for other dictionaries."""
        rows = self._db.execute(
            "SELECT member, decoder_norm, logits_pos_json, logits_neg_json, logit_hist_json FROM members "
            "WHERE feature = ? ORDER BY member",
            (idx,),
        )
        return [_decode_row(r) for r in rows]

    @staticmethod
    def _label(explanations: list[dict]) -> str | None:
        """The newest human label, else the best explanation's text: the v1 `explanation` field."""
        humans = [e for e in explanations if e["kind"] == "human"]
        if humans:
            return max(humans, key=lambda e: (e["created"], e["id"]))["text"]
        return explanations[0]["text"] if explanations else None

    def _scores(self, ids: list[int]) -> dict[int, dict[str, dict]]:
        """The scores of explanations `ids`: {id: {scorer: {score, controls, ci, n, details, flagged}}}."""
        out: dict[int, dict[str, dict]] = {i: {} for i in ids}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            rows = self._db.execute(
                f"SELECT * FROM scores WHERE explanation_id IN ({', '.join('?' * len(part))}) "
                "ORDER BY explanation_id, scorer",
                part,
            )
            for r in rows:
                entry = {k: r[k] for k in _SCORE_FIELDS}
                entry["details"] = None if r["details_json"] is None else json.loads(r["details_json"])
                entry["flagged"] = flagged(r["score"], r["shuffled"], r["ci_low"], r["chance"])
                out[r["explanation_id"]][r["scorer"]] = entry
        return out

    def _explanation_rows(self, where: str, params: tuple) -> list[dict]:
        rows = self._db.execute(
            f"SELECT e.id, e.feature, e.kind, e.text, e.source_json, e.created FROM {_WITH_DETECTION} "
            f"WHERE {where} ORDER BY e.feature, {_BEST_ORDER}",
            params,
        ).fetchall()
        scores = self._scores([r["id"] for r in rows])
        return [
            {"id": r["id"], "feature": r["feature"], "kind": r["kind"], "text": r["text"],
             "source": json.loads(r["source_json"]), "created": r["created"], "scores": scores[r["id"]]}
            for r in rows
        ]  # fmt: skip

    def explanations(self, idx: int) -> list[dict]:
        """A latent's explanations, best first (see the module docstring), each with its scores."""
        return self._explanation_rows("e.feature = ?", (idx,))

    def best_explanation(self, idx: int) -> dict | None:
        """The highest detection score's explanation; with none scored, the newest human one; else the newest."""
        found = self.explanations(idx)
        return found[0] if found else None

    def examples(self, idx: int, kind: str = "top") -> list[dict]:
        """Top examples strongest first, or quantile examples by quantile then value."""
        if kind not in ("top", "quantile"):
            raise ValueError(f"kind must be 'top' or 'quantile', got {kind!r}")
        rows = self._db.execute(
            "SELECT * FROM examples WHERE feature = ? AND kind = ? ORDER BY quantile, rank", (idx, kind)
        )
        return [_decode_row(r) for r in rows]

    @staticmethod
    def _filters(min_density, max_density, include_dead, min_score=None, tag=None) -> tuple[str, list]:
        clauses, params = [], []
        if tag is not None:
            clauses.append("idx IN (SELECT feature FROM latent_diff WHERE tag = ?)")
            params.append(tag)
        if not include_dead:
            clauses.append("n_active > 0")
        if min_density is not None:
            clauses.append("density >= ?")
            params.append(min_density)
        if max_density is not None:
            clauses.append("density <= ?")
            params.append(max_density)
        if min_score is not None:
            clauses.append("score >= ?")
            params.append(_finite("min_score", min_score))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    # Each latent's best detection score, for sorting and filtering in SQL: one pass over the detection
    # rows of `scores` (its scores_scorer index), joined to the latents (used only when a query needs it).
    # A crosscoder's Δnorm comes along (from latent_diff) for sorting by it.
    _SCORED = (
        "(SELECT f.idx, f.density, f.mean_act, f.max_act, f.n_active, b.score, d.delta_norm FROM features f "
        "LEFT JOIN (SELECT e.feature, MAX(s.score) AS score FROM scores s JOIN explanations e ON "
        f"e.id = s.explanation_id WHERE s.scorer = '{DETECTION}' GROUP BY e.feature) b ON b.feature = f.idx "
        "LEFT JOIN latent_diff d ON d.feature = f.idx)"
    )

    def list_features(
        self,
        sort: str = "density",
        descending: bool = True,
        offset: int = 0,
        limit: int = 100,
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = True,
        min_score: float | None = None,
        tag: str | None = None,
    ) -> list[dict]:
        """One page of latents sorted in SQL: statistics, ``explanation`` (as in `feature`), ``score`` (the
        best detection score, or None), ``best`` (the best explanation with its scores, or None) and
        ``top_tokens`` (the strongest top example's window of token ids, or None).

        sort="score" puts latents without a detection score last in either order; `min_score` keeps only
        latents whose best detection score is at least that. A crosscoder's latents also carry ``tag`` and
        ``delta_norm`` (None elsewhere); `tag` keeps one tag, sort="delta_norm" puts untagged ones last."""
        if sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        where, params = self._filters(min_density, max_density, include_dead, min_score, tag)
        order = "DESC" if descending else "ASC"
        if sort in ("score", "delta_norm"):
            by = f"{sort} IS NULL, {sort} {order}, idx ASC"
        else:
            by = f"{sort} {order}" + ("" if sort == "idx" else ", idx ASC")
        source = self._SCORED if sort in ("score", "delta_norm") or min_score is not None else "features"
        rows = [
            dict(r)
            for r in self._db.execute(
                f"SELECT idx, density, mean_act, max_act, n_active FROM {source}{where} ORDER BY {by} "
                "LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
        ]
        idxs = [r["idx"] for r in rows]
        explained = {}
        top = {}
        diffs = {}
        for chunk in range(0, len(idxs), 500):
            part = idxs[chunk : chunk + 500]
            marks = ", ".join("?" * len(part))
            for e in self._explanation_rows(f"e.feature IN ({marks})", tuple(part)):
                explained.setdefault(e["feature"], []).append(e)
            for r in self._db.execute(
                f"SELECT feature, tokens_json FROM examples WHERE kind = 'top' AND rank = 0 AND feature IN ({marks})",
                part,
            ):
                top[r["feature"]] = json.loads(r["tokens_json"])
            for r in self._db.execute(
                f"SELECT feature, tag, delta_norm FROM latent_diff WHERE feature IN ({marks})", part
            ):
                diffs[r["feature"]] = (r["tag"], r["delta_norm"])
        out = []
        for r in rows:
            found = explained.get(r["idx"], [])  # best first
            best = found[0] if found else None
            detection = best["scores"].get(DETECTION) if best else None
            out.append({**r, "explanation": self._label(found), "score": detection["score"] if detection else None,
                        "best": best, "top_tokens": top.get(r["idx"]),
                        "tag": diffs.get(r["idx"], (None, None))[0],
                        "delta_norm": diffs.get(r["idx"], (None, None))[1]})  # fmt: skip
        return out

    def count_features(
        self,
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = True,
        min_score: float | None = None,
        tag: str | None = None,
    ) -> int:
        where, params = self._filters(min_density, max_density, include_dead, min_score, tag)
        source = self._SCORED if min_score is not None else "features"
        return self._db.execute(f"SELECT COUNT(*) FROM {source}{where}", params).fetchone()[0]

    def search_tokens(self, substring: str, limit: int = 50) -> list[dict]:
        """Latents whose top examples fire on a token containing `substring`, most such examples first."""
        rows = self._db.execute(
            "SELECT e.feature AS idx, COUNT(*) AS matches FROM examples e JOIN vocab v ON v.id = e.token "
            "WHERE e.kind = 'top' AND instr(v.text, ?) > 0 "
            "GROUP BY e.feature ORDER BY matches DESC, e.feature LIMIT ?",
            (substring, limit),
        )
        return [dict(r) for r in rows]

    def search_explanations(self, text: str, limit: int = 50) -> list[dict]:
        """Latents with an explanation (any kind) containing `text`, case-insensitive for ASCII: one row
        {idx, explanation} per latent, its best-matching explanation. Ranked: `text` as a whole word
        before `text` inside a word, then by that explanation's detection score (unscored last), then
        human before other kinds, then latent index."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        word = re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)
        rows = self._db.execute(
            f"SELECT e.feature, e.text, e.kind, s.score FROM {_WITH_DETECTION} "
            "WHERE e.text LIKE ? ESCAPE '\\'",
            (pattern,),
        )
        best: dict[int, tuple] = {}
        for r in rows:
            rank = (
                word.search(r["text"]) is None,
                r["score"] is None,
                -(r["score"] or 0.0),
                r["kind"] != "human",
                r["feature"],
            )
            if r["feature"] not in best or rank < best[r["feature"]][0]:
                best[r["feature"]] = (rank, r["text"])
        ranked = sorted(best.items(), key=lambda item: item[1][0])[:limit]
        return [{"idx": idx, "explanation": text} for idx, (_, text) in ranked]

    def dump(self) -> dict[str, list[tuple]]:
        """Every table's rows in a fixed order: for comparing two stores row by row."""
        order = {
            "examples": "feature, kind, quantile, rank", "coactivation": "feature, other",
            "scores": "explanation_id, scorer", "dreams": "feature, id", "members": "feature, member",
        }  # fmt: skip
        tables = (
            "meta",
            "features",
            "examples",
            "coactivation",
            "vocab",
            "explanations",
            "scores",
            "dreams",
            "members",
            "latent_diff",
            "progress",
        )
        return {
            t: [tuple(r) for r in self._db.execute(f"SELECT * FROM {t} ORDER BY {order.get(t, 1)}")]
            for t in tables
        }
