"""Paired synthetic activations of two "models" A and B with known shared and model-specific features.

The ground truth model diffing never gets from real models: each token draws sparse feature
coefficients once, and both models see the same draw (paired activations on identical tokens).
* Shared features are present in both. Their direction differs per model: B's is A's rotated to a
  cosine of `shared_cosine` (a fine-tune moves directions a little; Latent Scaling reads A's
  activations along B's decoder direction, so it presumes the two models share a basis, as a base
  model and its fine-tune do). A `rescaled_fraction` of them is weaker in one of the two models (a
  factor drawn uniformly in [`rescaled_low`, 1], the model chosen at random): what fine-tuning does
  to most features, and what L1 crosscoders turn into spurious model-specific latents.
* `n_b_only` features exist only in B (what fine-tuning planted), `n_a_only` only in A.
Every feature fires with the same probability (mean_active / all features), with magnitude
uniform in [0.5, 1.5].

Importing this module registers the activation source kind "paired_synthetic". Its batches hold the
hooks `model0/synthetic` (A) and `model1/synthetic` (B), which a crosscoder reads with
`hook_name=PAIRED_HOOK` ("model{i}/synthetic") and `layers=[0, 1]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from saelab.core.sources import SourceKind, register_source
from saelab.errors import DataError

if TYPE_CHECKING:
    from saelab.core.models import HookedLM

PAIRED_KIND = "paired_synthetic"
PAIRED_HOOK = "model{i}/synthetic"  # the crosscoder's hook_name; {i} is the model: 0 = A, 1 = B
MEMBER_MODELS = ["saelab:synthetic-A", "saelab:synthetic-B"]


def member_hook(model: int) -> str:
    return PAIRED_HOOK.replace("{i}", str(model))


@dataclass
class PairedSyntheticConfig:
    """How the paired ground truth and its samples are drawn; recorded with every crosscoder trained on it."""

    d: int = 128  # the activation width of each model
    n_shared: int = 512
    n_b_only: int = 50
    n_a_only: int = 10
    mean_active: float = 8.0  # expected active features per token, over all of them
    shared_cosine: float = 0.9  # cosine between a shared feature's direction in A and in B
    rescaled_fraction: float = 0.3  # share of shared features weaker in one model
    rescaled_low: float = 0.3  # ... by a factor uniform in [rescaled_low, 1]
    noise_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.d >= 2, "d must be at least 2"),
            (min(self.n_shared, self.n_b_only, self.n_a_only) >= 0, "feature counts must be >= 0"),
            (self.n_features >= 1, "there must be at least one feature"),
            (0 < self.mean_active <= self.n_features, "mean_active must be in (0, number of features]"),
            (0.0 <= self.shared_cosine <= 1.0, "shared_cosine must be in [0, 1]"),
            (0.0 <= self.rescaled_fraction <= 1.0, "rescaled_fraction must be in [0, 1]"),
            (0.0 < self.rescaled_low <= 1.0, "rescaled_low must be in (0, 1]"),
            (self.noise_std >= 0, "noise_std must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(f"bad paired synthetic data setting: {message}.")

    @property
    def n_features(self) -> int:
        return self.n_shared + self.n_b_only + self.n_a_only

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> PairedSyntheticConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(
                f"unknown paired synthetic setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(sorted(known))}."
            )
        return cls(**raw)

    def as_source(self) -> dict:
        """This data as a training config's activation source (TrainConfig.source)."""
        return {"kind": PAIRED_KIND, **self.to_dict()}


