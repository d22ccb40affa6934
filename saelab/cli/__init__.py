"""The `saelab` command: harvest, train, eval, demo. Every option has a default and --help."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from saelab.errors import SaelabError

app = typer.Typer(
    help="saelab: train, evaluate and interpret sparse dictionaries on language-model activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_HOOK = "blocks.15.hook_resid_post"
DTYPE_HELP = (
    "Model dtype: auto (bfloat16 where the CPU or GPU has bf16 matrix units, else float32), "
    "bfloat16, float32 or float16."
)
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda or mps."


def main() -> None:
    """Entry point: user errors become one paragraph on stderr and exit status 2."""
    try:
        app()
    except SaelabError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted: checkpoints written so far are kept; rerun with --resume.")
        sys.exit(130)


def _data_config(data, split, text_field, context_size, exclude_bos, exclude_special, dataset_config=None):
    from saelab.core.data import DataConfig

    return DataConfig(
        source=data,
        split=split,
        text_field=text_field,
        dataset_config=dataset_config,
        context_size=context_size,
        prepend_bos=True,
        exclude_bos=exclude_bos,
        exclude_special=exclude_special,
    )


@contextlib.contextmanager
def _removed_on_error(folder: Path, keep_if=None):
    """Delete `folder` when the command that creates it fails with a user error, unless it existed before.

    A failed command then leaves nothing half-written behind. `keep_if(folder)` keeps folders worth
    resuming (a training checkpoint). An interruption (Ctrl-C) keeps everything: rerunning resumes it.
    """
    existed = folder.exists()
    try:
        yield
    except SaelabError:
        if not existed and folder.is_dir() and not (keep_if and keep_if(folder)):
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _model_file_error(name: str | None, err: Exception) -> SaelabError:
    from saelab.errors import ModelNotFoundError

    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not read the weights of model {name or EMBEDDED_HF_ID!r}: a .safetensors file is corrupt, "
        f"truncated or not safetensors ({reason}). Download or save the model again "
        "(model.save_pretrained(folder)), or pass another --model."
    )


def _load_model(name: str | None, device: str, dtype):
    from safetensors import SafetensorError

    from saelab.core.models import load_model

    try:
        return load_model(name, device=device, dtype=dtype)
    except SafetensorError as err:
        raise _model_file_error(name, err) from None


def resolve_model(name: str | None) -> str | None:
    """The embedded model's hub id means the embedded model (no hub access needed)."""
    if name in (None, "", EMBEDDED_HF_ID, "SmolLM2-135M-Instruct", "saelab:embedded"):
        return None
    return name


# ---- harvest ------------------------------------------------------------------------------------


