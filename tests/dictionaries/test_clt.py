"""Cross-layer transcoders (families clt and clt_batchtopk): shapes, the layer-by-layer and batched paths
agree, scales fold away, files round-trip in saelab's and circuit-tracer's layouts, training recovers a
planted CLT, and bad input gets a clear error."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.base import StepContext
from saelab.dictionaries.io import load_dictionary, save_dictionary
from saelab.dictionaries.transcoders import load_clt, load_transcoders, save_clt
from saelab.errors import DictionaryFileError, DictionarySetError, DimensionMismatchError
from tests.helpers import random_clt

IN, OUT = "blocks.{i}.ln2.hook_normalized", "blocks.{i}.hook_mlp_out"


def config(architecture="clt_batchtopk", n_layers=3, d=8, width=12, **extra):
    return DictionaryConfig(
        architecture=architecture, d_in=d, d_sae=width * n_layers, hook_name=IN, output_hook_name=OUT,
        layers=list(range(n_layers)), k=2, target_l0=2, **extra,
    )  # fmt: skip


def planted(n=4096, n_layers=3, d=8, width=12, seed=0):
    """Inputs and targets of a true sparse CLT: layer i's features write to layers i..L-1."""
    g = torch.Generator().manual_seed(seed)
    acts = (torch.rand(n, n_layers, width, generator=g) < 2 / width).float() * (
        1 + torch.rand(n, n_layers, width, generator=g)
    )
    enc = torch.randn(n_layers, width, d, generator=g)
    enc /= enc.norm(dim=-1, keepdim=True)
    x = torch.einsum("nlf,lfd->nld", acts, enc)
    y = torch.zeros(n, n_layers, d)
    for i in range(n_layers):
        y[:, i:] += torch.einsum("nf,fkd->nkd", acts[:, i], torch.randn(width, n_layers - i, d, generator=g))
    return x, y


def test_config_checks_layers_and_hooks():
    assert config().input_hooks == [IN.replace("{i}", str(i)) for i in range(3)]
    assert config().output_hooks[-1] == "blocks.2.hook_mlp_out"
    with pytest.raises(ValueError, match="give `layers`"):
        DictionaryConfig(architecture="clt", d_in=8, d_sae=24, hook_name=IN, output_hook_name=OUT)
    with pytest.raises(ValueError, match="with \\{i\\}"):
        DictionaryConfig(architecture="clt", d_in=8, d_sae=24, hook_name="blocks.0.x", layers=[0, 1])
    with pytest.raises(ValueError, match="multiple of 3"):
        DictionaryConfig(
            architecture="clt", d_in=8, d_sae=25, hook_name=IN, output_hook_name=OUT, layers=[0, 1, 2]
        )
    with pytest.raises(ValueError, match="one hook point"):
        DictionaryConfig(architecture="topk", d_in=8, d_sae=24, k=4, layers=[0, 1])


@pytest.mark.parametrize("architecture", ["clt", "clt_batchtopk"])
def test_shapes_and_the_layer_by_layer_path_agree(architecture):
    clt = random_clt(3, 8, 12, architecture=architecture)
    x = torch.randn(5, 3, 8)
    latents = clt.encode(x)
    assert latents.shape == (5, 36) and bool((latents > 0).any())
    out = clt.decode(latents)
    assert out.shape == (5, 3, 8)
    per_layer = {i: clt.layer_latents(i, x[:, i]) for i in range(3)}
    assert torch.allclose(torch.cat(list(per_layer.values()), -1), latents)
    writes = {i: clt.layer_writes(i, per_layer[i]) for i in range(3)}
    assert writes[0].shape == (5, 3, 8) and writes[2].shape == (5, 1, 8)
    for i in range(3):
        assert torch.allclose(clt.layer_output(i, writes), out[:, i], atol=1e-5)
    dense = torch.einsum("nf,fkd->nkd", per_layer[0], clt.W_dec[0]) / clt.output_scale[:, None]
    assert torch.allclose(writes[0], dense, atol=1e-5)  # the sparse decode is the dense product
    # Layer 0's features write to every layer, layer 2's only to layer 2.
    only = torch.zeros_like(latents)
    only[:, 24:] = latents[:, 24:]
    assert torch.allclose(clt.decode(only)[:, :2], clt.b_dec[:2].expand(5, -1, -1))
    with pytest.raises(DimensionMismatchError, match="reads 3 layers at once"):
        clt.encode(torch.randn(5, 8))


