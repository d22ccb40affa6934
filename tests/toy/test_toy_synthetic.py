"""Synthetic data with known features, recovery scores, dead-latent resampling, and the trainer on them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.dictionaries import DictionaryConfig, StepContext, build_dictionary
from saelab.dictionaries.io import load_dictionary
from saelab.errors import DataError, SaelabError
from saelab.toy.recovery import max_cosines, recovery_scores
from saelab.toy.synthetic import (
    SYNTHETIC_HOOK,
    GroundTruth,
    SyntheticActivations,
    SyntheticConfig,
    feature_probabilities,
    save_features_file,
    toy_model_features,
)
from saelab.training import TrainConfig, train


def test_random_features_are_unit_and_probabilities_sum_to_mean_active():
    truth = GroundTruth(SyntheticConfig(n_features=300, d=40, mean_active=5, seed=1))
    assert truth.features.shape == (300, 40)
    assert torch.allclose(truth.features.norm(dim=1), torch.ones(300), atol=1e-5)
    assert truth.probabilities.sum().item() == pytest.approx(5.0, rel=1e-5)
    assert torch.allclose(truth.probabilities, torch.full((300,), 5 / 300))


def test_sharkey_frequencies_decay_and_390_features_are_frequent():
    cfg = SyntheticConfig(n_features=512, d=256, frequency="decay", frequency_decay=0.99, mean_active=5)
    p = feature_probabilities(cfg, 512)
    assert p.sum().item() == pytest.approx(5.0, rel=1e-4)
    assert torch.allclose(p[1:] / p[:-1], torch.full((511,), 0.99), rtol=1e-4)
    assert int((p >= 1e-3).sum()) == 390  # the figure Sharkey et al.'s setting gives


def test_samples_have_the_requested_sparsity_and_are_sums_of_features():
    truth = GroundTruth(SyntheticConfig(n_features=200, d=32, mean_active=4, magnitude="product", seed=3))
    x, coefficients = truth.sample(20000, torch.Generator().manual_seed(0))
    active = (coefficients > 0).sum(1).float()
    assert active.mean().item() == pytest.approx(4.0, abs=0.1)
    assert torch.allclose(x, coefficients @ truth.features, atol=1e-5)
    # The product of two U[0,1] has mean 1/4.
    assert coefficients[coefficients > 0].mean().item() == pytest.approx(0.25, abs=0.01)


def test_clustered_features_share_directions_within_a_cluster():
    cfg = SyntheticConfig(
        n_features=256, d=128, geometry="clustered", n_clusters=8, cluster_similarity=0.6, seed=0
    )
    f = GroundTruth(cfg).features
    cos = f @ f.T
    same = (torch.arange(256)[:, None] % 8) == (torch.arange(256)[None, :] % 8)
    off_diag = ~torch.eye(256, dtype=torch.bool)
    assert cos[same & off_diag].mean().item() == pytest.approx(0.6, abs=0.05)
    assert cos[~same].abs().mean().item() < 0.2


def test_noise_is_added_with_the_requested_scale():
    truth = GroundTruth(SyntheticConfig(n_features=50, d=64, noise_std=0.1, seed=0))
    x, coefficients = truth.sample(4000, torch.Generator().manual_seed(1))
    noise = x - coefficients @ truth.features
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)


def test_batches_are_reproducible_resumable_and_rank_disjoint():
    cfg = SyntheticConfig(n_features=64, d=16, seed=5)
    a = SyntheticActivations(cfg, 32)
    first = [a.next_batch()[SYNTHETIC_HOOK] for _ in range(3)]
    b = SyntheticActivations(cfg, 32)
    b.load_state_dict({"index": 2})
    assert torch.equal(b.next_batch()[SYNTHETIC_HOOK], first[2])
    rank1 = SyntheticActivations(cfg, 32, rank=1, world_size=2)
    assert torch.equal(rank1.next_batch()[SYNTHETIC_HOOK], first[1])
    evaluation = SyntheticActivations(cfg, 32, split="eval")
    assert not torch.equal(evaluation.next_batch()[SYNTHETIC_HOOK], first[0])
    assert a.dims() == {SYNTHETIC_HOOK: 16}
    peeked = a.peek(10)[SYNTHETIC_HOOK]
    assert peeked.shape == (10, 16) and torch.equal(peeked, a.peek(10)[SYNTHETIC_HOOK])


def test_features_file_round_trip_keeps_lengths(tmp_path):
    features = torch.tensor([[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    path = save_features_file(tmp_path / "truth.safetensors", features, torch.tensor([0.5, 0.2, 1.0]))
    truth = GroundTruth(SyntheticConfig(n_features=3, d=2, mean_active=1, features_file=str(path)))
    assert torch.allclose(truth.features.norm(dim=1), torch.ones(3))
    assert torch.allclose(truth.scales, features.norm(dim=1))
    x, coefficients = truth.sample(500, torch.Generator().manual_seed(0))
    assert torch.allclose(x, coefficients @ truth.features, atol=1e-6)  # coefficients include the lengths
    assert (coefficients[:, 2] > 0).all()  # probability 1
    assert coefficients[:, 0].max() > 2.5 and coefficients[:, 1].max() <= 0.5


def test_bad_settings_and_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="frequency must be one of"):
        SyntheticConfig(frequency="zipf")
    with pytest.raises(DataError, match="mean_active"):
        SyntheticConfig(n_features=10, mean_active=11)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="cannot read the ground-truth features file"):
        GroundTruth(SyntheticConfig(features_file=str(bad)))


def test_toy_model_features_keep_represented_columns():
    W = torch.tensor([[1.0, 0.0, 0.1, -1.0], [0.0, 1.0, 0.1, 0.0]])
    features, probabilities = toy_model_features(W, 0.05)
    assert features.shape == (3, 2)
    assert torch.allclose(probabilities, torch.full((3,), 0.05))
    with pytest.raises(DataError, match="represents no feature"):
        toy_model_features(torch.zeros(2, 3), 0.1)


def test_max_cosines_and_recovery_scores_on_a_planted_dictionary():
    truth = GroundTruth(SyntheticConfig(n_features=20, d=16, mean_active=2, seed=0))
    cfg = DictionaryConfig(architecture="relu", d_in=16, d_sae=30, hook_name=SYNTHETIC_HOOK)
    sae = build_dictionary(cfg)
    with torch.no_grad():
        # Latents 0..17 are the true features; 18..29 point elsewhere and never fire.
        sae.W_dec[:18] = truth.features[:18]
        sae.W_enc.zero_()
        sae.W_enc[:, :18] = truth.features[:18].T
        sae.b_enc.fill_(-1e-4)
        sae.b_enc[18:] = -1e6
        sae.b_dec.zero_()
    per_feature, per_latent = max_cosines(truth.features, sae.W_dec)
    assert torch.allclose(per_feature[:18], torch.ones(18, dtype=torch.float64))
    x, _ = truth.sample(2000, torch.Generator().manual_seed(1))
    scores = recovery_scores(sae, truth.features, truth.probabilities, x)
    assert scores["recovered"] == pytest.approx(18 / 20)
    assert scores["mmcs"] == pytest.approx(float(per_feature.mean()))
    assert scores["dead_latents"] == 12
    assert scores["false_positive_latents"] == 0
    assert len(scores["max_cosine_per_feature"]) == 20


def test_resampling_points_dead_latents_at_the_worst_explained_inputs():
    torch.manual_seed(0)
    for architecture in ("relu", "gated", "jumprelu", "topk"):
        cfg = DictionaryConfig(architecture=architecture, d_in=8, d_sae=16, hook_name=SYNTHETIC_HOOK, k=2)
        sae = build_dictionary(cfg)
        x = torch.zeros(64, 8)
        x[:, 0] = torch.rand(64)  # everything else is zero, except one row far out along axis 3
        x[5, 3] = 50.0
        sae.init_from_data(x, x)
        with torch.no_grad():  # a dictionary that explains nothing yet: the outlier is the worst row
            sae.W_enc.normal_().mul_(1e-3)
        dead = torch.tensor([7])
        before = sae.W_enc.detach().clone()
        sae.resample(dead, x, x)
        cos = torch.nn.functional.cosine_similarity(sae.W_dec[7], torch.eye(8)[3], dim=0)
        assert cos.abs() > 0.8, architecture
        alive = [i for i in range(16) if i != 7]
        assert torch.equal(sae.W_enc[:, alive], before[:, alive])
        if architecture in ("gated", "topk", "jumprelu"):
            assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-5)


def test_trainer_runs_on_synthetic_data_resamples_and_resumes_exactly(tmp_path):
    synthetic = SyntheticConfig(n_features=32, d=16, mean_active=2, seed=0)

    def config(run_dir):
        return TrainConfig(
            run_dir=str(run_dir),
            source=synthetic.as_source(),
            dictionaries=[
                DictionaryConfig(
                    architecture="jumprelu", d_in=0, d_sae=64, hook_name=SYNTHETIC_HOOK, target_l0=2
                ),
                DictionaryConfig(
                    architecture="relu", d_in=0, d_sae=64, hook_name=SYNTHETIC_HOOK, l1_coefficient=2
                ),
            ],
            n_tokens=60 * 128,
            batch_size=128,
            lr=3e-3,
            dead_after_tokens=256,
            resample_every_tokens=1024,
            checkpoint_every=20,
            log_every=10,
        )

    whole = train(config(tmp_path / "whole"), progress=False)
    train(config(tmp_path / "parts"), progress=False, stop_after_steps=25)
    parts = train(config(tmp_path / "parts"), resume=True, progress=False)
    for name in whole:
        a, b = load_dictionary(whole[name]), load_dictionary(parts[name])
        assert torch.equal(a.W_dec, b.W_dec), name
    assert a.cfg.metadata["model_name"] == "saelab:synthetic"
    assert a.cfg.metadata["synthetic"]["n_features"] == 32
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert max(line["resampled"] for line in lines) > 0  # 64 latents for 32 features: some die and come back


def test_a_run_saved_before_the_source_field_resumes_exactly(tmp_path):
    """config.json of older runs says "synthetic": {...}; TrainConfig.from_dict reads it as a source."""
    synthetic = SyntheticConfig(n_features=16, d=8, mean_active=2, seed=3)

    def config(run_dir):
        return TrainConfig(
            run_dir=str(run_dir),
            source=synthetic.as_source(),
            dictionaries=[
                DictionaryConfig(architecture="topk", d_in=0, d_sae=32, hook_name=SYNTHETIC_HOOK, k=2)
            ],
            n_tokens=30 * 64,
            batch_size=64,
            checkpoint_every=10,
            log_every=5,
        )

    whole = train(config(tmp_path / "whole"), progress=False)
    train(config(tmp_path / "old"), progress=False, stop_after_steps=12)
    saved = tmp_path / "old" / "config.json"
    new = json.loads(saved.read_text())
    old = {("synthetic" if key == "source" else key): value for key, value in new.items()}
    old["synthetic"] = {key: value for key, value in new["source"].items() if key != "kind"}
    saved.write_text(json.dumps(old))

    migrated = TrainConfig.from_dict(old)
    assert migrated.source == {"kind": "synthetic", **synthetic.to_dict()}
    assert json.loads(json.dumps(migrated.to_dict())) == new
    resumed = train(config(tmp_path / "old"), resume=True, progress=False)
    for name in whole:
        a, b = load_dictionary(whole[name]), load_dictionary(resumed[name])
        assert torch.equal(a.W_dec, b.W_dec), name
        assert b.cfg.metadata["synthetic"] == synthetic.to_dict()


def test_an_unknown_source_kind_names_the_module_that_registers_it(tmp_path, monkeypatch):
    from saelab.core import sources

    with pytest.raises(DataError, match="unknown activation source kind 'nope'.*register_source"):
        sources.resolve_source({"kind": "nope"})
    monkeypatch.delitem(sources._kinds, "synthetic")  # as in a process that never imported saelab.toy
    with pytest.raises(DataError, match="import saelab.toy.synthetic first"):
        sources.resolve_source(SyntheticConfig().as_source())
    monkeypatch.undo()
    cfg = TrainConfig(run_dir=str(tmp_path / "r"), source={"kind": "nope"}, n_tokens=256)
    with pytest.raises(DataError, match="'nope'"):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_synthetic_training_refuses_a_model_hook(tmp_path):
    cfg = TrainConfig(
        run_dir=str(tmp_path / "r"),
        source=SyntheticConfig(n_features=8, d=4).as_source(),
        dictionaries=[DictionaryConfig(d_in=0, d_sae=8, k=2)],
        n_tokens=256,
    )
    with pytest.raises(SaelabError, match="synthetic"):
        train(cfg, progress=False)


def test_a_dictionary_learns_the_true_features_quickly():
    """TopK with k = the true L0 recovers most of 24 random features in 16 dimensions in 300 steps."""
    synthetic = SyntheticConfig(n_features=24, d=16, mean_active=2, seed=0)
    source = SyntheticActivations(synthetic, 256)
    sae = build_dictionary(
        DictionaryConfig(architecture="topk", d_in=16, d_sae=48, hook_name=SYNTHETIC_HOOK, k=2)
    )
    sae.init_from_data(source.peek(2048)[SYNTHETIC_HOOK], source.peek(2048)[SYNTHETIC_HOOK])
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(300):
        x = source.next_batch()[SYNTHETIC_HOOK]
        out = sae.training_loss(x, x, StepContext(progress=step / 300))
        optimizer.zero_grad()
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.after_optimizer_step()
    x_eval = SyntheticActivations(synthetic, 4096, split="eval").next_batch()[SYNTHETIC_HOOK]
    scores = recovery_scores(sae, source.truth.features, source.truth.probabilities, x_eval)
    assert scores["mmcs"] > 0.9 and scores["recovered"] > 0.75, scores
    assert math.isfinite(scores["fvu"]) and scores["fvu"] < 0.5
