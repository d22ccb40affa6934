"""`make circuits`: transcoders at all 30 layers of the embedded model from one pass, the attribution graph
of a factual-recall prompt, and agreement circuits with their faithfulness curves; the time of each step.

    python benchmarks/circuits_demo.py [--out runs/circuits] [--tokens 262144] [--width 1024] [--k 16]
        [--clt-width 512] [--clt-tokens 131072] [--no-clt]
        [--sae runs/demo/saes/topk-k32-w4608] [--prompt "The capital of France is"]

The transcoders are BatchTopK (saved with their inference threshold, so as JumpReLU in circuit-tracer's
layout): of the families, TopK-style ones train reliably in a few hundred steps. Then a cross-layer
transcoder (clt_batchtopk, --clt-width features at each of the 30 layers) from its own streamed pass,
and the same prompt's graph over it, to set beside the per-layer one.

Each step is a saelab command (shown as it runs), skipped when its output already exists, so a rerun
continues where it stopped. The agreement circuits use the SAE given by --sae (the one `make demo`
trains, by default); when it is missing they are skipped with a note. Not part of `make test`: on 2 CPU
cores the transcoders alone take tens of minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

AGREEMENT = ("agreement_simple", "agreement_across_pp", "agreement_across_rc", "agreement_within_rc")


def train_transcoders(run_dir: Path, architecture: str, k: int, width: int, tokens: int) -> list[str]:
    """`saelab train` arguments for transcoders from every layer's MLP input to its output, one pass."""
    return ["train", "--run-dir", str(run_dir), "--layers", "0-29", "--hook", "blocks.{i}.ln2.hook_normalized",
            "--output-hook", "blocks.{i}.hook_mlp_out", "--architecture", architecture, "--k", str(k),
            "--width", str(width), "--tokens", str(tokens)]  # fmt: skip


def step(name: str, command: list[str], done: Path, timings: dict) -> bool:
    """Run one saelab command unless `done` exists; record its wall time."""
    if done.exists():
        print(f"[{name}] already done: {done}")
        timings[name] = None
        return True
    print(f"[{name}] saelab {' '.join(command)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "saelab", *command])
    timings[name] = time.perf_counter() - started
    if result.returncode != 0:
        print(f"[{name}] failed with status {result.returncode}")
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/circuits"))
    parser.add_argument("--tokens", type=int, default=262_144, help="transcoder training tokens (streamed)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16, help="active transcoder latents per token")
    parser.add_argument(
        "--clt-width", type=int, default=512, help="cross-layer transcoder features per layer"
    )
    parser.add_argument(
        "--clt-tokens", type=int, default=131_072, help="cross-layer transcoder training tokens"
    )
    parser.add_argument("--no-clt", action="store_true", help="skip the cross-layer transcoder and its graph")
    parser.add_argument("--sae", type=Path, default=Path("runs/demo/saes/topk-k32-w4608"))
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args()

    from saelab.core.devices import describe_machine

    timings: dict[str, float | None] = {}
    run_dir = args.out / "transcoders"
    name = f"transcoder-batchtopk-k{args.k}-w{args.width}"
    ok = step(
        "transcoders",
        train_transcoders(run_dir, "batchtopk", args.k, args.width, args.tokens) + ["--no-eval"],
        run_dir / "DONE.json", timings,
    )  # fmt: skip
    graph = args.out / "graph-capital.json"
    if ok:
        ok = step(
            "graph",
            ["graph", args.prompt, "--transcoders", str(run_dir / "sets" / name), "--out", str(graph)],
            graph,
            timings,
        )
    clt_graph = args.out / "graph-capital-clt.json"
    if not args.no_clt:
        clt_dir = args.out / "clt"
        clt_name = f"transcoder-clt_batchtopk-k{args.k}-L30-w{30 * args.clt_width}"
        clt_ok = step(
            "clt",
            train_transcoders(clt_dir, "clt_batchtopk", args.k, args.clt_width, args.clt_tokens),
            clt_dir / "DONE.json", timings,
        )  # fmt: skip
        if clt_ok:
            step(
                "graph (CLT)",
                [
                    "graph",
                    args.prompt,
                    "--transcoders",
                    str(clt_dir / "saes" / clt_name),
                    "--out",
                    str(clt_graph),
                ],
                clt_graph,
                timings,
            )
    if args.sae.is_dir():
        for task in AGREEMENT:
            out = args.out / task
            step(
                task,
                ["circuit", task, "--dictionaries", str(args.sae), "--out", str(out)],
                out / "circuit.json",
                timings,
            )
    else:
        print(f"no SAE at {args.sae} (run `make demo` first, or pass --sae): agreement circuits skipped")

    print(f"\n{describe_machine()}")
    for key, seconds in timings.items():
        print(f"  {key:22s} {'(done before)' if seconds is None else f'{seconds:8.1f} s'}")
    for label, path in (("graph", graph), ("graph (CLT)", clt_graph)):
        if path.exists():
            data = json.loads(path.read_text())
            scores = data["metadata"].get("info", {})
            print(f"  {label}: {len(data['nodes'])} nodes, {len(data['links'])} links kept {scores}")
    for task in AGREEMENT:
        path = args.out / task / "circuit.json"
        if path.exists():
            r = json.loads(path.read_text())
            print(f"  {task}: metric {r['metric']:.2f}, {len(r['nodes'])} nodes above threshold, "
                  f"F >= 0.8 with {r['nodes_for_f08']} nodes")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
