"""Peak memory (RSS) of harvest and of training as the token count grows 10x: it must stay flat.

Each measurement runs in a fresh subprocess and reports its own ru_maxrss. Shards are small (4,096
tokens) so that both token counts exceed the harvest buffer's cap (4 shards): what is measured is
whether anything grows with the token count beyond the buffer and one shard.
Usage: python benchmarks/bench_memory.py [--tokens 16384]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

from saelab.core.devices import describe_machine, resolve_dtype_name

CHILD = r"""
import resource, sys
from saelab.training import TrainConfig, train
from saelab.core.activations import harvest_to_cache
from saelab.core.data import DataConfig
from saelab.dictionaries import DictionaryConfig
from saelab.core.models import load_model
import torch
what, tokens, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if what == "harvest":
    lm = load_model(None, device="cpu", dtype="auto")
    harvest_to_cache(lm, DataConfig(), ["blocks.15.hook_resid_post"], tokens, folder + "/cache", shard_tokens=4096,
                     progress=False)
else:
    cfg = TrainConfig(run_dir=folder + "/run", activations=folder + "/cache", n_tokens=tokens,
                      dictionaries=[DictionaryConfig(d_in=0, d_sae=4608, k=32)], checkpoint_every=10**9)
    train(cfg, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_mib(what: str, tokens: int, folder: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(tokens), folder], check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    print(describe_machine(resolve_dtype_name("auto", "cpu", announce=False)))
    print("peak RSS (MiB), embedded model, blocks.15.hook_resid_post, TopK d_sae 4608")
    for scale in (1, 10):
        tokens = args.tokens * scale
        with tempfile.TemporaryDirectory() as tmp:
            harvest = peak_mib("harvest", tokens, tmp)
            training = peak_mib("train", tokens, tmp)
        print(f"  {tokens:>9,} tokens: harvest {harvest:7.0f} MiB | training {training:7.0f} MiB")


if __name__ == "__main__":
    main()
