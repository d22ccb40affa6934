"""`saelab demo`: the whole pipeline on the embedded model and corpus, sized to a wall-clock budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from saelab.cli.analyze import analysis_complete, analyze
from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm, resolved_device
from saelab.cli.evaluate import evaluate_folders, print_results
from saelab.cli.serve import serve

DEMO_PLAN = "demo_plan.json"
EXPLAIN_LATENTS = 64  # the most frequent live latents the demo explains and scores


def demo_explain_config(n_features: int = EXPLAIN_LATENTS):
    """What `make demo` explains with: the embedded model labels each latent from 10 of its examples and
    judges the label by detection (6 held-out activating windows against 3 random and 3 hard ones) and by
    embedding similarity, each beside chance and a shuffled label. Smaller than `ExplainConfig()`'s 40 +
    150 windows and four scorers so that 64 latents fit the 15 minutes on 2 cores (about 8 CPU-seconds a
    latent on an AVX2 EPYC in float32); `saelab explain` runs the full sizes."""
    from saelab.explain.pipeline import ExplainConfig

    return ExplainConfig(
        n_features=n_features, n_explain=10, n_test=6, n_random=3, n_hard=3, max_new_tokens=32,
        scorers=("detection", "embedding"),
    )  # fmt: skip


def demo(
    run_dir: Path = typer.Option(Path("runs/demo"), help="Run folder."),
    tokens: int = typer.Option(
        None, min=1024, help="Training tokens, all harvested fresh; default: sized to fit --minutes here."
    ),
    minutes: float = typer.Option(15.0, min=1.0, help="Wall-clock budget of the whole demo."),
    started_at: float = typer.Option(
        None,
        help="Unix time the demo's set-up began (`make demo` passes it, so set-up counts); default: now.",
    ),
    overwrite: bool = typer.Option(False, help="Retrain even if the demo run has finished."),
    analyze_tokens: int = typer.Option(
        None, min=0, help="Tokens for the feature analysis (0: skip it); default: 131,072, or fewer to fit."
    ),
    explain_latents: int = typer.Option(
        None,
        min=0,
        help=f"Latents to explain and score (0: skip); default: {EXPLAIN_LATENTS}, or the plan's.",
    ),
    serve_app: bool = typer.Option(True, "--serve/--no-serve", help="End by serving the feature web app."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port of the web app."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Harvest from the embedded corpus, train a TopK SAE on blocks.15.hook_resid_post, evaluate, summarise,
    analyse its features, explain and score the 64 most frequent live latents, and serve them in the
    local web app, sized to fit --minutes on this machine."""
    from saelab.cli.budget import DemoPlan
    from saelab.core.fileio import atomic_write_json
    from saelab.training import DONE, TrainConfig
    from saelab.training import train as run_training

    start = started_at if started_at is not None else time.time()
    device = resolved_device(device)
    plan_path = run_dir / DEMO_PLAN
    finished = (run_dir / DONE).exists() and not overwrite
    resumable = (run_dir / "checkpoint" / "state.pt").exists() and not overwrite
    timings: dict[str, float] = {}
    if finished or resumable:
        plan = DemoPlan(**json.loads(plan_path.read_text())) if plan_path.is_file() else None
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    else:
        plan, cfg = _plan_and_harvest(run_dir, tokens, minutes, start, device, dtype, timings)
    if finished:
        console.print(f"{run_dir} already holds a finished demo run; evaluating it (--overwrite retrains).")
        folders = [Path(p) for p in json.loads((run_dir / DONE).read_text())["dictionaries"].values()]
    else:
        clock = time.perf_counter()
        folders = list(run_training(cfg, resume=resumable, overwrite=overwrite).values())
        timings["train"] = time.perf_counter() - clock
    if plan is not None:
        atomic_write_json(plan_path, plan.to_dict())
    eval_tokens, ce_contexts = (plan.eval_tokens, plan.ce_contexts) if plan else (65536, 128)
    clock = time.perf_counter()
    results = evaluate_folders(folders, None, None, eval_tokens, ce_contexts, device, dtype=cfg.model_dtype)
    timings["eval"] = time.perf_counter() - clock
    print_results(results)
    metrics = results[folders[0].name]
    console.print(
        f"quality on held-out text: explained variance {metrics['explained_variance']:.3f}, "
        f"CE loss score {metrics.get('ce_loss_score', float('nan')):.3f}; SAE in {folders[0]}, metrics in "
        f"{folders[0] / 'eval.json'}, density plot in {folders[0] / 'density.png'}"
    )
    if analyze_tokens is None:
        analyze_tokens = plan.analyze_tokens if plan else 131_072
    store = folders[0] / "features.db"
    if analyze_tokens > 0 and (not analysis_complete(store) or overwrite):
        clock = time.perf_counter()
        analyze(folders[0], tokens=analyze_tokens, model=None, data=None, top_k=20, out=None, resume=False,
                device=device, dtype=cfg.model_dtype, seed=0)  # fmt: skip
        timings["analyze"] = time.perf_counter() - clock
    if explain_latents is None:
        explain_latents = plan.explain_latents if plan else EXPLAIN_LATENTS
    if analyze_tokens > 0 and explain_latents > 0:
        clock = time.perf_counter()
        _explain(folders[0], store, explain_latents, device, cfg.model_dtype)
        timings["explain"] = time.perf_counter() - clock
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    console.print(
        f"demo finished in {time.time() - start:.0f} s of a {minutes * 60:.0f} s budget "
        f"(counted from {'set-up' if started_at is not None else 'the start'}; {stages})"
    )
    if serve_app and analyze_tokens > 0:
        serve(folders[0], host="127.0.0.1", port=port, live=True, device=device, dtype=cfg.model_dtype)


