"""`GET /api/search`: latents by the tokens they fire on, or by their explanation (store only)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query

from saelab.server.deps import OpenStore
from saelab.server.limits import MAX_PAGE

router = APIRouter()


@router.get("/api/search")
def api_search(
    open_store: OpenStore,
    q: str = Query(min_length=1, max_length=200),
    kind: Literal["token", "explanation"] = "token",
    limit: int = Query(50, ge=1, le=MAX_PAGE),
) -> dict:
    """Latents whose top examples fire on a token containing `q` (kind=token, most matches first) or
    whose explanation of any kind contains `q` (kind=explanation; whole-word matches first, then by
    detection score: see FeatureStore.search_explanations)."""
    with open_store() as s:
        if kind == "token":
            items = s.search_tokens(q, limit)
        else:
            items = s.search_explanations(q, limit)
    return {"q": q, "kind": kind, "items": items}
