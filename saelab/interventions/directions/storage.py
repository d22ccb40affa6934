"""The direction-set file format: a folder with directions.safetensors and directions.json (never pickle).

The JSON side holds the hook points, the position labels, the shape and the provenance (model, the
two prompt sets with their sizes and hash, method, chat template, date, saelab version).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.core.fileio import atomic_folder
from saelab.core.prompts import Position
from saelab.errors import DimensionMismatchError, DirectionFileError, DirectionLookupError

FORMAT = "saelab.directions"
FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
META_FILE = "directions.json"


@dataclass
class DirectionSet:
    """Directions [n_hooks, n_positions, d_model] (float32) with their hook points, positions and provenance."""

    vectors: Tensor
    hooks: list[str]
    positions: list[Position]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = torch.as_tensor(self.vectors).detach().float().cpu()
        self.hooks, self.positions = list(self.hooks), list(self.positions)
        want = (len(self.hooks), len(self.positions))
        if self.vectors.ndim != 3 or tuple(self.vectors.shape[:2]) != want:
            raise DimensionMismatchError(
                f"vectors have shape {tuple(self.vectors.shape)} but {want[0]} hooks and {want[1]} positions "
                f"need [{want[0]}, {want[1]}, d_model]."
            )

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    def get(self, hook: str | int, position: Position = -1) -> Tensor:
        """The direction at `hook` (a name, or a layer number when one hook of that layer is stored)."""
        return self.vectors[self._hook_index(hook), self._position_index(position)].clone()

    def _hook_index(self, hook: str | int) -> int:
        if isinstance(hook, int):
            matches = [i for i, h in enumerate(self.hooks) if h.startswith(f"blocks.{hook}.")]
            if len(matches) == 1:
                return matches[0]
            raise DirectionLookupError(
                f"layer {hook} matches {len(matches)} stored hooks; name the hook: one of {self.hooks}."
            )
        if hook not in self.hooks:
            raise DirectionLookupError(
                f"no direction at {hook!r}; this set has hooks {self.hooks}. Pick one of them."
            )
        return self.hooks.index(hook)

    def _position_index(self, position: Position) -> int:
        if position not in self.positions:
            raise DirectionLookupError(
                f"no direction at position {position!r}; this set has positions {self.positions}. Pick one of them."
            )
        return self.positions.index(position)

    def save(self, path: str | Path) -> Path:
        """Write the folder `path` (directions.safetensors + directions.json) atomically, replacing it whole."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "hooks": self.hooks,
            "positions": self.positions,
            "shape": list(self.vectors.shape),
            "provenance": self.provenance,
        }
        with atomic_folder(path) as tmp:
            save_file(
                {"vectors": self.vectors.contiguous()}, str(tmp / TENSORS_FILE), metadata={"format": FORMAT}
            )
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a folder written by `save`; a missing, corrupt or foreign file is a DirectionFileError."""
        folder = _folder_of(Path(path))
        meta = _read_meta(folder / META_FILE)
        try:
            tensors = load_file(str(folder / TENSORS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DirectionFileError(
                f"{folder / TENSORS_FILE} is corrupt or truncated ({exc}). Recompute the directions and save "
                "them again."
            ) from exc
        if "vectors" not in tensors:
            raise DirectionFileError(
                f"{folder / TENSORS_FILE} has no 'vectors' tensor (it holds {sorted(tensors)}); it was not "
                "written by DirectionSet.save. Recompute and save the directions."
            )
        vectors = tensors["vectors"]
        if list(vectors.shape) != list(meta.get("shape", [])):
            raise DirectionFileError(
                f"{folder} is inconsistent: directions.json says shape {meta.get('shape')} but the tensors "
                f"have {list(vectors.shape)}. The two files come from different saves; save the set again."
            )
        return cls(vectors, meta["hooks"], meta["positions"], meta.get("provenance", {}))


def _folder_of(path: Path) -> Path:
    if path.is_file() and path.name in (TENSORS_FILE, META_FILE):
        path = path.parent
    if path.is_file():
        raise DirectionFileError(
            f"{path} is a file; a direction set is a folder with {TENSORS_FILE} and {META_FILE} (pickled "
            ".pt files are never loaded). Pass the folder that DirectionSet.save wrote."
        )
    if not path.is_dir():
        raise DirectionFileError(f"no direction set at {path}: the folder does not exist. Check the path.")
    missing = [name for name in (META_FILE, TENSORS_FILE) if not (path / name).is_file()]
    if missing:
        raise DirectionFileError(
            f"{path} is not a direction set: {', '.join(missing)} missing. Pass a folder written by "
            "DirectionSet.save."
        )
    return path


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DirectionFileError(
            f"{path} is not valid JSON ({exc}); the save was damaged. Save the set again."
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DirectionFileError(
            f"{path} is not a saelab direction set (its 'format' is "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}). Pass a folder "
            "written by DirectionSet.save."
        )
    if meta.get("version", 0) > FORMAT_VERSION:
        raise DirectionFileError(
            f"{path} was written by a newer saelab (format version {meta['version']}); upgrade saelab to read it."
        )
    for key in ("hooks", "positions", "shape"):
        if key not in meta:
            raise DirectionFileError(
                f"{path} lacks the key {key!r}; the file is damaged. Save the set again."
            )
    return meta
