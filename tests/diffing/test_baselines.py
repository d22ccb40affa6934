"""The baselines beside a crosscoder, on two tiny models that differ only by a planted offset at one
layer: the activation-difference lens recovers the offset and its feature, the per-token KL finds where
they differ, and an SAE's transfer is measured on both."""

from __future__ import annotations

import pytest
import torch

from saelab.core.data import DataConfig
from saelab.core.models import HookedLM
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.diffing.baselines import activation_difference, sae_transfer, token_kl
from saelab.diffing.paired import PairedModels
from tests.helpers import make_model, make_tokenizer, write_corpus

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """B is A with a constant vector added to layer 0's MLP output bias: every token's residual moves by it."""
    base = make_model(n_layers=2, hidden=16, seed=0)
    tuned = make_model(n_layers=2, hidden=16, seed=0)
    offset = torch.zeros(16)
    offset[3] = 2.0
    mlp = tuned.model.layers[0].mlp.down_proj
    mlp.bias = torch.nn.Parameter(offset.clone())
    paired = PairedModels(
        [HookedLM(base, make_tokenizer(), name="A"), HookedLM(tuned, make_tokenizer(), name="B")]
    )
    corpus = write_corpus(tmp_path_factory.mktemp("baselines") / "corpus.txt", n_docs=400)
    data = DataConfig(source=str(corpus), context_size=16, split="train")
    return paired, data, offset


def test_the_activation_difference_is_the_planted_offset_and_decomposes_onto_its_feature(setup):
    paired, data, offset = setup
    sae = build_dictionary(DictionaryConfig(architecture="topk", d_in=16, d_sae=8, k=2, hook_name=HOOK))
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(16)[:8])  # feature i writes along dimension i
    diff = activation_difference(paired, data, HOOK, n_tokens=512, sae=sae, n_features=2, progress=False)
    assert diff.tokens == 512 and diff.hook == HOOK
    torch.testing.assert_close(diff.mean_difference, offset, atol=1e-4, rtol=0)
    assert diff.features.features[0].index == 3


def test_token_kl_is_zero_for_identical_models_and_finds_where_they_differ(setup):
    paired, data, _ = setup
    same = PairedModels([paired.lms[0], paired.lms[0]])
    assert token_kl(same, data, n_tokens=256).mean_kl == pytest.approx(0.0, abs=1e-6)
    result = token_kl(paired, data, n_tokens=256, top=5)
    assert result.mean_kl > 0 and result.tokens >= 256 and len(result.top) == 5
    assert [row["kl"] for row in result.top] == sorted((row["kl"] for row in result.top), reverse=True)
    assert result.top[0]["kl"] >= result.mean_kl and result.top[0]["token"]


def test_an_sae_is_evaluated_in_both_models(setup):
    paired, data, _ = setup
    sae = build_dictionary(DictionaryConfig(architecture="topk", d_in=16, d_sae=32, k=4, hook_name=HOOK))
    from saelab.analysis.evaluation import EvalConfig

    scores = sae_transfer(sae, paired, data, EvalConfig(n_tokens=256, ce_contexts=8, split="train"))
    assert set(scores) == {"A", "B"} and all("ce_loss_score" in m for m in scores.values())
    assert scores["A"]["ce_clean"] != scores["B"]["ce_clean"]
