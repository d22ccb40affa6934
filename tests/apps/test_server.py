"""saelab.server against a tiny analysed store: API results agree with the store and a direct encode."""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from saelab.analysis.store import FeatureStore, FeatureStoreError
from saelab.core.data import exclusion_mask
from saelab.interventions.decompose import decompose
from saelab.interventions.generation import GenerationConfig, compare
from saelab.interventions.hooks import ClampFeature, add_feature
from saelab.server import create_app
from saelab.server.live import (
    MAX_NEW_TOKENS,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    MAX_TOKENS,
    MAX_VECTOR_FEATURES,
    MAX_VECTOR_PROMPTS,
)
from tests.stores import STORE_CTX, STORE_D, STORE_D_SAE, STORE_HOOK, STORE_TEXT

D, D_SAE, CTX, HOOK, TEXT = STORE_D, STORE_D_SAE, STORE_CTX, STORE_HOOK, STORE_TEXT
STATS = ("idx", "density", "mean_act", "max_act", "n_active", "explanation")


@pytest.fixture(scope="module")
def client(analysed):
    lm, sae, path = analysed
    with TestClient(create_app(path, lm, sae)) as c:
        yield c


@pytest.fixture(scope="module")
def offline(analysed):
    with TestClient(create_app(analysed[2])) as c:
        yield c


@pytest.fixture(scope="module")
def store(analysed):
    with FeatureStore(analysed[2], create=False) as s:
        yield s


def test_meta_counts(client, store):
    m = client.get("/api/meta").json()
    assert m["n_features"] == D_SAE and m["hook_name"] == HOOK and m["live"] is True
    assert m["n_dead"] == D_SAE - store.count_features(include_dead=False)
    assert m["dictionary"]["d_sae"] == D_SAE and m["progress"]["status"] == "complete"


@pytest.mark.parametrize("sort", ["density", "max_act", "mean_act", "n_active", "idx"])
@pytest.mark.parametrize("order", ["desc", "asc"])
def test_list_pages_match_the_store(client, store, sort, order):
    seen = []
    for offset in range(0, D_SAE, 25):
        r = client.get("/api/features", params={"sort": sort, "order": order, "offset": offset, "limit": 25})
        assert r.status_code == 200
        body = r.json()
        assert body["total"] == D_SAE
        seen += body["items"]
    rows = store.list_features(sort, order == "desc", 0, 1000)
    assert [{k: f[k] for k in STATS} for f in seen] == [{k: r[k] for k in STATS} for r in rows]
    display = client.app.state.saelab.display
    assert seen == [display.summary(r).api() for r in rows]  # the store's rows through the shared view
    values = [f[sort] for f in seen]
    assert values == sorted(values, reverse=order == "desc")


def test_list_filters(client, store):
    alive = client.get("/api/features", params={"include_dead": False, "limit": 500}).json()
    assert alive["total"] == store.count_features(include_dead=False) == len(alive["items"])
    assert all(f["n_active"] > 0 for f in alive["items"])
    lo, hi = 0.01, 0.1
    band = client.get("/api/features", params={"min_density": lo, "max_density": hi, "limit": 500}).json()
    assert band["total"] == store.count_features(min_density=lo, max_density=hi)
    assert all(lo <= f["density"] <= hi for f in band["items"])


@pytest.mark.parametrize(
    "params",
    [{"limit": 501}, {"limit": 0}, {"offset": -1}, {"sort": "nope"}, {"order": "up"}, {"min_density": "x"},
     {"max_density": 2}, {"min_score": "x"}, {"min_score": 1.5}, {"sort": "score", "min_score": "nan"}],
)  # fmt: skip
def test_list_limits_are_validated(client, params):
    assert client.get("/api/features", params=params).status_code == 422


def _busiest(store) -> int:
    return store.list_features("n_active", True, 0, 1)[0]["idx"]


def test_feature_detail(client, store, analysed):
    lm = analysed[0]
    idx = _busiest(store)
    f = client.get(f"/api/features/{idx}").json()
    raw = store.feature(idx)
    for key in ("density", "max_act", "mean_act", "n_active"):
        assert f[key] == raw[key]
    assert f["hist"]["counts"] == raw["hist"] and f["hist"]["edges"] == store.meta()["hist_edges"]
    assert sum(b["count"] for b in f["hist"]["bins"]) == raw["n_active"] > 0
    assert [(p["token_id"], p["value"]) for p in f["logits_pos"]] == [tuple(p) for p in raw["logits_pos"]]
    assert all(p["token"] == lm.tokenizer.decode([p["token_id"]]) for p in f["logits_pos"] + f["logits_neg"])
    assert [n["idx"] for n in f["neighbours"]] == [o for o, _ in raw["neighbours"]]
    assert [c["idx"] for c in f["coactivation"]] == [c["other"] for c in raw["coactivation"]]
    assert sum(f["logit_hist"]["counts"]) == lm.unembed.shape[0]


@pytest.mark.parametrize("kind", ["top", "quantile"])
def test_examples_have_token_texts(client, store, analysed, kind):
    lm = analysed[0]
    idx = _busiest(store)
    items = client.get(f"/api/features/{idx}/examples", params={"kind": kind}).json()["items"]
    raw = store.examples(idx, kind)
    assert len(items) == len(raw) > 0
    for item, row in zip(items, raw, strict=True):
        kept = [(t, v) for t, v in zip(row["tokens"], row["values"], strict=True) if t >= 0]
        assert [(t["id"], t["value"]) for t in item["tokens"]] == kept
        assert all(t["text"] == lm.tokenizer.decode([t["id"]]) for t in item["tokens"])
        assert item["tokens"][item["center"]]["id"] == row["token"]
        assert item["value"] == row["value"]
    assert client.get(f"/api/features/{idx}/examples", params={"kind": "bad"}).status_code == 422