@pytest.mark.parametrize("architecture", ["clt", "clt_batchtopk"])
def test_training_steps_match_inference_and_scales_fold_away(architecture):
    x, y = planted()
    clt = build_dictionary(config(architecture))
    clt.init_from_data(x, y * 7.0)
    assert not torch.allclose(clt.output_scale, torch.ones(3))
    out = clt.training_loss(x[:256], y[:256] * 7.0, StepContext())
    out.loss.backward()
    assert all(p.grad is not None for p in (clt.W_enc, clt.b_enc, clt.W_dec[0], clt.W_dec[2]))
    assert out.fired.shape == (36,) and out.terms["l0_per_layer"] > 0
    clt.eval()
    if architecture == "clt":  # JumpReLU in training too: the training reconstruction is the model's
        with torch.no_grad():
            expected = clt.decode(clt.encode(x[:256])) * clt.output_scale[:, None]
            target = y[:256] * 7.0 * clt.output_scale[:, None]
        fvu = (expected - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()
        assert out.terms["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    folded = copy.deepcopy(clt)
    folded.fold_scales()
    assert torch.equal(folded.input_scale, torch.ones(3))
    with torch.no_grad():
        assert torch.allclose(folded.encode(x[:64]), clt.encode(x[:64]), atol=1e-5)
        assert torch.allclose(folded.decode(folded.encode(x[:64])), clt.decode(clt.encode(x[:64])), atol=1e-4)


@pytest.mark.parametrize("architecture", ["clt", "clt_batchtopk"])
def test_training_recovers_a_planted_clt(architecture):
    """On data made by a sparse CLT, a CLT of the same width reconstructs most of the variance."""
    x, y = planted()
    torch.manual_seed(0)
    clt = build_dictionary(config(architecture, l1_coefficient=0.003))
    clt.init_from_data(x, y)
    optimizer = torch.optim.Adam(clt.parameters(), lr=3e-3)
    first = None
    for step in range(400):
        rows = torch.randint(0, x.shape[0], (256,))
        out = clt.training_loss(x[rows], y[rows], StepContext(step=step, progress=step / 400))
        optimizer.zero_grad()
        out.loss.backward()
        clt.remove_parallel_decoder_grad()
        optimizer.step()
        clt.after_optimizer_step()
        first = first if first is not None else out.terms["fvu"]
    clt.eval()
    with torch.no_grad():
        error = clt.decode(clt.encode(x)) - y
    fvu = float(error.pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.5 * first and fvu < 0.6, (first, fvu)


def test_saelab_layout_round_trips(tmp_path):
    clt = random_clt(3, 8, 12)
    x = torch.randn(4, 3, 8)
    save_dictionary(clt, tmp_path / "clt")
    loaded = load_dictionary(tmp_path / "clt")
    assert loaded.cfg.layers == [0, 1, 2] and loaded.cfg.architecture == "clt"
    with torch.no_grad():
        assert torch.allclose(loaded.decode(loaded.encode(x)), clt.decode(clt.encode(x)), atol=1e-6)
    assert load_transcoders(tmp_path / "clt").cfg.d_sae == 36


@pytest.mark.parametrize("architecture", ["clt", "clt_batchtopk"])
def test_circuit_tracer_layout_round_trips(tmp_path, architecture):
    clt = random_clt(3, 8, 12, architecture=architecture)
    with torch.no_grad():
        clt.input_scale.fill_(2.0)  # scales must be folded into the files
        clt.output_scale.copy_(torch.tensor([0.5, 1.0, 4.0]))
    save_clt(clt, tmp_path / "tracer", model_name="tiny")
    config_yaml = yaml.safe_load((tmp_path / "tracer" / "config.yaml").read_text())
    assert config_yaml["model_kind"] == "cross_layer_transcoder"
    assert (config_yaml["feature_input_hook"], config_yaml["feature_output_hook"]) == (
        "mlp.hook_in",
        "mlp.hook_out",
    )
    from safetensors.torch import load_file

    enc = load_file(tmp_path / "tracer" / "W_enc_1.safetensors")
    assert set(enc) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"}
    assert enc["W_enc_1"].shape == (12, 8) and enc["threshold_1"].shape == (12,)
    assert load_file(tmp_path / "tracer" / "W_dec_0.safetensors")["W_dec_0"].shape == (12, 3, 8)
    assert load_file(tmp_path / "tracer" / "W_dec_2.safetensors")["W_dec_2"].shape == (12, 1, 8)
    loaded = load_transcoders(tmp_path / "tracer")
    assert loaded.cfg.hook_name == IN and loaded.cfg.output_hook_name == OUT
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), clt.encode(x), atol=1e-5)
        assert torch.allclose(loaded.decode(loaded.encode(x)), clt.decode(clt.encode(x)), atol=1e-4)


def test_bad_clt_folders_get_clear_errors(tmp_path):
    save_clt(random_clt(3, 8, 12), tmp_path / "tracer")
    (tmp_path / "tracer" / "W_dec_1.safetensors").unlink()
    with pytest.raises(DictionarySetError, match="lacks the files of layer"):
        load_clt(tmp_path / "tracer")
    with pytest.raises(DictionarySetError, match="transcoder at every layer"):
        save_dictionary(
            build_dictionary(DictionaryConfig(d_in=8, d_sae=16, k=4, hook_name="blocks.0.x")),
            tmp_path / "one",
        )
        load_transcoders(tmp_path / "one")
    with pytest.raises(DictionarySetError, match="cross-layer transcoder"):
        save_clt(build_dictionary(DictionaryConfig(d_in=8, d_sae=16, k=4)), tmp_path / "x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.yaml").write_text("model_kind: something\n")
    with pytest.raises(DictionaryFileError):
        load_clt(tmp_path / "bad")


def test_a_crosscoder_is_not_taken_for_a_cross_layer_transcoder(tmp_path):
    """Both read several hooks at once, but only a CLT replaces MLPs: graphs and save_clt refuse a crosscoder."""
    from saelab.circuits.transcoders import Transcoders
    from saelab.cli.train import layer_configs

    crosscoder = build_dictionary(
        DictionaryConfig(architecture="crosscoder", d_in=8, d_sae=16, hook_name=IN, layers=[0, 1], k=4)
    )
    with pytest.raises(DictionarySetError, match="transcoder at every layer"):
        Transcoders(crosscoder)
    with pytest.raises(DictionarySetError, match="cross-layer transcoder"):
        save_clt(crosscoder, tmp_path / "x")
    save_dictionary(crosscoder, tmp_path / "cc")
    with pytest.raises(DictionarySetError, match="transcoder at every layer"):
        load_transcoders(tmp_path / "cc")
    # --width counts a CLT's latents per layer, a crosscoder's in all (they are shared by its members)
    configs = layer_configs(
        ["clt_batchtopk", "crosscoder"], [16], [4], [1.0], [4.0], IN, OUT, [0, 1, 2], 0, "auto"
    )
    assert [(c.architecture, c.d_sae) for c in configs] == [("clt_batchtopk", 48), ("crosscoder", 16)]
