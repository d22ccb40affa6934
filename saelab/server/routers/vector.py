"""`POST /api/vector`: the mean difference of two prompt lists, decomposed into a few latents."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from saelab.server.deps import State, live_refusals, require_live
from saelab.server.live import MAX_VECTOR_PROMPTS
from saelab.server.schemas import VectorRequest

router = APIRouter()


@router.post("/api/vector")
def api_vector(body: VectorRequest, state: State) -> dict:
    """Mean-difference vector of two prompt lists (last prompt token), decomposed into latents."""
    for name, prompts in (("positive", body.positive), ("negative", body.negative)):
        if len(prompts) > MAX_VECTOR_PROMPTS:
            raise HTTPException(
                413, f"{len(prompts)} {name} prompts; give at most {MAX_VECTOR_PROMPTS} per list."
            )
    if body.n_features > state.n_features:
        raise HTTPException(422, f"n_features must be at most {state.n_features}, the number of latents.")
    model = require_live(state.live, "building vectors", "build a vector from prompts")
    with live_refusals(422):
        result = model.vector(body.positive, body.negative, body.n_features, body.chat, body.method)
    features = sorted(result.features, key=lambda f: -f.coefficient)
    with state.open_store() as s:
        stats = {f.index: s.feature(f.index) or {} for f in features}
    items = [
        {
            "idx": f.index, "coefficient": f.coefficient, "cosine": f.cosine, "share": f.share,
            "link": f"/feature/{f.index}", "density": stats[f.index].get("density"),
            "max_act": stats[f.index].get("max_act"), "mean_act": stats[f.index].get("mean_act"),
            "explanation": stats[f.index].get("explanation"),
        }
        for f in features
    ]  # fmt: skip
    return {
        "hook": model.write_hook, "position": -1, "chat": body.chat, "method": result.method,
        "n_positive": len(body.positive), "n_negative": len(body.negative), "n_features": body.n_features,
        "vector_norm": result.vector_norm, "cosine": result.cosine,
        "residual_norm": result.residual_norm, "relative_residual": result.relative_residual,
        "features": items,
    }  # fmt: skip
