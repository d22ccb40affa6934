"""Arditi-style direction selection on the embedded SmolLM2-135M-Instruct, end to end.

The 135M model barely refuses, so the shipped sets use a behaviour it has: asked for code it opens
its answer with a code fence "```"; asked for a poem, story or letter it does not. Candidates are the
mean differences (code requests - prose requests) at each scored layer's resid_pre and each
post-instruction position; each is scored by ablating it everywhere (on held-out code requests), by
adding it at its layer (on held-out prose requests) and by the KL of ablation (on the prose ones);
late layers, high KL and candidates whose addition does not bring the fence are filtered out.

Thresholds: the paper's KL <= 0.1 and "addition brings the behaviour to p > 0.5" (log-odds >= 0) are
for 2B+ chat models. On the 135M model, ablating a *random* unit direction everywhere already costs
KL 0.02-0.19 (its residual stream has a few massive dimensions that any ablation touches), and no
single mid-layer direction added at alpha 1 lifts p(```) on prose requests above ~0.1. So this demo
defaults to --kl-threshold 1.0 and --min-addition-score -3 (p >= 0.05, about 1000x the unsteered
odds); `--kl-threshold 0.1 --min-addition-score 0` gives the paper's filters, under which every
candidate of the 135M model is filtered out (the table says why).

    OMP_NUM_THREADS=1 python examples/direction_selection.py               # a few minutes on 1 thread
    python examples/direction_selection.py --layer-step 1 --n-val 16       # every layer, paper-sized
    python examples/direction_selection.py --model Qwen/Qwen2.5-1.5B-Instruct --sets refusal.json \\
        --layer-step 1 --n-val 32 --kl-threshold 0.1 --min-addition-score 0  # refusal, on a GPU

(refusal.json: harmful vs harmless instructions, e.g. AdvBench vs Alpaca, in the format of
saelab/interventions/prompts/selection_code.json with "metric_strings": ["I", "As"].)
Writes runs/steering/selection_<behaviour>/: directions.safetensors/json, selection.json, selection.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saelab.core.fileio import atomic_write_json
from saelab.core.models import load_model
from saelab.interventions.generation import GenerationConfig, generate
from saelab.interventions.hooks import AddVector, ablation
from saelab.interventions.selection import (
    BehaviourMetric,
    SelectionConfig,
    load_prompt_sets,
    select_direction,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model name or path (default: the embedded SmolLM2-135M)"
    )
    parser.add_argument(
        "--sets", default="code", help="shipped set name or a JSON file of the four prompt sets"
    )
    parser.add_argument(
        "--layer-step", type=int, default=3, help="score every k-th layer (1 = all, as the paper)"
    )
    parser.add_argument("--n-val", type=int, default=8, help="validation prompts per set")
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/steering/selection_<behaviour>)"
    )
    parser.add_argument("--kl-threshold", type=float, default=1.0, help="paper: 0.1 (see the docstring)")
    parser.add_argument(
        "--min-addition-score", type=float, default=-3.0, help="paper: 0.0 (see the docstring)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    lm = load_model(args.model)
    sets = load_prompt_sets(args.sets)
    metric = BehaviourMetric.from_strings(lm.tokenizer, sets.metric_strings, name=sets.behaviour)
    cfg = SelectionConfig(
        layers=list(range(0, lm.n_layers, args.layer_step)),
        kl_threshold=args.kl_threshold,
        min_addition_score=args.min_addition_score,
        progress=True,
    )
    result = select_direction(
        lm,
        sets.positive,
        sets.negative,
        sets.positive_val[: args.n_val],
        sets.negative_val[: args.n_val],
        metric,
        cfg=cfg,
        name=sets.behaviour,
        set_names=sets.names,
    )
    seconds = time.perf_counter() - t0
    print(result.table(top=20))
    out = Path(args.out or f"runs/steering/selection_{sets.behaviour}")
    result.save(out)
    result.plot(out / "selection.png")

    summary = {
        "seconds": round(seconds, 1),
        "n_candidates": len(result.candidates),
        "metric_tokens": metric.tokens,
    }
    best = result.best
    if best is not None:
        r = result.direction()
        print(f"\nselected: layer {best.layer}, position {best.position} (norm {best.norm:.2f})")
        # What the selected direction does to greedy completions: removed from code requests, added to prose ones.
        gen = GenerationConfig(max_new_tokens=24, temperature=0.0)
        code, prose = sets.positive_val[:2], sets.negative_val[:2]
        samples = {
            "code_plain": generate(lm, code, [], gen),
            "code_ablated": generate(lm, code, ablation(lm, r), gen),
            "prose_plain": generate(lm, prose, [], gen),
            "prose_added": generate(lm, prose, [AddVector(best.hook, vector=r, alpha=1.0)], gen),
        }
        for key, texts in samples.items():
            for prompt, text in zip(code if key.startswith("code") else prose, texts, strict=True):
                print(f"[{key}] {prompt!r} -> {text!r}")
        summary["samples"] = samples
    atomic_write_json(out / "summary.json", summary)
    print(f"\n{len(result.candidates)} candidates scored in {seconds:.0f} s; wrote {out}/")
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}))


if __name__ == "__main__":
    main()
