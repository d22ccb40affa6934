"""Experiment 2: the phase diagram of one extra feature (not represented / dedicated / superposition)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from saelab.toy.tms.geometry import PHASES, classify_extra_feature
from saelab.toy.tms.plots import plot_phases
from saelab.toy.tms.results import EXPERIMENT_LR, rounded, write_result
from saelab.toy.tms.train import TMSConfig, instance_losses, train_toy_model


def _phase_defaults(quick: bool) -> tuple[list[float], list[float], int, int]:
    """(relative importances, densities, seeds per cell, steps)."""
    if quick:
        return torch.logspace(-1, 1, 5).tolist(), [1.0, 0.1, 0.03, 0.01], 4, 1500
    return torch.logspace(-1, 1, 9).tolist(), torch.logspace(0, -2, 9).tolist(), 10, 1500


def _cell_summary(density: float, ratio: float, phases: list[int], losses: list[float]) -> dict:
    """Lowest-loss phase (the optimum the seeds found), majority phase, and how far the seeds agree."""
    counts = [phases.count(p) for p in range(len(PHASES))]
    best = phases[min(range(len(phases)), key=lambda k: losses[k])]
    top = max(counts)
    majority = best if counts[best] == top else counts.index(top)  # ties go to the lowest-loss phase
    return {
        "density": round(density, 6),
        "relative_importance": round(ratio, 6),
        "phase": PHASES[best],
        "majority": PHASES[majority],
        "agreement": round(top / len(phases), 3),
        "seeds_in_lowest_loss_phase": counts[best],
        "counts": dict(zip(PHASES, counts, strict=True)),
        "losses": rounded(losses, 6),
    }


def phase_diagram(
    out_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    ratios: list[float] | None = None,
    densities: list[float] | None = None,
    seeds: int | None = None,
    steps: int | None = None,
) -> dict:
    """The paper's "one extra feature" phase diagram: n=2 features, m=1 hidden dimension.

    Feature 0 has importance 1, feature 1 relative importance r; both have density 1-S. Each cell
    trains `seeds` instances. Two features in one dimension have local minima (a feature whose weight
    starts on the wrong side of zero can stay unrepresented), so the cell's phase is the lowest-loss
    seed's, the best solution found; the majority vote and agreement are reported beside it.
    Batches of 256 (not 1024) suffice for two features and make the 81-cell grid 4x cheaper.
    """
    default_ratios, default_densities, default_seeds, default_steps = _phase_defaults(quick)
    ratios, densities = list(ratios or default_ratios), list(densities or default_densities)
    seeds, steps = seeds or default_seeds, steps or default_steps
    cells = [(d, r) for d in densities for r in ratios]
    cfg = TMSConfig(
        n_features=2,
        n_hidden=1,
        feature_probabilities=[d for d, _ in cells for _ in range(seeds)],
        importances=[[1.0, r] for _, r in cells for _ in range(seeds)],
        steps=steps,
        batch_size=256,
        lr=EXPERIMENT_LR,
        lr_schedule="cosine",
        seed=seed,
    )
    start = time.perf_counter()
    model = train_toy_model(cfg, progress=progress)
    losses = instance_losses(model, cfg, n_samples=32768, seed=seed).reshape(len(cells), seeds).tolist()
    phases = classify_extra_feature(model.W.detach()).reshape(len(cells), seeds).tolist()
    summaries = [_cell_summary(d, r, p, loss) for (d, r), p, loss in zip(cells, phases, losses, strict=True)]
    grid = [summaries[i * len(ratios) : (i + 1) * len(ratios)] for i in range(len(densities))]
    result = {
        "name": "phase_diagram",
        "config": cfg.to_dict()
        | {"seeds_per_cell": seeds, "relative_importances": ratios, "densities": densities},
        "phases": list(PHASES),
        "phase_rule": "not represented: ||W_1|| <= 0.5; dedicated: ||W_1|| > 0.5 and ||W_0|| <= 0.5; "
        "superposition: both > 0.5",
        "mean_agreement": round(sum(s["agreement"] for s in summaries) / len(summaries), 3),
        "cells_where_majority_differs": sum(s["phase"] != s["majority"] for s in summaries),
        "grid": grid,
    }
    fig = plot_phases(grid, ratios, densities, seeds)
    return write_result(out_dir, "phase_diagram", result, fig, start)
