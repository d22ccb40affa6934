"""A real OpenAI-compatible HTTP server for tests: FastAPI + uvicorn in a thread on 127.0.0.1.

It answers /v1/chat/completions, /v1/completions (with echo + logprobs + max_tokens=0, as vLLM does)
and /v1/embeddings by calling a `LocalClient`, so the HTTP client can be checked against the local
client on the same model. `faults` makes it misbehave on purpose (status codes, empty or junk
replies, slowness) to check the client's errors and retries; `seen` records every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from saelab.explain.clients import LocalClient


class Faults:
    """Misbehaviour, consumed per request: `status` answers the next N requests with that code;
    `mode` ("empty", "junk", "no_logprobs", "not_json", "slow") changes every reply while set."""

    def __init__(self):
        self.status: list[int] = []
        self.mode: str | None = None
        self.delay = 2.0


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}},
        status_code=status,
        headers=headers,
    )


def make_app(client: LocalClient, model: str, api_key: str | None, faults: Faults, seen: list) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def gate(request: Request, call_next):
        seen.append((time.monotonic(), request.url.path))
        presented = request.headers.get("authorization", "").removeprefix("Bearer ")
        if api_key is not None and presented != api_key:
            # Echo the key back, as some providers do: the client must scrub it from its message.
            return _error(401, f"Incorrect API key provided: {presented}.")
        if faults.status:
            status = faults.status.pop(0)
            return _error(status, f"fault {status}", headers={"retry-after-ms": "10"})
        if faults.mode == "slow":
            await asyncio.sleep(faults.delay)
        if faults.mode == "not_json":
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=200)
        body = await request.json()
        if body.get("model") != model:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        if faults.mode == "empty":
            return JSONResponse({"id": "x", "object": "list", "choices": [], "data": []})
        if faults.mode == "junk":
            return JSONResponse({"id": "x", "choices": [{"index": 0, "text": None, "message": {}}]})
        return await call_next(request)

    def settings(body: dict) -> dict:
        return {
            "max_new_tokens": body.get("max_tokens") or 16,
            "temperature": body.get("temperature", 1.0),
            "seed": body.get("seed") or 0,
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        (text,) = client.generate([body["messages"]], **settings(body))
        message = {"role": "assistant", "content": text}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        if body.get("max_tokens") == 0:
            if not (body.get("echo") and body.get("logprobs") is not None):
                return _error(400, "max_tokens=0 needs echo=True and logprobs.")
            choices = []
            for i, scores in enumerate(client.score_tokens(prompts)):
                logprobs = {
                    "tokens": scores.tokens,
                    "text_offset": scores.starts,
                    "token_logprobs": None if faults.mode == "no_logprobs" else scores.logprobs,
                    "top_logprobs": None,
                }
                choices.append(
                    {"index": i, "text": prompts[i], "logprobs": logprobs, "finish_reason": "length"}
                )
        else:
            texts = client.generate(prompts, **settings(body))
            choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": choices,
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = client.embed(texts).tolist()
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    return app


class Server:
    """The running server: `url` (ends in /v1), `faults`, `seen` (monotonic time, path) per request."""

    def __init__(self, url: str, faults: Faults, seen: list):
        self.url, self.faults, self.seen = url, faults, seen


@contextlib.contextmanager
def serve(client: LocalClient, model: str = "tiny", api_key: str | None = None) -> Iterator[Server]:
    """Run the app on a free port of 127.0.0.1 for the duration of the block."""
    faults, seen = Faults(), []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        make_app(client, model, api_key, faults, seen), log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Server(f"http://127.0.0.1:{port}/v1", faults, seen)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
