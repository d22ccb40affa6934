"""Explaining speed on the embedded model, per method: latents per minute and where the time goes.

    python benchmarks/bench_explain.py [SAE_FOLDER] [--method auto --method self --method dream]
        [--feature 212 --feature 1014] [--config default|demo|live] [--profile]

SAE_FOLDER (default runs/demo/saes/topk-k32-w4608) must hold an analysed features.db; it is copied to
a temporary file first, so the original is never written. For each method (default: all three) it
explains the latents (the 8 most frequent live ones unless --feature is given) and scores the labels
(auto and self: with the chosen config's scorers), then prints latents per minute and the share of
time in prompt building (example sets: reading the store and re-encoding candidate non-activating
windows; for self, the scale sweep), generation (the explainer, the self-explanation samples, or
EPO's search) and scoring (judge calls), with the machine (`describe_machine`).

Configs: ``default`` is `ExplainConfig()` (40 examples shown, 50 + 50 + 50 scored, four scorers);
``demo`` is what `make demo` runs (`saelab.cli.demo.demo_explain_config`); ``live`` is the web app's Explain
now (`saelab.explain.pipeline.LIVE`). Dreaming uses `DreamConfig()` (the CPU defaults).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
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
    parser.add_argument("--method", action="append", choices=["auto", "self", "dream"])
    parser.add_argument("--feature", type=int, action="append", help="latents (default: the 8 most frequent)")
    parser.add_argument("--config", choices=["default", "demo", "live"], default="default")
    parser.add_argument("--profile", action="store_true", help="print the top cProfile entries too")
    args = parser.parse_args()
    folder = Path(args.sae)
    if not (folder / "features.db").is_file() or not (folder / "cfg.json").is_file():
        print(f"skipped: {folder} is not an analysed SAE folder (no cfg.json / features.db); "
              "pass one, e.g. runs/demo/saes/topk-k32-w4608 after `saelab demo`.")  # fmt: skip
        return 0

    import torch

    import saelab.explain.pipeline as pipeline
    from saelab.analysis.store import FeatureStore
    from saelab.cli.demo import demo_explain_config
    from saelab.cli.sae_inputs import with_models
    from saelab.core.devices import describe_machine
    from saelab.explain import dreaming
    from saelab.explain.clients import make_client
    from saelab.explain.dream_latents import dream_latents
    from saelab.explain.explainer import Explainer
    from saelab.explain.scorers import SCORERS
    from saelab.explain.selfexplain import SelfExplainer

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

    timed(pipeline, "build_examples", "prompt building")
    timed(Explainer, "explain_many", "generation")
    timed(SelfExplainer, "explain", "generation")
    timed(SelfExplainer, "sweep", "sweep")  # inside explain: moved to prompt building below
    for scorer in SCORERS.values():
        timed(scorer, "measure", f"score:{scorer.name}")

    _folder, dictionary, lm, _data = next(with_models([folder], None, None, "train", "auto", "auto"))
    client = make_client("local", lm=lm)
    base = {"default": pipeline.ExplainConfig(), "demo": demo_explain_config(), "live": pipeline.LIVE}[
        args.config
    ]
    with FeatureStore(folder / "features.db", create=False) as store:
        features = args.feature or [
            r["idx"] for r in store.list_features(sort="density", limit=8, include_dead=False)
        ]
    print(f"machine: {describe_machine()}; torch threads {torch.get_num_threads()}; model {lm.model.dtype}")
    print(f"latents {features}; config {args.config}: {dataclasses.asdict(base)}")
    for method in args.method or ["auto", "self", "dream"]:
        spent.clear()
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "features.db"
            shutil.copy(folder / "features.db", db)
            cfg = dataclasses.replace(base, features=features)
            writer = SelfExplainer(lm) if method == "self" else client  # its norm is measured once, untimed
            profiler = cProfile.Profile() if args.profile else None
            t0 = time.perf_counter()
            if profiler:
                profiler.enable()
            if method == "dream":
                summary = dream_latents(db, lm, dictionary, dreaming.DreamConfig(), features=features)
                spent["generation"] = time.perf_counter() - t0
            else:
                summary = pipeline.explain_features(db, lm, dictionary, writer, client, cfg, progress=False)
            if profiler:
                profiler.disable()
            total = time.perf_counter() - t0
        scoring = sum(v for k, v in spent.items() if k.startswith("score:"))
        building = spent["prompt building"] + spent["sweep"]
        generation = spent["generation"] - spent["sweep"]
        n = len(summary["features"])
        print(f"\n{method}: {n} latents explained{' and scored' if method != 'dream' else ''} in {total:.1f} s "
              f"= {60 * n / total:.2f} latents/min ({total / n:.1f} s per latent)")  # fmt: skip
        print(f"  prompt building  {building:7.1f} s  {100 * building / total:5.1f}%")
        print(f"  generation       {generation:7.1f} s  {100 * generation / total:5.1f}%")
        print(f"  scoring (judge)  {scoring:7.1f} s  {100 * scoring / total:5.1f}%")
        for k in sorted(k for k in spent if k.startswith("score:")):
            print(f"    {k[6:]:<14} {spent[k]:7.1f} s")
        for idx, rows in summary.get("scores", {}).items():
            for row in rows:
                scores = {s: round(row[s]["score"], 3) for s in cfg.scorers if s in row}
                print(f"  latent {idx}: {row['text']!r} {scores}")
        for idx, front in summary.get("fronts", {}).items():
            print(f"  latent {idx}: best {front['best']:.3f} of dataset max {front['dataset_max']:.3f}")
        if summary["failures"]:
            print(f"  failures: {[{k: v for k, v in f.items() if k != 'raw'} for f in summary['failures']]}")
        if profiler:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