@app.command()
def harvest(
    out: Path = typer.Option(Path("runs/activations"), help="Folder for the activation cache."),
    model: str = typer.Option(
        None, help="HF hub id, local HF folder or .gguf file; default: embedded SmolLM2-135M-Instruct."
    ),
    hook: list[str] = typer.Option(
        [DEFAULT_HOOK], help="Hook point(s) to capture, TransformerLens names; repeat for several."
    ),
    data: str = typer.Option(
        None,
        help="Text: a .txt/.jsonl/.parquet file or folder, or a HF dataset name; default: embedded corpus.",
    ),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet/HF datasets."),
    split: str = typer.Option("train", help="Dataset split ('train'/'eval' for the embedded corpus)."),
    context_size: int = typer.Option(128, min=2, help="Tokens per context (BOS included)."),
    tokens: int = typer.Option(
        1_000_000, min=1, help="Activation vectors to store (excluded positions not counted)."
    ),
    batch_contexts: int = typer.Option(32, min=1, help="Contexts per forward pass."),
    exclude_bos: bool = typer.Option(
        True, help="Drop position 0 (BOS / attention sink, norm ~100x the median)."
    ),
    exclude_special: bool = typer.Option(True, help="Drop special tokens."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    seed: int = typer.Option(0, help="Shuffling seed."),
):
    """Harvest activations into a memory-mapped, resumable disk cache that training can read many times."""
    from saelab.core.activations import harvest_to_cache

    lm = _load_model(resolve_model(model), device=device, dtype=_dtype(dtype))
    cfg = _data_config(data, split, text_field, context_size, exclude_bos, exclude_special)
    start = time.perf_counter()
    with _removed_on_error(out):
        info = harvest_to_cache(lm, cfg, hook, tokens, out, batch_contexts=batch_contexts, seed=seed)
    seconds = time.perf_counter() - start
    console.print(
        f"harvested {info.n_tokens:,} tokens x {len(info.hooks)} hook(s) into {out} "
        f"in {seconds:.0f} s ({info.n_tokens / max(seconds, 1e-9):,.0f} tok/s)"
    )


# ---- train --------------------------------------------------------------------------------------


def sweep_configs(architecture, width, k, l1, target_l0, hook, output_hook, d_in, seed, encoder_dtype="auto"):
    """The cartesian product of the sweep options, each knob applied only where it means something."""
    from saelab.dictionaries import ARCHITECTURES, DictionaryConfig

    unknown = [arch for arch in architecture if arch not in ARCHITECTURES]
    if unknown:
        raise SaelabError(f"unknown --architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}.")
    if {"topk", "batchtopk"} & set(architecture) and max(k) > min(width):
        raise SaelabError(
            f"--k {max(k)} is larger than --width {min(width)}: k must be at most the number of latents."
        )
    if encoder_dtype not in ("auto", "float32", "bfloat16"):
        raise SaelabError(f"unknown --encoder-dtype {encoder_dtype!r}; use auto, float32 or bfloat16.")
    configs = []
    for arch, d_sae in itertools.product(architecture, width):
        knobs = {
            "topk": [("k", v) for v in k],
            "batchtopk": [("k", v) for v in k],
            "jumprelu": [("target_l0", v) for v in target_l0],
        }.get(arch, [("l1_coefficient", v) for v in l1])
        for name, value in knobs:
            configs.append(
                DictionaryConfig(
                    architecture=arch,
                    d_in=d_in,
                    d_sae=d_sae,
                    hook_name=hook,
                    output_hook_name=output_hook,
                    seed=seed,
                    encoder_dtype=encoder_dtype,
                    **{name: value},
                )
            )
    return configs


@app.command()
def train(
    run_dir: Path = typer.Option(
        Path("runs/sae"), help="Run folder: config, checkpoints, metrics.jsonl, saes/."
    ),
    model: str = typer.Option(
        None, help="HF hub id, local folder or .gguf; default: embedded SmolLM2-135M-Instruct."
    ),
    hook: str = typer.Option(DEFAULT_HOOK, help="Input hook point."),
    output_hook: str = typer.Option(
        None, help="Train transcoders: predict this hook from --hook (e.g. blocks.15.hook_mlp_out)."
    ),
    architecture: list[str] = typer.Option(
        ["topk"], help="relu, gated, topk, batchtopk or jumprelu; repeat to sweep."
    ),
    width: list[int] = typer.Option([4608], min=1, help="Latents (d_sae); repeat to sweep."),
    k: list[int] = typer.Option(
        [32], min=1, help="topk/batchtopk: active latents per token; repeat to sweep."
    ),
    l1: list[float] = typer.Option([5.0], help="relu/gated: L1 coefficient; repeat to sweep."),
    target_l0: list[float] = typer.Option([32.0], help="jumprelu: target L0; repeat to sweep."),
    encoder_dtype: str = typer.Option(
        "auto",
        help="topk: encoder matmul dtype while training; auto = bfloat16 where the model's auto dtype is "
        "bfloat16 (~1.4x faster on AMX CPUs / GPUs), else float32.",
    ),
    data: str = typer.Option(
        None, help="Text source (file, folder or HF dataset); default: embedded corpus."
    ),
    text_field: str = typer.Option("text", help="Field holding the text."),
    context_size: int = typer.Option(128, min=2, help="Tokens per context."),
    activations: Path = typer.Option(
        None, help="Train from this `saelab harvest` cache instead of harvesting."
    ),
    stream: bool = typer.Option(
        False, help="Train straight from the model through a shuffle buffer (no disk)."
    ),
    tokens: int = typer.Option(1_000_000, min=1, help="Training tokens."),
    harvest_tokens: int = typer.Option(
        None, min=1, help="Tokens to harvest into the run's cache (default: --tokens); fewer trains epochs."
    ),
    batch_size: int = typer.Option(1024, min=1, help="Activation vectors per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (linear warm-up, decay over the last 20%)."),
    dead_after_tokens: int = typer.Option(
        25_000, min=1, help="A latent silent this long is dead (AuxK revives it)."
    ),
    resample_every: int = typer.Option(
        0,
        min=0,
        help="Every this many tokens, point dead latents at the worst-reconstructed inputs (0: never).",
    ),
    checkpoint_every: int = typer.Option(200, min=1, help="Steps between atomic checkpoints."),
    exclude_bos: bool = typer.Option(True, help="Exclude position 0 (attention sink) from training."),
    exclude_special: bool = typer.Option(True, help="Exclude special tokens from training."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a finished or unfinished run in --run-dir."),
    evaluate_after: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate every trained dictionary."),
):
    """Train one or many dictionaries (a sweep) on one activation stream. Runs under torchrun too."""
    from safetensors import SafetensorError

    from saelab.core import distributed
    from saelab.training import CHECKPOINT, TrainConfig
    from saelab.training import train as run_training

    if not lr > 0:
        raise SaelabError(f"--lr must be a positive learning rate, got {lr}; 1e-3 is typical.")
    if tokens < batch_size:
        raise SaelabError(
            f"--tokens {tokens:,} is fewer than one batch (--batch-size {batch_size:,}), so no step would run. "
            "Ask for more tokens or a smaller batch size."
        )
    cfg = TrainConfig(
        run_dir=str(run_dir),
        model=resolve_model(model),
        data=_data_config(data, "train", text_field, context_size, exclude_bos, exclude_special),
        dictionaries=sweep_configs(
            architecture, width, k, l1, target_l0, hook, output_hook, 0, seed, encoder_dtype
        ),
        activations=str(activations) if activations else None,
        stream=stream,
        n_tokens=tokens,
        harvest_tokens=harvest_tokens,
        batch_size=batch_size,
        lr=lr,
        dead_after_tokens=dead_after_tokens,
        resample_every_tokens=resample_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
        device=_device(device),
        model_dtype=_dtype(dtype, as_name=True),
        evaluate_after=evaluate_after,
    )

    def has_checkpoint(folder: Path) -> bool:  # worth keeping for --resume
        return (folder / CHECKPOINT).exists() or not distributed.is_main()

    with _removed_on_error(run_dir, keep_if=has_checkpoint):
        try:
            saved = run_training(cfg, resume=resume, overwrite=overwrite)
        except SafetensorError as err:  # only the model's weights are safetensors on this path
            raise _model_file_error(cfg.model, err) from None
    if saved and distributed.is_main():
        console.print(f"trained {len(saved)} dictionar{'y' if len(saved) == 1 else 'ies'} in {run_dir}")
        # The run's own options (a resumed run keeps those it started with, not this call's defaults).
        ran = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        if ran.evaluate_after:
            results = _evaluate_folders(
                list(saved.values()),
                ran.model,
                ran.data.source,
                65536,
                128,
                ran.device,
                dtype=ran.model_dtype,
            )
            _print_table(results)
    distributed.cleanup()


# ---- eval ---------------------------------------------------------------------------------------


def _sae_folders(path: Path) -> list[Path]:
    if (path / "cfg.json").exists() or (path / "ae.pt").exists():
        return [path]
    found = sorted(p.parent for p in path.glob("saes/*/cfg.json")) or sorted(
        p.parent for p in path.glob("*/cfg.json")
    )
    if not found:
        from saelab.errors import DictionaryFileError

        raise DictionaryFileError(
            f"no dictionary found at {path}: expected a SAE folder (cfg.json + sae_weights.safetensors), "
            "a run folder with saes/, or a sparsify / dictionary_learning folder."
        )
    return found


def _dtype(name: str, as_name: bool = False):
    """Check a --dtype option: a torch dtype or "auto" (as_name=True: its canonical name)."""
    from saelab.core.devices import dtype_name, parse_dtype

    parsed = parse_dtype(name)
    if as_name:
        return parsed if parsed == "auto" else dtype_name(parsed)
    return parsed


def _device(name: str) -> str:
    """Check a --device option and resolve "auto" to the device it picks here."""
    from saelab.core.devices import resolve_device

    return str(resolve_device(name))


def _evaluate_folders(folders, model, data, tokens, ce_contexts, device, out=None, dtype="auto"):
    from saelab.analysis.evaluation import EvalConfig, evaluate

    results = {}
    for folder, dictionary, lm, cfg in _with_models(folders, model, data, "eval", device, dtype):
        target = Path(out) / folder.name if out and len(folders) > 1 else (Path(out) if out else folder)
        results[folder.name] = evaluate(
            lm, dictionary, cfg, EvalConfig(n_tokens=tokens, ce_contexts=ce_contexts), out_dir=target
        )
    return results


def _with_models(folders, model, data, split, device, dtype):
    """(folder, dictionary, its model, its data config) per SAE folder; each model is loaded once.

    The model and data default to the ones named in the SAE's metadata.
    """
    from saelab.dictionaries.io import load_dictionary

    lms: dict = {}
    for folder in folders:
        dictionary = load_dictionary(folder)
        meta = dictionary.cfg.metadata
        name = resolve_model(model or meta.get("model_name"))
        if name not in lms:
            lms[name] = _load_model(name, device=device, dtype=_dtype(dtype))
        cfg = _data_config(
            data if data is not None else _dataset_of(meta),
            split,
            "text",
            int(meta.get("context_size") or 128),
            bool(meta.get("exclude_bos", True)),
            bool(meta.get("exclude_special_tokens", True)),
        )
        yield folder, dictionary, lms[name], cfg


def _dataset_of(meta: dict) -> str | None:
    path = meta.get("dataset_path")
    return None if path in (None, "", "saelab:embedded") else path


def _print_table(results: dict) -> None:
    table = Table(title="saelab evaluation (eval split; position 0 / BOS and special tokens excluded)")
    columns = [
        ("L0", "l0", "{:.1f}"),
        ("expl. var", "explained_variance", "{:.3f}"),
        ("MSE", "mse", "{:.3f}"),
        ("cos", "cosine_similarity", "{:.3f}"),
        ("CE clean", "ce_clean", "{:.3f}"),
        ("CE sae", "ce_sae", "{:.3f}"),
        ("CE zero", "ce_zero", "{:.3f}"),
        ("CE score", "ce_loss_score", "{:.3f}"),
        ("KL score", "kl_score", "{:.3f}"),
        ("dead", "dead_fraction", "{:.1%}"),
        ("dense", "dense_fraction", "{:.1%}"),
    ]
    table.add_column("dictionary")
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for name, metrics in results.items():
        table.add_row(name, *[fmt.format(metrics[key]) if key in metrics else "-" for _, key, fmt in columns])
    console.print(table)


@app.command("eval")
def eval_command(
    path: Path = typer.Argument(
        ..., help="A SAE folder (SAELens, sparsify or dictionary_learning) or a run folder."
    ),
    model: str = typer.Option(
        None, help="Model to splice into; default: the one named in the SAE's metadata."
    ),
    data: str = typer.Option(None, help="Evaluation text; default: the training source's held-out split."),
    tokens: int = typer.Option(65536, min=1, help="Tokens for reconstruction metrics and density."),
    ce_contexts: int = typer.Option(
        128, min=0, help="Contexts for CE / KL with the SAE spliced in (0 to skip)."
    ),
    out: Path = typer.Option(None, help="Where to write eval.json and density.png; default: beside the SAE."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Evaluate dictionaries: L0, MSE, explained variance, CE/KL loss recovered, dead/dense latents."""
    results = _evaluate_folders(_sae_folders(path), model, data, tokens, ce_contexts, device, out, dtype)
    _print_table(results)


# ---- analyze ------------------------------------------------------------------------------------


@app.command()
def analyze(
    path: Path = typer.Argument(..., help="A SAE folder, or a run folder (every SAE in its saes/)."),
    model: str = typer.Option(None, help="Model; default: the one named in the SAE's metadata."),
    data: str = typer.Option(None, help="Text source; default: the SAE's training data."),
    tokens: int = typer.Option(262_144, min=1, help="Tokens to stream through the model."),
    top_k: int = typer.Option(20, min=1, help="Top activating examples kept per latent."),
    out: Path = typer.Option(None, help="Database file (one SAE) or folder; default: features.db beside it."),
    resume: bool = typer.Option(False, help="Continue an interrupted analysis from its checkpoint."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    seed: int = typer.Option(0, help="Seed of the quantile-example reservoirs."),
):
    """One streaming pass: top and quantile examples, histograms, density, co-activation, logit effects,
    neighbours for every latent, into a SQLite feature store."""
    from saelab.analysis.features import AnalysisConfig
    from saelab.analysis.features import analyze as run_analysis
    from saelab.dictionaries.io import dictionary_metadata

    folders = _sae_folders(path)
    for folder, dictionary, lm, data_cfg in _with_models(folders, model, data, "train", device, dtype):
        if out is None:
            target = folder / "features.db"
        else:
            target = out / folder.name / "features.db" if len(folders) > 1 else out
        summary = run_analysis(
            lm,
            dictionary,
            data_cfg,
            AnalysisConfig(n_tokens=tokens, top_k=top_k, seed=seed),
            target,
            resume=resume,
            extra_meta={"dictionary_folder": str(folder), "dictionary": dictionary_metadata(folder)},
        )
        console.print(
            f"{folder.name}: analysed {summary['tokens']:,} tokens of {summary['contexts']:,} contexts "
            f"into {target}"
        )


def _store_path(path: Path) -> Path:
    """A features.db file given itself or the SAE folder it sits in; refuse one that does not exist."""
    from saelab.errors import DataError

    store_path = path / "features.db" if path.is_dir() else path
    if not store_path.is_file():
        raise DataError(f"no feature store at {store_path}. Run `saelab analyze {path}` first.")
    return store_path


@app.command()
def serve(
    path: Path = typer.Argument(..., help="A features.db file, or the SAE folder it sits in."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    live: bool = typer.Option(True, help="Load the model and SAE for 'test your own text' and text search."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Browse, search and test every feature of an analysed dictionary in a local web app."""
    from saelab.analysis.store import FeatureStore
    from saelab.server.app import serve as run_server

    store_path = _store_path(path)
    lm = dictionary = None
    if live:
        from saelab.dictionaries.io import load_dictionary

        with FeatureStore(store_path, create=False) as store:
            meta = store.meta()
        folder = Path(meta.get("dictionary_folder") or store_path.parent)
        dictionary = load_dictionary(folder)
        name = resolve_model(dictionary.cfg.metadata.get("model_name"))
        lm = _load_model(name, device=device, dtype=_dtype(dtype))
    console.print(f"serving {store_path} at http://{host}:{port}/ (Ctrl-C stops)")
    run_server(store_path, lm, dictionary, host=host, port=port)


@app.command("export")
def export_command(
    path: Path = typer.Argument(..., help="A features.db file, or the SAE folder it sits in."),
    feature: list[int] = typer.Option(
        None,
        help="Features to export (repeat); default: the HTML takes the "
        "20 densest, the JSON every latent that fires.",
    ),
    html: Path = typer.Option(None, help="Write a self-contained HTML dashboard (works from file://)."),
    neuronpedia: Path = typer.Option(
        None, help="Write Neuronpedia-style JSON, one <index>.json per feature."
    ),
):
    """Export features as a static HTML dashboard and/or Neuronpedia-style JSON."""
    from saelab.analysis.store import FeatureStore
    from saelab.export import export_html, export_neuronpedia

    store_path = _store_path(path)
    if html is None and neuronpedia is None:
        raise SaelabError("nothing to export: pass --html FILE and/or --neuronpedia FOLDER.")
    chosen = list(feature) if feature else None
    if html is not None:
        if chosen is None:
            with FeatureStore(store_path, create=False) as store:
                densest = [row["idx"] for row in store.list_features("density", True, 0, 20)]
        export_html(store_path, html, chosen if chosen is not None else densest)
        console.print(f"wrote {html}")
    if neuronpedia is not None:
        written = export_neuronpedia(store_path, neuronpedia, chosen)
        console.print(f"wrote {len(written)} feature files into {neuronpedia}")


# ---- demo ---------------------------------------------------------------------------------------


DEMO_PLAN = "demo_plan.json"


@app.command()
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
    serve_app: bool = typer.Option(True, "--serve/--no-serve", help="End by serving the feature web app."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port of the web app."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Harvest from the embedded corpus, train a TopK SAE on blocks.15.hook_resid_post, evaluate, summarise,
    analyse its features and serve them in the local web app, sized to fit --minutes on this machine."""
    from saelab.cli.budget import DemoPlan
    from saelab.core.fileio import atomic_write_json
    from saelab.training import DONE, TrainConfig
    from saelab.training import train as run_training

    start = started_at if started_at is not None else time.time()
    device = _device(device)
    plan_path = run_dir / DEMO_PLAN
    finished = (run_dir / DONE).exists() and not overwrite
    resumable = (run_dir / "checkpoint" / "state.pt").exists() and not overwrite
    timings: dict[str, float] = {}
    if finished or resumable:
        plan = DemoPlan(**json.loads(plan_path.read_text())) if plan_path.is_file() else None
        cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    else:
        plan, cfg = _plan_demo(run_dir, tokens, minutes, start, device, dtype, timings)
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
    results = _evaluate_folders(folders, None, None, eval_tokens, ce_contexts, device, dtype=cfg.model_dtype)
    timings["eval"] = time.perf_counter() - clock
    _print_table(results)
    metrics = results[folders[0].name]
    console.print(
        f"quality on held-out text: explained variance {metrics['explained_variance']:.3f}, "
        f"CE loss score {metrics.get('ce_loss_score', float('nan')):.3f}; SAE in {folders[0]}, metrics in "
        f"{folders[0] / 'eval.json'}, density plot in {folders[0] / 'density.png'}"
    )
    if analyze_tokens is None:
        analyze_tokens = plan.analyze_tokens if plan else 131_072
    store = folders[0] / "features.db"
    if analyze_tokens > 0 and (not _analysis_complete(store) or overwrite):
        clock = time.perf_counter()
        analyze(folders[0], tokens=analyze_tokens, model=None, data=None, top_k=20, out=None, resume=False,
                device=device, dtype=cfg.model_dtype, seed=0)  # fmt: skip
        timings["analyze"] = time.perf_counter() - clock
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    console.print(
        f"demo finished in {time.time() - start:.0f} s of a {minutes * 60:.0f} s budget "
        f"(counted from {'set-up' if started_at is not None else 'the start'}; {stages})"
    )
    if serve_app and analyze_tokens > 0:
        serve(folders[0], host="127.0.0.1", port=port, live=True, device=device, dtype=cfg.model_dtype)


def _plan_demo(run_dir, tokens, minutes, start, device, dtype, timings):
    """Measure this machine, size the demo to the time left, harvest its cache; return (plan, config)."""
    from saelab.cli.budget import measure_full_forward, measure_harvest, measure_train_step, plan_demo
    from saelab.core.activations import harvest_to_cache
    from saelab.core.data import DataConfig
    from saelab.core.devices import dtype_name, encoder_dtype
    from saelab.dictionaries import DictionaryConfig
    from saelab.training import TrainConfig

    clock = time.perf_counter()
    lm = _load_model(None, device=device, dtype=_dtype(dtype))
    model_dtype = dtype_name(lm.model.dtype)
    dictionary = DictionaryConfig(architecture="topk", k=32, d_sae=4608, d_in=lm.d_model,
                                  encoder_dtype=encoder_dtype("auto", device) if dtype == "auto" else "float32")  # fmt: skip
    data = DataConfig()
    harvest_speed = measure_harvest(lm, data, dictionary.hook_name)
    train_speed = measure_train_step(dictionary) / 1.1  # the loop's bookkeeping, logging, checkpoints
    forward_speed = measure_full_forward(lm, DataConfig(split="eval"))
    timings["load+measure"] = time.perf_counter() - clock
    left = minutes * 60 - (time.time() - start)
    plan = plan_demo(harvest_speed, train_speed, left, fixed_tokens=tokens, forward_tok_s=forward_speed)
    console.print(
        f"demo plan: {plan.harvest_tokens:,} tokens harvested, {plan.train_tokens:,} trained "
        f"({plan.epochs:.1f} epochs), eval {plan.eval_tokens:,} tokens + {plan.ce_contexts} CE contexts, "
        f"analysis {plan.analyze_tokens:,} tokens; about {plan.estimate_s / 60:.1f} of the {left / 60:.1f} "
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


def _analysis_complete(store_path: Path) -> bool:
    from saelab.analysis.store import FeatureStore

    if not store_path.is_file():
        return False
    with FeatureStore(store_path, create=False) as store:
        return (store.progress() or {}).get("status") == "complete"


# ---- toy models and the ground-truth benchmark ----------------------------------------------------

toy_app = typer.Typer(
    help="Toy models of superposition and the ground-truth benchmark (no language model needed).",
    no_args_is_help=True,
)
app.add_typer(toy_app, name="toy")

_TOY_OUT = typer.Option(Path("runs/toy"), "--out", help="Folder for the JSON results and PNG plots.")
_QUICK = typer.Option(False, help="A reduced, faster version (what the tests run).")
_SEED = typer.Option(0, help="Seed: the same seed gives the same numbers.")


def _print_toy_summary(name: str, result: dict, out: Path) -> None:
    seconds = result.get("wall_seconds")
    timing = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    console.print(f"{name}: done{timing}; results in {out}")


@toy_app.command("superposition")
def toy_superposition(
    n: int = typer.Option(5, help="Number of features."),
    m: int = typer.Option(2, help="Number of hidden dimensions (m < n)."),
    out: Path = _TOY_OUT,
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Features represented and in superposition as sparsity rises (Elhage et al. 2022)."""
    from saelab.toy import tms

    if not 0 < m < n:
        raise SaelabError(f"need 0 < m < n for superposition, got n={n}, m={m}.")
    result = tms.sparsity_sweep(out, n=n, m=m, quick=quick, seed=seed, progress=True)
    _print_toy_sweep(result)
    _print_toy_summary(f"superposition n={n} m={m}", result, out)


def _print_toy_sweep(result: dict) -> None:
    table = Table(title="features represented (||W_i|| > 0.5) per instance")
    for column in ("1 - S", "represented (per instance)", "in superposition", "instances with all"):
        table.add_column(column)
    for point in result.get("per_density", []):
        table.add_row(
            f"{point['density']:g}",
            " ".join(str(v) for v in point["n_represented"]),
            " ".join(str(v) for v in point["n_superposition"]),
            f"{point['n_all_represented']}/{point['n_instances']}",
        )
    console.print(table)


@toy_app.command("phase")
def toy_phase(out: Path = _TOY_OUT, quick: bool = _QUICK, seed: int = _SEED):
    """Phase diagram of one extra feature: not represented / dedicated dimension / superposition."""
    from saelab.toy import tms

    result = tms.phase_diagram(out, quick=quick, seed=seed, progress=True)
    _print_toy_summary("phase diagram", result, out)


@toy_app.command("dimensionality")
def toy_dimensionality(
    n: int = typer.Option(400, help="Number of features."),
    m: int = typer.Option(30, help="Number of hidden dimensions."),
    out: Path = _TOY_OUT,
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Feature dimensionality D_i and its clustering at 1, 1/2, 2/3, 2/5 ... as sparsity rises."""
    from saelab.toy import tms

    result = tms.dimensionality(out, n=n, m=m, quick=quick, seed=seed, progress=True)
    _print_toy_summary(f"dimensionality n={n} m={m}", result, out)


@toy_app.command("bench")
def toy_bench(
    out: Path = typer.Option(Path("runs/toy/bench"), "--out", help="Folder for runs, tables and plots."),
    setting: list[str] = typer.Option(None, help="Only these settings (uniform, sharkey, toy_model)."),
    quick: bool = _QUICK,
    seed: int = _SEED,
):
    """Every dictionary family on synthetic data with known features: MMCS, recovery, L0, FVU."""
    from saelab.toy.bench import run_bench

    results = run_bench(out, quick=quick, seed=seed, settings=setting or None, progress=True)
    console.print((out / "results.md").read_text(), markup=False, highlight=False)
    console.print(f"benchmark finished in {results['wall_seconds']:.0f} s; table in {out / 'results.md'}")


@toy_app.command("all")
def toy_all(out: Path = _TOY_OUT, quick: bool = _QUICK, seed: int = _SEED):
    """Everything: the superposition results, the phase diagram, dimensionality, and the benchmark."""
    from saelab.toy import tms
    from saelab.toy.bench import run_bench

    start = time.perf_counter()
    tms.run_all(out, quick=quick, seed=seed, progress=True)
    run_bench(out / "bench", quick=quick, seed=seed, progress=True)
    console.print((out / "bench" / "results.md").read_text(), markup=False, highlight=False)
    console.print(
        f"toy models and benchmark finished in {time.perf_counter() - start:.0f} s; results in {out}"
    )


# ---- interventions (steering, directions) ---------------------------------------------------------
from saelab.cli.steering import direction_app, steer_app  # noqa: E402

app.add_typer(steer_app, name="steer")
app.add_typer(direction_app, name="direction")

if __name__ == "__main__":  # after every command group is registered (python -m saelab.cli steer ...)
    main()
