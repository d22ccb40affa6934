"""The stored latents: a sorted, filtered page of them, one latent's summary, and its example windows."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.exceptions import RequestValidationError

from saelab.dictionaries.families.crosscoder import TAGS
from saelab.server.deps import Display, FeatureIdx, OpenStore, State
from saelab.server.limits import MAX_PAGE

router = APIRouter()


def check_offset(offset: int, n: int) -> None:
    """422 for an offset past the last latent, worded as pydantic words a bound (this one depends on the
    store, so no static `Query(le=...)` can hold it)."""
    if offset > n:
        raise RequestValidationError([{
            "type": "less_than_equal", "loc": ("query", "offset"),
            "msg": f"Input should be less than or equal to {n}", "input": offset, "ctx": {"le": n},
        }])  # fmt: skip


@router.get("/api/features")
def api_features(
    state: State,
    sort: Literal["density", "max_act", "mean_act", "n_active", "idx", "score", "delta_norm"] = "density",
    order: Literal["desc", "asc"] = "desc",
    offset: int = Query(0, ge=0, description="at most the number of latents"),
    limit: int = Query(100, ge=1, le=MAX_PAGE),
    min_density: float | None = Query(None, ge=0.0, le=1.0),
    max_density: float | None = Query(None, ge=0.0, le=1.0),
    include_dead: bool = True,
    min_score: float | None = Query(
        None, ge=0.0, le=1.0, description="keep latents whose best detection score is at least this"
    ),
    tag: Literal[TAGS] | None = Query(  # type: ignore[valid-type]
        None, description="a crosscoder's latents of one model-diffing tag (shared, a_only, b_only, other)"
    ),
) -> dict:
    """One page of latents sorted server-side: {total (matching the filters), offset, limit, items}.

    Each item has the latent's statistics, its label (`explanation`), its best explanation with the
    detection score and both controls (`best`, `score`), and a one-line `preview` of its top example.
    sort=score orders by the best detection score (unscored latents last). A crosscoder's latents carry
    their model-diffing `tag` and `delta_norm`; sort=delta_norm orders by Δnorm (0: only model B)."""
    check_offset(offset, state.n_features)
    with state.open_store() as s:
        filters = dict(
            min_density=min_density, max_density=max_density, include_dead=include_dead, min_score=min_score,
            tag=tag,
        )  # fmt: skip
        total = s.count_features(**filters)
        rows = s.list_features(sort, order == "desc", offset, limit, **filters)
    items = [state.display.summary(r).api() for r in rows]
    return {"total": total, "offset": offset, "limit": limit, "items": items}


@router.get("/api/features/{idx}")
def api_feature(idx: FeatureIdx, state: State) -> dict:
    """Stats, activation histogram (shared log bins), logit tables and histogram with token text,
    decoder neighbours, co-firing latents, the label (`explanation`: newest human, else the best) and
    every explanation best first with its scores beside their controls (`explanations`)."""
    with state.open_store() as s:
        row = s.feature(idx)
    if row is None:
        raise state.missing(idx)
    return state.display.feature(row).api()


@router.get("/api/features/{idx}/examples")
def api_examples(
    idx: FeatureIdx, open_store: OpenStore, display: Display, kind: Literal["top", "quantile"] = "top"
) -> dict:
    """Stored examples: windows of {id, text, value} tokens (padding dropped); `center` is the
    activating token's index in `tokens`; a crosscoder latent's examples carry `members`, the activation
    as written into each member model (value x its decoder norm there)."""
    with open_store() as s:
        windows = display.windows(s, idx, kind)
    return {"idx": idx, "kind": kind, "items": [w.api() for w in windows]}
