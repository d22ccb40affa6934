"""Crosscoders (Lindsey et al. 2024): one set of latents read from, and written to, several hook points.

A crosscoder reads n *members* at once: the same hook of n models (model diffing: a base model and its
fine-tune), or n layers of one model (the acausal crosscoder across layers). It uses the cross-layer
mechanism of `DictionaryConfig`: `layers` lists the members and `{i}` in `hook_name` stands for each,
so `hook_name="model{i}/blocks.13.hook_resid_post", layers=[0, 1]` reads model 0 and model 1 (a paired
activation source names its hooks that way), and `hook_name="blocks.{i}.hook_resid_post",
layers=[4, 5, 6]` reads three layers. Inputs are stacked [batch, n, d], as for a CLT; unlike a CLT,
the F = d_sae latents are shared by every member (not F / n per layer).

Parameters: `W_enc` [n, d, F] (one encoder per member, summed into one pre-activation per latent),
`b_enc` [F], `W_dec` [F, n, d] (a decoder per latent and member), `b_dec` [n, d]. Each member's
activations are normalised separately while training (scale sqrt(d) / E||x_m||, as the crosscoder
papers do); `fold_scales` folds every member's scale into its weights and records it in
`cfg.metadata["member_scales"]`, so that decoder norms and Latent Scaling (`saelab.diffing`) can still
compare the members in the normalised space where they were trained. Decoder norms are learned:
their ratio between members is what tags a latent shared or model-specific.

Two families:
* `crosscoder`: ReLU with the published loss Σ_m ||x_m - x̂_m||² + λ Σ_i f_i Σ_m ||d_i^m|| (squared
  error summed over members and dimensions, mean over tokens, on normalised activations, so λ means
  what it means for the `relu` family), λ warmed up over `l1_warmup_fraction`. Minder et al. 2025
  show this penalty makes spurious model-specific latents (complete shrinkage, latent decoupling).
* `crosscoder_batchtopk`: the batch's k·B largest f_i · Σ_m ||d_i^m|| fire (dictionary_learning's
  BatchTopKCrossCoder with its default "crosscoder" code normalisation, the model of Minder et al.),
  loss the fraction of variance unexplained over all members plus AuxK on dead latents. The running
  threshold θ on f_i · Σ_m ||d_i^m|| becomes the per-latent JumpReLU threshold θ / Σ_m ||d_i^m|| on
  f_i, which is what is saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from saelab.dictionaries.base import Dictionary, StepContext, TrainOutput, geometric_median
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.kernels import (
    batch_topk,
    selected_preacts,
    selected_preacts_flat,
    sparse_decode,
    sparse_decode_flat,
)
from saelab.dictionaries.losses import fvu, l1_weight, stats
from saelab.dictionaries.registry import Family, register
from saelab.errors import DimensionMismatchError, SaelabError

MEMBER_SCALES = "member_scales"  # cfg.metadata key: each member's folded normalisation scale
MEMBER_MODELS = "member_models"  # cfg.metadata key: where each member's activations came from
# Model-diffing tags from the relative decoder norm Δnorm (Minder et al. 2025; saelab.diffing.latents):
# here, beside the decoder norms they read, so that the feature store can tag latents too.
TAGS = ("shared", "a_only", "b_only", "other")
B_ONLY_BELOW, A_ONLY_ABOVE, SHARED_RANGE = 0.1, 0.9, (0.4, 0.6)


def relative_decoder_norm(norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """Δnorm per latent: 0 for B-only, 1 for A-only, 0.5 for equal norms (0.5 where both are zero)."""
    top = torch.maximum(norm_a, norm_b)
    ratio = torch.where(top > 0, (norm_a - norm_b) / top.clamp_min(1e-30), torch.zeros_like(top))
    return 0.5 * (ratio + 1)


def tag_latents(delta: torch.Tensor) -> list[str]:
    """shared / a_only / b_only / other from Δnorm, with the published thresholds (in Δ's own dtype)."""
    low, high = SHARED_RANGE
    tags = [TAGS[3]] * delta.numel()
    for tag, mask in (
        ("b_only", delta < B_ONLY_BELOW),
        ("a_only", delta > A_ONLY_ABOVE),
        ("shared", (delta >= low) & (delta <= high)),
    ):
        for i in mask.nonzero().flatten().tolist():
            tags[i] = tag
    return tags


class Crosscoder(Dictionary):
    """Shared latents over n members: encoders summed, one decoder per member; JumpReLU-style at inference."""

    has_b_enc = True
    latents_per_layer = False  # DictionaryConfig: d_sae latents in all, shared by the members
    init_decoder_norm = 0.1  # each member's decoder norm at init

    def __init__(self, cfg: DictionaryConfig):
        nn.Module.__init__(self)
        if cfg.output_hook_name:
            raise ValueError(
                f"a {cfg.architecture} reconstructs the hook points it reads; it has no output_hook_name "
                f"(got {cfg.output_hook_name!r}). Drop output_hook_name, or use a CLT to predict other hooks."
            )
        cfg.apply_b_dec_to_input = False  # each member has its own b_dec; the encoder reads raw inputs
        self.cfg = cfg
        n, d, width = self.n_members, cfg.d_in, cfg.d_sae
        generator = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(width, n, d, generator=generator)
        W_dec *= self.init_decoder_norm / W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # W_enc starts as W_dec transposed (Anthropic; the Kissane et al. replication).
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("input_scale", torch.ones(n))
        self.register_buffer("output_scale", torch.ones(n))

    # ---- shapes ------------------------------------------------------------------------------
    @property
    def n_members(self) -> int:
        return len(self.cfg.layers)

    @property
    def members(self) -> list[str]:
        """A name per member: the member models' provenance if recorded, else the hook points."""
        models = self.cfg.metadata.get(MEMBER_MODELS)
        if isinstance(models, list) and len(models) == self.n_members:
            return [str(model) for model in models]
        return list(self.cfg.input_hooks)

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if x.ndim < 2 or x.shape[-2] != self.n_members:
            raise DimensionMismatchError(
                f"this crosscoder reads {self.n_members} members at once ({', '.join(self.cfg.input_hooks)}): "
                f"it expects activations shaped [..., {self.n_members}, {self.cfg.d_in}], but got shape "
                f"{tuple(x.shape)}. Stack the members' activations on the second-to-last dimension."
            )

    # ---- inference on raw activations --------------------------------------------------------
    def encoder_input(self, x):
        return x * self.input_scale[:, None]

    def preacts(self, x):
        """[..., F]: every member's encoder applied to its activations, summed."""
        flat = self.encoder_input(x).flatten(-2)
        return flat @ self.W_enc.flatten(0, 1) + self.b_enc

    def encode(self, x):
        """Dense latents [..., F] for raw activations [..., n, d]."""
        self.check_input(x)
        return self.activation(self.preacts(x.to(self.W_enc.dtype)))

    def decode(self, latents):
        """Raw reconstructions [..., n, d] of every member."""
        flat = latents @ self.W_dec.flatten(1)
        return (flat.unflatten(-1, (self.n_members, self.cfg.d_in)) + self.b_dec) / self.output_scale[:, None]

    def decoder(self, member: int) -> torch.Tensor:
        """[F, d]: how each latent writes to member `member`'s activations (raw scale)."""
        if not 0 <= member < self.n_members:
            raise ValueError(
                f"this crosscoder has members 0..{self.n_members - 1} ({', '.join(self.members)}), not {member}"
            )
        return self.W_dec[:, member] / self.output_scale[member]

    @property
    def folded_scales(self) -> torch.Tensor:
        """[n]: the member scales already folded into the weights (ones before any save)."""
        scales = self.cfg.metadata.get(MEMBER_SCALES)
        if scales is None:
            return torch.ones(self.n_members, device=self.W_dec.device)
        return torch.tensor([float(s) for s in scales], device=self.W_dec.device)

    def normalized_decoders(self) -> torch.Tensor:
        """[F, n, d]: the decoders in the space of normalised activations (where members are comparable)."""
        return self.W_dec * self.folded_scales[None, :, None]

    def member_decoder_norms(self) -> torch.Tensor:
        """[F, n]: ||d_i^m|| per latent and member, in the normalised space."""
        return self.normalized_decoders().norm(dim=-1)

    def decoder_norms(self):
        """[F]: Σ_m ||d_i^m|| in the current space (what the L1 penalty and the BatchTopK selection weigh)."""
        return self.W_dec.norm(dim=-1).sum(-1)

    def residual_directions(self):
        """[F, n * d]: each latent's writes to all members, concatenated."""
        return self.W_dec.flatten(1)

    # ---- training ----------------------------------------------------------------------------
    def normalized(self, x, y):
        self.check_input(x)
        return x * self.input_scale[:, None], y * self.output_scale[:, None]

    @torch.no_grad()
    def init_from_data(self, x, y):
        """Each member's scale to norm sqrt(d) (members normalised separately), b_dec at its median."""
        if not torch.isfinite(x).all():
            super().init_from_data(x, y)  # raises the clear error
        self.check_input(x)
        if self.cfg.normalize_activations == "expected_average_only_in":
            scale = math.sqrt(self.cfg.d_in) / x.norm(dim=-1).mean(0).clamp_min(1e-8)
            self.input_scale.copy_(scale)
            self.output_scale.copy_(scale)
        target = x * self.output_scale[:, None]
        for member in range(self.n_members):
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[member] = geometric_median(target[:4096, member])
            elif self.cfg.b_dec_init == "mean":
                self.b_dec[member] = target[:, member].mean(0)

    def _entries(self, flat: torch.Tensor, pre: torch.Tensor, rows, cols):
        """Differentiable pre-activations at the chosen (row, latent) entries (sparse backward)."""
        values = pre[rows, cols].to(flat.dtype)
        return selected_preacts_flat(flat, self.W_enc.flatten(0, 1), self.b_enc, rows, cols, values)

    def _reconstruct(self, rows, cols, values, batch: int) -> torch.Tensor:
        """Normalised reconstruction [batch, n, d] from the active entries (an embedding_bag)."""
        recon = sparse_decode_flat(rows, cols, values, self.W_dec.flatten(1), batch)
        return recon.view(batch, self.n_members, self.cfg.d_in) + self.b_dec

    def resample(self, latents, x, y, generator=None):
        raise SaelabError(
            "resampling dead latents is not available for crosscoders; train without --resample-every "
            "(crosscoder_batchtopk revives dead latents with AuxK)."
        )

    def latent_parameters(self):
        return {"W_enc": 2, "W_dec": 0, "b_enc": 0}

    # ---- saving ------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_scales(self):
        """Fold each member's scale into its encoder and decoder; latent values are unchanged."""
        scale = self.input_scale
        self.W_enc.mul_(scale[:, None, None])
        self.W_dec.div_(self.output_scale[None, :, None])
        self.b_dec.div_(self.output_scale[:, None])
        self.cfg.metadata[MEMBER_SCALES] = [float(s) for s in self.folded_scales.cpu() * scale.cpu()]
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    def saelens_tensors(self):
        return {
            "W_enc": self.W_enc.detach(),
            "b_enc": self.b_enc.detach(),
            "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach(),
        }


class L1Crosscoder(Crosscoder):
    """ReLU crosscoder with the L1 penalty on f_i Σ_m ||d_i^m|| (Lindsey et al.; Kissane et al.)."""

    # Above this share of active (token, latent) entries, dense matmuls beat the sparse kernels (early
    # in training, before the warmed-up penalty has made the code sparse, half the latents fire).
    dense_above = 1 / 32

    def activation(self, pre):
        return F.relu(pre)

    def training_loss(self, x, y, ctx: StepContext):
        xn, _ = self.normalized(x, y)
        batch = xn.shape[0]
        flat = xn.flatten(1)
        pre = torch.addmm(self.b_enc, flat, self.W_enc.flatten(0, 1))
        norms = self.decoder_norms()
        with torch.no_grad():
            active = pre > 0
            n_active = int(active.sum())
        if n_active > self.dense_above * active.numel():
            acts = F.relu(pre)
            recon = (acts @ self.W_dec.flatten(1)).view_as(xn) + self.b_dec
            sparsity = (acts * norms).sum() / batch
            fired = active.sum(0)
        else:
            rows, cols = active.nonzero(as_tuple=True)
            values = self._entries(flat, pre.detach(), rows, cols)
            recon = self._reconstruct(rows, cols, values, batch)
            sparsity = (values * norms[cols]).sum() / batch
            fired = torch.bincount(cols, minlength=self.cfg.d_sae)
        error = recon - xn
        mse = error.pow(2).sum((1, 2)).mean()
        loss = mse + l1_weight(self.cfg, ctx) * sparsity
        with torch.no_grad():
            unexplained = fvu(error.flatten(1), xn.flatten(1))
            terms = stats(loss, mse, unexplained, n_active / batch, l1=sparsity)
        return TrainOutput(loss, fired, terms)


class BatchTopKCrosscoder(Crosscoder):
    """BatchTopK on f_i Σ_m ||d_i^m|| with AuxK (Minder et al. 2025); a JumpReLU at inference and at save."""

    init_decoder_norm = 1.0

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        # θ: the running threshold on f_i Σ_m ||d_i^m|| (0: not set yet), and the per-latent
        # threshold on f_i it implies (what inference uses and the file stores).
        self.register_buffer("scaled_threshold", torch.zeros(()))
        self.register_buffer("threshold", torch.zeros(cfg.d_sae))

    def activation(self, pre):
        return pre * (pre > self.threshold).to(pre.dtype)

    @torch.no_grad()
    def _refresh_threshold(self) -> None:
        """threshold_i = θ / Σ_m ||d_i^m||: f_i Σ_m ||d_i^m|| > θ exactly when f_i > threshold_i.

        The norms are those of the normalised space the selection ran in, so folding changes nothing.
        """
        if float(self.scaled_threshold) > 0:
            norms = self.member_decoder_norms().sum(-1)
            self.threshold.copy_(self.scaled_threshold / norms.clamp_min(1e-8))

    @torch.no_grad()
    def _update_threshold(self, smallest: torch.Tensor) -> None:
        smallest = smallest.clamp_min(0)
        if float(self.scaled_threshold) == 0.0:
            self.scaled_threshold.fill_(float(smallest))
        else:
            m = self.cfg.threshold_momentum
            self.scaled_threshold.mul_(m).add_((1 - m) * smallest)

    def training_loss(self, x, y, ctx: StepContext):
        xn, _ = self.normalized(x, y)
        batch = xn.shape[0]
        flat = xn.flatten(1)
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, flat, self.W_enc.flatten(0, 1))
            code_norm = self.decoder_norms()
            scaled = F.relu(pre) * code_norm
            kept, indices, smallest = batch_topk(scaled, self.cfg.k)
            if self.training and smallest is not None:
                self._update_threshold(smallest)
            keep = kept > 0
            rows = keep.nonzero(as_tuple=True)[0]
            cols = indices[keep]
        values = self._entries(flat, pre, rows, cols)
        recon = self._reconstruct(rows, cols, values, batch)
        error = recon - xn
        unexplained = fvu(error.flatten(1), xn.flatten(1))
        loss = unexplained
        aux = torch.zeros(())
        if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
            aux = self._auxk(scaled, flat, (xn - recon).detach().flatten(1), ctx.dead_mask)
            loss = loss + self.cfg.aux_coefficient * aux
        with torch.no_grad():
            mse = error.pow(2).sum((1, 2)).mean()
            terms = stats(
                loss, mse, unexplained, rows.numel() / batch, aux=aux, threshold=self.scaled_threshold
            )
        return TrainOutput(loss, torch.bincount(cols, minlength=self.cfg.d_sae), terms)

    def _auxk(self, scaled, flat, residual, dead_mask) -> torch.Tensor:
        """The k_aux largest dead latents (by f_i Σ_m ||d_i^m||) reconstruct what the crosscoder misses."""
        rows = min(flat.shape[0], self.cfg.aux_max_rows)
        flat, residual = flat[:rows], residual[:rows]
        dead = dead_mask.to(flat.device, torch.bool).nonzero().squeeze(1)
        n_dead = dead.numel()
        scale = min(n_dead / self.cfg.resolved_aux_k, 1.0)
        k_aux = min(self.cfg.resolved_aux_k, n_dead)
        W_flat, W_dec = self.W_enc.flatten(0, 1), self.W_dec.flatten(1)
        with torch.no_grad():
            _, local = scaled[:rows].index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
        if 8 * k_aux < n_dead:  # few of the dead latents per row: gather and decode sparsely
            indices = dead[local]
            with torch.no_grad():
                values = torch.einsum("bd,dbk->bk", flat, W_flat[:, indices]) + self.b_enc[indices]
            values = F.relu(selected_preacts(flat, W_flat, self.b_enc, indices, values))
            estimate = sparse_decode(indices, values, W_dec)
        else:  # most of them: one dense product over the dead latents is cheaper than sparse kernels
            pre = flat @ W_flat.index_select(1, dead) + self.b_enc[dead]
            mask = torch.zeros_like(pre).scatter_(1, local, 1.0)
            estimate = (F.relu(pre) * mask) @ W_dec.index_select(0, dead)
        return scale * fvu(estimate - residual, residual)

    @torch.no_grad()
    def after_optimizer_step(self):
        self._refresh_threshold()

    @torch.no_grad()
    def fold_scales(self):
        """Fix the per-latent thresholds first (latent values, hence thresholds on them, survive folding)."""
        self._refresh_threshold()
        super().fold_scales()

    def saelens_tensors(self):
        return {**super().saelens_tensors(), "threshold": self.threshold.detach()}


def _members(cfg: DictionaryConfig) -> str:
    return f"M{len(cfg.layers or [])}"


FAMILY = register(
    Family(
        name="crosscoder",
        cls=L1Crosscoder,
        label="Crosscoder (L1)",
        knob="l1_coefficient",
        tag=lambda cfg: f"l1_{cfg.l1_coefficient:g}-{_members(cfg)}",
        saelens="crosscoder",
        loads_saelens=False,  # saelab's own cfg.json names the family; SAELens has no crosscoder
        unit_norm_decoder=False,
        colour="tab:cyan",
        order=80,
        cross_layer=True,
    )
)
BATCHTOPK_FAMILY = register(
    Family(
        name="crosscoder_batchtopk",
        cls=BatchTopKCrosscoder,
        label="Crosscoder (BatchTopK)",
        knob="k",
        tag=lambda cfg: f"k{cfg.k}-{_members(cfg)}",
        saelens="crosscoder",
        loads_saelens=False,
        unit_norm_decoder=False,  # the members' decoder norms are what tags a latent
        colour="tab:pink",
        order=90,
        cross_layer=True,
    )
)
