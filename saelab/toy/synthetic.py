"""Synthetic activations with known features: the ground truth a real language model never gives.

A ground truth is G feature directions in d dimensions, a firing probability per feature and a
magnitude distribution. Each sample is x = sum_i c_i f_i (+ noise), where feature i is active with
probability p_i and then has a random magnitude. The directions are random unit vectors, clustered
unit vectors (features of a cluster share a direction to a chosen cosine), a file of your own, or
the columns of a trained toy model of superposition (so the dictionaries see its hidden layer).

`SyntheticActivations` is an activation source for the one trainer of `saelab.training`: every
batch is a pure function of (seed, split, batch index), so runs are reproducible and resume exactly.
Importing this module registers the source kind "synthetic": a training config asks for it with
`source=SyntheticConfig(...).as_source()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saelab.core.sources import SourceKind, register_source
from saelab.errors import DataError

if TYPE_CHECKING:
    from saelab.core.models import HookedLM

# The hook name dictionaries trained on synthetic data read (there is no model behind it).
SYNTHETIC_HOOK = "synthetic"
SYNTHETIC_KIND = "synthetic"  # TrainConfig.source["kind"]
FREQUENCIES = ("uniform", "decay")
MAGNITUDES = ("uniform", "product", "exponential", "constant")
GEOMETRIES = ("random", "clustered")


@dataclass
class SyntheticConfig:
    """How to draw the ground truth and the samples; serialised with every run trained on it."""

    n_features: int = 512  # G, the number of ground-truth features
    d: int = 128  # the activation width
    mean_active: float = 5.0  # expected number of active features per sample
    frequency: str = "uniform"  # "uniform": p_i = mean_active / G; "decay": p_i proportional to decay**i
    frequency_decay: float = 0.99
    magnitude: str = "uniform"  # U[0,1], product of two U[0,1] (Sharkey et al.), Exp(1), or constant 1
    geometry: str = "random"  # "random" unit vectors, or "clustered" around n_clusters centres
    n_clusters: int = 32
    cluster_similarity: float = 0.5  # expected cosine between two features of one cluster
    noise_std: float = 0.0  # Gaussian noise per dimension, added to every sample
    features_file: str | None = None  # safetensors with "features" [G, d] (and "probabilities" [G])
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.frequency in FREQUENCIES, f"frequency must be one of {', '.join(FREQUENCIES)}"),
            (self.magnitude in MAGNITUDES, f"magnitude must be one of {', '.join(MAGNITUDES)}"),
            (self.geometry in GEOMETRIES, f"geometry must be one of {', '.join(GEOMETRIES)}"),
            (self.n_features >= 1 and self.d >= 1, "n_features and d must be positive"),
            (0 < self.mean_active <= self.n_features, "mean_active must be in (0, n_features]"),
            (0.0 <= self.cluster_similarity < 1.0, "cluster_similarity must be in [0, 1)"),
            (self.noise_std >= 0, "noise_std must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(f"bad synthetic data setting: {message}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SyntheticConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def as_source(self) -> dict:
        """This data as a training config's activation source (TrainConfig.source)."""
        return {"kind": SYNTHETIC_KIND, **self.to_dict()}


