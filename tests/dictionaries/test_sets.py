"""Dictionary sets: one dictionary per layer, saved and loaded in saelab's layout and in circuit-tracer's
transcoder_set layout (checked against the layer files read the way circuit-tracer reads them), and the
bad sets each refused with the fix."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.sets import (
    dictionary_set,
    load_dictionary_set,
    save_dictionary_set,
    save_transcoder_set,
)
from saelab.errors import DictionaryFileError, DictionarySetError
from tests.helpers import random_dictionary

D_MODEL, D_TC = 8, 16
IN, OUT = "blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out"


def transcoder(layer: int, architecture: str = "jumprelu", hook_in: str = IN, hook_out: str | None = OUT):
    member = random_dictionary(
        layer, D_MODEL, D_TC, hook_in.split(".", 2)[2], hook_out.split(".", 2)[2] if hook_out else None,
        architecture, max_threshold=0.5,
    )  # fmt: skip
    with torch.no_grad():
        if architecture == "batchtopk":
            member.threshold.fill_(0.3)
        member.input_scale.fill_(1.7)  # a training scale, to be folded in on save
        member.output_scale.fill_(0.6)
    return member


def outputs(dset, x):
    return {layer: (member.encode(x), member(x)) for layer, member in dset}


def test_a_set_round_trips_in_saelab_layout(tmp_path):
    dset = dictionary_set([transcoder(i) for i in range(3)], model_name="tiny")
    assert dset.layers == [0, 1, 2] and dset.is_transcoder_set and dset.d_model == D_MODEL
    assert dset.hook(2) == "blocks.2.ln2.hook_normalized" and dset.output_hook(2) == "blocks.2.hook_mlp_out"
    folder = save_dictionary_set(dset, tmp_path / "set")
    assert sorted(p.name for p in folder.iterdir()) == ["layer_0", "layer_1", "layer_2", "set.json"]
    loaded = load_dictionary_set(folder)
    x = torch.randn(5, D_MODEL)
    expected, got = outputs(dset, x), outputs(loaded, x)
    assert list(got) == list(expected)
    for layer, (codes, recon) in expected.items():
        torch.testing.assert_close(got[layer][0], codes, msg=f"layer {layer}")
        torch.testing.assert_close(got[layer][1], recon, msg=f"layer {layer}")
    assert loaded.model_name == "tiny"


@pytest.mark.parametrize("architecture", ["jumprelu", "batchtopk", "relu"])
def test_the_transcoder_set_layout_is_what_circuit_tracer_reads(tmp_path, architecture):
    dset = dictionary_set([transcoder(i, architecture) for i in range(2)])
    folder = save_transcoder_set(dset, tmp_path / "tc", model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config == {
        "model_kind": "transcoder_set",
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "SmolLM2-135M-Instruct/saelab-transcoders",
        "transcoders": ["layer_0.safetensors", "layer_1.safetensors"],
    }
    x = torch.randn(6, D_MODEL)
    for layer, member in dset:
        raw = load_file(folder / f"layer_{layer}.safetensors")
        assert {k: tuple(v.shape) for k, v in raw.items()} == {
            "W_enc": (D_TC, D_MODEL), "W_dec": (D_TC, D_MODEL), "b_enc": (D_TC,), "b_dec": (D_MODEL,),
            "activation_function.threshold": (D_TC,),
        }  # fmt: skip
        # circuit-tracer's single-layer transcoder: JumpReLU(x @ W_enc.T + b_enc), then @ W_dec + b_dec
        pre = x @ raw["W_enc"].T + raw["b_enc"]
        acts = pre * (pre > raw["activation_function.threshold"])
        torch.testing.assert_close(acts, member.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(acts @ raw["W_dec"] + raw["b_dec"], member(x), atol=1e-5, rtol=1e-5)
    loaded = load_dictionary_set(folder)
    assert (
        loaded.hook(1) == "blocks.1.ln2.hook_normalized" and loaded.output_hook(1) == "blocks.1.hook_mlp_out"
    )
    expected, got = outputs(dset, x), outputs(loaded, x)
    assert list(got) == list(expected)
    for layer, (codes, recon) in expected.items():
        torch.testing.assert_close(got[layer][0], codes, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[layer][1], recon, atol=1e-5, rtol=1e-5)


def test_a_missing_layer_is_refused_with_the_fix(tmp_path):
    with pytest.raises(DictionarySetError, match=r"no dictionary for layer\(s\) \[1\]"):
        dictionary_set([transcoder(0), transcoder(2)])
    folder = save_dictionary_set(dictionary_set([transcoder(i) for i in range(3)]), tmp_path / "set")
    shutil.rmtree(folder / "layer_1")
    with pytest.raises(DictionarySetError, match="layer 1 in layer_1/, which is missing"):
        load_dictionary_set(folder)
    tc = save_transcoder_set(dictionary_set([transcoder(i) for i in range(3)]), tmp_path / "tc")
    (tc / "layer_2.safetensors").unlink()
    with pytest.raises(DictionarySetError, match="layer_2.safetensors for layer 2"):
        load_dictionary_set(tc)
    config = yaml.safe_load((tc / "config.yaml").read_text())
    config["transcoders"] = ["layer_0.safetensors", "layer_2.safetensors"]
    shutil.copy(tc / "layer_1.safetensors", tc / "layer_2.safetensors")
    (tc / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(DictionarySetError, match=r"layer\(s\) \[1\]"):
        load_dictionary_set(tc)


def test_a_member_at_the_wrong_hook_is_refused():
    with pytest.raises(DictionarySetError, match="reads 'blocks.1.ln2.hook_normalized'.*blocks.2.ln2"):
        dictionary_set({0: transcoder(0), 1: transcoder(1), 2: transcoder(1)})
    with pytest.raises(DictionarySetError, match="same hook of every layer"):
        dictionary_set([transcoder(0), transcoder(1, hook_in="blocks.{}.hook_resid_mid")])
    with pytest.raises(DictionarySetError, match="writes 'blocks.1.hook_resid_post'"):
        dictionary_set([transcoder(0), transcoder(1, hook_out="blocks.{}.hook_resid_post")])
    with pytest.raises(DictionarySetError, match="all SAEs or all transcoders"):
        dictionary_set([transcoder(0), transcoder(1, hook_in="blocks.{}.ln2.hook_normalized", hook_out=None)])
    with pytest.raises(DictionarySetError, match="names no layer"):
        dictionary_set(
            [build_dictionary(DictionaryConfig("jumprelu", d_in=D_MODEL, d_sae=D_TC, hook_name="embed0"))]
        )
    with pytest.raises(DictionarySetError, match="two dictionaries read layer 0"):
        dictionary_set([transcoder(0), transcoder(0)])
    with pytest.raises(DictionarySetError, match="model has 2"):
        dictionary_set([transcoder(i) for i in range(3)]).check_model(2)


def test_what_circuit_tracer_cannot_read_is_refused(tmp_path):
    with pytest.raises(DictionarySetError, match="no per-latent threshold.*batchtopk"):
        save_transcoder_set(dictionary_set([transcoder(0, "topk")]), tmp_path / "topk")
    saes = dictionary_set([transcoder(0, hook_out=None)])
    with pytest.raises(DictionarySetError, match="holds SAEs"):
        save_transcoder_set(saes, tmp_path / "saes")
    assert not (tmp_path / "topk").exists() and not (tmp_path / "saes").exists()
    with pytest.raises(DictionarySetError, match="is not a dictionary set"):
        load_dictionary_set(tmp_path)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "transcoders": ["hf://mwhanna/some-transcoders/layer_0.safetensors"],
    }))  # fmt: skip
    with pytest.raises(DictionaryFileError, match="Hugging Face hub"):
        load_dictionary_set(hub)
    (hub / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder"}))
    with pytest.raises(DictionaryFileError, match="not a circuit-tracer transcoder_set"):
        load_dictionary_set(hub)
