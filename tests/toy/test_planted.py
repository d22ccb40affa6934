"""The planted dictionary on a tiny random Llama: each latent fires exactly on its concept's tokens,
survives a save and reload in the SAELens format, reports its exactness, and refuses models whose first
residual depends on the position."""

from __future__ import annotations

import pytest
import torch

from saelab.core.models import HookedLM
from saelab.dictionaries.io import load_dictionary, save_dictionary
from saelab.errors import DataError
from saelab.toy.planted import HOOK, Concept, plant, token_residuals
from tests.helpers import SPECIAL, make_model, make_tokenizer

CONCEPTS = (
    Concept("low", "the words w1, w2 and w3", lambda t: t.strip() in {"w1", "w2", "w3"}),
    Concept("tens", "words from w10 to w14", lambda t: t.strip() in {f"w{i}" for i in range(10, 15)}),
)


@pytest.fixture(scope="module")
def lm():
    return HookedLM(make_model("llama", n_layers=2, hidden=32, seed=1), make_tokenizer(), name="tiny")


def ids_of(lm, words):
    return [lm.tokenizer.convert_tokens_to_ids(w) for w in words]


def test_each_latent_fires_exactly_on_its_concept(lm, tmp_path):
    planted = plant(lm, CONCEPTS)
    assert planted.dictionary.cfg.hook_name == HOOK and planted.dictionary.cfg.d_sae == 2
    assert planted.members[0] == sorted(ids_of(lm, ["w1", "w2", "w3"]))
    table = token_residuals(lm)
    acts = planted.dictionary.encode(table).detach()
    for i, members in enumerate(planted.members):
        fired = (acts[:, i] > 0).nonzero()[:, 0].tolist()
        assert fired == planted.accepted[i] == members  # separable in 32 dimensions: exact
        assert torch.allclose(acts[members, i].median(), torch.tensor(2.0), atol=1e-4)
    report = planted.report(torch.tensor(ids_of(lm, ["w1", "w1", "w5", "w12"])))
    assert [r["concept"] for r in report] == ["low", "tens"]
    assert all(r["vocab_precision"] == r["vocab_recall"] == 1.0 for r in report)
    assert report[0]["corpus_occurrences"] == 2 and report[1]["corpus_occurrences"] == 1
    assert report[0]["corpus_precision"] == 1.0
    # it reads the residual of a whole sequence the same way (the hook is before any attention)
    ids = torch.tensor([[SPECIAL["<bos>"], *ids_of(lm, ["w5", "w2", "w12", "w7"])]])
    x = lm.capture(ids, HOOK)[HOOK]
    fired = (planted.dictionary.encode(x)[0] > 0).tolist()
    assert fired == [[False, False], [False, False], [True, False], [False, True], [False, False]]
    # the SAELens file round trip keeps every activation
    folder = save_dictionary(planted.dictionary, tmp_path / "planted")
    again = load_dictionary(folder)
    assert torch.allclose(again.encode(table), planted.dictionary.encode(table), atol=1e-5)
    assert again.cfg.metadata["planted"][1]["label"] == "words from w10 to w14"


def test_bad_concepts_and_models_are_refused(lm):
    with pytest.raises(DataError, match="at least one concept"):
        plant(lm, ())
    with pytest.raises(DataError, match="'none'"):
        plant(lm, (Concept("none", "nothing", lambda t: False),))
    gpt2 = HookedLM(make_model("gpt2", n_layers=1, hidden=32), make_tokenizer(), name="tiny-gpt2")
    with pytest.raises(DataError, match="depends on the position"):
        plant(gpt2, CONCEPTS)
