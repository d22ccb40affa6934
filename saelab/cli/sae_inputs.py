"""The dictionaries a command is pointed at, each with the model and text it was trained on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from saelab.cli.common import data_config, load_lm, resolve_model

if TYPE_CHECKING:
    from saelab.core.data import DataConfig
    from saelab.core.models import HookedLM
    from saelab.dictionaries import Dictionary


def sae_folders(path: Path) -> list[Path]:
    """One SAE folder, or every SAE of a run folder (saes/*) or of a folder of SAE folders."""
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


def with_models(
    folders: list[Path],
    model: str | None,
    data: str | None,
    split: str,
    device: str,
    dtype: str,
    chat: bool | None = None,
    roles: str | list[str] | None = None,
) -> Iterator[tuple[Path, Dictionary, HookedLM, DataConfig]]:
    """(folder, dictionary, its model, its data config) per SAE folder; each model is loaded once.

    The model and data default to the ones named in the SAE's metadata, chat data and its roles too
    (`chat`/`roles` None: as the SAE was trained; `--data` alone names plain text).
    """
    from saelab.dictionaries.io import load_dictionary

    lms: dict[str | None, HookedLM] = {}
    for folder in folders:
        dictionary = load_dictionary(folder)
        meta = dictionary.cfg.metadata
        name = resolve_model(model or meta.get("model_name"))
        if name not in lms:
            lms[name] = load_lm(name, device=device, dtype=dtype)
        cfg = sae_data_config(meta, data, split, chat, roles)
        yield folder, dictionary, lms[name], cfg


def sae_data_config(
    meta: dict, data: str | None, split: str, chat: bool | None = None, roles: str | list[str] | None = None
) -> DataConfig:
    """The data a dictionary is read on: `data` or the dataset of its metadata, with its context size and
    exclusions; chat data and its roles too when it was trained on chat (`chat`/`roles` None: as trained)."""
    trained_chat = data is None and bool(meta.get("chat"))
    return data_config(
        data if data is not None else _dataset_of(meta),
        split,
        "text",
        int(meta.get("context_size") or 128),
        bool(meta.get("exclude_bos", True)),
        bool(meta.get("exclude_special_tokens", True)),
        chat=trained_chat if chat is None else chat,
        roles=roles if roles is not None or chat else (meta.get("roles") if trained_chat else None),
    )


def _dataset_of(meta: dict) -> str | None:
    path = meta.get("dataset_path")
    return None if path in (None, "", "saelab:embedded") else path
