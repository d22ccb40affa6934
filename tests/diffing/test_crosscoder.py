"""Crosscoder families (crosscoder, crosscoder_batchtopk): config, shapes, the sparse training step against a
dense reference, scales that fold away, files that round-trip with the members' provenance, the trainer on
paired synthetic data, and clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from saelab.dictionaries import FAMILIES, DictionaryConfig, build_dictionary
from saelab.dictionaries.base import StepContext
from saelab.dictionaries.io import load_dictionary, save_dictionary
from saelab.diffing.synthetic import PAIRED_HOOK, PairedSyntheticConfig
from saelab.errors import DimensionMismatchError, SaelabError
from saelab.training import TrainConfig, train

FAMILY_NAMES = ["crosscoder", "crosscoder_batchtopk"]


def config(architecture="crosscoder_batchtopk", members=2, d=8, width=24, k=3, **extra):
    return DictionaryConfig(
        architecture=architecture, d_in=d, d_sae=width, hook_name=PAIRED_HOOK,
        layers=list(range(members)), k=k, l1_coefficient=0.5, **extra,
    )  # fmt: skip


def scaled_data(n=512, members=2, d=8, seed=0):
    """Paired activations whose members live at very different scales (as two real models may)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.3, 7.0, 2.0][:members])
    return torch.randn(n, members, d, generator=g) * scales[None, :, None] + 0.1


