"""`saelab analyze`: one streaming pass of every latent's statistics into a SQLite feature store."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console
from saelab.cli.sae_inputs import sae_folders, with_models


def analyze(
    path: Path = typer.Argument(..., help="A SAE folder, or a run folder (every SAE in its saes/)."),
    model: str = typer.Option(None, help="Model; default: the one named in the SAE's metadata."),
    data: str = typer.Option(None, help="Text source; default: the SAE's training data."),
    tokens: int = typer.Option(262_144, min=1, help="Tokens to stream through the model."),
    top_k: int = typer.Option(20, min=1, help="Top activating examples kept per latent."),
    out: Path = typer.Option(None, help="Database file (one SAE) or folder; default: features.db beside it."),
    resume: bool = typer.Option(False, help="Continue an interrupted analysis from its checkpoint."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Seed of the quantile-example reservoirs."),
):
    """One streaming pass: top and quantile examples, histograms, density, co-activation, logit effects,
    neighbours for every latent, into a SQLite feature store."""
    from saelab.analysis.features import AnalysisConfig
    from saelab.analysis.features import analyze as run_analysis
    from saelab.dictionaries.io import dictionary_metadata

    folders = sae_folders(path)
    for folder, dictionary, lm, data_cfg in with_models(folders, model, data, "train", device, dtype):
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


def analysis_complete(store_path: Path) -> bool:
    """Whether `store_path` holds a finished analysis (an interrupted one is redone)."""
    from saelab.analysis.store import FeatureStore

    if not store_path.is_file():
        return False
    with FeatureStore(store_path, create=False) as store:
        return (store.progress() or {}).get("status") == "complete"
