"""Explaining and scoring speed on the embedded model: latents per minute and where the time goes.

    python benchmarks/bench_explain.py [SAE_FOLDER] [--feature 212 --feature 1014] [--profile]

SAE_FOLDER (default runs/demo/saes/topk-k32-w4608) must hold an analysed features.db; it is copied to
a temporary file first, so the original is never written. Prints latents explained and scored per
minute and the share of time in example building, in generation (explaining) and in scoring (judge
calls), with the machine (`describe_machine`).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sae", nargs="?", default="runs/demo/saes/topk-k32-w4608")
    parser.add_argument("--feature", type=int, action="append", help="latents (default: 212 and 1014)")
    parser.add_argument("--profile", action="store_true", help="print the top cProfile entries too")
    args = parser.parse_args()
    folder = Path(args.sae)
    if not (folder / "features.db").is_file() or not (folder / "cfg.json").is_file():
        print(f"skipped: {folder} is not an analysed SAE folder (no cfg.json / features.db); "
              "pass one, e.g. runs/demo/saes/topk-k32-w4608 after `saelab demo`.")  # fmt: skip
        return 0

    import saelab.explain.pipeline as pipeline
    from saelab.cli.sae_inputs import with_models
    from saelab.core.devices import describe_machine
    from saelab.explain.clients import make_client
    from saelab.explain.explainer import Explainer
    from saelab.explain.scorers import SCORERS

    features = args.feature or [212, 1014]
    spent: dict[str, float] = defaultdict(float)

    def timed(owner, name, bucket):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[bucket] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(pipeline, "build_examples", "examples")
    timed(Explainer, "explain", "explain")
    for scorer in SCORERS.values():
        timed(scorer, "measure", f"score:{scorer.name}")

    _folder, dictionary, lm, _data = next(with_models([folder], None, None, "train", "auto", "auto"))
    client = make_client("local", lm=lm)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "features.db"
        shutil.copy(folder / "features.db", db)
        cfg = pipeline.ExplainConfig(features=features)
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        summary = pipeline.explain_features(db, lm, dictionary, client, client, cfg, progress=False)
        if profiler:
            profiler.disable()
        total = time.perf_counter() - t0
    scoring = sum(v for k, v in spent.items() if k.startswith("score:"))
    n = len(summary["features"])
    print(f"machine: {describe_machine()}")
    print(f"latents {features}: {n} explained and scored in {total:.1f} s "
          f"= {60 * n / total:.2f} latents/min ({total / n:.1f} s per latent)")  # fmt: skip
    print(f"  example building {spent['examples']:7.1f} s  {100 * spent['examples'] / total:5.1f}%")
    print(f"  generation       {spent['explain']:7.1f} s  {100 * spent['explain'] / total:5.1f}%")
    print(f"  scoring (judge)  {scoring:7.1f} s  {100 * scoring / total:5.1f}%")
    for k in sorted(k for k in spent if k.startswith("score:")):
        print(f"    {k[6:]:<14} {spent[k]:7.1f} s")
    for idx, rows in summary["scores"].items():
        for row in rows:
            scores = {s: round(row[s]["score"], 4) for s in cfg.scorers if s in row}
            print(f"  latent {idx}: {row['text']!r} {scores}")
    if summary["failures"]:
        print(f"  failures: {summary['failures']}")
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
