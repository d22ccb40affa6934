"""Dictionary files: saelab round trips, SAELens interop both ways, sparsify and dictionary_learning
imports, and a clear DictionaryFileError (never a raw traceback, never an unpickle) for bad files."""

from __future__ import annotations

import json
import math
import os
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from saelab.dictionaries import FAMILIES as REGISTERED
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.io import dictionary_metadata, load_dictionary, saelens_architecture, save_dictionary
from saelab.dictionaries.registry import saelens_families
from saelab.errors import DictionaryFileError

D_IN, D_SAE, K = 16, 64, 8
FAMILIES = ["relu", "gated", "topk", "batchtopk", "jumprelu"]  # the five whose SAELens names are pinned
SAELENS_ARCH = {"relu": "standard", "gated": "gated", "topk": "topk", "batchtopk": "jumprelu"}


def make(arch: str, transcoder: bool = False, s_in: float = 2.5, s_out: float | None = None):
    """A dictionary with random (non-trivial) weights, biases, thresholds and training scales."""
    cfg = DictionaryConfig(
        architecture=arch,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        hook_name="blocks.2.ln2.hook_normalized" if transcoder else "blocks.2.hook_resid_post",
        output_hook_name="blocks.2.hook_mlp_out" if transcoder else None,
        metadata={"model_name": "tiny-model", "context_size": 64, "dataset_path": "stdlib-docs"},
    )
    d = build_dictionary(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else D_IN**-0.5))
        if arch == "jumprelu":
            d.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.05, 1.0, generator=g).log())
        if arch == "batchtopk":
            d.threshold.fill_(0.6)
        # An autoencoder normalizes input and target by the same factor; a transcoder's differ.
        d.input_scale.fill_(s_in)
        d.output_scale.fill_(s_out if s_out is not None else (0.7 if transcoder else s_in))
    return d


