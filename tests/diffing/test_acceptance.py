"""Issue 14's synthetic acceptance at test size: 50 planted B-only features among shared ones.

The BatchTopK crosscoder must tag >= 90% of them B-only with ν^ε and ν^r < 0.2; on the same data the L1
crosscoder must show B-only latents that match a shared feature, and Latent Scaling must reject all of
them. (benchmarks/bench_crosscoder_synthetic.py runs the same check at full size.)
"""

from __future__ import annotations

import pytest

from saelab.dictionaries import DictionaryConfig
from saelab.dictionaries.io import load_dictionary
from saelab.diffing import diff_latents
from saelab.diffing.synthetic import (
    PAIRED_HOOK,
    PairedGroundTruth,
    PairedSyntheticConfig,
    held_out,
    planted_report,
)
from saelab.training import TrainConfig, train


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    data = PairedSyntheticConfig(d=64, n_shared=96, n_b_only=50, n_a_only=6, mean_active=4)
    dictionaries = [
        DictionaryConfig(architecture="crosscoder_batchtopk", k=5, d_in=0, d_sae=384, hook_name=PAIRED_HOOK, layers=[0, 1]),
        DictionaryConfig(architecture="crosscoder", l1_coefficient=1.0, d_in=0, d_sae=384, hook_name=PAIRED_HOOK, layers=[0, 1]),
    ]  # fmt: skip
    cfg = TrainConfig(
        run_dir=str(tmp_path_factory.mktemp("acceptance")), source=data.as_source(), dictionaries=dictionaries,
        n_tokens=800 * 512, batch_size=512, lr=3e-3, log_every=100,
    )  # fmt: skip
    saved = train(cfg, progress=False)
    truth = PairedGroundTruth(data)
    x = held_out(data, 8192, truth)
    out = {}
    for folder in saved.values():
        crosscoder = load_dictionary(folder)
        out[crosscoder.cfg.architecture] = planted_report(crosscoder, truth, diff_latents(crosscoder, [x]))
    return out


def test_batchtopk_tags_the_planted_b_only_features_and_latent_scaling_confirms_them(reports):
    planted = reports["crosscoder_batchtopk"]["planted_b_only"]
    assert planted["n"] == 50
    assert planted["share_tagged_b_only"] >= 0.9, planted
    assert planted["share_nu_below_threshold"] >= 0.9, planted
    assert planted["nu_eps"]["max"] < 0.2 and planted["nu_r"]["max"] < 0.2


def test_l1_makes_spurious_b_only_latents_and_latent_scaling_rejects_them(reports):
    b_only = reports["crosscoder"]["b_only_latents"]
    assert b_only["spurious"] >= 1, b_only
    assert b_only["spurious_rejected"] == b_only["spurious"], b_only
    # The planted ones are not rejected: the two groups are told apart, not everything flagged.
    planted = reports["crosscoder"]["planted_b_only"]
    assert planted["share_nu_below_threshold"] >= 0.9, planted
