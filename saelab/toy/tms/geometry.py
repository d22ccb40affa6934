"""What a trained W [..., m, n] looks like: which features it keeps, how they share dimensions.

Every measure reads W alone (columns W_i are the features' directions in the hidden space), so the
tests check them on hand-built geometries: orthogonal pairs, antipodal pairs, regular polygons.
"""

from __future__ import annotations

import torch

# ||W_i|| above this: the feature is represented. Trained norms are bimodal (~1 kept, ~0 dropped).
REPRESENTED_NORM = 0.5
# Interference with the other represented features, sum_{j != i, j represented} (W_hat_i . W_j)^2, above
# this: feature i shares its dimensions. Orthogonal features score ~0, an antipodal partner of norm ~1
# ~1, a pentagon ~1.5; trained runs leave a wide empty gap around 0.1 (each sweep reports its own).
SUPERPOSITION_INTERFERENCE = 0.1
# The feature dimensionalities the paper marks as "sticky": a dedicated dimension (1), tetrahedron (3/4),
# triangle (2/3), antipodal pair (1/2), pentagon (2/5), square antiprism (3/8), and 1/3.
STICKY_FRACTIONS = {
    "1": 1.0,
    "3/4": 3 / 4,
    "2/3": 2 / 3,
    "1/2": 1 / 2,
    "2/5": 2 / 5,
    "3/8": 3 / 8,
    "1/3": 1 / 3,
}


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """||W_i|| for each feature (column): [..., m, n] -> [..., n]."""
    return W.norm(dim=-2)


def _overlaps(W: torch.Tensor) -> torch.Tensor:
    """[..., n, n] with entry (i, j) = W_hat_i . W_j."""
    W_hat = W / feature_norms(W).clamp_min(1e-12).unsqueeze(-2)
    return W_hat.transpose(-1, -2) @ W


def superposition_interference(W: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{j != i} (W_hat_i . W_j)^2: how much of feature i's direction other features also use.

    `among` (bool [..., n]) keeps only those j, e.g. the represented features: leftover weights of
    dropped features then no longer count as sharing.
    """
    squared = _overlaps(W).square()
    others = 1.0 - torch.eye(W.shape[-1], dtype=W.dtype)
    if among is not None:
        others = others * among.unsqueeze(-2).to(W.dtype)
    return (squared * others).sum(-1)


def feature_dimensionality(W: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """D_i = ||W_i||^2 / sum_j (W_hat_i . W_j)^2: the share of a dimension feature i gets (0 if W_i ~ 0).

    1 = a dedicated dimension, 1/2 = an antipodal pair, 2/5 = a pentagon, 2/3 = a triangle.
    """
    norms = feature_norms(W)
    dims = norms.square() / _overlaps(W).square().sum(-1).clamp_min(1e-30)
    return torch.where(norms > eps, dims, torch.zeros_like(dims))


def represented(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """Bool [..., n]: ||W_i|| > threshold."""
    return feature_norms(W) > threshold


def polygon_angles(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """Angular gaps (degrees, sorted) between angularly adjacent represented features of one 2-D W [2, n].

    A regular k-gon gives k gaps of 360/k; two orthogonal features give [90, 270]; fewer than two
    represented features give an empty tensor.
    """
    if W.dim() != 2 or W.shape[0] != 2:
        raise ValueError(
            f"polygon_angles needs one instance with 2 hidden dimensions, got W {tuple(W.shape)}"
        )
    columns = W[:, represented(W, threshold)].double()
    if columns.shape[1] < 2:
        return torch.zeros(0, dtype=torch.float64)
    angles = torch.rad2deg(torch.atan2(columns[1], columns[0])).sort().values
    gaps = torch.diff(torch.cat([angles, angles[:1] + 360.0]))
    return gaps.sort().values


def max_abs_cosine(W: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |cos| between two distinct represented features (0 when fewer than two)."""
    cols = W[:, mask]
    if cols.shape[1] < 2:
        return 0.0
    unit = cols / cols.norm(dim=0, keepdim=True)
    cos = (unit.T @ unit).abs() - torch.eye(cols.shape[1])
    return float(cos.max())


# The phases of one extra feature beside a first one in a single hidden dimension (the phase diagram).
PHASES = ("not represented", "dedicated dimension", "superposition")


def classify_extra_feature(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """Phase index per instance of W [instances, 1, 2]: 0 extra feature (1) not represented, 1 it has the
    dimension to itself (feature 0 dropped), 2 both represented (then necessarily antipodal in 1-D)."""
    mask = represented(W, threshold)
    extra, first = mask[:, 1], mask[:, 0]
    return torch.where(~extra, 0, torch.where(first, 2, 1))
