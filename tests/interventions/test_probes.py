"""Linear probes: accuracy on planted data, chance after projecting the direction out, clear errors."""

from __future__ import annotations

import random

import pytest
import torch

from saelab.core.models import HookedLM
from saelab.core.prompts import encode_left_padded
from saelab.errors import ActivationError, DataError
from saelab.interventions.hooks import AddVector, ablation
from saelab.interventions.probes import (
    ProbeError,
    ablation_check,
    chance_accuracy,
    class_mean_difference,
    fraction_predicted,
    probe_activations,
    project_out,
    stratified_split,
    train_probe,
)
from tests.helpers import make_model, make_tokenizer


def planted(n=400, d=20, margin=3.0, seed=0, anisotropic=False):
    """Two classes shifted by +-margin along a planted unit direction u; (X, y, u)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    y = torch.arange(n) % 2
    X = torch.randn(n, d, generator=g)
    if anisotropic:  # residual streams have a few huge coordinates and an offset
        X = X * torch.logspace(-1, 2, d) + 50.0
    X = X + (2 * y - 1)[:, None].float() * margin * u
    return X, y, u


def test_separable_data_is_probed_and_direction_recovered():
    X, y, u = planted()
    probe = train_probe(X, y, test_fraction=0.25, seed=0)
    assert probe.train_accuracy >= 0.97 and probe.test_accuracy >= 0.97
    assert probe.converged
    assert float(probe.direction @ u) > 0.9  # points to class 1
    assert probe.direction.norm().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(probe.predict(X), (probe.decision(X) > 0).long())
    torch.testing.assert_close(probe.decision(X), X @ probe.weight + probe.bias, atol=1e-4, rtol=1e-5)
    assert probe.to_dict()["n_test"] == 100 and len(probe.to_dict()["direction"]) == 20


def test_projecting_out_the_planted_direction_gives_chance():
    X, y, u = planted(n=800, anisotropic=True)
    probe = train_probe(X, y)
    assert probe.test_accuracy >= 0.95
    te = probe.test_idx
    chance = chance_accuracy(y[te])
    assert chance == 0.5
    # A fresh probe on the projected data has nothing left to read.
    fresh = train_probe(project_out(X, u), y)
    assert abs(fresh.test_accuracy - 0.5) <= 0.1
    # Equal training class means (their difference projected out) leave no linear signal at all.
    tr = probe.train_idx
    flat = train_probe(project_out(X, class_mean_difference(X[tr], y[tr])), y)
    assert flat.scale < 1e-3 * probe.scale and abs(flat.test_accuracy - 0.5) <= 0.1
    # The probe's own direction is in the original space: removing it makes its output constant.
    Xp = project_out(X, probe.direction)
    assert probe.predict(Xp).unique().numel() == 1
    assert probe.accuracy(Xp[te], y[te]) == chance


def test_direction_is_in_original_space_despite_huge_coordinates():
    # Class information in a small coordinate, huge irrelevant noise in another: standardisation must
    # not leak into `direction` (it would point along the huge coordinate otherwise).
    g = torch.Generator().manual_seed(3)
    y = torch.arange(200) % 2
    X = torch.randn(200, 4, generator=g)
    X[:, 0] = 0.01 * (2 * y - 1) + 0.002 * torch.randn(200, generator=g)
    X[:, 1] *= 1000.0
    probe = train_probe(X, y, l2=1e-3)
    assert probe.test_accuracy >= 0.95
    assert abs(float(probe.direction[0])) > 0.99
    assert probe.predict(project_out(X, probe.direction)).unique().numel() == 1


def test_seeded_and_stratified():
    X, y, _ = planted(n=101, margin=0.5)
    a, b = train_probe(X, y, seed=4), train_probe(X, y, seed=4)
    assert torch.equal(a.direction, b.direction) and a.bias == b.bias
    assert torch.equal(a.test_idx, b.test_idx)
    c = train_probe(X, y, seed=5)
    assert not torch.equal(a.test_idx, c.test_idx)
    train_idx, test_idx = stratified_split(y, 0.25, seed=0)
    assert sorted(torch.cat([train_idx, test_idx]).tolist()) == list(range(101))
    assert int((y[test_idx] == 1).sum()) == round(50 * 0.25) and int((y[test_idx] == 0).sum()) == round(
        51 * 0.25
    )
    full = train_probe(X, y, test_fraction=0)
    assert full.test_accuracy is None and full.train_idx.numel() == 101


def test_clear_errors():
    X, y, _ = planted(n=40)
    with pytest.raises(ProbeError, match="only one class"):
        train_probe(X, torch.ones(40))
    bad = X.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ActivationError, match="NaN"):
        train_probe(bad, y)
    with pytest.raises(ProbeError, match="40 rows but y has 39"):
        train_probe(X, y[:39])
    with pytest.raises(ProbeError, match="too few samples"):
        train_probe(X[:3], torch.tensor([1, 0, 0]))
    with pytest.raises(ProbeError, match="0 or 1"):
        train_probe(X, y * 2)
    with pytest.raises(ProbeError, match="test_fraction"):
        train_probe(X, y, test_fraction=1.0)
    with pytest.raises(ProbeError, match="l2 must be positive"):
        train_probe(X, y, l2=0)
    with pytest.raises(ProbeError, match="matrix"):
        train_probe(X[0], y[:1])
    probe = train_probe(X, y)
    with pytest.raises(ProbeError, match="width 19"):
        probe.predict(X[:, :19])


# ---- on a tiny model ---------------------------------------------------------------------------
HOOK = "blocks.1.hook_resid_post"


def _lm() -> HookedLM:
    return HookedLM(make_model("llama", n_layers=2, hidden=32), make_tokenizer())


def _prompts(words: range, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.choice(words)}" for _ in range(rng.randint(3, 8))) for _ in range(n)]


POS = _prompts(range(0, 10), 60, seed=1)
NEG = _prompts(range(100, 110), 60, seed=2)


def test_probe_activations_pick_the_right_tokens():
    lm = _lm()
    X, y = probe_activations(lm, POS[:3], NEG[:2], HOOK, chat=False)
    assert X.shape == (5, 32) and y.tolist() == [1, 1, 1, 0, 0] and X.dtype == torch.float32
    for i, text in enumerate(POS[:3] + NEG[:2]):  # left padding does not change the last token's state
        ids, mask = encode_left_padded(lm.tokenizer, [text], lm.device)
        alone = lm.capture(ids, [HOOK], attention_mask=mask)[HOOK][0]
        torch.testing.assert_close(X[i], alone[-1], atol=1e-5, rtol=1e-5)
        first, _ = probe_activations(lm, [text], [text], HOOK, position=0, chat=False)
        torch.testing.assert_close(first[0], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="position -20"):
        probe_activations(lm, POS[:2], NEG[:2], HOOK, position=-20, chat=False)
    with pytest.raises(DataError, match="list of prompts"):
        probe_activations(lm, "w1 w2", NEG[:2], HOOK, chat=False)
    with pytest.raises(DataError, match="non-empty"):
        probe_activations(lm, [], NEG[:2], HOOK, chat=False)


def test_activations_are_collected_under_interventions():
    lm = _lm()
    d = torch.randn(32, generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_pre"
    X, _ = probe_activations(lm, POS[:6], NEG[:6], hook, chat=False)
    Xa, _ = probe_activations(
        lm, POS[:6], NEG[:6], hook, chat=False, interventions=ablation(lm, d, layers=[1])
    )
    torch.testing.assert_close(Xa, project_out(X, d), atol=1e-5, rtol=1e-5)


def test_ablation_check_on_a_tiny_model():
    lm = _lm()
    noise = torch.randn(32, generator=torch.Generator().manual_seed(9))
    check = ablation_check(lm, POS, NEG, HOOK, {"random": noise}, chat=False, l2=1e-3)
    assert check.chance == 0.5 and check.clean.test_accuracy >= 0.9
    rows = {a.name: a for a in check.ablated}
    assert list(rows) == ["probe", "mean_difference", "random"]
    for row in rows.values():  # ablated at every write: no residual state keeps the direction
        assert row.max_abs_projection < 1e-4
    # The probe reads only its own direction: ablating it leaves the probe at chance.
    assert abs(rows["probe"].original_probe_accuracy - check.chance) <= 0.1
    # Projecting the training mean difference out at the hook leaves equal class means: no linear signal.
    assert abs(rows["mean_difference"].projected_retrained_accuracy - check.chance) <= 0.1
    # An unrelated direction leaves the distinction (and the probe) intact.
    assert rows["random"].original_probe_accuracy >= 0.85 and rows["random"].retrained_test_accuracy >= 0.85
    assert rows["random"].projected_retrained_accuracy >= 0.85
    assert "retrained probe" in check.table() and check.to_dict()["ablated"][0]["name"] == "probe"


def test_adding_the_probe_direction_moves_prompts_across_the_boundary():
    lm = _lm()
    X, y = probe_activations(lm, POS, NEG, HOOK, chat=False)
    probe = train_probe(X, y, hook=HOOK, l2=1e-3)
    diff = class_mean_difference(X, y)
    before = fraction_predicted(lm, probe, NEG, label=1, chat=False)
    assert before <= 0.2
    push = [AddVector(HOOK, vector=diff, alpha=3.0)]
    assert fraction_predicted(lm, probe, NEG, label=1, interventions=push, chat=False) == 1.0
    assert (
        fraction_predicted(
            lm, probe, NEG, label=1, interventions=[AddVector(HOOK, vector=diff, alpha=0.0)], chat=False
        )
        == before
    )
    with pytest.raises(ProbeError, match="hook"):
        fraction_predicted(lm, train_probe(X, y), NEG, chat=False)
