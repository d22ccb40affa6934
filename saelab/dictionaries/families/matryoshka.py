"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): nested prefixes that must each reconstruct.

One BatchTopK selection over all latents (the batch's k*B largest activations). The latents are cut
into nested prefixes of widths m_1 < m_2 < ... < m_n = d_sae, and each prefix alone decodes the input:
    x̂_j = b_dec + sum_{i < m_j} f_i W_dec,i,     loss = sum_j w_j FVU(x̂_j, x) + aux_coefficient AuxK,
with w_j = 1/n unless group weights are given. The first latents must reconstruct on their own, so
they learn the general (parent) features, which a plain SAE folds into its specific latents
(absorption). AuxK revives dead latents against the full reconstruction's residual, as in BatchTopK.
At inference the EMA threshold of BatchTopK replaces the batch selection, so a saved Matryoshka SAE is
a JumpReLU; SAELens saves its MatryoshkaBatchTopKTrainingSAE the same way, naming the training family
and its `matryoshka_widths` in the metadata.

Options: `matryoshka_widths` (the prefix widths, last = d_sae) or `group_fractions` (each group's share
of d_sae, summing to 1, as dictionary_learning's trainer takes them), and `group_weights` (one loss
weight per prefix). A config records the resolved widths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from saelab.dictionaries.base import TrainOutput
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.families.batchtopk import BatchTopKSAE
from saelab.dictionaries.kernels import encoder_values, sparse_decode
from saelab.dictionaries.losses import fvu, stats
from saelab.dictionaries.registry import Family, register
from saelab.errors import DictionaryConfigError

NAME = "matryoshka_batchtopk"
# Prefixes at d_sae/16, d_sae/4 and d_sae when neither widths nor fractions are given.
DEFAULT_PREFIXES = (1 / 16, 1 / 4)
# Decode densely when d_sae <= this x (kept latents per row) x (prefixes): the sparse path's fixed
# costs per group then outweigh a dense [batch, d_sae] @ [d_sae, d] product.
DENSE_DECODE_FACTOR = 8


def widths_from_fractions(fractions, d_sae: int) -> list[int]:
    """Prefix widths from per-group fractions of d_sae (rounded; the last prefix is all of d_sae)."""
    if (
        not fractions
        or any(not f > 0 for f in fractions)
        or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
    ):
        raise DictionaryConfigError(
            f"matryoshka group fractions {list(fractions)} must be positive and sum to 1 (each group's share "
            "of the latents, e.g. 0.0625,0.1875,0.75)."
        )
    total, widths = 0.0, []
    for fraction in fractions[:-1]:
        total += fraction
        widths.append(round(total * d_sae))
    widths.append(d_sae)
    if any(b <= a for a, b in zip([0, *widths], widths, strict=False)):
        raise DictionaryConfigError(
            f"matryoshka group fractions {list(fractions)} give prefix widths {widths} for d_sae={d_sae}: some "
            "group is empty. Use larger fractions or a wider dictionary."
        )
    return widths


def check_widths(widths, d_sae: int) -> list[int]:
    """Validated prefix widths: positive integers, strictly increasing, the last equal to d_sae."""
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w != int(w) for w in widths):
        raise DictionaryConfigError(f"matryoshka_widths {list(widths)} must be whole numbers of latents.")
    widths = [int(w) for w in widths]
    if not widths:
        raise DictionaryConfigError("matryoshka_widths must not be empty; the last width is d_sae.")
    if widths[0] <= 0 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise DictionaryConfigError(
            f"matryoshka_widths {widths} must be positive and strictly increasing (nested prefixes), "
            f"e.g. {[max(1, d_sae // 16), max(1, d_sae // 4), d_sae]}."
        )
    if widths[-1] != d_sae:
        raise DictionaryConfigError(
            f"matryoshka_widths {widths} must end at the dictionary's width d_sae={d_sae} (the last prefix is "
            "the whole dictionary). When sweeping several widths, give group fractions instead "
            "(--matryoshka-fractions)."
        )
    return widths


