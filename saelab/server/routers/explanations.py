"""`PUT /api/features/{idx}/explanation`: the one write of the API."""

from __future__ import annotations

from fastapi import APIRouter, Body, HTTPException

from saelab.server.deps import FeatureIdx, OpenStore
from saelab.server.limits import MAX_EXPLANATION_CHARS
from saelab.server.schemas import ExplanationRequest

router = APIRouter()


@router.put("/api/features/{idx}/explanation")
def api_set_explanation(idx: FeatureIdx, open_store: OpenStore, body: ExplanationRequest = Body()) -> dict:
    """Set (or, with null/blank text, remove) a latent's human explanation; auto and self ones stay."""
    text = None if body.text is None or not body.text.strip() else body.text.strip()
    if text is not None and len(text) > MAX_EXPLANATION_CHARS:
        raise HTTPException(413, f"explanation has {len(text)} characters; at most {MAX_EXPLANATION_CHARS}")
    with open_store() as s:
        s.set_explanation(idx, text)
    return {"idx": idx, "explanation": text}