def inputs(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 3


def assert_same(a, b, x):
    """Same latents and outputs up to float32 rounding (folding the scales reorders products)."""
    fa, ya = a.encode(x), a(x)
    assert (fa > 0).sum() > 0
    torch.testing.assert_close(b.encode(x), fa, atol=1e-5 * fa.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(b(x), ya, atol=1e-5 * ya.abs().max().item(), rtol=1e-5)


# ---- saelab round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
@pytest.mark.parametrize(
    "arch", [name for name, fam in REGISTERED.items() if not fam.cross_layer]
)  # clt: test_clt.py
def test_round_trip_every_family(tmp_path, arch, transcoder):
    d = make(arch, transcoder)
    x = inputs()
    folder = save_dictionary(d, tmp_path / "dict")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = load_dictionary(folder)
    assert type(loaded) is type(d)
    assert loaded.cfg.architecture == arch and loaded.cfg.output_hook_name == d.cfg.output_hook_name
    assert loaded.input_scale.item() == 1.0 and loaded.output_scale.item() == 1.0
    assert d.input_scale.item() == 2.5  # the caller's dictionary is not folded
    assert_same(d, loaded, x)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"
    assert cfg["saelab"]["config"]["architecture"] == arch


def test_saved_cfg_layout(tmp_path):
    d = make("topk")
    folder = save_dictionary(
        d, tmp_path / "d", sparsity=torch.full((D_SAE,), -2.0), training_config={"lr": 1e-3}
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D_IN, D_SAE, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["reshape_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["model_name"] == "tiny-model" and meta["hook_name"] == "blocks.2.hook_resid_post"
    assert meta["context_size"] == 64 and meta["dataset_path"] == "stdlib-docs"
    assert meta["prepend_bos"] is True and meta["sae_lens_version"].startswith("6.")
    assert set(load_file(folder / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert load_file(folder / "sparsity.safetensors")["sparsity"].shape == (D_SAE,)
    info = dictionary_metadata(folder)
    assert info["format"] == "saelens" and info["architecture"] == "topk" and info["has_sparsity"]
    assert info["training_config"] == {"lr": 1e-3} and info["k"] == K

    tc = json.loads((save_dictionary(make("relu", True), tmp_path / "tc") / "cfg.json").read_text())
    assert tc["architecture"] == "transcoder" and tc["d_out"] == D_IN and tc["apply_b_dec_to_input"] is False
    assert tc["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    bt = json.loads((save_dictionary(make("batchtopk"), tmp_path / "bt") / "cfg.json").read_text())
    assert bt["architecture"] == "jumprelu"
    assert "threshold" in load_file(tmp_path / "bt" / "sae_weights.safetensors")


def test_saelens_names_of_every_family_both_ways():
    """What each family is saved as (plain and transcoder), and which family each SAELens name loads as."""
    saved = {arch: tuple(saelens_architecture(make(arch, t).cfg) for t in (False, True)) for arch in FAMILIES}
    assert saved == {
        "relu": ("standard", "transcoder"),
        "gated": ("gated", "gated"),
        "topk": ("topk", "topk"),
        "batchtopk": ("jumprelu", "jumprelu_transcoder"),
        "jumprelu": ("jumprelu", "jumprelu_transcoder"),
    }
    loads = {name: fam.name for name, fam in saelens_families().items()}
    assert loads == {
        "standard": "relu",
        "transcoder": "relu",
        "gated": "gated",
        "topk": "topk",
        "jumprelu": "jumprelu",
        "jumprelu_transcoder": "jumprelu",
    }


def test_a_saelab_config_of_an_unknown_family_is_a_file_error(tmp_path):
    folder = save_dictionary(make("relu"), tmp_path / "d")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["saelab"]["config"]["architecture"] = "nope"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFileError, match="invalid saelab config.*'nope'"):
        load_dictionary(folder)


def test_save_is_atomic_and_guards_other_files(tmp_path, monkeypatch):
    import saelab.dictionaries.io as io

    d = make("relu")
    folder = save_dictionary(d, tmp_path / "d")
    before = (folder / "sae_weights.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "saelens_config", boom)
    with pytest.raises(RuntimeError):
        save_dictionary(make("topk"), folder)
    with pytest.raises(RuntimeError):
        save_dictionary(d, tmp_path / "new")
    assert (folder / "sae_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders, no half-written "new"

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(DictionaryFileError, match="other files"):
        save_dictionary(d, tmp_path / "run")


# ---- real SAELens interop ----------------------------------------------------------------------
def _saelens():
    return pytest.importorskip("sae_lens")


def _compare_with_saelens(sae, d, x, atol=1e-5):
    with torch.no_grad():
        f_ref = sae.encode(x)
        assert (f_ref > 0).sum() > 0
        torch.testing.assert_close(d.encode(x), f_ref, atol=atol, rtol=1e-5)
        torch.testing.assert_close(d.decode(f_ref), sae.decode(f_ref), atol=atol, rtol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("arch", FAMILIES)
def test_saelens_loads_saelab_folder(tmp_path, arch):
    sae_lens = _saelens()
    d = make(arch)
    folder = save_dictionary(d, tmp_path / "d", sparsity=torch.full((D_SAE,), -3.0))
    sae = sae_lens.SAE.load_from_disk(folder)
    assert sae.cfg.architecture() == SAELENS_ARCH.get(arch, arch)
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert sae.cfg.metadata.model_name == "tiny-model"
    _compare_with_saelens(sae, d, inputs())


@pytest.mark.interop
@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk", "gated"])
def test_saelens_loads_saelab_transcoder(tmp_path, arch):
    sae_lens = _saelens()
    d = make(arch, transcoder=True)
    sae = sae_lens.SAE.load_from_disk(save_dictionary(d, tmp_path / "tc"))
    assert sae.cfg.metadata.hook_name_out == "blocks.2.hook_mlp_out"
    _compare_with_saelens(sae, d, inputs())


def _randomize_saelens(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.empty(p.shape).uniform_(0.05, 1.0, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1.0))
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.cfg.metadata.model_name = "tiny-model"
    return sae


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["standard", "gated", "topk", "topk_rescaled", "jumprelu"])
def test_saelab_loads_saelens_folder(tmp_path, kind):
    saes = _saelens().saes
    cfg = dict(d_in=D_IN, d_sae=D_SAE)
    sae = {
        "standard": lambda: saes.StandardSAE(saes.StandardSAEConfig(**cfg)),
        "gated": lambda: saes.GatedSAE(saes.GatedSAEConfig(**cfg)),
        "topk": lambda: saes.TopKSAE(saes.TopKSAEConfig(k=K, **cfg)),
        "topk_rescaled": lambda: saes.TopKSAE(
            saes.TopKSAEConfig(k=K, rescale_acts_by_decoder_norm=True, **cfg)
        ),
        "jumprelu": lambda: saes.JumpReLUSAE(saes.JumpReLUSAEConfig(**cfg)),
    }[kind]()
    _randomize_saelens(sae).save_model(tmp_path / "s")
    d = load_dictionary(tmp_path / "s")
    assert d.cfg.hook_name == "blocks.0.hook_resid_post" and d.cfg.metadata["model_name"] == "tiny-model"
    _compare_with_saelens(sae, d, inputs())
    # and back again: saelab's re-save still loads in SAELens with the same outputs
    again = _saelens().SAE.load_from_disk(save_dictionary(d, tmp_path / "again"))
    _compare_with_saelens(again, d, inputs())


@pytest.mark.interop
def test_saelab_loads_saelens_batchtopk_and_transcoders(tmp_path):
    saes = _saelens().saes
    bt = saes.BatchTopKTrainingSAE(saes.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    _randomize_saelens(bt)
    with torch.no_grad():
        bt.topk_threshold.fill_(0.5)
    bt.save_inference_model(tmp_path / "bt")
    inference = _saelens().SAE.load_from_disk(tmp_path / "bt")
    _compare_with_saelens(inference, load_dictionary(tmp_path / "bt"), inputs())

    for name, cls, config in [
        ("tc", saes.Transcoder, saes.TranscoderConfig),
        ("jtc", saes.JumpReLUTranscoder, saes.JumpReLUTranscoderConfig),
    ]:
        sae = _randomize_saelens(cls(config(d_in=D_IN, d_sae=D_SAE, d_out=8, apply_b_dec_to_input=False)))
        sae.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
        sae.save_model(tmp_path / name)
        d = load_dictionary(tmp_path / name)
        assert d.cfg.out_dim == 8 and d.cfg.output_hook_name == "blocks.0.hook_mlp_out"
        _compare_with_saelens(sae, d, inputs())
        again = _saelens().SAE.load_from_disk(save_dictionary(d, tmp_path / f"{name}_again"))
        _compare_with_saelens(again, d, inputs())

    skip = saes.SkipTranscoder(
        saes.SkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False)
    )
    skip.save_model(tmp_path / "skip")
    with pytest.raises(DictionaryFileError, match="W_skip"):
        load_dictionary(tmp_path / "skip")


# ---- sparsify ----------------------------------------------------------------------------------
def sparsify_folder(root, hook="layers.3", transcode=False, with_d_in=True, skip=False):
    g = torch.Generator().manual_seed(2)
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.3,
        "W_dec": F.normalize(torch.randn(D_SAE, D_IN, generator=g), dim=1),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if skip:
        t["W_skip"] = torch.randn(D_IN, D_IN, generator=g)
    cfg = {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": K,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
    }
    if with_d_in:
        cfg["d_in"] = D_IN
    (root / hook).mkdir(parents=True)
    save_file(t, root / hook / "sae.safetensors")
    (root / hook / "cfg.json").write_text(json.dumps(cfg))
    return t


def sparsify_reference(t, x, transcode=False):
    """sparsify's forward: ReLU(encoder(x - b_dec)), keep the top k, decode with W_dec + b_dec."""
    pre = F.relu(F.linear(x if transcode else x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    values, indices = pre.topk(K, dim=-1)
    dense = torch.zeros_like(pre).scatter_(-1, indices, values)
    return dense, dense @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_import(tmp_path, transcode):
    t = sparsify_folder(tmp_path / "run", transcode=transcode, with_d_in=not transcode)
    x = inputs()
    for path in (tmp_path / "run", tmp_path / "run" / "layers.3" / "sae.safetensors"):
        d = load_dictionary(path)
        f, y = sparsify_reference(t, x, transcode)
        torch.testing.assert_close(d.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), y, atol=1e-5, rtol=1e-5)
    assert d.cfg.architecture == "topk" and d.cfg.k == K and d.cfg.apply_b_dec_to_input is (not transcode)
    if not transcode:
        assert d.cfg.hook_name == "blocks.3.hook_resid_post"
    assert dictionary_metadata(tmp_path / "run")["format"] == "sparsify"


def test_sparsify_errors(tmp_path):
    sparsify_folder(tmp_path / "run", "layers.3")
    sparsify_folder(tmp_path / "run", "layers.7")
    with pytest.raises(DictionaryFileError, match="several dictionaries") as err:
        load_dictionary(tmp_path / "run")
    assert "layers.3" in str(err.value) and "layers.7" in str(err.value) and "Pick one" in str(err.value)
    sparsify_folder(tmp_path / "skip", skip=True)
    with pytest.raises(DictionaryFileError, match="W_skip"):
        load_dictionary(tmp_path / "skip")


# ---- dictionary_learning -----------------------------------------------------------------------
def dl_folder(root, dict_class, state, k=None):
    root.mkdir(parents=True)
    torch.save(state, root / "ae.pt")
    trainer = {
        "trainer_class": "X",
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "layer": 3,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "submodule_name": "resid_post_layer_3",
    }
    if k is not None:
        trainer["k"] = k
    (root / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return root


def _r(*shape, seed=[0]):  # noqa: B006 - a deterministic stream of test tensors
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def test_dictionary_learning_imports(tmp_path):
    x = inputs()
    enc, dec = _r(D_SAE, D_IN), _r(D_IN, D_SAE)  # nn.Linear layout: [out, in]
    bias, b_enc = _r(D_IN), _r(D_SAE) * 0.3

    def check(name, state, f_ref, y_ref, family, k=None):
        d = load_dictionary(dl_folder(tmp_path / name, name, state, k))
        assert d.cfg.architecture == family and d.cfg.hook_name == "blocks.3.hook_resid_post"
        assert d.cfg.metadata["model_name"] == "EleutherAI/pythia-70m-deduped"
        torch.testing.assert_close(d.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d(x), y_ref, atol=1e-5, rtol=1e-5)

    # AutoEncoder: relu(encoder(x - bias)); decoder(f) + bias
    f = F.relu((x - bias) @ enc.T + b_enc)
    state = {"bias": bias, "encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec}
    check("AutoEncoder", state, f, f @ dec.T + bias, "relu")

    # AutoEncoderTopK: relu(encoder(x - b_dec)), top k
    pre = F.relu((x - bias) @ enc.T + b_enc)
    values, indices = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, indices, values)
    state = {
        "encoder.weight": enc,
        "encoder.bias": b_enc,
        "decoder.weight": dec,
        "b_dec": bias,
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(-1.0),
    }
    check("AutoEncoderTopK", state, f, f @ dec.T + bias, "topk", k=K)

    # BatchTopKSAE at inference: relu'd pre-activations above one learned threshold
    f = pre * (pre > 0.4)
    check("BatchTopKSAE", {**state, "threshold": torch.tensor(0.4)}, f, f @ dec.T + bias, "batchtopk", k=K)

    # JumpReluAutoEncoder: W_enc [d_in, d_sae]; b_dec is not subtracted from the input
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.05
    pre = x @ enc.T + b_enc
    f = F.relu(pre * (pre > threshold))
    state = {
        "W_enc": enc.T.clone(),
        "b_enc": b_enc,
        "W_dec": dec.T.clone(),
        "b_dec": bias,
        "threshold": threshold,
    }
    check("JumpReluAutoEncoder", state, f, f @ dec.T + bias, "jumprelu")

    # GatedAutoEncoder
    r_mag, gate_bias, mag_bias = _r(D_SAE) * 0.3, _r(D_SAE) * 0.3, _r(D_SAE) * 0.3
    x_enc = (x - bias) @ enc.T
    f = (x_enc + gate_bias > 0).float() * F.relu(r_mag.exp() * x_enc + mag_bias)
    state = {
        "decoder_bias": bias,
        "encoder.weight": enc,
        "r_mag": r_mag,
        "gate_bias": gate_bias,
        "mag_bias": mag_bias,
        "decoder.weight": dec,
    }
    check("GatedAutoEncoder", state, f, f @ dec.T + bias, "gated")

    info = dictionary_metadata(tmp_path / "GatedAutoEncoder")
    assert info["format"] == "dictionary_learning" and info["metadata"]["context_size"] == 128


def test_dictionary_learning_errors(tmp_path):
    enc = _r(D_SAE, D_IN)
    state = {"bias": _r(D_IN), "encoder.weight": enc, "encoder.bias": _r(D_SAE), "decoder.weight": enc.T}
    dl_folder(tmp_path / "unknown", "MatryoshkaCrossCoder", state)
    with pytest.raises(DictionaryFileError, match="MatryoshkaCrossCoder"):
        load_dictionary(tmp_path / "unknown")
    dl_folder(tmp_path / "partial", "GatedAutoEncoder", state)
    with pytest.raises(DictionaryFileError, match="gate_bias"):
        load_dictionary(tmp_path / "partial")
    (tmp_path / "bare").mkdir()  # no config.json: the AutoEncoder is recognised by its tensors
    torch.save(state, tmp_path / "bare" / "ae.pt")
    assert load_dictionary(tmp_path / "bare").cfg.architecture == "relu"
    torch.save({**state, "k": torch.tensor(K)}, tmp_path / "bare" / "ae.pt")
    with pytest.raises(DictionaryFileError, match="without config.json"):
        load_dictionary(tmp_path / "bare")
    (tmp_path / "module").mkdir()
    torch.save(torch.nn.Linear(D_IN, D_SAE), tmp_path / "module" / "ae.pt")  # a whole pickled module
    with pytest.raises(DictionaryFileError, match="weights_only") as err:
        load_dictionary(tmp_path / "module")
    assert "torch.nn.modules.linear.Linear" in str(err.value)
    data = (tmp_path / "module" / "ae.pt").read_bytes()
    (tmp_path / "module" / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionary(tmp_path / "module")


class Evil:
    """Unpickling this would create a marker file: loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = str(tmp_path / "pwned")
    (tmp_path / "dl").mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": Evil(marker)}, tmp_path / "dl" / "ae.pt")
    with pytest.raises(DictionaryFileError, match="never unpickles") as err:
        load_dictionary(tmp_path / "dl")
    assert "io.open" in str(err.value)
    assert not os.path.exists(marker)

    folder = save_dictionary(make("relu"), tmp_path / "sl")
    with open(folder / "sae_weights.safetensors", "wb") as handle:
        pickle.dump({"W_enc": Evil(marker)}, handle, protocol=4)
    with pytest.raises(DictionaryFileError, match="pickle/torch file, not safetensors") as err:
        load_dictionary(folder)
    assert "never unpickles" in str(err.value) and "save_file" in str(err.value)
    assert not os.path.exists(marker)
    torch.save({"W_enc": torch.zeros(2)}, folder / "sae_weights.safetensors")  # zip-format torch file
    with pytest.raises(DictionaryFileError, match="pickle/torch file"):
        load_dictionary(folder)


# ---- errors ------------------------------------------------------------------------------------
def test_missing_and_unrecognized_folders(tmp_path):
    with pytest.raises(DictionaryFileError, match="does not exist"):
        load_dictionary(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(DictionaryFileError, match="no dictionary files") as err:
        load_dictionary(tmp_path / "junk")
    assert "notes.txt" in str(err.value) and "sae_weights.safetensors" in str(err.value)


def test_corrupt_safetensors(tmp_path):
    folder = save_dictionary(make("topk"), tmp_path / "d")
    weights = folder / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionary(folder)
    noise = random.Random(0).randbytes(4096)
    assert noise[0] != 0x80 and not noise.startswith(b"PK")
    weights.write_bytes(noise)
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionary(folder)
    weights.write_bytes(b"")
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionary(folder)


def test_bad_cfg_json(tmp_path):
    folder = save_dictionary(make("relu"), tmp_path / "d")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text('{"d_in": 16, "d_sae": ')
    with pytest.raises(DictionaryFileError, match="not valid JSON"):
        load_dictionary(folder)
    foreign = {key: value for key, value in cfg.items() if key not in ("saelab", "d_in")}
    (folder / "cfg.json").write_text(json.dumps(foreign))
    with pytest.raises(DictionaryFileError, match="d_in"):
        load_dictionary(folder)
    (folder / "cfg.json").write_text(json.dumps({**foreign, "d_in": D_IN, "d_sae": 32}))
    with pytest.raises(DictionaryFileError, match=r"shape .*d_sae=32"):
        load_dictionary(folder)
    cfg["saelab"]["config"]["d_in"] = 24
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DictionaryFileError, match=r"d_in=24"):
        load_dictionary(folder)
    (folder / "cfg.json").write_text(json.dumps({**foreign, "d_in": D_IN, "architecture": "abstopk"}))
    with pytest.raises(DictionaryFileError, match="abstopk"):
        load_dictionary(folder)


def test_loaded_dictionary_moves_to_device(tmp_path):
    d = load_dictionary(save_dictionary(make("jumprelu"), tmp_path / "d"), device="cpu")
    assert d.W_enc.device.type == "cpu" and math.isclose(d.input_scale.item(), 1.0)
