"""Sparse-feature-circuit node effects and faithfulness on a tiny random model: IG agrees with exact
patching (and AtP roughly), faithfulness is 1 for the whole model and 0 for the empty circuit, and the
curve has a point per threshold."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits.attribution import (
    NodeEffects,
    Nodes,
    Submodule,
    clean_gradients,
    decompose,
    join,
    mean_nodes,
    node_effects,
    split,
)
from saelab.circuits.edges import edge_effects
from saelab.circuits.faithfulness import (
    ablated_metric,
    circuit_at,
    faithfulness_curve,
    nodes_needed,
)
from saelab.core.models import HookedLM
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.errors import DataError
from tests.helpers import make_model, make_tokenizer

HIDDEN = 16
HOOKS = [
    "blocks.0.hook_resid_post",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_post",
]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    lm = HookedLM(make_model("llama", n_layers=2, hidden=HIDDEN).double(), make_tokenizer())
    subs = []
    for i, hook in enumerate(HOOKS):
        sae = build_dictionary(
            DictionaryConfig("jumprelu", d_in=HIDDEN, d_sae=24, hook_name=hook, seed=i)
        ).double()
        with torch.no_grad():
            sae.log_threshold.fill_(torch.tensor(0.05).log())
            sae.b_enc.uniform_(-0.1, 0.2)
        subs.append(Submodule(hook, sae))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(4, 40, (3, 6), generator=g)
    patch = clean.clone()
    patch[:, 2] = torch.randint(4, 40, (3,), generator=g)  # the pair differs in one token

    def metric(logits):
        return logits[:, -1, 7] - logits[:, -1, 9]

    return lm, subs, clean, patch, metric


def test_the_spliced_model_is_the_model(setup):
    lm, subs, clean, _, metric = setup
    nodes = decompose(lm, subs, clean)
    circuit = circuit_at(NodeEffects("x", {h: n.features[0] for h, n in nodes.items()},
                                     {h: n.error[0, :, 0] for h, n in nodes.items()}), -1.0)  # fmt: skip
    everything = ablated_metric(lm, subs, metric, clean, mean_nodes(nodes), circuit)
    with torch.no_grad():
        model = float(metric(lm.forward(clean)).mean())
    assert everything == pytest.approx(model, abs=1e-10)


def test_ig_agrees_with_exact_patching(setup):
    lm, subs, clean, patch, metric = setup
    exact = node_effects(lm, subs, metric, clean, patch, method="exact")
    ig = node_effects(lm, subs, metric, clean, patch, method="ig", steps=10)
    atp = node_effects(lm, subs, metric, clean, patch, method="atp")
    e, i, a = exact.flat(), ig.flat(), atp.flat()
    top = e.abs().argsort(descending=True)[:30]
    assert (e[top] != 0).all()
    rho = spearman(i[top], e[top])
    assert rho >= 0.8, rho
    assert spearman(a[top], e[top]) > 0.5, spearman(a[top], e[top])  # cruder, but pointing the same way
    # positions before the patched token see identical inputs: every effect there is exactly zero
    for hook in HOOKS:
        assert exact.features[hook][:2].abs().max() == 0 and ig.features[hook][:2].abs().max() == 0


def test_faithfulness_is_one_for_the_model_and_zero_for_the_empty_circuit(setup):
    lm, subs, clean, patch, metric = setup
    effects = node_effects(lm, subs, metric, clean, patch, method="ig")
    means = mean_nodes(decompose(lm, subs, clean))
    thresholds = [float(t) for t in torch.logspace(-6, 1, 12)]
    points, ends = faithfulness_curve(
        lm, subs, metric, clean, effects, means, thresholds=[*thresholds, -1.0, 1e9]
    )
    by_threshold = {p.threshold: p for p in points}
    assert len(points) == 14 and ends["full"] != ends["empty"]
    assert by_threshold[-1.0].faithfulness == pytest.approx(1.0, abs=1e-9)  # every node kept
    assert by_threshold[-1.0].completeness == pytest.approx(0.0, abs=1e-9)
    assert by_threshold[1e9].faithfulness == pytest.approx(0.0, abs=1e-9) and by_threshold[1e9].n_nodes == 0
    assert by_threshold[1e9].completeness == pytest.approx(1.0, abs=1e-9)
    sizes = [p.n_nodes for p in points]
    assert sizes == sorted(sizes)  # thresholds descend, circuits grow
    needed = nodes_needed(points, 0.8)
    assert needed is not None and needed <= by_threshold[-1.0].n_nodes
    summed = effects.summed()
    assert summed.features[HOOKS[0]].shape == (24,) and summed.errors[HOOKS[0]].shape == ()
    points, _ = faithfulness_curve(lm, subs, metric, clean, summed, means)  # default: 12 thresholds
    assert len(points) == 12


def test_zero_and_mean_ablation_and_bad_input(setup):
    lm, subs, clean, patch, metric = setup
    zero = node_effects(lm, subs, metric, clean, method="atp", ablation="zero")
    assert zero.flat().abs().max() > 0
    means = mean_nodes(decompose(lm, subs, clean))
    mean = node_effects(lm, subs, metric, clean, method="atp", ablation="mean", means=means)
    assert mean.flat().abs().max() > 0
    with pytest.raises(DataError, match="needs patch inputs"):
        node_effects(lm, subs, metric, clean, method="atp")
    with pytest.raises(DataError, match="needs the nodes' means"):
        node_effects(lm, subs, metric, clean, method="atp", ablation="mean")
    with pytest.raises(DataError, match="unknown attribution method"):
        node_effects(lm, subs, metric, clean, patch, method="gradient")
    with pytest.raises(DataError, match="same length"):
        node_effects(lm, subs, metric, clean, patch[:, :5])


def test_each_edge_is_the_direct_effect_through_its_downstream_node(setup):
    """Edge u -> d = w_d . dd/du . du with the hooks between held at their clean values: checked against
    a finite-difference intervention on u in that frozen model."""
    lm, subs, clean, patch, metric = setup
    up, down = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"  # between: attn_out 1 (held)
    nodes = decompose(lm, subs, clean)
    target_nodes = decompose(lm, subs, patch)
    weight = clean_gradients(lm, [s for s in subs if s.hook == down], metric, clean)[down]
    # the metric reads the last position, and the last layer's other positions cannot reach it
    active = nodes[down].features[0, 5].nonzero().flatten().tolist()[:3]
    targets = [(5, j) for j in active] + [(5, -1)]
    edges = edge_effects(lm, subs, metric, up, down, targets, clean, patch)
    held = lm.capture(clean, [h for h in HOOKS if h not in (up, down)])
    by_hook = {s.hook: s for s in subs}

    def downstream_value(upstream_nodes, pos, latent):
        patches = {up: lambda _x: join(by_hook[up].dictionary, upstream_nodes)}
        patches.update({h: (lambda _x, v=v: v) for h, v in held.items() if h == "blocks.1.hook_attn_out"})
        with torch.no_grad(), lm.patch(patches):
            x = lm.capture(clean, [down])[down]
        d = split(by_hook[down].dictionary, x)
        if latent >= 0:
            return (weight.features[:, pos, latent] * d.features[:, pos, latent]).mean()
        return (weight.error[:, pos] * d.error[:, pos]).sum(-1).mean()

    eps = 1e-4  # rotary embeddings stay float32 in a float64 model: smaller steps drown in its rounding
    u0, u1 = nodes[up], target_nodes[up]
    checked = 0
    for (pos, latent), edge in edges.items():
        base = downstream_value(u0, pos, latent)
        strongest = edge.features.abs().flatten().argsort(descending=True)[:3].tolist()
        for flat in strongest:
            t, j = divmod(flat, edge.features.shape[1])
            moved = Nodes(u0.features.clone(), u0.error)
            moved.features[:, t, j] += eps * (u1.features[:, t, j] - u0.features[:, t, j])
            measured = (downstream_value(moved, pos, latent) - base) / eps
            assert float(edge.features[t, j]) == pytest.approx(float(measured), rel=2e-3, abs=1e-8)
            checked += 1
        t = int(edge.error.abs().argmax())
        moved = Nodes(u0.features, u0.error.clone())
        moved.error[:, t] += eps * (u1.error[:, t] - u0.error[:, t])
        measured = (downstream_value(moved, pos, latent) - base) / eps
        assert float(edge.error[t]) == pytest.approx(float(measured), rel=2e-3, abs=1e-8)
    assert checked == 3 * len(targets)
    assert all(edge.features.abs().max() > 0 for edge in edges.values())
    with pytest.raises(DataError, match="does not come before"):
        edge_effects(lm, subs, metric, down, up, targets, clean, patch)