def _reference(analysed, text):
    lm, sae, _ = analysed
    ids = [lm.tokenizer.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        acts = sae.encode(lm.capture(input_ids, HOOK)[HOOK])[0]
    acts = acts * ~exclusion_mask(input_ids, lm.tokenizer)[0][:, None]
    return ids, acts


def test_activations_match_a_direct_encode(client, analysed):
    ids, acts = _reference(analysed, TEXT)
    feature = int(acts.amax(0).argmax())
    r = client.post("/api/activations", json={"text": TEXT, "feature": feature})
    assert r.status_code == 200
    tokens = r.json()["tokens"]
    assert [t["id"] for t in tokens] == ids and tokens[0]["text"] == "<bos>"
    assert [t["text"] for t in tokens[1:]] == TEXT.split()
    assert tokens[0]["excluded"] and tokens[0]["value"] == 0 and tokens[0]["top"] == []
    assert [t["value"] for t in tokens] == pytest.approx(acts[:, feature].tolist(), abs=1e-5)
    assert r.json()["max_value"] == pytest.approx(float(acts[:, feature].max()), abs=1e-5)
    for pos, t in enumerate(tokens[1:], start=1):
        values = [x["value"] for x in t["top"]]
        assert values == sorted(values, reverse=True) and 0 < len(values) <= 10
        assert values[0] == pytest.approx(float(acts[pos].max()), abs=1e-5)
        for x in t["top"]:
            assert x["value"] == pytest.approx(float(acts[pos, x["idx"]]), abs=1e-5)
    plain = client.post("/api/activations", json={"text": TEXT}).json()
    assert "value" not in plain["tokens"][1] and plain["feature"] is None


def test_search_by_text_ranks_by_max_activation(client, analysed):
    ids, acts = _reference(analysed, TEXT)
    items = client.post("/api/search/text", json={"text": TEXT, "limit": 20}).json()["items"]
    peak = acts.amax(0)
    expected = torch.argsort(peak, descending=True, stable=True)[:20]
    assert [i["max_value"] for i in items] == pytest.approx(
        peak[expected][peak[expected] > 0].tolist(), abs=1e-5
    )
    assert [i["max_value"] for i in items] == sorted((i["max_value"] for i in items), reverse=True)
    top = items[0]
    assert top["token"] == TEXT.split()[top["position"] - 1]


def test_search_by_token_and_explanation(client, store, analysed):
    lm = analysed[0]
    idx = _busiest(store)
    word = lm.tokenizer.decode([store.examples(idx, "top")[0]["token"]])
    hits = client.get("/api/search", params={"q": word, "kind": "token"}).json()["items"]
    assert idx in [h["idx"] for h in hits] and hits == store.search_tokens(word, 50)
    r = client.put(f"/api/features/{idx}/explanation", json={"text": "Fires on zebra_stripes 100%"})
    assert r.status_code == 200 and r.json()["explanation"] == "Fires on zebra_stripes 100%"
    hits = client.get("/api/search", params={"q": "ZEBRA_stripes 100%", "kind": "explanation"}).json()[
        "items"
    ]
    assert hits == [{"idx": idx, "explanation": "Fires on zebra_stripes 100%"}]
    assert client.get("/api/search", params={"q": "zebra_x", "kind": "explanation"}).json()["items"] == []
    assert client.get(f"/api/features/{idx}").json()["explanation"] == "Fires on zebra_stripes 100%"
    assert client.put(f"/api/features/{idx}/explanation", json={"text": " "}).json()["explanation"] is None
    assert store.feature(idx)["explanation"] is None
    assert client.get("/api/search", params={"q": "", "kind": "token"}).status_code == 422
    assert client.get("/api/search", params={"q": "a", "kind": "other"}).status_code == 422


def test_unknown_and_non_numeric_features(client):
    message = f"feature 99999 does not exist; this dictionary has {D_SAE} latents (0-{D_SAE - 1})"
    for path in ("/api/features/99999", "/api/features/99999/examples"):
        r = client.get(path)
        assert r.status_code == 404 and r.json() == {"detail": message}
    assert client.get("/api/features/-1").status_code == 404
    assert client.put("/api/features/99999/explanation", json={"text": "x"}).status_code == 404
    assert client.post("/api/activations", json={"text": TEXT, "feature": 99999}).status_code == 404
    for path in ("/api/features/abc", "/api/features/1.5/examples", "/feature/abc", "/api/features/1e400"):
        assert client.get(path).status_code == 422, path
    assert client.put("/api/features/x/explanation", json={"text": "x"}).status_code == 422
    page = client.get("/feature/99999")
    assert page.status_code == 404 and "does not exist" in page.text


def test_bad_bodies(client):
    long_chars = client.post("/api/activations", json={"text": "w1 " * (MAX_TEXT_CHARS // 3 + 1)})
    assert long_chars.status_code == 413 and "at most 2000 characters" in long_chars.json()["detail"]
    many_tokens = " ".join(["w1"] * (MAX_TOKENS + 5))  # under the character limit, over the token one
    assert len(many_tokens) <= MAX_TEXT_CHARS
    r = client.post("/api/search/text", json={"text": many_tokens})
    assert r.status_code == 413 and f"at most {MAX_TOKENS}" in r.json()["detail"]
    assert client.post("/api/activations", json={"text": ""}).status_code == 422
    assert client.post("/api/activations", json={"feature": 1}).status_code == 422
    assert (
        client.post(
            "/api/activations", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    form = client.post("/api/activations", content=b"text=w1", headers={"content-type": "text/plain"})
    assert form.status_code == 415  # no cross-site "simple request" can reach a write
    huge = client.put("/api/features/0/explanation", json={"text": "x" * 100_000})
    assert huge.status_code == 413


def test_live_endpoints_answer_503_without_a_model(offline):
    for path in ("/api/activations", "/api/search/text"):
        r = offline.post(path, json={"text": TEXT})
        assert r.status_code == 503 and "without a model" in r.json()["detail"]
    r = offline.post("/api/steer", json={"feature": 0, "strength": 1.0, "prompt": TEXT})
    assert r.status_code == 503 and r.json()["detail"].startswith("steering is off")
    assert "--no-live" in r.json()["detail"]
    r = offline.post("/api/vector", json={"positive": [TEXT], "negative": ["w5"]})
    assert r.status_code == 503 and r.json()["detail"].startswith("building vectors is off")
    r = offline.post("/api/features/0/explain", json={"method": "auto"})
    assert r.status_code == 503 and r.json()["detail"].startswith("explaining is off")
    assert offline.get("/vector").status_code == 200
    assert offline.get("/api/meta").json()["live"] is False
    assert offline.get("/api/features/0").status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e/%2e%2e/etc/passwd",
     "/static/..%2f..%2f..%2f..%2fetc%2fpasswd", "/static/....//app.py", "/static//etc/passwd",
     "/static/%2fetc%2fpasswd", "/static/..\\app.py", "/static/templates/../../app.py"],
)  # fmt: skip
def test_static_path_traversal_is_refused(client, path):
    r = client.get(path)
    assert r.status_code in (400, 404)
    assert "create_app" not in r.text and "root:" not in r.text


def test_static_files_are_served(client):
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "initFeature" in js.text
    assert client.get("/static/style.css").status_code == 200


def test_foreign_hosts_are_refused(client):
    assert client.get("/api/meta", headers={"host": "evil.example"}).status_code == 400


def test_missing_store_fails_at_creation(tmp_path):
    with pytest.raises(FeatureStoreError, match="No feature store"):
        create_app(tmp_path / "none.db")


@pytest.mark.parametrize(
    "path, ids",
    [
        ("/", ["feature-table", "feature-rows", "sort-select", "order-select", "hide-dead", "hide-dense",
               "dense-threshold", "page-size", "prev-page", "next-page", "page-info", "total-count",
               "goto-idx", "meta-summary", "error", "min-score"]),
        ("/feature/3", ["feature-title", "feature-stats", "explanation", "explanation-input",
                        "explanation-save", "act-hist", "logit-hist", "logits-pos", "logits-neg", "neighbours",
                        "coactivation", "test-text", "test-run", "test-tokens", "test-token-features",
                        "top-examples", "quantile-examples", "prev-feature", "next-feature", "steer-form",
                        "steer-prompt", "steer-mode", "steer-strength", "steer-strength-value", "steer-scope",
                        "steer-tokens", "steer-seed", "steer-run", "steer-spinner", "steer-error",
                        "steer-unsteered", "steer-steered", "nav-vector", "explanations", "explain-now",
                        "explain-now-method", "explain-now-spinner", "explain-now-error", "dreams"]),
        ("/search", ["token-query", "token-search", "token-results", "expl-query", "expl-search",
                     "expl-results", "text-query", "text-search", "text-results"]),
        ("/vector", ["vector-positive", "vector-negative", "vector-n", "vector-chat", "vector-run",
                     "vector-spinner", "vector-error", "vector-summary", "vector-table", "vector-rows",
                     "vector-hook", "nav-vector"]),
    ],
)  # fmt: skip
def test_pages_render_with_their_element_ids(client, path, ids):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for element in ids:
        assert f'id="{element}"' in r.text, element
    assert "http://" not in r.text and "https://" not in r.text  # works offline: nothing from a CDN
    assert "script-src 'self'" in r.headers["content-security-policy"]


# -- steering and vectors -------------------------------------------------------------------------
def _steer(client, **fields):
    body = {"feature": 3, "strength": 4.0, "prompt": TEXT, "max_new_tokens": 6, "seed": 1, **fields}
    return client.post("/api/steer", json=body)


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steer_returns_what_compare_gives(client, analysed, mode):
    lm, sae, _ = analysed
    r = _steer(client, mode=mode, strength=5.0, temperature=0.0)
    assert r.status_code == 200
    body = r.json()
    assert (
        body["prompt"] == TEXT and body["mode"] == mode and body["strength"] == 5.0 and body["hook"] == HOOK
    )
    iv = (
        add_feature(sae, 3, 5.0)
        if mode == "add"
        else ClampFeature(HOOK, dictionary=sae, features=[3], values=[5.0])
    )
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.0, seed=1)
    expected = compare(lm, [TEXT], [iv], cfg)[0]
    assert body["unsteered"] == expected["unsteered"] and body["steered"] == expected["steered"]
    assert body["unsteered"] != body["steered"]  # greedy text moves under a strong edit
    assert len(body["unsteered"].split()) <= 6


def test_steer_with_strength_zero_changes_nothing(client):
    for seed in (0, 7):  # sampled (temperature 0.7): the same seed draws the same tokens
        body = _steer(client, strength=0.0, seed=seed, max_new_tokens=8).json()
        assert body["steered"] == body["unsteered"] and body["unsteered"].strip()
    other = _steer(client, strength=0.0, seed=1, max_new_tokens=8, scope="generated").json()
    assert other["steered"] == other["unsteered"]


def test_steer_scope_prompt_and_generated_differ(client):
    """A prompt-only edit changes the cache the generated tokens read; a generated-only one the tokens."""
    plain = _steer(client, strength=0.0, temperature=0.0).json()["unsteered"]
    for scope in ("prompt", "generated"):
        body = _steer(client, strength=50.0, temperature=0.0, scope=scope).json()
        assert body["scope"] == scope and body["unsteered"] == plain and body["steered"] != plain


def test_concurrent_requests_do_not_see_each_others_hooks(client):
    """The lock serialises model use: each answer equals the one it gets alone."""
    requests = [
        (
            "/api/steer",
            {"feature": 3, "strength": 0.0, "prompt": TEXT, "max_new_tokens": 6, "temperature": 0.0},
        ),
        (
            "/api/steer",
            {"feature": 5, "strength": 80.0, "prompt": TEXT, "max_new_tokens": 6, "temperature": 0.0},
        ),
        ("/api/steer", {"feature": 9, "strength": 9.0, "prompt": TEXT, "mode": "clamp", "max_new_tokens": 6}),
        ("/api/activations", {"text": TEXT, "feature": 3}),
        ("/api/vector", {"positive": ["w1 w2 w3", "w4 w5"], "negative": ["w40 w41"], "n_features": 4}),
    ] * 2
    alone = [client.post(path, json=body).json() for path, body in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: client.post(r[0], json=r[1]).json(), requests))
    assert together == alone


@pytest.mark.parametrize(
    "fields",
    [{"strength": MAX_STRENGTH + 1}, {"strength": -MAX_STRENGTH - 1}, {"strength": "x"}, {"strength": None},
     {"max_new_tokens": MAX_NEW_TOKENS + 1}, {"max_new_tokens": 0}, {"seed": -1}, {"mode": "multiply"},
     {"scope": "middle"}, {"temperature": -1}, {"prompt": ""}, {"prompt": "  \n "}, {"feature": "a"},
     {"feature": 1.5}],
)  # fmt: skip
def test_steer_rejects_bad_values(client, fields):
    r = _steer(client, **fields)
    assert r.status_code == 422
    assert all(isinstance(d["msg"], str) for d in r.json()["detail"])


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_steer_rejects_non_finite_strength(client, number):
    body = b'{"feature": 3, "prompt": "w1 w2", "strength": ' + number + b"}"
    r = client.post("/api/steer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "strength"]


def test_steer_limits_and_unknown_feature(client):
    r = _steer(client, feature=D_SAE)
    assert r.status_code == 404 and f"has {D_SAE} latents" in r.json()["detail"]
    assert _steer(client, feature=-1).status_code == 404
    r = _steer(client, prompt="w1 " * (MAX_TEXT_CHARS // 3 + 1))
    assert r.status_code == 413 and "at most 2000 characters" in r.json()["detail"]
    r = _steer(client, prompt=" ".join(["w1"] * (MAX_TOKENS + 1)))
    assert r.status_code == 413 and f"at most {MAX_TOKENS} tokens" in r.json()["detail"]
    form = client.post(
        "/api/steer", content=b"feature=3", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert form.status_code == 415
    huge = client.post("/api/steer", json={"feature": 3, "strength": 1, "prompt": "w1 " * 30_000})
    assert huge.status_code == 413


POSITIVE = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10"]  # different lengths: left padding is exercised
NEGATIVE = ["w40 w41", "w42 w43 w44 w45", "w46"]


def _mean_last(lm, prompts):
    """Each prompt on its own (no padding): the activation at its last token, averaged."""
    rows = []
    for p in prompts:
        ids = torch.tensor([lm.tokenizer(p)["input_ids"]])
        rows.append(lm.capture(ids, HOOK)[HOOK][0, -1].double())
    return torch.stack(rows).mean(0)


def test_vector_is_the_mean_difference_decomposed(client, analysed, store):
    lm, sae, _ = analysed
    r = client.post("/api/vector", json={"positive": POSITIVE, "negative": NEGATIVE, "n_features": 6})
    assert r.status_code == 200
    body = r.json()
    vector = (_mean_last(lm, POSITIVE) - _mean_last(lm, NEGATIVE)).float()
    assert body["vector_norm"] == pytest.approx(float(vector.norm()), rel=1e-4)
    assert body["hook"] == HOOK and body["n_positive"] == 3 and body["n_negative"] == 3
    expected = decompose(sae, vector, 6)
    assert body["cosine"] == pytest.approx(expected.cosine, abs=1e-3)
    assert -1 <= body["cosine"] <= 1 and 0 < body["cosine"]
    feats = body["features"]
    assert 0 < len(feats) <= 6
    assert {f["idx"] for f in feats} == {f.index for f in expected.features}
    coefficients = [f["coefficient"] for f in feats]
    assert coefficients == sorted(coefficients, reverse=True) and all(c > 0 for c in coefficients)
    for f in feats:
        assert f["link"] == f"/feature/{f['idx']}" and -1 <= f["cosine"] <= 1
        row = store.feature(f["idx"])
        assert f["density"] == row["density"] and f["max_act"] == row["max_act"]


def test_vector_of_swapped_lists_is_the_negative(client):
    a = client.post("/api/vector", json={"positive": POSITIVE, "negative": NEGATIVE, "n_features": 3}).json()
    b = client.post("/api/vector", json={"positive": NEGATIVE, "negative": POSITIVE, "n_features": 3}).json()
    assert a["vector_norm"] == pytest.approx(b["vector_norm"], rel=1e-6)
    assert {f["idx"] for f in a["features"]}.isdisjoint({f["idx"] for f in b["features"]})


@pytest.mark.parametrize(
    "fields, status",
    [({"positive": []}, 422), ({"negative": []}, 422), ({"positive": ["w1", " "]}, 422),
     ({"positive": "w1"}, 422), ({"n_features": 0}, 422), ({"n_features": MAX_VECTOR_FEATURES + 1}, 422),
     ({"method": "magic"}, 422), ({"negative": POSITIVE}, 422),
     ({"positive": ["w1"] * (MAX_VECTOR_PROMPTS + 1)}, 413),
     ({"negative": ["w2", "w1 " * (MAX_TEXT_CHARS // 3 + 1)]}, 413),
     ({"positive": [" ".join(["w1"] * (MAX_TOKENS + 1))]}, 413)],
)  # fmt: skip
def test_vector_limits(client, fields, status):
    r = client.post("/api/vector", json={"positive": POSITIVE, "negative": NEGATIVE, **fields})
    assert r.status_code == status, r.json()
    assert r.json()["detail"]


def test_vector_limit_messages(client):
    r = client.post("/api/vector", json={"positive": POSITIVE, "negative": POSITIVE})
    assert "all zeros" in r.json()["detail"]  # identical lists: no direction to decompose
    r = client.post("/api/vector", json={"positive": ["w1"] * 40, "negative": NEGATIVE})
    assert f"at most {MAX_VECTOR_PROMPTS}" in r.json()["detail"]
    r = client.post("/api/vector", json={"positive": POSITIVE, "negative": ["w2", "w1 " * 700]})
    assert r.json()["detail"].startswith("negative prompt 2 has 2100 characters")


# -- integers of any size, and every other malformed input: 4xx, never 500 ---------------------------
HUGE = 100000000000000000000  # past SQLite's 64-bit INTEGER: once an OverflowError and a 500


def _range_message(idx: int) -> str:
    return f"feature {idx} does not exist; this dictionary has {D_SAE} latents (0-{D_SAE - 1})"


@pytest.mark.parametrize(
    "path",
    [f"/api/features/{HUGE}", f"/api/features/{HUGE}/examples", f"/api/features/-{HUGE}",
     f"/api/features/{2**63 - 1}", f"/api/features/{2**63}/examples", f"/api/features/{-(2**63) - 1}"],
)  # fmt: skip
def test_huge_feature_index_is_404_naming_the_range(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json() == {"detail": _range_message(int(path.split("/")[3]))}


def test_offset_past_the_last_latent_is_422(client):
    r = client.get("/api/features?offset=99999999999999999999")
    assert r.status_code == 422
    assert r.json()["detail"] == [
        {"loc": ["query", "offset"], "msg": f"Input should be less than or equal to {D_SAE}",
         "type": "less_than_equal"}
    ]  # fmt: skip
    end = client.get("/api/features", params={"offset": D_SAE})
    assert end.status_code == 200 and end.json()["items"] == [] and end.json()["total"] == D_SAE
    assert client.get("/api/features", params={"offset": D_SAE + 1}).status_code == 422


_STEER = {"feature": 3, "strength": 1.0, "prompt": "w1 w2", "max_new_tokens": 2}
_VECTOR = {"positive": ["w1 w2"], "negative": ["w3"], "n_features": 3}


@pytest.mark.parametrize(
    "method, path, body, status, expect",
    [("GET", f"/feature/{HUGE}", None, 404, _range_message(HUGE)),
     ("GET", f"/feature/-{HUGE}", None, 404, _range_message(-HUGE)),
     ("PUT", f"/api/features/{HUGE}/explanation", {"text": "x"}, 404, _range_message(HUGE)),
     ("PUT", f"/api/features/-{HUGE}/explanation", {"text": None}, 404, _range_message(-HUGE)),
     ("POST", "/api/activations", {"text": TEXT, "feature": HUGE}, 404, _range_message(HUGE)),
     ("POST", "/api/activations", {"text": TEXT, "feature": -HUGE}, 404, _range_message(-HUGE)),
     ("POST", "/api/steer", {**_STEER, "feature": HUGE}, 404, _range_message(HUGE)),
     ("POST", "/api/steer", {**_STEER, "feature": -(2**63) - 1}, 404, _range_message(-(2**63) - 1)),
     ("POST", "/api/steer", {**_STEER, "seed": HUGE}, 422, ["body", "seed"]),
     ("POST", "/api/steer", {**_STEER, "max_new_tokens": HUGE}, 422, ["body", "max_new_tokens"]),
     ("POST", "/api/steer", {**_STEER, "strength": HUGE}, 422, ["body", "strength"]),
     ("GET", f"/api/features?limit={HUGE}", None, 422, ["query", "limit"]),
     ("GET", f"/api/search?q=w1&limit={HUGE}", None, 422, ["query", "limit"]),
     ("GET", f"/api/search?q=w1&kind=explanation&limit=-{HUGE}", None, 422, ["query", "limit"]),
     ("POST", "/api/search/text", {"text": TEXT, "limit": HUGE}, 422, ["body", "limit"]),
     ("POST", "/api/vector", {**_VECTOR, "n_features": HUGE}, 422, ["body", "n_features"]),
     ("GET", "/api/features/" + "9" * 5000, None, 422, ["path", "idx"]),  # more digits than int() takes
     ("GET", "/api/features?offset=" + "9" * 5000, None, 422, ["query", "offset"])],
)  # fmt: skip
def test_every_integer_parameter_is_bounded(client, method, path, body, status, expect):
    r = client.request(method, path, json=body)
    assert r.status_code == status, r.text
    if path.startswith("/feature/"):  # the HTML page: the same message, in the error page
        assert expect in r.text and r.headers["content-type"].startswith("text/html")
    elif isinstance(expect, str):
        assert r.json() == {"detail": expect}
    else:
        assert r.json()["detail"][0]["loc"] == expect


@pytest.mark.parametrize(
    "method, path, body, loc",
    [("PUT", "/api/features/0/explanation", b'{"text": "a\\ud800"}', ["body", "text"]),
     ("POST", "/api/vector", b'{"positive": ["w1 \\udfff"], "negative": ["w2"]}', ["body", "positive", 0]),
     ("POST", "/api/vector", b'{"positive": ["w1"], "negative": ["\\ud800"]}', ["body", "negative", 0]),
     ("POST", "/api/activations", b'{"text": "w1 \\ud800"}', ["body", "text"]),
     ("POST", "/api/search/text", b'{"text": "\\ud800"}', ["body", "text"]),
     ("POST", "/api/steer", b'{"feature": 3, "strength": 1, "prompt": "\\ud800"}', ["body", "prompt"])],
)  # fmt: skip
def test_unpaired_surrogates_are_422(client, store, method, path, body, loc):
    """JSON may escape half a UTF-16 pair; SQLite and the tokenizer cannot take it (once a 500)."""
    r = client.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc
    assert store.feature(0)["explanation"] is None


@pytest.fixture
def store_copy(analysed, tmp_path):
    """A private copy of the analysed store, for tests that write explanations at random."""
    return shutil.copy(analysed[2], tmp_path / "features.db")


BIG_TEXT = [str(HUGE), f"-{HUGE}", str(2**63), str(-(2**63) - 1), str(10**300)]
BAD_TEXT = ["9" * 5000, "-1", "1.5", "1e400", "1e3", "nan", "NaN", "inf", "-Infinity", "", " ", "abc",
            "0x10", "1_000", "+1", "%00", "%ED%A0%80", "%FF", "é", "١٢", "１", "😀", "..%2F..", "null",
            "true", "[]"]  # fmt: skip
BIG_JSON = [HUGE, -HUGE, 2**63, -(2**63) - 1, 10**300]
BAD_JSON = [-1, 0, 1.5, -0.0, 1e308, -1e308, None, True, False, "", " ", "abc", "NaN", "1e400", "١",
            "\u0000", "é😀", [], [None], {}, {"a": 1}, ["w1"] * 40]  # fmt: skip
RAW_JSON = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400, "-" + "9" * 5000, '"\\ud800"',
            '"x\\udfff"', "[" * 50 + "]" * 50]  # fmt: skip
QUERIES = {
    "/api/features": ["sort", "order", "offset", "limit", "min_density", "max_density", "include_dead",
                      "min_score"],
    "/api/features/0/examples": ["kind"],
    "/api/search": ["q", "kind", "limit"],
}  # fmt: skip
BODIES = {
    ("POST", "/api/activations"): {"text": TEXT, "feature": 3},
    ("POST", "/api/search/text"): {"text": TEXT, "limit": 5},
    ("PUT", "/api/features/0/explanation"): {"text": "fuzz"},
    ("POST", "/api/steer"): {**_STEER, "temperature": 0.0, "seed": 1, "mode": "add", "scope": "all",
                             "chat": True},
    ("POST", "/api/vector"): {**_VECTOR, "chat": True, "method": "pursuit"},
}  # fmt: skip
ROUTES = ["/", "/search", "/vector", "/feature/0", "/api/meta", "/api/features", "/api/features/0",
          "/api/features/0/examples", "/api/features/0/explanation", "/api/activations", "/api/search",
          "/api/search/text", "/api/steer", "/api/vector", "/static/app.js", "/docs",
          "/openapi.json"]  # fmt: skip
RAW_BODIES = [b"", b"{", b"[]", b"null", b'"text"', b"[" * 5000, b"\xff\xfe{}", b'{"text": 1}' * 2,
              b'{"text": "' + b"x" * 70_000 + b'"}']  # fmt: skip
CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json-patch+json", "", "APPLICATION/JSON; charset=latin-1",
                 "application/json;;"]  # fmt: skip


def _fuzz_cases(seed: int = 0) -> list[tuple[str, str, dict]]:
    """(method, url, httpx request kwargs): every path, query and body parameter given bad values,
    raw non-JSON numbers and lone surrogates in bodies, wrong methods and wrong content types."""
    rng = random.Random(seed)

    def pick(big: list, bad: list, n: int) -> list:  # always one integer past SQLite's range
        return [rng.choice(big), *rng.sample(bad, n - 1)]

    cases = []
    for template in ("/api/features/{}", "/api/features/{}/examples", "/feature/{}"):
        cases += [("GET", template.format(v), {}) for v in pick(BIG_TEXT, BAD_TEXT, 5)]
    cases += [
        ("PUT", f"/api/features/{v}/explanation", {"json": {"text": "fuzz"}})
        for v in pick(BIG_TEXT, BAD_TEXT, 6)
    ]
    for path, params in QUERIES.items():
        for param in params:
            cases += [("GET", f"{path}?q=w1&{param}={v}", {}) for v in pick(BIG_TEXT, BAD_TEXT, 4)]
    for (method, path), base in BODIES.items():
        for field in base:
            cases += [(method, path, {"json": {**base, field: v}}) for v in pick(BIG_JSON, BAD_JSON, 3)]
            raw = json.dumps({**base, field: "@"}).replace('"@"', rng.choice(RAW_JSON))
            cases.append((method, path, {"content": raw, "headers": {"content-type": "application/json"}}))
            cases.append((method, path, {"json": {k: v for k, v in base.items() if k != field}}))  # missing
    for path in rng.sample(ROUTES, 8):
        for method in rng.sample(["DELETE", "PATCH", "PUT", "POST", "OPTIONS"], 2):
            cases.append((method, path, {"json": {}}))
    for method, path in BODIES:
        for body in rng.sample(RAW_BODIES, 3):
            cases.append((method, path, {"content": body, "headers": {"content-type": "application/json"}}))
        kind = rng.choice(CONTENT_TYPES)
        cases.append(
            (method, path, {"content": json.dumps(BODIES[method, path]), "headers": {"content-type": kind}})
        )
    return cases


def test_fuzzed_requests_never_get_a_5xx(analysed, store_copy):
    """~195 seeded bad requests over every route and parameter: each gets a 4xx (or a 2xx) and a
    message, never a 500 or a stack trace; the server answers normally afterwards."""
    lm, sae, _ = analysed
    cases = _fuzz_cases()
    assert 150 <= len(cases) <= 200 and cases == _fuzz_cases()  # bounded and deterministic
    failures = []
    with TestClient(create_app(store_copy, lm, sae), raise_server_exceptions=False) as c:
        start = time.monotonic()
        for method, url, kwargs in cases:
            r = c.request(method, url, **kwargs)
            if r.status_code >= 500 or "Traceback" in r.text:
                failures.append((method, url[:80], str(kwargs)[:120], r.status_code, r.text[:200]))
            elif r.status_code >= 400 and r.headers["content-type"].startswith("application/json"):
                if not r.json().get("detail"):
                    failures.append((method, url[:80], str(kwargs)[:120], r.status_code, "no detail"))
        elapsed = time.monotonic() - start
        assert c.get("/api/meta").status_code == 200 and c.get("/api/features/0").status_code == 200
    assert failures == []
    assert elapsed < 60, f"{len(cases)} fuzzed requests took {elapsed:.1f} s"


@pytest.fixture
def live_server(analysed, store_copy):
    """A real uvicorn server on a free 127.0.0.1 port over a copy of the store; stopped after the test."""
    import uvicorn

    lm, sae, _ = analysed
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(store_copy, lm, sae), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def _load_plan(n: int = 320, seed: int = 0) -> list[tuple[str, str, dict | None]]:
    """n mixed valid requests, reads mostly; the live model (encode, steer, vector) a small share."""
    rng = random.Random(seed)
    kind, sort = lambda: rng.choice(["top", "quantile"]), lambda: rng.choice(["density", "idx", "max_act"])
    kinds = [
        (30, lambda i: ("GET", f"/api/features/{i}", None)),
        (20, lambda i: ("GET", f"/api/features/{i}/examples?kind={kind()}", None)),
        (15, lambda i: ("GET", f"/api/features?sort={sort()}&offset={i}&limit=20", None)),
        (6, lambda i: ("GET", "/api/meta", None)),
        (6, lambda i: ("GET", f"/api/search?q=w{i}&kind=token", None)),
        (3, lambda i: ("GET", "/api/search?q=load&kind=explanation", None)),
        (6, lambda i: ("GET", f"/feature/{i}", None)),
        (3, lambda i: ("GET", rng.choice(["/", "/search", "/vector", "/static/app.js"]), None)),
        (6, lambda i: ("PUT", f"/api/features/{i}/explanation", {"text": f"load {i}"})),
        (4, lambda i: ("POST", "/api/activations", {"text": TEXT, "feature": i})),
        (2, lambda i: ("POST", "/api/search/text", {"text": TEXT, "limit": 10})),
        (1, lambda i: ("POST", "/api/steer", {**_STEER, "feature": i, "temperature": 0.0})),
        (1, lambda i: ("POST", "/api/vector", _VECTOR)),
    ]  # fmt: skip
    weights = [w for w, _ in kinds]
    return [rng.choices(kinds, weights)[0][1](rng.randrange(D_SAE)) for _ in range(n)]


@pytest.mark.timeout(180)
def test_concurrent_load_on_a_real_server(live_server):
    """320 mixed valid requests from 8 threads against uvicorn: every one a 200 with the right answer."""
    plan = _load_plan()
    assert len(plan) == 320 and plan == _load_plan()

    def run(chunk):
        out = []
        with httpx.Client(base_url=live_server, timeout=60) as http:
            for method, url, body in chunk:
                r = http.request(method, url, json=body)
                out.append((method, url, r.status_code, r.text[:200], r))
        return out

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = [x for chunk in pool.map(run, [plan[i::8] for i in range(8)]) for x in chunk]
    elapsed = time.monotonic() - start
    assert [x[:4] for x in results if x[2] != 200] == []
    for method, url, _, _, r in results:
        if url.startswith("/api/features/") and method == "GET":
            assert r.json()["idx"] == int(url.split("/")[3].split("?")[0])
        elif url.startswith("/api/features?"):
            assert r.json()["total"] == D_SAE and 0 < len(r.json()["items"]) <= 20
    with httpx.Client(base_url=live_server, timeout=60) as http:
        for idx in {int(url.split("/")[3]) for method, url, _ in plan if method == "PUT"}:
            assert http.get(f"/api/features/{idx}").json()["explanation"] == f"load {idx}"
    assert elapsed < 120, f"320 requests took {elapsed:.1f} s"


def test_list_sorted_and_filtered_by_detection_score(store_copy):
    """Auto labels scored on a third of the latents: sort=score pages agree with the store, best first,
    unscored last; min_score filters the total; the detail page lists each label with its controls."""
    rng = random.Random(0)
    with FeatureStore(store_copy, create=False) as s:
        scored = {}
        for idx in range(0, D_SAE, 3):
            scored[idx] = round(rng.uniform(0.3, 1.0), 3)
            e = s.add_explanation(idx, f"auto label {idx}", "auto", {"explainer_model": "m", "seed": idx})
            s.set_score(e, "detection", scored[idx], 0.5, 0.5 + (idx % 2) * 0.4, n=20)
    with TestClient(create_app(store_copy)) as c:
        for order in ("desc", "asc"):
            seen = []
            for offset in range(0, D_SAE, 25):
                params = {"sort": "score", "order": order, "offset": offset, "limit": 25}
                seen += c.get("/api/features", params=params).json()["items"]
            with FeatureStore(store_copy, create=False) as s:
                rows = s.list_features("score", order == "desc", 0, 1000)
            assert seen == [c.app.state.saelab.display.summary(r).api() for r in rows]
            ranked = sorted(scored.values(), reverse=order == "desc")
            assert [f["score"] for f in seen] == ranked + [None] * (D_SAE - len(scored))
            assert all(f["best"]["kind"] == "auto" and f["preview"] for f in seen[: len(scored)])
            shuffled = {f["idx"]: 0.5 + (f["idx"] % 2) * 0.4 for f in seen}
            flags = [f["best"]["detection"]["flagged"] for f in seen[: len(scored)]]
            assert flags == [scored[f["idx"]] <= shuffled[f["idx"]] for f in seen[: len(scored)]] and any(
                flags
            )
        body = c.get("/api/features", params={"min_score": 0.6, "limit": 500}).json()
        assert body["total"] == sum(v >= 0.6 for v in scored.values()) == len(body["items"])
        f = c.get("/api/features/3").json()
        assert f["explanation"] == "auto label 3" and f["explanations"][0]["scores"]["detection"] == {
            "score": scored[3], "chance": 0.5, "shuffled": 0.9, "ci_low": None, "ci_high": None, "n": 20,
            "flagged": scored[3] <= 0.9,
        }  # fmt: skip


def test_explain_now_adds_scored_labels_beside_their_controls(analysed, tmp_path):
    """The "explain now" button: the live model labels a latent and scores the new label beside chance and
    another latent's label (with none stored yet, the most frequent other latent is labelled first)."""
    import shutil

    lm, sae, path = analysed
    copy = tmp_path / "features.db"
    shutil.copy(path, copy)
    with FeatureStore(copy, create=False) as s:
        first, second = [r["idx"] for r in s.list_features(sort="density", limit=3, include_dead=False)][1:]
        before = len(s.dump()["explanations"])
    with TestClient(create_app(copy, lm, sae)) as c:
        r = c.post(f"/api/features/{first}/explain", json={"method": "auto"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["idx"] == first and body["method"] == "auto" and len(body["explanations"]) == 1
        (new,) = body["explanations"]
        assert new["kind"] == "auto" and set(new["scores"]) == {"detection", "embedding", "surprisal"}
        for sc in new["scores"].values():
            assert sc["chance"] == 0.5 and 0 <= sc["shuffled"] <= 1
        page = c.get(f"/api/features/{first}").json()
        assert new["id"] in [e["id"] for e in page["explanations"]]
        again = c.post(f"/api/features/{second}/explain", json={})  # method auto by default
        assert again.status_code == 200 and again.json()["explanations"][0]["kind"] == "auto"
        own = c.post(f"/api/features/{first}/explain", json={"method": "self"})
        assert own.status_code == 200, own.text
        made = own.json()
        assert len(made["explanations"]) + len(made["failures"]) == 1  # one label, or its junk recorded
        for e in made["explanations"]:
            assert e["kind"] == "self" and e["source"]["method"] == "self" and "detection" in e["scores"]
        bad = c.post(f"/api/features/{first}/explain", json={"method": "dream"})
        assert bad.status_code == 422 and "method" in bad.text
        assert c.post("/api/features/99999/explain", json={}).status_code == 404
    with FeatureStore(copy, create=False) as s:
        rows = s.dump()["explanations"]
        shuffled = s.explanations(second)[0]["scores"]["detection"]["details"]["shuffled_explanation"]
    assert len(rows) >= before + 2
    assert shuffled in {e["text"] for e in [r for r in s_explanations(copy) if r["feature"] != second]}


def s_explanations(path):
    with FeatureStore(path, create=False) as s:
        return [e for i in range(s.count_features()) for e in s.explanations(i)]