def prepare(cfg: DictionaryConfig) -> None:
    """Resolve the prefix widths (from widths, fractions or the default) and check the weights."""
    opts = cfg.options
    widths, fractions = list(opts["matryoshka_widths"] or []), list(opts["group_fractions"] or [])
    if widths and fractions:
        raise DictionaryConfigError(
            "give either matryoshka_widths (prefix widths) or group_fractions (group shares), not both."
        )
    if not widths:
        if fractions:
            widths = widths_from_fractions(fractions, cfg.d_sae)
        else:  # the default; tiny dictionaries keep the distinct prefixes
            widths = sorted({max(1, round(f * cfg.d_sae)) for f in DEFAULT_PREFIXES} - {cfg.d_sae})
            widths.append(cfg.d_sae)
    opts["matryoshka_widths"], opts["group_fractions"] = check_widths(widths, cfg.d_sae), []
    weights = list(opts["group_weights"] or [])
    if weights and (
        len(weights) != len(widths) or any(not float(w) >= 0 for w in weights) or sum(weights) <= 0
    ):
        raise DictionaryConfigError(
            f"group_weights {weights} must give one non-negative loss weight per prefix ({len(widths)} "
            f"prefixes: {widths}), not all zero."
        )
    opts["group_weights"] = [float(w) for w in weights]


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose nested latent prefixes each reconstruct the input; a JumpReLU at inference."""

    @property
    def widths(self) -> list[int]:
        return list(self.cfg.options["matryoshka_widths"])

    @property
    def weights(self) -> list[float]:
        """Each prefix's loss weight (the mean over prefixes unless group_weights are given)."""
        given = self.cfg.options["group_weights"]
        return list(given) if given else [1.0 / len(self.widths)] * len(self.widths)

    def decode_prefixes(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Each prefix's reconstruction of raw activations from dense latents [..., d_sae]."""
        out, partial, start = [], self.b_dec, 0
        for width in self.widths:
            partial = partial + latents[..., start:width] @ self.W_dec[start:width]
            out.append(partial / self.output_scale)
            start = width
        return out

    def training_loss(self, x, y, ctx):
        xn, yn = self.normalized(x, y)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        with torch.no_grad():
            xin = xn - self.b_dec if b_dec is not None else xn
            pre = torch.addmm(self.b_enc, xin, self.W_enc)
            values, indices = self.select(pre)  # the batch's k*B largest; zeros where not kept
            values = values.to(xn.dtype)
        values = F.relu(encoder_values(xn, b_dec, self.W_enc, self.b_enc, indices, values))
        # Group g's contribution decodes the kept latents of [m_{g-1}, m_g); prefix j sums groups <= j.
        # Small dictionaries decode densely: one sparse pass per group costs more there than a matmul.
        dense = None
        if self.cfg.d_sae <= DENSE_DECODE_FACTOR * indices.shape[1] * len(self.widths):
            dense = torch.zeros(values.shape[0], self.cfg.d_sae, dtype=values.dtype, device=values.device)
            dense = dense.scatter_add(1, indices, values)
        recon, start = self.b_dec.expand_as(yn), 0
        loss, prefix_fvu = yn.new_zeros(()), []
        for width, weight in zip(self.widths, self.weights, strict=True):
            if dense is not None:
                recon = recon + dense[:, start:width] @ self.W_dec[start:width]
            else:
                group = ((indices >= start) & (indices < width)).to(values.dtype)
                recon = recon + sparse_decode(indices, values * group, self.W_dec)
            unexplained = fvu(recon - yn, yn)
            loss = loss + weight * unexplained
            prefix_fvu.append(unexplained.detach())
            start = width
        error = recon - yn
        aux = torch.zeros(())
        if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
            aux = self.auxk_loss(pre, xn, b_dec, (yn - recon).detach(), ctx.dead_mask)
            loss = loss + self.cfg.aux_coefficient * aux
        with torch.no_grad():
            active = values > 0
            fired = torch.bincount(indices[active], minlength=self.cfg.d_sae)
            mse = error.pow(2).sum(-1).mean()
            extra = {f"fvu_prefix{j}": v for j, v in enumerate(prefix_fvu[:-1])}
            terms = stats(loss, mse, prefix_fvu[-1], active.sum(-1).float().mean(), aux=aux, **extra)
            terms["threshold"] = float(self.threshold[0])
        return TrainOutput(loss, fired, terms)


def _saelens_metadata(cfg: DictionaryConfig) -> dict:
    """What SAELens writes for a MatryoshkaBatchTopKTrainingSAE saved for inference (as a JumpReLU)."""
    return {
        "metadata": {
            "training_architecture": NAME,
            "training_architecture_details": {
                "k": cfg.k,
                "matryoshka_widths": list(cfg.options["matryoshka_widths"]),
                "use_matryoshka_aux_loss": False,
                "aux_loss_coefficient": cfg.aux_coefficient,
                "topk_threshold_lr": 1 - cfg.threshold_momentum,
            },
        }
    }


FAMILY = register(
    Family(
        name=NAME,
        cls=MatryoshkaBatchTopKSAE,
        label="Matryoshka BatchTopK",
        knob="k",
        tag=lambda cfg: f"k{cfg.k}-g{len(cfg.options['matryoshka_widths'])}",
        saelens="jumprelu",
        saelens_transcoder="jumprelu_transcoder",
        loads_saelens=False,  # a SAELens JumpReLU folder loads as a JumpReLU
        saelens_extra=_saelens_metadata,
        colour="tab:orange",
        options={"matryoshka_widths": [], "group_fractions": [], "group_weights": []},
        prepare=prepare,
        order=55,
    )
)
