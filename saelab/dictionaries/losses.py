"""Loss pieces several families share: the scale-free reconstruction error, logged terms, L1 warm-up."""

from __future__ import annotations

import torch

from saelab.dictionaries.base import StepContext
from saelab.dictionaries.config import DictionaryConfig


def fvu(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: summed squared error over the target's summed variance."""
    return error.pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-8)


def stats(loss, mse_per_token, fvu, l0, **extra) -> dict[str, float]:
    """The numbers a training step logs, as floats."""
    out = {"loss": float(loss), "mse": float(mse_per_token), "fvu": float(fvu), "l0": float(l0)}
    out.update({name: float(value) for name, value in extra.items()})
    return out


def l1_weight(cfg: DictionaryConfig, ctx: StepContext) -> float:
    """The L1 coefficient, ramped up linearly over the first l1_warmup_fraction of training."""
    if cfg.l1_warmup_fraction <= 0:
        return cfg.l1_coefficient
    return cfg.l1_coefficient * min(1.0, ctx.progress / cfg.l1_warmup_fraction)
