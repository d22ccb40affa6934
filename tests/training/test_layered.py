"""One dictionary per layer from one pass over the data (`saelab train --layers`): streamed through a
buffer bounded in bytes, named by layer, and written as a dictionary set per sweep point."""

from __future__ import annotations

import json

import pytest

from saelab.cli.train import parse_layers
from saelab.dictionaries.sets import load_dictionary_set
from saelab.errors import SaelabError
from saelab.training import TrainConfig, buffer_rows
from tests.helpers import refused, run, save_model, write_corpus

IN, OUT = "blocks.{i}.ln2.hook_normalized", "blocks.{i}.hook_mlp_out"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    return save_model(root / "model", n_layers=3, hidden=16), write_corpus(root / "corpus.txt", n_docs=200)


def test_layer_lists_parse_and_need_a_layer_slot_in_the_hook():
    assert parse_layers("0-2", IN, OUT) == [0, 1, 2]
    assert parse_layers("4,0, 2", IN, None) == [0, 2, 4]
    assert parse_layers(None, "blocks.3.hook_resid_post", None) == []
    for spec, message in (("a-b", "not a layer list"), ("1,1", "each layer"), ("-1", "not a layer list")):
        with pytest.raises(SaelabError, match=message):
            parse_layers(spec, IN, OUT)
    with pytest.raises(SaelabError, match="must say where the layer goes"):
        parse_layers("0-2", "blocks.3.ln2.hook_normalized", OUT)
    with pytest.raises(SaelabError, match="no --layers"):
        parse_layers(None, IN, OUT)


def test_the_stream_buffer_stays_within_its_bytes():
    cfg = TrainConfig(buffer_tokens=131072, batch_size=64, buffer_bytes=2**20)
    dims = {f"blocks.{i}.{name}": 16 for i in range(3) for name in ("a", "b")}  # 96 floats a row
    assert buffer_rows(cfg, dims) == 2**20 // (4 * 96)
    assert buffer_rows(TrainConfig(buffer_tokens=512, buffer_bytes=2**30), dims) == 512
    assert buffer_rows(TrainConfig(batch_size=64, buffer_bytes=10), dims) == 4 * 64  # a floor of 4 batches
    assert buffer_rows(TrainConfig(buffer_tokens=777), dims) == 777


def test_train_layers_writes_a_transcoder_set_per_sweep_point(assets, tmp_path):
    model, corpus = assets
    run_dir = tmp_path / "run"
    code, out, err = run(
        "train", "--run-dir", run_dir, "--model", model, "--data", corpus, "--dtype", "float32",
        "--context-size", 16, "--layers", "0-2", "--hook", IN, "--output-hook", OUT,
        "--architecture", "jumprelu", "--architecture", "topk", "--k", 4, "--target-l0", 4, "--width", 32,
        "--tokens", 1024, "--batch-size", 64, "--buffer-gib", 0.001, "--no-eval",
    )  # fmt: skip
    assert code == 0, err
    assert "streaming 3 layers" in " ".join(out.split())
    assert not (run_dir / "activations").exists()  # streamed: no cache of six hooks on disk
    ran = json.loads((run_dir / "config.json").read_text())
    assert ran["stream"] and ran["buffer_bytes"] == int(0.001 * 2**30)
    names = sorted(p.name for p in (run_dir / "saes").iterdir())
    assert names == sorted(f"L{i}-transcoder-{a}-w32" for i in range(3) for a in ("jumprelu-l0_4", "topk-k4"))
    sets = sorted(p.name for p in (run_dir / "sets").iterdir())
    assert sets == ["transcoder-jumprelu-l0_4-w32", "transcoder-topk-k4-w32"]
    dset = load_dictionary_set(run_dir / "sets" / "transcoder-jumprelu-l0_4-w32")
    assert dset.layers == [0, 1, 2] and dset.is_transcoder_set and dset.d_model == 16
    assert [dset.hook(i) for i in dset.layers] == [IN.replace("{i}", str(i)) for i in range(3)]
    assert dset[2].cfg.architecture == "jumprelu" and dset[2].cfg.output_hook_name == "blocks.2.hook_mlp_out"


def test_train_layers_refuses_a_layer_the_model_does_not_have(assets, tmp_path):
    model, corpus = assets
    message = refused(
        "train", "--run-dir", tmp_path / "run", "--model", model, "--data", corpus, "--layers", "0-5",
        "--hook", IN, "--output-hook", OUT, "--tokens", 1024, "--batch-size", 64, "--no-eval",
    )  # fmt: skip
    assert "blocks.3.ln2.hook_normalized" in message
    assert not (tmp_path / "run").exists()


def test_train_a_cross_layer_transcoder_over_the_layers_and_evaluate_it(assets, tmp_path):
    """--architecture clt_batchtopk --layers 0-2 trains one dictionary over all three layers from the same
    stream, saves it (and its circuit-tracer export loads back), and evaluates it spliced into every MLP."""
    from saelab.dictionaries.io import load_dictionary
    from saelab.dictionaries.transcoders import load_transcoders, save_clt

    model, _ = assets
    corpus = write_corpus(tmp_path / "corpus.txt", n_docs=1500)  # enough for an eval split
    run_dir = tmp_path / "run"
    code, out, err = run(
        "train", "--run-dir", run_dir, "--model", model, "--data", corpus, "--dtype", "float32",
        "--context-size", 16, "--layers", "0-2", "--hook", IN, "--output-hook", OUT,
        "--architecture", "clt_batchtopk", "--architecture", "topk", "--k", 4, "--width", 32,
        "--tokens", 2048, "--batch-size", 64, "--buffer-gib", 0.001,
    )  # fmt: skip
    assert code == 0, err
    names = sorted(p.name for p in (run_dir / "saes").iterdir())
    assert "transcoder-clt_batchtopk-k4-L3-w96" in names and "L2-transcoder-topk-k4-w32" in names
    assert sorted(p.name for p in (run_dir / "sets").iterdir()) == ["transcoder-topk-k4-w32"]
    clt = load_dictionary(run_dir / "saes" / "transcoder-clt_batchtopk-k4-L3-w96")
    assert clt.cfg.layers == [0, 1, 2] and clt.W_enc.shape == (3, 16, 32)
    metrics = json.loads((run_dir / "saes" / "transcoder-clt_batchtopk-k4-L3-w96" / "eval.json").read_text())
    assert metrics["l0"] > 0 and "ce_loss_score" in metrics and metrics["ce_sae"] != metrics["ce_clean"]
    save_clt(clt, tmp_path / "tracer")
    assert load_transcoders(tmp_path / "tracer").cfg.d_sae == 96
    # Feature dashboards read all three layers' inputs; latents are numbered layer-major.
    folder = run_dir / "saes" / "transcoder-clt_batchtopk-k4-L3-w96"
    code, _, err = run("analyze", folder, "--model", model, "--data", corpus, "--tokens", 2048)
    assert code == 0, err
    assert (folder / "features.db").is_file()


def test_a_cross_layer_transcoder_needs_layers(assets, tmp_path):
    model, corpus = assets
    message = refused(
        "train", "--run-dir", tmp_path / "run", "--model", model, "--data", corpus, "--architecture", "clt",
        "--hook", "blocks.0.ln2.hook_normalized", "--output-hook", "blocks.0.hook_mlp_out", "--no-eval",
    )  # fmt: skip
    assert "cross-layer transcoder" in message and "--layers" in message