def trained(architecture, steps=30, **extra):
    """A crosscoder after a few real optimiser steps (nonzero biases, scales and threshold)."""
    cc = build_dictionary(config(architecture, **extra))
    x = scaled_data()
    cc.init_from_data(x, x)
    opt = torch.optim.Adam(cc.parameters(), lr=1e-2)
    for step in range(steps):
        out = cc.training_loss(x, x, StepContext(progress=step / steps, step=step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        cc.after_optimizer_step()
    return cc.eval()


def test_the_families_are_registered_as_multi_hook_with_learned_decoder_norms():
    for name in FAMILY_NAMES:
        fam = FAMILIES[name]
        assert fam.cross_layer and not fam.unit_norm_decoder and not fam.loads_saelens
    assert FAMILIES["crosscoder"].knob == "l1_coefficient" and FAMILIES["crosscoder_batchtopk"].knob == "k"
    assert FAMILIES["crosscoder_batchtopk"].tag(config()) == "k3-M2"


def test_config_shares_latents_over_members_and_refuses_bad_settings():
    # The latents are shared: d_sae need not split over members, and k may exceed d_sae / members.
    cfg = config(width=25, k=20)
    assert cfg.input_hooks == ["model0/synthetic", "model1/synthetic"]
    assert build_dictionary(cfg).W_dec.shape == (25, 2, 8)
    with pytest.raises(ValueError, match="with \\{i\\}"):
        DictionaryConfig(architecture="crosscoder", d_in=8, d_sae=16, hook_name="model0/x", layers=[0, 1])
    with pytest.raises(ValueError, match="give `layers`"):
        DictionaryConfig(architecture="crosscoder", d_in=8, d_sae=16, hook_name=PAIRED_HOOK)
    with pytest.raises(ValueError, match="no output_hook_name"):
        build_dictionary(config(output_hook_name="model{i}/other"))
    with pytest.raises(ValueError, match="k must be in 1..d_sae"):
        config(k=25)


@pytest.mark.parametrize("architecture", FAMILY_NAMES)
def test_shapes_accessors_and_input_errors(architecture):
    cc = trained(architecture, steps=3)
    x = scaled_data(n=5)
    latents = cc.encode(x)
    assert latents.shape == (5, 24)
    assert cc.decode(latents).shape == (5, 2, 8)
    assert torch.allclose(
        cc.decode(latents)[:, 1], (latents @ cc.decoder(1) + cc.b_dec[1] / cc.output_scale[1])
    )
    assert cc.decoder(0).shape == (24, 8) and cc.members == ["model0/synthetic", "model1/synthetic"]
    with pytest.raises(ValueError, match="members 0..1"):
        cc.decoder(2)
    with pytest.raises(DimensionMismatchError, match="reads 2 members at once"):
        cc.encode(torch.randn(5, 8))
    with pytest.raises(DimensionMismatchError, match="width d_in=8"):
        cc.encode(torch.randn(5, 2, 9))
    with pytest.raises(SaelabError, match="resampling dead latents is not available"):
        cc.resample(torch.tensor([0]), x, x)


def _dense_loss(cc, x, ctx):
    """The same loss by plain dense autograd (no sparse kernels), to check the fast path's gradients."""
    xn = x * cc.input_scale[:, None]
    pre = xn.flatten(1) @ cc.W_enc.flatten(0, 1) + cc.b_enc
    norms = cc.W_dec.norm(dim=-1).sum(-1)
    if cc.cfg.architecture == "crosscoder":
        acts = F.relu(pre)
    else:
        with torch.no_grad():
            scaled = F.relu(pre) * norms
            cutoff = scaled.flatten().topk(cc.cfg.k * x.shape[0]).values.min()
            keep = (scaled >= cutoff) & (scaled > 0)
        acts = pre * keep
    recon = torch.einsum("bf,fnd->bnd", acts, cc.W_dec) + cc.b_dec
    error = recon - xn
    if cc.cfg.architecture == "crosscoder":
        lam = cc.cfg.l1_coefficient * min(1.0, ctx.progress / cc.cfg.l1_warmup_fraction)
        return error.pow(2).sum((1, 2)).mean() + lam * (acts * norms).sum(-1).mean()
    return error.pow(2).sum() / (xn - xn.mean(0)).flatten(1).pow(2).sum()


@pytest.mark.parametrize(
    "architecture, dense_above",
    [("crosscoder", 1.0), ("crosscoder", 0.0), ("crosscoder_batchtopk", None)],
    ids=["l1-sparse-kernels", "l1-dense", "batchtopk"],
)
@pytest.mark.parametrize("progress", [0.0, 0.02, 1.0])
def test_the_sparse_step_matches_a_dense_reference_loss_and_gradients(architecture, dense_above, progress):
    cc = trained(architecture, steps=5).train()
    if dense_above is not None:  # the L1 step switches to dense matmuls when many latents fire
        cc.dense_above = dense_above
    cc.zero_grad(set_to_none=True)
    x = scaled_data(n=64, seed=3)
    ctx = StepContext(progress=progress)
    reference = copy.deepcopy(cc)
    out = cc.training_loss(x, x, ctx)
    out.loss.backward()
    dense = _dense_loss(reference, x, ctx)
    dense.backward()
    assert float(out.loss.detach()) == pytest.approx(float(dense.detach()), rel=1e-4)
    for name, param in cc.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        assert torch.allclose(param.grad, expected, atol=1e-5, rtol=1e-4), name
    if architecture == "crosscoder":  # λ warms up from 0: at progress 0 the loss is the squared error
        assert (out.terms["loss"] == pytest.approx(out.terms["mse"])) == (progress == 0.0)
    else:
        assert out.terms["l0"] == pytest.approx(cc.cfg.k, abs=0.5)


def test_batchtopk_auxk_revives_dead_latents_through_their_weights():
    cc = trained("crosscoder_batchtopk", steps=3).train()
    x = scaled_data(n=64)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[:6] = True
    out = cc.training_loss(x, x, StepContext(dead_mask=dead))
    assert out.terms["aux"] > 0
    out.loss.backward()
    # Dead latents get encoder gradient from AuxK even where the main loss did not select them.
    assert float(cc.W_enc.grad[:, :, :6].abs().sum()) > 0


def test_batchtopk_threshold_is_the_running_threshold_over_the_joint_decoder_norm():
    cc = trained("crosscoder_batchtopk", steps=40, threshold_momentum=0.5)
    theta = float(cc.scaled_threshold)
    assert theta > 0
    norms = cc.W_dec.norm(dim=-1).sum(-1)
    assert torch.allclose(cc.threshold, theta / norms, rtol=1e-5)
    x = scaled_data(n=256, seed=5)
    pre = cc.preacts(x)
    expected = pre * ((F.relu(pre) * norms) > theta)
    assert torch.allclose(cc.encode(x), expected, atol=1e-6)
    # At inference the L0 is near k (what the batch selection kept while training).
    assert cc.cfg.k / 3 <= float((cc.encode(x) > 0).sum(-1).float().mean()) <= 3 * cc.cfg.k


@pytest.mark.parametrize("architecture", FAMILY_NAMES)
def test_fold_scales_keeps_latents_and_outputs_and_records_member_scales(architecture):
    cc = trained(architecture)
    assert not torch.allclose(cc.input_scale[0], cc.input_scale[1])  # members normalised separately
    x = scaled_data(n=64, seed=9)
    before_latents, before_out = cc.encode(x), cc(x)
    before_norms = cc.member_decoder_norms().clone()
    scales = cc.input_scale.clone()
    folded = copy.deepcopy(cc)
    folded.fold_scales()
    assert torch.equal(folded.input_scale, torch.ones(2))
    assert torch.allclose(folded.encode(x), before_latents, atol=1e-5)
    assert torch.allclose(folded(x), before_out, atol=1e-4)
    assert folded.cfg.metadata["member_scales"] == pytest.approx(scales.tolist())
    # Norms in the normalised space survive folding (Δnorm must not depend on the models' scales).
    assert torch.allclose(folded.member_decoder_norms(), before_norms, rtol=1e-5)
    folded.fold_scales()  # folding twice changes nothing
    assert folded.cfg.metadata["member_scales"] == pytest.approx(scales.tolist())
    assert torch.allclose(folded(x), before_out, atol=1e-4)


@pytest.mark.parametrize("architecture", FAMILY_NAMES)
def test_save_and_load_round_trip_with_member_provenance(architecture, tmp_path):
    cc = trained(architecture)
    cc.cfg.metadata["member_models"] = ["org/base", "org/chat"]
    folder = save_dictionary(cc, tmp_path / "cc", sparsity=torch.full((24,), -2.0))
    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["saelab"]["config"]["architecture"] == architecture
    assert raw["metadata"]["member_models"] == ["org/base", "org/chat"]
    loaded = load_dictionary(folder)
    assert type(loaded) is type(cc) and loaded.members == ["org/base", "org/chat"]
    x = scaled_data(n=64, seed=11)
    assert torch.allclose(loaded.encode(x), cc.encode(x), atol=1e-5)
    assert torch.allclose(loaded(x), cc(x), atol=1e-4)
    assert torch.allclose(loaded.member_decoder_norms(), cc.member_decoder_norms(), rtol=1e-5)
    assert "member_scales" not in cc.cfg.metadata  # save folds a copy, not the live dictionary


def test_an_acausal_crosscoder_reads_layers_of_one_model():
    cfg = DictionaryConfig(
        architecture="crosscoder", d_in=6, d_sae=12, hook_name="blocks.{i}.hook_resid_post", layers=[4, 2, 3]
    )
    cc = build_dictionary(cfg)
    batch = {f"blocks.{layer}.hook_resid_post": torch.full((5, 6), float(layer)) for layer in (2, 3, 4)}
    x, y = cc.training_inputs(batch)
    assert x.shape == (5, 3, 6) and torch.equal(x[:, 0], batch["blocks.2.hook_resid_post"]) and y is x
    assert cc.decode(cc.encode(x)).shape == (5, 3, 6)
    assert cc.members == ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]


def test_the_trainer_trains_a_crosscoder_on_paired_synthetic_data(tmp_path):
    data = PairedSyntheticConfig(d=16, n_shared=24, n_b_only=6, n_a_only=2, mean_active=3)
    dictionaries = [
        DictionaryConfig(architecture=name, d_in=0, d_sae=64, k=4, l1_coefficient=1.0,
                         hook_name=PAIRED_HOOK, layers=[0, 1])
        for name in FAMILY_NAMES
    ]  # fmt: skip
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"), source=data.as_source(), dictionaries=dictionaries,
        n_tokens=120 * 256, batch_size=256, lr=3e-3, log_every=40,
    )  # fmt: skip
    saved = train(cfg, progress=False)
    assert sorted(saved) == ["crosscoder-l1_1-M2-w64", "crosscoder_batchtopk-k4-M2-w64"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for name in saved:
        fvus = [line["fvu"] for line in lines if line["dictionary"] == name]
        assert fvus[-1] < 0.6 * fvus[0], (name, fvus)
        cc = load_dictionary(saved[name])
        assert cc.cfg.d_in == 16 and cc.members == ["saelab:synthetic-A", "saelab:synthetic-B"]
        assert cc.cfg.metadata["paired_synthetic"]["n_b_only"] == 6
