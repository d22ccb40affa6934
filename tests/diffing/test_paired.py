"""Paired activations: two models that share a tokenizer, harvested on identical tokens in one pass into
one cache (`saelab harvest --model A --model B`), from which a crosscoder trains; models that would not
read the same tokens, or differ in width, are refused in one paragraph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saelab.core.models import HookedLM
from saelab.diffing.paired import PairedModels
from saelab.errors import DiffingError
from tests.helpers import make_model, make_tokenizer, refused, run, write_corpus

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    folders = []
    for name, seed in (("base", 0), ("tuned", 1)):
        make_model(n_layers=2, hidden=16, seed=seed).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
        folders.append(root / name)
    return folders, write_corpus(root / "corpus.txt", n_docs=300)


def test_one_pass_fills_one_cache_with_both_models_on_the_same_tokens(assets, tmp_path):
    (base, tuned), corpus = assets
    out = tmp_path / "cache"
    code, stdout, err = run(
        "harvest", "--model", base, "--model", tuned, "--hook", HOOK, "--data", corpus, "--tokens", 1024,
        "--context-size", 16, "--out", out, "--dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["hooks"]) == {f"model0/{HOOK}", f"model1/{HOOK}"}
    # Each row holds both models' activations at one token: recompute them from the token ids.
    lms = [HookedLM(make_model(n_layers=2, hidden=16, seed=s), make_tokenizer()) for s in (0, 1)]
    ids = torch.tensor([[1, 5, 9, 17, 30, 8]])
    paired = PairedModels(lms).capture(ids, [f"model0/{HOOK}", f"model1/{HOOK}"])
    for member, lm in enumerate(lms):
        torch.testing.assert_close(paired[f"model{member}/{HOOK}"], lm.capture(ids, [HOOK])[HOOK])
    assert not torch.allclose(paired[f"model0/{HOOK}"], paired[f"model1/{HOOK}"])  # different weights
    # ... and a crosscoder trains from that cache.
    code, _, err = run(
        "train", "--run-dir", tmp_path / "run", "--activations", out, "--architecture", "crosscoder_batchtopk",
        "--layers", "0-1", "--hook", "model{i}/" + HOOK, "--width", 32, "--k", 4, "--tokens", 1024,
        "--batch-size", 64, "--no-eval",
    )  # fmt: skip
    assert code == 0, err
    saved = json.loads(
        (tmp_path / "run" / "saes" / "crosscoder_batchtopk-k4-M2-w32" / "cfg.json").read_text()
    )
    assert saved["d_sae"] == 32 and saved["saelab"]["config"]["layers"] == [0, 1]
    members = saved["saelab"]["config"]["metadata"]["member_models"]  # each member's model, from the cache
    assert [m.rstrip("/").split("/")[-1] for m in members] == ["base", "tuned"]
    assert np.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["fvu"])


def test_models_that_cannot_read_the_same_tokens_are_refused(assets, tmp_path):
    (base, _), corpus = assets
    other = tmp_path / "other"
    make_model(n_layers=2, hidden=16).save_pretrained(other)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["zzzz"])
    tokenizer.save_pretrained(other)
    message = refused("harvest", "--model", base, "--model", other, "--data", corpus, "--out", tmp_path / "c")
    assert "different tokenizers" in message and not (tmp_path / "c").exists()
    wide = tmp_path / "wide"
    make_model(n_layers=2, hidden=32).save_pretrained(wide)
    make_tokenizer().save_pretrained(wide)
    message = refused("harvest", "--model", base, "--model", wide, "--data", corpus, "--out", tmp_path / "c")
    assert "different widths" in message
    with pytest.raises(DiffingError, match="names no member"):
        PairedModels([HookedLM(make_model(n_layers=2, hidden=16), make_tokenizer())] * 2).hook_dim("model2/x")
    with pytest.raises(DiffingError, match="at least two models"):
        PairedModels([HookedLM(make_model(n_layers=2, hidden=16), make_tokenizer())])


def test_saelab_diff_tags_the_latents_of_a_crosscoder_trained_on_a_paired_cache(assets, tmp_path):
    (base, tuned), corpus = assets
    cache = tmp_path / "cache"
    assert run("harvest", "--model", base, "--model", tuned, "--hook", HOOK, "--data", corpus, "--tokens", 1024,
               "--context-size", 16, "--out", cache, "--dtype", "float32")[0] == 0  # fmt: skip
    assert run("train", "--run-dir", tmp_path / "run", "--activations", cache, "--architecture", "crosscoder_batchtopk",
               "--layers", "0-1", "--hook", "model{i}/" + HOOK, "--width", 32, "--k", 4, "--tokens", 1024,
               "--batch-size", 64, "--no-eval")[0] == 0  # fmt: skip
    folder = tmp_path / "run" / "saes" / "crosscoder_batchtopk-k4-M2-w32"
    code, stdout, err = run("diff", folder, "--activations", cache, "--tokens", 1024)
    assert code == 0, err
    result = json.loads((folder / "diff" / "diff.json").read_text())
    assert len(result["latents"]) == 32 and sum(result["counts"].values()) >= 32
    assert (folder / "diff" / "delta_norm.png").is_file() and (folder / "diff" / "nu_scatter.png").is_file()
    assert "model-specific latents" in " ".join(stdout.split())
    message = refused("diff", tmp_path / "nothing")
    assert "nothing" in message
