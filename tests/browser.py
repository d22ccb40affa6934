"""Debian's Chromium driven by Playwright, for the browser checks (never a browser Playwright downloads)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def require_browser():
    """(Chromium's path, playwright.sync_api); skips without Chromium, except under `make test`, which
    sets SAELAB_REQUIRE_BROWSER=1 so that a missing browser fails instead of passing unseen."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("SAELAB_REQUIRE_BROWSER") == "1":
            raise RuntimeError("Chromium is missing: `apt-get install chromium` (make test does it).")
        pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
    return CHROMIUM, pytest.importorskip("playwright.sync_api")


def serve(app):
    """Run `app` on a free local port in a thread; yields its base URL, stops it afterwards."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the web app did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
