"""Model-diffing analysis: Δnorm and tags, decoder cosines, Latent Scaling against a brute-force fit and on
planted cases (complete shrinkage, latent decoupling, a genuine B-only latent), plots and errors."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.diffing import diff_latents, latent_scaling, relative_decoder_norm, tag_latents
from saelab.diffing.plots import plot_delta_norm, plot_nu_scatter
from saelab.diffing.synthetic import PAIRED_HOOK
from saelab.errors import DiffingError, DimensionMismatchError
from tests.helpers import random_clt

D = 6


def test_relative_decoder_norm_and_the_published_tags():
    a = torch.tensor([0.0, 0.05, 1.0, 1.0, 1.0, 0.5, 0.0])
    b = torch.tensor([1.0, 1.00, 0.0, 1.0, 0.7, 1.0, 0.0])
    delta = relative_decoder_norm(a, b)
    assert delta.tolist() == pytest.approx([0.0, 0.025, 1.0, 0.5, 0.65, 0.25, 0.5])
    # The mirrored form ½((|d_B| − |d_A|)/max + 1) is 1 − Δ: the same tags with the thresholds swapped.
    assert (relative_decoder_norm(b, a) + delta).tolist() == pytest.approx([1.0] * 7)
    assert tag_latents(delta) == ["b_only", "b_only", "a_only", "shared", "other", "other", "shared"]
    edges = tag_latents(torch.tensor([0.0999, 0.1, 0.4, 0.6, 0.6001, 0.9, 0.9001]))
    assert edges == ["b_only", "other", "shared", "shared", "other", "other", "a_only"]


def planted_crosscoder(directions_a, directions_b, threshold=0.0):
    """A 2-member crosscoder whose latent i reads and writes d_A[i] in A and d_B[i] in B (unit encoders)."""
    n = directions_a.shape[0]
    cfg = DictionaryConfig(
        architecture="crosscoder",
        d_in=D,
        d_sae=n,
        hook_name=PAIRED_HOOK,
        layers=[0, 1],
        normalize_activations="none",
    )
    cc = build_dictionary(cfg)
    with torch.no_grad():
        cc.W_dec[:, 0], cc.W_dec[:, 1] = directions_a, directions_b
        enc = torch.stack([directions_a, directions_b], 0)  # [2, F, d]
        norms = enc.pow(2).sum((0, 2)).clamp_min(1e-12)
        cc.W_enc.copy_((enc / norms[None, :, None]).permute(0, 2, 1))
        cc.b_enc.fill_(-threshold)
        cc.b_dec.zero_()
    return cc.eval()


def basis(i):
    return torch.eye(D)[i]


def test_latent_scaling_matches_a_brute_force_least_squares_fit_per_latent():
    g = torch.Generator().manual_seed(0)
    da, db = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    cc = planted_crosscoder(da, db)
    with torch.no_grad():
        cc.b_dec.copy_(torch.randn(2, D, generator=g) * 0.1)
    x = torch.randn(300, 2, D, generator=g)
    result = latent_scaling(cc, [x[:100], x[100:]], probe=0, reference=1)
    with torch.no_grad():
        f = cc.encode(x).double()
        recon = cc.decode(f.float()).double()
    for j in range(4):
        fj = f[:, j]
        if float(fj.detach().pow(2).sum()) == 0:
            assert torch.isnan(result["nu_eps"][j])
            continue
        d = db[j].double()
        targets = {
            "beta_eps_probe": x[:, 0].double() - recon[:, 0] + fj[:, None] * da[j].double(),
            "beta_eps_ref": x[:, 1].double() - recon[:, 1] + fj[:, None] * d,
            "beta_r_probe": recon[:, 0] - fj[:, None] * da[j].double(),
            "beta_r_ref": recon[:, 1],
        }
        for name, y in targets.items():
            design = (fj[:, None] * d[None, :]).reshape(-1, 1)  # β f_j(t) d, every token and dimension
            beta = torch.linalg.lstsq(design, y.reshape(-1, 1)).solution.item()
            assert float(result[name][j]) == pytest.approx(beta, rel=1e-4, abs=1e-6), (name, j)
        assert float(result["nu_eps"][j]) == pytest.approx(
            float(result["beta_eps_probe"][j] / result["beta_eps_ref"][j]), rel=1e-5
        )
    # Streaming over batches gives the same sums as one pass.
    whole = latent_scaling(cc, [x], chunk=7)
    assert torch.allclose(whole["beta_r_ref"], result["beta_r_ref"], equal_nan=True, rtol=1e-5)


def test_latent_scaling_tells_shrinkage_and_decoupling_from_a_genuine_b_only_latent():
    """Latent 0: genuinely B-only. Latent 1: B-only but A holds the same concept at 0.6 in its error
    (complete shrinkage). Latent 2: B-only, but an A-only latent 3 writes the concept in A (decoupling)."""
    e = basis
    zero = torch.zeros(D)
    da = torch.stack([zero, zero, zero, e(2)])
    db = torch.stack([e(0), e(1), e(2), zero])
    cc = planted_crosscoder(da, db)
    g = torch.Generator().manual_seed(1)
    c = (torch.rand(2000, 3, generator=g) < 0.3) * (0.5 + torch.rand(2000, 3, generator=g))
    x = torch.zeros(2000, 2, D)
    x[:, 1, :3] = c  # B has all three concepts
    x[:, 0, 1] = 0.6 * c[:, 1]  # A has concept 1 at 0.6, in no latent's A decoder: its error
    x[:, 0, 2] = c[:, 2]  # A has concept 2, written by latent 3
    # Latent 3 must fire with latent 2: let both read concept 2 in both models.
    with torch.no_grad():
        cc.W_enc[:, :, 3] = cc.W_enc[:, :, 2] = torch.stack([e(2), e(2)]) / 2
    diff = diff_latents(cc, [x])
    assert diff.tags[:4] == ["b_only", "b_only", "b_only", "a_only"]
    assert diff.nu_eps[0] == pytest.approx(0.0, abs=1e-6) and diff.nu_r[0] == pytest.approx(0.0, abs=1e-6)
    assert diff.nu_eps[1] == pytest.approx(0.6, rel=1e-4) and diff.nu_r[1] == pytest.approx(0.0, abs=1e-6)
    assert diff.nu_eps[2] == pytest.approx(0.0, abs=1e-6) and diff.nu_r[2] == pytest.approx(1.0, rel=1e-4)
    assert diff.genuine("b_only").tolist() == [0]
    # The A-only latent 3 is probed the other way (A's decoder in B): B's reconstruction holds it too.
    assert diff.nu_r[3] == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(diff.cosine[:3], torch.zeros(3))


def test_tags_and_scaling_compare_members_in_their_normalised_space(tmp_path):
    """A latent equally used by both models stays shared when model B's activations are 100x larger."""
    cfg = DictionaryConfig(architecture="crosscoder", d_in=D, d_sae=2, hook_name=PAIRED_HOOK, layers=[0, 1])
    cc = build_dictionary(cfg)
    g = torch.Generator().manual_seed(2)
    c = torch.rand(500, 1, generator=g)
    x = torch.stack([c * basis(0), 100 * c * basis(0)], dim=1)
    cc.init_from_data(x, x)
    with torch.no_grad():  # in the normalised space both members see the same vector
        cc.W_dec.zero_()
        cc.W_dec[0, :, 0] = 1.0
        cc.W_enc.zero_()
        cc.W_enc[:, 0, 0] = 0.5
        cc.b_dec.zero_()
    before = diff_latents(cc, [x])
    from saelab.dictionaries.io import load_dictionary, save_dictionary

    loaded = load_dictionary(save_dictionary(cc, tmp_path / "cc"))
    after = diff_latents(loaded, [x])
    for diff in (before, after):
        assert diff.tags[0] == "shared" and float(diff.delta_norm[0]) == pytest.approx(0.5, abs=1e-5)
        # A holds exactly what the latent writes in B: ν^ε = 1 (a scale mix-up would give 100 or 0.01).
        assert float(diff.nu_eps[0]) == pytest.approx(1.0, rel=1e-4)


