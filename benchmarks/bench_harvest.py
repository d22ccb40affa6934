"""Harvest throughput: saelab's early-exit capture of blocks.15.hook_resid_post on the embedded model
versus a plain transformers forward pass with output_hidden_states=True, same batches, same process.

Usage: python benchmarks/bench_harvest.py [--contexts 64] [--dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse
import time

import torch

from saelab.core.data import token_batches
from saelab.core.devices import describe_machine, resolve_dtype_name
from saelab.core.models import load_model

HOOK = "blocks.15.hook_resid_post"


def tokens_per_second(fn, batches) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return sum(b.numel() for b in batches) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, default=64, help="contexts of 128 tokens, in batches of 32")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()
    print(describe_machine() + f"; dtype auto picks {resolve_dtype_name('auto', 'cpu', announce=False)}")
    print(f"harvest of {HOOK}, SmolLM2-135M-Instruct, {args.contexts} x 128 tokens")
    for name in args.dtypes:
        lm = load_model(None, device="cpu", dtype=name)
        batches = list(
            token_batches(None, lm.tokenizer, context_size=128, batch_size=32, max_contexts=args.contexts)
        )
        with torch.no_grad():
            ours = tokens_per_second(lambda b: lm.capture(b, [HOOK]), batches)
            plain = tokens_per_second(lambda b: lm.model(b, output_hidden_states=True), batches)
        print(
            f"  {name:>9}: saelab capture {ours:8,.0f} tok/s | transformers full forward with hidden "
            f"states {plain:8,.0f} tok/s | {ours / plain:.2f}x"
        )


if __name__ == "__main__":
    main()
