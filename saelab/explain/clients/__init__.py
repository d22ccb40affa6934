"""LM clients for explaining and judging features: one protocol, a local and an HTTP implementation.

`make_client(spec, **options)` turns what `--explainer` / `--judge` take into a client:

    local                          the embedded SmolLM2-135M-Instruct, here
    local:<hub id|folder|.gguf>    any Hugging Face causal LM, here
    openai:<model>@<base_url>      any OpenAI-compatible endpoint (vLLM, llama.cpp, ollama, OpenRouter)
    openai:<model>                 api.openai.com

Each kind is one `ClientKind` in `CLIENT_KINDS`: its spec forms, the options it takes, its builder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from saelab.errors import ClientSpecError
from saelab.explain.clients.base import (
    LMClient,
    Message,
    Prompt,
    RateLimiter,
    TokenScores,
    candidate_logprob,
    format_chat,
)
from saelab.explain.clients.local import LocalClient
from saelab.explain.clients.openai_compat import DEFAULT_BASE_URL, OpenAIClient

__all__ = [
    "CLIENT_KINDS",
    "ClientKind",
    "LMClient",
    "LocalClient",
    "Message",
    "OpenAIClient",
    "Prompt",
    "RateLimiter",
    "TokenScores",
    "candidate_logprob",
    "format_chat",
    "make_client",
    "parse_spec",
]


@dataclass(frozen=True)
class ClientKind:
    """One kind of client: the spec prefix, how its forms read, the options it takes, its builder."""

    name: str
    forms: tuple[str, ...]
    options: tuple[str, ...]
    build: Callable[..., LMClient]  # build(target: str | None, **options)


def _local(target: str | None, **options) -> LMClient:
    return LocalClient(target or None, **options)


_URL_RE = re.compile(r"^(?P<model>.+?)@(?P<url>https?://\S+)$")


def _openai(target: str | None, **options) -> LMClient:
    if not target:
        raise ClientSpecError(
            "the spec 'openai' names no model; write openai:<model>@<base_url>, e.g. "
            "openai:Qwen2.5-7B@http://127.0.0.1:8000/v1, or openai:<model> for api.openai.com."
        )
    match = _URL_RE.match(target)
    if match:
        return OpenAIClient(match["model"], match["url"], **options)
    if "@" in target:
        raise ClientSpecError(
            f"the spec 'openai:{target}' has a base URL that does not start with http:// or https://; "
            "write openai:<model>@http://host:port/v1."
        )
    return OpenAIClient(target, DEFAULT_BASE_URL, **options)


CLIENT_KINDS: dict[str, ClientKind] = {
    "local": ClientKind(
        "local",
        ("local", "local:<hub id | folder | .gguf file>"),
        ("lm", "device", "dtype", "batch_size", "top_p", "top_k"),
        _local,
    ),
    "openai": ClientKind(
        "openai",
        ("openai:<model>@<base_url>", "openai:<model>"),
        ("api_key_env", "timeout", "max_retries", "requests_per_minute", "batch_size"),
        _openai,
    ),
}


def _forms() -> str:
    forms = [f for kind in CLIENT_KINDS.values() for f in kind.forms]
    return ", ".join(repr(f) for f in forms) + " (e.g. 'openai:Qwen2.5-7B@http://127.0.0.1:8000/v1')"


def parse_spec(spec: str) -> tuple[ClientKind, str | None]:
    """The kind a spec names and what follows its ':' (None when nothing does)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ClientSpecError(f"an LM client spec is empty; use one of {_forms()}.")
    name, sep, target = spec.strip().partition(":")
    kind = CLIENT_KINDS.get(name.lower())
    if kind is None:
        raise ClientSpecError(f"unknown LM client spec {spec!r}; use one of {_forms()}.")
    if sep and not target:
        raise ClientSpecError(f"the spec {spec!r} ends in ':' with nothing after it; use one of {_forms()}.")
    return kind, target or None


def make_client(spec: str, **options) -> LMClient:
    """The client a spec names, with `options` (those set to None are left at their defaults)."""
    kind, target = parse_spec(spec)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(kind.options))
    if unknown:
        raise ClientSpecError(
            f"{', '.join(u + '=' for u in unknown)} does not apply to the {kind.name} client; "
            f"it takes {', '.join(o + '=' for o in kind.options)}."
        )
    return kind.build(target, **options)
