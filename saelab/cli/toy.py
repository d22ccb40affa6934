"""`saelab toy ...`: toy models of superposition and the ground-truth benchmark (no language model)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from saelab.cli.common import console
from saelab.errors import SaelabError

toy_app = typer.Typer(
    help="Toy models of superposition and the ground-truth benchmark (no language model needed).",
    no_args_is_help=True,
)

_TOY_OUT = typer.Option(Path("runs/toy"), "--out", help="Folder for the JSON results and PNG plots.")
_QUICK = typer.Option(False, help="A reduced, faster version (what the tests run).")
_SEED = typer.Option(0, help="Seed: the same seed gives the same numbers.")


def _print_toy_summary(name: str, result: dict, out: Path) -> None:
    seconds = result.get("wall_seconds")
    timing = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    console.print(f"{name}: done{timing}; results in {out}")


def _print_toy_sweep(result: dict) -> None:
    table = Table(title="features represented (||W_i|| > 0.5) per instance")
    for column in ("1 - S", "represented (per instance)", "in superposition", "instances with all"):
        table.add_column(column)
    for point in result.get("per_density", []):
        table.add_row(
            f"{point['density']:g}",
            " ".join(str(v) for v in point["n_represented"]),
            " ".join(str(v) for v in point["n_superposition"]),
            f"{point['n_all_represented']}/{point['n_instances']}",
        )
    console.print(table)


@toy_app.command("superposition")
def toy_superposition(
    n: int = typer.Option(5, help="Number of features."),
    m: int = typer.Option(2, help="Number of hidden dimensions (m < n)."),
    out: Path = _TOY_OUT,
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Features represented and in superposition as sparsity rises (Elhage et al. 2022)."""
    from saelab.toy import tms

    if not 0 < m < n:
        raise SaelabError(f"need 0 < m < n for superposition, got n={n}, m={m}.")
    result = tms.sparsity_sweep(out, n=n, m=m, quick=quick, seed=seed, progress=True)
    _print_toy_sweep(result)
    _print_toy_summary(f"superposition n={n} m={m}", result, out)


@toy_app.command("phase")
def toy_phase(out: Path = _TOY_OUT, quick: bool = _QUICK, seed: int = _SEED):
    """Phase diagram of one extra feature: not represented / dedicated dimension / superposition."""
    from saelab.toy import tms

    result = tms.phase_diagram(out, quick=quick, seed=seed, progress=True)
    _print_toy_summary("phase diagram", result, out)


@toy_app.command("dimensionality")
def toy_dimensionality(
    n: int = typer.Option(400, help="Number of features."),
    m: int = typer.Option(30, help="Number of hidden dimensions."),
    out: Path = _TOY_OUT,
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Feature dimensionality D_i and its clustering at 1, 1/2, 2/3, 2/5 ... as sparsity rises."""
    from saelab.toy import tms

    result = tms.dimensionality(out, n=n, m=m, quick=quick, seed=seed, progress=True)
    _print_toy_summary(f"dimensionality n={n} m={m}", result, out)


@toy_app.command("bench")
def toy_bench(
    out: Path = typer.Option(Path("runs/toy/bench"), "--out", help="Folder for runs, tables and plots."),
    setting: list[str] = typer.Option(None, help="Only these settings (uniform, sharkey, toy_model)."),
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Every dictionary family on synthetic data with known features: MMCS, recovery, L0, FVU."""
    from saelab.toy.bench import run_bench

    results = run_bench(out, quick=quick, seed=seed, settings=setting or None, progress=True)
    console.print((out / "results.md").read_text(), markup=False, highlight=False)
    console.print(f"benchmark finished in {results['wall_seconds']:.0f} s; table in {out / 'results.md'}")


@toy_app.command("hierarchy")
def toy_hierarchy(
    out: Path = typer.Option(Path("runs/toy/hierarchy"), "--out", help="Folder for the run, table and plot."),
    architecture: list[str] = typer.Option(
        ["batchtopk", "matryoshka_batchtopk"], help="Families to train on the same data; repeat."
    ),
    n_parents: int = typer.Option(16, min=1, help="Parent features."),
    n_children: int = typer.Option(4, min=2, help="Mutually exclusive children per parent."),
    d: int = typer.Option(96, min=1, help="Activation width (orthogonal features when >= all features)."),
    parent_probability: float = typer.Option(0.1, help="Each parent fires with this probability."),
    child_probability: float = typer.Option(
        1.0, help="P(one child fires | its parent fires); below 1 the parent sometimes fires alone."
    ),
    width: int = typer.Option(128, min=1, help="Latents of every dictionary."),
    k: int = typer.Option(
        None, min=1, help="Active latents per sample of every k family (default: true L0)."
    ),
    matryoshka_widths: str = typer.Option(
        None, help="Matryoshka prefix widths, e.g. 16,128 (default: n_parents, width)."
    ),
    samples: int = typer.Option(1200 * 1024, min=1, help="Training samples."),
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Parents with exclusive children: does each family recover the parents or absorb them into children?"""
    from saelab.cli.train import parse_numbers
    from saelab.toy.hierarchy import HierarchyBench, HierarchyConfig, quick_bench, run_hierarchy

    if quick:
        bench = quick_bench(seed)
        bench.families = tuple(architecture)
    else:
        bench = HierarchyBench(
            hierarchy=HierarchyConfig(
                n_parents=n_parents,
                n_children=n_children,
                d=d,
                parent_probability=parent_probability,
                child_probability=child_probability,
                seed=seed,
            ),
            families=tuple(architecture),
            d_sae=width,
            k=k,
            matryoshka_widths=tuple(parse_numbers(matryoshka_widths, "--matryoshka-widths", int)) or None,
            n_samples=samples,
            seed=seed,
        )
    results = run_hierarchy(bench, out, progress=True)
    console.print((out / "results.md").read_text(), markup=False, highlight=False)
    console.print(
        f"hierarchy benchmark finished in {results['wall_seconds']:.0f} s; table in {out / 'results.md'}"
    )


@toy_app.command("all")
def toy_all(out: Path = _TOY_OUT, quick: bool = _QUICK, seed: int = _SEED):
    """Everything: the superposition results, the phase diagram, dimensionality, and the benchmark."""
    from saelab.toy import tms
    from saelab.toy.bench import run_bench

    start = time.perf_counter()
    tms.run_all(out, quick=quick, seed=seed, progress=True)
    run_bench(out / "bench", quick=quick, seed=seed, progress=True)
    console.print((out / "bench" / "results.md").read_text(), markup=False, highlight=False)
    console.print(
        f"toy models and benchmark finished in {time.perf_counter() - start:.0f} s; results in {out}"
    )
