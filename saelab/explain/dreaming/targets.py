"""Targets for fluent dreaming: what EPO maximises, read from one forward pass.

A `Target` maps the activations at its hook point (or the logits) of the prompt's tokens, BOS excluded,
to an objective and an activation per token; `position` says which token counts ("last" or the "max"
over the prompt). See `saelab.explain.dreaming` for the definitions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.errors import DataError, DimensionMismatchError

POSITIONS = ("last", "max")


@dataclass(frozen=True)
class Target:
    """What to maximise. `read` maps [batch, tokens, width] (the hook's activations, or the logits when
    `hook_name` is None) to (objective, activation) per token, each [batch, tokens]."""

    kind: str
    hook_name: str | None
    read: Callable[[Tensor], tuple[Tensor, Tensor]]
    position: str
    info: dict = field(default_factory=dict)
    check: Callable[[HookedLM], None] = lambda lm: None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "hook_name": self.hook_name, "position": self.position, **self.info}


def _position(position: str) -> str:
    if position not in POSITIONS:
        raise DataError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}.")
    return position


def _check_width(lm: HookedLM, hook: str, width: int, what: str) -> None:
    if lm.hook_dim(hook) != width:  # hook_dim raises UnknownHookError for a hook the model lacks
        raise DimensionMismatchError(
            f"{what} has width {width} but {hook} of {lm.name} has width {lm.hook_dim(hook)}; "
            "use a hook point of the model it was made for."
        )


def latent_target(dictionary: Dictionary, idx: int, position: str = "last") -> Target:
    """An SAE latent: ``dictionary.encode(x)[..., idx]`` at ``dictionary.cfg.hook_name``."""
    if not isinstance(idx, int) or not 0 <= idx < dictionary.d_sae:
        raise DataError(
            f"latent {idx!r} is out of range: this dictionary has latents 0-{dictionary.d_sae - 1}."
        )
    hook = dictionary.cfg.hook_name
    if not hook:
        raise DataError(
            "this dictionary records no hook_name; set dictionary.cfg.hook_name to its hook point."
        )
    threshold = getattr(dictionary, "threshold", None)

    def read(x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(dictionary.W_enc.device, dictionary.W_enc.dtype)
        pre = dictionary.preacts(x)
        act = dictionary.encode(x)[..., idx]
        if isinstance(threshold, Tensor):
            tau = threshold[idx].to(pre.dtype)
        else:  # the lowest pre-activation that fires on each token (TopK: the k-th largest)
            fires = dictionary.activation(pre) > 0
            tau = torch.where(fires, pre, torch.full_like(pre, math.inf)).amin(-1)
            tau = torch.where(torch.isfinite(tau), tau, torch.zeros_like(tau))
        below = (pre[..., idx] - tau).clamp(max=0.0)
        return torch.where(act > 0, act, below).float(), act.float()

    info = {"latent": idx, "architecture": dictionary.cfg.architecture, "d_sae": dictionary.d_sae}

    def check(lm: HookedLM) -> None:
        _check_width(lm, hook, dictionary.d_in, f"the dictionary (d_in={dictionary.d_in})")

    return Target("latent", hook, read, _position(position), info, check)


def direction_target(hook_name: str, vector, position: str = "last") -> Target:
    """The projection ``x . v / |v|`` of the activations at `hook_name` on a direction v."""
    v = torch.as_tensor(vector).detach().float().flatten()
    if v.numel() == 0 or not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
        raise DataError(
            "the direction is empty, zero or holds NaN/inf values; give a finite, non-zero vector."
        )
    unit = v / v.norm()

    def read(x: Tensor) -> tuple[Tensor, Tensor]:
        value = x.float() @ unit.to(x.device)
        return value, value

    info = {"norm": float(v.norm()), "d": int(v.numel())}

    def check(lm: HookedLM) -> None:
        _check_width(lm, hook_name, v.numel(), f"the direction (width {v.numel()})")

    return Target("direction", hook_name, read, _position(position), info, check)


def logit_target(token_id: int) -> Target:
    """The logit of `token_id` at the final position."""
    if not isinstance(token_id, int) or token_id < 0:
        raise DataError(f"token id {token_id!r} must be a non-negative integer.")

    def read(logits: Tensor) -> tuple[Tensor, Tensor]:
        value = logits[..., token_id].float()
        return value, value

    def check(lm: HookedLM) -> None:
        vocab = lm.unembed.shape[0]
        if token_id >= vocab:
            raise DataError(
                f"token id {token_id} is outside the vocabulary of {lm.name} (ids 0-{vocab - 1})."
            )

    return Target("logit", None, read, "last", {"token_id": token_id}, check)
