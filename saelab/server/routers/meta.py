"""`GET /api/meta`: what was analysed, the latent counts, whether the live model is loaded, the limits."""

from __future__ import annotations

import math

from fastapi import APIRouter

from saelab.server.deps import State
from saelab.server.limits import DENSE_THRESHOLD, public_limits

router = APIRouter()


@router.get("/api/meta")
def api_meta(state: State) -> dict:
    """What was analysed (dictionary config, model, hook, data, analysis config) and latent counts."""
    with state.open_store() as s:
        alive = s.count_features(include_dead=False)
        dense = s.count_features(min_density=math.nextafter(DENSE_THRESHOLD, 1.0))
        progress = s.progress()
        tag_counts = s.latent_diff_counts()
    meta, n_features = state.meta, state.n_features
    return {
        "dictionary": meta.get("dictionary"),
        "model": meta.get("model"),
        "hook_name": meta.get("hook_name"),
        "data": meta.get("data"),
        "config": meta.get("config"),
        "members": meta.get("members"),  # a crosscoder's member models
        "tag_counts": tag_counts or None,  # its latents per model-diffing tag
        "progress": progress,
        "n_features": n_features,
        "n_alive": alive,
        "n_dead": n_features - alive,
        "n_dense": dense,
        "dense_threshold": DENSE_THRESHOLD,
        "vocab_size": len(state.display.vocab),
        "live": state.live is not None,
        "limits": public_limits(),
    }
