"""Acceptance of self-explanation: do single-token latents name their token, and random directions not?

    python benchmarks/acceptance_self_explain.py OUT.json [--sae runs/demo/saes/topk-k32-w4608]
        [--max-latents 50] [--min-share 0.7] [--min-examples 10] [--seed 0] [--calibrate | --only-calibrate]

Target: "On latents that mostly fire on one token, that token appears among the top 5 tokens of the
self-explanation for at least 30% of latents, against at most 5% for random directions of the same norm."

* **Single-token latents**: from the feature store's top and quantile examples, the share of examples
  whose activating token (`token`) is the most common one; latents with share >= --min-share over at
  least --min-examples examples, whose token is not whitespace or special. Up to --max-latents of them,
  a seeded sample.
* **Random directions**: one Gaussian direction per chosen latent (seeded), the norm of its decoder row,
  scored against the same token as that latent: the chance of naming a token without being given it.
* **Hit** (the definitions of `saelab.explain.selfexplain`): ``top5``: one of the 5 most likely first
  explanation tokens at the chosen scale has the token's text (whitespace stripped, case folded);
  ``top5_id``: the exact token id is among them; ``samples``: the token's text is in one of the sampled
  replies (a whole word for letters and digits, case folded, else a substring); ``any_scale``: ``top5`` at
  some scale of the sweep (what a perfect scale choice would give; not the target).
* ``--calibrate`` also runs the layer calibration behind `default_layer`, on no SAE latent: the layer-15
  residual of common words (each in a sentence of its own, mean-centred like a decoder row) injected at
  several layers, scored by the same ``top5`` rule.

Default settings throughout (`SelfExplainConfig()`): nothing here is tuned on the outcome. Prints the
figures with the machine; writes every figure and every latent's row to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

WORDS = (
    "Paris cat function red water king music computer tree money happy blue dog house car book sun river bread "
    "doctor garden window school table apple horse ocean city mountain friend teacher chair phone letter night "
    "summer winter island bridge fire"
)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def single_token_latents(store, special: set[int], min_share: float, min_examples: int) -> list[dict]:
    out = []
    for row in store.list_features(include_dead=False, limit=1_000_000):
        tokens = [e["token"] for kind in ("top", "quantile") for e in store.examples(row["idx"], kind)]
        if len(tokens) < min_examples:
            continue
        token, count = Counter(tokens).most_common(1)[0]
        if count / len(tokens) >= min_share and token not in special:
            out.append({"idx": row["idx"], "token": token, "share": count / len(tokens), "n": len(tokens)})
    return out


def hits(text: str, token_id: int, results, points) -> dict:
    key = text.strip().casefold()
    chosen = results[0].source["chosen"]
    words = re.escape(key)
    pattern = re.compile(rf"(?<!\w){words}(?!\w)" if re.fullmatch(r"\w+", key) else words)
    return {
        "top5": key in [t.strip().casefold() for t in chosen["top_tokens"]],
        "top5_id": token_id in chosen["top_ids"],
        "samples": any(pattern.search(r.raw.casefold()) for r in results),
        "any_scale": any(key in [t.strip().casefold() for t in p["top_tokens"]] for p in points[1:]),
    }


def rates(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        k: (sum(r["hit"][k] for r in rows) / n if n else None)
        for k in ("top5", "top5_id", "samples", "any_scale")
    }


def calibrate(lm, layers) -> list[dict]:
    import torch

    from saelab.core.data import exclusion_mask, token_batches
    from saelab.explain.selfexplain import RULES, SelfExplainConfig, SelfExplainer

    tok, src = lm.tokenizer, "blocks.15.hook_resid_post"
    total, count = 0, 0
    for ids in token_batches(None, tok, 128, 16, split="eval", max_contexts=16):
        acts = lm.capture(ids, src)[src].float()
        keep = ~exclusion_mask(ids, tok).to(acts.device)
        total, count = total + acts[keep].sum(0), count + int(keep.sum())
    mean, vectors = total / count, {}
    for w in WORDS.split():
        (wid,) = tok(" " + w, add_special_tokens=False)["input_ids"]
        ids = tok(f"{tok.bos_token or ''}I wrote the word {w} on the wall.", add_special_tokens=False)[
            "input_ids"
        ]
        vectors[w] = lm.capture(torch.tensor([ids]), src)[src][0, ids.index(wid)].float() - mean
    out = []
    for layer in layers:
        base = SelfExplainer(lm, SelfExplainConfig(layer=layer))
        rules = {r: SelfExplainer(lm, SelfExplainConfig(layer=layer, rule=r), norm=base.norm) for r in RULES}
        named = {"any_scale": 0} | {r: 0 for r in RULES}
        for w, d in vectors.items():
            points = base.sweep(d)
            found = [w.casefold() in [t.strip().casefold() for t in p.top_tokens] for p in points]
            named["any_scale"] += any(found[1:])
            for r, ex in rules.items():
                named[r] += found[points.index(ex.choose(points))]
        out.append({"layer": layer, "words": len(vectors), "named": named})
        print(f"  layer {layer:2d} (of {len(vectors)} words) named at the scale chosen by "
              + ", ".join(f"{r} {named[r]}" for r in RULES) + f"; at some scale {named['any_scale']}")  # fmt: skip
    return out


def acceptance(lm, folder: Path, args) -> dict:
    import torch

    from saelab.analysis.store import FeatureStore
    from saelab.core.models import special_token_ids
    from saelab.dictionaries.io import load_dictionary
    from saelab.explain.selfexplain import SelfExplainConfig, SelfExplainer

    special = special_token_ids(lm.tokenizer)
    with FeatureStore(folder / "features.db", create=False) as store:
        candidates = single_token_latents(store, special, args.min_share, args.min_examples)
    candidates = [c for c in candidates if lm.tokenizer.decode([c["token"]]).strip()]
    chosen = sorted(random.Random(args.seed).sample(candidates, min(args.max_latents, len(candidates))),
                    key=lambda c: c["idx"])  # fmt: skip
    print(f"{len(candidates)} live latents fire on one token in >= {args.min_share:.0%} of their "
          f"(>= {args.min_examples}) stored examples; using {len(chosen)}")  # fmt: skip
    dictionary = load_dictionary(folder)
    t0 = time.perf_counter()
    explainer = SelfExplainer(lm, SelfExplainConfig())
    setup = time.perf_counter() - t0
    print(f"injection at {explainer.hook}, typical norm {explainer.norm:.1f} (measured in {setup:.1f} s), "
          f"scales {list(explainer.cfg.scales)}, rule {explainer.cfg.rule}")  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    rows = {"latent": [], "random": []}
    for kind in ("latent", "random"):
        t0 = time.perf_counter()
        for c in chosen:
            row_dir = dictionary.W_dec[c["idx"]].detach().float().cpu()
            if kind == "random":
                rand = torch.randn(row_dir.shape, generator=gen)
                row_dir = rand / rand.norm() * row_dir.norm()
            results = explainer.explain(row_dir)
            text = lm.tokenizer.decode([c["token"]])
            points = results[0].source["sweep"]
            rows[kind].append({
                **c, "token_text": text, "scale": results[0].source["scale"],
                "top5": results[0].source["chosen"]["top_tokens"], "hit": hits(text, c["token"], results, points),
                "labels": [r.text for r in results], "raw": [r.raw for r in results],
            })  # fmt: skip
        per = (time.perf_counter() - t0) / max(1, len(chosen))
        rows[kind + "_seconds_per_direction"] = per
        r = rates(rows[kind])
        print(f"{kind:>6}: n={len(chosen)}  top-5 (text) {r['top5']:.1%}  top-5 (id) {r['top5_id']:.1%}  "
              f"in samples {r['samples']:.1%}  top-5 at some scale {r['any_scale']:.1%}  "
              f"({per:.2f} s per direction)")  # fmt: skip
    examples = [(r["token_text"], r["top5"], r["labels"][:2]) for r in rows["latent"][:8]]
    for token, top, labels in examples:
        print(f"  {token!r:>14} -> top-5 {top}  labels {labels}")
    target = rates(rows["latent"])["top5"] >= 0.30 and rates(rows["random"])["top5"] <= 0.05
    result = {
        "settings": explainer.settings(), "sae": str(folder),
        "selection": {"min_share": args.min_share, "min_examples": args.min_examples, "seed": args.seed,
                      "candidates": len(candidates), "used": len(chosen)},
        "rates": {"latent": rates(rows["latent"]), "random": rates(rows["random"])},
        "seconds_per_direction": {k: rows[k + "_seconds_per_direction"] for k in ("latent", "random")},
        "norm_seconds": setup, "target_met": target, "rows": {k: rows[k] for k in ("latent", "random")},
    }  # fmt: skip
    print(
        f"target (>= 30% of latents, <= 5% of random directions, top-5 by text): {'met' if target else 'NOT met'}"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the JSON of results")
    parser.add_argument("--sae", default="runs/demo/saes/topk-k32-w4608")
    parser.add_argument("--max-latents", type=int, default=50)
    parser.add_argument("--min-share", type=float, default=0.7)
    parser.add_argument("--min-examples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate", action="store_true", help="also run the layer calibration")
    parser.add_argument("--only-calibrate", action="store_true", help="run the layer calibration only")
    args = parser.parse_args()
    folder = Path(args.sae)
    if not (folder / "features.db").is_file():
        print(f"skipped: {folder} has no features.db; run `make demo` (or saelab analyze) first.")
        return 0

    import torch

    torch.set_num_threads(1)  # leave a core to the rest of the machine
    from saelab.core.models import load_model

    lm = load_model()  # device and dtype "auto"
    machine = {
        "cpu": cpu_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "dtype": str(lm.model.dtype).removeprefix("torch."),
        "device": str(lm.device), "python": sys.version.split()[0], "torch": torch.__version__,
    }  # fmt: skip
    print(f"{machine['cpu']}, torch CPU capability {machine['torch_cpu_capability']}, "
          f"{machine['threads']} thread, {lm.name} in {machine['dtype']} on {machine['device']}")  # fmt: skip
    result = {"machine": machine}
    if not args.only_calibrate:
        result |= acceptance(lm, folder, args)
    if args.calibrate or args.only_calibrate:
        print("layer calibration (layer-15 residuals of 40 words, mean-centred, no SAE):")
        result["calibration"] = calibrate(lm, (1, 2, 3))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
