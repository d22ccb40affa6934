"""`saelab eval`, and the evaluation table that `train` and `demo` print after training too."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from saelab.cli.common import CHAT_HELP, DEVICE_OPTION, DTYPE_OPTION, ROLES_HELP, console
from saelab.cli.sae_inputs import sae_folders, with_models

_COLUMNS = [
    ("L0", "l0", "{:.1f}"),
    ("expl. var", "explained_variance", "{:.3f}"),
    ("EV trimmed", "explained_variance_trimmed", "{:.3f}"),
    ("EV SAELens", "saelens_explained_variance", "{:.3f}"),
    ("MSE", "mse", "{:.3f}"),
    ("cos", "cosine_similarity", "{:.3f}"),
    ("CE clean", "ce_clean", "{:.3f}"),
    ("CE sae", "ce_sae", "{:.3f}"),
    ("CE zero", "ce_zero", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    ("CE SAELens", "saelens_ce_loss_score", "{:.3f}"),
    ("KL score", "kl_score", "{:.3f}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("dense", "dense_fraction", "{:.1%}"),
]


def evaluate_folders(
    folders: list[Path],
    model: str | None,
    data: str | None,
    tokens: int,
    ce_contexts: int,
    device: str,
    out: Path | None = None,
    dtype: str = "auto",
    chat: bool | None = None,
    roles: str | list[str] | None = None,
    anchor_ce: bool = False,
) -> dict[str, dict]:
    """Metrics per SAE folder name; eval.json and density.png go beside each SAE, or under `out`.

    `chat`/`roles` None: as each SAE was trained (see `with_models`). `anchor_ce` adds SAELens's and
    SAEBench's CE / KL (two more forward passes per batch; off for the tables train and demo print)."""
    from saelab.analysis.evaluation import EvalConfig, evaluate

    results = {}
    for folder, dictionary, lm, cfg in with_models(folders, model, data, "eval", device, dtype, chat, roles):
        target = Path(out) / folder.name if out and len(folders) > 1 else (Path(out) if out else folder)
        results[folder.name] = evaluate(
            lm,
            dictionary,
            cfg,
            EvalConfig(n_tokens=tokens, ce_contexts=ce_contexts, anchor_ce=anchor_ce),
            out_dir=target,
        )
    return results


def print_results(results: dict[str, dict]) -> None:
    """One row of metrics per dictionary ("-" where a metric was not computed)."""
    table = Table(title="saelab evaluation (eval split; position 0 / BOS and special tokens excluded)")
    table.add_column("dictionary")
    for title, _, _ in _COLUMNS:
        table.add_column(title, justify="right")
    for name, metrics in results.items():
        table.add_row(
            name, *[fmt.format(metrics[key]) if key in metrics else "-" for _, key, fmt in _COLUMNS]
        )
    console.print(table)


def eval_command(
    path: Path = typer.Argument(
        ..., help="A SAE folder (SAELens, sparsify or dictionary_learning) or a run folder."
    ),
    model: str = typer.Option(
        None, help="Model to splice into; default: the one named in the SAE's metadata."
    ),
    data: str = typer.Option(None, help="Evaluation text; default: the training source's held-out split."),
    chat: bool = typer.Option(False, help=CHAT_HELP),
    roles: str = typer.Option(None, help=ROLES_HELP),
    tokens: int = typer.Option(65536, min=1, help="Tokens for reconstruction metrics and density."),
    ce_contexts: int = typer.Option(
        128, min=0, help="Contexts for CE / KL with the SAE spliced in (0 to skip)."
    ),
    out: Path = typer.Option(None, help="Where to write eval.json and density.png; default: beside the SAE."),
    anchors: bool = typer.Option(
        True,
        help="Also CE / KL as SAELens and SAEBench define them (saelens_*, saebench_*; 5 forwards, not 3).",
    ),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Evaluate dictionaries: L0, MSE, explained variance, CE/KL loss recovered, dead/dense latents."""
    results = evaluate_folders(
        sae_folders(path), model, data, tokens, ce_contexts, device, out, dtype, chat or None, roles, anchors
    )
    print_results(results)
