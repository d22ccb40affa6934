"""The dictionary families: exact sparse gradients, folding, learning, thresholds, norms, errors.

Everything is tiny and seeded; float64 is used wherever values are compared to a reference.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from saelab.dictionaries import (
    ARCHITECTURES,
    FAMILIES,
    DictionaryConfig,
    StepContext,
    build_dictionary,
    family,
)
from saelab.dictionaries.base import geometric_median
from saelab.dictionaries.families.jumprelu import _JumpReLU, _Step
from saelab.dictionaries.kernels import selected_preacts, sparse_decode
from saelab.errors import ActivationError, DimensionMismatchError, SaelabError

F64 = torch.float64
# The families that read one hook point; the cross-layer ones (clt, clt_batchtopk) are in test_clt.py.
SINGLE_HOOK = [name for name, fam in FAMILIES.items() if not fam.cross_layer]


def sparse_data(n: int, d: int = 32, n_features: int = 64, active: int = 3, seed: int = 0) -> torch.Tensor:
    """`active` of `n_features` fixed unit directions per sample, magnitudes U[0.5, 1.5], plus an offset.

    The directions and offset depend only on d and n_features; `seed` draws the samples.
    """
    fixed = torch.Generator().manual_seed(1000 + d)
    directions = F.normalize(torch.randn(n_features, d, generator=fixed), dim=1)
    offset = 0.3 * torch.randn(d, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    which = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, n_features).scatter_(1, which, torch.rand(n, active, generator=g) + 0.5)
    return codes @ directions + offset


def fvu(recon: torch.Tensor, x: torch.Tensor) -> float:
    return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def perturbed(sae, seed: int = 0, scale: float = 0.1):
    """Add noise to every parameter (so nothing sits at its initial symmetric value)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(scale * torch.randn(param.shape, generator=g, dtype=param.dtype))
    return sae


# ---- 1. sparse TopK / BatchTopK gradients equal dense autograd ---------------------------------


def dense_reference_loss(sae, x, dead_mask):
    """The TopK/BatchTopK loss written densely: every latent in the graph, plain autograd."""
    cfg = sae.cfg
    xn, yn = x * sae.input_scale, x * sae.output_scale
    xin = xn - sae.b_dec if cfg.apply_b_dec_to_input else xn
    pre = xin @ sae.W_enc + sae.b_enc
    if cfg.architecture == "topk":
        values, indices = pre.topk(cfg.k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
    else:
        acts = F.relu(pre)
        keep = torch.zeros(acts.numel(), dtype=torch.bool)
        keep[acts.detach().reshape(-1).topk(cfg.k * x.shape[0]).indices] = True
        latents = acts * keep.reshape(acts.shape)
    recon = latents @ sae.W_dec + sae.b_dec
    loss = (recon - yn).pow(2).sum() / (yn - yn.mean(0)).pow(2).sum()
    if dead_mask is not None:
        residual = (yn - recon).detach()
        n_dead = int(dead_mask.sum())
        k_aux = min(cfg.resolved_aux_k, n_dead)
        indices = pre.detach().masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=-1).indices
        aux_latents = torch.zeros_like(pre).scatter(-1, indices, F.relu(pre.gather(-1, indices)))
        estimate = aux_latents @ sae.W_dec
        aux = (estimate - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        loss = loss + cfg.aux_coefficient * min(n_dead / cfg.resolved_aux_k, 1.0) * aux
    return loss


def grads(sae, loss) -> dict[str, torch.Tensor]:
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    values = torch.autograd.grad(loss, [getattr(sae, name) for name in names])
    return dict(zip(names, values, strict=True))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("dead", ["none", "few", "many"])
def test_sparse_topk_gradients_equal_dense_autograd(arch, apply_b_dec, dead):
    cfg = DictionaryConfig(
        architecture=arch, d_in=12, d_sae=48, k=4, aux_k=8, apply_b_dec_to_input=apply_b_dec
    )
    sae = perturbed(build_dictionary(cfg).to(F64), scale=0.3)
    with torch.no_grad():
        sae.input_scale.fill_(1.7)
        sae.output_scale.fill_(1.7)
    x = torch.randn(16, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    dead_mask = None
    if dead != "none":
        # "few": 5 dead latents < aux_k, so the AuxK term is scaled by 5/8; "many": 20 >= aux_k.
        dead_mask = torch.zeros(48, dtype=torch.bool)
        dead_mask[
            torch.randperm(48, generator=torch.Generator().manual_seed(2))[: 5 if dead == "few" else 20]
        ] = True

    out = sae.training_loss(x, x, StepContext(dead_mask=dead_mask, progress=0.5))
    reference = dense_reference_loss(sae, x, dead_mask)
    assert out.loss.dtype == F64
    torch.testing.assert_close(out.loss, reference, rtol=1e-10, atol=0)
    if dead != "none":
        assert out.terms["aux"] > 0
    sparse, dense = grads(sae, out.loss), grads(sae, reference)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-9, atol=1e-12, msg=name)
        assert dense[name].abs().max() > 0, name


def test_sparse_gradients_in_float32_match_dense():
    cfg = DictionaryConfig(architecture="topk", d_in=16, d_sae=64, k=5, aux_k=6)
    sae = perturbed(build_dictionary(cfg), scale=0.3)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    dead_mask = torch.arange(64) % 3 == 0
    sparse = grads(sae, sae.training_loss(x, x, StepContext(dead_mask=dead_mask)).loss)
    dense = grads(sae, dense_reference_loss(sae, x, dead_mask))
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-6, msg=name)


