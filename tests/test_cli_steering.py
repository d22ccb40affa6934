"""`saelab steer` and `saelab direction` on a tiny random model: round trips and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.io import save_dictionary
from saelab.interventions.directions import DirectionSet
from tests.helpers import WORDS, save_model
from tests.test_cli import refused, run

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer_cli")
    model = save_model(root / "model", n_layers=2, hidden=32)
    pos = root / "pos.txt"
    neg = root / "neg.txt"
    pos.write_text("\n".join(" ".join(WORDS[i : i + 4]) for i in range(0, 40, 4)))
    neg.write_text("\n".join(" ".join(WORDS[i : i + 4]) for i in range(100, 140, 4)))
    torch.manual_seed(0)
    sae = build_dictionary(DictionaryConfig(architecture="topk", k=4, d_in=32, d_sae=64, hook_name=HOOK))
    save_dictionary(sae, root / "sae")
    return root, model, pos, neg


def test_build_then_steer_decompose_probe_orthogonalize(setup):
    root, model, pos, neg = setup
    dirs = root / "dirs"
    code, out, err = run(
        "direction", "build", "--positive", pos, "--negative", neg, "--out", dirs,
        "--model", model, "--no-chat", "--positions", "-1,-2",
    )  # fmt: skip
    assert code == 0, err
    loaded = DirectionSet.load(dirs)
    assert loaded.hooks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert loaded.positions == [-1, -2] and loaded.vectors.shape == (2, 2, 32)

    code, out, err = run(
        "steer", "generate", "w1 w2 w3", "--vector", dirs, "--hook", HOOK, "--alpha", "3", "--model", model,
        "--no-chat", "--temperature", "0", "--max-new-tokens", "4", "--out", root / "gen.json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((root / "gen.json").read_text())["rows"]
    assert rows[0]["prompt"] == "w1 w2 w3" and {"steered", "unsteered"} <= set(rows[0])

    code, out, err = run(
        "steer", "generate", "w1 w2", "--sae", root / "sae", "--feature", "3", "--mode", "clamp",
        "--strength", "0", "--model", model, "--no-chat", "--temperature", "0", "--max-new-tokens", "3",
        "--out", root / "clamp.json",
    )  # fmt: skip
    assert code == 0, err

    code, out, err = run("steer", "decompose", dirs, "--sae", root / "sae", "--n-features", "3")
    assert code == 0, err
    assert "cosine" in out.lower()

    code, out, err = run(
        "direction", "probe", "--positive", pos, "--negative", neg, "--hook", HOOK, "--ablate", dirs,
        "--ablate-hook", HOOK, "--model", model, "--no-chat", "--out", root / "probe.json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((root / "probe.json").read_text())

    code, out, err = run(
        "direction", "orthogonalize", dirs, "--hook", HOOK, "--out", root / "orth", "--model", model
    )
    assert code == 0, err
    assert (root / "orth" / "config.json").is_file()


def test_bad_input_is_one_clear_paragraph(setup):
    root, model, pos, neg = setup
    assert "no prompts" in refused("steer", "generate", "--vector", root, "--model", model)
    assert "nothing to steer with" in refused("steer", "generate", "w1", "--model", model, "--no-chat")
    assert "--feature needs --sae" in refused("steer", "generate", "w1", "--feature", "2", "--model", model)
    assert "does not exist" in refused(
        "direction", "build", "--positive", root / "missing.txt", "--negative", neg, "--out", root / "x"
    )
    assert "comma-separated" in refused(
        "direction", "build", "--positive", pos, "--negative", neg, "--out", root / "x", "--layers", "a,b",
        "--model", model,
    )  # fmt: skip
    message = refused("steer", "generate", "w1", "--vector", root / "sae", "--model", model)
    assert "direction" in message.lower()
    assert "no direction at" in refused(
        "steer",
        "generate",
        "w1",
        "--vector",
        root / "dirs",
        "--hook",
        "blocks.9.hook_resid_pre",
        "--model",
        model,
    )
    assert "no A/B item file" in refused("direction", "caa", "nosuchset", "--model", model)
