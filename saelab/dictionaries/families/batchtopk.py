"""BatchTopK (Bussmann et al. 2024): the k*B largest activations across the batch fire.

At inference a learned threshold replaces the batch-wide selection, so a saved BatchTopK SAE is a
JumpReLU with one shared threshold (which is how SAELens stores it).
"""

from __future__ import annotations

import torch

from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.families.topk import TopKSAE
from saelab.dictionaries.kernels import batch_topk
from saelab.dictionaries.registry import Family, register


class BatchTopKSAE(TopKSAE):
    """BatchTopK: the k*B largest activations across the batch; a learned threshold at inference."""

    bf16_selection = False

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def activation(self, pre):
        return pre * (pre > self.threshold).to(pre.dtype)

    def select(self, pre):
        """The batch's k*B largest positive pre-activations, exactly (see `batch_topk`)."""
        values, indices, smallest = batch_topk(pre, self.cfg.k)
        if self.training and smallest is not None:
            # The inference threshold tracks the smallest positive kept activation (as in SAELens).
            self._update_threshold(smallest)
        return values, indices

    @torch.no_grad()
    def _update_threshold(self, cutoff: torch.Tensor) -> None:
        cutoff = cutoff.clamp_min(0)
        if float(self.threshold[0]) == 0.0:
            self.threshold.fill_(float(cutoff))
        else:
            m = self.cfg.threshold_momentum
            self.threshold.mul_(m).add_((1 - m) * cutoff)

    def training_loss(self, x, y, ctx):
        out = super().training_loss(x, y, ctx)
        out.terms["threshold"] = float(self.threshold[0])
        return out


FAMILY = register(
    Family(
        name="batchtopk",
        cls=BatchTopKSAE,
        label="BatchTopK",
        knob="k",
        tag=lambda cfg: f"k{cfg.k}",
        saelens="jumprelu",
        saelens_transcoder="jumprelu_transcoder",
        loads_saelens=False,  # a SAELens JumpReLU folder loads as a JumpReLU
        colour="tab:red",
        order=40,
    )
)
