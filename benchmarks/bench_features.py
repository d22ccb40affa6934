"""Feature analysis cost: the one streaming pass (`saelab analyze`) versus the harvest it rides on.

A TopK SAE (k 32, d_sae 4608) on blocks.15.hook_resid_post of the embedded model. The harvest time is
the model's early-exit capture of the same batches; the analysis time includes encoding, every
accumulator and writing the SQLite store. Peak memory is measured in a fresh process per token count.
Goal: analysis <= 1.5x the harvest; peak memory flat as tokens grow 10x.
Usage: python benchmarks/bench_features.py [--tokens 32768] [--threads N] [--memory]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from saelab.analysis.features import AnalysisConfig, analyze
from saelab.core.data import DataConfig
from saelab.core.devices import describe_machine, resolve_dtype_name
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig, build_dictionary

HOOK = "blocks.15.hook_resid_post"


def dictionary(lm):
    sae = build_dictionary(
        DictionaryConfig(architecture="topk", k=32, d_in=lm.d_model, d_sae=4608, hook_name=HOOK)
    )
    with torch.no_grad():  # random directions at the activations' scale: realistic activity, k per token
        sae.W_enc.mul_(1.0 / 175.0)
    return sae.eval()


def run(tokens: int, threads: int, dtype: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """((harvest, analysis) wall seconds, (harvest, analysis) CPU seconds) for `tokens` tokens.

    Both phases run on the same number of threads. CPU seconds (this process's) are less sensitive
    than wall seconds to other work on a shared machine.
    """
    torch.set_num_threads(threads)
    lm = load_model(None, device="cpu", dtype=dtype)
    data = DataConfig(context_size=128)
    n_contexts = tokens // 128
    sae = dictionary(lm)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in data.batches(lm.tokenizer, 32, max_contexts=n_contexts):
            lm.capture(batch, [HOOK])
    harvest, harvest_cpu = time.perf_counter() - start, time.process_time() - cpu
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        analyze(lm, sae, data, AnalysisConfig(n_tokens=tokens), Path(tmp) / "f.db", progress=False)
        analysis, analysis_cpu = time.perf_counter() - start, time.process_time() - cpu
    return (harvest, analysis), (harvest_cpu, analysis_cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--memory", action="store_true", help="peak RSS at tokens and 10x tokens")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both phases")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: what saelab.core.devices picks)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run(args.tokens, args.threads, args.dtype)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        return
    torch.set_num_threads(args.threads)
    print(describe_machine(resolve_dtype_name(args.dtype, "cpu", announce=False)))
    (harvest, analysis), (harvest_cpu, analysis_cpu) = run(args.tokens, args.threads, args.dtype)
    print(f"{args.tokens:,} tokens, TopK k32 d_sae 4608, {args.threads} thread(s)")
    for name, wall, cpu in (
        ("harvest alone", harvest, harvest_cpu),
        ("analysis pass", analysis, analysis_cpu),
    ):
        print(f"  {name} : {wall:7.1f} s  ({args.tokens / wall:8,.0f} tok/s)  CPU {cpu:7.1f} s")
    print(
        f"  ratio         : {analysis / harvest:.2f}x (goal <= 1.5x); CPU time {analysis_cpu / harvest_cpu:.2f}x"
    )
    if args.memory:
        for tokens in (args.tokens, 10 * args.tokens):
            child = [
                "--child",
                "--tokens",
                str(tokens),
                "--threads",
                str(args.threads),
                "--dtype",
                args.dtype,
            ]
            out = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True)
            print(f"  peak RSS at {tokens:>9,} tokens: {out.stdout.strip().splitlines()[-1]} MiB")


if __name__ == "__main__":
    main()
