"""Weight orthogonalization: the written folder behaves exactly like runtime directional ablation."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

from saelab.core.models import HookedLM, load_model
from saelab.core.prompts import encode_left_padded
from saelab.errors import DimensionMismatchError, SaelabError
from saelab.interventions.hooks import AddVector, ablation, steer
from saelab.interventions.orthogonalize import (
    SIDECAR,
    OrthogonalizationError,
    orthogonalize_weights,
    orthogonalized_copy,
    residual_writers,
    write_orthogonalized,
)
from tests.helpers import make_model, make_tokenizer

KINDS = ["llama", "llama_tied", "llama_bias", "gpt2", "neox", "neox_sequential"]


def _model(kind: str) -> torch.nn.Module:
    """Tiny random models of every supported layout, tied or not, with or without output biases."""
    torch.manual_seed(0)
    if kind == "llama_tied":
        model = make_model("llama", n_layers=3)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model
    if kind == "llama_bias":
        model = make_model("llama", n_layers=3, attention_bias=True, mlp_bias=True)
        with torch.no_grad():  # biases start at zero: make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        return model
    if kind.startswith("neox"):
        return make_model("gpt_neox", n_layers=3, use_parallel_residual=kind == "neox")
    return make_model(kind, n_layers=3)


def _lm(kind: str) -> HookedLM:
    return HookedLM(_model(kind), make_tokenizer())


def _batch(lm: HookedLM):
    texts = ["w1 w2 w3 w4 w5 w6 w7", "w10 w11 w12", "w40 w41 w42 w43 w44"]
    return encode_left_padded(lm.tokenizer, texts, lm.device)


def _direction(d: int, seed: int = 1) -> torch.Tensor:
    return 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _runtime(lm, direction, ids, mask):
    with torch.no_grad(), steer(lm, ablation(lm, direction)):
        return lm.forward(ids, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_written_folder_equals_runtime_ablation(kind, tmp_path):
    lm = _lm(kind)
    ids, mask = _batch(lm)
    d = _direction(lm.d_model)
    r = d / d.norm()
    with torch.no_grad():
        clean = lm.forward(ids, mask)
    expected = _runtime(lm, d, ids, mask)
    unembed = lm.unembed.detach().clone()

    folder = write_orthogonalized(lm, d, tmp_path / "orth", provenance={"method": "random", "seed": 1})
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    new = load_model(folder, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = new.forward(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    err = (got[real] - expected[real]).abs().max()
    assert (got[real] - clean[real]).abs().max() > max(1e-3, 100 * err)  # the edit changed the model

    # No residual-stream state keeps a component along r, at any layer or position.
    hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(new.n_layers)]
    acts = new.capture(ids, hooks, attention_mask=mask, stop_early=False)
    for hook in hooks:
        x = acts[hook][real]
        assert (x @ r).abs().max() < 1e-4 * x.norm(dim=-1).max(), hook

    # The unembedding is the original one, and is no longer tied to the (edited) embedding.
    torch.testing.assert_close(new.unembed, unembed, atol=0, rtol=0)
    assert new.unembed.data_ptr() != new.model.get_input_embeddings().weight.data_ptr()
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False

    # The source model is untouched (still tied where it was tied).
    with torch.no_grad():
        torch.testing.assert_close(lm.forward(ids, mask), clean, atol=0, rtol=0)
    if kind in ("llama_tied", "gpt2"):
        assert lm.unembed.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()

    info = json.loads((folder / SIDECAR).read_text())
    assert info["provenance"] == {"method": "random", "seed": 1}
    assert info["direction_norm"] == pytest.approx(float(d.norm()), rel=1e-6)
    torch.testing.assert_close(torch.tensor(info["direction"]), r)
    assert info["untied_embeddings"] is (kind in ("llama_tied", "gpt2"))
    assert info["edited_parameters"] == residual_writers(lm)


def test_writers_per_family():
    assert residual_writers(_lm("llama")) == [
        "model.embed_tokens",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.2.mlp.down_proj",
    ]
    gpt2 = residual_writers(_lm("gpt2"))
    assert gpt2[:4] == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
    ]
    neox = residual_writers(_lm("neox"))
    assert neox[:3] == [
        "gpt_neox.embed_in",
        "gpt_neox.layers.0.attention.dense",
        "gpt_neox.layers.0.mlp.dense_4h_to_h",
    ]


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2"])
def test_in_place_and_copy_match_runtime(kind):
    lm = _lm(kind)
    ids, mask = _batch(lm)
    d = _direction(lm.d_model, seed=7)
    expected = _runtime(lm, d, ids, mask)
    unembed = lm.unembed.detach().clone()
    copied = orthogonalized_copy(lm, d)
    orthogonalize_weights(lm, d)  # in place, on the model itself
    real = mask.bool()
    with torch.no_grad():
        for model in (lm, copied):
            torch.testing.assert_close(model.forward(ids, mask)[real], expected[real], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(model.unembed, unembed, atol=0, rtol=0)
    assert lm.model.config.tie_word_embeddings is False


def test_copy_made_inside_steer_carries_no_hooks():
    lm = _lm("llama")
    ids, mask = _batch(lm)
    d = _direction(32)
    with torch.no_grad():
        expected = orthogonalized_copy(lm, d).forward(ids, mask)
        with steer(lm, [AddVector("blocks.0.hook_resid_post", vector=torch.ones(32), alpha=5.0)]):
            inside = orthogonalized_copy(lm, d)
        torch.testing.assert_close(inside.forward(ids, mask), expected, atol=0, rtol=0)


def test_orthogonalizing_twice_changes_nothing_more():
    lm = _lm("llama")
    d = _direction(lm.d_model)
    once = orthogonalized_copy(lm, d)
    twice = orthogonalized_copy(once, d)
    for (name, a), (_, b) in zip(once.model.named_parameters(), twice.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_bad_directions_are_clear_errors(tmp_path):
    lm = _lm("llama")
    with pytest.raises(DimensionMismatchError, match="d_model 32"):
        write_orthogonalized(lm, torch.ones(31), tmp_path / "a")
    with pytest.raises(SaelabError, match="zero vector"):
        orthogonalize_weights(lm, torch.zeros(32))
    with pytest.raises(SaelabError, match="NaN"):
        orthogonalized_copy(lm, torch.full((32,), float("nan")))
    assert not (tmp_path / "a").exists()


def test_quantized_weights_are_refused_and_left_intact():
    lm = _lm("llama")
    o_proj = lm.model.model.layers[1].self_attn.o_proj
    o_proj.weight = torch.nn.Parameter(torch.ones(32, 32, dtype=torch.int8), requires_grad=False)
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(OrthogonalizationError, match="quantized.*load_model"):
        orthogonalize_weights(lm, _direction(32))
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), name  # checks run before the first edit


def test_gguf_dequantized_config_is_handled(tmp_path):
    # A GGUF load leaves a quantization_config on float (dequantized) weights; save_pretrained would refuse it.
    lm = _lm("llama_tied")
    lm.model.config.quantization_config = {"quant_method": "gguf"}
    ids, mask = _batch(lm)
    d = _direction(32)
    expected = _runtime(lm, d, ids, mask)
    folder = write_orthogonalized(lm, d, tmp_path / "orth")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    new = load_model(folder, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = new.forward(ids, mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


def test_sandwich_norm_models_are_refused():
    lm = HookedLM(make_model("gemma2"), make_tokenizer())
    with pytest.raises(OrthogonalizationError, match="sandwich norms.*runtime ablation"):
        orthogonalized_copy(lm, _direction(32))


def test_folder_rules(tmp_path):
    lm = _lm("llama")
    d = _direction(32)
    target = tmp_path / "orth"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(OrthogonalizationError, match="overwrite=True"):
        write_orthogonalized(lm, d, target)
    assert (target / "keep.txt").is_file()
    write_orthogonalized(lm, d, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / SIDECAR).is_file()
    with pytest.raises(OrthogonalizationError, match="JSON"):
        write_orthogonalized(lm, d, tmp_path / "bad", provenance={"vector": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orth"]  # no half-written or temp folder
    no_tok = HookedLM(copy.deepcopy(lm.model), None)
    with pytest.raises(OrthogonalizationError, match="tokenizer"):
        write_orthogonalized(no_tok, d, tmp_path / "x")


@pytest.mark.integration
def test_embedded_model_matches_runtime_ablation(tmp_path):
    start = time.time()
    lm = load_model(None, device="cpu", dtype=torch.float32)
    ids, mask = encode_left_padded(
        lm.tokenizer, ["The ocean is deep and", "My favourite recipe for soup is"], lm.device
    )
    d = _direction(lm.d_model, seed=3)
    expected = _runtime(lm, d, ids, mask)
    folder = write_orthogonalized(lm, d, tmp_path / "smollm2-orth", provenance={"method": "random"})
    new = load_model(folder, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        got = new.forward(ids, mask)
        clean = lm.forward(ids, mask)
    real = mask.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    assert diff < 1e-3 * expected[real].abs().max().item(), diff
    assert (got[real] - clean[real]).abs().max() > 10 * diff
    torch.testing.assert_close(new.unembed, lm.unembed, atol=0, rtol=0)
    assert time.time() - start < 60
