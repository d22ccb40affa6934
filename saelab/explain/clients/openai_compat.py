"""An LM client on any OpenAI-compatible HTTP endpoint: vLLM, llama.cpp server, ollama, OpenAI, OpenRouter.

Endpoints used, and what each must support:
- `POST /chat/completions` for chat prompts (`generate` with message lists): `max_tokens`,
  `temperature`, `top_p`, `seed`.
- `POST /completions` for plain-text prompts: a list of prompts in one request; and, for `logprobs`,
  `echo=True, logprobs=1, max_tokens=0` returning `tokens`, `token_logprobs` and `text_offset` for
  the echoed prompt (vLLM and llama.cpp do; OpenAI's own chat models do not).
- `POST /embeddings` for `embed` (`encoding_format="float"`).

The key is read from the environment variable named by `api_key_env` (default OPENAI_API_KEY); local
servers accept any key, so an unset variable sends a placeholder. The key never appears in
`describe()` or in an error message. Retries with backoff on 408/409/429/5xx and connection errors
are the openai client's own (`max_retries`, honouring Retry-After); `requests_per_minute` spaces
requests on this side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from saelab.errors import ClientError, DataError
from saelab.explain.clients.base import (
    Prompt,
    RateLimiter,
    TokenScores,
    candidate_logprob,
    check_generation,
    check_prompts,
    check_scoring,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
PLACEHOLDER_KEY = "EMPTY"  # what vLLM's docs send to a server started without --api-key


class OpenAIClient:
    """`LMClient` on an OpenAI-compatible endpoint at `base_url` serving `model`."""

    kind = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key_env: str = DEFAULT_KEY_ENV,
        timeout: float = 60.0,
        max_retries: int = 3,
        requests_per_minute: float | None = None,
        batch_size: int = 16,
    ):
        import openai

        if not (isinstance(model, str) and model):
            raise DataError("the model name is empty; give the name the server serves (GET /v1/models).")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise DataError(f"timeout is {timeout!r}; use a positive number of seconds.")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise DataError(f"max_retries is {max_retries!r}; use a whole number >= 0.")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise DataError(f"batch_size is {batch_size!r}; use a whole number >= 1.")
        if not (isinstance(api_key_env, str) and api_key_env):
            raise DataError("api_key_env is empty; name the environment variable that holds the API key.")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.api_key_env, self.timeout, self.max_retries = api_key_env, float(timeout), max_retries
        self.batch_size = batch_size
        self._limiter = RateLimiter(requests_per_minute)
        self._key = os.environ.get(api_key_env) or None
        self._openai = openai
        self._client = openai.OpenAI(
            api_key=self._key or PLACEHOLDER_KEY,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=max_retries,
        )

    def __repr__(self) -> str:
        return f"OpenAIClient({self.model!r}, {self.base_url!r}, api_key_env={self.api_key_env!r})"

    # -- requests and their errors -----------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _call(self, endpoint: str, fn, **kwargs):
        """One request through the rate limit; every failure becomes a ClientError that names the fix."""
        self._limiter.wait()
        try:
            return fn(**kwargs)
        except self._openai.OpenAIError as exc:
            raise ClientError(self._scrub(self._explain(exc, endpoint))) from None

    def _explain(self, exc: Exception, endpoint: str) -> str:
        o, url, tries = self._openai, f"{self.base_url}{endpoint}", self.max_retries
        detail = " ".join(str(getattr(exc, "message", "") or exc).split())[:300]
        if isinstance(exc, o.APITimeoutError):
            return (
                f"{url} did not answer within {self.timeout:g} s, {tries + 1} tries ({tries} retries). "
                "The server may be overloaded or still loading the model; raise timeout= or max_retries=, "
                "or check the server."
            )
        if isinstance(exc, o.APIConnectionError):
            return (
                f"could not reach {url} ({detail}) after {tries + 1} tries. Is the server running, and is "
                "the URL right (it usually ends in /v1)? Start the server or fix the spec "
                "openai:<model>@<base_url>."
            )
        if isinstance(exc, (o.AuthenticationError, o.PermissionDeniedError)):
            where = (
                f"the environment variable {self.api_key_env} is not set"
                if self._key is None
                else f"the server does not accept the key in the environment variable {self.api_key_env}"
            )
            return (
                f"{url} refused the API key ({exc.status_code}: {detail}): {where}. Set {self.api_key_env} to a "
                "valid key, or pass api_key_env= naming the variable that holds it."
            )
        if isinstance(exc, o.RateLimitError):
            return (
                f"{url} still answered 429 (rate limit) after {tries} retries ({detail}); lower "
                "requests_per_minute= or raise max_retries=."
            )
        if isinstance(exc, o.NotFoundError):
            return (
                f"{url} answered 404 for model {self.model!r} ({detail}): the model name is wrong (list "
                f"them with GET {self.base_url}/models) or the server has no {endpoint} endpoint."
            )
        if isinstance(exc, o.APIStatusError):
            hint = (
                " For log-probs the endpoint must support echo=True with logprobs and max_tokens=0 "
                "(vLLM and llama.cpp do; OpenAI's chat models do not)."
                if endpoint == "/completions" and exc.status_code in (400, 422)
                else ""
            )
            retried = f" after {tries} retries" if exc.status_code >= 500 else ""
            return f"{url} answered {exc.status_code}{retried}: {detail or 'no message'}.{hint}"
        return f"{url} gave a reply that is not a valid OpenAI-style response ({detail}); check the server."

    def _junk(self, endpoint: str, what: str, fix: str | None = None) -> ClientError:
        return ClientError(
            f"{self.base_url}{endpoint} returned {what} (model {self.model!r}). "
            + (
                fix
                or "The server or model gave an empty or malformed reply; check the server's log or try another model."
            )
        )

    def _choices(self, response, endpoint: str, n: int) -> list:
        """The n choices of a reply in prompt order, or a ClientError for empty or junk replies."""
        try:
            choices = sorted(response.choices, key=lambda c: c.index)
            indices = [c.index for c in choices]
        except (AttributeError, TypeError):
            raise self._junk(endpoint, "a reply without choices") from None
        if indices != list(range(n)):
            raise self._junk(endpoint, f"{len(indices)} choices (indices {indices[:8]}) for {n} prompts")
        return choices

    # -- the protocol -------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        check_generation(max_new_tokens, temperature, seed)
        prompts = check_prompts(prompts)
        settings = {
            "max_tokens": max_new_tokens,
            "temperature": float(temperature),
            "top_p": 1.0,
            "seed": seed,
        }
        out: list[str | None] = [None] * len(prompts)
        plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        for start in range(0, len(plain), self.batch_size):
            rows = plain[start : start + self.batch_size]
            response = self._call(
                "/completions",
                self._client.completions.create,
                model=self.model,
                prompt=[prompts[i] for i in rows],
                **settings,
            )
            for i, choice in zip(rows, self._choices(response, "/completions", len(rows)), strict=True):
                out[i] = self._text(getattr(choice, "text", None), "/completions")
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                continue
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            response = self._call(
                "/chat/completions",
                self._client.chat.completions.create,
                model=self.model,
                messages=messages,
                **settings,
            )
            (choice,) = self._choices(response, "/chat/completions", 1)
            out[i] = self._text(
                getattr(getattr(choice, "message", None), "content", None), "/chat/completions"
            )
        return [t if t is not None else "" for t in out]  # every slot is filled above

    def _text(self, text, endpoint: str) -> str:
        if not isinstance(text, str):
            raise self._junk(endpoint, f"a choice whose text is {type(text).__name__}, not a string")
        return text

    def logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[list[float]]:
        prompts, candidates = check_scoring(prompts, candidates)
        pairs = [(p, p + c) for p in prompts for c in candidates]
        flat: list[float] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            response = self._call(
                "/completions",
                self._client.completions.create,
                model=self.model,
                prompt=[text for _, text in chunk],
                echo=True,
                logprobs=1,
                max_tokens=0,
                temperature=0.0,
            )
            for (prompt, text), choice in zip(
                chunk, self._choices(response, "/completions", len(chunk)), strict=True
            ):
                scores, shift = self._echoed(choice, text)
                where = f"{self.base_url}/completions"
                flat.append(candidate_logprob(scores, len(prompt) + shift, len(text) + shift, where))
        n = len(candidates)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _echoed(self, choice, text: str) -> tuple[TokenScores, int]:
        """The echoed tokens of one choice, and how far its offsets are shifted from our text.

        A server may render special tokens (a BOS "<s>") into the token texts, which shifts every
        offset by a constant; the shift is how far the last token ends beyond the text it echoed.
        """
        lp = getattr(choice, "logprobs", None)
        tokens = getattr(lp, "tokens", None)
        offsets = getattr(lp, "text_offset", None)
        logprobs = getattr(lp, "token_logprobs", None)
        if not (tokens and offsets and logprobs) or not (len(tokens) == len(offsets) == len(logprobs)):
            raise self._junk(
                "/completions",
                "no per-token log-probs for the echoed prompt (tokens, token_logprobs and text_offset of "
                "equal length)",
                "The endpoint must support echo=True with logprobs and max_tokens=0 (vLLM and llama.cpp "
                "do; OpenAI's chat models do not); serve the judge there.",
            )
        if not all(isinstance(t, str) for t in tokens) or not all(isinstance(o, int) for o in offsets):
            raise self._junk("/completions", "tokens or text offsets of the wrong type")
        starts = list(offsets)
        ends = [s + len(t) for s, t in zip(starts, tokens, strict=True)]
        echoed = getattr(choice, "text", None)  # the prompt, plus any tokens the server generated
        length = len(echoed) if isinstance(echoed, str) and echoed.startswith(text) else len(text)
        shift = max(0, max(ends) - length)
        values = [None if v is None else float(v) for v in logprobs]
        return TokenScores(list(tokens), starts, ends, values), shift

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not all(isinstance(t, str) and t for t in texts):
            raise DataError("embed takes non-empty strings; give every text some characters.")
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            response = self._call(
                "/embeddings",
                self._client.embeddings.create,
                model=self.model,
                input=chunk,
                encoding_format="float",
            )
            try:
                data = sorted(response.data, key=lambda d: d.index)
                vectors = [list(map(float, d.embedding)) for d in data]
            except (AttributeError, TypeError, ValueError):
                raise self._junk("/embeddings", "a reply without embeddings") from None
            if len(vectors) != len(chunk) or len({len(v) for v in vectors}) != 1 or not vectors[0]:
                raise self._junk(
                    "/embeddings", f"{len(vectors)} embeddings of mixed or zero width for {len(chunk)} texts"
                )
            rows += vectors
        width = len(rows[0]) if rows else 0
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), width)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "model": self.model,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "api_key_set": self._key is not None,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "requests_per_minute": self._limiter.per_minute,
            "batch_size": self.batch_size,
        }
