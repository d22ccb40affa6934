"""Every experiment in one call (`saelab toy all` and the tests' quick run)."""

from __future__ import annotations

from pathlib import Path

from saelab.toy.tms.dimensions import dimensionality
from saelab.toy.tms.phases import phase_diagram
from saelab.toy.tms.superposition import sparsity_sweep


def run_all(out_dir: str | Path, quick: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """Every experiment into out_dir: {name: result}."""
    return {
        "superposition_n5_m2": sparsity_sweep(out_dir, n=5, m=2, quick=quick, seed=seed, progress=progress),
        "superposition_n20_m5": sparsity_sweep(out_dir, n=20, m=5, quick=quick, seed=seed, progress=progress),
        "phase_diagram": phase_diagram(out_dir, quick=quick, seed=seed, progress=progress),
        "dimensionality": dimensionality(out_dir, quick=quick, seed=seed, progress=progress),
    }
