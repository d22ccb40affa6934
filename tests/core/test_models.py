"""Hook points of saelab.core.models checked against Hugging Face's own hidden states on tiny random models."""

import json
import time

import pytest
import torch

from saelab.core.adapters import ADAPTERS
from saelab.core.models import SUFFIXES, HookedLM, _write_cache, load_model, special_token_ids
from saelab.errors import ModelNotFoundError, OrthogonalizationError, UnknownHookError
from tests.helpers import VOCAB, make_model

# Test kinds: the adapters' families, with both GPT-NeoX residual layouts.
_FACTORY = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "neox": ("gpt_neox", {"use_parallel_residual": False}),
    "neox_parallel": ("gpt_neox", {"use_parallel_residual": True}),
    "gemma": ("gemma", {}),  # Llama-like blocks; RMSNorm gains stored as an offset from 1
    "gemma2": ("gemma2", {}),  # sandwich norms: attn_out/mlp_out are the post-norm outputs
    "olmo2": ("olmo2", {}),  # post-norms only: the MLP reads the residual directly
}


def _tiny(kind: str) -> torch.nn.Module:
    family, overrides = _FACTORY[kind]
    model = make_model(family, n_layers=3, **overrides)
    # Random norms make the checks sharper than all-ones weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


KINDS = ["llama", "gpt2", "neox", "neox_parallel", "gemma", "gemma2", "olmo2"]


@pytest.fixture(params=KINDS)
def lm(request) -> HookedLM:
    return HookedLM(_tiny(request.param), None, name=request.param)


@pytest.fixture
def llama() -> HookedLM:
    return HookedLM(_tiny("llama"), None, name="tiny-llama")


def _ids(batch=2, seq=7):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def _ln2(lm: HookedLM, i: int):
    layer = lm.blocks[i].block
    if lm.family == "gpt2":
        return layer.ln_2
    if hasattr(layer, "post_feedforward_layernorm"):  # sandwich (Gemma 2) or post-norm (OLMo 2) blocks
        return getattr(layer, "pre_feedforward_layernorm", None)
    return layer.post_attention_layernorm


def _count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_capture_matches_hidden_states(lm):
    ids = _ids()
    with torch.no_grad():
        ref = lm.model(ids, output_hidden_states=True, use_cache=False).hidden_states
    got = lm.capture(ids, lm.hook_names(), stop_early=False)
    parallel = lm.blocks[0].parallel
    assert lm.family in ("llama", "gpt2", "gpt_neox") and lm.n_layers == 3 and lm.d_model == 32
    for i in range(lm.n_layers):
        g = {s: got[f"blocks.{i}.{s}"] for s in lm.hook_suffixes(i)}
        assert all(v.shape == (2, 7, 32) and not v.requires_grad for v in g.values())
        _close(g["hook_resid_pre"], ref[i])
        if i < lm.n_layers - 1:
            _close(g["hook_resid_post"], ref[i + 1])
        else:  # HF applies the final norm to the last hidden state
            _close(lm.final_norm(g["hook_resid_post"]), ref[i + 1])
        if parallel:
            assert "hook_resid_mid" not in g
            _close(g["hook_mlp_in"], g["hook_resid_pre"])
            _close(g["hook_resid_post"], g["hook_resid_pre"] + g["hook_attn_out"] + g["hook_mlp_out"])
        else:
            _close(g["hook_resid_mid"], g["hook_resid_pre"] + g["hook_attn_out"])
            _close(g["hook_mlp_in"], g["hook_resid_mid"])
            _close(g["hook_resid_post"], g["hook_resid_mid"] + g["hook_mlp_out"])
        ln2 = _ln2(lm, i)
        expected = ln2(g["hook_mlp_in"]) if ln2 is not None else g["hook_mlp_in"]
        _close(g["ln2.hook_normalized"], expected)
        assert not torch.allclose(g["hook_attn_out"], torch.zeros_like(g["hook_attn_out"]))


def test_hook_names_and_dims(lm):
    names = lm.hook_names()
    per_block = 6 if lm.blocks[0].parallel else 7
    assert len(names) == 3 * per_block and len(set(names)) == len(names)
    assert lm.layer_of("blocks.2.hook_resid_post") == 2
    assert lm.hook_dim("blocks.1.ln2.hook_normalized") == 32
    assert lm.unembed.shape == (VOCAB, 32)


