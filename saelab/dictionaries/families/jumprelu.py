"""JumpReLU (Rajamanoharan et al. 2024): z * H(z - theta) with a learned threshold per latent.

Trained towards a target L0 with lambda (L0 / target - 1)^2; the thresholds get their gradient from
a rectangle-kernel straight-through estimator of width jumprelu_bandwidth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from saelab.dictionaries.base import Dictionary, TrainOutput
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.losses import fvu, stats
from saelab.dictionaries.registry import Family, register


class _JumpReLU(torch.autograd.Function):
    """z * H(z - theta); theta's gradient by a rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(pre.dtype)
        window = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        grad_theta = (-(threshold / bw) * window * grad).sum(0)
        return grad_pre, grad_theta * threshold, None


class _Step(torch.autograd.Function):
    """H(z - theta) with the same straight-through gradient for theta (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, log_threshold, bandwidth):
        threshold = log_threshold.exp()
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        window = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        grad_theta = (-(1.0 / bw) * window * grad).sum(0)
        return None, grad_theta * threshold, None


class JumpReLUSAE(Dictionary):
    """JumpReLU trained towards a target L0: lambda (L0/target - 1)^2."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_from_data(self, x, y):
        """Also start each latent's threshold where it fires on a target_l0 / d_sae share of the sample.

        A fixed initial threshold is on the wrong scale for most inputs (the log-threshold moves by
        about lr per Adam step), so training would spend most of its steps just finding the scale.
        """
        super().init_from_data(x, y)
        pre = self.preacts(x[:2048].to(self.W_enc.dtype))
        n = pre.shape[0]
        fires = min(n - 1, max(1, round(n * self.cfg.target_l0 / self.cfg.d_sae)))
        threshold = pre.kthvalue(n - fires, dim=0).values
        self.log_threshold.copy_(threshold.clamp_min(1e-3).log())

    def activation(self, pre):
        return pre * (pre > self.threshold).to(pre.dtype)

    @torch.no_grad()
    def reset_latent_biases(self, latents, alive):
        """A resampled latent starts with the living latents' median threshold and no encoder bias."""
        super().reset_latent_biases(latents, alive)
        self.log_threshold[latents] = self.log_threshold[alive].median()

    def training_loss(self, x, y, ctx):
        xn, yn = self.normalized(x, y)
        xin = xn - self.b_dec if self.cfg.apply_b_dec_to_input else xn
        pre = xin @ self.W_enc + self.b_enc
        bw = self.cfg.jumprelu_bandwidth
        latents = _JumpReLU.apply(pre, self.log_threshold, bw)
        recon = latents @ self.W_dec + self.b_dec
        error = recon - yn
        unexplained = fvu(error, yn)
        l0 = _Step.apply(pre, self.log_threshold, bw).sum(-1).mean()
        sparsity = (l0 / self.cfg.target_l0 - 1).pow(2)
        loss = unexplained + self.cfg.l0_coefficient * sparsity
        with torch.no_grad():
            active = latents > 0
            mse = error.pow(2).sum(-1).mean()
            terms = stats(loss, mse, unexplained, l0, sparsity=sparsity)
        return TrainOutput(loss, active.sum(0), terms)

    def saelens_tensors(self):
        tensors = {k: v for k, v in super().saelens_tensors().items() if k != "log_threshold"}
        tensors["threshold"] = self.threshold.detach()
        return tensors

    def load_saelens_tensors(self, tensors):
        tensors = dict(tensors)
        threshold = tensors.pop("threshold")
        with torch.no_grad():
            self.log_threshold.copy_(threshold.clamp_min(1e-12).log())
        own = {
            k: v
            for k, v in self.state_dict().items()
            if k not in ("input_scale", "output_scale", "log_threshold")
        }
        with torch.no_grad():
            for name, value in own.items():
                value.copy_(tensors[name].to(value.dtype))


FAMILY = register(
    Family(
        name="jumprelu",
        cls=JumpReLUSAE,
        label="JumpReLU",
        knob="target_l0",
        tag=lambda cfg: f"l0_{cfg.target_l0:g}",
        saelens="jumprelu",
        saelens_transcoder="jumprelu_transcoder",
        colour="tab:purple",
        order=50,
    )
)
