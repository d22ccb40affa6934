"""Request bodies of the write and live endpoints, validated before a route runs (422 naming the field)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from saelab.server.limits import MAX_PAGE
from saelab.server.live import (
    MAX_NEW_TOKENS,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    MAX_VECTOR_FEATURES,
    MAX_VECTOR_PROMPTS,
)


def _utf8(text: str) -> str:
    """Refuse unpaired surrogates (JSON "\\ud800"): neither SQLite nor the tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"character {e.start} is an unpaired UTF-16 surrogate ({text[e.start]!r}); "
            "send valid Unicode text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]  # every user string that reaches SQLite or the tokenizer


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain some text, not only whitespace")
    return text


class ActivationsRequest(BaseModel):
    text: Text = Field(min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens")
    feature: int | None = Field(None, description="latent whose per-token activation to report")


class TextSearchRequest(BaseModel):
    text: Text = Field(min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens")
    limit: int = Field(50, ge=1, le=MAX_PAGE)


class ExplanationRequest(BaseModel):
    text: Text | None = Field(None, description="the explanation; null or blank removes it")


class ExplainRequest(BaseModel):
    method: Literal["auto", "self"] = Field("auto", description="auto-interp or self-explanation")


class SteerRequest(BaseModel):
    feature: int = Field(description="latent to steer with (0 .. d_sae-1)")
    strength: float = Field(
        ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False,
        description="add: multiple of the decoder row; clamp: the activation to set",
    )  # fmt: skip
    prompt: Text = Field(
        min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens"
    )
    mode: Literal["add", "clamp"] = "add"
    scope: Literal["all", "prompt", "generated"] = "all"
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    temperature: float = Field(0.7, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy")
    chat: bool = Field(True, description="wrap the prompt in the chat template as a user turn")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str) -> str:
        return _not_blank(prompt)


class VectorRequest(BaseModel):
    positive: list[Text] = Field(min_length=1, description=f"1 to {MAX_VECTOR_PROMPTS} prompts")
    negative: list[Text] = Field(min_length=1, description=f"1 to {MAX_VECTOR_PROMPTS} prompts")
    n_features: int = Field(10, ge=1, le=MAX_VECTOR_FEATURES)
    chat: bool = Field(True, description="wrap each prompt in the chat template as a user turn")
    method: Literal["pursuit", "encoder"] = "pursuit"

    @field_validator("positive", "negative")
    @classmethod
    def _prompts(cls, prompts: list[str]) -> list[str]:
        for p in prompts:
            _not_blank(p)
        return prompts
