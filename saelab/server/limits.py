"""The web API's own limits (the live model's text and generation limits are in `saelab.server.live`)."""

from __future__ import annotations

from saelab.server.live import (
    MAX_NEW_TOKENS,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    MAX_VECTOR_FEATURES,
    MAX_VECTOR_PROMPTS,
)

DENSE_THRESHOLD = 0.1  # the pages' "hide dense" filter: latents firing on more than 10% of tokens
MAX_PAGE = 500
MAX_BODY_BYTES = 64 * 1024
MAX_EXPLANATION_CHARS = 4000
TOP_PER_TOKEN = 10


def public_limits() -> dict:
    """The limits as /api/meta reports them, so a client can check its input before sending it."""
    return {
        "text_chars": MAX_TEXT_CHARS,
        "tokens": MAX_TOKENS,
        "page": MAX_PAGE,
        "new_tokens": MAX_NEW_TOKENS,
        "strength": MAX_STRENGTH,
        "vector_prompts": MAX_VECTOR_PROMPTS,
        "vector_features": MAX_VECTOR_FEATURES,
    }
