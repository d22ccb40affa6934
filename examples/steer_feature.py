"""Topic steering with one SAE feature clamped high (and added), on the embedded SmolLM2-135M-Instruct.

1. Find a topic feature by text search: encode the topic's prompts and the neutral prompts (as
   plain text, the first token, an attention sink, left out), and rank latents of the demo SAE
   (blocks.15.hook_resid_post) by mean activation on topic text minus neutral text. Each candidate
   is shown with its top examples from the feature store (`saelab analyze`), and the first one
   whose top examples peak on a topic keyword (at least half of its top 10) is taken, unless
   `--feature` names one.
2. Sweep the feature's value, in multiples of its largest activation seen in the store:
   `ClampFeature` (the latent set to the value at every position, the SAE error kept) and
   `add_feature` (value x its decoder row added at every position). Strength 0 is the unsteered
   model. Report the mention rate of the topic's keywords over 50 neutral prompts, and the mean
   per-token loss of the completions under the unsteered model.

Writes runs/steering/feature_<topic>_<index>_<clamp|add>.json (+ .png) and ..._search.json.

    OMP_NUM_THREADS=1 python examples/steer_feature.py --topic messages
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saelab.core.models import load_model
from saelab.core.prompts import encode_left_padded
from saelab.dictionaries.io import load_dictionary
from saelab.interventions.evaluation import best_strength, keyword_pattern, plot_sweep, steering_sweep
from saelab.interventions.generation import GenerationConfig
from saelab.interventions.hooks import ClampFeature, add_feature

PROMPTS = Path(__file__).resolve().parents[1] / "saelab" / "interventions" / "prompts"


def load_topic(name: str) -> dict:
    return json.loads((PROMPTS / f"topic_{name}.json").read_text())


@torch.no_grad()
def latent_tokens(lm, sae, texts: list[str]) -> torch.Tensor:
    """Latent activations [n_tokens, d_sae] over the real tokens of `texts`, first token of each left out."""
    ids, mask = encode_left_padded(lm.tokenizer, texts, lm.device)
    acts = lm.capture(ids, [sae.cfg.hook_name], attention_mask=mask)[sae.cfg.hook_name]
    keep = mask.bool().clone()
    keep[torch.arange(len(texts)), mask.float().argmax(1)] = False  # the first real token: a sink
    return sae.encode(acts)[keep].float()


def search(lm, sae, topic_texts: list[str], neutral_texts: list[str], n: int = 10) -> list[dict]:
    """Latents ranked by mean activation on topic text minus neutral text."""
    zt, zn = latent_tokens(lm, sae, topic_texts), latent_tokens(lm, sae, neutral_texts)
    score = zt.mean(0) - zn.mean(0)
    top = score.topk(n)
    return [
        {
            "index": int(i),
            "score": float(s),
            "topic_firing": float((zt[:, i] > 0).float().mean()),
            "neutral_firing": float((zn[:, i] > 0).float().mean()),
            "max_seen": float(zt[:, i].max()),
        }
        for s, i in zip(top.values, top.indices, strict=True)
    ]


def top_examples(store, tokenizer, index: int, n: int = 10) -> list[tuple[str, str]]:
    """(peak token, snippet with the peak in [brackets]) of the feature's top examples."""
    out = []
    for e in store.examples(index, "top")[:n]:
        values, tokens = e["values"], e["tokens"]
        p = max(range(len(values)), key=lambda j: values[j])
        words = [tokenizer.decode([t]) if t >= 0 else "" for t in tokens]
        snippet = "".join(words[max(0, p - 10) : p]) + f"[{words[p]}]" + "".join(words[p + 1 : p + 4])
        out.append((words[p], snippet.replace("\n", "\\n")))
    return out


