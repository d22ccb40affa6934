"""Each router of saelab.server mounted alone on a bare FastAPI app, over a tiny hand-written store and a
fake live model: routes depend only on `app.state.saelab`, not on `create_app`."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from saelab.analysis.store import FeatureStore
from saelab.analysis.views import DisplayContext
from saelab.server.routers import explanations, features, meta, pages, search, steer
from saelab.server.routers.pages import TEMPLATES
from saelab.server.state import ServerState
from tests.stores import META, explain_tiny_store, write_tiny_store


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
        store.set_dreams(0, [{"token_ids": [1, 3], "text": "the a\nb", "activation": 1.5, "cross_entropy": 3.25,
                              "lam": 1.0}], run_key="r")  # fmt: skip
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
    dreams = html[html.index('id="dreams"') :]
    assert dreams.count('<tr class="dream"') == 1 and "<td>3.250</td>" in dreams and "a↵b" in dreams
    assert f"{round(100 * 1.5 / view.feature.max_act)}%" in dreams


@pytest.fixture
def explained(state):
    """The tiny store with auto, self and human explanations and their scores (see explain_tiny_store)."""
    with FeatureStore(state.store_path) as store:
        ids = explain_tiny_store(store)
    return state, ids


def test_features_router_carries_explanations_scores_and_previews(explained):
    state, ids = explained
    client = mounted(features.router, state)
    page = client.get("/api/features", params={"sort": "score", "order": "desc"}).json()
    assert [f["idx"] for f in page["items"]] == [0, 1, 2] and page["total"] == 3
    first, second, dead = page["items"]
    assert first["best"] == {
        "id": ids["auto0"], "kind": "auto", "text": "the word cat",
        "detection": {"score": 0.9, "chance": 0.5, "shuffled": 0.55, "ci_low": 0.8, "ci_high": 0.97, "n": 40,
                      "flagged": False},
    }  # fmt: skip
    assert (
        first["explanation"] == "cats & <dogs>" and first["score"] == 0.9 and first["preview"] == "cata↵b<i>"
    )
    assert second["best"]["detection"]["flagged"] is True and second["preview"] == "thethe<i>catcat"
    assert dead["best"] is None and dead["score"] is None and dead["preview"] == ""
    asc = client.get("/api/features", params={"sort": "score", "order": "asc"}).json()["items"]
    assert [f["idx"] for f in asc] == [1, 0, 2]  # unscored last in either order
    good = client.get("/api/features", params={"min_score": 0.75}).json()
    assert good["total"] == 1 and [f["idx"] for f in good["items"]] == [0]
    for bad in ("x", "-0.1", "1.5", "nan", "inf"):
        r = client.get("/api/features", params={"min_score": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "min_score"], bad
    assert client.get("/api/features", params={"sort": "scores"}).status_code == 422

    f = client.get("/api/features/0").json()
    assert f["explanation"] == "cats & <dogs>"
    assert [(e["id"], e["kind"], e["text"]) for e in f["explanations"]] == [
        (ids["auto0"], "auto", "the word cat"), (ids["self0"], "self", "felines <b>"),
        (ids["human0"], "human", "cats & <dogs>"),
    ]  # fmt: skip
    auto = f["explanations"][0]
    assert set(auto) == {"id", "kind", "text", "source", "created", "scores"}
    assert auto["source"] == {"explainer_model": "tiny-explainer", "prompt_version": "v1",
                              "example_ids": [[4, 0], [1, 5]], "seed": 0}  # fmt: skip
    assert sorted(auto["scores"]) == ["detection", "fuzzing"] and auto["scores"]["fuzzing"]["n"] == 40
    assert f["explanations"][1]["scores"]["detection"]["flagged"] is True
    assert client.get("/api/features/2").json()["explanations"] == []


def test_setting_the_human_label_keeps_the_other_kinds(explained):
    state, ids = explained
    client = mounted(explanations.router, state)
    assert (
        client.put("/api/features/0/explanation", json={"text": "tabby cats"}).json()["explanation"]
        == "tabby cats"
    )
    with state.open_store() as store:
        kinds = [(e["kind"], e["text"]) for e in store.explanations(0)]
    assert kinds == [("auto", "the word cat"), ("self", "felines <b>"), ("human", "tabby cats")]


def test_search_router_ranks_explanations(explained):
    state, _ = explained
    client = mounted(search.router, state)
    hits = client.get("/api/search", params={"q": "cat", "kind": "explanation"}).json()["items"]
    assert hits == [{"idx": 0, "explanation": "the word cat"}]  # whole word 'cat' beats 'cats'
    hits = client.get("/api/search", params={"q": "t", "kind": "explanation"}).json()["items"]
    assert hits == [
        {"idx": 0, "explanation": "the word cat"},
        {"idx": 1, "explanation": "angle-bracket tags"},
    ]


def test_feature_template_renders_explanations_and_flags(explained):
    state, ids = explained
    with state.open_store() as store:
        view = state.display.page(store, 0)
    html = TEMPLATES.get_template("feature.html").render(
        view=view, idx=0, live=False, title="t", max_strength=1, max_new_tokens=1
    )
    assert html.count('<div class="expl-entry"') == 3 and 'id="explanations"' in html
    assert html.index(f'data-id="{ids["auto0"]}"') < html.index(f'data-id="{ids["self0"]}"')
    assert "felines &lt;b&gt;" in html and "cats &amp; &lt;dogs&gt;" in html and "<b>" not in html
    assert html.count('<tr data-scorer="detection" class="flagged">') == 1  # the self label's
    assert html.count("no better than a shuffled label</span>") == 1
    assert "<td>0.900</td><td>0.500</td><td>0.550</td><td>0.800–0.970</td><td>40</td>" in html
    assert html.count('<p class="muted">not scored</p>') == 1  # the human label
    shell = TEMPLATES.get_template("feature.html").render(
        view=None, idx=0, live=False, title="t", max_strength=1, max_new_tokens=1
    )
    assert '<div id="explanations" class="explanations"></div>' in shell  # app.js fills it
