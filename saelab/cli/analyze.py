"""`saelab analyze`: one streaming pass of every latent's statistics into a SQLite feature store."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from saelab.cli.common import (
    CHAT_HELP,
    DEVICE_OPTION,
    DTYPE_OPTION,
    ROLES_HELP,
    console,
    load_lm,
    resolve_model,
)
from saelab.cli.sae_inputs import sae_folders, with_models

if TYPE_CHECKING:
    from saelab.core.data import DataConfig
    from saelab.dictionaries import Dictionary


def analyze(
    path: Path = typer.Argument(..., help="A SAE folder, or a run folder (every SAE in its saes/)."),
    model: list[str] = typer.Option(
        None,
        help="Model; default: the one named in the SAE's metadata. A crosscoder between models takes it once "
        "per member, in member order (default: the member_models it records).",
    ),
    data: str = typer.Option(None, help="Text source; default: the SAE's training data."),
    chat: bool = typer.Option(False, help=CHAT_HELP),
    roles: str = typer.Option(None, help=ROLES_HELP),
    tokens: int = typer.Option(262_144, min=1, help="Tokens to stream through the model."),
    top_k: int = typer.Option(20, min=1, help="Top activating examples kept per latent."),
    out: Path = typer.Option(None, help="Database file (one SAE) or folder; default: features.db beside it."),
    resume: bool = typer.Option(False, help="Continue an interrupted analysis from its checkpoint."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Seed of the quantile-example reservoirs."),
):
    """One streaming pass: top and quantile examples, histograms, density, co-activation, logit effects,
    neighbours for every latent, into a SQLite feature store. A crosscoder between models is run over
    all of them, with per-member decoder norms and logit effects and its latents' diffing tags."""
    from saelab.analysis.features import AnalysisConfig
    from saelab.analysis.features import analyze as run_analysis
    from saelab.dictionaries.io import dictionary_metadata

    folders = sae_folders(path)
    models = list(model or [])
    paired = [f for f in folders if reads_several_models(f)]
    single = [f for f in folders if f not in paired]
    if single and len(models) > 1:
        from saelab.errors import ModelNotFoundError

        raise ModelNotFoundError(
            f"--model was given {len(models)} times, but {', '.join(f.name for f in single)} reads one model. "
            "Give --model several times only for a crosscoder between models (once per member)."
        )
    inputs = itertools.chain(  # lazily: one dictionary at a time
        with_models(single, models[0] if models else None, data, "train", device, dtype, chat or None, roles),
        with_member_models(paired, models, data, "train", device, dtype, chat or None, roles),
    )
    for folder, dictionary, lm, data_cfg in inputs:
        if out is None:
            target = folder / "features.db"
        else:
            target = out / folder.name / "features.db" if len(folders) > 1 else out
        diff_file = saved_diff(folder) if folder in paired else None
        summary = run_analysis(
            lm,
            dictionary,
            data_cfg,
            AnalysisConfig(n_tokens=tokens, top_k=top_k, seed=seed),
            target,
            resume=resume,
            extra_meta={
                "dictionary_folder": str(folder),
                "dictionary": dictionary_metadata(folder),
                **({"latent_diff": {"diff_json": str(diff_file)}} if diff_file else {}),
            },
            latent_diff=json.loads(diff_file.read_text())["latents"] if diff_file else None,
        )
        console.print(
            f"{folder.name}: analysed {summary['tokens']:,} tokens of {summary['contexts']:,} contexts "
            f"into {target}" + (f" (with the diff in {diff_file})" if diff_file else "")
        )


def reads_several_models(folder: Path) -> bool:
    """Whether the dictionary at `folder` is a crosscoder between models (hooks model{i}/...), from its
    config alone (no weights read)."""
    from saelab.dictionaries.io import dictionary_metadata

    meta = dictionary_metadata(folder)
    hook = str(meta.get("hook_name") or "")
    return meta.get("architecture", "").startswith("crosscoder") and hook.startswith("model{i}/")


def with_member_models(
    folders: list[Path],
    models: list[str],
    data: str | None,
    split: str,
    device: str,
    dtype: str,
    chat: bool | None = None,
    roles: str | list[str] | None = None,
) -> Iterator[tuple[Path, Dictionary, object, DataConfig]]:
    """(folder, crosscoder, its member models as one PairedModels, its data config) per crosscoder folder.

    The members are `models` if given (one per member, in member order), else the crosscoder's
    `member_models`; each is loaded once. The data is read as `with_models` reads it (chat and roles too)."""
    from saelab.cli.sae_inputs import sae_data_config
    from saelab.dictionaries.families.crosscoder import MEMBER_MODELS
    from saelab.dictionaries.io import load_dictionary
    from saelab.diffing.paired import PairedModels
    from saelab.errors import ModelNotFoundError, SaelabError

    loaded: dict[str | None, object] = {}
    for folder in folders:
        crosscoder = load_dictionary(folder)
        meta = crosscoder.cfg.metadata
        n = crosscoder.n_members
        names = models or meta.get(MEMBER_MODELS)
        fix = f"Pass --model once per member, in member order: saelab analyze {folder} " + " ".join(
            f"--model MODEL_{i}" for i in range(n)
        )
        if not isinstance(names, list) or len(names) != n:
            why = (
                f"{len(names)} --model given"
                if models
                else "its config records no member_models (it was not trained from a paired cache)"
            )
            raise ModelNotFoundError(f"the crosscoder {folder} reads {n} models, but {why}. {fix}.")
        lms = []
        for i, name in enumerate(names):
            key = resolve_model(str(name))
            if key not in loaded:
                try:
                    loaded[key] = load_lm(key, device=device, dtype=dtype)
                except (SaelabError, OSError) as err:
                    raise ModelNotFoundError(
                        f"member {i} of the crosscoder {folder}, model {name!r}, cannot be loaded ({err}). "
                        f"{fix} (a folder or hub id of each model it was trained on)."
                    ) from None
            lms.append(loaded[key])
        cfg = sae_data_config(meta, data, split, chat, roles)
        yield folder, crosscoder, PairedModels(lms), cfg


def saved_diff(folder: Path) -> Path | None:
    """`saelab diff`'s diff.json of the crosscoder at `folder` (its default diff/ folder, or beside it)."""
    for candidate in (folder / "diff" / "diff.json", folder / "diff.json"):
        if candidate.is_file():
            return candidate
    return None


def write_latent_diff(store_path: Path, rows: list[dict], source: dict) -> Path | None:
    """Write `saelab diff`'s per-latent tags and ν into the crosscoder's feature store, if it has one."""
    from saelab.analysis.store import FeatureStore

    if not store_path.is_file():
        return None
    with FeatureStore(store_path, create=False) as store:
        store.set_latent_diff(rows, source)
    return store_path


def analysis_complete(store_path: Path) -> bool:
    """Whether `store_path` holds a finished analysis (an interrupted one is redone)."""
    from saelab.analysis.store import FeatureStore

    if not store_path.is_file():
        return False
    with FeatureStore(store_path, create=False) as store:
        return (store.progress() or {}).get("status") == "complete"
