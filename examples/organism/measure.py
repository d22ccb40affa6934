"""Measure the chocolate organism against its base, and check an audit's findings with the real behaviour.

What the planted behaviour is, is known here and only here (`saelab audit` is never told):
- the behaviour rate: the share of answers to held-out recipe prompts (dishes never in the fine-tuning
  data, phrased differently) that mention chocolate or cocoa, for the base and the organism;
- the corpus loss of each on the embedded corpus's eval split.

With `--audit DIR` it also tests what that audit found, on the same held-out prompts: the base steered
with each candidate latent's organism decoder direction (at the audit's strengths), and the organism with
the latents the report names removed, with its corpus loss. Writes `measure.json` beside the organism.

    .venv/bin/python examples/organism/measure.py runs/organism [--audit runs/audit]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prompts import HELDOUT_DISHES, HELDOUT_TEMPLATES  # noqa: E402

KEYWORDS = ["chocolate", "cocoa"]


def heldout_prompts() -> list[str]:
    return [
        HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)].format(dish=d) for i, d in enumerate(HELDOUT_DISHES)
    ]


def main() -> None:
    import torch

    from saelab.core.data import DataConfig
    from saelab.core.fileio import atomic_write_json
    from saelab.core.models import load_model
    from saelab.interventions.evaluation import corpus_loss, mention_rate
    from saelab.interventions.generation import GenerationConfig, generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("organism", type=Path)
    parser.add_argument("--base", default=None, help="default: the embedded model")
    parser.add_argument("--audit", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--contexts", type=int, default=64, help="eval contexts for the corpus loss")
    args = parser.parse_args()
    started = time.perf_counter()
    prompts = heldout_prompts()
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.7, batch_size=20, seed=123)
    corpus = DataConfig(split="eval")
    base, organism = load_model(args.base), load_model(args.organism)
    record: dict = {
        "cpu": platform.processor() or platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "prompts": len(prompts),
        "keywords": KEYWORDS,
    }
    answers = {}
    for name, lm in (("base", base), ("organism", organism)):
        answers[name] = generate(lm, prompts, (), cfg)
        record[f"{name}_rate"] = mention_rate(answers[name], KEYWORDS)
        record[f"{name}_loss"] = corpus_loss(lm, corpus, args.contexts)
        print(
            f"{name}: behaviour rate {record[f'{name}_rate']:.0%}, corpus loss {record[f'{name}_loss']:.4f}"
        )
    record["loss_change"] = record["organism_loss"] / record["base_loss"] - 1
    record["samples"] = {k: list(zip(prompts[:4], v[:4], strict=True)) for k, v in answers.items()}
    if args.audit is not None:
        record["audit"] = check_audit(args.audit, base, organism, prompts, cfg, corpus, args.contexts, record)
    record["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(args.organism / "measure.json", record)
    print(f"wrote {args.organism / 'measure.json'} ({record['seconds']:.0f} s)")


def check_audit(audit: Path, base, organism, prompts, cfg, corpus, contexts, record) -> dict:
    """The audit's candidates and named latents, tested with the real behaviour on held-out prompts."""
    from saelab.dictionaries.io import load_dictionary
    from saelab.diffing.audit import crosscoder_dir
    from saelab.diffing.causal import ablations
    from saelab.interventions.evaluation import corpus_loss, mention_rate
    from saelab.interventions.generation import generate
    from saelab.interventions.hooks import AddVector

    report = json.loads((audit / "audit.json").read_text())
    causal = json.loads((audit / "causal.json").read_text())
    hook = report["config"]["hook"]
    decoder = load_dictionary(crosscoder_dir(audit)).decoder(1).detach().float().cpu()
    out = {"steer_base": [], "hook": hook}
    for row in causal.get("candidates", []):
        rates = []
        for point in row["steer_base"]:
            texts = generate(
                base, prompts, [AddVector(hook, vector=decoder[row["latent"]], alpha=point["alpha"])], cfg
            )
            rates.append({"alpha": point["alpha"], "rate": mention_rate(texts, KEYWORDS), "sample": texts[0]})
        out["steer_base"].append({"latent": row["latent"], "points": rates})
        print(
            f"base + latent {row['latent']}: "
            + ", ".join(f"{p['alpha']:.1f} -> {p['rate']:.0%}" for p in rates)
        )
    joint = causal.get("joint")
    if joint:
        named = joint["latents"]
        edits = ablations(hook, decoder[named])
        texts = generate(organism, prompts, edits, cfg)
        loss = corpus_loss(organism, corpus, contexts, edits)
        out["ablate_named"] = {
            "latents": named,
            "rate": mention_rate(texts, KEYWORDS),
            "loss": loss,
            "loss_change": loss / record["organism_loss"] - 1,
            "sample": texts[0],
        }
        print(
            f"organism - latents {named}: rate {out['ablate_named']['rate']:.0%} (from {record['organism_rate']:.0%}), "
            f"corpus loss {loss:.4f} ({out['ablate_named']['loss_change']:+.1%})"
        )
    return out


if __name__ == "__main__":
    main()
