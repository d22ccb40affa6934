"""Planted features: do true labels beat shuffled ones when the embedded model judges them?

    python benchmarks/acceptance_planted.py OUT_DIR [--tokens 262144] [--n-test 20] [--n-neg 10]
        [--scorer surprisal ...] [--no-repeat] [--no-auto]

1. plants a dictionary whose latents are known token indicators on the embedded corpus
   (`saelab.toy.planted`: digits, animal words, closing brackets, capitalised words, `self`, Python
   keywords, negations, commas) at blocks.0.hook_resid_pre of SmolLM2-135M-Instruct, and reports how
   exactly each latent matches its concept over the vocabulary and over corpus occurrences;
2. analyses it into a feature store (the one streaming pass), stores each latent's true label as a
   'human' explanation, and scores them with every scorer, the embedded model as judge, each beside
   another latent's true label (the shuffled control);
3. repeats the scoring on a copy of the store with the same seed and checks the score rows are
   byte-identical;
4. lets the embedded model explain the latents itself ('auto' labels) and scores those the same way.

Prints, per scorer, the mean AUC over latents of the true and of the shuffled labels, each with a 95%
bootstrap interval (items resampled within each latent, 2,000 resamples), whether the intervals
overlap, and per latent the AUCs; writes everything to OUT_DIR/planted_report.json. For detection and
fuzzing, whose headline is a balanced accuracy, the AUC is that of the judge's log P(Yes) - log P(No).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def item_aucs(details: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, true margins, shuffled margins) of one stored score's items."""
    items = details["items"]
    labels = np.array([bool(i[1]) for i in items])
    return labels, np.array([i[2] for i in items], float), np.array([i[3] for i in items], float)


def auc(labels: np.ndarray, margins: np.ndarray) -> float:
    pos, neg = margins[labels], margins[~labels]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def bootstrap_means(per_latent: list, n: int = 2000, seed: int = 0) -> dict:
    """Mean AUC over latents (true, shuffled) with 95% intervals, items resampled within each latent."""
    rng = np.random.default_rng(seed)
    true = [auc(lab, t) for lab, t, _ in per_latent]
    shuffled = [auc(lab, s) for lab, _, s in per_latent]
    draws_t, draws_s = [], []
    for _ in range(n):
        ts, ss = [], []
        for lab, t, s in per_latent:
            pick = rng.integers(0, len(lab), len(lab))
            if lab[pick].all() or not lab[pick].any():
                pick = np.arange(len(lab))
            ts.append(auc(lab[pick], t[pick]))
            ss.append(auc(lab[pick], s[pick]))
        draws_t.append(np.mean(ts))
        draws_s.append(np.mean(ss))
    lo_t, hi_t = np.percentile(draws_t, [2.5, 97.5])
    lo_s, hi_s = np.percentile(draws_s, [2.5, 97.5])
    return {
        "true": float(np.mean(true)), "true_ci": [float(lo_t), float(hi_t)],
        "shuffled": float(np.mean(shuffled)), "shuffled_ci": [float(lo_s), float(hi_s)],
        "separated": bool(lo_t > hi_s), "per_latent_true": true, "per_latent_shuffled": shuffled,
    }  # fmt: skip


