"""The graph page: attribution graphs and circuits saved in graphs/ beside the served store, as a list,
JSON and an interactive SVG page (Playwright with Debian's Chromium); names never reach outside graphs/."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from fastapi.testclient import TestClient

from saelab.circuits.graph_schema import validate_graph
from saelab.server import create_app
from saelab.server.routers.graphs import graph_view, locate
from tests.browser import require_browser, serve
from tests.stores import STORE_HOOK

LABEL = "cats and kittens"
HOOK1 = "blocks.1.hook_resid_post"


def _node(node_id, feature, layer, pos, kind, clerp="", activation=None, influence=0.5):
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "jsNodeId": node_id, "clerp": clerp, "influence": influence, "activation": activation,
            "token_prob": 0.0, "is_target_logit": False}  # fmt: skip


def tiny_graph() -> dict:
    """A 2-layer attribution graph on "<bos> The cat": 3 tokens, 3 features, 1 error, 1 logit, 7 links."""
    tc = "cross layer transcoder"
    nodes = [
        _node("E_1_1", 1, "E", 1, "embedding"),
        _node("E_2_2", 2, "E", 2, "embedding"),
        _node("0_7_2", 7, "0", 2, tc, LABEL, 3.0, 0.2),
        _node("0_9_1", 9, "0", 1, tc, "determiners", 1.5, 0.6),
        _node("1_4_2", 4, "1", 2, tc, "animal next", 2.0, 0.4),
        _node("err_1_2", -1, "1", 2, "mlp reconstruction error"),
        {
            **_node("3_5_2", 5, "3", 2, "logit", 'Output " sat" (p=0.400)'),
            "token_prob": 0.4,
            "is_target_logit": True,
        },
    ]
    links = [
        ("E_2_2", "0_7_2", 2.0), ("E_1_1", "0_9_1", 1.0), ("0_7_2", "1_4_2", 1.5), ("0_9_1", "1_4_2", -0.3),
        ("1_4_2", "3_5_2", 0.9), ("err_1_2", "3_5_2", -0.1), ("E_2_2", "3_5_2", 0.05),
    ]  # fmt: skip
    metadata = {"slug": "tiny", "scan": "tiny-saelab-transcoders", "transcoder_list": [],
                "prompt_tokens": ["<bos>", "The", " cat"], "prompt": "<bos>The cat", "node_threshold": 0.8,
                "schema_version": 1, "info": {"replacement_score": 0.7, "completeness_score": 0.9}}  # fmt: skip
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    doc = {"metadata": metadata, "qParams": qparams, "nodes": nodes,
           "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}  # fmt: skip
    validate_graph(doc)  # the same format `saelab graph` writes
    return doc


def tiny_circuit() -> dict:
    """A circuit over two hooks in `find_circuit`'s layout; hook 0 is the served dictionary's."""

    def ref(hook, pos, latent):
        return {"hook": hook, "pos": pos, "latent": latent}

    nodes = [
        {**ref(STORE_HOOK, 1, 5), "effect": 0.8}, {**ref(STORE_HOOK, 2, 3), "effect": -0.2},
        {**ref(HOOK1, 2, 11), "effect": 0.6}, {**ref(HOOK1, 2, -1), "effect": 0.1},
    ]  # fmt: skip
    edges = [
        {"source": ref(STORE_HOOK, 1, 5), "target": ref(HOOK1, 2, 11), "weight": 0.5},
        {"source": ref(STORE_HOOK, 2, 3), "target": ref(HOOK1, 2, 11), "weight": -0.05},
        {"source": ref(STORE_HOOK, 2, 3), "target": ref(HOOK1, 2, -1), "weight": 0.02},
    ]
    curve = [{"threshold": t, "n_nodes": n, "faithfulness": f, "completeness": c}
             for t, n, f, c in [(1.0, 0, 0.0, 1.0), (0.1, 2, 0.5, 0.6), (0.01, 4, 0.85, 0.2), (0.0, 40, 1.0, 0.0)]]  # fmt: skip
    return {"task": "tiny-agreement", "kind": "pairs", "tokens": ["<bos>", "The", "cats"], "metric": 1.25,
            "hooks": [STORE_HOOK, HOOK1], "nodes": nodes, "edges": edges, "curve": curve, "nodes_for_f08": 4}  # fmt: skip


@pytest.fixture(scope="module")
def served(analysed, tmp_path_factory):
    """The analysed store's path, with a graph, a circuit, a broken file and a link out of graphs/ beside it."""
    path = analysed[2]
    folder = path.parent / "graphs"
    (folder / "tiny-circuit").mkdir(parents=True)
    (folder / "tiny-graph.json").write_text(json.dumps(tiny_graph()))
    (folder / "tiny-circuit" / "circuit.json").write_text(json.dumps(tiny_circuit()))
    (folder / "broken.json").write_text("{not json")
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    outside = tmp_path_factory.mktemp("outside") / "secret.json"
    outside.write_text(json.dumps(tiny_graph()))
    (folder / "leak.json").symlink_to(outside)
    return path


