"""saelab.toy.tms: geometry on hand-built W, the model and trainer, and the paper's physics on quick runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.errors import SaelabError, ToyConfigError
from saelab.toy.tms import (
    PHASES,
    TMSConfig,
    ToyModel,
    feature_dimensionality,
    feature_norms,
    polygon_angles,
    reconstruction_loss,
    represented,
    run_all,
    sample_features,
    superposition_interference,
    train_toy_model,
)
from saelab.toy.tms.train import _set_loss_gradients


def _polygon(k: int, offset_deg: float = 17.0, radius: float = 1.0) -> torch.Tensor:
    """W [2, k]: k unit columns at equal angles, i.e. a regular k-gon."""
    angles = torch.deg2rad(torch.tensor([offset_deg + 360.0 * i / k for i in range(k)], dtype=torch.float64))
    return radius * torch.stack([angles.cos(), angles.sin()])


# ----------------------------------------------------------------------------- analysis on hand-built W


@pytest.mark.parametrize(
    ("W", "expected"),
    [
        (torch.eye(3, dtype=torch.float64), 1.0),  # orthogonal features: a dimension each
        (torch.tensor([[1.0, -1.0]], dtype=torch.float64), 1 / 2),  # antipodal pair
        (_polygon(3), 2 / 3),  # triangle
        (_polygon(5), 2 / 5),  # pentagon
        (_polygon(4), 1 / 2),  # square = two antipodal pairs
    ],
)
def test_feature_dimensionality_of_known_geometries(W, expected):
    assert torch.allclose(feature_dimensionality(W), torch.full((W.shape[1],), expected, dtype=W.dtype))


def test_feature_dimensionality_is_zero_for_a_missing_feature_and_batches():
    W = torch.cat([_polygon(3), torch.zeros(2, 1, dtype=torch.float64)], dim=1)  # triangle + a dead feature
    dims = feature_dimensionality(W)
    assert dims[3] == 0 and torch.allclose(dims[:3], torch.full((3,), 2 / 3, dtype=W.dtype))
    batch = torch.stack([_polygon(5), 2.0 * _polygon(5, offset_deg=40)])  # [instances, m, n]; scale-free
    assert torch.allclose(feature_dimensionality(batch), torch.full((2, 5), 0.4, dtype=W.dtype))


def test_interference_norms_and_represented():
    pentagon = _polygon(5)
    assert torch.allclose(superposition_interference(torch.eye(2)), torch.zeros(2), atol=1e-7)
    assert torch.allclose(superposition_interference(torch.tensor([[1.0, -1.0]])), torch.ones(2))
    neighbours = 2 * (math.cos(math.radians(72)) ** 2 + math.cos(math.radians(144)) ** 2)
    assert torch.allclose(
        superposition_interference(pentagon), torch.full((5,), neighbours, dtype=torch.float64)
    )
    dropped = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.0]])  # an orthogonal pair plus a leftover weight
    assert superposition_interference(dropped)[0] > 0.03
    kept = represented(dropped)
    assert torch.allclose(superposition_interference(dropped, among=kept)[:2], torch.zeros(2))
    W = torch.tensor([[0.3, 0.0, 2.0], [0.3, 0.6, 0.0]])
    assert torch.allclose(feature_norms(W), torch.tensor([math.sqrt(0.18), 0.6, 2.0]))
    assert represented(W).tolist() == [False, True, True]
    assert represented(W, threshold=0.1).tolist() == [True, True, True]


def test_polygon_angles_on_hand_built_polygons():
    shuffled = _polygon(5, offset_deg=-130.0)[:, torch.tensor([3, 0, 4, 1, 2])]
    assert torch.allclose(polygon_angles(shuffled), torch.full((5,), 72.0, dtype=torch.float64))
    square = torch.cat([_polygon(4, offset_deg=10.0), 0.1 * _polygon(2)], dim=1)  # small extras are ignored
    assert torch.allclose(polygon_angles(square), torch.full((4,), 90.0, dtype=torch.float64))
    orthogonal = torch.tensor([[1.0, 0.0, 0.01], [0.0, 1.0, 0.0]])
    assert torch.allclose(polygon_angles(orthogonal), torch.tensor([90.0, 270.0], dtype=torch.float64))
    assert polygon_angles(torch.tensor([[1.0, 0.0], [0.0, 0.2]])).numel() == 0
    with pytest.raises(ValueError, match="2 hidden dimensions"):
        polygon_angles(torch.eye(3))


# ----------------------------------------------------------------------------- data, model, trainer


def test_sample_features_density_and_values():
    probabilities = torch.tensor([1.0, 0.3, 0.02])
    x = sample_features(20_000, probabilities, 5, torch.Generator().manual_seed(0))
    assert x.shape == (3, 20_000, 5)
    active = x > 0
    assert torch.allclose(active.float().mean((1, 2)), probabilities, atol=0.01)
    assert x.max() <= 1.0 and x.min() >= 0.0
    for instance in range(3):  # active values are U[0, 1]: mean 1/2, variance 1/12
        values = x[instance][active[instance]]
        assert abs(values.mean() - 0.5) < 0.02 and abs(values.var() - 1 / 12) < 0.01
    again = sample_features(20_000, probabilities, 5, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_closed_form_gradients_match_autograd():
    model = ToyModel(n_instances=3, n_features=6, n_hidden=2, seed=4)
    with torch.no_grad():
        model.b.normal_(0.0, 0.3)
    x = sample_features(64, torch.tensor([1.0, 0.4, 0.1]), 6, torch.Generator().manual_seed(1))
    importance = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    reconstruction_loss(model, x, importance).sum().backward()
    expected_W, expected_b = model.W.grad.clone(), model.b.grad.clone()
    _set_loss_gradients(model, x, importance, (torch.empty_like(x), torch.empty_like(x)))
    assert torch.allclose(model.W.grad, expected_W, atol=1e-6)
    assert torch.allclose(model.b.grad, expected_b, atol=1e-6)


def test_model_shapes_hidden_and_forward():
    model = ToyModel(n_instances=4, n_features=5, n_hidden=2, seed=0)
    x = torch.rand(4, 7, 5)
    assert model.hidden(x).shape == (4, 7, 2)
    manual = torch.relu(torch.einsum("imn,ibm->ibn", model.W, model.hidden(x)) + model.b.unsqueeze(1))
    assert torch.allclose(model(x), manual, atol=1e-6)


def test_training_is_reproducible_and_seeded():
    cfg = TMSConfig(feature_probabilities=[1.0, 0.1], steps=60, batch_size=128)
    first, second = train_toy_model(cfg), train_toy_model(cfg)
    assert torch.equal(first.W, second.W) and torch.equal(first.b, second.b)
    other = train_toy_model(TMSConfig(feature_probabilities=[1.0, 0.1], steps=60, batch_size=128, seed=1))
    assert not torch.equal(first.W, other.W)


def test_config_importance_forms_and_validation():
    assert torch.allclose(
        TMSConfig(feature_probabilities=[1.0]).importance_matrix()[0, 2], torch.tensor(0.81)
    )
    shared = TMSConfig(n_features=2, feature_probabilities=[1.0, 0.5], importance=[1.0, 3.0])
    assert shared.importance_matrix().tolist() == [[1.0, 3.0], [1.0, 3.0]]
    per_instance = TMSConfig(
        n_features=2, feature_probabilities=[1.0, 0.5], importances=[[1.0, 2.0], [1.0, 4.0]]
    )
    assert per_instance.importance_matrix()[1, 1] == 4.0
    assert per_instance.to_dict()["importances"] == [[1.0, 2.0], [1.0, 4.0]]
    with pytest.raises(ToyConfigError, match="expected"):
        TMSConfig(n_features=3, feature_probabilities=[1.0], importance=[1.0, 2.0]).importance_matrix()
    with pytest.raises(ToyConfigError, match="lr_schedule"):
        train_toy_model(TMSConfig(steps=1, lr_schedule="linear"))
    with pytest.raises(ToyConfigError, match=r"\(0, 1\]"):
        train_toy_model(TMSConfig(steps=1, feature_probabilities=[0.5, 0.0]))
    assert issubclass(ToyConfigError, SaelabError) and issubclass(ToyConfigError, ValueError)


# ----------------------------------------------------------------------------- the paper's results, quick runs


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tms")
    return out_dir, run_all(out_dir, quick=True, seed=0)


def test_every_experiment_writes_its_json_and_png(quick):
    out_dir, results = quick
    assert set(results) == {"superposition_n5_m2", "superposition_n20_m5", "phase_diagram", "dimensionality"}
    for name, result in results.items():
        written = json.loads((out_dir / f"{name}.json").read_text())
        assert written["name"] == name and written["wall_seconds"] > 0 and "config" in written
        assert (out_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads(json.dumps(result)) == written


def _sweep(results, density):
    sweep = results["superposition_n5_m2"]
    k = sweep["config"]["densities"].index(density)
    return sweep["per_density"][k], sweep["instances"][k]


def test_dense_inputs_keep_exactly_the_two_most_important_features_orthogonal(quick):
    summary, instances = _sweep(quick[1], 1.0)
    best = instances[summary["best_seed"]]
    assert best["represented"] == [0, 1]
    assert best["max_abs_cos_represented"] < 0.05  # orthogonal: angles within ~3 degrees of 90
    assert sum(inst["represented"] == [0, 1] for inst in instances) > len(instances) / 2


@pytest.mark.parametrize("density", [0.1, 0.03, 0.01])
def test_sparse_inputs_pack_four_or_five_features_into_regular_polygons(quick, density):
    summary, instances = _sweep(quick[1], density)
    for inst in instances:
        assert inst["n_represented"] >= 4
        gaps = torch.tensor(inst["angles"])
        # 4 represented: two antipodal pairs at 90 degrees; 5: a pentagon, 72 degrees apart.
        assert torch.allclose(gaps, torch.full_like(gaps, 360.0 / inst["n_represented"]), atol=4.0)
    if density == 0.01:
        assert summary["n_all_represented"] >= len(instances) // 2


def test_wider_sweep_represents_more_features_when_sparse(quick):
    sweep = quick[1]["superposition_n20_m5"]
    counts = {s["density"]: max(s["n_represented"]) for s in sweep["per_density"]}
    assert counts[1.0] <= 6 and counts[0.01] >= 15


def test_phase_diagram_one_extra_feature(quick):
    result = quick[1]["phase_diagram"]
    cells = {(c["density"], round(c["relative_importance"], 2)): c for row in result["grid"] for c in row}
    assert set(result["phases"]) == set(PHASES)
    assert cells[(1.0, 0.1)]["phase"] == "not represented"
    assert cells[(1.0, 3.16)]["phase"] == "dedicated dimension"
    assert cells[(1.0, 10.0)]["phase"] == "dedicated dimension"
    assert cells[(0.03, 1.0)]["phase"] == "superposition"
    assert cells[(0.01, 1.0)]["phase"] == "superposition"


def test_dimensionality_falls_with_sparsity_and_sticks_at_one_half(quick):
    result = quick[1]["dimensionality"]
    per_density = result["per_density"]
    dims_per_feature = [p["dims_per_feature"] for p in per_density]
    assert abs(dims_per_feature[0] - 1.0) < 0.1  # dense: ||W||_F^2 = m
    assert all(b <= a + 0.02 for a, b in zip(dims_per_feature, dims_per_feature[1:], strict=False))
    antipodal = next(p for p in per_density if p["inverse_density"] == 2.5)
    pairs = zip(antipodal["dimensionalities"], antipodal["norms"], strict=True)
    represented_dims = [d for d, norm in pairs if norm > 0.5]
    assert len(represented_dims) >= 4 and all(abs(d - 0.5) < 0.03 for d in represented_dims)
    assert result["sizes"]["n_features"] == len(per_density[0]["dimensionalities"])
