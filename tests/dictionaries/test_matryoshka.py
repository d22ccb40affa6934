"""Matryoshka BatchTopK: the loss against a brute-force per-prefix reference, nested decoding, width
checks, the trainer (sweep, resume), and its SAELens-layout folder loaded as a JumpReLU by saelab and
by the installed sae-lens."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.cli.train import sweep_configs
from saelab.dictionaries import DictionaryConfig, StepContext, build_dictionary, family
from saelab.dictionaries.io import load_dictionary, save_dictionary
from saelab.errors import DictionaryConfigError
from saelab.toy.hierarchy import HierarchyConfig
from saelab.toy.synthetic import SYNTHETIC_HOOK
from saelab.training import TrainConfig, train

NAME = "matryoshka_batchtopk"
D_IN, D_SAE, K = 8, 24, 3


def make(widths=(4, 12, 24), weights=(), seed=0, **kw) -> torch.nn.Module:
    cfg = DictionaryConfig(
        architecture=NAME,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        hook_name="blocks.1.hook_resid_post",
        options={"matryoshka_widths": list(widths), "group_weights": list(weights)},
        metadata={"model_name": "tiny-model"},
        **kw,
    )
    d = build_dictionary(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else D_IN**-0.5))
        d.input_scale.fill_(1.7)
        d.output_scale.fill_(1.7)
    return d


def inputs(n=40, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def reference_loss(d, x, widths, weights):
    """Dense brute force: one BatchTopK selection, then each prefix's FVU, weighted and summed."""
    xn = x * d.input_scale
    pre = (xn - d.b_dec) @ d.W_enc + d.b_enc
    acts = torch.relu(pre)
    cutoff = acts.detach().flatten().topk(K * x.shape[0]).values.min()
    acts = acts * ((acts.detach() >= cutoff) & (acts.detach() > 0))
    variance = (xn - xn.mean(0)).pow(2).sum()
    loss = 0
    for width, weight in zip(widths, weights, strict=True):
        recon = acts[:, :width] @ d.W_dec[:width] + d.b_dec
        loss = loss + weight * (recon - xn).pow(2).sum() / variance
    return loss


@pytest.mark.parametrize("decode", ["dense", "sparse"])
@pytest.mark.parametrize("weights", [(), (0.5, 0.3, 0.2)], ids=["mean", "weighted"])
def test_loss_and_gradients_equal_a_brute_force_per_prefix_reference(weights, decode, monkeypatch):
    from saelab.dictionaries.families import matryoshka

    monkeypatch.setattr(matryoshka, "DENSE_DECODE_FACTOR", 1000 if decode == "dense" else 0)
    d, x = make(weights=weights), inputs()
    widths = [4, 12, 24]
    expected_weights = weights or (1 / 3,) * 3
    out = d.training_loss(x, x, StepContext())
    grads = torch.autograd.grad(out.loss, [d.W_enc, d.b_enc, d.W_dec, d.b_dec])
    ref = reference_loss(d, x, widths, expected_weights)
    ref_grads = torch.autograd.grad(ref, [d.W_enc, d.b_enc, d.W_dec, d.b_dec])
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert out.terms["l0"] == pytest.approx(K)  # exactly k*B kept over the batch
    assert set(out.terms) >= {"fvu_prefix0", "fvu_prefix1", "fvu", "threshold"}
    # The outer prefix is the whole dictionary: its FVU is the logged fvu.
    assert out.terms["fvu_prefix0"] != out.terms["fvu"]


def test_dead_latents_add_the_auxk_term():
    d, x = make(), inputs()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[-10:] = True
    plain = d.training_loss(x, x, StepContext())
    with_aux = d.training_loss(x, x, StepContext(dead_mask=dead))
    assert with_aux.terms["aux"] > 0
    assert with_aux.loss.item() == pytest.approx(
        plain.loss.item() + d.cfg.aux_coefficient * with_aux.terms["aux"]
    )