def _generator(*parts) -> torch.Generator:
    """A generator seeded from any tuple of values (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(("paired",) + parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _unit(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    v = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


class PairedGroundTruth:
    """Every feature's direction in A and in B ([G, d], zero rows where a model lacks it) and strengths.

    Features are numbered shared first, then B-only, then A-only (`shared`, `b_only`, `a_only` index them).
    """

    def __init__(self, cfg: PairedSyntheticConfig):
        self.cfg = cfg
        g = _generator("truth", cfg.seed)
        n_s, n_b, n_a, d = cfg.n_shared, cfg.n_b_only, cfg.n_a_only, cfg.d
        shared_a = _unit(n_s, d, g)
        other = _unit(n_s, d, g)
        other = other - (other * shared_a).sum(1, keepdim=True) * shared_a  # orthogonal to A's direction
        other = other / other.norm(dim=1, keepdim=True).clamp_min(1e-12)
        c = cfg.shared_cosine
        shared_b = c * shared_a + (1 - c**2) ** 0.5 * other
        strength = torch.ones(cfg.n_features, 2, dtype=torch.float64)  # [G, model]
        rescaled = torch.rand(n_s, generator=g, dtype=torch.float64) < cfg.rescaled_fraction
        factor = cfg.rescaled_low + (1 - cfg.rescaled_low) * torch.rand(n_s, generator=g, dtype=torch.float64)
        weaker = (torch.rand(n_s, generator=g) < 0.5).long()  # 0: weaker in A, 1: weaker in B
        strength[torch.arange(n_s)[rescaled], weaker[rescaled]] = factor[rescaled]
        self.directions = torch.zeros(2, cfg.n_features, d, dtype=torch.float64)  # [model, G, d]
        self.directions[0, :n_s], self.directions[1, :n_s] = shared_a, shared_b
        self.directions[1, n_s : n_s + n_b] = _unit(n_b, d, g)
        self.directions[0, n_s + n_b :] = _unit(n_a, d, g)
        self.strength = strength
        self.strength[n_s : n_s + n_b, 0] = 0.0
        self.strength[n_s + n_b :, 1] = 0.0
        self.rescaled = torch.zeros(cfg.n_features, dtype=torch.bool)
        self.rescaled[:n_s] = rescaled
        self.probability = cfg.mean_active / cfg.n_features
        # What each model adds per unit coefficient: [model, G, d].
        self._writes = (self.directions * self.strength.T[:, :, None]).float()

    @property
    def shared(self) -> slice:
        return slice(0, self.cfg.n_shared)

    @property
    def b_only(self) -> slice:
        return slice(self.cfg.n_shared, self.cfg.n_shared + self.cfg.n_b_only)

    @property
    def a_only(self) -> slice:
        return slice(self.cfg.n_shared + self.cfg.n_b_only, self.cfg.n_features)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Paired activations [n, 2, d] (A, B) and their coefficients [n, G]."""
        active = torch.rand(n, self.cfg.n_features, generator=generator) < self.probability
        coefficients = active * (0.5 + torch.rand(n, self.cfg.n_features, generator=generator))
        x = torch.einsum("ng,mgd->nmd", coefficients, self._writes)
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(x.shape, generator=generator)
        return x, coefficients