def test_selected_preacts_and_sparse_decode_gradients():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 7, dtype=F64, generator=g, requires_grad=True)
    W_enc = torch.randn(7, 30, dtype=F64, generator=g, requires_grad=True)
    b_enc = torch.randn(30, dtype=F64, generator=g, requires_grad=True)
    W_dec = torch.randn(30, 7, dtype=F64, generator=g, requires_grad=True)
    weights = torch.randn(10, 5, dtype=F64, generator=g)
    target = torch.randn(10, 7, dtype=F64, generator=g)

    def loss(values, indices, latents_dense=None):
        decoded = sparse_decode(indices, values, W_dec) if latents_dense is None else latents_dense @ W_dec
        return (values * weights).sum() + (decoded - target).pow(2).sum()

    pre = x @ W_enc + b_enc
    values, indices = pre.topk(5, dim=-1)
    sparse_loss = loss(selected_preacts(x, W_enc, b_enc, indices, values.detach()), indices)
    dense_values = pre.gather(-1, indices)
    dense_latents = torch.zeros_like(pre).scatter(-1, indices, dense_values)
    dense_loss = loss(dense_values, indices, dense_latents)
    torch.testing.assert_close(sparse_loss, dense_loss)
    sparse_grads = torch.autograd.grad(sparse_loss, [x, W_enc, b_enc, W_dec])
    dense_grads = torch.autograd.grad(dense_loss, [x, W_enc, b_enc, W_dec])
    for name, a, b in zip(("x", "W_enc", "b_enc", "W_dec"), sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: selected_preacts(x_, w_, b_, indices, (x_ @ w_ + b_).gather(-1, indices).detach()),
        (x, W_enc, b_enc),
    )


# ---- 2. folding the input/output scales ------------------------------------------------------