def test_nested_prefixes_decode_the_first_latents_only():
    d, x = make(), inputs()
    latents = d.encode(x)
    prefixes = d.decode_prefixes(latents)
    assert len(prefixes) == 3
    for width, recon in zip([4, 12, 24], prefixes, strict=True):
        kept = torch.zeros_like(latents)
        kept[:, :width] = latents[:, :width]
        torch.testing.assert_close(recon, d.decode(kept))
    torch.testing.assert_close(prefixes[-1], d(x))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"matryoshka_widths": [12, 4, 24]}, "strictly increasing"),
        ({"matryoshka_widths": [4, 4, 24]}, "strictly increasing"),
        ({"matryoshka_widths": [0, 24]}, "positive"),
        ({"matryoshka_widths": [4, 12]}, "must end at the dictionary's width d_sae=24"),
        ({"matryoshka_widths": [4, 12, 30]}, "must end at"),
        ({"matryoshka_widths": [4.5, 24]}, "whole numbers"),
        ({"group_fractions": [0.5, 0.4]}, "sum to 1"),
        ({"group_fractions": [0.01, 0.99]}, "some group is empty"),
        ({"matryoshka_widths": [4, 24], "group_fractions": [0.5, 0.5]}, "not both"),
        ({"matryoshka_widths": [4, 24], "group_weights": [1.0]}, "one non-negative loss weight per prefix"),
    ],
)
def test_bad_widths_fractions_and_weights_are_refused_clearly(options, message):
    with pytest.raises(DictionaryConfigError, match=message):
        DictionaryConfig(architecture=NAME, d_in=D_IN, d_sae=D_SAE, k=K, options=options)


def test_defaults_and_fractions_resolve_to_recorded_widths():
    assert DictionaryConfig(architecture=NAME, d_sae=2048, k=8).options["matryoshka_widths"] == [
        128,
        512,
        2048,
    ]
    cfg = DictionaryConfig(architecture=NAME, d_sae=100, k=8, options={"group_fractions": [0.1, 0.3, 0.6]})
    assert cfg.options == {"matryoshka_widths": [10, 40, 100], "group_fractions": [], "group_weights": []}
    assert DictionaryConfig.from_dict(cfg.to_dict()).options == cfg.options
    assert DictionaryConfig(architecture=NAME, d_sae=2, k=1).options["matryoshka_widths"] == [1, 2]


def test_the_cli_sweep_gives_matryoshka_its_widths_and_sweeps_k():
    configs = sweep_configs(
        [NAME, "batchtopk"], [64], [2, 4], [5.0], [32.0], "h", None, 8, 0,
        family_options={"matryoshka_widths": [8, 64]},
    )  # fmt: skip
    mat = [c for c in configs if c.architecture == NAME]
    assert [c.k for c in mat] == [2, 4] and all(c.options["matryoshka_widths"] == [8, 64] for c in mat)
    assert all(c.options == {} for c in configs if c.architecture == "batchtopk")
    with pytest.raises(DictionaryConfigError, match="--matryoshka-fractions"):
        sweep_configs([NAME], [64, 128], [2], [5.0], [32.0], "h", None, 8, 0,
                      family_options={"matryoshka_widths": [8, 64]})  # fmt: skip
    by_fraction = sweep_configs([NAME], [64, 128], [2], [5.0], [32.0], "h", None, 8, 0,
                                family_options={"group_fractions": [0.25, 0.75]})  # fmt: skip
    assert [c.options["matryoshka_widths"] for c in by_fraction] == [[16, 64], [32, 128]]


def test_the_cli_refuses_bad_widths_with_one_paragraph(tmp_path):
    from tests.helpers import run

    code, out, err = run("train", "--run-dir", tmp_path / "r", "--architecture", NAME, "--width", "64",
                         "--matryoshka-widths", "8,32")  # fmt: skip
    assert code == 2 and "must end at the dictionary's width d_sae=64" in " ".join((out + err).split())
    code, out, err = run(
        "train", "--run-dir", tmp_path / "r", "--architecture", NAME, "--matryoshka-widths", "8,x"
    )
    assert code == 2 and "comma-separated list of numbers" in " ".join((out + err).split())


# ---- files -------------------------------------------------------------------------------------
def trained_like(widths=(4, 12, 24)):
    d = make(widths)
    with torch.no_grad():
        d.threshold.fill_(0.3)
    return d


