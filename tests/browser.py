"""Debian's Chromium driven by Playwright, for the browser checks (never a browser Playwright downloads)."""

from __future__ import annotations

import os
import shutil

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
