"""FastAPI dependencies: each route asks for what it needs (the state, a store connection, the display
context, a checked latent index, the live model) and gets it from `app.state.saelab`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam

from saelab.analysis.store import FeatureStore
from saelab.analysis.views import DisplayContext
from saelab.errors import SaelabError, TextTooLongError
from saelab.server.live import LiveModel
from saelab.server.state import ServerState


def server_state(request: Request) -> ServerState:
    return request.app.state.saelab


State = Annotated[ServerState, Depends(server_state)]


def store_opener(state: State) -> Callable[[], FeatureStore]:
    """Opens a connection when called; a route uses it in `with`, in the thread that serves it."""
    return state.open_store


OpenStore = Annotated[Callable[[], FeatureStore], Depends(store_opener)]


def display_context(state: State) -> DisplayContext:
    return state.display


Display = Annotated[DisplayContext, Depends(display_context)]


def feature_idx(state: State, idx: int = PathParam(description="latent index (0 .. d_sae-1)")) -> int:
    """The `{idx}` path parameter of the API routes, checked against the store's range."""
    return state.known(idx)


FeatureIdx = Annotated[int, Depends(feature_idx)]


def live_model(state: State) -> LiveModel | None:
    return state.live


Live = Annotated[LiveModel | None, Depends(live_model)]


def require_live(
    live: LiveModel | None, what: str = "live encoding", use: str = "encode your own text"
) -> LiveModel:
    """The live model, or 503 saying how to start a server with one. Called inside a route, after its
    body and latent checks, so a bad request gets its 4xx whether or not a model is loaded."""
    if live is None:
        raise HTTPException(
            503,
            f"{what} is off: the server was started without a model and dictionary (--no-live). Restart "
            f"it with them (saelab serve without --no-live) to {use}.",
        )
    return live


@contextmanager
def live_refusals(status: int) -> Iterator[None]:
    """The live model's refusals as HTTP errors: text over a limit 413, any other saelab error `status`."""
    try:
        yield
    except TextTooLongError as e:
        raise HTTPException(413, str(e)) from None
    except SaelabError as e:
        raise HTTPException(status, str(e)) from None
