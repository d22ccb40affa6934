"""The local web app: a JSON API over the feature store (plus live encoding) and thin HTML pages on top.

Every read goes through `saelab.store.FeatureStore`; each request opens its own connection in the
thread that serves it (SQLite connections may not cross threads). Pages are Jinja shells whose
plain JS (static/app.js) fetches the API, so nothing is loaded from the network.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from saelab.errors import SaelabError
from saelab.features import hist_bins
from saelab.server.live import MAX_TEXT_CHARS, MAX_TOKENS, LiveModel, TextTooLongError
from saelab.store import FeatureStore

HERE = Path(__file__).parent
DENSE_THRESHOLD = 0.1  # the pages' "hide dense" filter: latents firing on more than 10% of tokens
MAX_PAGE = 500
MAX_BODY_BYTES = 64 * 1024
MAX_EXPLANATION_CHARS = 4000
TOP_PER_TOKEN = 10
LOCAL_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]", "testserver"]

FeatureIdx = PathParam(description="latent index (0 .. d_sae-1)")


class ActivationsRequest(BaseModel):
    text: str = Field(min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens")
    feature: int | None = Field(None, description="latent whose per-token activation to report")


class TextSearchRequest(BaseModel):
    text: str = Field(min_length=1, description=f"at most {MAX_TEXT_CHARS} characters / {MAX_TOKENS} tokens")
    limit: int = Field(50, ge=1, le=MAX_PAGE)


class ExplanationRequest(BaseModel):
    text: str | None = Field(None, description="the explanation; null or blank removes it")


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

    def open_store() -> FeatureStore:
        return FeatureStore(store_path, create=False)

    def text_of(token_id: int) -> str:
        if 0 <= token_id < len(vocab):
            return vocab[token_id]
        return f"<{token_id}>"

    def missing(idx: int) -> HTTPException:
        return HTTPException(
            404,
            f"feature {idx} does not exist; this dictionary has {n_features} latents"
            + (f" (0-{n_features - 1})" if n_features else ""),
        )

    def require_live() -> LiveModel:
        if live is None:
            raise HTTPException(
                503,
                "live encoding is off: the server was started without a model and dictionary. Restart it "
                "with them (saelab serve with the dictionary and model) to encode your own text.",
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
            "limits": {"text_chars": MAX_TEXT_CHARS, "tokens": MAX_TOKENS, "page": MAX_PAGE},
        }

    @app.get("/api/features")
    def api_features(
        sort: Literal["density", "max_act", "mean_act", "n_active", "idx"] = "density",
        order: Literal["desc", "asc"] = "desc",
        offset: int = Query(0, ge=0),
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
    def api_feature(idx: int = FeatureIdx) -> dict:
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
    def api_examples(idx: int = FeatureIdx, kind: Literal["top", "quantile"] = "top") -> dict:
        """Stored examples: windows of {id, text, value} tokens (padding dropped); `center` is the
        activating token's index in `tokens`."""
        with open_store() as s:
            if s.feature(idx) is None:
                raise missing(idx)
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
        if body.feature is not None and not 0 <= body.feature < n_features:
            raise missing(body.feature)
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
    def api_set_explanation(idx: int = FeatureIdx, body: ExplanationRequest = Body()) -> dict:
        """Set (or, with null/blank text, remove) a latent's explanation."""
        text = None if body.text is None or not body.text.strip() else body.text.strip()
        if text is not None and len(text) > MAX_EXPLANATION_CHARS:
            raise HTTPException(
                413, f"explanation has {len(text)} characters; at most {MAX_EXPLANATION_CHARS}"
            )
        with open_store() as s:
            if s.feature(idx) is None:
                raise missing(idx)
            s.set_explanation(idx, text)
        return {"idx": idx, "explanation": text}

    # -- pages ------------------------------------------------------------------------------------
    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context = {"title": "saelab", "live": live is not None, **context}
        return templates.TemplateResponse(request, name, context, status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page(request: Request):
        return page(request, "index.html", dense_threshold=DENSE_THRESHOLD)

    @app.get("/feature/{idx}", response_class=HTMLResponse, include_in_schema=False)
    def feature_page(request: Request, idx: int):
        if not 0 <= idx < n_features:
            return page(request, "error.html", 404, message=missing(idx).detail)
        return page(request, "feature.html", idx=idx, title=f"saelab: feature {idx}")

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request):
        return page(request, "search.html", title="saelab: search")

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
