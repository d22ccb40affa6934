"""`saelab graph` on a tiny random model with a random JumpReLU transcoder set saved to disk: the JSON it
writes passes Neuronpedia's schema, the summary reports the graph, labels come from feature stores,
and bad inputs are refused in one paragraph. Also the schema itself: it refuses what the viewer would
misread."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from saelab.analysis.store import FeatureStore
from saelab.circuits.graph import attribute, prune
from saelab.circuits.graph_json import graph_json
from saelab.circuits.graph_schema import graph_errors, graph_schema, schema_errors, validate_graph
from saelab.cli.graph import slug_of
from saelab.core.models import load_model
from saelab.dictionaries.sets import (
    dictionary_set,
    load_dictionary_set,
    save_dictionary_set,
    save_transcoder_set,
)
from saelab.errors import GraphError
from tests.helpers import random_dictionary, refused, run, save_model

HIDDEN, D_TC, N_LAYERS = 16, 32, 2
PROMPT = "w1 w5 w9 w17 w30"


def _transcoder(layer: int, hook_in: str = "ln2.hook_normalized", hook_out: str = "hook_mlp_out"):
    """A random JumpReLU transcoder with low thresholds, so that several features fire at each position."""
    return random_dictionary(layer, HIDDEN, D_TC, hook_in, hook_out)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_cli")
    model = save_model(root / "model", n_layers=N_LAYERS, hidden=HIDDEN)
    good = save_dictionary_set(
        dictionary_set([_transcoder(i) for i in range(N_LAYERS)], model_name=str(model)), root / "set"
    )
    return model, good, root


# ---- running the command ------------------------------------------------------------------------
def run_graph(*args):
    return run("graph", *args)


def refused_graph(*args) -> str:
    return refused("graph", *args)


COMMON = ("--dtype", "float32", "--device", "cpu")


def test_the_command_writes_a_graph_that_passes_the_schema(assets, tmp_path):
    model, good, _ = assets
    out = tmp_path / "sub" / "graph.json"
    code, stdout, err = run_graph(PROMPT, "--transcoders", good, "--out", out, *COMMON)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert schema_errors(doc) == [] and graph_errors(doc) == []
    summary = " ".join(stdout.split())
    assert "graph:" in summary and "pruned:" in summary and "replacement score" in summary
    assert "completeness" in summary and "peak memory" in summary and "MiB" in summary
    assert f"pruned: {len(doc['nodes'])} nodes, {len(doc['links'])} edges" in summary
    meta = doc["metadata"]
    assert meta["slug"] == slug_of(PROMPT) == "w1-w5-w9-w17-w30"
    assert meta["prompt_tokens"][0] == "<bos>" and meta["prompt_tokens"][1:] == PROMPT.split()
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= kinds
    assert not any(n["ctx_idx"] == 0 and n["layer"] not in ("E",) for n in doc["nodes"])  # BOS: no nodes
    assert all(n["clerp"] == "" for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    assert not list(out.parent.glob("*.tmp"))


def test_the_command_matches_the_python_api(assets, tmp_path):
    """Same graph as attribute + prune on the same tokens (BOS first), and the thresholds reach prune."""
    model, good, _ = assets
    out = tmp_path / "graph.json"
    args = ("--node-threshold", 0.5, "--edge-threshold", 0.9, "--max-logits", 3, "--batch-size", 7)
    code, _, err = run_graph(PROMPT, "--transcoders", good, "--out", out, "--slug", "mine", *args, *COMMON)
    assert code == 0, err
    doc = json.loads(out.read_text())
    lm = load_model(model, device="cpu", dtype=torch.float32)
    ids = [lm.tokenizer.bos_token_id, *lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
    graph = attribute(lm, load_dictionary_set(good), ids, max_logits=3)
    expected = graph_json(prune(graph, 0.5, 0.9), lm, slug="mine", node_threshold=0.5)
    assert doc["metadata"]["slug"] == "mine" and doc["metadata"]["node_threshold"] == 0.5
    assert sorted(n["node_id"] for n in doc["nodes"]) == sorted(n["node_id"] for n in expected["nodes"])
    assert len(doc["links"]) == len(expected["links"])
    assert sum(n["feature_type"] == "logit" for n in doc["nodes"]) <= 3


def test_a_circuit_tracer_transcoder_set_gives_the_same_graph(assets, tmp_path):
    model, good, _ = assets
    tracer = save_transcoder_set(load_dictionary_set(good), tmp_path / "tracer", model_name=str(model))
    docs = []
    for folder in (good, tracer):
        out = tmp_path / f"{folder.name}.json"
        code, _, err = run_graph(PROMPT, "--transcoders", folder, "--out", out, *COMMON)
        assert code == 0, err
        docs.append(json.loads(out.read_text()))
    assert [n["node_id"] for n in docs[0]["nodes"]] == [n["node_id"] for n in docs[1]["nodes"]]
    assert [link["weight"] for link in docs[0]["links"]] == pytest.approx(
        [link["weight"] for link in docs[1]["links"]], rel=1e-4, abs=1e-6
    )


def test_labels_come_from_each_members_feature_store(assets, tmp_path):
    model, good, root = assets
    out = tmp_path / "graph.json"
    assert run_graph(PROMPT, "--transcoders", good, "--out", out, *COMMON)[0] == 0
    features = [
        n for n in json.loads(out.read_text())["nodes"] if n["feature_type"] == "cross layer transcoder"
    ]
    labelled = tmp_path / "set"
    save_dictionary_set(dictionary_set([_transcoder(i) for i in range(N_LAYERS)]), labelled)
    for layer in range(N_LAYERS):
        with FeatureStore(labelled / f"layer_{layer}" / "features.db") as fs:
            fs.begin_analysis(
                {"hook_name": f"blocks.{layer}.ln2.hook_normalized", "dictionary": {"d_sae": D_TC}}
            )
            fs.write_results(_feature_rows(D_TC), [], [], {"batches": 1, "contexts": 1, "tokens": 1})
            for idx in range(D_TC):
                fs.set_explanation(idx, f"layer {layer} feature {idx}")
    code, stdout, err = run_graph(
        PROMPT, "--transcoders", labelled, "--model", model, "--store", labelled, "--out", out, *COMMON
    )
    assert code == 0, err
    nodes = json.loads(out.read_text())["nodes"]
    clerps = {n["node_id"]: n["clerp"] for n in nodes if n["feature_type"] == "cross layer transcoder"}
    assert clerps and clerps == {n["node_id"]: f"layer {n['layer']} feature {n['feature']}" for n in features}
    assert f"{len(clerps)} features labelled" in " ".join(stdout.split())
    message = refused_graph(PROMPT, "--transcoders", good, "--store", root / "model", "--out", out, *COMMON)
    assert "no feature store" in message


def _feature_rows(d_sae: int) -> list[dict]:
    """The statistics rows `write_results` needs so that every latent exists in the store."""
    return [{"idx": i, "density": 0.1, "mean_act": 1.0, "max_act": 2.0, "n_active": 1, "hist": [1]}
            for i in range(d_sae)]  # fmt: skip


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_sets_and_prompts_are_refused_in_one_paragraph(assets, tmp_path):
    model, good, root = assets
    out = tmp_path / "graph.json"
    assert "is not a dictionary set" in refused_graph(PROMPT, "--transcoders", root / "model", *COMMON)
    assert "prompt is empty" in refused_graph("  ", "--transcoders", good, *COMMON)
    too_long = " ".join(["w3"] * 64)  # 65 tokens with BOS; the tiny model reads 64
    assert "at most 64" in refused_graph(too_long, "--transcoders", good, "--out", out, *COMMON)
    resid = save_dictionary_set(
        dictionary_set([_transcoder(i, "hook_resid_pre", "hook_resid_post") for i in range(N_LAYERS)]),
        tmp_path / "resid",
    )
    message = refused_graph(PROMPT, "--transcoders", resid, "--model", model, *COMMON)
    assert "blocks.{i}.ln2.hook_normalized to blocks.{i}.hook_mlp_out" in message
    assert "blocks.{i}.hook_resid_pre" in message
    one = save_dictionary_set(dictionary_set([_transcoder(0)]), tmp_path / "one")
    assert "missing layers" in refused_graph(PROMPT, "--transcoders", one, "--model", model, *COMMON)
    gap = tmp_path / "gap"
    save_dictionary_set(dictionary_set([_transcoder(i) for i in range(N_LAYERS)]), gap)
    for path in (gap / "layer_1").iterdir():
        path.unlink()
    (gap / "layer_1").rmdir()
    assert "layer_1/, which is missing" in refused_graph(
        PROMPT, "--transcoders", gap, "--model", model, *COMMON
    )
    assert not out.exists()


# ---- the schema ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def document(assets):
    model, good, _ = assets
    lm = load_model(model, device="cpu", dtype=torch.float32)
    graph = attribute(lm, load_dictionary_set(good), [1, 5, 9, 17, 30, 8])
    return json.loads(json.dumps(graph_json(prune(graph), lm, labels={}, slug="tiny", node_threshold=0.8)))


def test_graph_json_of_a_tiny_graph_is_valid_with_unique_ids_and_known_endpoints(document):
    assert graph_schema()["$schema"].endswith("2020-12/schema")
    validate_graph(document)
    ids = [n["node_id"] for n in document["nodes"]]
    assert len(ids) == len(set(ids))
    assert all(link["source"] in ids and link["target"] in ids for link in document["links"])
    layers = {n["feature_type"]: n["layer"] for n in document["nodes"]}
    assert layers["embedding"] == "E" and layers["logit"] == str(N_LAYERS + 1)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["nodes"][0].pop("node_id"), "'node_id' is a required property"),
        (lambda d: d["links"][0].update(weight="0.5"), "is not of type 'number'"),
        (lambda d: d["nodes"][0].update(layer=0), "is not of type 'string'"),
        (lambda d: d["nodes"][0].update(feature_type="transcoder"), "is not one of"),
        (lambda d: d["metadata"].pop("prompt_tokens"), "'prompt_tokens' is a required property"),
        (lambda d: d["qParams"].update(pinnedIds="x"), "is not of type 'array'"),
    ],
)
def test_the_schema_refuses_what_the_viewer_would_misread(document, change, expected):
    broken = copy.deepcopy(document)
    change(broken)
    assert any(expected in e for e in schema_errors(broken)), schema_errors(broken)
    with pytest.raises(GraphError, match="Neuronpedia's graph format"):
        validate_graph(broken)


def test_structural_errors_are_found_beyond_the_schema(document):
    broken = copy.deepcopy(document)
    broken["nodes"].append(dict(broken["nodes"][0]))
    broken["links"].append({"source": "nowhere", "target": broken["nodes"][0]["node_id"], "weight": 1.0})
    broken["links"][0]["weight"] = float("nan")
    broken["nodes"][1]["ctx_idx"] = len(broken["metadata"]["prompt_tokens"])
    errors = graph_errors(broken)
    assert any("appears more than once" in e for e in errors)
    assert any("'nowhere' is not the id of any node" in e for e in errors)
    assert any("links/0/weight: nan is not a finite number" in e for e in errors)
    assert any("nodes/1/ctx_idx: 6 is past the 6 prompt tokens" in e for e in errors)
    assert graph_errors(document) == []


# ---- cross-layer transcoders --------------------------------------------------------------------
def test_a_cross_layer_transcoder_gives_the_same_graph_in_both_layouts_with_labels(assets, tmp_path):
    """`--transcoders` takes a CLT folder (saelab's) or circuit-tracer's cross_layer_transcoder; labels come
    from the CLT's one store, feature f of layer l being latent l * width + f."""
    from saelab.dictionaries.io import save_dictionary
    from saelab.dictionaries.transcoders import save_clt
    from tests.helpers import random_clt

    model, _, _ = assets
    clt = random_clt(N_LAYERS, HIDDEN, D_TC)
    clt.cfg.metadata["model_name"] = str(model)
    folder = save_dictionary(clt, tmp_path / "clt")
    save_clt(clt, tmp_path / "tracer", model_name=str(model))
    with FeatureStore(folder / "features.db") as fs:
        fs.begin_analysis({"hook_name": clt.cfg.hook_name, "dictionary": clt.cfg.to_dict()})
        fs.write_results(_feature_rows(clt.cfg.d_sae), [], [], {"batches": 1, "contexts": 1, "tokens": 1})
        for latent in range(clt.cfg.d_sae):
            fs.set_explanation(latent, f"latent {latent}")
    docs = []
    for source in (folder, tmp_path / "tracer"):
        out = tmp_path / f"{source.name}.json"
        code, stdout, err = run_graph(
            PROMPT, "--transcoders", source, "--store", folder, "--out", out, *COMMON
        )
        assert code == 0, err
        docs.append(json.loads(out.read_text()))
    assert schema_errors(docs[0]) == [] and graph_errors(docs[0]) == []
    assert [n["node_id"] for n in docs[0]["nodes"]] == [n["node_id"] for n in docs[1]["nodes"]]
    features = [n for n in docs[0]["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all(n["clerp"] == f"latent {int(n['layer']) * D_TC + n['feature']}" for n in features)
