"""saelab's local web app: browse a feature store and encode text live (`create_app`, `serve`)."""

from __future__ import annotations

from saelab.server.app import create_app, serve

__all__ = ["create_app", "serve"]
