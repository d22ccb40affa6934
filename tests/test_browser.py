"""The web app in a real browser: Python Playwright driving Debian's Chromium (never a downloaded one).

`make test` installs Chromium and sets SAELAB_REQUIRE_BROWSER=1, so there a missing browser fails;
elsewhere these tests are skipped when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time

import pytest

from tests.test_server import TEXT, setup  # noqa: F401 (the tiny analysed store, as a fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("SAELAB_REQUIRE_BROWSER") == "1":
        raise RuntimeError("Chromium is missing: `apt-get install chromium` (make test does it).")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(setup):  # noqa: F811
    import uvicorn

    from saelab.server import create_app

    lm, sae, path = setup
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(path, lm, sae), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the web app did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(base_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.js_errors = errors
        yield page
        browser.close()


def test_list_then_feature_page_with_highlighted_tokens(page, base_url, tmp_path):
    page.goto(base_url + "/")
    page.wait_for_selector("#feature-rows tr[data-idx]")
    assert page.locator("#feature-rows tr[data-idx]").count() > 5
    assert "of" in page.inner_text("#page-info")
    page.screenshot(path=tmp_path / "list.png")

    link = page.locator("#feature-rows a.feature-link").first
    idx = link.get_attribute("data-idx")
    link.click()
    page.wait_for_url(re.compile(rf"/feature/{idx}$"))
    page.wait_for_selector("#top-examples span.tok")
    assert page.inner_text("#feature-title").strip() == f"Feature {idx}"
    coloured = page.locator("#top-examples span.tok[style*='background']")
    assert coloured.count() > 0
    assert re.search(r"\d", coloured.first.get_attribute("title") or "")  # hover shows the value
    assert page.locator("#act-hist rect.bar").count() > 0
    page.screenshot(path=tmp_path / "feature.png", full_page=True)
    assert not page.js_errors


def test_test_your_own_text_shows_activations_and_top_features(page, base_url):
    page.goto(base_url + "/feature/3")
    page.wait_for_selector("#top-examples span.tok, #top-examples .muted")
    page.fill("#test-text", TEXT)
    page.click("#test-run")
    page.wait_for_selector("#test-tokens span.tok")
    tokens = page.locator("#test-tokens span.tok")
    assert tokens.count() >= len(TEXT.split())
    values = [float(tokens.nth(i).get_attribute("data-value") or 0) for i in range(tokens.count())]
    assert all(v >= 0 for v in values)
    tokens.nth(tokens.count() - 1).click()  # the last token is never BOS: TopK gives it features
    page.wait_for_selector("#token-feature-list a.feature-link")
    assert page.locator("#token-feature-list a.feature-link").count() > 0
    assert not page.js_errors


def test_neighbour_link_opens_that_feature(page, base_url):
    page.goto(base_url + "/feature/0")
    page.wait_for_selector("#neighbours a.feature-link")
    link = page.locator("#neighbours a.feature-link").first
    target = link.get_attribute("data-idx")
    link.click()
    page.wait_for_url(re.compile(rf"/feature/{target}$"))
    page.wait_for_selector("#feature-stats dt")
    assert page.inner_text("#feature-title").strip() == f"Feature {target}"


def test_search_by_token_and_by_text(page, base_url, tmp_path):
    page.goto(base_url + "/search")
    page.fill("#token-query", "w")
    page.click("#token-search")
    page.wait_for_selector("#token-results a.feature-link")
    page.fill("#text-query", TEXT)
    page.click("#text-search")
    page.wait_for_selector("#text-results a.feature-link")
    assert page.locator("#text-results a.feature-link").count() > 0
    page.screenshot(path=tmp_path / "search.png", full_page=True)
    assert not page.js_errors
