"""Each router of saelab.server mounted alone on a bare FastAPI app, over a tiny hand-written store and a
fake live model: routes depend only on `app.state.saelab`, not on `create_app`."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from saelab.analysis.views import DisplayContext
from saelab.server.routers import features, meta, pages, steer
from saelab.server.routers.pages import TEMPLATES
from saelab.server.state import ServerState
from tests.stores import META, write_tiny_store


class FakeLive:
    """Stands in for LiveModel: records the steering call instead of running a model."""

    write_hook = "blocks.0.hook_resid_post"

    def __init__(self):
        self.calls = []

    def steer(self, feature, strength, prompt, mode, scope, cfg):
        self.calls.append((feature, strength, prompt, mode, scope, cfg.max_new_tokens))
        return {"prompt": prompt, "unsteered": "a b", "steered": "c d"}


@pytest.fixture
def state(tmp_path):
    path = tmp_path / "tiny.db"
    with write_tiny_store(path) as store:
        display = DisplayContext.of(store)
    return ServerState(path, META, 3, display)


def mounted(router, state: ServerState) -> TestClient:
    app = FastAPI()
    app.state.saelab = state
    app.include_router(router)
    return TestClient(app)


def test_features_router_alone(state):
    client = mounted(features.router, state)
    f = client.get("/api/features/0").json()
    assert f["idx"] == 0 and f["logits_pos"][1] == {"token_id": 99, "token": "<99>", "value": 0.25}
    assert f["coactivation"] == [{"idx": 1, "count": 4}]
    top = client.get("/api/features/0/examples").json()["items"]
    assert [t["text"] for t in top[0]["tokens"]] == ["cat", "a\nb", "<i>"] and top[0]["center"] == 0
    r = client.get("/api/features/3")
    assert r.status_code == 404 and r.json() == {
        "detail": "feature 3 does not exist; this dictionary has 3 latents (0-2)"
    }
    page = client.get("/api/features", params={"sort": "idx", "order": "asc", "include_dead": False}).json()
    assert page["total"] == 2 and [f["idx"] for f in page["items"]] == [0, 1]
    r = client.get("/api/features", params={"offset": 4})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "offset"]
    assert client.get("/api/features", params={"offset": 3}).json()["items"] == []


def test_meta_router_alone(state):
    m = mounted(meta.router, state).get("/api/meta").json()
    assert m["n_features"] == 3 and m["n_dead"] == 1 and m["vocab_size"] == 5 and m["live"] is False
    assert m["progress"]["status"] == "complete" and m["limits"]["page"] == 500


def test_steer_router_with_a_fake_live_model(state):
    assert (
        mounted(steer.router, state)
        .post("/api/steer", json={"feature": 0, "strength": 1.0, "prompt": "x"})
        .status_code
        == 503
    )
    live = FakeLive()
    client = mounted(steer.router, ServerState(state.store_path, state.meta, 3, state.display, live))
    r = client.post(
        "/api/steer", json={"feature": 1, "strength": 2.5, "prompt": "the cat", "max_new_tokens": 4}
    )
    assert r.status_code == 200
    assert (
        r.json()["steered"] == "c d"
        and r.json()["hook"] == FakeLive.write_hook
        and r.json()["strength"] == 2.5
    )
    assert live.calls == [(1, 2.5, "the cat", "add", "all", 4)]
    assert client.post("/api/steer", json={"feature": 3, "strength": 1.0, "prompt": "x"}).status_code == 404
    assert len(live.calls) == 1


def test_pages_router_alone(state):
    client = mounted(pages.router, state)
    r = client.get("/feature/1")
    assert r.status_code == 200 and 'id="top-examples"' in r.text and 'data-live="false"' in r.text
    assert (
        '<span class="tok' not in r.text and "<svg" not in r.text
    )  # the live page is a shell: app.js fills it from the API
    missing = client.get("/feature/3")
    assert missing.status_code == 404 and "does not exist" in missing.text
    assert 'max="3"' in client.get("/vector").text  # at most as many features as latents


def test_feature_template_renders_a_view_server_side(state):
    with state.open_store() as store:
        view = state.display.page(store, 0)
    html = TEMPLATES.get_template("feature.html").render(
        view=view, idx=0, live=False, title="t", max_strength=1, max_new_tokens=1
    )
    for element in ("feature-stats", "explanation", "act-hist", "logit-hist", "logits-pos", "logits-neg",
                    "neighbours", "coactivation", "top-examples", "quantile-examples"):  # fmt: skip
        assert f'id="{element}"' in html, element  # the same containers as the shell
    assert html.count('<div class="example"') == 3 and html.count('class="tok center"') == 3
    assert "a↵b" in html and "&lt;i&gt;" in html and "&#39;&lt;99&gt;&#39;" in html
    assert html.count('class="bar"') == 2 + 4 and '<h3 class="quantile">Quantile 0</h3>' in html
    assert '<a href="/feature/1" class="feature-link" data-idx="1">#1</a>' in html
