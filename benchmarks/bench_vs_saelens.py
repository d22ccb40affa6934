"""saelab vs SAELens, like for like: same tokens in, both SAEs scored by both evals, in one run.

Why: comparing saelab's eval of its SAE with SAELens's eval of SAELens's SAE mixes two questions.
Here both tools train a TopK SAE (k 32, d_sae 4608, batch 1024, lr 1e-3) at blocks.15.hook_resid_post
of the embedded SmolLM2-135M-Instruct on the same contexts (saelab's packing of the train split; SAELens
reads them as a pre-tokenized dataset through its HookedProxyLM, excluding its special tokens, which
on this data are exactly the positions saelab excludes). Then each SAE is scored by `saelab eval`
(its own keys and the saelens_* / saebench_* ones) and by SAELens's `run_evals`, on the same eval
contexts. Needs the `interop` extra (sae-lens).
Usage: nice -n 19 python benchmarks/bench_vs_saelens.py [--tokens 204800] [--eval-tokens 16384] [--ce-contexts 32]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from saelab.analysis.evaluation import EvalConfig, evaluate
from saelab.core.data import DataConfig
from saelab.core.devices import describe_machine
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig
from saelab.dictionaries.io import load_dictionary
from saelab.training import TrainConfig, train

HOOK, HF_HOOK, CTX, BATCH_CONTEXTS = "blocks.15.hook_resid_post", "model.layers.15", 128, 16


def contexts(lm, split: str, n_contexts: int) -> torch.Tensor:
    return torch.cat(
        list(DataConfig(split=split).batches(lm.tokenizer, BATCH_CONTEXTS, max_contexts=n_contexts))
    )


def train_saelab(tokens: int, out: Path) -> Path:
    dictionary = DictionaryConfig(architecture="topk", k=32, d_in=576, d_sae=4608, hook_name=HOOK)
    cfg = TrainConfig(
        run_dir=str(out),
        n_tokens=tokens,
        dictionaries=[dictionary],
        batch_size=1024,
        lr=1e-3,
        evaluate_after=False,
    )
    return next(iter(train(cfg, progress=False).values()))


def train_saelens(lm, proxy, tokens: int, out: Path) -> Path:
    from datasets import Dataset
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    ids = contexts(lm, "train", math.ceil(tokens / (CTX - 2)) + 256)  # + SAELens's buffer refills
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=4608, k=32),
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_class_name="AutoModelForCausalLM",
        hook_name=HF_HOOK,
        context_size=CTX,
        training_tokens=tokens,
        train_batch_size_tokens=1024,
        lr=1e-3,
        store_batch_size_prompts=BATCH_CONTEXTS,
        n_batches_in_buffer=8,
        exclude_special_tokens=True,
        streaming=False,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=None,
        checkpoint_path=None,
        verbose=False,
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_dataset=Dataset.from_dict({"input_ids": ids.tolist()}), override_model=proxy
    )
    sae = runner.run()
    sae.save_model(out)
    raw = json.loads((out / "cfg.json").read_text())  # SAELens named the hook by its HF module
    raw.setdefault("metadata", {})["hook_name"] = HOOK
    raw["metadata"].update(
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct", context_size=CTX, prepend_bos=True
    )
    (out / "cfg.json").write_text(json.dumps(raw))
    return out


def saelens_eval(lm, proxy, folder: Path, eval_ids: torch.Tensor, sv_batches: int, ce_batches: int) -> dict:
    from datasets import Dataset
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig as LensEvalConfig
    from sae_lens.evals import run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    sae = SAE.load_from_disk(folder)
    sae.cfg.metadata.hook_name = HF_HOOK
    store = ActivationsStore.from_sae(
        proxy,
        sae,
        dataset=Dataset.from_dict({"input_ids": eval_ids.tolist()}),
        context_size=CTX,
        streaming=False,
        store_batch_size_prompts=BATCH_CONTEXTS,
    )
    cfg = LensEvalConfig(
        batch_size_prompts=BATCH_CONTEXTS,
        n_eval_reconstruction_batches=ce_batches,
        compute_ce_loss=True,
        compute_kl=True,
        n_eval_sparsity_variance_batches=sv_batches,
        compute_variance_metrics=True,
        compute_sparsity_metrics=True,
    )
    metrics, _ = run_evals(sae, store, proxy, ActivationScaler(None), cfg)
    return {k: v for group in metrics.values() for k, v in group.items()}


def main() -> None:
    from sae_lens.load_model import HookedProxyLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=204_800, help="training tokens, both tools")
    parser.add_argument("--eval-tokens", type=int, default=16_384)
    parser.add_argument("--ce-contexts", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="score the SAEs already trained under --out")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_vs_saelens_"))
    lm = load_model(dtype=torch.float32)
    proxy = HookedProxyLM(lm.model, lm.tokenizer, hook_names=[HF_HOOK])
    print(describe_machine("float32"))

    times, folders = {"saelab": math.nan, "SAELens": math.nan}, {}
    if args.reuse:
        folders["saelab"] = next((out / "saelab" / "saes").iterdir())
        folders["SAELens"] = out / "saelens"
    else:
        start = time.perf_counter()
        folders["saelab"] = train_saelab(args.tokens, out / "saelab")
        times["saelab"] = time.perf_counter() - start
        start = time.perf_counter()
        folders["SAELens"] = train_saelens(lm, proxy, args.tokens, out / "saelens")
        times["SAELens"] = time.perf_counter() - start

    # Whole batches of 16 contexts for both evals: saelab stops in the batch where it reaches n_tokens
    # of its own kept tokens, so ask for exactly the kept tokens of sv_batches batches.
    sv_batches = math.ceil(args.eval_tokens / (BATCH_CONTEXTS * (CTX - 1)))
    ce_batches = max(1, args.ce_contexts // BATCH_CONTEXTS)
    eval_ids = contexts(lm, "eval", sv_batches * BATCH_CONTEXTS)
    kept = DataConfig(split="eval").masked_batches(lm.tokenizer, BATCH_CONTEXTS, max_contexts=len(eval_ids))
    cfg = EvalConfig(
        n_tokens=sum(int(keep.sum()) for _, keep in kept),
        ce_contexts=ce_batches * BATCH_CONTEXTS,
        anchor_ce=True,
    )
    rows = []
    for trainer, folder in folders.items():
        start = time.perf_counter()
        ours = evaluate(lm, load_dictionary(folder), DataConfig(split="eval"), cfg, progress=False)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        ref = saelens_eval(lm, proxy, folder, eval_ids, sv_batches, ce_batches)
        t_ref = time.perf_counter() - start
        rows.append((trainer, ours, ref, t_ours, t_ref))
        (out / f"{trainer}_scores.json").write_text(
            json.dumps({"saelab_eval": ours, "saelens_run_evals": ref})
        )

    print(
        f"\ntrain {args.tokens:,} tokens each (same contexts); eval {cfg.n_tokens:,} tokens, "
        f"{cfg.ce_contexts} CE contexts of saelab's eval split"
    )
    head = (
        "| trained by | train s | saelab EV | EV trimmed | saelens_EV (saelab) | SAELens run_evals EV | "
        "EV legacy | saebench_EV | saelab CE score | saelens_CE (saelab) | SAELens run_evals CE | "
        "cos | dead | eval s (saelab / SAELens) |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for trainer, ours, ref, t_ours, t_ref in rows:
        print(
            f"| {trainer} | {times[trainer]:.0f} | {ours['explained_variance']:.3f} | "
            f"{ours['explained_variance_trimmed']:.3f} | {ours['saelens_explained_variance']:.3f} | "
            f"{ref['explained_variance']:.3f} | {ref['explained_variance_legacy']:.3f} | "
            f"{ours['saebench_explained_variance']:.3f} | {ours['ce_loss_score']:.3f} | "
            f"{ours['saelens_ce_loss_score']:.3f} | {ref['ce_loss_score']:.3f} | {ref['cossim']:.3f} | "
            f"{ours['dead_latents']} | {t_ours:.0f} / {t_ref:.0f} |"
        )
    shares = ", ".join(f"{t} {o['variance_top_token_share']:.3f}" for t, o, *_ in rows)
    print(f"largest single token's share of the total variance: {shares}")
    print(f"folders and scores under {out}")


if __name__ == "__main__":
    main()
