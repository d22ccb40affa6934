"""The writes of the API: `PUT /api/features/{idx}/explanation` (a human label) and
`POST /api/features/{idx}/explain` (new labels made now by the live model, scored beside their controls)."""

from __future__ import annotations

from fastapi import APIRouter, Body, HTTPException

from saelab.analysis.views import Explanation
from saelab.server.deps import FeatureIdx, OpenStore, State, live_refusals, require_live
from saelab.server.limits import MAX_EXPLANATION_CHARS
from saelab.server.schemas import ExplainRequest, ExplanationRequest

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


@router.post("/api/features/{idx}/explain")
def api_explain(idx: FeatureIdx, state: State, body: ExplainRequest = Body()) -> dict:
    """Explain a latent now on the server's model and score the new labels, each beside chance and a label
    another latent already has (method "auto": from its stored examples; "self": from its decoder
    direction). Takes seconds to a minute on a CPU. Returns {idx, method, explanations (the new ones, with
    their scores), failures}."""
    model = require_live(state.live, "explaining", "explain latents with the server's model")
    with live_refusals(422):
        summary = model.explain(state.store_path, idx, body.method)
    new = {e["id"] for e in summary["new"]}
    with state.open_store() as s:
        rows = [e for e in s.explanations(idx) if e["id"] in new]
    return {
        "idx": idx, "method": body.method,
        "explanations": [Explanation.of(e).api() for e in rows],
        "failures": [{k: v for k, v in f.items() if k != "raw"} for f in summary["failures"]],
    }  # fmt: skip
