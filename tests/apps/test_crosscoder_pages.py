"""A crosscoder's feature store in the web app (served without a model): the feature list filters by
model-diffing tag in the API and on the page, shows each latent's tag and Δnorm; a latent's page shows its
member models (decoder norms, share, logit effects), tag, cosine and ν, and per-model example activations;
the static export and the Neuronpedia JSON carry the same."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from saelab.analysis.store import FeatureStore
from tests.analysis.test_crosscoder_store import A_ONLY, B_ONLY, WIDTH, build


@pytest.fixture(scope="module")
def crosscoder_store(tmp_path_factory):
    return build(tmp_path_factory.mktemp("crosscoder_pages"))[3]


@pytest.fixture(scope="module")
def client(crosscoder_store):
    from saelab.server import create_app

    with TestClient(create_app(crosscoder_store)) as c:
        yield c


def test_the_feature_api_filters_by_tag_and_carries_tag_and_delta_norm(client):
    r = client.get("/api/features", params={"tag": "b_only", "sort": "idx", "order": "asc", "limit": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == len(B_ONLY) and [f["idx"] for f in body["items"]] == list(B_ONLY)
    assert all(f["tag"] == "b_only" and f["delta_norm"] < 0.1 for f in body["items"])
    a_only = client.get("/api/features", params={"tag": "a_only", "limit": 100}).json()
    assert sorted(f["idx"] for f in a_only["items"]) == list(A_ONLY)
    everything = client.get("/api/features", params={"limit": 100}).json()
    assert everything["total"] == WIDTH and {f["tag"] for f in everything["items"]} >= {"b_only", "a_only"}
    by_delta = client.get("/api/features", params={"sort": "delta_norm", "order": "asc", "limit": 100}).json()
    deltas = [f["delta_norm"] for f in by_delta["items"]]
    assert deltas == sorted(deltas)
    bad = client.get("/api/features", params={"tag": "c_only"})
    assert bad.status_code == 422 and "b_only" in bad.text  # the allowed tags are named
    meta = client.get("/api/meta").json()
    assert [m.rsplit("/", 1)[-1] for m in meta["members"]] == ["base", "tuned"]
    assert meta["tag_counts"]["b_only"] == len(B_ONLY)


def test_a_latent_carries_its_members_diff_and_per_model_example_activations(client):
    f = client.get(f"/api/features/{B_ONLY[0]}").json()
    assert f["diff"]["tag"] == "b_only" and f["diff"]["nu_eps"] is None
    assert [m["label"] for m in f["members"]] == ["base", "tuned"]
    assert f["members"][1]["share"] > 0.9 and len(f["members"][1]["logits_pos"]) == 4
    active = next(
        i for i in range(WIDTH) if client.get(f"/api/features/{i}").json()["n_active"] > 0
    )  # fmt: skip
    norms = [m["decoder_norm"] for m in client.get(f"/api/features/{active}").json()["members"]]
    items = client.get(f"/api/features/{active}/examples").json()["items"]
    assert items
    for ex in items:
        assert [m["value"] for m in ex["members"]] == pytest.approx([ex["value"] * n for n in norms])


def test_the_list_page_has_a_tag_control_and_the_export_shows_members(client, crosscoder_store, tmp_path):
    html = client.get("/").text
    assert 'id="tag-select"' in html and '<option value="b_only">b_only</option>' in html
    assert "<th>Tag</th>" in html
    assert 'id="crosscoder"' in client.get("/feature/0").text  # the container app.js fills
    from saelab.export import export_html, neuronpedia_feature

    out = export_html(crosscoder_store, tmp_path / "dash.html", [B_ONLY[0]])
    page = out.read_text()
    assert 'class="data members"' in page and 'class="tag tag-b_only"' in page and "tuned" in page
    with FeatureStore(crosscoder_store, create=False) as store:
        record = neuronpedia_feature(store, B_ONLY[0], "pair", "0")
    assert record["saelab_crosscoder"]["diff"]["tag"] == "b_only"


def test_browser_filters_by_tag_and_shows_a_latent_of_one_model(crosscoder_store, tmp_path):
    from saelab.server import create_app
    from tests.browser import require_browser, serve

    chromium, sync_api = require_browser()
    for base_url in serve(create_app(crosscoder_store)):
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(base_url + "/?tag=b_only")
            page.wait_for_selector("#feature-rows tr[data-idx]")
            sync_api.expect(page.locator("#total-count")).to_have_text(f"{len(B_ONLY)} matching")
            assert set(page.locator("#feature-rows .tag").all_inner_texts()) == {"b_only"}
            page.select_option("#tag-select", "a_only")
            sync_api.expect(page.locator("#feature-rows .tag").first).to_have_text("a_only")
            sync_api.expect(page.locator("#total-count")).to_have_text(f"{len(A_ONLY)} matching")
            page.wait_for_url(re.compile(r"tag=a_only"))  # the list's address keeps the filter
            page.locator("#feature-rows a.feature-link").first.click()
            page.wait_for_url(re.compile(r"/feature/\d+$"))
            page.wait_for_selector("#crosscoder:not([hidden]) table.members tr[data-member]")
            assert page.locator("#crosscoder tr[data-member]").count() == 2
            assert page.inner_text("#crosscoder .tag") == "a_only"
            page.wait_for_selector("#top-examples .example")
            if page.locator("#top-examples .ex-member").count():
                assert "base" in page.inner_text("#top-examples .ex-members")
            page.screenshot(path=tmp_path / "crosscoder.png", full_page=True)
            browser.close()
            assert not errors