@pytest.mark.parametrize("arch", SINGLE_HOOK)
@pytest.mark.parametrize("kind", ["sae", "transcoder", "sae_with_target_scale"])
def test_fold_scales_keeps_encode_and_forward(arch, kind):
    d = 16
    extra = {"output_hook_name": "blocks.0.hook_mlp_out"} if kind == "transcoder" else {}
    cfg = DictionaryConfig(architecture=arch, d_in=d, d_sae=40, k=4, target_l0=4, **extra)
    if kind == "transcoder":
        assert cfg.is_transcoder and cfg.out_dim == d and cfg.apply_b_dec_to_input is False
    sae = build_dictionary(cfg).to(F64)
    x = 5.0 * sparse_data(512, d=d, seed=5).to(F64) + 2.0
    y = x if kind == "sae" else 0.2 * x.flip(-1) - 1.0
    sae.init_from_data(x, y)
    s_in, s_out = sae.input_scale.item(), sae.output_scale.item()
    assert abs(s_in - 1.0) > 0.1 and (kind == "sae") == (s_in == s_out)
    perturbed(sae, seed=6, scale=0.05)
    if arch == "batchtopk":
        sae.threshold.fill_(0.3)
    sae.eval()
    with torch.no_grad():
        latents, recon = sae.encode(x), sae(x)
        sae.fold_scales()
        assert sae.input_scale.item() == 1.0 and sae.output_scale.item() == 1.0
        torch.testing.assert_close(sae.encode(x), latents, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(sae(x), recon, rtol=1e-9, atol=1e-9)
    assert (latents > 0).any()


def test_saelens_tensors_round_trip_through_a_fresh_dictionary():
    for arch in SINGLE_HOOK:
        cfg = DictionaryConfig(architecture=arch, d_in=8, d_sae=24, k=3, target_l0=3)
        sae = build_dictionary(cfg)
        sae.init_from_data(sparse_data(256, d=8), sparse_data(256, d=8))
        perturbed(sae, seed=7)
        sae.fold_scales()
        fresh = build_dictionary(DictionaryConfig(architecture=arch, d_in=8, d_sae=24, k=3, seed=9))
        fresh.load_saelens_tensors(sae.saelens_tensors())
        x = sparse_data(64, d=8, seed=8)
        sae.eval()
        fresh.eval()
        torch.testing.assert_close(fresh(x), sae(x))


# ---- 3. every family learns sparse synthetic data --------------------------------------------

LEARN_SETTINGS = {
    "relu": {"l1_coefficient": 1.0},
    "gated": {"l1_coefficient": 3.0},
    "topk": {"k": 3},
    "batchtopk": {"k": 3},
    "jumprelu": {"target_l0": 4},
}
LEARN_STEPS, LEARN_BATCH, LEARN_LR = 600, 256, 3e-3


@functools.cache
def trained(arch: str):
    """Train one family on the synthetic data; return it with the per-step logged terms."""
    torch.manual_seed(0)
    cfg = DictionaryConfig(architecture=arch, d_in=32, d_sae=128, seed=0, **LEARN_SETTINGS[arch])
    sae = build_dictionary(cfg)
    data = sparse_data(LEARN_STEPS * LEARN_BATCH, seed=1)
    sae.init_from_data(data[:2048], data[:2048])
    optimizer = torch.optim.Adam(sae.parameters(), lr=LEARN_LR)
    history = []
    for step in range(LEARN_STEPS):
        batch = data[step * LEARN_BATCH : (step + 1) * LEARN_BATCH]
        out = sae.training_loss(batch, batch, StepContext(dead_mask=None, progress=step / LEARN_STEPS))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.after_optimizer_step()
        history.append(out.terms)
    sae.eval()
    return sae, history


@pytest.mark.parametrize("arch", list(LEARN_SETTINGS))
def test_each_family_learns_sparse_synthetic_data(arch):
    sae, history = trained(arch)
    held_out = sparse_data(4096, seed=2)
    with torch.no_grad():
        latents, recon = sae.encode(held_out), sae(held_out)
    final_fvu, l0 = fvu(recon, held_out), float((latents > 0).sum(-1).float().mean())
    print(
        f"{arch} {LEARN_SETTINGS[arch]}: fvu {final_fvu:.3f} l0 {l0:.2f} (train fvu {history[-1]['fvu']:.3f})"
    )
    assert final_fvu < 0.15, f"{arch} did not learn: FVU {final_fvu:.3f}"
    low, high = {
        "relu": (2, 16),
        "gated": (2, 16),
        "topk": (3, 3),
        "batchtopk": (2, 4.5),
        "jumprelu": (2.5, 6),
    }[arch]
    assert low <= l0 <= high, f"{arch}: L0 {l0:.2f} outside [{low}, {high}]"
    # It also works on raw activations after folding (what gets saved).
    with torch.no_grad():
        sae.fold_scales()
        torch.testing.assert_close(sae(held_out), recon, rtol=1e-4, atol=1e-4)


# ---- 4. BatchTopK ------------------------------------------------------------------------------


def test_batchtopk_keeps_exactly_k_times_batch_and_threshold_converges():
    sae, history = trained("batchtopk")
    k = sae.cfg.k
    assert all(terms["l0"] == pytest.approx(k) for terms in history)
    thresholds = torch.tensor([terms["threshold"] for terms in history])
    late = thresholds[-100:]
    assert thresholds[0] > 0 and (late.max() - late.min()) / late.mean() < 0.05
    # The inference threshold gives about k latents per token on the training distribution.
    with torch.no_grad():
        l0 = float((sae.encode(sparse_data(4096, seed=3)) > 0).sum(-1).float().mean())
    assert 0.8 * k <= l0 <= 1.2 * k, l0


def test_batchtopk_selection_is_exact_even_when_one_row_holds_most_of_the_batch():
    sae = build_dictionary(DictionaryConfig(architecture="batchtopk", d_in=8, d_sae=64, k=2))
    pre = torch.randn(8, 64, generator=torch.Generator().manual_seed(10))
    pre[0] = pre[0].abs() + 10.0  # row 0 holds all 16 of the batch's top k*B = 16 activations
    sae.train()
    values, indices = sae.select(pre)
    chosen = torch.zeros_like(pre).scatter_add(-1, indices, values)  # padding entries are zeros
    expected_mask = torch.zeros(pre.numel(), dtype=torch.bool)
    expected_mask[F.relu(pre).reshape(-1).topk(16).indices] = True
    torch.testing.assert_close(chosen, F.relu(pre) * expected_mask.reshape(pre.shape))
    assert int((values > 0).sum()) == 16
    assert sae.threshold[0] == pytest.approx(float(pre[0].sort().values[-16]))
    # With fewer positive pre-activations than k*B, all positives are kept.
    values, _ = sae.select(2 * torch.eye(8, 64) - 1)
    assert int((values > 0).sum()) == 8


# ---- 5. JumpReLU straight-through estimator ----------------------------------------------------


def test_jumprelu_threshold_gradient_only_inside_the_bandwidth_window():
    bw, theta = 0.1, torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    log_theta = theta.log().requires_grad_(True)
    pre = torch.tensor(
        [[0.46, 0.80, 2.10], [0.56, 1.20, 1.96], [0.10, 1.049, 3.0], [0.52, 0.90, 1.951]], dtype=F64
    ).requires_grad_(True)
    in_window = ((pre - theta).abs() < bw / 2).to(F64)
    assert in_window.sum(0).tolist() == [2.0, 1.0, 2.0]  # 0.56 / 0.90 / 2.10 are just outside

    l0 = _Step.apply(pre, log_theta, bw).sum(-1).mean()
    assert float(l0.detach()) == (pre > theta).sum(-1).to(F64).mean()
    (grad_log_theta,) = torch.autograd.grad(l0, log_theta)
    torch.testing.assert_close(grad_log_theta, -(1 / bw) * in_window.sum(0) / pre.shape[0] * theta)

    weights = torch.randn(pre.shape, dtype=F64, generator=torch.Generator().manual_seed(11))
    out = _JumpReLU.apply(pre, log_theta, bw)
    torch.testing.assert_close(out, pre * (pre > theta))
    grad_pre, grad_log_theta = torch.autograd.grad((out * weights).sum(), (pre, log_theta))
    torch.testing.assert_close(grad_pre, weights * (pre > theta))
    torch.testing.assert_close(grad_log_theta, (-(theta / bw) * in_window * weights).sum(0) * theta)


def test_jumprelu_training_loss_l0_is_the_true_count_and_far_latents_get_no_threshold_grad():
    cfg = DictionaryConfig(architecture="jumprelu", d_in=16, d_sae=48, target_l0=5, jumprelu_bandwidth=0.05)
    sae = build_dictionary(cfg).to(F64)
    x = sparse_data(256, d=16, seed=12).to(F64)
    sae.init_from_data(x, x)
    with torch.no_grad():
        l0 = sae.training_loss(x, x, StepContext()).terms["l0"]
        assert l0 == pytest.approx(float((sae.encode(x) > 0).sum(-1).to(F64).mean()))
        assert 3 <= l0 <= 8  # the data-driven initial threshold starts near target_l0
        # Latents 0..23: far above every pre-activation. Latents 24..47: just above token 0's.
        x = x[:8]
        pre = sae.preacts(x)
        threshold = torch.cat([torch.full((24,), 100.0, dtype=F64), pre[0, 24:].clamp_min(0.01) + 0.01])
        sae.log_threshold.copy_(threshold.log())
    out = sae.training_loss(x, x, StepContext())
    assert out.terms["l0"] == pytest.approx(float((sae.encode(x) > 0).sum(-1).to(F64).mean()))
    out.loss.backward()
    near = ((pre - threshold).abs() < cfg.jumprelu_bandwidth / 2).any(0)
    assert not near[:24].any() and near[24:].sum() >= 12
    assert (sae.log_threshold.grad[~near] == 0).all()
    assert (sae.log_threshold.grad[near] != 0).all()


# ---- 6. unit-norm decoders -------------------------------------------------------------------


@pytest.mark.parametrize("arch", SINGLE_HOOK)
def test_unit_norm_decoder_rows_and_orthogonal_gradient(arch):
    cfg = DictionaryConfig(architecture=arch, d_in=16, d_sae=40, k=4, target_l0=4)
    sae = build_dictionary(cfg)
    x = sparse_data(128, d=16, seed=13)
    sae.init_from_data(x, x)
    perturbed(sae, seed=14, scale=0.2)
    out = sae.training_loss(x, x, StepContext(progress=0.5))
    out.loss.backward()
    grad_before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    rows = F.normalize(sae.W_dec.detach(), dim=1)
    if FAMILIES[arch].unit_norm_decoder:
        assert (grad_before * rows).sum(1).abs().max() > 1e-4
        assert (sae.W_dec.grad * rows).sum(1).abs().max() < 1e-6 * grad_before.abs().max() * 16
    else:
        torch.testing.assert_close(sae.W_dec.grad, grad_before)
    torch.optim.Adam(sae.parameters(), lr=1e-2).step()
    sae.after_optimizer_step()
    norms = sae.W_dec.detach().norm(dim=1)
    if FAMILIES[arch].unit_norm_decoder:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert (norms - 1).abs().max() > 0.1  # relu learns its decoder norms


def test_initial_decoder_norms_and_tied_encoder():
    for arch in SINGLE_HOOK:
        sae = build_dictionary(DictionaryConfig(architecture=arch, d_in=8, d_sae=24, k=3))
        expected = 1.0 if FAMILIES[arch].unit_norm_decoder else 0.1
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((24,), expected))
        torch.testing.assert_close(sae.W_enc, sae.W_dec.t())


