"""The toy model x' = ReLU(W^T W x + b), the sparse features it reconstructs, and its loss.

x_i = 0 with probability S, else U[0, 1]; h = W x; the loss is sum_i I_i (x_i - x'_i)^2, summed over
features and averaged over the batch. Many instances (each with its own feature density, importance
and initial weights) live in one batched model, so a whole sweep trains as one.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ToyModel(nn.Module):
    """Many independent toy models in one: x is [instances, batch, features] (instance-major for bmm)."""

    def __init__(self, n_instances: int, n_features: int, n_hidden: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # Xavier-normal per instance (std sqrt(2 / (n + m))), drawn instance by instance from one seed.
        std = math.sqrt(2.0 / (n_features + n_hidden))
        self.W = nn.Parameter(torch.randn(n_instances, n_hidden, n_features, generator=generator) * std)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h = W x: [instances, batch, features] -> [instances, batch, hidden]."""
        return torch.bmm(x, self.W.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x' = ReLU(W^T W x + b), same shape as x."""
        return torch.relu(torch.baddbmm(self.b.unsqueeze(1), self.hidden(x), self.W))


def sample_features(
    batch: int,
    probabilities: torch.Tensor | list[float],
    n: int,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[instances, batch, n]: each x_i is U[0, 1] with probability p (its instance's), else 0.

    One uniform draw u serves both: u < p happens with probability p, and 1 - u / p is then U(0, 1],
    so x = max(1 - u / p, 0) (no boolean masks: they cost more than the draw on a CPU).
    """
    p = torch.as_tensor(probabilities, dtype=torch.float32).reshape(-1, 1, 1)
    u = torch.rand(p.shape[0], batch, n, generator=generator, out=out)
    return u.mul_(-1.0 / p).add_(1.0).clamp_min_(0.0)


def reconstruction_loss(model: ToyModel, x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-instance loss [instances]: importance-weighted squared error, summed over features."""
    err = (model(x) - x).square() * importance.unsqueeze(1)
    return err.sum(-1).mean(-1)
