"""Find a sentiment direction, probe for sentiment later in the model, ablate the direction, steer with it.

On the embedded SmolLM2-135M-Instruct, with 72 positive and 72 negative short reviews
(saelab/interventions/prompts/probe_sentiment.json) split 75/25 into train and held-out prompts:

1. a mean-difference direction at a middle layer's resid_pre, last prompt token (training prompts only);
2. a logistic-regression probe at a later hook (training prompts), scored on the held-out prompts;
3. the same probe, and a probe retrained from scratch, with a direction ablated from every write to
   the residual stream (`ablation(lm, d)`): the middle-layer direction, the probe's own direction and
   the mean difference at the probe's hook (and, for contrast, a probe retrained on the clean
   activations with the direction projected out at the probe's hook only);
4. adding the middle-layer direction (times alpha) to held-out NEGATIVE prompts: the share the probe
   then calls positive (and subtracting it from held-out positive prompts);
5. the model's weights orthogonalized against the middle-layer direction, written as a HF folder,
   reloaded, and compared with runtime ablation (max |logit difference|).

    OMP_NUM_THREADS=1 .venv/bin/python examples/probe_ablation.py

Prints a table and writes runs/steering/probe_ablation.json. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from saelab.core.models import load_model
from saelab.core.prompts import encode_left_padded, format_prompts, load_prompts
from saelab.interventions.directions import mean_difference
from saelab.interventions.hooks import AddVector, ablation, steer
from saelab.interventions.orthogonalize import write_orthogonalized
from saelab.interventions.probes import (
    ablation_check,
    fraction_predicted,
    probe_activations,
    stratified_split,
)

PROMPTS = (
    Path(__file__).resolve().parents[1] / "saelab" / "interventions" / "prompts" / "probe_sentiment.json"
)


def split_prompts(pos: list[str], neg: list[str], test_fraction: float, seed: int):
    """The train / held-out split `train_probe` (and so `ablation_check`) will use, as prompt lists."""
    y = torch.tensor([1] * len(pos) + [0] * len(neg))
    tr, te = stratified_split(y, test_fraction, seed)
    everything = pos + neg

    def pick(idx, label):
        return [everything[i] for i in idx.tolist() if int(y[i]) == label]

    return pick(tr, 1), pick(tr, 0), pick(te, 1), pick(te, 0)


def crossing(lm, probe, prompts, hook, direction, alphas, label):
    """Share of `prompts` the probe assigns to `label` when alpha * direction is added at `hook`."""
    return {
        alpha: fraction_predicted(
            lm, probe, prompts, label=label, interventions=[AddVector(hook, vector=direction, alpha=alpha)]
        )
        for alpha in alphas
    }


@torch.no_grad()
def orthogonalization_gap(lm, direction, prompts, folder: Path, provenance: dict) -> dict:
    """Write the orthogonalized model, reload it, and compare its logits with runtime ablation."""
    start = time.time()
    write_orthogonalized(lm, direction, folder, provenance=provenance, overwrite=True)
    written = time.time() - start
    new = load_model(folder, device=str(lm.device))
    ids, mask = encode_left_padded(lm.tokenizer, format_prompts(lm.tokenizer, prompts, True), lm.device)
    real = mask.bool()
    with steer(lm, ablation(lm, direction)):
        runtime = lm.forward(ids, mask)[real]
    clean = lm.forward(ids, mask)[real]
    ortho = new.forward(ids, mask)[real]
    return {
        "prompts": len(prompts),
        "tokens": int(real.sum()),
        "max_abs_logit_diff_vs_runtime_ablation": float((ortho - runtime).abs().max()),
        "max_abs_logit_diff_clean_vs_runtime_ablation": float((clean - runtime).abs().max()),
        "max_abs_logit": float(runtime.abs().max()),
        "unembedding_unchanged": bool(torch.equal(new.unembed.cpu(), lm.unembed.cpu())),
        "same_argmax_share": float((ortho.argmax(-1) == runtime.argmax(-1)).float().mean()),
        "write_seconds": round(written, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction-layer", type=int, default=15, help="resid_pre layer of the direction")
    parser.add_argument("--probe-hook", default="blocks.20.hook_resid_post")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--out", default="runs/steering/probe_ablation.json")
    parser.add_argument("--keep-model", default=None, help="folder to keep the orthogonalized model in")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    lm = load_model(None, device=args.device, dtype=torch.float32)
    pos, neg = load_prompts(PROMPTS, "positive"), load_prompts(PROMPTS, "negative")
    pos_tr, neg_tr, pos_te, neg_te = split_prompts(pos, neg, args.test_fraction, args.seed)
    dir_hook = f"blocks.{args.direction_layer}.hook_resid_pre"
    t0 = time.time()

    # 1. The direction, from the training prompts only.
    found = mean_difference(
        lm,
        pos_tr,
        neg_tr,
        hooks=[dir_hook],
        positions=(-1,),
        set_names=("positive reviews", "negative reviews"),
    )
    direction = found.get(dir_hook, -1)
    X_dir, y_dir = probe_activations(lm, pos, neg, dir_hook)
    proj = X_dir @ (direction / direction.norm())
    te_mask = torch.zeros(len(y_dir), dtype=torch.bool)

    # 2-3. Probe at the later hook, and the ablations (same split: ablation_check uses train_probe's).
    name = f"mean_difference@{dir_hook}"
    check = ablation_check(
        lm, pos, neg, args.probe_hook, {name: direction}, test_fraction=args.test_fraction, seed=args.seed
    )
    probe = check.clean
    te_mask[probe.test_idx] = True
    # How well the direction alone separates held-out prompts at its own layer (threshold: midpoint of train means).
    tr_mask = ~te_mask
    mid = 0.5 * (proj[tr_mask & (y_dir == 1)].mean() + proj[tr_mask & (y_dir == 0)].mean())
    direction_accuracy = float(((proj[te_mask] > mid).long() == y_dir[te_mask]).float().mean())

    # 4. Steering held-out prompts across the probe's boundary.
    neg_to_pos = crossing(lm, probe, neg_te, dir_hook, direction, args.alphas, label=1)
    pos_to_neg = crossing(lm, probe, pos_te, dir_hook, direction, [-a for a in args.alphas], label=0)
    steering_seconds = time.time() - t0

    # 5. Weight orthogonalization against the same direction.
    provenance = {
        **found.provenance,
        "hook": dir_hook,
        "position": -1,
        "example": "examples/probe_ablation.py",
    }
    with tempfile.TemporaryDirectory(prefix="saelab-orth-") as tmp:
        folder = Path(args.keep_model) if args.keep_model else Path(tmp) / "smollm2-orthogonalized"
        ortho = orthogonalization_gap(lm, direction, pos_te[:3] + neg_te[:3], folder, provenance)

    result = {
        "model": lm.name,
        "prompts": {
            "file": str(PROMPTS.name),
            "train": [len(pos_tr), len(neg_tr)],
            "held_out": [len(pos_te), len(neg_te)],
        },
        "direction": {
            "hook": dir_hook,
            "position": -1,
            "norm": float(direction.norm()),
            "held_out_accuracy_of_projection": direction_accuracy,
        },
        "probe_check": check.to_dict(),
        "probe_converged": probe.converged,
        "steering": {
            "hook": dir_hook,
            "rows": [
                {
                    "alpha": a,
                    "held_out_negative_called_positive_after_adding": neg_to_pos[a],
                    "held_out_positive_called_negative_after_subtracting": pos_to_neg[-a],
                }
                for a in args.alphas
            ],
        },
        "orthogonalization": ortho,
        "seconds": {"probing_and_steering": round(steering_seconds, 1)},
        "command": "OMP_NUM_THREADS=1 .venv/bin/python examples/probe_ablation.py",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"direction: {dir_hook}, last token, norm {direction.norm():.2f}; "
        f"alone it classifies held-out prompts with accuracy {direction_accuracy:.3f}"
    )
    print(check.table())
    print(f"\nadding alpha * direction at {dir_hook} (held-out prompts):")
    print(f"{'alpha':>6} {'negative -> positive':>21} {'positive -> negative (-alpha)':>30}")
    for a in args.alphas:
        print(f"{a:>6} {neg_to_pos[a]:>21.3f} {pos_to_neg[-a]:>30.3f}")
    print(
        f"\northogonalized weights vs runtime ablation on {ortho['prompts']} prompts ({ortho['tokens']} tokens): "
        f"max |logit diff| {ortho['max_abs_logit_diff_vs_runtime_ablation']:.2e} "
        f"(ablation itself moves logits by up to {ortho['max_abs_logit_diff_clean_vs_runtime_ablation']:.2f}; "
        f"max |logit| {ortho['max_abs_logit']:.1f}); unembedding unchanged: {ortho['unembedding_unchanged']}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
