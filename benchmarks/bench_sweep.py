"""Sweep cost: 4 SAEs trained on one activation stream versus one SAE, and versus 4 separate runs.

Each run = harvest into a cache + training, on the embedded model at blocks.15.hook_resid_post.
Goal: the 4-SAE sweep costs at most 1.5x one SAE's harvest + training.
Usage: python benchmarks/bench_sweep.py [--tokens 65536]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from saelab.core.devices import describe_machine, resolve_dtype_name
from saelab.dictionaries import DictionaryConfig
from saelab.training import TrainConfig, train

SWEEP = [
    dict(architecture="topk", k=16),
    dict(architecture="topk", k=32),
    dict(architecture="topk", k=64),
    dict(architecture="batchtopk", k=32),
]


def run(dictionaries: list[dict], tokens: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            run_dir=f"{tmp}/run",
            n_tokens=tokens,
            batch_size=4096,
            log_every=1000,
            checkpoint_every=10**9,
            dictionaries=[DictionaryConfig(d_in=0, d_sae=4608, **d) for d in dictionaries],
        )
        start = time.perf_counter()
        train(cfg, progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args()
    print(describe_machine(resolve_dtype_name("auto", "cpu", announce=False)))
    separate = [run([d], args.tokens) for d in SWEEP]
    sweep = run(SWEEP, args.tokens)
    single = separate[1]  # topk k=32
    print(f"{args.tokens:,} tokens, d_sae 4608, harvest + training, embedded model")
    print(f"  one SAE (topk k32)          : {single:7.1f} s")
    print(f"  4 separate runs             : {sum(separate):7.1f} s")
    print(
        f"  sweep of 4 on one stream    : {sweep:7.1f} s  = {sweep / single:.2f}x one SAE "
        f"(goal <= 1.5x), {sum(separate) / sweep:.2f}x faster than 4 runs"
    )


if __name__ == "__main__":
    main()
