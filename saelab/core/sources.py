"""Activation sources: the one protocol the trainer reads batches through, and the kinds a config names.

A model's activations come from the trainer's own sources (a disk cache, or the live model through a
shuffle buffer; see saelab.core.activations). Any other source is a *kind*: a training config asks for
it as {"kind": name, **settings} (TrainConfig.source), and the module that defines the kind registers
a `SourceKind` here when it is imported, so the trainer builds it without knowing it exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from saelab.errors import DataError

if TYPE_CHECKING:
    from saelab.core.models import HookedLM

# Where the kinds that ship with saelab are registered (for the error message when none is imported).
SHIPPED_KINDS = {"synthetic": "saelab.toy.synthetic", "hierarchy": "saelab.toy.hierarchy"}


class ActivationSource(Protocol):
    """What the trainer needs of a source: batches {hook: [rows, d]}, widths, and an exact position."""

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        """This rank's next batch, or None when the source is exhausted."""

    def dims(self) -> dict[str, int]:
        """The width of every hook the batches hold."""

    def peek(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Rows to initialise dictionaries from, without moving the read position."""

    def state_dict(self) -> dict:
        """The read position, for checkpoints."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position state_dict() gave."""


@dataclass(frozen=True)
class SourceKind:
    """A source a training config can name by kind, and what the trainer must know about it."""

    name: str  # the "kind" of the config's source dict
    description: str  # for messages: "dictionaries trained on {description} read ..."
    # build(settings, batch_size=, rank=, world_size=, lm=) -> the source for this rank.
    build: Callable[..., ActivationSource]
    hooks: Callable[[dict], tuple[str, ...]]  # the hook names its batches hold, for these settings
    # What every dictionary trained on it records in its cfg.json metadata (model_name, dataset_path, ...).
    metadata: Callable[[dict], dict]
    needs_model: bool = False  # build() is then given the run's loaded model as `lm`


_kinds: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> SourceKind:
    """Make a kind known (its module calls this once, at import)."""
    _kinds[kind.name] = kind
    return kind


def source_kind(name: str) -> SourceKind:
    """The registered kind called `name`; the error says which module registers it."""
    if name in _kinds:
        return _kinds[name]
    if name in SHIPPED_KINDS:
        hint = f"import {SHIPPED_KINDS[name]} first, which registers it (saelab's CLI and toy bench do)"
    else:
        hint = "import the module that defines it first (it calls saelab.core.sources.register_source)"
    known = ", ".join(sorted(_kinds)) or "none"
    raise DataError(f"unknown activation source kind {name!r} (registered: {known}); {hint}.")


def resolve_source(spec: dict) -> tuple[SourceKind, dict]:
    """The kind of a config's {"kind": name, **settings} and its settings (the dict without "kind")."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise DataError(f"an activation source must be a dict with a 'kind' key, got {spec!r}.")
    return source_kind(spec["kind"]), {key: value for key, value in spec.items() if key != "kind"}


def build_source(
    spec: dict, batch_size: int, rank: int = 0, world_size: int = 1, lm: HookedLM | None = None
) -> ActivationSource:
    """The source a {"kind": name, **settings} dict describes, for this rank."""
    kind, settings = resolve_source(spec)
    return kind.build(settings, batch_size=batch_size, rank=rank, world_size=world_size, lm=lm)
