"""`POST /api/steer`: a prompt completed twice with the same seed, without and with one latent."""

from __future__ import annotations

from fastapi import APIRouter

from saelab.interventions.generation import GenerationConfig
from saelab.server.deps import State, live_refusals, require_live
from saelab.server.schemas import SteerRequest

router = APIRouter()


@router.post("/api/steer")
def api_steer(body: SteerRequest, state: State) -> dict:
    """Complete the prompt twice with the same seed: without and with the latent (add or clamp)."""
    state.known(body.feature)
    model = require_live(state.live, "steering", "generate steered text")
    cfg = GenerationConfig(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, seed=body.seed, chat=body.chat
    )
    with live_refusals(422):
        row = model.steer(body.feature, body.strength, body.prompt, body.mode, body.scope, cfg)
    return {**body.model_dump(), **row, "hook": model.write_hook}
