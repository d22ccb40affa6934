"""The local web app: a JSON API over the feature store (plus the live model) and thin HTML pages on top.

Every read goes through `saelab.analysis.store.FeatureStore`; each request opens its own connection in the
thread that serves it (SQLite connections may not cross threads). Pages are Jinja shells whose
plain JS (static/app.js) fetches the API, so nothing is loaded from the network.

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

import math
from pathlib import Path
from typing import Annotated, Literal

import torch
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import AfterValidator, BaseModel, Field, field_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware

from saelab.analysis.features import hist_bins
from saelab.analysis.store import FeatureStore
from saelab.errors import SaelabError
from saelab.interventions.generation import GenerationConfig
from saelab.server.live import (
    MAX_NEW_TOKENS,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    MAX_VECTOR_FEATURES,
    MAX_VECTOR_PROMPTS,
    LiveModel,
    TextTooLongError,
)

HERE = Path(__file__).parent
DENSE_THRESHOLD = 0.1  # the pages' "hide dense" filter: latents firing on more than 10% of tokens
MAX_PAGE = 500
MAX_BODY_BYTES = 64 * 1024
MAX_EXPLANATION_CHARS = 4000
TOP_PER_TOKEN = 10
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]", "testserver"]

FeatureIdx = PathParam(description="latent index (0 .. d_sae-1)")


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


class ActivationsRequest(BaseModel):
    text: Text = Field(min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens")
    feature: int | None = Field(None, description="latent whose per-token activation to report")


class TextSearchRequest(BaseModel):
    text: Text = Field(min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens")
    limit: int = Field(50, ge=1, le=MAX_PAGE)


class ExplanationRequest(BaseModel):
    text: Text | None = Field(None, description="the explanation; null or blank removes it")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must contain some text, not only whitespace")
    return text


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


def create_app(
    store_path: str | Path,
    lm=None,
    dictionary=None,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """The app for one feature store; with `lm` and `dictionary` the live endpoints work, else they 503.

    `allowed_hosts` (default: localhost names) guards against DNS rebinding, since the API can write.
    Raises FeatureStoreError at once for a missing or foreign store, not on the first request.
    """
    store_path = Path(store_path)
    with FeatureStore(store_path, create=False) as store:
        meta = store.meta()
        vocab = store.vocab()
        n_features = store.count_features()
    edges = meta.get("hist_edges") or []
    window_left = int((meta.get("config") or {}).get("window_left", 0))
    d_sae = int((meta.get("dictionary") or {}).get("d_sae") or n_features)
    live = None
    if lm is not None and dictionary is not None:
        live = LiveModel(lm, dictionary, meta.get("data"), d_sae)
    elif lm is not None or dictionary is not None:
        raise ValueError("pass both lm and dictionary for the live endpoints, or neither")

    app = FastAPI(
        title="saelab",
        description="Browse the latents of one analysed dictionary; encode your own text live.",
        version="1",
    )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOCAL_HOSTS)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.middleware("http")
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
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'"
        )
        if request.url.path.startswith(("/docs", "/redoc")):  # FastAPI's docs load from a CDN
            del response.headers["Content-Security-Policy"]
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the input is not echoed (NaN has no JSON form; a prompt can be long)."""
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    def open_store() -> FeatureStore:
        return FeatureStore(store_path, create=False)

    def text_of(token_id: int) -> str:
        if 0 <= token_id < len(vocab):
            return vocab[token_id]
        return f"<{token_id}>"

    latents = range(n_features)  # `idx in latents` is exact and O(1) for any Python int

    def missing(idx: int) -> HTTPException:
        return HTTPException(
            404,
            f"feature {idx} does not exist; this dictionary has {n_features} latents"
            + (f" (0-{n_features - 1})" if n_features else ""),
        )

    def known(idx: int) -> int:
        """`idx` if it names a latent of this store, else 404 naming the range: every route's one check,
        made before SQL sees the number (SQLite integers stop at 2**63-1 and raise OverflowError past it)."""
        if idx not in latents:
            raise missing(idx)
        return idx

    def feature_idx(idx: int = FeatureIdx) -> int:
        """The `{idx}` path parameter of the API routes, checked by `known`."""
        return known(idx)

    def require_live(what: str = "live encoding", use: str = "encode your own text") -> LiveModel:
        if live is None:
            raise HTTPException(
                503,
                f"{what} is off: the server was started without a model and dictionary (--no-live). Restart "
                f"it with them (saelab serve without --no-live) to {use}.",
            )
        return live

    def encode(text: str):
        model = require_live()
        try:
            return model.encode(text)
        except TextTooLongError as e:
            raise HTTPException(413, str(e)) from None
        except SaelabError as e:
            raise HTTPException(400, str(e)) from None

    # -- JSON API -----------------------------------------------------------------------------------
    @app.get("/api/meta")
    def api_meta() -> dict:
        """What was analysed (dictionary config, model, hook, data, analysis config) and latent counts."""
        with open_store() as s:
            alive = s.count_features(include_dead=False)
            dense = s.count_features(min_density=math.nextafter(DENSE_THRESHOLD, 1.0))
            progress = s.progress()
        return {
            "dictionary": meta.get("dictionary"),
            "model": meta.get("model"),
            "hook_name": meta.get("hook_name"),
            "data": meta.get("data"),
            "config": meta.get("config"),
            "progress": progress,
            "n_features": n_features,
            "n_alive": alive,
            "n_dead": n_features - alive,
            "n_dense": dense,
            "dense_threshold": DENSE_THRESHOLD,
            "vocab_size": len(vocab),
            "live": live is not None,
            "limits": {
                "text_chars": MAX_TEXT_CHARS,
                "tokens": MAX_TOKENS,
                "page": MAX_PAGE,
                "new_tokens": MAX_NEW_TOKENS,
                "strength": MAX_STRENGTH,
                "vector_prompts": MAX_VECTOR_PROMPTS,
                "vector_features": MAX_VECTOR_FEATURES,
            },
        }

    @app.get("/api/features")
    def api_features(
        sort: Literal["density", "max_act", "mean_act", "n_active", "idx"] = "density",
        order: Literal["desc", "asc"] = "desc",
        offset: int = Query(0, ge=0, le=n_features, description="at most the number of latents"),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
        min_density: float | None = Query(None, ge=0.0, le=1.0),
        max_density: float | None = Query(None, ge=0.0, le=1.0),
        include_dead: bool = True,
    ) -> dict:
        """One page of latents sorted server-side: {total (matching the filters), offset, limit, items}."""
        with open_store() as s:
            filters = dict(min_density=min_density, max_density=max_density, include_dead=include_dead)
            total = s.count_features(**filters)
            items = s.list_features(sort, order == "desc", offset, limit, **filters)
        return {"total": total, "offset": offset, "limit": limit, "items": items}

    @app.get("/api/features/{idx}")
    def api_feature(idx: int = Depends(feature_idx)) -> dict:
        """Stats, activation histogram (shared log bins), logit tables and histogram with token text,
        decoder neighbours, co-firing latents and the explanation of one latent."""
        with open_store() as s:
            f = s.feature(idx)
        if f is None:
            raise missing(idx)
        counts = f.get("hist") or []
        return {
            "idx": f["idx"],
            "density": f["density"],
            "mean_act": f["mean_act"],
            "max_act": f["max_act"],
            "n_active": f["n_active"],
            "dead": f["n_active"] == 0,
            "explanation": f.get("explanation"),
            "quantile_edges": f.get("quantile_edges"),
            "hist": {"edges": edges, "counts": counts, "bins": hist_bins(counts, edges)},
            "logits_pos": [
                {"token_id": t, "token": text_of(t), "value": v} for t, v in f.get("logits_pos") or []
            ],
            "logits_neg": [
                {"token_id": t, "token": text_of(t), "value": v} for t, v in f.get("logits_neg") or []
            ],
            "logit_hist": f.get("logit_hist"),
            "neighbours": [{"idx": o, "cosine": c} for o, c in f.get("neighbours") or []],
            "coactivation": [{"idx": c["other"], "count": c["count"]} for c in f.get("coactivation") or []],
        }

    @app.get("/api/features/{idx}/examples")
    def api_examples(idx: int = Depends(feature_idx), kind: Literal["top", "quantile"] = "top") -> dict:
        """Stored examples: windows of {id, text, value} tokens (padding dropped); `center` is the
        activating token's index in `tokens`."""
        with open_store() as s:
            rows = s.examples(idx, kind)
        items = []
        for r in rows:
            tokens, center = [], None
            for j, (t, v) in enumerate(zip(r["tokens"], r["values"], strict=True)):
                if t < 0:
                    continue
                if j == window_left:
                    center = len(tokens)
                tokens.append({"id": t, "text": text_of(t), "value": v})
            items.append({
                "rank": r["rank"], "quantile": r["quantile"], "value": r["value"],
                "context_id": r["context_id"], "position": r["position"], "center": center, "tokens": tokens,
            })  # fmt: skip
        return {"idx": idx, "kind": kind, "items": items}

    @app.post("/api/activations")
    def api_activations(body: ActivationsRequest) -> dict:
        """Encode text live: per token its text, whether it is excluded (BOS/special: all zeros), the
        requested latent's activation (if `feature`), and the top 10 active latents (value descending)."""
        if body.feature is not None:
            known(body.feature)
        ids, acts, excluded = encode(body.text)
        k = min(TOP_PER_TOKEN, acts.shape[1])
        values, idxs = acts.topk(k, dim=1) if len(ids) else (torch.zeros(0, k), torch.zeros(0, k))
        tokens = []
        for pos, t in enumerate(ids):
            row = {"id": t, "text": text_of(t), "excluded": bool(excluded[pos])}
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

    @app.get("/api/search")
    def api_search(
        q: str = Query(min_length=1, max_length=200),
        kind: Literal["token", "explanation"] = "token",
        limit: int = Query(50, ge=1, le=MAX_PAGE),
    ) -> dict:
        """Latents whose top examples fire on a token containing `q` (kind=token, most matches first) or
        whose explanation contains `q` (kind=explanation)."""
        with open_store() as s:
            if kind == "token":
                items = s.search_tokens(q, limit)
            else:
                items = s.search_explanations(q, limit)
        return {"q": q, "kind": kind, "items": items}

    @app.post("/api/search/text")
    def api_search_text(body: TextSearchRequest) -> dict:
        """Latents ranked by their maximum activation on the text (live), with the token where it peaks."""
        ids, acts, _ = encode(body.text)
        if not ids:
            return {"tokens": [], "items": []}
        peak, where = acts.max(dim=0)
        active = (acts > 0).sum(0)
        k = min(body.limit, acts.shape[1])
        values, order = peak.topk(k)
        items = [
            {
                "idx": int(i), "max_value": float(v), "position": int(where[i]),
                "token": text_of(ids[int(where[i])]), "n_tokens_active": int(active[i]),
            }
            for v, i in zip(values.tolist(), order.tolist(), strict=True)
            if v > 0
        ]  # fmt: skip
        return {"tokens": [text_of(t) for t in ids], "items": items}

    @app.put("/api/features/{idx}/explanation")
    def api_set_explanation(idx: int = Depends(feature_idx), body: ExplanationRequest = Body()) -> dict:
        """Set (or, with null/blank text, remove) a latent's explanation."""
        text = None if body.text is None or not body.text.strip() else body.text.strip()
        if text is not None and len(text) > MAX_EXPLANATION_CHARS:
            raise HTTPException(
                413, f"explanation has {len(text)} characters; at most {MAX_EXPLANATION_CHARS}"
            )
        with open_store() as s:
            s.set_explanation(idx, text)
        return {"idx": idx, "explanation": text}

    @app.post("/api/steer")
    def api_steer(body: SteerRequest) -> dict:
        """Complete the prompt twice with the same seed: without and with the latent (add or clamp)."""
        known(body.feature)
        model = require_live("steering", "generate steered text")
        cfg = GenerationConfig(
            max_new_tokens=body.max_new_tokens, temperature=body.temperature, seed=body.seed, chat=body.chat
        )
        try:
            row = model.steer(body.feature, body.strength, body.prompt, body.mode, body.scope, cfg)
        except TextTooLongError as e:
            raise HTTPException(413, str(e)) from None
        except SaelabError as e:
            raise HTTPException(422, str(e)) from None
        return {**body.model_dump(), **row, "hook": model.write_hook}

    @app.post("/api/vector")
    def api_vector(body: VectorRequest) -> dict:
        """Mean-difference vector of two prompt lists (last prompt token), decomposed into latents."""
        for name, prompts in (("positive", body.positive), ("negative", body.negative)):
            if len(prompts) > MAX_VECTOR_PROMPTS:
                raise HTTPException(
                    413, f"{len(prompts)} {name} prompts; give at most {MAX_VECTOR_PROMPTS} per list."
                )
        if body.n_features > n_features:
            raise HTTPException(422, f"n_features must be at most {n_features}, the number of latents.")
        model = require_live("building vectors", "build a vector from prompts")
        try:
            result = model.vector(body.positive, body.negative, body.n_features, body.chat, body.method)
        except TextTooLongError as e:
            raise HTTPException(413, str(e)) from None
        except SaelabError as e:
            raise HTTPException(422, str(e)) from None
        features = sorted(result.features, key=lambda f: -f.coefficient)
        with open_store() as s:
            stats = {f.index: s.feature(f.index) or {} for f in features}
        items = [
            {
                "idx": f.index, "coefficient": f.coefficient, "cosine": f.cosine, "share": f.share,
                "link": f"/feature/{f.index}", "density": stats[f.index].get("density"),
                "max_act": stats[f.index].get("max_act"), "mean_act": stats[f.index].get("mean_act"),
                "explanation": stats[f.index].get("explanation"),
            }
            for f in features
        ]  # fmt: skip
        return {
            "hook": model.write_hook, "position": -1, "chat": body.chat, "method": result.method,
            "n_positive": len(body.positive), "n_negative": len(body.negative), "n_features": body.n_features,
            "vector_norm": result.vector_norm, "cosine": result.cosine,
            "residual_norm": result.residual_norm, "relative_residual": result.relative_residual,
            "features": items,
        }  # fmt: skip

    # -- pages ------------------------------------------------------------------------------------
    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context = {"title": "saelab", "live": live is not None, **context}
        return templates.TemplateResponse(request, name, context, status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page(request: Request):
        return page(request, "index.html", dense_threshold=DENSE_THRESHOLD)

    @app.get("/feature/{idx}", response_class=HTMLResponse, include_in_schema=False)
    def feature_page(request: Request, idx: int):
        if idx not in latents:
            return page(request, "error.html", 404, message=missing(idx).detail)
        return page(
            request, "feature.html", idx=idx, title=f"saelab: feature {idx}",
            max_strength=MAX_STRENGTH, max_new_tokens=MAX_NEW_TOKENS,
        )  # fmt: skip

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request):
        return page(request, "search.html", title="saelab: search")

    @app.get("/vector", response_class=HTMLResponse, include_in_schema=False)
    def vector_page(request: Request):
        return page(
            request, "vector.html", title="saelab: build a vector", hook=live.write_hook if live else None,
            max_prompts=MAX_VECTOR_PROMPTS, max_features=min(MAX_VECTOR_FEATURES, n_features),
        )  # fmt: skip

    return app


def serve(
    store_path: str | Path,
    lm=None,
    dictionary=None,
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
