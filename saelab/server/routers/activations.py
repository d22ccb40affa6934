"""Live encoding: per-token activations of your own text, and the latents that fire most on it."""

from __future__ import annotations

import torch
from fastapi import APIRouter

from saelab.server.deps import Display, Live, State, live_refusals, require_live
from saelab.server.limits import TOP_PER_TOKEN
from saelab.server.live import LiveModel
from saelab.server.schemas import ActivationsRequest, TextSearchRequest

router = APIRouter()


def encode(live: LiveModel | None, text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """`LiveModel.encode`, or 503 without a model, 413 over a limit, 400 for text it cannot take."""
    model = require_live(live)
    with live_refusals(400):
        return model.encode(text)


@router.post("/api/activations")
def api_activations(body: ActivationsRequest, state: State) -> dict:
    """Encode text live: per token its text, whether it is excluded (BOS/special: all zeros), the
    requested latent's activation (if `feature`), and the top 10 active latents (value descending)."""
    if body.feature is not None:
        state.known(body.feature)
    ids, acts, excluded = encode(state.live, body.text)
    k = min(TOP_PER_TOKEN, acts.shape[1])
    values, idxs = acts.topk(k, dim=1) if len(ids) else (torch.zeros(0, k), torch.zeros(0, k))
    tokens = []
    for pos, t in enumerate(ids):
        row = {"id": t, "text": state.display.token_text(t), "excluded": bool(excluded[pos])}
        row["top"] = [
            {"idx": int(i), "value": float(v)}
            for v, i in zip(values[pos].tolist(), idxs[pos].tolist(), strict=True)
            if v > 0
        ]
        if body.feature is not None:
            row["value"] = float(acts[pos, body.feature])
        tokens.append(row)
    out = {"feature": body.feature, "tokens": tokens}
    if body.feature is not None:
        out["max_value"] = float(acts[:, body.feature].max()) if len(ids) else 0.0
    return out


@router.post("/api/search/text")
def api_search_text(body: TextSearchRequest, live: Live, display: Display) -> dict:
    """Latents ranked by their maximum activation on the text (live), with the token where it peaks."""
    ids, acts, _ = encode(live, body.text)
    if not ids:
        return {"tokens": [], "items": []}
    peak, where = acts.max(dim=0)
    active = (acts > 0).sum(0)
    k = min(body.limit, acts.shape[1])
    values, order = peak.topk(k)
    items = [
        {
            "idx": int(i), "max_value": float(v), "position": int(where[i]),
            "token": display.token_text(ids[int(where[i])]), "n_tokens_active": int(active[i]),
        }
        for v, i in zip(values.tolist(), order.tolist(), strict=True)
        if v > 0
    ]  # fmt: skip
    return {"tokens": [display.token_text(t) for t in ids], "items": items}