def _explain(folder: Path, store: Path, n_features: int, device: str, dtype: str) -> None:
    """Label and score the most frequent live latents with the embedded model (resumable: a rerun skips
    the latents already done with these settings)."""
    from saelab.cli.explain import _print_summary
    from saelab.dictionaries.io import load_dictionary
    from saelab.explain.clients import LocalClient
    from saelab.explain.pipeline import explain_features

    lm = load_lm(None, device=device, dtype=dtype)
    client = LocalClient(lm=lm)
    summary = explain_features(
        store, lm, load_dictionary(folder), client, client, demo_explain_config(n_features)
    )
    _print_summary(folder.name, store, summary, brief=True)


def _plan_and_harvest(run_dir, tokens, minutes, start, device, dtype, timings):
    """Measure this machine, size the demo to the time left, harvest its cache; return (plan, config)."""
    from saelab.cli.budget import measure_full_forward, measure_harvest, measure_train_step, plan_demo
    from saelab.core.activations import harvest_to_cache
    from saelab.core.data import DataConfig
    from saelab.core.devices import dtype_name, encoder_dtype
    from saelab.dictionaries import DictionaryConfig
    from saelab.training import TrainConfig

    clock = time.perf_counter()
    lm = load_lm(None, device=device, dtype=dtype)
    model_dtype = dtype_name(lm.model.dtype)
    dictionary = DictionaryConfig(architecture="topk", k=32, d_sae=4608, d_in=lm.d_model,
                                  encoder_dtype=encoder_dtype("auto", device) if dtype == "auto" else "float32")  # fmt: skip
    data = DataConfig()
    harvest_speed = measure_harvest(lm, data, dictionary.hook_name)
    train_speed = measure_train_step(dictionary) / 1.1  # the loop's bookkeeping, logging, checkpoints
    forward_speed = measure_full_forward(lm, DataConfig(split="eval"))
    timings["load+measure"] = time.perf_counter() - clock
    left = minutes * 60 - (time.time() - start)
    plan = plan_demo(harvest_speed, train_speed, left, fixed_tokens=tokens, forward_tok_s=forward_speed,
                     explain_latents=EXPLAIN_LATENTS)  # fmt: skip
    console.print(
        f"demo plan: {plan.harvest_tokens:,} tokens harvested, {plan.train_tokens:,} trained "
        f"({plan.epochs:.1f} epochs), eval {plan.eval_tokens:,} tokens + {plan.ce_contexts} CE contexts, "
        f"analysis {plan.analyze_tokens:,} tokens, {plan.explain_latents} latents explained; about {plan.estimate_s / 60:.1f} of the {left / 60:.1f} "
        f"minutes left. Why: {plan.reason} (measured here: harvest {harvest_speed:,.0f} tok/s in "
        f"{model_dtype}, TopK step {train_speed:,.0f} tok/s, full forward {forward_speed:,.0f} tok/s; "
        "--tokens overrides)."
    )
    dictionary.d_in = 0  # as wide as the hook point, resolved by the trainer
    cfg = TrainConfig(
        run_dir=str(run_dir),
        dictionaries=[dictionary],
        n_tokens=plan.train_tokens,
        harvest_tokens=plan.harvest_tokens,
        device=device,
        model_dtype=model_dtype,
    )
    clock = time.perf_counter()
    harvest_to_cache(lm, cfg.data, cfg.hooks, plan.harvest_tokens, run_dir / "activations",
                     batch_contexts=cfg.harvest_batch_contexts, seed=cfg.seed)  # fmt: skip
    timings["harvest"] = time.perf_counter() - clock
    return plan, cfg
