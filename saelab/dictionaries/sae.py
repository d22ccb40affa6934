"""The five trainable families. Each defines its nonlinearity and its training loss; nothing else.

Losses are computed on normalized activations (see Dictionary). TopK, BatchTopK and JumpReLU use
the fraction of variance unexplained as reconstruction loss (scale-free, as in sparsify); ReLU and
Gated use the summed squared error with a decoder-norm-weighted L1 penalty (Anthropic, April 2024).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from saelab.dictionaries.base import Dictionary, StepContext, TrainOutput
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.kernels import encoder_values, sparse_decode, topk_select


def _fvu(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return error.pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp_min(1e-8)


def _stats(loss, mse_per_token, fvu, l0, **extra) -> dict[str, float]:
    out = {"loss": float(loss), "mse": float(mse_per_token), "fvu": float(fvu), "l0": float(l0)}
    out.update({name: float(value) for name, value in extra.items()})
    return out


def _l1_weight(cfg: DictionaryConfig, ctx: StepContext) -> float:
    """The L1 coefficient, ramped up linearly over the first l1_warmup_fraction of training."""
    if cfg.l1_warmup_fraction <= 0:
        return cfg.l1_coefficient
    return cfg.l1_coefficient * min(1.0, ctx.progress / cfg.l1_warmup_fraction)


class ReLUSAE(Dictionary):
    """ReLU + L1 on f_i * ||W_dec,i|| (Anthropic's April 2024 update; SAELens 'standard')."""

    architecture = "relu"

    def activation(self, pre):
        return F.relu(pre)

    def l1_weight(self, ctx: StepContext) -> float:
        return _l1_weight(self.cfg, ctx)

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
            terms = _stats(loss, mse, _fvu(error, yn), active.sum(-1).float().mean(), l1=sparsity)
        return TrainOutput(loss, active.sum(0), terms)


class GatedSAE(Dictionary):
    """Gated SAE (Rajamanoharan et al. 2024): a gate path decides, a magnitude path sizes."""

    architecture = "gated"
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
        loss = mse + _l1_weight(self.cfg, ctx) * sparsity + aux
        with torch.no_grad():
            active = latents > 0
            terms = _stats(loss, mse, _fvu(error, yn), active.sum(-1).float().mean(), l1=sparsity, aux=aux)
        return TrainOutput(loss, active.sum(0), terms)


class TopKSAE(Dictionary):
    """TopK (Gao et al. 2024) with AuxK on dead latents; sparse decoder and sparse backward pass."""

    architecture = "topk"
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
        fvu = _fvu(error, yn)
        loss = fvu
        aux = torch.zeros(())
        if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
            aux = self.auxk_loss(pre, xn, b_dec, (yn - recon).detach(), ctx.dead_mask)
            loss = loss + self.cfg.aux_coefficient * aux
        with torch.no_grad():
            active = values > 0
            fired = torch.bincount(indices[active], minlength=self.cfg.d_sae)
            mse = error.pow(2).sum(-1).mean()
            terms = _stats(loss, mse, fvu, active.sum(-1).float().mean(), aux=aux)
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
        return scale * _fvu(estimate - residual, residual)


class BatchTopKSAE(TopKSAE):
    """BatchTopK: the k*B largest activations across the batch; a learned threshold at inference."""

    architecture = "batchtopk"
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
    """JumpReLU (Rajamanoharan et al. 2024) trained towards a target L0: lambda (L0/target - 1)^2."""

    architecture = "jumprelu"

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
        fvu = _fvu(error, yn)
        l0 = _Step.apply(pre, self.log_threshold, bw).sum(-1).mean()
        sparsity = (l0 / self.cfg.target_l0 - 1).pow(2)
        loss = fvu + self.cfg.l0_coefficient * sparsity
        with torch.no_grad():
            active = latents > 0
            mse = error.pow(2).sum(-1).mean()
            terms = _stats(loss, mse, fvu, l0, sparsity=sparsity)
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


FAMILIES: dict[str, type[Dictionary]] = {
    cls.architecture: cls for cls in (ReLUSAE, GatedSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)
}


def build_dictionary(cfg: DictionaryConfig) -> Dictionary:
    """A freshly initialised dictionary of the configured family."""
    return FAMILIES[cfg.architecture](cfg)