@pytest.fixture(scope="module")
def base_url(served):
    yield from serve(create_app(served))


@pytest.fixture(scope="module")
def client(served):
    return TestClient(create_app(served))


def test_list_page_and_api_name_each_graph_with_its_counts(client):
    items = {g["name"]: g for g in client.get("/api/graphs").json()["items"]}
    assert set(items) == {
        "tiny-graph",
        "tiny-circuit",
        "broken",
        "deep",
    }  # the link out of graphs/ is not listed
    assert items["tiny-graph"] | {"error": None} == {"name": "tiny-graph", "kind": "graph", "title": "<bos>The cat",
                                                    "n_nodes": 7, "n_edges": 7, "error": None}  # fmt: skip
    assert (items["tiny-circuit"]["kind"], items["tiny-circuit"]["title"]) == ("circuit", "tiny-agreement")
    assert (items["tiny-circuit"]["n_nodes"], items["tiny-circuit"]["n_edges"]) == (4, 3)
    assert "not a readable graph" in items["broken"]["error"]

    html = client.get("/graphs")
    assert html.status_code == 200
    assert 'href="/graphs/tiny-graph"' in html.text and 'href="/graphs/tiny-circuit"' in html.text
    assert "tiny-agreement" in html.text and "&lt;bos&gt;The cat" in html.text
    assert 'id="nav-graphs"' in client.get("/").text


def test_graph_json_orders_rows_and_links_only_served_latents(client):
    view = client.get("/api/graphs/tiny-graph").json()
    assert view["kind"] == "graph" and view["tokens"] == ["<bos>", "The", " cat"]
    assert view["rows"] == ["emb", "L0", "L1", "logit"]  # embeddings at the bottom, logits on top
    nodes = {n["id"]: n for n in view["nodes"]}
    assert {n["kind"] for n in nodes.values()} == {"embedding", "feature", "error", "logit"}
    assert (nodes["E_2_2"]["row"], nodes["0_7_2"]["row"], nodes["3_5_2"]["row"]) == (0, 1, 3)
    assert nodes["0_7_2"]["link"] is None and nodes["0_7_2"]["label"] == LABEL  # a transcoder's latent
    assert nodes["0_7_2"]["activation"] == 3.0 and nodes["E_1_1"]["label"] == "token 'The'"
    assert len(view["edges"]) == 7 and view["scores"]["replacement_score"] == 0.7
    assert view["curve"] == []

    circuit = client.get("/api/graphs/tiny-circuit").json()
    assert circuit["rows"] == [STORE_HOOK, HOOK1] and len(circuit["curve"]) == 4
    links = {n["id"]: n["link"] for n in circuit["nodes"]}
    assert links == {f"{STORE_HOOK}:1:5": "/feature/5", f"{STORE_HOOK}:2:3": "/feature/3",
                     f"{HOOK1}:2:11": None, f"{HOOK1}:2:-1": None}  # fmt: skip
    assert {e["weight"] for e in circuit["edges"]} == {0.5, -0.05, 0.02}
    assert client.get("/graphs/tiny-circuit").status_code == 200
    assert 'data-graph="tiny-graph"' in client.get("/graphs/tiny-graph").text


def test_graph_features_link_when_the_served_store_is_their_layers_transcoder(client):
    state = client.app.state.saelab
    transcoder = dataclasses.replace(state, meta={**state.meta, "hook_name": "blocks.0.ln2.hook_normalized"})
    links = {n["id"]: n["link"] for n in graph_view(transcoder, tiny_graph())["nodes"]}
    assert links["0_7_2"] == "/feature/7" and links["0_9_1"] == "/feature/9"
    assert links["1_4_2"] is None and links["err_1_2"] is None and links["E_1_1"] is None


@pytest.mark.parametrize(
    "name",
    [
        "nope",
        "..%2Ffeatures",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "leak",
        "tiny-circuit%2Fcircuit",
        "x" * 5000,
        "%C3%A9",
        "a%00b",
        "tiny-graph.json",
        "tiny-circuit%5Ccircuit",
    ],
)
def test_unknown_names_and_paths_out_of_graphs_are_404(client, name):
    assert client.get(f"/api/graphs/{name}").status_code == 404
    assert client.get(f"/graphs/{name}").status_code == 404


