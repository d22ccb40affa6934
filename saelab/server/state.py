"""What every route reads: one store's summary, its display context and the live model, loaded once.

`create_app` puts a `ServerState` on `app.state.saelab`; routes reach it through `saelab.server.deps`,
so a test can mount one router on a bare FastAPI app with a state of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException

from saelab.analysis.store import FeatureStore
from saelab.analysis.views import DisplayContext
from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.server.live import LiveModel


@dataclass(frozen=True)
class ServerState:
    """A feature store as the app serves it; `live` is None on a server started without a model."""

    store_path: Path
    meta: dict
    n_features: int
    display: DisplayContext = field(repr=False)  # holds the whole vocabulary
    live: LiveModel | None = None
    latents: range = field(init=False)  # `idx in latents` is exact and O(1) for any Python int

    def __post_init__(self) -> None:
        object.__setattr__(self, "latents", range(self.n_features))

    @classmethod
    def load(cls, store_path: str | Path, lm: HookedLM | None = None, dictionary: Dictionary | None = None):
        """Read the store's summary once; raises FeatureStoreError for a missing or foreign store."""
        store_path = Path(store_path)
        with FeatureStore(store_path, create=False) as store:
            meta = store.meta()
            display = DisplayContext.of(store)
            n_features = store.count_features()
        d_sae = int((meta.get("dictionary") or {}).get("d_sae") or n_features)
        live = None
        if lm is not None and dictionary is not None:
            live = LiveModel(lm, dictionary, meta.get("data"), d_sae)
        elif lm is not None or dictionary is not None:
            raise ValueError("pass both lm and dictionary for the live endpoints, or neither")
        return cls(store_path, meta, n_features, display, live)

    def open_store(self) -> FeatureStore:
        """A connection for the calling thread (SQLite connections may not cross threads)."""
        return FeatureStore(self.store_path, create=False)

    def missing(self, idx: int) -> HTTPException:
        n = self.n_features
        return HTTPException(
            404,
            f"feature {idx} does not exist; this dictionary has {n} latents" + (f" (0-{n - 1})" if n else ""),
        )

    def known(self, idx: int) -> int:
        """`idx` if it names a latent of this store, else 404 naming the range: every route's one check,
        made before SQL sees the number (SQLite integers stop at 2**63-1 and raise OverflowError past it)."""
        if idx not in self.latents:
            raise self.missing(idx)
        return idx
