"""Crosscoders on paired synthetic activations with 50 planted B-only features: the acceptance of issue 14.

Trains an L1 and a BatchTopK crosscoder on one stream of the "paired_synthetic" source (shared features
in both models, some weaker in one of them, 50 features only in B, 10 only in A), then scores both on
held-out tokens against the planted truth:
- BatchTopK: the share of the 50 planted B-only features whose matched latent (decoder cosine >= 0.9)
  is tagged B-only (target >= 90%), and has ν^ε and ν^r < 0.2;
- L1: its B-only latents that match a *shared* feature (spurious: complete shrinkage or latent
  decoupling) and how many of them Latent Scaling rejects (ν^ε or ν^r >= 0.2).
Writes results.json and the Δnorm histograms and ν scatters into --out.

Usage: python benchmarks/bench_crosscoder_synthetic.py [--steps 1500] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch

from saelab.core.devices import describe_machine
from saelab.dictionaries import DictionaryConfig
from saelab.dictionaries.io import load_dictionary
from saelab.diffing import diff_latents
from saelab.diffing.plots import plot_delta_norm, plot_nu_scatter
from saelab.diffing.synthetic import (
    PAIRED_HOOK,
    PairedGroundTruth,
    PairedSyntheticConfig,
    held_out,
    planted_report,
    reconstruction_scores,
)
from saelab.training import TrainConfig, train

TARGET_TAGGED, TARGET_NU = 0.9, 0.2


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown").strip()
    return f"{model}, {fields.get('CPU(s)', '?').strip()} CPUs (lscpu)"


def groups(diff, report, truth, crosscoder) -> dict[str, torch.Tensor]:
    """The B-only latents split by what they match: a planted B-only feature, a shared one, nothing."""
    decoders = torch.nn.functional.normalize(crosscoder.normalized_decoders()[:, 1].double(), dim=1)
    b_only = diff.indices("b_only")  # live ones
    planted = truth.directions[1, truth.b_only]
    best = (decoders[b_only] @ planted.T).max(1).values
    spurious = torch.tensor(report["spurious_latents"], dtype=torch.long)
    matched = b_only[best >= report["match_cosine"]]
    rest = b_only[~torch.isin(b_only, torch.cat([matched, spurious]))]
    return {"match a planted B-only feature": matched, "match a shared feature": spurious, "unmatched": rest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of 1,024 paired tokens")
    parser.add_argument("--k", type=int, default=8, help="BatchTopK crosscoder: latents per token")
    parser.add_argument("--l1", type=float, default=1.0, help="L1 crosscoder: the penalty λ")
    parser.add_argument("--width", type=int, default=1024, help="latents of each crosscoder")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_crosscoder_synthetic"))
    args = parser.parse_args()

    data = PairedSyntheticConfig()
    dictionaries = [
        DictionaryConfig(architecture="crosscoder_batchtopk", k=args.k, d_in=0, d_sae=args.width,
                         hook_name=PAIRED_HOOK, layers=[0, 1]),
        DictionaryConfig(architecture="crosscoder", l1_coefficient=args.l1, d_in=0, d_sae=args.width,
                         hook_name=PAIRED_HOOK, layers=[0, 1]),
    ]  # fmt: skip
    cfg = TrainConfig(
        run_dir=str(args.out / "run"), source=data.as_source(), dictionaries=dictionaries,
        n_tokens=args.steps * 1024, batch_size=1024, lr=3e-3, log_every=100,
    )  # fmt: skip
    print(describe_machine("float32"))
    print(lscpu_model())
    print(f"data: {json.dumps(data.to_dict())}")
    start = time.perf_counter()
    saved = train(cfg, overwrite=True, progress=False)
    train_seconds = time.perf_counter() - start
    print(f"trained both crosscoders ({args.steps} steps x 1,024 tokens) in {train_seconds:.0f} s")

    truth = PairedGroundTruth(data)
    x = held_out(data, args.eval_tokens, truth)
    batches = [x[i : i + 4096] for i in range(0, x.shape[0], 4096)]
    results = {"machine": describe_machine("float32"), "cpu": lscpu_model(), "data": data.to_dict()}
    results["train_seconds"] = round(train_seconds, 1)
    for name, folder in saved.items():
        crosscoder = load_dictionary(folder)
        family = crosscoder.cfg.architecture
        start = time.perf_counter()
        diff = diff_latents(crosscoder, batches)
        seconds = time.perf_counter() - start
        report = planted_report(crosscoder, truth, diff)
        report.update(
            reconstruction_scores(crosscoder, x), counts=diff.counts(), analysis_seconds=round(seconds, 2)
        )
        results[family] = report
        diff.save_json(args.out / f"latents_{family}.json")
        plot_delta_norm(diff, args.out / f"delta_norm_{family}.png", title=f"{name}: Δnorm")
        plot_nu_scatter(
            diff, args.out / f"nu_{family}.png", groups=groups(diff, report, truth, crosscoder),
            title=f"{name}: Latent Scaling of B-only latents",
        )  # fmt: skip

    print()
    print(
        "| crosscoder | FVU A, B | L0 | live latents: shared / A-only / B-only / other (dead) | planted B-only tagged B-only "
        "| ... and ν^ε, ν^r < 0.2 | B-only latents matching a shared feature | of them rejected by ν |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family in ("crosscoder_batchtopk", "crosscoder"):
        r = results[family]
        p, b, c = r["planted_b_only"], r["b_only_latents"], r["counts"]
        print(
            f"| {family} | {r['fvu'][0]:.3f}, {r['fvu'][1]:.3f} | {r['l0']:.1f} | "
            f"{c['shared']} / {c['a_only']} / {c['b_only']} / {c['other']} ({c['dead']}) | {p['tagged_b_only']}/{p['n']} "
            f"| {p['nu_below_threshold']}/{p['n']} | {b['spurious']} | {b['spurious_rejected']} |"
        )
    btk, l1 = results["crosscoder_batchtopk"], results["crosscoder"]
    checks = {
        f"BatchTopK tags >= {TARGET_TAGGED:.0%} of the planted B-only features B-only": btk["planted_b_only"][
            "share_tagged_b_only"
        ]
        >= TARGET_TAGGED,
        f"... with ν^ε and ν^r < {TARGET_NU}": btk["planted_b_only"]["share_nu_below_threshold"]
        >= TARGET_TAGGED,
        "the L1 crosscoder has spurious B-only latents": l1["b_only_latents"]["spurious"] > 0,
        "Latent Scaling rejects all of them": l1["b_only_latents"]["spurious"] > 0
        and l1["b_only_latents"]["spurious_rejected"] == l1["b_only_latents"]["spurious"],
    }
    for check, ok in checks.items():
        print(f"{'met' if ok else 'NOT met'}: {check}")
    results["checks"] = checks
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results, plots and per-latent tables in {args.out}")


if __name__ == "__main__":
    main()
