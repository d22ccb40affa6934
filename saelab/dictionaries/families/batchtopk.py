"""BatchTopK (Bussmann et al. 2024): the k*B largest activations across the batch fire.

At inference a learned threshold replaces the batch-wide selection, so a saved BatchTopK SAE is a
JumpReLU with one shared threshold (which is how SAELens stores it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.families.topk import TopKSAE
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
        """The batch's k*B largest positive pre-activations, exactly, as per-row (values, indices).

        Candidates are each row's top 4k. Their (k*B)-th largest value is a lower bound of the true
        cutoff, so only rows whose candidates all clear it can hold more: those rows alone are
        widened to every value above that bound (other rows are padded with zero-valued entries).
        """
        batch, d_sae = pre.shape
        budget = self.cfg.k * batch
        values, indices = pre.topk(min(d_sae, 4 * self.cfg.k), dim=-1, sorted=False)
        values = F.relu(values)
        cutoff = self._cutoff(values, budget)
        saturated = ((values >= cutoff) & (values > 0)).all(-1)
        if values.shape[1] < d_sae and bool(saturated.any()):
            rows = saturated.nonzero().squeeze(1)
            need = int((pre[rows] >= cutoff).sum(-1).max())
            width = max(values.shape[1], need)
            wide_values, wide_indices = pre[rows].topk(width, dim=-1, sorted=False)
            pad = width - values.shape[1]
            values = F.pad(values, (0, pad))
            indices = torch.cat([indices, indices[:, :1].expand(-1, pad)], dim=1)
            values[rows], indices[rows] = F.relu(wide_values), wide_indices
            cutoff = self._cutoff(values, budget)
        keep = (values >= cutoff) & (values > 0)
        if self.training and bool(keep.any()):
            # The inference threshold tracks the smallest positive kept activation (as in SAELens).
            self._update_threshold(values[keep].min())
        return values * keep, indices

    @staticmethod
    def _cutoff(values: torch.Tensor, budget: int) -> torch.Tensor:
        flat = values.reshape(-1)
        if budget >= flat.numel():
            return values.new_tensor(0.0)
        return flat.topk(budget, sorted=False).values.min()

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
