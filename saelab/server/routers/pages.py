"""The HTML pages: Jinja shells whose plain JS (static/app.js) fetches the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from saelab.server.deps import State
from saelab.server.limits import DENSE_THRESHOLD
from saelab.server.live import MAX_NEW_TOKENS, MAX_STRENGTH, MAX_VECTOR_FEATURES, MAX_VECTOR_PROMPTS

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parents[1] / "templates"))

router = APIRouter(include_in_schema=False)


def page(request: Request, state: State, name: str, status: int = 200, **context) -> HTMLResponse:
    context = {"title": "saelab", "live": state.live is not None, **context}
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status)


@router.get("/", response_class=HTMLResponse)
def index_page(request: Request, state: State):
    from saelab.dictionaries.families.crosscoder import TAGS

    tags = TAGS if state.display.members else ()  # the tag filter, for a crosscoder's store only
    return page(request, state, "index.html", dense_threshold=DENSE_THRESHOLD, tags=tags)


@router.get("/feature/{idx}", response_class=HTMLResponse)
def feature_page(request: Request, state: State, idx: int):
    from saelab.server.routers.graphs import graphs_using  # graphs renders its pages with page()

    if idx not in state.latents:
        return page(request, state, "error.html", 404, message=state.missing(idx).detail)
    return page(
        request, state, "feature.html", idx=idx, title=f"saelab: feature {idx}",
        max_strength=MAX_STRENGTH, max_new_tokens=MAX_NEW_TOKENS, graphs=graphs_using(state, idx),
    )  # fmt: skip


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, state: State):
    return page(request, state, "search.html", title="saelab: search")


@router.get("/vector", response_class=HTMLResponse)
def vector_page(request: Request, state: State):
    live = state.live
    return page(
        request, state, "vector.html", title="saelab: build a vector", hook=live.write_hook if live else None,
        max_prompts=MAX_VECTOR_PROMPTS, max_features=min(MAX_VECTOR_FEATURES, state.n_features),
    )  # fmt: skip
