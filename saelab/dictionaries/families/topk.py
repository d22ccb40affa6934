"""TopK (Gao et al. 2024): the k largest pre-activations of each token fire, with AuxK on dead latents.

The reconstruction loss is the fraction of variance unexplained (scale-free, as in sparsify). Only the
encoder forward pass is dense: the decoder and the backward pass touch the k chosen latents only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.dictionaries.base import Dictionary, TrainOutput
from saelab.dictionaries.kernels import encoder_values, sparse_decode, topk_select
from saelab.dictionaries.losses import fvu, stats
from saelab.dictionaries.registry import Family, register


class TopKSAE(Dictionary):
    """TopK with AuxK on dead latents; sparse decoder and sparse backward pass."""

    bf16_selection = True  # BatchTopK's exact k*B budget needs float32 (bf16 makes ties)

    def activation(self, pre):
        values, indices = topk_select(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, indices, F.relu(values))

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which latents fire on each row, and their (still differentiable-to-be) pre-activations."""
        return topk_select(pre, self.cfg.k)

    def training_loss(self, x, y, ctx):
        xn, yn = self.normalized(x, y)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        with torch.no_grad():
            xin = xn - self.b_dec if b_dec is not None else xn
            if self.cfg.encoder_dtype == "bfloat16" and self.bf16_selection and xin.dtype == torch.float32:
                # The one dense matmul of the step, on AMX / tensor cores; gradients stay exact.
                pre = torch.addmm(self.b_enc.bfloat16(), xin.bfloat16(), self.W_enc.bfloat16())
            else:
                pre = torch.addmm(self.b_enc, xin, self.W_enc)
            values, indices = self.select(pre)
            values = values.to(xn.dtype)
        values = F.relu(encoder_values(xn, b_dec, self.W_enc, self.b_enc, indices, values))
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        error = recon - yn
        unexplained = fvu(error, yn)
        loss = unexplained
        aux = torch.zeros(())
        if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
            aux = self.auxk_loss(pre, xn, b_dec, (yn - recon).detach(), ctx.dead_mask)
            loss = loss + self.cfg.aux_coefficient * aux
        with torch.no_grad():
            active = values > 0
            fired = torch.bincount(indices[active], minlength=self.cfg.d_sae)
            mse = error.pow(2).sum(-1).mean()
            terms = stats(loss, mse, unexplained, active.sum(-1).float().mean(), aux=aux)
        return TrainOutput(loss, fired, terms)

    def auxk_loss(self, pre, xn, b_dec, residual, dead_mask) -> torch.Tensor:
        """The k_aux largest dead latents reconstruct the residual (no b_dec in the target)."""
        # Rows arrive shuffled, so the first aux_max_rows are a random subset: AuxK is a revival
        # signal, and a capped row count keeps it cheap at large batch sizes.
        rows = min(pre.shape[0], self.cfg.aux_max_rows)
        pre, xn, residual = pre[:rows], xn[:rows], residual[:rows]
        dead = dead_mask.to(pre.device, torch.bool).nonzero().squeeze(1)
        n_dead = dead.numel()
        # Scale down when fewer latents are dead than k_aux (computed before k_aux is clamped).
        scale = min(n_dead / self.cfg.resolved_aux_k, 1.0)
        k_aux = min(self.cfg.resolved_aux_k, n_dead)
        with torch.no_grad():
            values, local = pre.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
            values = values.to(xn.dtype)
        values = F.relu(encoder_values(xn, b_dec, self.W_enc, self.b_enc, dead[local], values))
        if 8 * k_aux < n_dead:  # few of the dead latents per row: gather rows sparsely
            estimate = sparse_decode(dead[local], values, self.W_dec)
        else:  # a large share of them: one dense product over the dead rows is cheaper
            dense = torch.zeros(pre.shape[0], n_dead, dtype=values.dtype, device=values.device)
            estimate = dense.scatter(1, local, values) @ self.W_dec.index_select(0, dead)
        return scale * fvu(estimate - residual, residual)


FAMILY = register(
    Family(
        name="topk",
        cls=TopKSAE,
        label="TopK",
        knob="k",
        tag=lambda cfg: f"k{cfg.k}",
        saelens="topk",
        saelens_extra=lambda cfg: {"k": cfg.k, "rescale_acts_by_decoder_norm": False},
        saelens_required=("k",),
        colour="tab:green",
        order=30,
    )
)