def test_rows_json_and_plots(tmp_path):
    g = torch.Generator().manual_seed(3)
    cc = planted_crosscoder(torch.randn(8, D, generator=g), torch.randn(8, D, generator=g) * 0.01)
    x = torch.randn(400, 2, D, generator=g)
    diff = diff_latents(cc, [x])
    assert sum(diff.counts().values()) == 8 and diff.counts()["a_only"] == 8
    path = diff.save_json(tmp_path / "latents.json")
    saved = json.loads(path.read_text())
    assert saved["members"] == ["model0/synthetic", "model1/synthetic"] and len(saved["latents"]) == 8
    assert set(saved["latents"][0]) >= {"latent", "tag", "delta_norm", "cosine", "nu_eps", "nu_r", "fired"}
    hist = plot_delta_norm(diff, tmp_path / "plots" / "delta_norm.png")
    scatter = plot_nu_scatter(diff, tmp_path / "plots" / "nu.png", groups={"all": torch.arange(8)})
    for png in (hist, scatter):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_input_gets_a_clear_error():
    with pytest.raises(DiffingError, match="needs a crosscoder.*not a clt"):
        diff_latents(random_clt(2, 4, 4))
    cc = planted_crosscoder(torch.randn(3, D), torch.randn(3, D))
    with pytest.raises(DiffingError, match="two different members"):
        diff_latents(cc, members=(0, 0))
    with pytest.raises(DimensionMismatchError, match=r"paired activations \[N, 2, 6\]"):
        latent_scaling(cc, [torch.randn(10, 3, D)])
    with pytest.raises(DiffingError, match="lacks the crosscoder's hook"):
        latent_scaling(cc, [{"model0/synthetic": torch.randn(4, D)}])
    with pytest.raises(DiffingError, match="no activations"):
        latent_scaling(cc, [])
    with pytest.raises(DiffingError, match="no Latent Scaling"):
        _ = diff_latents(cc).nu_eps
    with pytest.raises(DiffingError, match="unknown tag"):
        diff_latents(cc).indices("chat_only")