def collect(store_path: Path, kind: str, scorers: list[str]) -> dict:
    from saelab.analysis.store import FeatureStore

    out = {}
    with FeatureStore(store_path, create=False) as store:
        n = store.count_features()
        for scorer in scorers:
            per_latent, labels = [], []
            for idx in range(n):
                found = [e for e in store.explanations(idx) if e["kind"] == kind and scorer in e["scores"]]
                if found:
                    e = min(found, key=lambda e: e["id"])
                    per_latent.append(item_aucs(e["scores"][scorer]["details"]))
                    labels.append((idx, e["text"]))
            if len(per_latent) >= 2:
                out[scorer] = bootstrap_means(per_latent) | {"latents": labels}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=262_144, help="tokens analysed (and counted)")
    parser.add_argument("--n-test", type=int, default=20, help="activating test examples per latent")
    parser.add_argument("--n-neg", type=int, default=10, help="random and hard non-activating examples each")
    parser.add_argument("--no-auto", action="store_true", help="skip step 4 (the model's own labels)")
    parser.add_argument("--no-repeat", action="store_true", help="skip step 3 (the same-seed repeat)")
    parser.add_argument("--scorer", action="append", choices=["detection", "fuzzing", "embedding", "surprisal"],
                        help="score with these only (default: all four)")  # fmt: skip
    args = parser.parse_args()

    import torch

    from saelab.analysis.features import AnalysisConfig, analyze
    from saelab.analysis.store import FeatureStore
    from saelab.core.data import DataConfig
    from saelab.core.devices import describe_machine
    from saelab.core.models import load_model
    from saelab.dictionaries.io import save_dictionary
    from saelab.explain.clients import LocalClient
    from saelab.explain.pipeline import ExplainConfig, explain_features, score_explanations
    from saelab.toy.planted import plant

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": describe_machine(), "torch_threads": torch.get_num_threads()}
    print(report["machine"], f"torch threads {torch.get_num_threads()}")
    clock = time.perf_counter()
    lm = load_model()
    report["dtype"] = str(lm.model.dtype)
    data = DataConfig()
    counts = torch.zeros(lm.model.get_input_embeddings().weight.shape[0], dtype=torch.float64)
    seen = 0
    for batch in data.batches(lm.tokenizer, 32):
        counts += torch.bincount(batch.flatten(), minlength=len(counts)).double()[: len(counts)]
        seen += batch.numel()
        if seen >= args.tokens:
            break
    planted = plant(lm, token_counts=counts)
    folder = args.out / "planted"
    shutil.rmtree(folder, ignore_errors=True)
    save_dictionary(planted.dictionary, folder)
    tokens = torch.cat([b.flatten() for b, _ in zip(data.batches(lm.tokenizer, 32), range(64), strict=False)])
    report["exactness"] = planted.report(tokens)
    report["plant_seconds"] = time.perf_counter() - clock
    for r in report["exactness"]:
        print(f"  latent {r['latent']} {r['concept']:17s} members {r['n_members']:6d} vocab P/R "
              f"{r['vocab_precision']:.3f}/{r['vocab_recall']:.3f}  corpus P/R {r['corpus_precision']:.3f}/"
              f"{r['corpus_recall']:.3f} ({r['corpus_occurrences']} occurrences in {len(tokens):,} tokens)")  # fmt: skip

    clock = time.perf_counter()
    store_path = folder / "features.db"
    analyze(lm, planted.dictionary, data, AnalysisConfig(n_tokens=args.tokens), store_path, progress=True)
    report["analyse_seconds"] = time.perf_counter() - clock
    with FeatureStore(store_path) as store:
        for i, concept in enumerate(planted.concepts):
            store.add_explanation(i, concept.label, "human", {"planted": concept.name})
    copy = args.out / "repeat.db"
    shutil.copy(store_path, copy)

    scorers = args.scorer or ["detection", "fuzzing", "embedding", "surprisal"]
    cfg = ExplainConfig(
        features=list(range(len(planted.concepts))), n_test=args.n_test, n_random=args.n_neg,
        n_hard=args.n_neg, n_explain=20, scorers=tuple(scorers), n_bootstrap=1000, seed=0,
    )  # fmt: skip
    judge = LocalClient(lm=lm)
    report["judge"] = judge.describe()
    clock = time.perf_counter()
    first = score_explanations(store_path, lm, planted.dictionary, judge, cfg, kinds=("human",))
    report["score_seconds"] = time.perf_counter() - clock
    report["failures"] = first["failures"]
    if not args.no_repeat:
        score_explanations(copy, lm, planted.dictionary, judge, cfg, kinds=("human",), progress=False)
        with FeatureStore(store_path) as a, FeatureStore(copy) as b:
            report["repeat_byte_identical"] = a.dump()["scores"] == b.dump()["scores"]
    report["true_labels"] = collect(store_path, "human", scorers)

    if not args.no_auto:
        clock = time.perf_counter()
        explain_features(store_path, lm, planted.dictionary, judge, judge, cfg)
        report["auto_seconds"] = time.perf_counter() - clock
        report["auto_labels"] = collect(store_path, "auto", scorers)

    print(f"\njudge: {judge.describe()['model']} ({report['dtype']}); {report['machine']}")
    if "repeat_byte_identical" in report:
        print(f"same seed, second run: score rows byte-identical = {report['repeat_byte_identical']}")
    for title, key in (("true labels", "true_labels"), ("the model's own labels", "auto_labels")):
        if key not in report:
            continue
        print(f"\n{title}: mean AUC over latents [95% bootstrap interval]")
        for scorer, r in report[key].items():
            print(f"  {scorer:10s} {r['true']:.3f} [{r['true_ci'][0]:.3f}, {r['true_ci'][1]:.3f}]  shuffled "
                  f"{r['shuffled']:.3f} [{r['shuffled_ci'][0]:.3f}, {r['shuffled_ci'][1]:.3f}]  "
                  f"{'separated' if r['separated'] else 'intervals overlap'}")  # fmt: skip
            for (idx, text), t, s in zip(
                r["latents"], r["per_latent_true"], r["per_latent_shuffled"], strict=True
            ):
                print(f"      {idx} {text[:60]!r}: {t:.2f} vs {s:.2f}")
    (args.out / "planted_report.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nreport in {args.out / 'planted_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
