"""`python -m saelab` reaches every subcommand, and a resumed run keeps the options it started with."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from saelab.training import CHECKPOINT
from tests.helpers import run, save_model, write_corpus

GROUPS = ("harvest", "train", "eval", "analyze", "serve", "export", "demo", "toy", "steer", "direction")


def _help(*module_and_args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", *module_and_args, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_python_m_saelab_lists_every_command():
    text = _help("saelab")
    for group in GROUPS:
        assert group in text, group


@pytest.mark.parametrize("module", ["saelab", "saelab.cli"])
@pytest.mark.parametrize("group", ["steer", "direction"])
def test_command_groups_registered_late_are_reachable(module, group):
    """`python -m saelab.cli steer` used to fail: __main__ ran before the groups were added."""
    text = _help(module, group)
    assert "Usage:" in text and ("generate" in text or "build" in text)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("entry")
    return {
        "model": save_model(root / "model", hidden=32),
        "corpus": write_corpus(root / "c.jsonl", n_docs=400),
    }


def test_a_resumed_no_eval_run_does_not_evaluate(env, tmp_path, monkeypatch):
    """--resume takes the run's own options from config.json: no evaluation, the same dtype."""
    from saelab import training
    from saelab.cli import train as train_command

    common = ["--model", env["model"], "--data", env["corpus"], "--context-size", "32", "--hook",
              "blocks.1.hook_resid_post", "--width", "32", "--k", "4", "--batch-size", "64"]  # fmt: skip
    real_train = training.train

    def interrupted(cfg, resume=False, overwrite=False, **kw):
        return real_train(cfg, resume=resume, overwrite=overwrite, stop_after_steps=2, progress=False)

    monkeypatch.setattr(training, "train", interrupted)
    code, _, err = run("train", "--run-dir", tmp_path / "r", "--tokens", "512", "--no-eval",
                       "--dtype", "float32", "--checkpoint-every", "1", *common)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "r" / CHECKPOINT / "state.pt").is_file()
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["evaluate_after"] is False and saved["model_dtype"] == "float32"
    monkeypatch.setattr(training, "train", real_train)

    evaluated = []
    monkeypatch.setattr(train_command, "evaluate_folders", lambda *a, **kw: evaluated.append(kw) or {})
    code, out, err = run("train", "--run-dir", tmp_path / "r", "--resume")  # the defaults say --eval
    assert code == 0, err
    assert "trained 1 dictionary" in out
    assert evaluated == []


def test_a_resumed_run_evaluates_in_its_own_dtype(env, tmp_path, monkeypatch):
    from saelab import training
    from saelab.cli import train as train_command

    common = ["--model", env["model"], "--data", env["corpus"], "--context-size", "32", "--hook",
              "blocks.1.hook_resid_post", "--width", "32", "--k", "4", "--batch-size", "64"]  # fmt: skip
    real_train = training.train
    monkeypatch.setattr(
        training, "train", lambda cfg, resume=False, overwrite=False, **kw: real_train(
            cfg, resume=resume, overwrite=overwrite, stop_after_steps=2, progress=False)
    )  # fmt: skip
    code, _, err = run("train", "--run-dir", tmp_path / "r", "--tokens", "512", "--dtype", "float32", *common)
    assert code == 0, err
    monkeypatch.setattr(training, "train", real_train)
    evaluated = []
    monkeypatch.setattr(train_command, "evaluate_folders", lambda *a, **kw: evaluated.append(kw) or {})
    code, _, err = run("train", "--run-dir", tmp_path / "r", "--resume", "--dtype", "bfloat16")
    assert code == 0, err
    assert [kw["dtype"] for kw in evaluated] == ["float32"]
