"""Explain and score many latents of an analysed SAE and report how far the labels can be trusted.

    python benchmarks/report_explain.py OUT_DIR [SAE_FOLDER] [--n 100] [--min-active 50]
        [--n-explain 40] [--n-test 20] [--n-neg 10] [--threads N]

Picks `--n` live latents at random (seeded) among those active on at least `--min-active` analysed
tokens, so that each has examples to explain from and to test on; explains them with the embedded
model (auto-interp) and scores every label with the four scorers beside chance and a shuffled label,
into a copy of the SAE's feature store (OUT_DIR/features.db; resumable: rerun the same command after an
interruption). Prints and writes (OUT_DIR/report.json, OUT_DIR/report.md):

- per scorer: the mean score, the mean shuffled control, chance, and the share of labels that beat
  both controls (not flagged);
- the per-latent table;
- ten labels with their top examples: the five best and the five worst by the mean of the scorers'
  margins over their shuffled controls.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("sae", nargs="?", type=Path, default=Path("runs/demo/saes/topk-k32-w4608"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--min-active", type=int, default=50)
    parser.add_argument("--n-explain", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--n-neg", type=int, default=10, help="random and hard non-activating examples each")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from saelab.analysis.store import FeatureStore
    from saelab.analysis.views import DisplayContext
    from saelab.cli.sae_inputs import with_models
    from saelab.core.devices import describe_machine
    from saelab.explain.clients import LocalClient
    from saelab.explain.pipeline import ExplainConfig, explain_features, score_means

    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "features.db"
    if not db.exists():
        shutil.copy(args.sae / "features.db", db)
    with FeatureStore(db, create=False) as store:
        n = store.count_features(include_dead=False)
        live = store.list_features(sort="idx", descending=False, limit=n, include_dead=False)
    pool = [r["idx"] for r in live if r["n_active"] >= args.min_active]
    chosen = sorted(random.Random(args.seed).sample(pool, min(args.n, len(pool))))
    _folder, dictionary, lm, _data = next(with_models([args.sae], None, None, "train", "auto", "auto"))
    client = LocalClient(lm=lm)
    cfg = ExplainConfig(
        features=chosen, n_explain=args.n_explain, n_test=args.n_test, n_random=args.n_neg,
        n_hard=args.n_neg, seed=args.seed,
    )  # fmt: skip
    clock = time.perf_counter()
    summary = explain_features(db, lm, dictionary, client, client, cfg)
    seconds = time.perf_counter() - clock
    means = score_means(summary)

    with FeatureStore(db, create=False) as store:
        context = DisplayContext.of(store)
        rows = []
        for idx in chosen:
            labels = [e for e in store.explanations(idx) if e["kind"] == "auto"]
            if not labels:
                continue
            e = min(labels, key=lambda e: e["id"])
            scores = {
                k: {f: v[f] for f in ("score", "shuffled", "chance", "flagged")}
                for k, v in e["scores"].items()
            }
            margin = [v["score"] - v["shuffled"] for v in scores.values()]
            top = [w for w in context.windows(store, idx, "top")[:3]]
            rows.append({
                "idx": idx, "label": e["text"], "scores": scores,
                "margin": sum(margin) / len(margin) if margin else None,
                "density": store.feature(idx)["density"],
                "top_examples": ["".join(t.text for t in w.tokens).replace("\n", "↵") for w in top],
                "top_tokens": [w.tokens[w.center].text if w.center is not None else "" for w in top],
            })  # fmt: skip
    scored = [r for r in rows if r["margin"] is not None]
    scored.sort(key=lambda r: -r["margin"])
    shown = scored[:5] + scored[-5:]
    report = {
        "machine": describe_machine(), "model_dtype": str(lm.model.dtype), "config": cfg.to_dict(),
        "latents": chosen, "pool": len(pool), "seconds": seconds, "means": means,
        "failures": [{k: v for k, v in f.items() if k != "raw"} for f in summary["failures"]], "rows": rows,
    }  # fmt: skip
    (args.out / "report.json").write_text(json.dumps(report, indent=1))

    lines = [
        f"{len(rows)} of {len(chosen)} latents labelled ({len(summary['failures'])} failures), "
        f"{seconds / 60:.1f} min in this invocation (work a previous, interrupted one stored is not "
        f"timed again) on {report['machine']} ({report['model_dtype']})",
        "",
        "| scorer | labels | mean score | chance | shuffled label | labels beating both controls |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in means.items():
        lines.append(f"| {name} | {m['n']} | {m['score']:.3f} | {m['chance']:.2f} | {m['shuffled']:.3f} | "
                     f"{100 * m['beat_controls']:.0f}% |")  # fmt: skip
    lines += ["", "| latent | label | detection | fuzzing | embedding | surprisal | top examples (activating token) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in shown:
        cells = []
        for name in ("detection", "fuzzing", "embedding", "surprisal"):
            s = r["scores"].get(name)
            cells.append(
                "–" if s is None else f"{s['score']:.2f} ({s['shuffled']:.2f}){' ⚠' if s['flagged'] else ''}"
            )
        examples = "<br>".join(
            f"`{ex[-60:]}` ({tok.strip()!r})"
            for ex, tok in zip(r["top_examples"], r["top_tokens"], strict=True)
        )
        lines.append(f"| {r['idx']} | {r['label'][:80]} | {' | '.join(cells)} | {examples} |")
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
