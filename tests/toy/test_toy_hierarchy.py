"""Hierarchical toy data: the generative model as documented, the tree metrics on dictionaries built to
be ideal or fully absorbed, and `saelab toy hierarchy --quick` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.errors import DataError
from saelab.toy.hierarchy import HierarchyActivations, HierarchyConfig, HierarchyTruth, hierarchy_scores
from saelab.toy.synthetic import SYNTHETIC_HOOK, _generator


def test_children_fire_only_with_their_parent_and_exclude_each_other():
    cfg = HierarchyConfig(n_parents=5, n_children=3, d=24, parent_probability=0.3, child_probability=0.8)
    truth = HierarchyTruth(cfg)
    x, c = truth.sample(20_000, _generator("t", 0))
    active = c > 0
    parents, children = active[:, :5], active[:, 5:].reshape(-1, 5, 3)
    assert not bool((children.any(-1) & ~parents).any()), "a child fired without its parent"
    assert int(children.sum(-1).max()) == 1, "two siblings fired together"
    assert parents.double().mean().item() == pytest.approx(0.3, abs=0.01)
    assert (children.any(-1).sum() / parents.sum()).item() == pytest.approx(0.8, abs=0.02)
    assert truth.parent_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    torch.testing.assert_close(x, c @ truth.features)
    torch.testing.assert_close(truth.features @ truth.features.T, torch.eye(20), atol=1e-5, rtol=0)
    assert float(c[active].min()) >= cfg.magnitude_offset  # a firing feature is never near zero
    assert cfg.mean_active == pytest.approx(5 * 0.3 * 1.8)


def test_the_stream_is_reproducible_and_resumes_exactly():
    cfg = HierarchyConfig(n_parents=3, n_children=2, d=12)
    a = HierarchyActivations(cfg, 16)
    for _ in range(3):
        a.next_batch()
    state, want = a.state_dict(), a.next_batch()[SYNTHETIC_HOOK]
    b = HierarchyActivations(cfg, 16)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[SYNTHETIC_HOOK], want)
    assert b.dims() == {SYNTHETIC_HOOK: 12}


@pytest.mark.parametrize(
    "settings, message",
    [({"n_children": 1}, "n_children"), ({"parent_probability": 0}, "parent_probability"),
     ({"child_probability": 1.5}, "child_probability"), ({"magnitude": "huge"}, "magnitude")],
)  # fmt: skip
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(DataError, match=message):
        HierarchyConfig(**settings)


def _dictionary(decoder: torch.Tensor, encoder: torch.Tensor) -> torch.nn.Module:
    """A ReLU dictionary with the given rows (no scaling; a tiny negative bias silences rounding noise)."""
    d = build_dictionary(DictionaryConfig(architecture="relu", d_in=decoder.shape[1], d_sae=decoder.shape[0]))
    with torch.no_grad():
        d.W_dec.copy_(decoder)
        d.W_enc.copy_(encoder.T)
        d.b_enc.fill_(-1e-4)
        d.b_dec.zero_()
    return d


CFG = HierarchyConfig(n_parents=4, n_children=4, d=24, parent_probability=0.3, child_probability=1.0)


def test_the_ideal_dictionary_recovers_parents_without_absorption_or_splitting():
    truth = HierarchyTruth(CFG)
    x, c = truth.sample(4096, _generator("ideal", 0))
    scores = hierarchy_scores(_dictionary(truth.features, truth.features), truth, x, c)
    assert scores["parent_cosine_min"] == pytest.approx(1.0) and scores["parents_recovered"] == 4
    assert scores["child_cosine_mean"] == pytest.approx(1.0)
    assert scores["absorption_mean"] == pytest.approx(0.0, abs=1e-6)
    assert scores["parent_latent_miss_rate"] == 0.0
    assert scores["splitting_parents"] == 1.0 and scores["splitting_children"] == 1.0
    assert scores["fvu"] == pytest.approx(0.0, abs=1e-6) and scores["dead_latents"] == 0


def test_a_fully_absorbed_dictionary_scores_as_absorbed_and_split():
    """One latent per child, decoding parent + child (no parent latent): what absorption converges to."""
    truth = HierarchyTruth(CFG)
    x, c = truth.sample(8192, _generator("absorbed", 0))
    merged = F.normalize(truth.parents[truth.parent_of] + truth.children, dim=1)
    scores = hierarchy_scores(_dictionary(merged, truth.children), truth, x, c)
    assert scores["parent_cosine_mean"] == pytest.approx(2**-0.5, abs=1e-5)
    assert scores["parents_recovered"] == 0
    # The "parent latent" (best cosine) is one of four children's: it carries the parent a quarter of the time.
    assert scores["absorption_mean"] == pytest.approx(0.75, abs=0.03)
    assert scores["parent_latent_miss_rate"] == pytest.approx(0.75, abs=0.03)
    assert scores["splitting_parents"] == 4.0 and scores["splitting_children"] == 1.0


def test_scores_refuse_samples_of_another_tree():
    truth = HierarchyTruth(CFG)
    with pytest.raises(DataError, match="coefficients"):
        hierarchy_scores(
            _dictionary(truth.features, truth.features), truth, torch.zeros(4, 24), torch.zeros(4, 3)
        )


def test_toy_hierarchy_quick_writes_table_plot_and_json_and_reuses_the_run(tmp_path):
    from tests.helpers import run

    out = tmp_path / "h"
    code, stdout, stderr = run("toy", "hierarchy", "--quick", "--out", out)
    assert code == 0, stderr
    assert "Matryoshka BatchTopK" in stdout and "absorption" in stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["family"] for r in results["rows"]] == ["batchtopk", "matryoshka_batchtopk"]
    assert len({r["k"] for r in results["rows"]}) == 1  # the same L0 for both
    assert results["rows"][1]["options"]["matryoshka_widths"] == [4, 32]
    for r in results["rows"]:
        assert len(r["parent_cosine"]) == 4 and 0 <= r["absorption_mean"] <= 1 and r["l0"] > 0
    assert (out / "hierarchy.png").stat().st_size > 10_000
    first = results["train_seconds"]
    again = run("toy", "hierarchy", "--quick", "--out", out)
    assert again[0] == 0 and json.loads((out / "results.json").read_text())["train_seconds"] < first


def test_toy_hierarchy_refuses_bad_input_with_a_clear_message(tmp_path):
    from tests.helpers import run

    code, out, err = run("toy", "hierarchy", "--out", tmp_path, "--parent-probability", "2")
    assert code == 2 and "parent_probability must be in (0, 1]" in " ".join((out + err).split())
    code, out, err = run("toy", "hierarchy", "--quick", "--out", tmp_path, "--architecture", "nope")
    assert code == 2 and "unknown dictionary family" in " ".join((out + err).split())
