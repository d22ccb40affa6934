"""The one protocol every explainer and judge LM sits behind, and what its implementations share.

A local transformers model (`LocalClient`) and any OpenAI-compatible HTTP endpoint (`OpenAIClient`)
are interchangeable: explainers call `generate`, scorers call `logprobs` (yes/no detection, surprisal)
and `embed` (the embedding scorer), and every result records `describe()` as its provenance.

Candidate log-probs are read off the tokens of the WHOLE text `prompt + candidate`, tokenised in one
go, because that is all an HTTP server can return (`echo=True`: each token, its character offset and
its log-prob). Both clients apply the same rule (`candidate_logprob`): a token belongs to the
candidate when it ends after the prompt's last character, so a token that straddles the boundary
(the space of " Yes" merged with a prompt that ends in a space) still counts, and the two clients
give the same number for the same model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import torch

from saelab.errors import ClientError, DataError

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
Prompt = Union[str, Sequence[Message]]  # plain text (raw completion) or a chat

ROLES = ("system", "user", "assistant")


@runtime_checkable
class LMClient(Protocol):
    """What an explainer or judge needs from a language model, local or remote."""

    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        """One completion per prompt (chat message lists or plain strings); temperature 0 is greedy."""
        ...

    def logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[list[float]]:
        """[prompt][candidate] log P(candidate | prompt), summed over the candidate's tokens."""
        ...

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings [n, d] (float32, CPU) for the embedding scorer."""
        ...

    def describe(self) -> dict:
        """What produces the results (kind, model, settings), for provenance; never an API key."""
        ...


# -- checks shared by every client --------------------------------------------------------------
def check_prompts(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The prompts as a list, or a clear error naming the first one that is neither text nor a chat."""
    if isinstance(prompts, (str, Mapping)):
        raise DataError("prompts must be a list of prompts (each a string or a chat); wrap one prompt in [].")
    out = list(prompts)
    for i, prompt in enumerate(out):
        if isinstance(prompt, str):
            if not prompt:
                raise DataError(f"prompt {i} is empty; give every prompt some text.")
            continue
        ok = isinstance(prompt, Sequence) and len(prompt) > 0
        for message in prompt if ok else ():
            ok = ok and (
                isinstance(message, Mapping)
                and message.get("role") in ROLES
                and isinstance(message.get("content"), str)
            )
        if not ok:
            raise DataError(
                f"prompt {i} is neither a string nor a chat: a chat is a non-empty list of "
                f'{{"role": one of {", ".join(ROLES)}, "content": "text"}} messages.'
            )
    return out


def check_generation(max_new_tokens: int, temperature: float, seed: int) -> None:
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise DataError(f"max_new_tokens is {max_new_tokens!r}; use a whole number >= 1.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise DataError(f"temperature is {temperature!r}; use 0 (greedy) or a positive number.")
    if not isinstance(seed, int):
        raise DataError(f"seed is {seed!r}; use a whole number.")


def check_scoring(prompts: Sequence[str], candidates: Sequence[str]) -> tuple[list[str], list[str]]:
    """Plain-text prompts and non-empty candidate strings, or a clear error."""
    prompts, candidates = list(prompts), list(candidates)
    if not all(isinstance(p, str) and p for p in prompts):
        raise DataError(
            "logprobs takes plain-text prompts (already formatted, e.g. with format_chat); "
            "each must be a non-empty string."
        )
    if not candidates or not all(isinstance(c, str) and c for c in candidates):
        raise DataError('logprobs needs at least one candidate, each a non-empty string such as " Yes".')
    return prompts, candidates


def format_chat(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The text a chat becomes: the tokenizer's chat template, or "role: content" turns without one."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + ("\n\nassistant:" if add_generation_prompt else "")


# -- candidate log-probs ------------------------------------------------------------------------
@dataclass
class TokenScores:
    """The tokens of one text with their character spans and log P(token | the tokens before it).

    The first token (and any a server did not score) has no log-prob: None.
    """

    tokens: list[str]
    starts: list[int]
    ends: list[int]
    logprobs: list[float | None]


def candidate_logprob(scores: TokenScores, prompt_chars: int, text_chars: int, where: str) -> float:
    """Sum of the log-probs of the tokens that cover any character after the first `prompt_chars`.

    Tokens that start at or after `text_chars` were generated, not echoed, and are left out.
    """
    total, count = 0.0, 0
    for start, end, logprob in zip(scores.starts, scores.ends, scores.logprobs, strict=True):
        if end <= prompt_chars or start >= text_chars:
            continue
        if logprob is None or not math.isfinite(logprob):
            raise ClientError(
                f"{where} returned no usable log-prob ({logprob!r}) for a candidate token; the candidate "
                "must follow a non-empty prompt, and the server must score every echoed token."
            )
        total += float(logprob)
        count += 1
    if count == 0:
        raise ClientError(
            f"{where} returned no token for the candidate (the prompt's {prompt_chars} characters cover "
            "every token); check that the server echoes the prompt with text_offset and tokens."
        )
    return total


# -- client-side rate limit ---------------------------------------------------------------------
class RateLimiter:
    """At most `per_minute` requests a minute, spaced evenly (no bursts that trip a provider's limit)."""

    def __init__(
        self,
        per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if per_minute is not None and not (isinstance(per_minute, (int, float)) and per_minute > 0):
            raise DataError(
                f"requests_per_minute is {per_minute!r}; use a positive number, or None for no limit."
            )
        self.per_minute = per_minute
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self._clock, self._sleep = clock, sleep
        self._next: float | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next request may go out, and book its slot."""
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            if self._next is not None and now < self._next:
                self._sleep(self._next - now)
                now = self._next
            self._next = now + self.interval