# ---- 7. errors a user can fix ------------------------------------------------------------------


def test_wrong_width_and_nan_activations_give_clear_errors():
    sae = build_dictionary(DictionaryConfig(architecture="topk", d_in=32, d_sae=64, k=4))
    with pytest.raises(DimensionMismatchError, match=r"d_in=32") as info:
        sae.encode(torch.randn(5, 31))
    assert "31" in str(info.value) and "hook point" in str(info.value) and "train" in str(info.value)
    with pytest.raises(DimensionMismatchError, match=r"d_in=32"):
        sae(torch.randn(2, 3, 48))
    with pytest.raises(DimensionMismatchError, match=r"d_in=32"):
        sae.training_loss(torch.randn(5, 16), torch.randn(5, 16), StepContext())
    transcoder = build_dictionary(
        DictionaryConfig(architecture="relu", d_in=32, d_sae=64, output_hook_name="x", d_out=20)
    )
    with pytest.raises(DimensionMismatchError, match=r"d_out=20"):
        transcoder.training_loss(torch.randn(5, 32), torch.randn(5, 32), StepContext())
    bad = torch.randn(100, 32)
    bad[7, 3] = float("nan")
    with pytest.raises(ActivationError, match="NaN"):
        sae.init_from_data(bad, bad)
    # Leading dimensions pass through.
    assert sae.encode(torch.randn(2, 3, 32)).shape == (2, 3, 64)


