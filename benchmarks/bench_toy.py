"""Wall time of the full toy-model reproduction and ground-truth benchmark, stage by stage.

Goal: everything (`saelab toy all`) finishes within 15 minutes on a 2-core CPU.
Usage: python benchmarks/bench_toy.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from saelab.core.devices import describe_machine
from saelab.toy import tms
from saelab.toy.bench import bench_settings, run_setting

GOAL_SECONDS = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced versions (what make test runs)")
    parser.add_argument("--out", type=Path, default=None, help="keep the results here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        stages = {
            "superposition n=5 m=2": lambda: tms.sparsity_sweep(out, n=5, m=2, quick=args.quick),
            "superposition n=20 m=5": lambda: tms.sparsity_sweep(out, n=20, m=5, quick=args.quick),
            "phase diagram": lambda: tms.phase_diagram(out, quick=args.quick),
            "dimensionality": lambda: tms.dimensionality(out, quick=args.quick),
        }
        for name, setting in bench_settings(quick=args.quick).items():
            stages[f"bench: {name}"] = lambda setting=setting: run_setting(
                setting, out / "bench", progress=False
            )
        print(describe_machine("float32"))
        total = 0.0
        for name, stage in stages.items():
            start = time.perf_counter()
            stage()
            seconds = time.perf_counter() - start
            total += seconds
            print(f"{name:28s} {seconds:7.1f} s", flush=True)
        verdict = "met" if total <= GOAL_SECONDS else "NOT met"
        print(f"{'total':28s} {total:7.1f} s  (goal <= {GOAL_SECONDS} s: {verdict})")


if __name__ == "__main__":
    main()