def test_locate_refuses_separators_dots_and_links_out(served):
    folder = served.parent / "graphs"
    assert locate(folder, "tiny-graph") == ("graph", folder / "tiny-graph.json")
    assert locate(folder, "tiny-circuit") == ("circuit", folder / "tiny-circuit" / "circuit.json")
    for name in ["../features", "..", "a/b", "a\\b", ".hidden", "x..y", "leak", "", "tiny-graph.json/.."]:
        assert locate(folder, name) is None


@pytest.mark.parametrize("name", ["broken", "deep"])
def test_broken_file_is_a_422_with_its_reason(client, name):
    r = client.get(f"/api/graphs/{name}")
    assert r.status_code == 422 and f"{name}.json is not a readable graph" in r.json()["detail"]
    assert client.get(f"/graphs/{name}").status_code == 200  # the page shows the API's reason


def test_page_draws_prunes_selects_pins_and_plots_the_curve(base_url, tmp_path):
    chromium, sync_api = require_browser()
    base = base_url
    if True:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))

            page.goto(base + "/graphs/tiny-graph")
            page.wait_for_selector("#graph-svg .node")
            assert page.locator("#graph-svg .node").count() == 7
            assert page.locator("#graph-svg .token-label").count() == 3
            edges = "#graph-svg .edge:not(.off)"
            assert page.locator(edges).count() == 7
            page.fill("#prune", "0.5")  # keeps the 4 edges of |weight| >= 0.5; err_1_2 loses its only edge
            assert page.locator(edges).count() == 4
            assert page.locator("#graph-svg .node.off").count() == 1  # the error node, left without an edge

            page.click("#graph-svg .node[data-id='0_7_2']")
            assert page.inner_text("#node-label") == LABEL
            assert page.is_visible("#node-nolink") and page.is_hidden("#node-link")  # another dictionary's
            page.click("#pin-toggle")
            page.wait_for_url(re.compile(r"pinned=0_7_2"))
            page.fill("#prune", "1.8")  # only E_2_2 -> 0_7_2 stays; pinned 0_7_2 would stay anyway
            assert page.locator(edges).count() == 1
            page.goto(base + "/graphs/tiny-graph?pinned=err_1_2")  # a shared view keeps its pins
            page.wait_for_selector("#graph-svg .node.pinned[data-id='err_1_2']")
            page.fill("#prune", "2")
            assert page.locator("#graph-svg .node:not(.off)").count() == 3  # E_2_2, 0_7_2 and the pinned one
            page.screenshot(path=tmp_path / "graph.png", full_page=True)

            page.goto(base + "/graphs/tiny-circuit")
            page.wait_for_selector("#curve-svg polyline")
            assert page.locator("#curve-svg polyline").count() == 2 and page.is_visible("#curve-panel")
            page.click(f"#graph-svg .node[data-id='{STORE_HOOK}:1:5']", modifiers=["Shift"])
            page.wait_for_url(re.compile(r"pinned="))
            page.click(f"#graph-svg .node[data-id='{STORE_HOOK}:1:5']")
            assert page.get_attribute("#node-link", "href") == "/feature/5" and page.is_visible("#node-link")
            assert page.inner_text("#pin-toggle") == "Unpin"
            page.screenshot(path=tmp_path / "circuit.png", full_page=True)
            browser.close()
            assert not errors


def test_a_feature_page_links_the_circuits_that_use_its_latent(client, served):
    page = client.get("/feature/5").text
    assert "In graphs and circuits" in page
    assert f'href="/graphs/tiny-circuit?pinned={STORE_HOOK}%3A1%3A5"' in page
    assert "at position 1 &ldquo;The&rdquo;" in page and "effect 0.8" in page
    assert "In graphs and circuits" not in client.get("/feature/0").text  # in no saved graph


def test_graph_nodes_of_a_served_cross_layer_transcoder_link_to_their_latents():
    """A served CLT numbers its latents layer-major: feature 3 of layer 1 (width 16) is latent 19."""
    from types import SimpleNamespace

    from saelab.server.routers.graphs import _feature_link

    meta = {"hook_name": "blocks.{i}.ln2.hook_normalized", "dictionary": {"d_sae": 32, "layers": [0, 1]}}
    state = SimpleNamespace(meta=meta, latents=set(range(32)))
    assert _feature_link(state, "blocks.1.ln2.hook_normalized", 3) == "/feature/19"
    assert _feature_link(state, "blocks.0.ln2.hook_normalized", 3) == "/feature/3"
    assert _feature_link(state, "blocks.2.ln2.hook_normalized", 3) is None  # not one of its layers
    assert _feature_link(state, "blocks.1.ln2.hook_normalized", 16) is None  # beyond a layer's width
    single = SimpleNamespace(meta={"hook_name": "blocks.1.ln2.hook_normalized"}, latents={3})
    assert _feature_link(single, "blocks.1.ln2.hook_normalized", 3) == "/feature/3"