def test_unknown_families_and_options_are_refused_with_the_known_ones():
    with pytest.raises(SaelabError, match="'nope'.*relu, gated, topk, batchtopk, jumprelu"):
        family("nope")
    with pytest.raises(SaelabError, match="relu, gated, topk, batchtopk, jumprelu"):
        DictionaryConfig(architecture="nope")
    with pytest.raises(ValueError, match="relu family has no option.*tanh_scale"):
        DictionaryConfig(architecture="relu", options={"tanh_scale": 2.0})
    with pytest.raises(ValueError, match="k must be in 1..d_sae"):
        DictionaryConfig(architecture="batchtopk", d_sae=8, k=9)


# ---- 8. the registry ---------------------------------------------------------------------------


def test_the_five_families_declare_what_others_read():
    """Names, order, knobs, labels, decoder norms and colours, exactly as before the registry."""
    multi_hook = ["clt", "clt_batchtopk", "crosscoder", "crosscoder_batchtopk"]
    five_names = ["relu", "gated", "topk", "batchtopk", "jumprelu"]
    assert list(FAMILIES) == [*five_names, "matryoshka_batchtopk", *multi_hook]
    assert list(ARCHITECTURES) == list(FAMILIES)
    assert [name for name, fam in FAMILIES.items() if fam.cross_layer] == multi_hook
    five = {name: FAMILIES[name] for name in five_names}
    assert [fam.knob for fam in five.values()] == ["l1_coefficient"] * 2 + ["k"] * 2 + ["target_l0"]
    defaults = [fam.knob_default for fam in five.values()]
    assert defaults == [5.0, 5.0, 32, 32, 32.0] and isinstance(defaults[2], int)
    assert [fam.label for fam in five.values()] == ["ReLU + L1", "Gated", "TopK", "BatchTopK", "JumpReLU"]
    assert [fam.unit_norm_decoder for fam in five.values()] == [False, True, True, True, True]
    colours = [fam.colour for fam in five.values()]
    assert colours == ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for name, fam in five.items():
        assert family(name) is fam and fam.options == {}
        assert type(build_dictionary(DictionaryConfig(architecture=name, d_in=4, d_sae=8, k=2))) is fam.cls
    # The built-in families add no "options" key to a saved config.
    assert "options" not in DictionaryConfig().to_dict()
    assert FAMILIES["jumprelu"].with_knob(3, {"lr": 0.1}) == {"lr": 0.1, "target_l0": 3.0}


