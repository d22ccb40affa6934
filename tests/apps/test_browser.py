"""The web app in a real browser: Python Playwright driving Debian's Chromium (never a downloaded one).

`make test` installs Chromium and sets SAELAB_REQUIRE_BROWSER=1, so there a missing browser fails;
elsewhere these tests are skipped when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import re

import pytest

from tests.browser import require_browser, serve
from tests.stores import STORE_TEXT as TEXT

CHROMIUM, sync_api = require_browser()


@pytest.fixture(scope="module")
def base_url(analysed):
    from saelab.server import create_app

    lm, sae, path = analysed
    yield from serve(create_app(path, lm, sae))


@pytest.fixture(scope="module")
def explained_url(tmp_path_factory):
    """The hand-written tiny store with auto, self and human labels and their scores, served without a model."""
    from saelab.server import create_app
    from tests.stores import explain_tiny_store, write_tiny_store

    path = tmp_path_factory.mktemp("explained") / "tiny.db"
    with write_tiny_store(path) as store:
        explain_tiny_store(store)
        store.set_dreams(0, [{"token_ids": [1, 2], "text": "thecat", "activation": 3.0, "cross_entropy": 4.25,
                              "lam": 0.5}], run_key="r")  # fmt: skip
    yield from serve(create_app(path))


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


def test_steering_panel_shows_unsteered_and_steered(page, base_url, tmp_path):
    page.goto(base_url + "/feature/3")
    page.wait_for_selector("#feature-stats dt")  # the slider's range is set from the feature's stats
    assert page.is_hidden("#steer-results") and page.is_hidden("#steer-spinner")
    page.fill("#steer-prompt", TEXT)
    page.fill("#steer-strength", "6")  # the slider; the number box follows it
    assert float(page.input_value("#steer-strength-value")) == 6
    page.fill("#steer-tokens", "6")
    page.click("#steer-run")
    page.wait_for_selector("#steer-results:not([hidden])")
    unsteered, steered = page.inner_text("#steer-unsteered"), page.inner_text("#steer-steered")
    assert unsteered.strip() and steered.strip() and unsteered != steered
    assert "add 6" in page.inner_text("#steer-steered-title")
    assert (
        page.is_hidden("#steer-spinner") and page.is_enabled("#steer-run") and page.is_hidden("#steer-error")
    )
    page.screenshot(path=tmp_path / "steer.png", full_page=True)

    page.fill("#steer-strength-value", "0")  # the number box: strength 0 is no edit at all
    page.click("#steer-run")
    sync_api.expect(page.locator("#steer-steered-title")).to_contain_text("add 0")
    assert page.inner_text("#steer-unsteered") == page.inner_text("#steer-steered")

    page.fill("#steer-strength-value", "5000")  # over the server's limit: the panel shows its message
    page.click("#steer-run")
    page.wait_for_selector("#steer-error:not([hidden])")
    assert "strength" in page.inner_text("#steer-error") and page.is_hidden("#error")
    assert not page.js_errors


def test_build_a_vector_lists_features_and_links_them(page, base_url, tmp_path):
    page.goto(base_url + "/")
    page.click("#nav-vector")
    page.wait_for_url(re.compile(r"/vector$"))
    page.fill("#vector-positive", "w1 w2 w3\n\nw4 w5\n")  # blank lines are ignored
    page.fill("#vector-negative", "w40 w41\nw42 w43 w44 w45")
    page.fill("#vector-n", "5")
    page.click("#vector-run")
    page.wait_for_selector("#vector-rows a.feature-link")
    rows = page.locator("#vector-rows tr")
    assert 0 < rows.count() <= 5
    coefficients = [float(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(rows.count())]
    assert coefficients == sorted(coefficients, reverse=True)
    assert re.search(
        r"2 positive . 2 negative prompts .* cosine [0-9.e-]+", page.inner_text("#vector-summary")
    )
    page.screenshot(path=tmp_path / "vector.png", full_page=True)

    link = page.locator("#vector-rows a.feature-link").first
    target = link.get_attribute("data-idx")
    link.click()
    page.wait_for_url(re.compile(rf"/feature/{target}$"))
    page.wait_for_selector("#feature-stats dt")
    assert page.inner_text("#feature-title").strip() == f"Feature {target}"
    assert not page.js_errors


def test_vector_page_shows_the_servers_message(page, base_url):
    page.goto(base_url + "/vector")
    page.fill("#vector-positive", "w1 w2")
    page.fill("#vector-negative", "w1 w2")  # the same prompts: a zero vector, refused with a message
    page.click("#vector-run")
    page.wait_for_selector("#vector-error:not([hidden])")
    assert "all zeros" in page.inner_text("#vector-error") and page.is_hidden("#vector-table")
    page.fill("#vector-negative", "")
    page.click("#vector-run")
    assert "at least one" in page.inner_text("#vector-error")
    assert not page.js_errors


def test_explanations_scores_and_flags_on_the_list_feature_and_search_pages(page, explained_url, tmp_path):
    page.goto(explained_url + "/?sort=score&order=desc&offset=0")
    page.wait_for_selector("#feature-rows tr[data-idx]")
    assert page.input_value("#sort-select") == "score"
    rows = page.locator("#feature-rows tr[data-idx]")
    assert [rows.nth(i).get_attribute("data-idx") for i in range(rows.count())] == ["0", "1"]  # dead hidden
    first, second = rows.nth(0).locator("td"), rows.nth(1).locator("td")
    assert first.nth(5).inner_text() == "AUTO the word cat" or first.nth(5).inner_text().endswith(
        "the word cat"
    )
    assert first.nth(6).inner_text().startswith("0.900 (chance 0.500, shuffled 0.550)")
    assert "not above shuffled" not in first.nth(6).inner_text() and first.nth(7).inner_text() == "cata↵b<i>"
    assert "not above shuffled" in second.nth(6).inner_text()  # its interval reaches the shuffled score
    page.select_option("#order-select", "asc")
    sync_api.expect(page.locator("#feature-rows tr").first).to_have_attribute("data-idx", "1")
    page.fill("#min-score", "0.75")
    page.dispatch_event("#min-score", "change")
    sync_api.expect(page.locator("#feature-rows tr")).to_have_count(1)
    assert page.inner_text("#total-count") == "1 matching"
    page.screenshot(path=tmp_path / "list-scores.png")

    page.goto(explained_url + "/feature/0")
    page.wait_for_selector("#explanations .expl-entry")
    entries = page.locator("#explanations .expl-entry")
    assert [entries.nth(i).get_attribute("data-kind") for i in range(3)] == ["auto", "self", "human"]
    assert entries.nth(1).locator("tr.flagged .flag").is_visible()
    assert "no better than a shuffled label" in entries.nth(1).inner_text()
    assert entries.nth(0).locator("tr.flagged").count() == 0
    assert (
        entries.nth(0).locator("tr[data-scorer]").count() == 2
        and "felines <b>" in entries.nth(1).inner_text()
    )
    assert page.inner_text("#explanation") == "cats & <dogs>"
    page.fill("#explanation-input", "tabby cats")
    page.click("#explanation-save")
    sync_api.expect(page.locator("#explanations .expl-entry[data-kind='human'] .expl-text")).to_have_text(
        "tabby cats"
    )
    assert page.locator("#explanations .expl-entry").count() == 3  # the other kinds stay
    dream = page.locator("#dreams tr.dream")
    assert dream.count() == 1 and dream.locator("td").nth(0).inner_text() == "thecat"
    assert dream.locator("td").nth(3).inner_text() == "4.25" and dream.locator(
        ".of-max"
    ).inner_text().endswith("%")
    assert page.is_disabled("#explain-now")  # this server has no model
    page.screenshot(path=tmp_path / "feature-explanations.png", full_page=True)

    page.goto(explained_url + "/search")
    page.fill("#expl-query", "t")
    page.click("#expl-search")
    page.wait_for_selector("#expl-results li a.feature-link")
    links = page.locator("#expl-results a.feature-link")
    assert [links.nth(i).get_attribute("data-idx") for i in range(links.count())] == ["0", "1"]  # by score
    assert not page.js_errors


def test_explain_now_adds_a_scored_label_to_the_page(page, base_url, tmp_path):
    page.goto(base_url + "/feature/3")
    page.wait_for_selector("#feature-stats dt")
    assert page.inner_text("#dreams").startswith("no dreamed prompts")
    before = page.locator("#explanations .expl-entry[data-kind='auto']").count()
    page.select_option("#explain-now-method", "auto")
    page.click("#explain-now")
    autos = page.locator("#explanations .expl-entry[data-kind='auto']")
    sync_api.expect(autos).to_have_count(before + 1, timeout=120_000)
    entry = page.locator("#explanations .expl-entry[data-kind='auto']").first
    assert entry.locator("tr[data-scorer]").count() == 3 and entry.locator(".expl-text").inner_text().strip()
    assert page.is_hidden("#explain-now-spinner") and page.is_enabled("#explain-now")
    page.screenshot(path=tmp_path / "explain-now.png", full_page=True)
    assert not page.js_errors
