"""Decomposition of vectors into decoder rows: planted recovery, constraints, errors, batching."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.errors import ActivationError, DimensionMismatchError
from saelab.interventions.decompose import (
    Decomposition,
    DecompositionError,
    decompose,
    encoder_then_refine,
    gradient_pursuit,
)

HOOK = "blocks.3.hook_resid_post"


def make_sae(architecture="topk", d_in=64, d_sae=512, seed=0, tied=True):
    """A random dictionary: unit decoder rows (x0.1 for relu), encoder W_dec^T when tied."""
    sae = build_dictionary(
        DictionaryConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, k=8, hook_name=HOOK, seed=seed)
    )
    if tied:
        with torch.no_grad():
            sae.W_enc.copy_(sae.W_dec.t())
    return sae


def planted(sae, seed, n=5, low=0.5, high=3.0):
    """A non-negative combination of n decoder rows: (indices, coefficients, vector)."""
    g = torch.Generator().manual_seed(1000 + seed)
    idx = torch.randperm(sae.d_sae, generator=g)[:n]
    coef = low + (high - low) * torch.rand(n, generator=g)
    return idx, coef, coef @ sae.W_dec.detach()[idx]


def assert_recovered(result: Decomposition, idx, coef):
    assert result.cosine >= 0.99
    ranked = [f.index for f in result.features]
    assert set(ranked[:5]) == set(idx.tolist())
    got = {f.index: f.coefficient for f in result.features[:5]}
    torch.testing.assert_close(torch.tensor([got[i] for i in idx.tolist()]), coef, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
@pytest.mark.parametrize("seed", range(5))
def test_pursuit_recovers_planted_combination(architecture, seed):
    # relu decoder rows have norm 0.1: coefficients must come back in those units, not unit-row units.
    sae = make_sae(architecture, seed=seed)
    idx, coef, v = planted(sae, seed)
    result = decompose(sae, v, n_features=5, method="pursuit")
    assert_recovered(result, idx, coef)
    assert result.cosine > 0.999999 and result.residual_norm < 1e-4 * v.norm()
    coefs = [f.coefficient for f in result.features]
    assert coefs == sorted(coefs, reverse=True)  # equal row norms: ranked by coefficient
    # Asking for more features than planted still puts the planted five first.
    assert_recovered(decompose(sae, v, n_features=12), idx, coef)


@pytest.mark.parametrize("candidates", [None, 20])
@pytest.mark.parametrize("seed", range(5))
def test_encoder_then_refine_recovers_planted_combination(seed, candidates):
    # One encoder read ranks row i by c_i plus interference of std ~|v|/sqrt(d_in): at d_in=64 with
    # 512 random rows the smallest planted rows often rank outside the candidates (pursuit, which
    # re-reads the residual, does not have this problem), so the encoder is tested where rows are
    # near-orthogonal (d_in=1024) with a tied encoder W_enc = W_dec^T.
    sae = make_sae("topk", d_in=1024, seed=seed)
    idx, coef, v = planted(sae, seed)
    assert_recovered(decompose(sae, v, n_features=5, method="encoder", candidates=candidates), idx, coef)


def test_encoder_then_refine_ignores_b_dec_and_b_enc():
    # A direction is decomposed, not an activation: biases must not change the answer.
    sae = make_sae("relu", d_in=1024)
    idx, coef, v = planted(sae, 0)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.fill_(-100.0)  # encode() would fire nothing
    assert_recovered(decompose(sae, v, 5, method="encoder"), idx, coef)
    assert_recovered(decompose(sae, v, 5, method="pursuit"), idx, coef)


@pytest.mark.parametrize("method", ["pursuit", "encoder"])
def test_nonnegativity(method):
    sae = make_sae()
    g = torch.Generator().manual_seed(3)
    v = torch.randn(8, 64, generator=g)
    fn = gradient_pursuit if method == "pursuit" else encoder_then_refine
    first = sae.W_dec if method == "pursuit" else sae
    coeffs = fn(first, v, 20)
    assert coeffs.shape == (8, 512)
    assert (coeffs >= 0).all() and ((coeffs != 0).sum(1) <= 20).all()
    assert (coeffs != 0).any(1).all()
    # Without the constraint, signed coefficients appear.
    assert (fn(first, v, 20, nonneg=False) < 0).any()


def test_nothing_to_add_gives_an_honest_empty_decomposition():
    # No decoder row points along -v's positive side: no features, cosine 0, the whole vector left.
    sae = build_dictionary(DictionaryConfig(architecture="topk", d_in=4, d_sae=4, k=1, hook_name=HOOK))
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4))
    v = -torch.ones(4)
    for method in ("pursuit", "encoder"):
        result = decompose(sae, v, 3, method=method)
        assert result.features == [] and result.cosine == 0.0
        assert result.residual_norm == pytest.approx(2.0) and not result.reconstruction.any()
    assert len(decompose(sae, v, 3, nonneg=False).features) == 3


def test_signed_combination_recovered_without_nonneg():
    sae = make_sae()
    idx, coef, _ = planted(sae, 7)
    coef = coef * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    v = coef @ sae.W_dec.detach()[idx]
    c = gradient_pursuit(sae.W_dec, v, 5, nonneg=False)
    torch.testing.assert_close(c[idx], coef, rtol=1e-4, atol=1e-5)
    assert (c != 0).sum() == 5
    # The non-negative decomposition cannot use negative rows and says so by a lower cosine.
    result = decompose(sae, v, 5)
    assert all(f.coefficient > 0 for f in result.features) and result.cosine < 0.99


def test_refit_is_the_exact_nnls_optimum():
    # KKT conditions on the encoder's candidates: zero gradient where a coefficient is positive,
    # and no candidate held at 0 that would reduce the residual by growing.
    sae = make_sae()
    V = torch.randn(6, 64, generator=torch.Generator().manual_seed(21))
    D = sae.W_dec.detach().double()
    for n in (5, 30, 100):
        C = encoder_then_refine(sae, V, n).double()
        for v, c in zip(V.double(), C, strict=True):
            candidates = (v @ sae.W_enc.detach().double()).topk(n).indices
            grad = D[candidates] @ (c @ D - v)
            positive = c[candidates] > 0
            assert grad[positive].abs().max() < 1e-4
            assert grad[~positive].min() > -1e-4 if (~positive).any() else True
            assert set(c.nonzero().flatten().tolist()) <= set(candidates.tolist())


@pytest.mark.parametrize("method", ["pursuit", "encoder"])
def test_more_features_never_increase_the_residual(method):
    sae = make_sae()
    g = torch.Generator().manual_seed(5)
    for v in torch.randn(3, 64, generator=g):
        residuals = [decompose(sae, v, n, method=method).residual_norm for n in range(1, 41)]
        for a, b in pairwise(residuals):
            assert b <= a * (1 + 1e-9) + 1e-9


def test_report_figures_and_links():
    sae = make_sae("relu")
    idx, coef, v = planted(sae, 2)
    noisy = v + 0.05 * v.norm() * torch.randn(64, generator=torch.Generator().manual_seed(99)) / 8
    result = decompose(sae, noisy, 8, feature_url="http://127.0.0.1:8000/feature/{index}")
    assert 0.9 < result.cosine < 1.0 and len(result.features) <= 8
    # Shares add up to the part of the vector the reconstruction explains along it.
    explained = float(result.reconstruction @ noisy / noisy.norm() ** 2)
    assert sum(f.share for f in result.features) == pytest.approx(explained, rel=1e-5)
    assert result.residual_norm == pytest.approx(float((noisy - result.reconstruction).norm()), rel=1e-5)
    f0 = result.features[0]
    assert f0.url == f"http://127.0.0.1:8000/feature/{f0.index}"
    row = sae.W_dec.detach()[f0.index]
    assert f0.cosine == pytest.approx(float(torch.cosine_similarity(row, noisy, dim=0)), rel=1e-5)
    data = json.loads(json.dumps(result.to_dict()))
    assert (
        data["method"] == "pursuit"
        and data["hook_name"] == HOOK
        and len(data["features"]) == len(result.features)
    )
    md, text = result.table(), result.table(markdown=False)
    assert f"[{f0.index}](http://127.0.0.1:8000/feature/{f0.index})" in md and "cosine" in md
    assert f"http://127.0.0.1:8000/feature/{f0.index}" in text and "|" not in text


def test_batched_equals_per_vector():
    sae = make_sae()
    g = torch.Generator().manual_seed(11)
    vs = torch.randn(5, 64, generator=g)
    vs[0] = planted(sae, 0)[2]
    for fn, first in [(gradient_pursuit, sae.W_dec), (encoder_then_refine, sae)]:
        batched = fn(first, vs, 10)
        single = torch.stack([fn(first, v, 10) for v in vs])
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
        assert torch.equal(batched != 0, single != 0)
    results = decompose(sae, vs, 10)
    assert isinstance(results, list) and len(results) == 5
    assert [f.index for f in results[2].features] == [f.index for f in decompose(sae, vs[2], 10).features]


def test_errors_name_the_problem_and_the_fix():
    sae = make_sae()
    with pytest.raises(DimensionMismatchError, match=rf"d_in=64.*{HOOK}"):
        decompose(sae, torch.randn(65))
    with pytest.raises(DimensionMismatchError, match="width 64"):
        decompose(sae, torch.randn(2, 3, 64))
    with pytest.raises(ActivationError, match="NaN or inf"):
        decompose(sae, torch.full((64,), float("nan")))
    with pytest.raises(ActivationError, match="NaN or inf"):
        gradient_pursuit(sae.W_dec, torch.tensor([float("inf")] + [0.0] * 63), 3)
    with pytest.raises(DecompositionError, match="all zeros"):
        decompose(sae, torch.zeros(64))
    with pytest.raises(DecompositionError, match=r"rows \[1\]"):
        encoder_then_refine(sae, torch.stack([torch.ones(64), torch.zeros(64)]), 3)
    for bad in (0, -1, 513, 2.5):
        with pytest.raises(DecompositionError, match="n_features must be .* d_sae=512"):
            decompose(sae, torch.randn(64), n_features=bad)
    with pytest.raises(DecompositionError, match="candidates"):
        encoder_then_refine(sae, torch.randn(64), 5, candidates=4)
    with pytest.raises(DecompositionError, match="unknown decomposition method"):
        decompose(sae, torch.randn(64), method="lasso")
    transcoder = build_dictionary(
        DictionaryConfig(
            d_in=64, d_sae=512, d_out=32, hook_name=HOOK, output_hook_name="blocks.3.hook_mlp_out"
        )
    )
    with pytest.raises(DimensionMismatchError, match="d_out=32.*hook_mlp_out"):
        decompose(transcoder, torch.randn(64))
    with pytest.raises(DecompositionError, match="method='pursuit'"):
        decompose(transcoder, torch.randn(32), method="encoder")
    assert len(decompose(transcoder, torch.randn(32), 4).features) <= 4