# ---- 9. geometric median -----------------------------------------------------------------------


def test_geometric_median_is_robust_to_outliers():
    g = torch.Generator().manual_seed(15)
    centre = torch.tensor([1.0, -2.0])
    points = torch.cat([centre + 0.3 * torch.randn(40, 2, generator=g), torch.tensor([[40.0, 40.0]] * 8)])

    def total_distance(p):
        return (points[None] - p[:, None]).norm(dim=-1).sum(-1)

    # Brute force: a fine grid, then a finer grid around its best point.
    axis = torch.linspace(-5, 5, 401)
    grid = torch.cartesian_prod(axis, axis)
    best = grid[total_distance(grid).argmin()]
    fine = torch.cartesian_prod(torch.linspace(-0.03, 0.03, 61), torch.linspace(-0.03, 0.03, 61)) + best
    best = fine[total_distance(fine).argmin()]

    median = geometric_median(points)
    assert median.dtype == torch.float32
    assert (median - best).norm() < 5e-3
    assert total_distance(median[None]) <= total_distance(best[None]) + 1e-3
    assert (median - centre).norm() < 0.3
    assert (points.mean(0) - median).norm() > 5.0


def test_init_from_data_sets_scale_and_geometric_median_b_dec():
    x = sparse_data(1000, d=16, seed=16) * 7.0
    sae = build_dictionary(DictionaryConfig(architecture="topk", d_in=16, d_sae=32, k=2))
    sae.init_from_data(x, x)
    assert sae.input_scale.item() == pytest.approx(4.0 / float(x.norm(dim=-1).mean()), rel=1e-5)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x * sae.input_scale))


def test_topk_bfloat16_encoder_matches_float32_step_closely():
    """encoder_dtype=bfloat16 only rounds the forward values; losses and gradients stay close."""
    x = sparse_data(512, seed=5)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        sae = build_dictionary(
            DictionaryConfig(architecture="topk", d_in=32, d_sae=128, k=4, encoder_dtype=dtype)
        )
        sae.init_from_data(x, x)
        out = sae.training_loss(x, x, StepContext(dead_mask=torch.rand(128) < 0.5, progress=0.5))
        out.loss.backward()
        outputs[dtype] = (out.loss.item(), sae.W_dec.grad.clone(), out.fired.sum())
    assert outputs["bfloat16"][0] == pytest.approx(outputs["float32"][0], rel=0.02)
    cosine = F.cosine_similarity(outputs["bfloat16"][1].flatten(), outputs["float32"][1].flatten(), dim=0)
    assert cosine > 0.9  # a few near-ties are chosen differently at bf16 precision
    assert outputs["bfloat16"][2] == outputs["float32"][2]


def test_encoder_dtype_is_validated():
    with pytest.raises(ValueError, match="encoder_dtype"):
        DictionaryConfig(encoder_dtype="float16")
