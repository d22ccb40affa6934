"""Topic steering with a contrastive vector on the embedded SmolLM2-135M-Instruct, measured.

1. Build a steering vector per layer: the difference of means of the residual stream
   (blocks.{L}.hook_resid_post) between prompts about the topic and matched prompts about other
   things (`saelab/interventions/prompts/topic_<name>.json`), read at chosen token positions:
   `--positions last` is the last prompt token (the chat template's final "\\n"), `--positions
   instruction` averages the last 5 tokens of the user's instruction (positions -7..-11 with the
   SmolLM2 template, whose post-instruction suffix is 6 tokens).
2. Screen layers x strengths on a few neutral prompts, pick the layer that reaches the goal rate
   at the smallest strength, then sweep it on all 50 neutral prompts: mention rate of the topic's
   keywords and mean per-token loss of the completions under the unsteered model.
   A strength s adds s * median|resid| at that layer along the unit vector (so strengths are
   comparable across layers); the raw multiplier of the difference of means is stored beside it.
3. Decompose the vector built at blocks.15.hook_resid_post into the demo SAE's features (if the
   SAE exists) and report the reconstruction cosine and the top features.

Writes runs/steering/topic_<name>_<positions>.json (+ .png) and ..._decomposition.json.

    OMP_NUM_THREADS=1 python examples/steer_topic.py --topic ocean
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saelab.core.models import load_model
from saelab.core.prompts import encode_left_padded, format_prompts
from saelab.interventions.directions import mean_difference
from saelab.interventions.evaluation import best_strength, plot_sweep, steering_sweep
from saelab.interventions.generation import GenerationConfig
from saelab.interventions.hooks import AddVector, unit

PROMPTS = Path(__file__).resolve().parents[1] / "saelab" / "interventions" / "prompts"
SAE_HOOK = "blocks.15.hook_resid_post"
POSITIONS = {"last": (-1,), "instruction": (-7, -8, -9, -10, -11)}


def load_topic(name: str) -> dict:
    """The topic file: keywords, positive and negative prompts."""
    return json.loads((PROMPTS / f"topic_{name}.json").read_text())


def neutral_prompts() -> list[str]:
    return json.loads((PROMPTS / "neutral_prompts.json").read_text())


def build_vectors(lm, topic: dict, hooks: list[str], positions: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Difference of means per hook, averaged over the chosen positions (unnormalised)."""
    ds = mean_difference(
        lm, topic["positive"], topic["negative"], hooks=hooks, positions=positions, chat=True
    )
    return {h: torch.stack([ds.get(h, p) for p in positions]).mean(0) for h in hooks}


@torch.no_grad()
def resid_norms(lm, prompts: list[str], hooks: list[str]) -> dict[str, float]:
    """Median norm of the residual stream over the real tokens of `prompts`: the scale of a strength."""
    ids, mask = encode_left_padded(lm.tokenizer, format_prompts(lm.tokenizer, prompts, True), lm.device)
    acts = lm.capture(ids, hooks, attention_mask=mask)
    return {h: float(acts[h][mask.bool()].norm(dim=-1).median()) for h in hooks}


def sweep_layer(lm, hook, vector, scale, prompts, strengths, keywords, cfg, scope, meta, verbose=True):
    """Steering sweep of one layer: strength s adds s * scale * unit(vector)."""
    v = unit(vector) * scale

    def make(s: float):
        return [AddVector(hook, vector=v, alpha=s, scope=scope)] if s else []

    def show(p):
        if verbose:
            print(f"  {hook} s={p.strength:<5g} mention {p.mention_rate:5.0%}  loss {p.loss:.3f}", flush=True)

    meta = {
        **meta,
        "hook": hook,
        "scope": scope,
        "strength_unit": f"median resid norm at the hook over the neutral prompts = {scale:.2f}",
        "vector_norm": float(vector.norm()),
        "raw_multiplier_per_strength": scale / float(vector.norm()),
    }
    return steering_sweep(lm, prompts, make, strengths, keywords, cfg, meta=meta, progress=show)


def decompose_vector(
    vector: torch.Tensor, sae_path: Path, store_path: Path | None, n_features: int, tokenizer
) -> dict:
    """Decompose a blocks.15 vector into the demo SAE's features; top examples when a store exists."""
    from saelab.dictionaries.io import load_dictionary
    from saelab.interventions.decompose import decompose

    sae = load_dictionary(sae_path)
    result = decompose(sae, vector, n_features=n_features, method="pursuit")
    print(result.table(markdown=False))
    out = {"sae": str(sae_path), **result.to_dict()}
    # how the fit grows with the number of features: an honest figure of how SAE-like the vector is
    out["cosine_by_n_features"] = {
        n: decompose(sae, vector, n_features=n, method="pursuit").cosine for n in (1, 5, 10, 20, 50)
    }
    # the same for random directions: what "fits" means for a vector unrelated to the SAE (mean of 5;
    # seeds far from 0, since an SAE initialised with seed 0 may keep a never-trained row equal to randn)
    noise = torch.randn((5, vector.shape[-1]), generator=torch.Generator().manual_seed(1234))
    out["random_vector_cosine_by_n_features"] = {
        n: sum(r.cosine for r in decompose(sae, noise, n_features=n, method="pursuit")) / len(noise)
        for n in (1, 5, 10, 20, 50)
    }
    print(f"reconstruction cosine by number of features: {out['cosine_by_n_features']}")
    print(f"  (a random vector: {out['random_vector_cosine_by_n_features']})")
    if store_path is not None and store_path.is_file():
        from saelab.analysis.store import FeatureStore

        with FeatureStore(store_path, create=False) as store:
            for f in out["features"]:
                f["top_examples"] = [_snippet(e, tokenizer) for e in store.examples(f["index"], "top")[:3]]
                print(f"  feature {f['index']}: {f['top_examples']}")
    return out


