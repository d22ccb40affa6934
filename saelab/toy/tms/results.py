"""The experiments' shared recipe (how they train) and how they write their results.

Every experiment saves `<name>.json` and `<name>.png` into its output folder; the JSON holds plain
rounded floats, so the same seed writes the same file.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from saelab.core.fileio import atomic_write_json, save_figure
from saelab.toy.tms.train import TMSConfig

# The experiments train at 10x the paper's lr with a cosine decay: 3k steps then reach lower losses than
# 10k constant-lr steps at 1e-3 (measured on n=5, m=2), which keeps the full run within minutes on a CPU.
EXPERIMENT_LR = 1e-2


def experiment_config(
    n: int, m: int, probabilities: list[float], steps: int, seed: int, **extra
) -> TMSConfig:
    """The experiments' shared recipe: lr 1e-2 with cosine decay (as good as the paper's 10k steps)."""
    return TMSConfig(
        n_features=n,
        n_hidden=m,
        feature_probabilities=probabilities,
        steps=steps,
        lr=EXPERIMENT_LR,
        lr_schedule="cosine",
        seed=seed,
        **extra,
    )


def rounded(values, digits: int = 4):
    """Plain (nested) lists of rounded floats for JSON."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return [rounded(v, digits) for v in values]
    return round(float(values), digits)


def write_result(out_dir: str | Path, name: str, result: dict, fig, start: float) -> dict:
    """Save `<name>.png` and `<name>.json`; the wall time covers training, analysis and the figure."""
    out_dir = Path(out_dir)
    save_figure(fig, out_dir / f"{name}.png")
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    result["files"] = {"json": str(out_dir / f"{name}.json"), "png": str(out_dir / f"{name}.png")}
    atomic_write_json(out_dir / f"{name}.json", result)
    return result