class PairedSyntheticActivations:
    """An endless, exactly resumable stream of paired batches {model0/synthetic, model1/synthetic}.

    Batch i of split s is drawn from a generator seeded by (seed, s, i); rank r of w takes batches
    r, r + w, ..., so ranks never see the same tokens.
    """

    def __init__(
        self,
        cfg: PairedSyntheticConfig,
        batch_size: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        truth: PairedGroundTruth | None = None,
    ):
        self.cfg, self.batch_size, self.split = cfg, batch_size, split
        self.rank, self.world_size = rank, world_size
        self.truth = truth if truth is not None else PairedGroundTruth(cfg)
        self.index = 0

    @staticmethod
    def as_batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {member_hook(0): x[:, 0].contiguous(), member_hook(1): x[:, 1].contiguous()}

    def batch(self, index: int, n: int | None = None) -> dict[str, torch.Tensor]:
        x, _ = self.truth.sample(n or self.batch_size, _generator("batch", self.cfg.seed, self.split, index))
        return self.as_batch(x)

    def next_batch(self) -> dict[str, torch.Tensor]:
        out = self.batch(self.index * self.world_size + self.rank)
        self.index += 1
        return out

    def dims(self) -> dict[str, int]:
        return {member_hook(0): self.cfg.d, member_hook(1): self.cfg.d}

    def peek(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Rows for initialisation, from their own stream (the training batches are untouched)."""
        x, _ = self.truth.sample(n_rows, _generator("peek", self.cfg.seed, self.split))
        return self.as_batch(x)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def held_out(cfg: PairedSyntheticConfig, n: int, truth: PairedGroundTruth | None = None) -> torch.Tensor:
    """n paired tokens [n, 2, d] from the evaluation split (never seen in training)."""
    truth = truth if truth is not None else PairedGroundTruth(cfg)
    return truth.sample(n, _generator("eval", cfg.seed))[0]


def _build_source(
    settings: dict, *, batch_size: int, rank: int, world_size: int, lm: HookedLM | None = None
) -> PairedSyntheticActivations:
    return PairedSyntheticActivations(
        PairedSyntheticConfig.from_dict(settings), batch_size, rank=rank, world_size=world_size
    )


def _metadata(settings: dict) -> dict:
    """What a crosscoder trained on it records: both member "models" and the data settings."""
    return {
        "model_name": "saelab:paired-synthetic",
        "dataset_path": "saelab:paired-synthetic",
        "member_models": list(MEMBER_MODELS),
        "paired_synthetic": settings,
    }


register_source(
    SourceKind(
        name=PAIRED_KIND,
        description="paired synthetic data",
        build=_build_source,
        hooks=lambda settings: (member_hook(0), member_hook(1)),
        metadata=_metadata,
    )
)


# ---- scoring a crosscoder against the planted truth ----------------------------------------------
MATCH_COSINE = 0.9  # a latent matches a true feature when its decoder points along it (as saelab.toy)


@torch.no_grad()
def reconstruction_scores(crosscoder, x: torch.Tensor) -> dict:
    """Held-out FVU per member and mean L0 of a crosscoder on paired activations [N, n, d]."""
    latents = crosscoder.encode(x)
    error = crosscoder.decode(latents) - x
    centred = x - x.mean(0)
    fvu = (error.double().pow(2).sum((0, 2)) / centred.double().pow(2).sum((0, 2))).tolist()
    return {"fvu": [round(v, 4) for v in fvu], "l0": round(float((latents > 0).sum(-1).float().mean()), 2)}


@torch.no_grad()
def planted_report(crosscoder, truth: PairedGroundTruth, diff, threshold: float | None = None) -> dict:
    """How a crosscoder's tags and Latent Scaling fare against the planted truth.

    * planted B-only features: each is matched to the latent whose B decoder is closest in cosine;
      counted as found when that cosine is >= MATCH_COSINE and the latent is tagged B-only, and as
      confirmed when, besides, both its ν are below `threshold` (GENUINE_NU);
    * B-only latents (that fire): each is matched to the closest true B-side direction (shared or
      planted); one matching a *shared* feature at >= MATCH_COSINE is spurious, and Latent Scaling
      rejects it when ν^ε or ν^r is >= `threshold`.
    """
    from saelab.diffing.latents import GENUINE_NU

    threshold = GENUINE_NU if threshold is None else threshold
    decoders = torch.nn.functional.normalize(crosscoder.normalized_decoders()[:, 1].double().cpu(), dim=1)
    nu_eps, nu_r = diff.nu_eps.double(), diff.nu_r.double()
    is_b_only = torch.tensor([tag == "b_only" for tag in diff.tags])

    planted = truth.directions[1, truth.b_only]
    best, latent = (planted @ decoders.T).max(1)
    found = (best >= MATCH_COSINE) & is_b_only[latent]
    confirmed = found & (nu_eps[latent] < threshold) & (nu_r[latent] < threshold)
    n_planted = planted.shape[0]

    fired = diff.scaling_b["fired"] > 0
    b_only = (is_b_only & fired).nonzero().squeeze(1)
    b_side = truth.directions[1, : truth.cfg.n_shared + truth.cfg.n_b_only]  # shared, then planted
    cos, feature = (decoders[b_only] @ b_side.T).max(1)
    spurious = b_only[(feature < truth.cfg.n_shared) & (cos >= MATCH_COSINE)]
    spurious_feature = feature[(feature < truth.cfg.n_shared) & (cos >= MATCH_COSINE)]
    by_eps, by_r = nu_eps[spurious] >= threshold, nu_r[spurious] >= threshold

    def stats(values: torch.Tensor) -> dict:
        values = values[~values.isnan()]
        if values.numel() == 0:
            return {"median": None, "max": None}
        return {"median": round(float(values.median()), 4), "max": round(float(values.max()), 4)}

    return {
        "planted_b_only": {
            "n": n_planted,
            "matched": int((best >= MATCH_COSINE).sum()),
            "tagged_b_only": int(found.sum()),
            "share_tagged_b_only": round(float(found.sum()) / max(n_planted, 1), 4),
            "nu_below_threshold": int(confirmed.sum()),
            "share_nu_below_threshold": round(float(confirmed.sum()) / max(n_planted, 1), 4),
            "nu_eps": stats(nu_eps[latent[found]]),
            "nu_r": stats(nu_r[latent[found]]),
        },
        "b_only_latents": {
            "n": int(b_only.numel()),
            "planted": int(((feature >= truth.cfg.n_shared) & (cos >= MATCH_COSINE)).sum()),
            "spurious": int(spurious.numel()),
            "spurious_of_rescaled_features": int(truth.rescaled[spurious_feature].sum()),
            "unmatched": int((cos < MATCH_COSINE).sum()),
            "spurious_rejected": int((by_eps | by_r).sum()),
            "spurious_rejected_by_nu_eps": int(by_eps.sum()),
            "spurious_rejected_by_nu_r": int(by_r.sum()),
            "spurious_nu_eps": stats(nu_eps[spurious]),
            "spurious_nu_r": stats(nu_r[spurious]),
        },
        "threshold": threshold,
        "match_cosine": MATCH_COSINE,
        "spurious_latents": spurious.tolist(),
    }