def test_save_load_round_trip_keeps_family_widths_and_outputs(tmp_path):
    d, x = trained_like(), inputs()
    folder = save_dictionary(d, tmp_path / "d")
    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["architecture"] == "jumprelu"
    assert raw["metadata"]["training_architecture"] == NAME
    assert raw["metadata"]["training_architecture_details"]["matryoshka_widths"] == [4, 12, 24]
    assert raw["metadata"]["model_name"] == "tiny-model"  # the common metadata is kept
    back = load_dictionary(folder)
    assert back.cfg.architecture == NAME and back.widths == [4, 12, 24]
    torch.testing.assert_close(back(x), d(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.encode(x), d.encode(x), rtol=1e-5, atol=1e-5)
    # Without saelab's own key the folder is a plain SAELens JumpReLU: saelab loads it as one.
    del raw["saelab"]
    (folder / "cfg.json").write_text(json.dumps(raw))
    plain = load_dictionary(folder)
    assert plain.cfg.architecture == "jumprelu"
    torch.testing.assert_close(plain(x), d(x), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
def test_saelens_loads_the_folder_as_a_jumprelu_with_equal_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    d, x = trained_like(), inputs()
    sae = sae_lens.SAE.load_from_disk(save_dictionary(d, tmp_path / "d"))
    assert sae.cfg.architecture() == "jumprelu"
    assert sae.cfg.metadata.training_architecture == NAME
    with torch.no_grad():
        f = sae.encode(x)
        assert (f > 0).sum() > 0
        torch.testing.assert_close(d.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d(x), sae(x), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
def test_the_saved_cfg_matches_what_saelens_writes_for_its_matryoshka(tmp_path):
    """SAELens's own MatryoshkaBatchTopKTrainingSAE, saved for inference: the same architecture and keys."""
    saes = pytest.importorskip("sae_lens").saes
    theirs = saes.MatryoshkaBatchTopKTrainingSAE(
        saes.MatryoshkaBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[4, 12, 24])
    )
    theirs.save_inference_model(tmp_path / "theirs")
    want = json.loads((tmp_path / "theirs" / "cfg.json").read_text())
    got = json.loads((save_dictionary(trained_like(), tmp_path / "ours") / "cfg.json").read_text())
    assert got["architecture"] == want["architecture"] == "jumprelu"
    assert got["metadata"]["training_architecture"] == want["metadata"]["training_architecture"]
    details = want["metadata"]["training_architecture_details"]
    assert (
        got["metadata"]["training_architecture_details"]["matryoshka_widths"] == details["matryoshka_widths"]
    )
    assert set(got["metadata"]["training_architecture_details"]) <= set(details)
    assert set(want) - {"dtype"} <= set(got)


# ---- the trainer -------------------------------------------------------------------------------
def config(run_dir, steps=24):
    h = HierarchyConfig(n_parents=3, n_children=2, d=12, parent_probability=0.3)
    return TrainConfig(
        run_dir=str(run_dir),
        model=None,
        source=h.as_source(),
        dictionaries=[
            DictionaryConfig(
                architecture=NAME,
                d_in=12,
                d_sae=16,
                k=2,
                hook_name=SYNTHETIC_HOOK,
                options={"matryoshka_widths": [3, 16]},
            )  # fmt: skip
        ],
        n_tokens=steps * 64,
        batch_size=64,
        lr=3e-3,
        checkpoint_every=5,
        log_every=1,
    )


def test_trains_and_resumes_exactly(tmp_path):
    full = train(config(tmp_path / "full"), progress=False)
    assert train(config(tmp_path / "split"), progress=False, stop_after_steps=12) == {}
    split = train(config(tmp_path / "split"), resume=True, progress=False)
    (name,) = full
    assert name == f"{NAME}-{family(NAME).tag(config(tmp_path).dictionaries[0])}-w16"
    a, b = load_dictionary(full[name]), load_dictionary(split[name])
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "fvu_prefix0" in json.dumps(line)]
    assert logged, "the per-prefix FVU is not logged"
