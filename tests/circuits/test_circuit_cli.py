"""`saelab circuit` on a tiny model with random SAE sets: nodes, edges, the faithfulness curve and its plot,
and the bad inputs refused."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.sets import dictionary_set, save_dictionary_set
from tests.helpers import refused, run, save_model

HIDDEN = 16


def sae_set(folder, hook: str, seed: int):
    members = []
    for layer in range(2):
        cfg = DictionaryConfig(
            "jumprelu", d_in=HIDDEN, d_sae=24, hook_name=hook.format(layer), seed=seed + layer
        )
        sae = build_dictionary(cfg)
        with torch.no_grad():
            sae.log_threshold.fill_(torch.tensor(0.05).log())
            sae.b_enc.uniform_(-0.1, 0.2)
        members.append(sae)
    return save_dictionary_set(dictionary_set(members), folder)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuit")
    model = save_model(root / "model", n_layers=2, hidden=HIDDEN)
    resid = sae_set(root / "resid", "blocks.{}.hook_resid_post", 0)
    attn = sae_set(root / "attn", "blocks.{}.hook_attn_out", 10)
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        words = [f"w{rng.randrange(200)}" for _ in range(5)]
        patch = list(words)
        patch[1] = f"w{rng.randrange(200)}"
        rows.append({"clean_prefix": " ".join(words), "patch_prefix": " ".join(patch),
                     "clean_answer": " w7", "patch_answer": " w9"})  # fmt: skip
    rows.append(
        {"clean_prefix": "w1 w2 w3", "patch_prefix": "w1 w5 w3", "clean_answer": " w7", "patch_answer": " w9"}
    )
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "resid": resid, "attn": attn, "task": task}


def test_circuit_writes_nodes_edges_and_a_faithfulness_curve(env, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(
        "circuit", env["task"], "--dictionaries", env["resid"], "--dictionaries", env["attn"],
        "--model", env["model"], "--dtype", "float32", "--threshold", 0.0001, "--edge-threshold", 0.0,
        "--out", out,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "circuit.json").read_text())
    assert (out / "faithfulness.png").stat().st_size > 1000
    assert result["rows"] == 12 and result["rows_same_length"] == 12 and result["rows_in_task"] == 13
    assert result["hooks"] == [
        "blocks.0.hook_attn_out", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post"
    ]  # fmt: skip
    assert result["nodes"] and all(abs(n["effect"]) > 0.0001 for n in result["nodes"])
    assert len(result["curve"]) == 12
    assert result["metric_full"] == pytest.approx(result["metric"], abs=1e-4)
    kinds = {(e["source"]["hook"], e["target"]["hook"]) for e in result["edges"]}
    assert ("blocks.0.hook_resid_post", "blocks.1.hook_attn_out") in kinds
    assert ("blocks.1.hook_attn_out", "blocks.1.hook_resid_post") in kinds
    assert ("blocks.0.hook_attn_out", "blocks.1.hook_resid_post") not in kinds  # resid 0 lies between
    nodes = {(n["hook"], n["pos"], n["latent"]) for n in result["nodes"]}
    for edge in result["edges"]:
        assert (edge["source"]["hook"], edge["source"]["pos"], edge["source"]["latent"]) in nodes
        assert (edge["target"]["hook"], edge["target"]["pos"], edge["target"]["latent"]) in nodes
    assert all(math.isfinite(p["faithfulness"]) and math.isfinite(p["completeness"]) for p in result["curve"])
    summary = " ".join(stdout.split())
    assert "12 rows (12 of 13 have the most common length)" in summary and "edges" in summary


def test_circuit_refuses_bad_input(env, tmp_path):
    base = ["--model", env["model"], "--dtype", "float32", "--out", tmp_path / "x"]
    assert "unknown --method" in refused(
        "circuit", env["task"], "--dictionaries", env["resid"], "--method", "grad", *base
    )
    assert "holds no dictionary files" in refused(
        "circuit", env["task"], "--dictionaries", env["root"], *base
    )
    missing = env["root"] / "missing.jsonl"
    missing.write_text(json.dumps({"clean_prefix": "w1"}) + "\n")
    assert "clean_answer" in refused("circuit", missing, "--dictionaries", env["resid"], *base)
    assert "read blocks.0.hook_resid_post" in refused(
        "circuit", env["task"], "--dictionaries", env["resid"], "--dictionaries", env["resid"], *base
    )