def _snippet(example: dict, tokenizer) -> str:
    """The tokens around the max-activating one, the max one in [brackets]."""
    values, tokens = example["values"], example["tokens"]
    i = max(range(len(values)), key=lambda j: values[j])
    words = [tokenizer.decode([t]) if t >= 0 else "" for t in tokens]  # -1 pads windows at a context edge
    return ("".join(words[max(0, i - 10) : i]) + f"[{words[i]}]" + "".join(words[i + 1 : i + 4])).replace(
        "\n", "\\n"
    )


def screen(lm, args, hooks, vectors, scales, neutral, topic, cfg, base_meta, summary) -> str:
    """Sweep every layer on a few prompts; the layer reaching the goal at the smallest strength wins."""
    print(f"screen: {len(hooks)} layers x {args.strengths} on {args.screen_prompts} neutral prompts")
    best = None
    for h in hooks:
        r = sweep_layer(
            lm, h, vectors[h], scales[h], neutral[: args.screen_prompts], args.strengths,
            topic["keywords"], cfg, args.scope, base_meta,
        )  # fmt: skip
        summary["screen"][h] = [
            {"strength": p.strength, "rate": p.mention_rate, "loss": p.loss} for p in r.points
        ]
        s = best_strength(r, args.goal)
        if s is not None and (best is None or s < best[0]):
            best = (s, h)
    chosen = best[1] if best else hooks[-1]
    print(f"chosen: {chosen} (first to reach {args.goal:.0%} at (strength, hook) = {best})")
    return chosen


def full_sweep(lm, args, layer_hook, vectors, scales, neutral, topic, cfg, base_meta, summary, stem) -> None:
    """The sweep of one layer on every neutral prompt, unsteered included; JSON + PNG + samples."""
    print(f"full sweep of {layer_hook} on {len(neutral)} neutral prompts")
    title = f"{args.topic}: {layer_hook} ({args.positions}, scope {args.scope})"
    result = sweep_layer(
        lm, layer_hook, vectors[layer_hook], scales[layer_hook], neutral, [0.0, *args.strengths],
        topic["keywords"], cfg, args.scope, {**base_meta, "title": title},
    )  # fmt: skip
    print(result.table())
    chosen = best_strength(result, args.goal)
    summary.update(
        hook=layer_hook,
        unsteered={"rate": result.points[0].mention_rate, "loss": result.points[0].loss},
        best_strength=chosen,
        best=None
        if chosen is None
        else {"rate": result.point(chosen).mention_rate, "loss": result.point(chosen).loss},
    )
    result.meta["summary"] = summary
    path = result.save(args.out / f"{stem}.json")
    plot_sweep(result, args.out / f"{stem}.png", min_rate=args.goal)
    print(f"wrote {path} and .png")
    for p in result.points:
        print(f"--- strength {p.strength}:")
        for prompt, c in list(zip(result.prompts, p.completions, strict=True))[:3]:
            print(f"  {prompt!r} -> {c[:160]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topic", default="ocean")
    ap.add_argument("--positions", choices=sorted(POSITIONS), default="instruction")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 15])
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--screen-prompts", type=int, default=12, help="neutral prompts for the layer screen")
    ap.add_argument("--n-prompts", type=int, default=50, help="neutral prompts for the full sweep")
    ap.add_argument("--skip-screen", action="store_true", help="sweep the first --layers layer directly")
    ap.add_argument("--scope", default="all", choices=["all", "generated", "prompt"])
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--goal", type=float, default=0.6)
    ap.add_argument("--sae", type=Path, default=Path("runs/demo/saes/topk-k32-w4608"))
    ap.add_argument("--store", type=Path, default=Path("runs/steering/demo_features.db"))
    ap.add_argument("--out", type=Path, default=Path("runs/steering"))
    ap.add_argument("--only-decompose", action="store_true", help="skip the sweeps; decompose the vector")
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.time()
    lm = load_model(None, device="cpu")
    topic, neutral = load_topic(args.topic), neutral_prompts()[: args.n_prompts]
    positions = POSITIONS[args.positions]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in args.layers]
    vectors = build_vectors(lm, topic, sorted({*hooks, SAE_HOOK}), positions)
    scales = resid_norms(lm, neutral_prompts(), hooks)  # all 50, so strengths mean the same in any run
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.7, seed=0)
    base_meta = {
        "topic": args.topic,
        "vector": f"mean(positive) - mean(negative), positions {list(positions)} ({args.positions})",
        "n_positive": len(topic["positive"]),
        "n_negative": len(topic["negative"]),
    }
    stem = f"topic_{args.topic}_{args.positions}" + ("" if args.scope == "all" else f"_{args.scope}")
    summary: dict = {"screen": {}, **base_meta}

    if not args.only_decompose:
        layer_hook = (
            hooks[0]
            if args.skip_screen
            else screen(lm, args, hooks, vectors, scales, neutral, topic, cfg, base_meta, summary)
        )
        full_sweep(lm, args, layer_hook, vectors, scales, neutral, topic, cfg, base_meta, summary, stem)
    if args.sae.is_dir():
        dec = decompose_vector(vectors[SAE_HOOK], args.sae, args.store, 10, lm.tokenizer)
        dec_path = args.out / f"{stem}_decomposition.json"
        dec_path.write_text(json.dumps({**base_meta, "hook": SAE_HOOK, **dec}, indent=2) + "\n")
        print(f"wrote {dec_path}")
    else:
        print(f"no SAE at {args.sae}; skipped the decomposition")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
