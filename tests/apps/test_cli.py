"""The `saelab` command on tiny random models: a full round trip, and every kind of bad input.

Bad input must end with exit status 2, one readable paragraph on stderr (what is wrong and what to
do, no traceback) and nothing half-written in the output folders. Commands run in-process through
`saelab.cli.main` (the console script's entry point) for speed; a few run as real subprocesses.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.helpers import leftovers, make_model, make_tokenizer, refused, run, save_model, write_corpus

HOOK = "blocks.1.hook_resid_post"
SMALL = ["--context-size", "32"]
TRAIN = ["--tokens", "512", "--batch-size", "128", "--width", "32", "--k", "4", "--hook", HOOK, *SMALL]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    e = {"root": root}
    e["model"] = save_model(root / "model32", hidden=32)
    e["model16"] = save_model(root / "model16", hidden=16)
    e["corpus"] = write_corpus(root / "corpus.jsonl", n_docs=1500)
    # weights with an inf: every activation after it is inf/NaN
    model = make_model(hidden=32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(root / "model_inf")
    make_tokenizer().save_pretrained(root / "model_inf")
    # a truncated weights file
    shutil.copytree(e["model"], root / "model_trunc")
    weights = root / "model_trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("w1 w2 w3\n")
    (root / "one_context.txt").write_text(" ".join(["w5"] * 40) + "\n")

    # the round trip: harvest -> train --activations -> eval
    e["cache"] = root / "acts"
    harvest = run(
        "harvest", "--model", e["model"], "--dtype", "float32", "--data", e["corpus"], "--out", e["cache"],
        "--hook", HOOK, "--tokens", 512, *SMALL,
    )  # fmt: skip
    e["run"] = root / "run"
    train = run(
        "train", "--run-dir", e["run"], "--activations", e["cache"], "--model", e["model"],
        "--data", e["corpus"], "--no-eval", *TRAIN,
    )  # fmt: skip
    e["sae"] = e["run"] / "saes" / "topk-k4-w32"
    evaluate = run("eval", e["run"], "--dtype", "float32", "--tokens", 256, "--ce-contexts", 4)
    e["round_trip"] = {"harvest": harvest, "train": train, "eval": evaluate}
    return e


def test_round_trip_harvest_train_eval(env):
    for step, (code, _out, err) in env["round_trip"].items():
        assert code == 0, f"{step}: {err}"
    assert "harvested 512 tokens" in env["round_trip"]["harvest"][1]
    assert "trained 1 dictionary" in env["round_trip"]["train"][1]
    table = env["round_trip"]["eval"][1]
    assert "saelab evaluation" in table and "topk-k4-w32" in table and "CE score" in table
    sae = env["sae"]
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"} <= {p.name for p in sae.iterdir()}
    metrics = json.loads((sae / "eval.json").read_text())
    assert metrics["l0"] == pytest.approx(4.0) and metrics["model"] == str(env["model"])
    assert metrics["data"]["split"] == "eval" and metrics["tokens"] == 256
    assert (sae / "density.png").exists()
    assert (env["run"] / "DONE.json").exists() and not leftovers(env["root"])


def test_help_exits_zero():
    for args in ([], ["harvest"], ["train"], ["eval"], ["demo"]):
        code, out, err = run(*args, "--help")
        assert code == 0 and "Usage" in out and "--help" in out, (args, err)
    result = subprocess.run(
        [sys.executable, "-m", "saelab", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and all(c in result.stdout for c in ("harvest", "train", "eval"))


def test_real_process_reports_one_paragraph(tmp_path):
    out = tmp_path / "acts"
    result = subprocess.run(
        [sys.executable, "-m", "saelab.cli", "harvest", "--model", "/nonexistent", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no such file or folder: '/nonexistent'" in " ".join(result.stderr.split())
    assert not out.exists()


def test_unknown_model_path(env, tmp_path):
    msg = refused("harvest", "--model", "/nonexistent", "--out", tmp_path / "a")
    assert "'/nonexistent'" in msg and "Check the path" in msg and "local folder with config.json" in msg
    msg = refused("eval", env["sae"], "--model", "/nonexistent", "--out", tmp_path / "e")
    assert "'/nonexistent'" in msg
    assert not list(tmp_path.iterdir())


def test_unknown_hook_point_lists_valid_ones(env, tmp_path):
    args = ["--model", env["model"], "--dtype", "float32", "--data", env["corpus"], "--out", tmp_path / "a"]
    msg = refused("harvest", *args, "--hook", "blocks.7.hook_resid_post")
    assert "unknown hook point 'blocks.7.hook_resid_post'" in msg and "2 blocks" in msg
    assert "Valid hook points" in msg and "hook_mlp_out" in msg and "'blocks.1.hook_resid_post'" in msg
    msg = refused("harvest", *args, "--hook", "blocks.1.hook_resd_post")
    assert "Did you mean 'blocks.1.hook_resid_post'" in msg
    assert not list(tmp_path.iterdir())


def test_dictionary_of_another_width(env, tmp_path):
    before = (env["sae"] / "eval.json").read_bytes()
    msg = refused(
        "eval", env["sae"], "--model", env["model16"], "--dtype", "float32", "--out", tmp_path / "e"
    )
    assert "d_in=32" in msg and "width 16" in msg and "model and hook point it was trained on" in msg
    assert not (tmp_path / "e").exists() and (env["sae"] / "eval.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "torch"])
def test_corrupt_or_foreign_weights(env, tmp_path, damage):
    sae = tmp_path / "sae"
    shutil.copytree(env["sae"], sae)
    weights = sae / "sae_weights.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:300])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "pickle":
        weights.write_bytes(pickle.dumps({"W_enc": [1.0, 2.0]}))
    else:
        torch.save({"W_enc": torch.zeros(3)}, weights)
    msg = refused("eval", sae, "--model", env["model"], "--dtype", "float32", "--out", tmp_path / "e")
    assert "sae_weights.safetensors" in msg
    if damage in ("pickle", "torch"):
        assert "pickle" in msg and "never unpickles" in msg and "save_file" in msg
    else:
        assert "corrupt or truncated" in msg and "re-save" in msg
    assert not (tmp_path / "e").exists() and not leftovers(tmp_path)


def test_corrupt_model_weights(env, tmp_path):
    msg = refused("harvest", "--model", env["root"] / "model_trunc", "--out", tmp_path / "a")
    assert "model_trunc" in msg and "corrupt, truncated" in msg and "--model" in msg
    msg = refused("train", "--run-dir", tmp_path / "r", "--model", env["root"] / "model_trunc", *TRAIN)
    assert "model_trunc" in msg and "corrupt, truncated" in msg
    assert not list(tmp_path.iterdir())


def test_empty_and_too_short_datasets(env, tmp_path):
    args = ["--model", env["model"], "--dtype", "float32", "--hook", HOOK, "--tokens", 512]
    msg = refused("harvest", *args, "--data", env["root"] / "empty.txt", "--out", tmp_path / "a")
    assert "empty.txt" in msg and "gave 0 tokens" in msg and "context_size" in msg
    msg = refused("harvest", *args, "--data", env["root"] / "short.txt", "--out", tmp_path / "b")
    assert "short.txt" in msg and "gave 4 tokens" in msg and "smaller context_size" in msg
    # one context's worth, far fewer than --tokens: refused, and the short cache is not left behind
    msg = refused(
        "harvest", *args, *SMALL, "--data", env["root"] / "one_context.txt", "--out", tmp_path / "c"
    )
    assert "ran out after" in msg and "--tokens" in msg
    msg = refused("harvest", *args, "--data", tmp_path / "missing.txt", "--out", tmp_path / "d")
    assert "No such file or folder" in msg
    assert not list(tmp_path.iterdir())


def test_nan_or_inf_activations(env, tmp_path):
    cache = tmp_path / "nan_cache"
    shutil.copytree(env["cache"], cache)
    shard = next((cache / HOOK).glob("shard_*.npy"))
    array = np.load(shard)
    array[3, 5] = np.nan
    np.save(shard, array)
    run_dir = tmp_path / "r"
    msg = refused("train", "--run-dir", run_dir, "--activations", cache, "--no-eval", *TRAIN)
    assert "NaN or inf" in msg and "re-harvest" in msg
    assert not run_dir.exists()  # no config-only run folder left behind
    out = tmp_path / "a"
    msg = refused(
        "harvest", "--model", env["root"] / "model_inf", "--dtype", "float32", "--data", env["corpus"],
        "--out", out, "--hook", HOOK, "--tokens", 512, *SMALL,
    )  # fmt: skip
    assert "NaN or inf" in msg and "float32" in msg
    assert not out.exists() and not leftovers(tmp_path)


def test_resume_without_checkpoint(env, tmp_path):
    run_dir = tmp_path / "r"
    msg = refused(
        "train", "--run-dir", run_dir, "--activations", env["cache"], "--resume", "--no-eval", *TRAIN
    )
    assert "cannot resume" in msg and "no checkpoint" in msg and "without --resume" in msg
    assert not run_dir.exists()


def test_finished_run_is_refused_unless_overwrite(env, tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(env["run"], run_dir)
    snapshot = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    args = ["train", "--run-dir", run_dir, "--activations", env["cache"], "--no-eval", *TRAIN]
    msg = refused(*args)
    assert "already holds a finished run" in msg and "--overwrite" in msg
    assert snapshot == {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, out, err = run(*args, "--overwrite")
    assert code == 0, err
    assert "trained 1 dictionary" in out and (run_dir / "DONE.json").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--k", "64"], ["--k 64", "--width 32"]),
        (["--architecture", "foo"], ["'foo'", "topk"]),
        (["--batch-size", "0"], ["--batch-size", "greater than or equal to 1"]),
        (["--tokens", "100"], ["--tokens 100", "--batch-size 128"]),
        (["--lr", "-1"], ["--lr", "positive"]),
        (["--dtype", "float8"], ["float8", "float32"]),
    ],
)
def test_bad_training_options(env, tmp_path, options, words):
    run_dir = tmp_path / "r"
    msg = refused("train", "--run-dir", run_dir, "--activations", env["cache"], "--no-eval", *TRAIN, *options)
    assert all(word in msg for word in words), msg
    assert not run_dir.exists()


def test_missing_dictionary_and_cache(env, tmp_path):
    msg = refused("eval", tmp_path / "nothing", "--model", env["model"])
    assert "no dictionary found" in msg and "cfg.json" in msg
    msg = refused(
        "train", "--run-dir", tmp_path / "r", "--activations", tmp_path / "nope", "--no-eval", *TRAIN
    )
    assert "not an activation cache" in msg and "saelab harvest" in msg
    assert not (tmp_path / "r").exists()


def test_analyze_writes_a_feature_store_beside_the_sae(env, tmp_path):
    from saelab.analysis.store import FeatureStore

    out = tmp_path / "f.db"
    code, stdout, err = run("analyze", env["sae"], "--dtype", "float32", "--tokens", 256, "--out", out)
    assert code == 0, err
    assert "analysed" in stdout and out.is_file()
    with FeatureStore(out, create=False) as store:
        assert store.count_features(include_dead=True) == 32
        assert store.meta()["dictionary_folder"] == str(env["sae"])
        top = store.list_features(sort="density", descending=True, limit=1)[0]
        assert store.examples(top["idx"], "top")
    code, _, err = run("analyze", env["sae"], "--tokens", 256, "--out", tmp_path / "g.db", "--resume")
    assert code == 2 and "resume" in " ".join(err.split()).lower()
