"""Activations of a prompt set at chosen hook points and positions, as one tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.core.prompts import Position, iter_prompt_activations
from saelab.interventions.directions.positions import resolve_positions


def resid_pre_hooks(lm: HookedLM) -> list[str]:
    """blocks.{i}.hook_resid_pre of every layer: where directions are read when no hooks are named."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(lm.n_layers)]


def collect_activations(
    lm: HookedLM,
    prompts: Sequence[str],
    hooks: Sequence[str] | None = None,
    positions: Sequence[Position] = (-1,),
    chat: bool = True,
    batch_size: int = 16,
    answers: Sequence[str] | None = None,
) -> Tensor:
    """Activations [n_prompts, n_hooks, n_positions, d] at `hooks` (None = every resid_pre) and positions."""
    hooks = list(hooks) if hooks is not None else resid_pre_hooks(lm)
    positions = resolve_positions(lm.tokenizer, positions, chat)
    batches = iter_prompt_activations(lm, list(prompts), hooks, positions, chat, batch_size, answers)
    return torch.cat(list(batches))
