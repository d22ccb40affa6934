"""Paired synthetic activations: the planted truth, the source protocol, and the scores against it."""

from __future__ import annotations

import pytest
import torch

from saelab.core.sources import build_source
from saelab.diffing.synthetic import (
    PAIRED_HOOK,
    PairedGroundTruth,
    PairedSyntheticActivations,
    PairedSyntheticConfig,
    held_out,
    planted_report,
)
from saelab.errors import DataError

SMALL = PairedSyntheticConfig(d=32, n_shared=80, n_b_only=12, n_a_only=4, mean_active=4, seed=3)


def test_the_truth_plants_shared_b_only_and_a_only_features():
    truth = PairedGroundTruth(SMALL)
    dirs = truth.directions
    shared, b_only, a_only = truth.shared, truth.b_only, truth.a_only
    # Shared features: in both models, B's direction at exactly shared_cosine from A's.
    cos = (dirs[0, shared] * dirs[1, shared]).sum(-1)
    assert torch.allclose(cos, torch.full_like(cos, SMALL.shared_cosine), atol=1e-6)
    assert torch.allclose(dirs[:, shared].norm(dim=-1), torch.ones(2, 80, dtype=dirs.dtype))
    # Model-specific features: no direction (and zero strength) in the other model.
    assert float(dirs[0, b_only].abs().sum()) == 0 and float(truth.strength[b_only, 0].sum()) == 0
    assert float(dirs[1, a_only].abs().sum()) == 0 and float(truth.strength[a_only, 1].sum()) == 0
    # Rescaled shared features are weaker in exactly one model, by a factor in [rescaled_low, 1].
    weaker = truth.strength[shared].min(1).values
    assert bool((weaker[truth.rescaled[shared]] >= SMALL.rescaled_low).all())
    assert bool((truth.strength[shared].max(1).values == 1).all())
    assert bool((weaker[~truth.rescaled[shared]] == 1).all())
    assert 0.1 < float(truth.rescaled.float().sum()) / 80 < 0.5


def test_samples_are_paired_sums_of_the_planted_features():
    truth = PairedGroundTruth(SMALL)
    x, c = truth.sample(4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2, 32)
    expected = torch.einsum("ng,mgd->nmd", c.double(), truth.directions * truth.strength.T[:, :, None])
    assert torch.allclose(x.double(), expected, atol=1e-5)
    assert float((c > 0).sum(1).float().mean()) == pytest.approx(4.0, abs=0.15)
    # A token with only a B-only feature active moves B and leaves A at zero.
    only_b = (
        ((c[:, truth.b_only] > 0).any(1))
        & ~((c[:, : SMALL.n_shared] > 0).any(1))
        & ~(c[:, truth.a_only] > 0).any(1)
    )
    assert bool(only_b.any()) and float(x[only_b, 0].abs().max()) == 0 and float(x[only_b, 1].abs().max()) > 0


def test_the_source_kind_is_registered_reproducible_and_rank_disjoint():
    source = build_source(SMALL.as_source(), batch_size=16)
    assert isinstance(source, PairedSyntheticActivations)
    assert source.dims() == {"model0/synthetic": 32, "model1/synthetic": 32}
    first = [source.next_batch() for _ in range(3)]
    assert set(first[0]) == {PAIRED_HOOK.replace("{i}", "0"), PAIRED_HOOK.replace("{i}", "1")}
    again = PairedSyntheticActivations(SMALL, 16)
    again.load_state_dict({"index": 2})
    assert torch.equal(again.next_batch()["model1/synthetic"], first[2]["model1/synthetic"])
    rank1 = build_source(SMALL.as_source(), batch_size=16, rank=1, world_size=2)
    assert torch.equal(rank1.next_batch()["model0/synthetic"], first[1]["model0/synthetic"])
    evaluation = held_out(SMALL, 16)
    assert not torch.equal(evaluation[:, 0], first[0]["model0/synthetic"])


def test_bad_settings_get_a_clear_error():
    with pytest.raises(DataError, match="shared_cosine must be in"):
        PairedSyntheticConfig(shared_cosine=1.5)
    with pytest.raises(DataError, match="mean_active"):
        PairedSyntheticConfig(n_shared=2, n_b_only=1, n_a_only=0, mean_active=5)
    with pytest.raises(DataError, match="unknown paired synthetic setting.*n_features"):
        PairedSyntheticConfig.from_dict({"n_features": 3})


def test_planted_report_scores_a_crosscoder_built_from_the_truth():
    """A crosscoder whose latents are the true features: every planted B-only latent is found and confirmed;
    shrinking a shared feature's A decoder makes a spurious B-only latent that Latent Scaling rejects."""
    from saelab.dictionaries import DictionaryConfig, build_dictionary
    from saelab.diffing import diff_latents

    cfg = PairedSyntheticConfig(
        d=128, n_shared=40, n_b_only=10, n_a_only=3, mean_active=3, rescaled_fraction=0
    )
    truth = PairedGroundTruth(cfg)
    writes = (truth.directions * truth.strength.T[:, :, None]).float()  # [2, G, d]
    G = cfg.n_features
    cc = build_dictionary(
        DictionaryConfig(
            architecture="crosscoder", d_in=128, d_sae=G, hook_name=PAIRED_HOOK, layers=[0, 1],
            normalize_activations="none",
        )
    )  # fmt: skip
    with torch.no_grad():
        cc.W_dec.copy_(writes.permute(1, 0, 2))
        cc.W_dec[0, 0] = 0.0  # shared feature 0: complete shrinkage of its A decoder
        enc = writes / writes.pow(2).sum((0, 2)).clamp_min(1e-12)[None, :, None]
        cc.W_enc.copy_(enc.permute(0, 2, 1))
        cc.b_enc.fill_(-0.3)  # magnitudes are >= 0.5: fire only when the feature is on
        cc.b_dec.zero_()
    x = held_out(cfg, 20000, truth)
    diff = diff_latents(cc, [x])
    report = planted_report(cc, truth, diff)
    planted = report["planted_b_only"]
    assert planted["tagged_b_only"] == planted["nu_below_threshold"] == 10
    assert planted["share_tagged_b_only"] == 1.0
    spurious = report["b_only_latents"]
    assert report["spurious_latents"] == [0] and spurious["spurious"] == 1
    assert spurious["spurious_rejected_by_nu_eps"] == 1 and spurious["planted"] == 10
    assert spurious["spurious_nu_eps"]["median"] == pytest.approx(cfg.shared_cosine, abs=0.05)
