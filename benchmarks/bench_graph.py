"""Time an attribution graph (attribute + prune) on the embedded model over a per-layer transcoder set
or a cross-layer transcoder (`--transcoders` takes either, in saelab's or circuit-tracer's layout).

Prints the machine, the graph's size and the seconds and peak RSS. `--save` writes the adjacency so a
later run (say, after a change to the graph code) can `--compare` against it: the largest difference
in edge weights, absolute and relative to the largest edge.

Usage: python benchmarks/bench_graph.py [--prompt "The capital of France is"]
    [--transcoders runs/circuits/transcoders/sets/transcoder-batchtopk-k16-w1024] [--batch-size 32]
    [--max-feature-nodes N] [--threads N] [--repeat 1] [--save adj.pt] [--compare adj.pt]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from saelab.circuits.graph import attribute, prune
from saelab.cli.graph import prompt_ids
from saelab.core.devices import describe_machine
from saelab.core.models import load_model
from saelab.dictionaries.transcoders import load_transcoders

TRANSCODERS = "runs/circuits/transcoders/sets/transcoder-batchtopk-k16-w1024"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--transcoders", default=TRANSCODERS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-feature-nodes", type=int, default=None, help="default: every active feature")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--save", help="write the adjacency here (torch.save)")
    parser.add_argument("--compare", help="compare the adjacency with one written by --save")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(None, device="cpu")
    dset = load_transcoders(args.transcoders).to(lm.device)
    ids, has_bos = prompt_ids(lm, args.prompt)
    print(describe_machine(str(lm.model.dtype).removeprefix("torch.")))
    for _ in range(args.repeat):
        started = time.perf_counter()
        graph = attribute(
            lm,
            dset,
            ids,
            max_feature_nodes=args.max_feature_nodes,
            batch_size=args.batch_size,
            zero_bos=has_bos,
        )
        attributed = time.perf_counter()
        pruned = prune(graph)
        done = time.perf_counter()
        print(
            f"{graph.n_nodes:,} nodes ({graph.n_features:,} features, {graph.n_logits} logits), "
            f"{int((graph.adjacency != 0).sum()):,} edges, pruned to {int(pruned.node_mask.sum())} nodes; "
            f"attribute {attributed - started:.1f} s + prune {done - attributed:.1f} s = {done - started:.1f} s"
        )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    if args.save:
        torch.save({"features": graph.features, "adjacency": graph.adjacency}, args.save)
    if args.compare:
        _compare(graph, torch.load(args.compare, weights_only=True))
    return 0


def _compare(graph, reference: dict) -> None:
    if not torch.equal(graph.features, reference["features"]):
        print("compare: the feature nodes differ")
        return
    diff = (graph.adjacency.double() - reference["adjacency"].double()).abs().max()
    scale = reference["adjacency"].abs().max()
    print(
        f"compare: max |difference| {float(diff):.3g} (largest edge {float(scale):.3g}, ratio {float(diff / scale):.2g})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
