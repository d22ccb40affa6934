"""Fluent dreaming (EPO) acceptance on the demo SAE: does it reach the dataset maximum fluently?

    python benchmarks/acceptance_dreaming.py OUT.json [--sae runs/demo/saes/topk-k32-w4608]
        [--latents 10] [--seed 0] [--iterations N] [--children N] [--threads 1] [--latent IDX ...]

Target: on 10 live latents, EPO reaches at least the latent's dataset maximum (the feature store's
max_act, the largest activation over the analysed tokens) on at least 5, with a prompt whose
cross-entropy is within 1 nat of the model's typical per-token loss on the corpus (eval.json's
ce_clean); and the same seed gives the same prompts (checked here by rerunning the first latent).

Latents: a seeded sample (random.Random(seed)) of the live latents whose density is between 1e-4 and
1e-2 (they fire on 1 in 10,000 to 1 in 100 analysed tokens: neither near-dead nor dense position or
format latents). Prints each latent's figures and the machine; writes every figure and every front to
OUT.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

MIN_DENSITY, MAX_DENSITY = 1e-4, 1e-2


def pick_latents(store, n: int, seed: int) -> list[dict]:
    rows = store.list_features(
        sort="idx", descending=False, limit=10**9, min_density=MIN_DENSITY, max_density=MAX_DENSITY,
        include_dead=False,
    )  # fmt: skip
    return sorted(random.Random(seed).sample(rows, min(n, len(rows))), key=lambda r: r["idx"])


def natural_ce(lm, seq_len: int, n: int = 200) -> list[float]:
    """The cross-entropy (as EPO measures it: BOS, then seq_len tokens, all scored) of the first seq_len
    tokens of the first n held-out corpus documents: what natural text of a prompt's length scores."""
    import torch
    import torch.nn.functional as F

    from saelab.core.data import iter_texts

    bos = lm.tokenizer.bos_token_id
    rows = []
    for text in iter_texts(None, split="eval"):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
        if len(ids) == seq_len:
            rows.append([bos, *ids])
        if len(rows) == n:
            break
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), 32):
            ids = torch.tensor(rows[s : s + 32])
            logits = lm.forward(ids).float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            out += loss.view(len(ids), -1).mean(-1).tolist()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the JSON of results")
    parser.add_argument("--sae", default="runs/demo/saes/topk-k32-w4608")
    parser.add_argument("--latents", type=int, default=10, help="how many latents to sample")
    parser.add_argument("--latent", type=int, action="append", help="these latents instead of a sample")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed and EPO's seed")
    parser.add_argument("--iterations", type=int, help="EPO iterations (default: DreamConfig's)")
    parser.add_argument("--children", type=int, help="children per member (default: DreamConfig's)")
    parser.add_argument("--position", default="last", choices=("last", "max"))
    parser.add_argument("--init", choices=("sample", "random"), help="the start (default: DreamConfig's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-repeat", action="store_true", help="skip the same-seed rerun of the first latent"
    )
    args = parser.parse_args()
    folder = Path(args.sae)
    if not (folder / "features.db").is_file() or not (folder / "eval.json").is_file():
        print(f"skipped: {folder} has no features.db / eval.json; run `make demo` first or pass --sae.")
        return 0

    import torch

    from saelab.analysis.store import FeatureStore
    from saelab.core.devices import describe_machine
    from saelab.core.models import load_model
    from saelab.dictionaries.io import load_dictionary
    from saelab.explain.dreaming import DreamConfig, dream, latent_target

    torch.set_num_threads(args.threads)
    lm = load_model()
    dictionary = load_dictionary(folder).to(lm.device).eval()
    store = FeatureStore(folder / "features.db", create=False)
    typical = float(json.loads((folder / "eval.json").read_text())["ce_clean"])
    limit = typical + 1.0
    changes = {
        k: v
        for k, v in (("iterations", args.iterations), ("children", args.children), ("init", args.init))
        if v is not None
    }
    cfg = DreamConfig(seed=args.seed, **changes)
    if args.latent:
        latents = [dict(store.feature(i), idx=i) for i in args.latent]
    else:
        latents = pick_latents(store, args.latents, args.seed)
    machine = describe_machine(str(lm.model.dtype).removeprefix("torch."))
    print(f"machine: {machine}")
    print(f"SAE {folder} at {dictionary.cfg.hook_name}; typical per-token loss (ce_clean) {typical:.3f} nats")
    print(f"config: {cfg.to_dict()}, position {args.position}")
    natural = sorted(natural_ce(lm, cfg.seq_len))
    median = natural[len(natural) // 2]
    share = sum(c <= limit for c in natural) / len(natural)
    print(
        f"natural text: the first {cfg.seq_len} tokens of {len(natural)} held-out documents have median CE "
        f"{median:.2f} nats; {share:.0%} are within typical + 1 = {limit:.2f}"
    )
    print(
        f"latents: {[r['idx'] for r in latents]} (density {MIN_DENSITY:g}..{MAX_DENSITY:g}, seed {args.seed})"
    )

    rows, fronts, start = [], {}, time.perf_counter()
    out = {
        "machine": machine,
        "sae": str(folder),
        "hook_name": dictionary.cfg.hook_name,
        "typical_ce": typical,
        "natural_ce_median": median,
        "natural_within_limit": share,
        "ce_limit": limit,
        "config": cfg.to_dict(),
        "position": args.position,
        "selection": {"min_density": MIN_DENSITY, "max_density": MAX_DENSITY, "seed": args.seed},
        "latents": rows,
        "fronts": fronts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for r in latents:
        idx = r["idx"]
        cpu = time.process_time()
        result = dream(lm, latent_target(dictionary, idx, position=args.position), cfg, progress=False)
        fluent = result.best(max_ce=limit)
        best = result.best()
        max_act = float(r["max_act"])
        row = {
            "latent": idx,
            "density": r["density"],
            "dataset_max": max_act,
            "reached": fluent is not None and fluent.activation >= max_act,
            "fluent_activation": fluent.activation if fluent else None,
            "fluent_ce": fluent.cross_entropy if fluent else None,
            "fluent_text": fluent.text if fluent else None,
            "fluent_ratio": fluent.activation / max_act if fluent else None,
            "best_activation": best.activation,
            "best_ce": best.cross_entropy,
            "best_text": best.text,
            "seconds": result.seconds,
            "cpu_seconds": time.process_time() - cpu,
            "seconds_per_iteration": result.seconds / cfg.iterations,
            "evaluations": result.evaluations,
            "rejected": result.rejected,
            "front_size": len(result.front),
        }
        rows.append(row)
        fronts[idx] = result.to_dict()
        shown = (
            "none"
            if fluent is None
            else f"{fluent.activation:.2f} (CE {fluent.cross_entropy:.2f}) {fluent.text!r}"
        )
        print(
            f"latent {idx:5d} density {r['density']:.2e} dataset max {max_act:.2f} | fluent best {shown} | "
            f"any CE: {best.activation:.2f} (CE {best.cross_entropy:.2f}) | "
            f"{'REACHED' if row['reached'] else 'not reached'} | {result.seconds:.0f} s "
            f"({row['cpu_seconds']:.0f} s CPU), {row['seconds_per_iteration']:.2f} s/it, "
            f"{result.evaluations} prompts"
        )
        sys.stdout.flush()
        Path(args.out).write_text(json.dumps(out, indent=1))  # after each latent: partial runs keep rows
    total = time.perf_counter() - start
    reached = sum(r["reached"] for r in rows)
    same = None
    if not args.no_repeat and latents:
        again = dream(
            lm, latent_target(dictionary, latents[0]["idx"], position=args.position), cfg, progress=False
        )
        first = fronts[latents[0]["idx"]]["front"]
        same = [d.token_ids for d in again.front] == [d["token_ids"] for d in first]
    cpu_minutes = sum(r["cpu_seconds"] for r in rows) / 60
    per_iteration = sum(r["seconds_per_iteration"] for r in rows) / max(len(rows), 1)
    print(
        f"reached the dataset max at CE <= {limit:.2f} on {reached} of {len(rows)} latents (target: >= 5 "
        f"of 10); {total / 60:.1f} min in all ({cpu_minutes:.1f} min CPU), {per_iteration:.2f} s per "
        f"iteration; same seed, same prompts: {same}"
    )
    out.update(reached=reached, minutes=total / 60, cpu_minutes=cpu_minutes, same_seed_same_prompts=same)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
