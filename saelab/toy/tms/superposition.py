"""Experiment 1, the paper's first result: as features get sparser, more of them fit into m dimensions."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from saelab.toy.tms.geometry import (
    REPRESENTED_NORM,
    SUPERPOSITION_INTERFERENCE,
    feature_dimensionality,
    feature_norms,
    max_abs_cosine,
    polygon_angles,
    represented,
    superposition_interference,
)
from saelab.toy.tms.plots import plot_sweep
from saelab.toy.tms.results import experiment_config, rounded, write_result
from saelab.toy.tms.train import instance_losses, train_toy_model

SWEEP_DENSITIES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01)
QUICK_SWEEP_DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01)


def _sweep_defaults(n: int, quick: bool) -> tuple[int, int]:
    """(instances per density, steps): the cost grows with n, so wider models get fewer seeds."""
    small = n <= 5
    if quick:
        return (4, 1500) if small else (2, 1000)
    return (8, 3000) if small else (4, 3000)


def _describe_instance(W: torch.Tensor, b: torch.Tensor, loss: float) -> dict:
    """Everything the sweep reports about one trained instance W [m, n]."""
    mask = represented(W)
    among_represented = superposition_interference(W, among=mask)
    sharing = mask & (among_represented > SUPERPOSITION_INTERFERENCE)
    info = {
        "loss": round(loss, 6),
        "n_represented": int(mask.sum()),
        "represented": mask.nonzero().flatten().tolist(),
        "n_superposition": int(sharing.sum()),
        "superposition": sharing.nonzero().flatten().tolist(),
        "max_abs_cos_represented": round(max_abs_cosine(W, mask), 4),
        "norms": rounded(feature_norms(W)),
        "interference": rounded(superposition_interference(W)),
        "interference_among_represented": rounded(among_represented),
        "dimensionality": rounded(feature_dimensionality(W)),
        "bias": rounded(b),
        "W": rounded(W),
    }
    if W.shape[0] == 2:
        gaps = polygon_angles(W)
        info["angles"] = rounded(gaps, 2)
        info["polygon_deviation_deg"] = (
            round(float((gaps - 360.0 / len(gaps)).abs().max()), 2) if len(gaps) else None
        )
    return info


def _density_summary(density: float, instances: list[dict], n: int) -> dict:
    counts = [inst["n_represented"] for inst in instances]
    sets: dict[str, int] = {}
    for inst in instances:
        key = ",".join(map(str, inst["represented"])) or "none"
        sets[key] = sets.get(key, 0) + 1
    best = min(range(len(instances)), key=lambda k: instances[k]["loss"])
    summary = {
        "density": density,
        "sparsity": round(1.0 - density, 6),
        "n_represented": counts,
        "n_superposition": [inst["n_superposition"] for inst in instances],
        "n_all_represented": sum(c == n for c in counts),
        "n_instances": len(instances),
        "represented_sets": sets,
        "best_seed": best,
        "best_n_represented": counts[best],
    }
    if "angles" in instances[0]:
        summary["best_angles"] = instances[best]["angles"]
    return summary


def _sweep_checks(summaries: list[dict], instances: list[list[dict]], n: int, m: int) -> dict:
    """The acceptance numbers: dense -> exactly the m most important features, orthogonal; sparse -> most."""
    dense = [
        inst for s, group in zip(summaries, instances, strict=True) if s["density"] == 1.0 for inst in group
    ]
    sparse = [
        inst for s, group in zip(summaries, instances, strict=True) if s["density"] <= 0.1 for inst in group
    ]
    first_m = list(range(m))
    checks = {
        "dense_instances": len(dense),
        "dense_exactly_first_m": sum(inst["represented"] == first_m for inst in dense),
        "dense_max_abs_cos": max((inst["max_abs_cos_represented"] for inst in dense), default=None),
        "sparse_means": "1-S <= 0.1",
        "sparse_instances": len(sparse),
        "sparse_at_least_n_minus_1": sum(inst["n_represented"] >= n - 1 for inst in sparse),
        "sparse_all_n": sum(inst["n_represented"] == n for inst in sparse),
    }
    if m == 2:
        deviations = [inst["polygon_deviation_deg"] for inst in sparse if inst["n_represented"] >= n - 1]
        checks["sparse_max_polygon_deviation_deg"] = max(deviations, default=None)
    return checks


def _interference_gap(instances: list[list[dict]]) -> dict:
    """Interference values of represented features either side of the threshold: evidence it is a gap."""
    values = [
        v
        for group in instances
        for inst in group
        for i, v in enumerate(inst["interference_among_represented"])
        if inst["norms"][i] > REPRESENTED_NORM
    ]
    below = [v for v in values if v <= SUPERPOSITION_INTERFERENCE]
    above = [v for v in values if v > SUPERPOSITION_INTERFERENCE]
    return {
        "threshold": SUPERPOSITION_INTERFERENCE,
        "largest_below": max(below, default=None),
        "smallest_above": min(above, default=None),
        "n_below": len(below),
        "n_above": len(above),
    }


def sparsity_sweep(
    out_dir: str | Path,
    n: int = 5,
    m: int = 2,
    densities: list[float] | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    name: str | None = None,
) -> dict:
    """The paper's first result: as features get sparser, more of them fit into m dimensions.

    Every (density, seed) pair is one instance of one batched model; importance 0.9**i. `seeds` is the
    number of differently initialised instances per density.
    """
    name = name or f"superposition_n{n}_m{m}"
    default_seeds, default_steps = _sweep_defaults(n, quick)
    densities = list(densities or (QUICK_SWEEP_DENSITIES if quick else SWEEP_DENSITIES))
    seeds, steps = seeds or default_seeds, steps or default_steps
    cfg = experiment_config(n, m, [d for d in densities for _ in range(seeds)], steps, seed)
    start = time.perf_counter()
    model = train_toy_model(cfg, progress=progress)
    losses = instance_losses(model, cfg, seed=seed)
    W, b = model.W.detach(), model.b.detach()
    instances = [
        [
            _describe_instance(W[k * seeds + s], b[k * seeds + s], float(losses[k * seeds + s]))
            for s in range(seeds)
        ]
        for k in range(len(densities))
    ]
    summaries = [_density_summary(d, group, n) for d, group in zip(densities, instances, strict=True)]
    result = {
        "name": name,
        "config": cfg.to_dict() | {"instances_per_density": seeds, "densities": densities},
        "thresholds": {
            "represented_norm": REPRESENTED_NORM,
            "superposition_interference": SUPERPOSITION_INTERFERENCE,
        },
        "interference_gap": _interference_gap(instances),
        "checks": _sweep_checks(summaries, instances, n, m),
        "per_density": summaries,
        "instances": instances,
    }
    fig = plot_sweep(W, losses, densities, seeds, summaries, n, name)
    return write_result(out_dir, name, result, fig, start)
