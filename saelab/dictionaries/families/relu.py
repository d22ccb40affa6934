"""ReLU + L1 on f_i * ||W_dec,i|| (Anthropic's April 2024 update; SAELens 'standard').

The loss is the summed squared error plus the decoder-norm-weighted L1 penalty, on normalized inputs;
the decoder norms are learned (they start at 0.1), so the penalty cannot be dodged by shrinking f.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.dictionaries.base import Dictionary, StepContext, TrainOutput
from saelab.dictionaries.losses import fvu, l1_weight, stats
from saelab.dictionaries.registry import Family, register


class ReLUSAE(Dictionary):
    """ReLU encoder; the L1 weight ramps up over l1_warmup_fraction of training."""

    def activation(self, pre):
        return F.relu(pre)

    def l1_weight(self, ctx: StepContext) -> float:
        return l1_weight(self.cfg, ctx)

    def training_loss(self, x, y, ctx):
        xn, yn = self.normalized(x, y)
        xin = xn - self.b_dec if self.cfg.apply_b_dec_to_input else xn
        latents = F.relu(xin @ self.W_enc + self.b_enc)
        recon = latents @ self.W_dec + self.b_dec
        error = recon - yn
        mse = error.pow(2).sum(-1).mean()
        sparsity = (latents * self.decoder_norms()).sum(-1).mean()
        loss = mse + self.l1_weight(ctx) * sparsity
        with torch.no_grad():
            active = latents > 0
            terms = stats(loss, mse, fvu(error, yn), active.sum(-1).float().mean(), l1=sparsity)
        return TrainOutput(loss, active.sum(0), terms)


FAMILY = register(
    Family(
        name="relu",
        cls=ReLUSAE,
        label="ReLU + L1",
        knob="l1_coefficient",
        tag=lambda cfg: f"l1_{cfg.l1_coefficient:g}",
        saelens="standard",
        saelens_transcoder="transcoder",
        unit_norm_decoder=False,
        colour="tab:blue",
        order=10,
    )
)