def choose(candidates: list[dict], store, tokenizer, keywords) -> dict | None:
    """Attach top examples; the first candidate whose top examples mostly peak on a keyword."""
    pattern = keyword_pattern(keywords)
    chosen = None
    for c in candidates:
        examples = top_examples(store, tokenizer, c["index"]) if store is not None else []
        c["top_examples"] = [s for _, s in examples]
        c["peaks_on_keyword"] = sum(bool(pattern.search(tok)) for tok, _ in examples) / max(len(examples), 1)
        c["max_act"] = store.feature(c["index"])["max_act"] if store is not None else c["max_seen"]
        print(f"  {c['index']:>5}  score {c['score']:.2f}  fires {c['topic_firing']:.0%} vs {c['neutral_firing']:.0%}"
              f"  peaks on keyword {c['peaks_on_keyword']:.0%}  {c['top_examples'][:3]}")  # fmt: skip
        if chosen is None and c["peaks_on_keyword"] >= 0.5:
            chosen = c
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topic", default="messages")
    ap.add_argument("--sae", type=Path, default=Path("runs/demo/saes/topk-k32-w4608"))
    ap.add_argument("--store", type=Path, default=Path("runs/steering/demo_features.db"))
    ap.add_argument("--feature", type=int, default=None, help="skip the choice: steer this latent")
    ap.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--modes", nargs="+", default=["clamp", "add"], choices=["clamp", "add"])
    ap.add_argument("--scope", default="all", choices=["all", "generated", "prompt"])
    ap.add_argument("--n-prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--goal", type=float, default=0.6)
    ap.add_argument("--out", type=Path, default=Path("runs/steering"))
    ap.add_argument("--search-only", action="store_true", help="list the candidates and stop")
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.time()
    lm = load_model(None, device="cpu")
    sae = load_dictionary(args.sae)
    topic = load_topic(args.topic)
    neutral = json.loads((PROMPTS / "neutral_prompts.json").read_text())[: args.n_prompts]
    store = None
    if args.store.is_file():
        from saelab.analysis.store import FeatureStore

        store = FeatureStore(args.store, create=False)
    else:
        print(f"no feature store at {args.store}: run `saelab analyze {args.sae}` to see top examples")

    print(f"candidates for {args.topic!r} (mean activation on topic prompts minus neutral prompts):")
    candidates = search(lm, sae, topic["positive"], neutral)
    chosen = choose(candidates, store, lm.tokenizer, topic["keywords"])
    if args.feature is not None:
        chosen = next((c for c in candidates if c["index"] == args.feature), None) or {
            "index": args.feature,
            "max_act": store.feature(args.feature)["max_act"] if store else 1.0,
        }
    if chosen is None:
        raise SystemExit(
            "no candidate's top examples are about the topic; pass --feature to steer one anyway"
        )
    index, max_act = chosen["index"], float(chosen["max_act"])
    stem = f"feature_{args.topic}_{index}" + ("" if args.scope == "all" else f"_{args.scope}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}_search.json").write_text(
        json.dumps({"topic": args.topic, "chosen": index, "candidates": candidates}, indent=2) + "\n"
    )
    if args.search_only:
        return
    print(f"steering feature {index} (max activation in the store {max_act:.2f})")

    hook = sae.cfg.hook_name
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.7, seed=0)
    for mode in args.modes:

        def make(m: float, mode=mode):
            if m == 0:
                return []
            if mode == "clamp":
                return [
                    ClampFeature(
                        hook, dictionary=sae, features=[index], values=[m * max_act], scope=args.scope
                    )
                ]
            return [add_feature(sae, index, m * max_act, scope=args.scope)]

        meta = {
            "topic": args.topic,
            "feature": index,
            "mode": mode,
            "hook": hook,
            "scope": args.scope,
            "max_act": max_act,
            "strength_unit": f"multiple of the feature's max activation in the store ({max_act:.3f})",
            "sae": str(args.sae),
            "title": f"{args.topic}: feature {index} {mode} ({hook}, scope {args.scope})",
        }
        print(f"{mode}: sweep on {len(neutral)} neutral prompts")
        result = steering_sweep(
            lm, neutral, make, [0.0, *args.multipliers], topic["keywords"], cfg, meta=meta,
            progress=lambda p: print(f"  x{p.strength:<4g} mention {p.mention_rate:5.0%}  loss {p.loss:.3f}", flush=True),
        )  # fmt: skip
        best = best_strength(result, args.goal)
        result.meta["summary"] = {
            "unsteered": {"rate": result.points[0].mention_rate, "loss": result.points[0].loss},
            "best_multiplier": best,
            "best": None
            if best is None
            else {"rate": result.point(best).mention_rate, "loss": result.point(best).loss},
        }
        path = result.save(args.out / f"{stem}_{mode}.json")
        plot_sweep(result, args.out / f"{stem}_{mode}.png", min_rate=args.goal)
        print(result.table())
        print(f"wrote {path} and .png; smallest multiplier reaching {args.goal:.0%}: {best}")
        for p in result.points:
            print(f"--- x{p.strength}:")
            for prompt, c in list(zip(result.prompts, p.completions, strict=True))[:3]:
                print(f"  {prompt!r} -> {c[:160]!r}")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
