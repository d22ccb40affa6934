"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path sizes them.

Trained like ReLU + L1 (summed squared error, decoder-norm-weighted L1 on the gate path), plus an
auxiliary loss: the gate path alone reconstructs through a frozen decoder, so it learns magnitudes too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saelab.dictionaries.base import Dictionary, TrainOutput
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.losses import fvu, l1_weight, stats
from saelab.dictionaries.registry import Family, register


class GatedSAE(Dictionary):
    """Shared encoder weights; gate bias b_gate, magnitude scale exp(r_mag) and bias b_mag."""

    has_b_enc = False

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def preacts(self, x):
        return self.encoder_input(x) @ self.W_enc

    @torch.no_grad()
    def shift_encoder_bias(self, shift):
        self.b_gate.add_(shift)
        self.b_mag.add_(shift * self.r_mag.exp())

    @torch.no_grad()
    def reset_latent_biases(self, latents, alive):
        self.b_gate[latents] = 0.0
        self.r_mag[latents] = 0.0
        self.b_mag[latents] = 0.0

    def activation(self, pre):
        gate = pre + self.b_gate
        magnitude = F.relu(pre * self.r_mag.exp() + self.b_mag)
        return (gate > 0).to(pre.dtype) * magnitude

    def training_loss(self, x, y, ctx):
        xn, yn = self.normalized(x, y)
        xin = xn - self.b_dec if self.cfg.apply_b_dec_to_input else xn
        shared = xin @ self.W_enc
        gate_pre = shared + self.b_gate
        magnitude = F.relu(shared * self.r_mag.exp() + self.b_mag)
        latents = (gate_pre > 0).to(shared.dtype) * magnitude
        recon = latents @ self.W_dec + self.b_dec
        error = recon - yn
        mse = error.pow(2).sum(-1).mean()
        gate_acts = F.relu(gate_pre)
        sparsity = (gate_acts * self.decoder_norms()).sum(-1).mean()
        # The gate path alone must reconstruct through a frozen decoder, so it learns magnitudes too.
        aux_recon = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        aux = (aux_recon - yn).pow(2).sum(-1).mean()
        loss = mse + l1_weight(self.cfg, ctx) * sparsity + aux
        with torch.no_grad():
            active = latents > 0
            terms = stats(loss, mse, fvu(error, yn), active.sum(-1).float().mean(), l1=sparsity, aux=aux)
        return TrainOutput(loss, active.sum(0), terms)


FAMILY = register(
    Family(
        name="gated",
        cls=GatedSAE,
        label="Gated",
        knob="l1_coefficient",
        tag=lambda cfg: f"l1_{cfg.l1_coefficient:g}",
        saelens="gated",
        colour="tab:orange",
        order=20,
    )
)
