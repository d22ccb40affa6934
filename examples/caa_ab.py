"""Contrastive Activation Addition with A/B evaluation on the embedded SmolLM2-135M-Instruct.

Vectors: the mean difference of resid_pre at the answer letter between each training question
followed by its matching answer "(A" and by the other one "(B", at every scored layer.
Evaluation: on the held-out items, p(matching letter) / (p(A) + p(B)) after "(" with
multiplier * vector added at one layer to the positions after the instruction, for multipliers
-1, 0, +1 (0 = the unsteered model). The probability should rise with the multiplier.

    OMP_NUM_THREADS=1 python examples/caa_ab.py                       # a few minutes on 1 thread
    python examples/caa_ab.py --layers all --multipliers -2,-1,0,1,2  # the full sweep
    python examples/caa_ab.py --items my_items.json --model Qwen/Qwen2.5-1.5B-Instruct

Writes runs/steering/caa_<behaviour>/: result.json, caa.png and the vectors (directions.safetensors/json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saelab.core.fileio import atomic_write_json
from saelab.core.models import load_model
from saelab.interventions.caa import CAAConfig, load_items, run_caa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="model name or path (default: the embedded SmolLM2-135M)"
    )
    parser.add_argument(
        "--items", default="optimism", help="shipped item set name or a JSON file of A/B items"
    )
    parser.add_argument(
        "--layers", default="3,6,9,12,15,18,21,24,27", help="comma-separated layers, or 'all'"
    )
    parser.add_argument("--multipliers", default="-1,0,1")
    parser.add_argument(
        "--steer-positions", default="after_instruction", choices=["after_instruction", "all"]
    )
    parser.add_argument("--out", default=None, help="output folder (default runs/steering/caa_<behaviour>)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    lm = load_model(args.model)
    behaviour, items = load_items(args.items)
    layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    multipliers = tuple(float(x) for x in args.multipliers.split(","))
    cfg = CAAConfig(layers=layers, multipliers=multipliers, steer_positions=args.steer_positions)
    vectors, result = run_caa(lm, items, cfg, behaviour)
    seconds = time.perf_counter() - t0

    print(f"CAA '{behaviour}': {result.n_train} training items, {result.p_match.shape[-1]} held-out items")
    print("mean p(matching letter) / (p(A) + p(B)) on held-out items:")
    print(result.table())
    best = result.best_layer()
    row = result.means[result.layers.index(best)]
    print(
        f"best layer {best}: "
        + ", ".join(f"m={m:+g}: {float(v):.3f}" for m, v in zip(result.multipliers, row, strict=True))
    )

    out = Path(args.out or f"runs/steering/caa_{behaviour}")
    vectors.save(out)
    data = result.to_dict() | {"seconds": round(seconds, 1), "per_item_p_match": result.p_match.tolist()}
    atomic_write_json(out / "result.json", data)
    result.plot(out / "caa.png")
    print(f"done in {seconds:.0f} s; wrote {out}/")
    print(json.dumps({"best_layer": best, "rises_at_best": result.rises(best), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
