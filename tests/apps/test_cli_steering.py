"""`saelab steer` and `saelab direction` on a tiny random model: what each command writes, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.io import save_dictionary
from saelab.interventions.directions import DirectionSet
from tests.helpers import WORDS, refused, run, save_model

HOOK = "blocks.1.hook_resid_pre"
SILENT = 3  # the SAE feature the clamp tests steer with


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
    with torch.no_grad():  # feature SILENT never fires, so clamping it to 0 must change nothing at all
        sae.W_enc[:, SILENT] = 0.0
        sae.b_enc[SILENT] = -1.0
    assert sae.W_dec[SILENT].norm() > 0.5  # ... while clamping it to another value moves the stream
    save_dictionary(sae, root / "sae")
    return root, model, pos, neg


@pytest.fixture(scope="module")
def dirs(setup):
    """`saelab direction build` on the two prompt sets: a DirectionSet folder at every layer."""
    root, model, pos, neg = setup
    folder = root / "dirs"
    code, out, err = run(
        "direction", "build", "--positive", pos, "--negative", neg, "--out", folder,
        "--model", model, "--no-chat", "--positions", "-1,-2",
    )  # fmt: skip
    assert code == 0, err
    assert f"saved to {folder}" in " ".join(out.split())
    return folder


def _unit_direction(folder) -> torch.Tensor:
    vector = DirectionSet.load(folder).get(HOOK, -1).float()
    return vector / vector.norm()


def _generate(setup, *args) -> list[dict]:
    root, model, _, _ = setup
    out = root / "gen.json"
    code, _, err = run("steer", "generate", *args, "--model", model, "--no-chat", "--out", out)
    assert code == 0, err
    return json.loads(out.read_text())["rows"]


def test_build_saves_every_layer_and_position(dirs):
    loaded = DirectionSet.load(dirs)
    assert loaded.hooks == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert loaded.positions == [-1, -2] and loaded.vectors.shape == (2, 2, 32)


def test_steer_with_a_vector_writes_both_generations(setup, dirs):
    rows = _generate(
        setup, "w1 w2 w3", "--vector", dirs, "--hook", HOOK, "--alpha", "3", "--temperature", "0",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert rows[0]["prompt"] == "w1 w2 w3" and {"steered", "unsteered"} <= set(rows[0])


def test_a_clamp_at_strength_zero_gives_exactly_the_unsteered_text(setup):
    """Clamping a silent feature to 0 is no edit at all: with the same seed, the same sampled text."""
    root = setup[0]
    clamp = ["w1 w2", "w7 w8 w9", "--sae", root / "sae", "--feature", SILENT, "--mode", "clamp",
             "--temperature", "0.7", "--seed", "3", "--max-new-tokens", "8"]  # fmt: skip
    rows = _generate(setup, *clamp, "--strength", "0")
    assert [row["prompt"] for row in rows] == ["w1 w2", "w7 w8 w9"]
    assert all(row["unsteered"] for row in rows)
    assert [row["steered"] for row in rows] == [row["unsteered"] for row in rows]
    generation = json.loads((root / "gen.json").read_text())["generation"]
    assert generation["seed"] == 3 and generation["max_new_tokens"] == 8
    # The same clamp at another strength does steer: strength reaches the clamp, and the check above is not vacuous.
    moved = _generate(setup, *clamp, "--strength", "20")
    assert [row["unsteered"] for row in moved] == [row["unsteered"] for row in rows]
    assert any(row["steered"] != row["unsteered"] for row in moved)


def test_decompose_prints_the_combination(setup, dirs):
    root = setup[0]
    code, out, err = run("steer", "decompose", dirs, "--sae", root / "sae", "--n-features", "3")
    assert code == 0, err
    assert "cosine" in out.lower()


def test_probe_reports_accuracies_before_and_after_ablation(setup, dirs):
    root, model, pos, neg = setup
    report = root / "probe" / "probe.json"
    report.parent.mkdir()
    code, out, err = run(
        "direction", "probe", "--positive", pos, "--negative", neg, "--hook", HOOK, "--ablate", dirs,
        "--ablate-hook", HOOK, "--model", model, "--no-chat", "--out", report, "--dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    assert [p.name for p in report.parent.iterdir()] == ["probe.json"]
    result = json.loads(report.read_text())
    assert set(result) == {"hook", "chance", "clean_test_accuracy", "clean_train_accuracy", "ablated"}
    assert result["hook"] == HOOK
    assert result["chance"] == pytest.approx(0.5)  # 10 prompts per class, a stratified held-out split
    assert 0 <= result["clean_test_accuracy"] <= 1 and 0 <= result["clean_train_accuracy"] <= 1
    names = [row["name"] for row in result["ablated"]]
    assert names == ["probe", "mean_difference", f"dirs ({HOOK})"]
    fields = {
        "name", "original_probe_accuracy", "retrained_test_accuracy", "retrained_train_accuracy",
        "projected_retrained_accuracy", "max_abs_projection", "predicted_positive_share",
    }  # fmt: skip
    for row in result["ablated"]:
        assert set(row) == fields
        for key in fields - {"name", "max_abs_projection"}:
            assert 0 <= row[key] <= 1, (row["name"], key, row[key])
        # ablated from every residual write: nothing along the direction is left at the probe's hook
        assert row["max_abs_projection"] < 1e-6, row
    # Its own direction ablated, the clean probe gives every input the same logit: one class, chance.
    own = result["ablated"][0]
    assert own["predicted_positive_share"] in (0.0, 1.0)
    assert own["original_probe_accuracy"] == pytest.approx(result["chance"])
    assert f"probe at {HOOK}: held-out accuracy {result['clean_test_accuracy']:.3f}" in out
    assert f"dirs ({HOOK})" in out


def test_orthogonalize_writes_a_model_with_no_writes_along_the_direction(setup, dirs):
    from transformers import AutoModelForCausalLM

    from saelab.core.models import load_model
    from saelab.interventions.orthogonalize import SIDECAR

    root, model, pos, _ = setup
    folder = root / "orth"
    code, out, err = run(
        "direction", "orthogonalize", dirs, "--hook", HOOK, "--out", folder, "--model", model
    )
    assert code == 0, err
    assert f"wrote {folder}" in " ".join(out.split())
    assert (folder / "config.json").is_file() and (folder / SIDECAR).is_file()

    r = _unit_direction(dirs)
    sidecar = json.loads((folder / SIDECAR).read_text())
    assert sidecar["format"] == "saelab-orthogonalization" and sidecar["d_model"] == 32
    assert sidecar["provenance"] == {"direction": str(dirs), "hook": HOOK, "position": -1}
    assert torch.tensor(sidecar["direction"]) == pytest.approx(r, abs=1e-6)
    writers = ["model.embed_tokens"] + [
        f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.o_proj", "mlp.down_proj")
    ]
    assert sidecar["edited_parameters"] == writers and sidecar["dtype"] == "float32"

    original = AutoModelForCausalLM.from_pretrained(model)
    edited = AutoModelForCausalLM.from_pretrained(folder)
    for name in writers:
        weight = edited.get_submodule(name).weight.detach()
        before = original.get_submodule(name).weight.detach()
        # nn.Embedding rows are d_model wide; nn.Linear writes its d_model outputs along dim 0
        along, along_before = (
            (weight @ r, before @ r) if name.endswith("embed_tokens") else (r @ weight, r @ before)
        )
        assert along.abs().max() < 1e-5, name
        assert along_before.abs().max() > 1e-3, name  # the source model did write along it
    assert torch.equal(edited.lm_head.weight, original.lm_head.weight)  # the unembedding is untouched

    lm = load_model(str(folder), device="cpu", dtype=torch.float32)  # loadable as a saelab --model
    ids = lm.tokenizer(pos.read_text().splitlines()[:4], return_tensors="pt").input_ids
    resid = lm.capture(ids, [HOOK])[HOOK]
    assert (resid @ r).abs().max() < 1e-4


def test_bad_input_is_one_clear_paragraph(setup, dirs):
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
