"""The feature store: one SQLite file per analysed dictionary, and the only module of saelab with SQL.

Dashboards and search read this file instead of re-running the model. Schema (version
`SCHEMA_VERSION`; a file of another version is refused, re-run the analysis to rebuild it):

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
* ``explanations(feature INTEGER PRIMARY KEY, text)``: kept when an analysis is re-written.
* ``progress(id = 0, status, batches, contexts, tokens, state_file)``: 'running' while an
  analysis is under way (its accumulator state lives in ``state_file``), 'complete' after.

Every write is one transaction: an interrupted or failed write leaves the previous state.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from saelab.errors import FeatureStoreError

FORMAT = "saelab-feature-store"
SCHEMA_VERSION = 1
SORT_KEYS = ("density", "max_act", "mean_act", "n_active", "idx")

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
CREATE TABLE IF NOT EXISTS explanations (feature INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY CHECK (id = 0), status TEXT NOT NULL, batches INTEGER NOT NULL,
    contexts INTEGER NOT NULL, tokens INTEGER NOT NULL, state_file TEXT
);
"""

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
        if version != SCHEMA_VERSION:
            raise FeatureStoreError(
                f"{self.path} is a feature store of schema version {version}, but this saelab reads version "
                f"{SCHEMA_VERSION}. Re-run the feature analysis to rebuild it (or use the saelab that wrote it)."
            )

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
            for table in ("features", "examples", "coactivation", "progress"):
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
        """Replace all results and mark the analysis complete, in one transaction."""
        with self.transaction() as db:
            if meta:
                self._write_meta(db, meta)
            for table in ("features", "examples", "coactivation"):
                db.execute(f"DELETE FROM {table}")
            marks = ", ".join("?" * len(_FEATURE_COLUMNS))
            db.executemany(
                f"INSERT INTO features ({', '.join(_FEATURE_COLUMNS)}) VALUES ({marks})",
                (_encoded(row, _FEATURE_COLUMNS) for row in features),
            )
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

    def set_explanation(self, idx: int, text: str | None) -> None:
        """Attach a human or model explanation to a latent (None removes it)."""
        with self.transaction() as db:
            if text is None:
                db.execute("DELETE FROM explanations WHERE feature = ?", (idx,))
            else:
                db.execute("INSERT OR REPLACE INTO explanations VALUES (?, ?)", (idx, text))

    # -- reading --------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {r["key"]: json.loads(r["value"]) for r in self._db.execute("SELECT key, value FROM meta")}

    def progress(self) -> dict | None:
        row = self._db.execute("SELECT * FROM progress WHERE id = 0").fetchone()
        return None if row is None else {k: row[k] for k in row.keys() if k != "id"}

    def vocab(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT text FROM vocab ORDER BY id")]

    def feature(self, idx: int) -> dict | None:
        """Everything stored about one latent (examples excluded: see `examples`), or None."""
        row = self._db.execute(
            "SELECT f.*, e.text AS explanation FROM features f "
            "LEFT JOIN explanations e ON e.feature = f.idx WHERE f.idx = ?",
            (idx,),
        ).fetchone()
        if row is None:
            return None
        out = _decode_row(row)
        out["coactivation"] = [
            {"other": r["other"], "count": r["count"]}
            for r in self._db.execute(
                "SELECT other, count FROM coactivation WHERE feature = ? ORDER BY count DESC, other", (idx,)
            )
        ]
        return out

    def examples(self, idx: int, kind: str = "top") -> list[dict]:
        """Top examples strongest first, or quantile examples by quantile then value."""
        if kind not in ("top", "quantile"):
            raise ValueError(f"kind must be 'top' or 'quantile', got {kind!r}")
        rows = self._db.execute(
            "SELECT * FROM examples WHERE feature = ? AND kind = ? ORDER BY quantile, rank", (idx, kind)
        )
        return [_decode_row(r) for r in rows]

    @staticmethod
    def _filters(min_density, max_density, include_dead) -> tuple[str, list]:
        clauses, params = [], []
        if not include_dead:
            clauses.append("n_active > 0")
        if min_density is not None:
            clauses.append("density >= ?")
            params.append(min_density)
        if max_density is not None:
            clauses.append("density <= ?")
            params.append(max_density)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def list_features(
        self,
        sort: str = "density",
        descending: bool = True,
        offset: int = 0,
        limit: int = 100,
        min_density: float | None = None,
        max_density: float | None = None,
        include_dead: bool = True,
    ) -> list[dict]:
        """One page of latents (idx, statistics, explanation), sorted in SQL on an indexed column."""
        if sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        where, params = self._filters(min_density, max_density, include_dead)
        order = "DESC" if descending else "ASC"
        tie = "" if sort == "idx" else ", idx ASC"
        rows = self._db.execute(
            "SELECT f.idx, density, mean_act, max_act, n_active, "
            "(SELECT text FROM explanations WHERE feature = f.idx) AS explanation "
            f"FROM features f{where} ORDER BY {sort} {order}{tie} LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [dict(r) for r in rows]

    def count_features(
        self, min_density: float | None = None, max_density: float | None = None, include_dead: bool = True
    ) -> int:
        where, params = self._filters(min_density, max_density, include_dead)
        return self._db.execute(f"SELECT COUNT(*) FROM features{where}", params).fetchone()[0]

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
        """Latents whose explanation contains `text` (case-insensitive for ASCII)."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._db.execute(
            "SELECT feature AS idx, text AS explanation FROM explanations "
            "WHERE text LIKE ? ESCAPE '\\' ORDER BY feature LIMIT ?",
            (pattern, limit),
        )
        return [dict(r) for r in rows]

    def dump(self) -> dict[str, list[tuple]]:
        """Every table's rows in a fixed order: for comparing two stores row by row."""
        order = {"examples": "feature, kind, quantile, rank", "coactivation": "feature, other"}
        tables = ("meta", "features", "examples", "coactivation", "vocab", "explanations", "progress")
        return {
            t: [tuple(r) for r in self._db.execute(f"SELECT * FROM {t} ORDER BY {order.get(t, 1)}")]
            for t in tables
        }
