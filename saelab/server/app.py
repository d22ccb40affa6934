"""The local web app: a JSON API over the feature store (plus the live model) and thin HTML pages on top.

Every read goes through `saelab.analysis.store.FeatureStore`; each request opens its own connection in the
thread that serves it (SQLite connections may not cross threads). Pages are Jinja shells whose
plain JS (static/app.js) fetches the API, so nothing is loaded from the network. The routes live in
`saelab.server.routers`, one router per concern, and read the store, the display context and the live
model from `app.state.saelab` (`saelab.server.state.ServerState`).

The API (also listed, with schemas, at /docs):
- `GET /api/meta`: what was analysed, latent counts, whether the live model is loaded, the limits.
- `GET /api/features`: one sorted, filtered page of latents.
- `GET /api/features/{i}` and `GET /api/features/{i}/examples?kind=top|quantile`: one latent.
- `PUT /api/features/{i}/explanation` {text}: set or remove its explanation.
- `GET /api/search?q=&kind=token|explanation`: latents by activating token or explanation.
- `POST /api/activations` {text, feature?} and `POST /api/search/text` {text, limit}: live encoding.
- `POST /api/steer` {feature, strength, prompt, mode: add|clamp, scope: all|prompt|generated,
  max_new_tokens <= 64, seed, temperature, chat} -> {prompt, unsteered, steered, ...}: the prompt
  completed twice with the same seed, without and with the latent ("add": strength x its decoder
  row at every position in scope; "clamp": its activation set to strength, SAE error kept).
- `POST /api/vector` {positive: [str], negative: [str], n_features <= 50, chat, method} ->
  {vector_norm, cosine, features: [{idx, coefficient, cosine, share, link, density, max_act, ...}]}:
  the mean difference of the two lists' activations at the dictionary's hook on the last prompt
  token, decomposed into at most n_features latents (`saelab.interventions.decompose`), features sorted
  by coefficient (descending); `cosine` is the reconstruction's cosine with the vector.

Errors are 4xx with a `detail` message, never a 500: 404 unknown latent (any integer, however large,
is checked against the store's range before SQL sees it), 413 text, list or body over its limit, 415 a
write whose body is not JSON, 422 a malformed value (NaN, out of range, an offset past the last latent,
text with unpaired surrogates), 503 a live endpoint (activations, text search, steer, vector) on a
server started without a model.
Generation and vectors run in FastAPI's threadpool (plain `def` endpoints), one at a time.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.server.limits import MAX_BODY_BYTES
from saelab.server.routers import (
    activations,
    explanations,
    features,
    graphs,
    meta,
    pages,
    search,
    steer,
    vector,
)
from saelab.server.state import ServerState

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]", "testserver"]
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
ROUTERS = (meta, features, activations, search, explanations, steer, vector, graphs, pages)


async def guard(request: Request, call_next):
    """Writes need a JSON body (so no cross-site form can post) of bounded size; pages get a strict CSP."""
    if request.method in ("POST", "PUT", "PATCH", "DELETE"):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return JSONResponse({"detail": "send the body as application/json"}, status_code=415)
        size = request.headers.get("content-length")
        if size is None or not size.isdigit() or int(size) > MAX_BODY_BYTES:
            return JSONResponse(
                {"detail": f"request body missing its length or over {MAX_BODY_BYTES} bytes"},
                status_code=413,
            )
    response = await call_next(request)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = CSP
    if request.url.path.startswith(("/docs", "/redoc")):  # FastAPI's docs load from a CDN
        del response.headers["Content-Security-Policy"]
    return response


async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; the input is not echoed (NaN has no JSON form; a prompt can be long)."""
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(
    store_path: str | Path,
    lm: HookedLM | None = None,
    dictionary: Dictionary | None = None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The app for one feature store; with `lm` and `dictionary` the live endpoints work, else they 503.

    `allowed_hosts` (default: localhost names) guards against DNS rebinding, since the API can write.
    Raises FeatureStoreError at once for a missing or foreign store, not on the first request.
    """
    state = ServerState.load(store_path, lm, dictionary)
    app = FastAPI(
        title="saelab",
        description="Browse the latents of one analysed dictionary; encode your own text live.",
        version="1",
    )
    app.state.saelab = state
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOCAL_HOSTS)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.middleware("http")(guard)
    app.add_exception_handler(RequestValidationError, invalid)
    for module in ROUTERS:
        app.include_router(module.router)
    return app


def serve(
    store_path: str | Path,
    lm: HookedLM | None = None,
    dictionary: Dictionary | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Run the app with uvicorn until interrupted. Binds to localhost unless told otherwise."""
    import uvicorn

    loopback = host in ("127.0.0.1", "localhost", "::1")
    hosts = None if loopback else ["*"]  # serving beyond localhost: accept whatever name reaches it
    app = create_app(store_path, lm, dictionary, allowed_hosts=hosts)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