def _generator(*parts) -> torch.Generator:
    """A generator seeded from any tuple of values (stable across runs and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def random_directions(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """n independent uniformly random unit vectors in R^d."""
    directions = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (directions / directions.norm(dim=1, keepdim=True)).float()


def clustered_directions(
    n: int, d: int, n_clusters: int, similarity: float, generator: torch.Generator
) -> torch.Tensor:
    """Unit vectors in clusters: f = sqrt(s) c + sqrt(1 - s) u, so two members have cosine ~ s."""
    centres = random_directions(n_clusters, d, generator)
    member_of = torch.arange(n) % n_clusters
    own = random_directions(n, d, generator)
    directions = math.sqrt(similarity) * centres[member_of] + math.sqrt(1 - similarity) * own
    return directions / directions.norm(dim=1, keepdim=True)


def feature_probabilities(cfg: SyntheticConfig, n: int) -> torch.Tensor:
    """Per-feature firing probability; they sum to mean_active (capped at 1 each)."""
    if cfg.frequency == "uniform":
        weights = torch.ones(n, dtype=torch.float64)
    else:
        weights = cfg.frequency_decay ** torch.arange(n, dtype=torch.float64)
    probabilities = (cfg.mean_active * weights / weights.sum()).clamp(max=1.0)
    return probabilities.float()


class GroundTruth:
    """Known feature directions [G, d] (unit rows), their lengths [G] and firing probabilities [G]."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.scales = None  # per-feature lengths from a features file (multiply the magnitudes)
        if cfg.features_file:
            features, probabilities, self.scales = _read_features_file(cfg)
        else:
            generator = _generator("features", cfg.seed)
            if cfg.geometry == "random":
                features = random_directions(cfg.n_features, cfg.d, generator)
            else:
                features = clustered_directions(
                    cfg.n_features, cfg.d, cfg.n_clusters, cfg.cluster_similarity, generator
                )
            probabilities = feature_probabilities(cfg, cfg.n_features)
        self.features = features
        self.probabilities = probabilities

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def d(self) -> int:
        return self.features.shape[1]

    def magnitudes(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        kind = self.cfg.magnitude
        if kind == "uniform":
            return torch.rand(shape, generator=generator)
        if kind == "product":
            return torch.rand(shape, generator=generator) * torch.rand(shape, generator=generator)
        if kind == "exponential":
            return torch.empty(shape).exponential_(1.0, generator=generator)
        return torch.ones(shape)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples [n, d] and their true coefficients [n, G] (zero where a feature is off)."""
        active = torch.rand(n, self.n_features, generator=generator) < self.probabilities
        coefficients = active * self.magnitudes((n, self.n_features), generator)
        if self.scales is not None:
            coefficients = coefficients * self.scales
        x = coefficients @ self.features
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(x.shape, generator=generator)
        return x, coefficients


def _read_features_file(cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(cfg.features_file)
    try:
        tensors = load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise DataError(
            f"cannot read the ground-truth features file {path}: {err}. Give a safetensors file with a "
            "'features' tensor [G, d] and optionally 'probabilities' [G]."
        ) from err
    features = tensors.get("features")
    if features is None or features.ndim != 2:
        raise DataError(
            f"{path} has no 2-D 'features' tensor [G, d]; it holds {sorted(tensors)}. Save the ground "
            "truth as safetensors with features=[G, d]."
        )
    features = features.float()
    norms = features.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise DataError(f"{path}: some ground-truth features are zero vectors; drop them first.")
    probabilities = tensors.get("probabilities")
    if probabilities is None:
        probabilities = feature_probabilities(cfg, features.shape[0])
    elif probabilities.shape != (features.shape[0],):
        raise DataError(f"{path}: 'probabilities' must have shape [{features.shape[0]}].")
    # Directions are compared by cosine; a feature's length multiplies its magnitudes instead.
    return features / norms, probabilities.float().clamp(0.0, 1.0), norms.squeeze(1)


def save_features_file(path: str | Path, features: torch.Tensor, probabilities: torch.Tensor) -> Path:
    """Write a ground truth that `SyntheticConfig(features_file=...)` can read."""
    from saelab.core.fileio import atomic_save_tensors

    path = Path(path)
    atomic_save_tensors(
        {"features": features.detach().float().contiguous(), "probabilities": probabilities.float()}, path
    )
    return path


def toy_model_features(W: torch.Tensor, feature_probability: float, min_norm: float = 0.5):
    """The hidden-layer ground truth of a trained toy model: h = W x = sum_i x_i W_i.

    W is one instance's [m, n] weight; features whose column is shorter than `min_norm` are not
    represented in the hidden layer and are left out. Returns (features [G, m], probabilities [G]).
    """
    columns = W.detach().float().t()
    kept = columns[columns.norm(dim=1) > min_norm]
    if kept.shape[0] == 0:
        raise DataError("the toy model represents no feature (every column of W is shorter than 0.5).")
    return kept, torch.full((kept.shape[0],), float(feature_probability))


class SyntheticActivations:
    """An endless, exactly resumable stream of synthetic batches for the trainer.

    Batch i of split s is drawn from a generator seeded by (seed, s, i); with several ranks, rank r
    takes batches r, r + world, ..., so ranks never see the same samples.
    """

    def __init__(
        self,
        cfg: SyntheticConfig,
        batch_size: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        truth: GroundTruth | None = None,
    ):
        self.cfg, self.batch_size, self.split = cfg, batch_size, split
        self.rank, self.world_size = rank, world_size
        self.truth = truth if truth is not None else GroundTruth(cfg)
        self.index = 0

    def batch(self, index: int, n: int | None = None) -> dict[str, torch.Tensor]:
        x, _ = self.truth.sample(n or self.batch_size, _generator("batch", self.cfg.seed, self.split, index))
        return {SYNTHETIC_HOOK: x}

    def next_batch(self) -> dict[str, torch.Tensor]:
        out = self.batch(self.index * self.world_size + self.rank)
        self.index += 1
        return out

    def dims(self) -> dict[str, int]:
        return {SYNTHETIC_HOOK: self.truth.d}

    def peek(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Rows for initialisation, from their own stream (the training batches are untouched)."""
        x, _ = self.truth.sample(n_rows, _generator("peek", self.cfg.seed, self.split))
        return {SYNTHETIC_HOOK: x}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _build_source(
    settings: dict, *, batch_size: int, rank: int, world_size: int, lm: HookedLM | None = None
) -> SyntheticActivations:
    """The synthetic stream for this rank (no model: `lm` is never given)."""
    return SyntheticActivations(
        SyntheticConfig.from_dict(settings), batch_size, rank=rank, world_size=world_size
    )


def _metadata(settings: dict) -> dict:
    """What a dictionary trained on synthetic data records in its cfg.json (no model, no dataset)."""
    return {"model_name": "saelab:synthetic", "dataset_path": "saelab:synthetic", "synthetic": settings}


register_source(
    SourceKind(
        name=SYNTHETIC_KIND,
        description="synthetic data",
        build=_build_source,
        hooks=lambda settings: (SYNTHETIC_HOOK,),
        metadata=_metadata,
    )
)
