"""How well a dictionary recovered known features: MMCS, recovered share, false positives, L0, FVU.

MMCS (mean max cosine similarity, Sharkey et al. 2022) is the mean over ground-truth features of
the best cosine between that feature and any learned decoder row. A feature is *recovered* when
some decoder row points along it at cosine > 0.9. A *false-positive latent* fires on held-out data
but its decoder row matches no ground-truth feature at cosine > 0.9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.dictionaries import Dictionary

RECOVERY_COSINE = 0.9
FREQUENT_PROBABILITY = 1e-3  # Sharkey et al.'s rare-feature cut: features firing less often than this


def cosine_matrix(features: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """[G, L] cosines between ground-truth features and decoder rows."""
    return F.normalize(features.detach().double(), dim=1) @ F.normalize(decoder.detach().double(), dim=1).T


def max_cosines(features: torch.Tensor, decoder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine for every feature (over latents) and for every latent (over features)."""
    cos = cosine_matrix(features, decoder)
    return cos.max(dim=1).values, cos.max(dim=0).values


@torch.no_grad()
def recovery_scores(
    dictionary: Dictionary,
    features: torch.Tensor,
    probabilities: torch.Tensor,
    x_eval: torch.Tensor,
    batch_size: int = 4096,
) -> dict:
    """Every ground-truth score of one dictionary, with its L0 and FVU on held-out samples."""
    dictionary = dictionary.eval()
    fired = torch.zeros(dictionary.d_sae, dtype=torch.long)
    active_total, error_sq = 0.0, 0.0
    for start in range(0, x_eval.shape[0], batch_size):
        x = x_eval[start : start + batch_size]
        latents = dictionary.encode(x)
        recon = dictionary.decode(latents)
        active = latents > 0
        fired += active.sum(0)
        active_total += float(active.sum())
        error_sq += float((recon - x).double().pow(2).sum())
    variance = float((x_eval.double() - x_eval.double().mean(0)).pow(2).sum())
    per_feature, per_latent = max_cosines(features, dictionary.W_dec.detach())
    live = fired > 0
    frequent = probabilities >= FREQUENT_PROBABILITY
    return {
        "mmcs": float(per_feature.mean()),
        "mmcs_frequent": float(per_feature[frequent].mean()) if bool(frequent.any()) else None,
        "n_frequent": int(frequent.sum()),
        "recovered": float((per_feature > RECOVERY_COSINE).double().mean()),
        "recovered_frequent": float((per_feature[frequent] > RECOVERY_COSINE).double().mean())
        if bool(frequent.any())
        else None,
        "false_positive_latents": int((live & (per_latent <= RECOVERY_COSINE)).sum()),
        "dead_latents": int((~live).sum()),
        "l0": active_total / x_eval.shape[0],
        "fvu": error_sq / max(variance, 1e-12),
        "max_cosine_per_feature": [round(float(v), 4) for v in per_feature],
    }