def test_early_exit_skips_later_layers(llama):
    ids = _ids()
    full = llama.capture(ids, ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"], stop_early=False)
    calls = []
    layers = llama.model.model.layers
    before = _count_hooks(llama.model)
    handles = [
        layers[1].register_forward_pre_hook(lambda *a: calls.append("layer1")),
        llama.final_norm.register_forward_hook(lambda *a: calls.append("norm")),
        llama.model.lm_head.register_forward_hook(lambda *a: calls.append("unembed")),
    ]
    try:
        got = llama.capture(ids, ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"])
        assert calls == []
        # Stopping at resid_pre of block 1 must not run block 1 itself.
        llama.capture(ids, "blocks.1.hook_resid_pre")
        assert calls == ["layer1"]
        llama.capture(ids, "blocks.1.hook_resid_pre", stop_early=False)
        assert calls == ["layer1", "layer1", "norm", "unembed"]
    finally:
        for h in handles:
            h.remove()
    assert _count_hooks(llama.model) == before
    assert list(got) == ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_post"]
    for k in got:
        assert torch.equal(got[k], full[k])


def test_early_exit_when_later_layer_raises(llama):
    def boom(*_):
        raise AssertionError("layer 2 ran")

    handle = llama.model.model.layers[2].register_forward_pre_hook(boom)
    try:
        out = llama.capture(_ids(), ["blocks.1.hook_resid_mid", "blocks.0.hook_attn_out"])
    finally:
        handle.remove()
    assert set(out) == {"blocks.1.hook_resid_mid", "blocks.0.hook_attn_out"}


def test_capture_with_attention_mask_and_1d_input(llama):
    ids = _ids(1, 5)
    a = llama.capture(ids[0], ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    b = llama.capture(ids, ["blocks.1.hook_resid_post"], attention_mask=torch.ones_like(ids))
    assert a.shape == (1, 5, 32)
    _close(a, b["blocks.1.hook_resid_post"])


def test_identity_patch_is_bit_exact(lm):
    ids = _ids()
    with torch.no_grad():
        clean = lm.forward(ids)
        before = _count_hooks(lm.model)
        patches = {name: (lambda v: v) for name in lm.hook_names()}
        patches["blocks.0.hook_resid_post"] = lambda v: None  # None keeps the value
        with lm.patch(patches):
            assert _count_hooks(lm.model) > before
            patched = lm.forward(ids)
    assert torch.equal(clean, patched)
    assert _count_hooks(lm.model) == before


def test_zero_attn_out_changes_logits(lm):
    ids = _ids()
    with torch.no_grad():
        clean = lm.forward(ids)
        with lm.patch({"blocks.1.hook_attn_out": torch.zeros_like}):
            got = lm.capture(
                ids, ["blocks.1.hook_attn_out", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_in"]
            )
            patched = lm.forward(ids)
    assert not torch.allclose(clean, patched)
    assert torch.count_nonzero(got["blocks.1.hook_attn_out"]) == 0
    if not lm.blocks[1].parallel:  # the MLP now reads resid_pre + 0
        _close(got["blocks.1.hook_mlp_in"], got["blocks.1.hook_resid_pre"])


def test_resid_mid_patch_adds_to_residual_and_mlp_input(lm):
    if lm.blocks[0].parallel:
        with pytest.raises(UnknownHookError, match="no resid_mid"):
            lm.layer_of("blocks.1.hook_resid_mid")
        return
    ids = _ids()
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    names = [
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_mlp_in",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
    clean = lm.capture(ids, names)
    with lm.add("blocks.1.hook_resid_mid", v):
        hot = lm.capture(ids, names)
    _close(hot["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"] + v)
    _close(hot["blocks.1.hook_mlp_in"], clean["blocks.1.hook_mlp_in"] + v)  # the MLP sees it
    mlp_change = hot["blocks.1.hook_mlp_out"] - clean["blocks.1.hook_mlp_out"]
    assert mlp_change.abs().max() > 1e-4
    _close(hot["blocks.1.hook_resid_post"] - clean["blocks.1.hook_resid_post"], v + mlp_change)


def test_mlp_input_patches_leave_residual_alone(lm):
    ids = _ids()
    names = [
        "blocks.1.hook_mlp_in",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_resid_pre",
    ]
    clean = lm.capture(ids, names)
    for point in ("blocks.1.hook_mlp_in", "blocks.1.ln2.hook_normalized"):
        with lm.patch({point: torch.zeros_like}):
            hot = lm.capture(ids, names + ["blocks.1.ln2.hook_normalized"])
        assert torch.count_nonzero(hot[point]) == 0
        assert not torch.allclose(hot["blocks.1.hook_mlp_out"], clean["blocks.1.hook_mlp_out"])
        rest = clean["blocks.1.hook_resid_post"] - clean["blocks.1.hook_mlp_out"]
        _close(hot["blocks.1.hook_resid_post"], rest + hot["blocks.1.hook_mlp_out"])


def test_resid_pre_post_and_nested_patches(llama):
    ids = _ids()
    v, w = torch.randn(32), torch.randn(32)
    clean = llama.capture(
        ids, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    )
    with llama.add("blocks.0.hook_resid_post", v), llama.add("blocks.0.hook_resid_post", w):
        hot = llama.capture(ids, ["blocks.1.hook_resid_pre"])
    _close(hot["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"] + v + w)
    with llama.patch({"blocks.2.hook_resid_pre": lambda x: x * 0 + 1}):
        hot = llama.capture(ids, ["blocks.2.hook_resid_pre", "blocks.1.hook_resid_post"])
    assert torch.equal(hot["blocks.2.hook_resid_pre"], torch.ones(2, 7, 32))
    _close(hot["blocks.1.hook_resid_post"], clean["blocks.2.hook_resid_pre"])  # patch acts on the input only


def test_patch_hooks_removed_on_exception(llama):
    before = _count_hooks(llama.model)
    with pytest.raises(RuntimeError, match="inside"):
        with llama.patch(
            {"blocks.0.hook_resid_mid": lambda v: v + 1, "blocks.1.hook_attn_out": torch.zeros_like}
        ):
            raise RuntimeError("inside")
    assert _count_hooks(llama.model) == before
    with pytest.raises(ValueError, match="shape"):
        with llama.patch({"blocks.0.hook_mlp_out": lambda v: v[:, :1]}):
            llama.forward(_ids())
    assert _count_hooks(llama.model) == before


def test_patch_gradients_flow(llama):
    """forward() keeps autograd on so attribution can differentiate through a patch."""
    delta = torch.zeros(32, requires_grad=True)
    with llama.add("blocks.1.hook_resid_post", delta):
        llama.forward(_ids()).logsumexp(-1).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_unknown_hook_errors(llama):
    with pytest.raises(UnknownHookError) as err:
        llama.capture(_ids(), ["blocks.40.hook_resid_post"])
    msg = str(err.value)
    assert "blocks.40.hook_resid_post" in msg and "3 blocks (0-2)" in msg
    assert "blocks.{0-2}.hook_resid_pre|hook_attn_out|hook_resid_mid" in msg
    assert "'blocks.2.hook_resid_post'" in msg
    with pytest.raises(UnknownHookError, match="Did you mean 'blocks.1.hook_resid_post'"):
        llama.layer_of("blocks.1.hook_resid_pots")
    with pytest.raises(UnknownHookError, match="Valid hook points"):
        llama.hook_dim("resid_post")
    assert _count_hooks(llama.model) == 0


def test_hook_names_order():
    lm = HookedLM(_tiny("gpt2"))
    assert lm.hook_names()[: len(SUFFIXES)] == [f"blocks.0.{s}" for s in SUFFIXES]
    assert lm.family == "gpt2" and "gpt2" in repr(lm)


# -- adapters: one per model family ------------------------------------------------------------
# The adapter each tiny model must get. A new adapter needs a tiny model in `_tiny` and a row here.
ADAPTER_OF = {
    "llama": "llama",
    "olmo2": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gpt2": "gpt2",
    "neox": "gpt_neox",
    "neox_parallel": "gpt_neox",
}


def test_every_adapter_is_checked_on_a_tiny_model():
    assert set(ADAPTER_OF) == set(KINDS)
    assert {adapter.name for adapter in ADAPTERS} == set(ADAPTER_OF.values())


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_declares_final_norm_gain_and_residual_writers(kind):
    """Hook points are checked by test_capture_matches_hidden_states; here the gain and the writers."""
    lm = HookedLM(_tiny(kind), None, name=kind)
    assert lm.adapter.name == ADAPTER_OF[kind] and lm.family == lm.adapter.family
    # The gain is what the final norm multiplies a zero-mean, unit-rms vector by (Gemma: 1 + weight).
    x = torch.tensor([1.0, -1.0] * 16)
    with torch.no_grad():
        applied = (lm.final_norm(x) - lm.final_norm(-x)) / (2 * x)
    _close(lm.final_norm_gain(), applied)
    if any(block.normed_outputs for block in lm.blocks):
        with pytest.raises(OrthogonalizationError, match="sandwich norms"):
            lm.residual_writers()
        return
    # The residual stream is the sum of the writers' outputs: with them zeroed, it is zero everywhere.
    writers = lm.residual_writers()
    assert len(writers) == 1 + len(lm.adapter.position_embeddings(lm.model)) + 2 * lm.n_layers
    with torch.no_grad():
        for module in writers:
            module.weight.zero_()
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    hooks = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(lm.n_layers)]
    acts = lm.capture(_ids(), hooks, stop_early=False)
    assert all(torch.count_nonzero(acts[h]) == 0 for h in hooks)


def test_unsupported_model_class_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="unsupported model class Linear.*Llama-like"):
        HookedLM(torch.nn.Linear(2, 2), None, name="linear")


# -- loading -------------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_load_model_local_folder(tmp_path):
    model = _tiny("llama")
    model.save_pretrained(tmp_path / "m")
    _tiny_tokenizer().save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu", dtype=torch.float32)
    assert lm.family == "llama" and lm.n_layers == 3 and lm.name == str(tmp_path / "m") and lm.hf_id is None
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.config.use_cache is False
    assert lm.tokenizer.pad_token == "<eos>"
    assert special_token_ids(lm.tokenizer) >= {0, 1}
    ids = lm.tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5]]
    with torch.no_grad():
        _close(lm.forward(ids), model(ids).logits)
    half = load_model(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    from saelab.core.devices import resolve_dtype

    auto = load_model(tmp_path / "m")  # the Python API's defaults: device and dtype "auto"
    assert auto.model.dtype == resolve_dtype("auto", "cpu") and auto.device.type == "cpu"


def test_load_model_bad_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        load_model("./missing-model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load_model(str(tmp_path / "w.bin"))


def test_load_model_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    start = time.time()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("saelab-test-org/no-such-model-xyz")
    msg = str(err.value)
    assert "saelab-test-org/no-such-model-xyz" in msg and "hub id" in msg and ".gguf" in msg
    assert time.time() - start < 10


def test_write_cache_is_atomic(tmp_path, monkeypatch):
    model, tok = _tiny("llama"), _tiny_tokenizer()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    target = tmp_path / "cache" / "tiny"

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        _write_cache(model, tok, target, {"gguf": "x"})
    assert list((tmp_path / "cache").iterdir()) == []  # no half cache, no temp folder
    monkeypatch.undo()
    plain = _write_cache(model, tok, target, {"gguf": "x"})
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert json.loads((target / "saelab_source.json").read_text()) == {"gguf": "x"}
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["tiny"]
    lm = load_model(str(target), device="cpu", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        _close(lm.forward(ids), plain(ids).logits)


@pytest.mark.integration
def test_embedded_model():
    from saelab.core.models import EMBEDDED_HF_ID, _embedded_cache, embedded_gguf_path

    assert embedded_gguf_path().is_file()
    lm = load_model(device="cpu", dtype=torch.float32)
    assert (lm.name, lm.hf_id, lm.family) == ("SmolLM2-135M-Instruct", EMBEDDED_HF_ID, "llama")
    assert lm.n_layers == 30 and lm.d_model == 576
    assert (_embedded_cache() / "model.safetensors").is_file()
    text = "The quick brown fox jumps over the lazy dog because it wanted to see the other side of the river."
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    acts = lm.capture(ids, ["blocks.15.hook_resid_post"])["blocks.15.hook_resid_post"][0]
    assert acts.shape == (ids.shape[1], 576) and torch.isfinite(acts).all()
    norms = acts.norm(dim=-1)
    assert norms[0] > 5 * norms[1:].median()  # attention sink at position 0
    start = time.time()
    again = load_model("smollm2", device="cpu", dtype=torch.float32)
    assert time.time() - start < 10  # from the safetensors cache, not the GGUF
    torch.testing.assert_close(
        again.capture(ids, ["blocks.15.hook_resid_post"])["blocks.15.hook_resid_post"][0], acts
    )


def test_hooks_handle_kwargs_and_tuples():
    """Transformers may pass hidden_states by keyword and return tuples; hooks must see the tensor."""
    from saelab.core.models import _hook

    class Layer(torch.nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return hidden_states * scale, "extra"

    layer, seen = Layer(), []
    handles = [
        _hook(layer, "pre", lambda v: v + 1),
        _hook(layer, "out", lambda v: seen.append(v) or v * 10),
    ]
    try:
        out, extra = layer(hidden_states=torch.ones(2), scale=3.0)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(seen[0], torch.full((2,), 6.0)) and torch.equal(out, torch.full((2,), 60.0))
    assert extra == "extra" and _count_hooks(layer) == 0
