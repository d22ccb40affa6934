"""Cross-layer transcoders (CLT; Ameisen et al. 2025, "Circuit Tracing"): a feature reads the MLP input of
its own layer and writes to the MLP outputs of that layer and of every later one.

One dictionary covers the layers `cfg.layers` (L of them, F = d_sae / L features each). Parameters:
`W_enc` [L, d_in, F] and `b_enc` [L, F] (each layer's encoder, saelab's [d_in, d_sae] layout), `W_dec[l]`
[F, L - l, d_out] (layer l's features' decoders to layers l..L-1, circuit-tracer's layout), `b_dec`
[L, d_out] and a JumpReLU threshold [L, F]. Inputs and targets are [batch, L, d]; latents are
numbered layer-major (latent l * F + f), so dead-latent counters, densities and saving work as for any
dictionary. Each layer keeps its own input and output scale while training (MLP outputs grow with
depth), folded into the weights at save.

Two families train it:
* `clt`: the paper's penalty, λ Σ tanh(c · a · ‖d‖) over each feature's activation a times the joint
  norm ‖d‖ of its decoders, with λ ramped up over training, plus the pre-activation penalty
  λ_p Σ ReLU(θ − h) ‖d‖ that keeps features from dying; JumpReLU thresholds learn by a straight-through
  estimator (as in the `jumprelu` family).
* `clt_batchtopk`: at each layer the batch's k·B largest activations fire (k per token on average),
  with AuxK on dead features; the running thresholds make it a JumpReLU at inference and at save.

Training never builds the dense [batch, L·F] × [L·F, L·d] decoder product: each layer's active
features are decoded as an embedding_bag over their concatenated decoders, with a sparse backward.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from saelab.dictionaries.base import Dictionary, StepContext, TrainOutput, geometric_median
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.families.jumprelu import _JumpReLU, _Step
from saelab.dictionaries.kernels import (
    batch_topk,
    encoder_values,
    selected_preacts_flat,
    sparse_decode,
    sparse_decode_flat,
)
from saelab.dictionaries.losses import fvu, l1_weight, stats
from saelab.dictionaries.registry import Family, register
from saelab.errors import DimensionMismatchError, SaelabError

AUX_ROWS = 256  # AuxK rows per step: a dead layer-0 feature decodes to every layer, so rows cost L·d each


def _nonzero_entries(acts: torch.Tensor):
    """(rows, cols, values) of the nonzero entries of dense latents [n, F], rows sorted."""
    rows, cols = acts.nonzero(as_tuple=True)
    return rows, cols, acts[rows, cols]


class _ShiftedSum(torch.autograd.Function):
    """Sum of per-layer writes: the i-th input [batch, (L - i) * d] lands on layers i..L-1 of [batch, L, d].

    By hand because sliced in-place adds make autograd zero-fill and copy a [batch, L, d] tensor per
    layer in the backward pass; here each input's gradient is just its slice of the output's.
    """

    @staticmethod
    def forward(ctx, d, *written):
        batch, n_layers = written[0].shape[0], len(written)
        out = torch.zeros(batch, n_layers, d, dtype=written[0].dtype, device=written[0].device)
        for layer, part in enumerate(written):
            out[:, layer:] += part.view(batch, n_layers - layer, d)
        return out

    @staticmethod
    def backward(ctx, grad):
        n_layers = grad.shape[1]
        return None, *(grad[:, layer:].reshape(grad.shape[0], -1) for layer in range(n_layers))


class CrossLayerTranscoder(Dictionary):
    """Features per layer that write to their own and every later layer's output; JumpReLU at inference."""

    has_b_enc = True

    def __init__(self, cfg: DictionaryConfig):
        nn.Module.__init__(self)
        cfg.apply_b_dec_to_input = False  # the inputs and outputs live in different spaces
        self.cfg = cfg
        n_layers, width, d_in, d_out = self.n_layers, self.width, cfg.d_in, cfg.out_dim
        generator = torch.Generator().manual_seed(cfg.seed)
        decoder_norm = 1.0 if self.unit_norm_decoder else 0.1
        decoders = []
        for layer in range(n_layers):
            w = torch.randn(width, n_layers - layer, d_out, generator=generator)
            w *= decoder_norm / w.flatten(1).norm(dim=1)[:, None, None]
            decoders.append(nn.Parameter(w))
        self.W_enc = nn.Parameter(torch.randn(n_layers, d_in, width, generator=generator) / math.sqrt(d_in))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, width))
        self.W_dec = nn.ParameterList(decoders)
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_out))
        self.register_buffer("input_scale", torch.ones(n_layers))
        self.register_buffer("output_scale", torch.ones(n_layers))

    # ---- shapes ------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.cfg.layers)

    @property
    def width(self) -> int:
        """Features per layer (circuit-tracer's d_transcoder)."""
        return self.cfg.d_sae // self.n_layers

    @property
    @abstractmethod
    def threshold(self) -> torch.Tensor:
        """[L, F]: the JumpReLU thresholds on raw pre-activations (each family stores them its own way)."""

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if x.ndim < 2 or x.shape[-2] != self.n_layers:
            raise DimensionMismatchError(
                f"this cross-layer transcoder reads {self.n_layers} layers at once: it expects activations "
                f"shaped [..., {self.n_layers}, {self.cfg.d_in}] (layers {self.cfg.layers[0]}..{self.cfg.layers[-1]} "
                f"of {self.cfg.hook_name!r}), but got shape {tuple(x.shape)}. Stack the layers' activations "
                "on the second-to-last dimension."
            )

    # ---- inference on raw activations --------------------------------------------------------
    def encoder_input(self, x):
        return x * self.input_scale[:, None]

    def preacts(self, x):
        """[..., L, F] pre-activations of every layer's features."""
        return torch.einsum("...ld,ldf->...lf", self.encoder_input(x), self.W_enc) + self.b_enc

    def activation(self, pre):
        return pre * (pre > self.threshold).to(pre.dtype)

    def encode(self, x):
        """Dense latents [..., d_sae] (layer-major) for raw inputs [..., L, d_in]."""
        self.check_input(x)
        acts = self.activation(self.preacts(x.to(self.W_enc.dtype)))
        return acts.flatten(-2)

    def decode(self, latents):
        """Raw outputs [..., L, d_out] from latents [..., d_sae]: each layer's features write to it and later."""
        acts = latents.unflatten(-1, (self.n_layers, self.width))
        lead = acts.shape[:-2]
        flat = acts.reshape(-1, self.n_layers, self.width)
        entries = [_nonzero_entries(flat[:, layer]) for layer in range(self.n_layers)]
        recon = self._decode_entries(entries, flat.shape[0])
        return (recon / self.output_scale[:, None]).reshape(*lead, self.n_layers, self.cfg.out_dim)

    def _sparse_writes(self, layer: int, entries, batch: int) -> torch.Tensor:
        """[batch, (L - layer) * d]: what layer `layer`'s active (rows, cols, values) entries write, by
        those entries only (a dense product would cost L/2 times an SAE's decoder per layer)."""
        return sparse_decode_flat(*entries, self.W_dec[layer].flatten(1), batch)

    def layer_preacts(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """[..., F]: the pre-activations of the `index`-th layer's features for its raw input [..., d_in]."""
        return (x.to(self.W_enc.dtype) * self.input_scale[index]) @ self.W_enc[index] + self.b_enc[index]

    def layer_latents(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """[..., F]: the latents of the `index`-th layer's features for its raw input [..., d_in]."""
        pre = self.layer_preacts(index, x)
        return pre * (pre > self.threshold[index]).to(pre.dtype)

    def layer_writes(self, index: int, latents: torch.Tensor) -> torch.Tensor:
        """[..., L - index, d_out]: what the `index`-th layer's latents add to that layer's output and each later one's (raw)."""
        lead = latents.shape[:-1]
        flat = latents.reshape(-1, self.width)
        written = self._sparse_writes(index, _nonzero_entries(flat), flat.shape[0])
        written = written.reshape(*lead, self.n_layers - index, self.cfg.out_dim)
        return written / self.output_scale[index:, None]

    def layer_output(self, index: int, writes: dict[int, torch.Tensor]) -> torch.Tensor:
        """[..., d_out]: the raw output at the `index`-th layer, from `layer_writes` of it and every earlier layer."""
        out = self.b_dec[index] / self.output_scale[index]
        for source in range(index + 1):
            out = out + writes[source][..., index - source, :]
        return out

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """[F, d_out]: how layer `source`'s features write to layer `target`'s output (raw scale)."""
        if not 0 <= source <= target < self.n_layers:
            raise ValueError(
                f"layer {source}'s features write to layers {source}..{self.n_layers - 1}, not {target}"
            )
        return self.W_dec[source][:, target - source] / self.output_scale[target]

    def residual_directions(self):
        """[d_sae, d_out]: each feature's writes summed over its layers (they all add to the residual stream)."""
        return torch.cat([decoder.sum(1) for decoder in self.W_dec])

    def decoder_norms(self):
        """[d_sae]: each feature's joint decoder norm over every layer it writes to."""
        return torch.cat([decoder.flatten(1).norm(dim=1) for decoder in self.W_dec])

    # ---- training ----------------------------------------------------------------------------
    def normalized(self, x, y):
        self.check_input(x)
        if y.shape[-2:] != (self.n_layers, self.cfg.out_dim):
            raise DimensionMismatchError(
                f"this cross-layer transcoder predicts [..., {self.n_layers}, {self.cfg.out_dim}] targets, "
                f"but got {tuple(y.shape)}. Pass the stacked outputs of {self.cfg.output_hook_name!r}."
            )
        return x * self.input_scale[:, None], y * self.output_scale[:, None]

    @torch.no_grad()
    def init_from_data(self, x, y):
        """Per-layer scales to norm sqrt(d), and b_dec at each layer's (geometric) median target."""
        if not torch.isfinite(x).all() or not torch.isfinite(y).all():
            super().init_from_data(x, y)  # raises the clear error
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.input_scale.copy_(math.sqrt(self.cfg.d_in) / x.norm(dim=-1).mean(0).clamp_min(1e-8))
            self.output_scale.copy_(math.sqrt(self.cfg.out_dim) / y.norm(dim=-1).mean(0).clamp_min(1e-8))
        target = y * self.output_scale[:, None]
        for layer in range(self.n_layers):
            if self.cfg.b_dec_init == "geometric_median":
                self.b_dec[layer] = geometric_median(target[:4096, layer])
            elif self.cfg.b_dec_init == "mean":
                self.b_dec[layer] = target[:, layer].mean(0)

    def _decode_entries(self, entries, batch: int) -> torch.Tensor:
        """Normalised reconstruction [batch, L, d] from each layer's (rows, cols, values) active entries."""
        written = [
            self._sparse_writes(layer, layer_entries, batch) for layer, layer_entries in enumerate(entries)
        ]
        return _ShiftedSum.apply(self.cfg.out_dim, *written) + self.b_dec

    def _fired(self, entries) -> torch.Tensor:
        latents = torch.cat([layer * self.width + cols for layer, (_, cols, _) in enumerate(entries)])
        return torch.bincount(latents, minlength=self.cfg.d_sae)

    def remove_parallel_decoder_grad(self):
        if not self.unit_norm_decoder:
            return
        with torch.no_grad():
            for decoder in self.W_dec:
                if decoder.grad is None:
                    continue
                rows, grad = decoder.flatten(1), decoder.grad.flatten(1)
                unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8)
                grad.sub_((grad * unit).sum(dim=1, keepdim=True) * unit)

    @torch.no_grad()
    def after_optimizer_step(self):
        if self.unit_norm_decoder:
            for decoder in self.W_dec:
                decoder.div_(decoder.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None])

    def resample(self, latents, x, y, generator=None):
        raise SaelabError(
            "resampling dead latents is not available for cross-layer transcoders; train without "
            "--resample-every (clt_batchtopk revives dead features with AuxK, clt with its pre-activation loss)."
        )

    def latent_parameters(self):
        return {}

    # ---- saving ------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_scales(self):
        """Fold each layer's input and output scale into the weights; latent values are unchanged."""
        self.W_enc.mul_(self.input_scale[:, None, None])
        for layer, decoder in enumerate(self.W_dec):
            decoder.div_(self.output_scale[layer:][None, :, None])
        self.b_dec.div_(self.output_scale[:, None])
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    def saelens_tensors(self):
        tensors = {
            "W_enc": self.W_enc.detach(),
            "b_enc": self.b_enc.detach(),
            "b_dec": self.b_dec.detach(),
            "threshold": self.threshold.detach(),
        }
        tensors.update({f"W_dec_{layer}": decoder.detach() for layer, decoder in enumerate(self.W_dec)})
        return tensors

    def load_saelens_tensors(self, tensors):
        own = self.saelens_tensors()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"missing tensors {missing}")
        for name, value in own.items():
            if tuple(tensors[name].shape) != tuple(value.shape):
                raise ValueError(
                    f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(value.shape)}"
                )
        with torch.no_grad():
            self.W_enc.copy_(tensors["W_enc"])
            self.b_enc.copy_(tensors["b_enc"])
            self.b_dec.copy_(tensors["b_dec"])
            for layer, decoder in enumerate(self.W_dec):
                decoder.copy_(tensors[f"W_dec_{layer}"])
            self.set_threshold(tensors["threshold"].to(self.b_enc.dtype))

    @abstractmethod
    def set_threshold(self, threshold: torch.Tensor) -> None:
        """Load [L, F] thresholds (from a saved file)."""


class TanhCLT(CrossLayerTranscoder):
    """The circuit-tracing paper's CLT: JumpReLU, tanh sparsity penalty and pre-activation penalty."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        initial = math.log(cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((self.n_layers, self.width), initial))

    @property
    def threshold(self):
        return self.log_threshold.exp()

    @torch.no_grad()
    def set_threshold(self, threshold):
        self.log_threshold.copy_(threshold.clamp_min(1e-12).log())

    @torch.no_grad()
    def init_from_data(self, x, y):
        """Also start each feature's threshold where it fires on a target_l0 / F share of the sample."""
        super().init_from_data(x, y)
        pre = self.preacts(x[:2048].to(self.W_enc.dtype))  # [n, L, F]
        n = pre.shape[0]
        fires = min(n - 1, max(1, round(n * self.cfg.target_l0 / self.width)))
        self.log_threshold.copy_(pre.kthvalue(n - fires, dim=0).values.clamp_min(1e-3).log())

    def training_loss(self, x, y, ctx: StepContext):
        xn, yn = self.normalized(x, y)
        batch = xn.shape[0]
        bandwidth = self.cfg.jumprelu_bandwidth
        pre = torch.einsum("bld,ldf->blf", xn, self.W_enc) + self.b_enc
        acts = _JumpReLU.apply(pre, self.log_threshold, bandwidth)
        entries = []
        for layer in range(self.n_layers):
            rows, cols = acts[:, layer].detach().nonzero(as_tuple=True)
            entries.append((rows, cols, acts[:, layer][rows, cols]))
        recon = self._decode_entries(entries, batch)
        error = recon - yn
        unexplained = fvu(error, yn)
        norms = self.decoder_norms().view(self.n_layers, self.width)
        c = self.cfg.options["tanh_scale"]
        sparsity = torch.tanh(c * acts * norms).sum((1, 2)).mean()
        preact = (F.relu(self.threshold - pre) * norms).sum((1, 2)).mean()
        loss = (
            unexplained
            + l1_weight(self.cfg, ctx) * sparsity
            + self.cfg.options["preact_coefficient"] * preact
        )
        with torch.no_grad():
            l0 = _Step.apply(pre, self.log_threshold, bandwidth).sum((1, 2)).mean()
            mse = error.pow(2).sum((1, 2)).mean()
            terms = stats(loss, mse, unexplained, l0, sparsity=sparsity, preact=preact)
            terms["l0_per_layer"] = float(l0) / self.n_layers
        return TrainOutput(loss, self._fired(entries), terms)


class BatchTopKCLT(CrossLayerTranscoder):
    """A CLT whose layers each keep the batch's k·B largest activations, with AuxK; JumpReLU at save."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__(cfg)
        self.register_buffer("layer_threshold", torch.zeros(self.n_layers, self.width))

    @property
    def threshold(self):
        return self.layer_threshold

    @torch.no_grad()
    def set_threshold(self, threshold):
        self.layer_threshold.copy_(threshold)

    @torch.no_grad()
    def _update_threshold(self, layer: int, smallest: torch.Tensor) -> None:
        """Each layer's inference threshold tracks the smallest kept activation (as BatchTopK SAEs do)."""
        current = self.layer_threshold[layer]
        if float(current[0]) == 0.0:
            current.fill_(float(smallest.clamp_min(0)))
        else:
            m = self.cfg.threshold_momentum
            current.mul_(m).add_((1 - m) * smallest.clamp_min(0))

    def training_loss(self, x, y, ctx: StepContext):
        xn, yn = self.normalized(x, y)
        batch = xn.shape[0]
        entries, preacts = [], []
        by_layer = xn.transpose(0, 1).contiguous()  # [L, batch, d]: each layer's inputs contiguous
        for layer in range(self.n_layers):
            with torch.no_grad():
                pre = torch.addmm(self.b_enc[layer], by_layer[layer], self.W_enc[layer])
                values, indices, smallest = batch_topk(pre, self.cfg.k)
                if self.training and smallest is not None:
                    self._update_threshold(layer, smallest)
                keep = values > 0
                rows = keep.nonzero(as_tuple=True)[0]
                cols, values = indices[keep], values[keep].to(xn.dtype)
            values = selected_preacts_flat(
                by_layer[layer], self.W_enc[layer], self.b_enc[layer], rows, cols, values
            )
            entries.append((rows, cols, values))
            preacts.append(pre)
        recon = self._decode_entries(entries, batch)
        error = recon - yn
        unexplained = fvu(error, yn)
        loss = unexplained
        aux = torch.zeros(())
        if ctx.dead_mask is not None and bool(ctx.dead_mask.any()):
            aux = self._auxk(ctx, preacts, by_layer, (yn - recon).detach())
            loss = loss + self.cfg.aux_coefficient * aux
        with torch.no_grad():
            l0 = sum(rows.numel() for rows, _, _ in entries) / batch
            mse = error.pow(2).sum((1, 2)).mean()
            terms = stats(loss, mse, unexplained, l0, aux=aux, threshold=self.layer_threshold[:, 0].mean())
            terms["l0_per_layer"] = l0 / self.n_layers
        return TrainOutput(loss, self._fired(entries), terms)

    def _auxk(self, ctx: StepContext, preacts, by_layer, residual) -> torch.Tensor:
        """AuxK at one layer per step, in turn: its top dead features reconstruct what the CLT misses there
        and at every later layer (a layer-0 feature decodes to all L layers, so all at once would cost L²)."""
        layer = ctx.step % self.n_layers
        dead_mask = ctx.dead_mask.view(self.n_layers, self.width)[layer].to(torch.bool)
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel() == 0:
            return torch.zeros((), device=by_layer.device)
        rows = min(by_layer.shape[1], self.cfg.aux_max_rows, AUX_ROWS)
        scale = min(dead.numel() / self.cfg.resolved_aux_k, 1.0)
        k_aux = min(self.cfg.resolved_aux_k, dead.numel())
        with torch.no_grad():
            values, local = preacts[layer][:rows].index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
        x_layer = by_layer[layer, :rows]
        values = F.relu(
            encoder_values(x_layer, None, self.W_enc[layer], self.b_enc[layer], dead[local], values)
        )
        estimate = sparse_decode(dead[local], values, self.W_dec[layer].flatten(1))
        target = residual[:rows, layer:].flatten(1)
        return scale * fvu(estimate - target, target)


def _tag_k(cfg: DictionaryConfig) -> str:
    return f"k{cfg.k}-L{len(cfg.layers or [])}"


FAMILY = register(
    Family(
        name="clt",
        cls=TanhCLT,
        label="CLT (tanh)",
        knob="l1_coefficient",
        tag=lambda cfg: f"l1_{cfg.l1_coefficient:g}-L{len(cfg.layers or [])}",
        saelens="clt",
        loads_saelens=False,  # saelab's own cfg.json names the family; SAELens has no CLT
        unit_norm_decoder=False,
        options={"tanh_scale": 1.0, "preact_coefficient": 3e-6},
        colour="tab:brown",
        order=60,
        cross_layer=True,
    )
)
BATCHTOPK_FAMILY = register(
    Family(
        name="clt_batchtopk",
        cls=BatchTopKCLT,
        label="CLT (BatchTopK)",
        knob="k",
        tag=_tag_k,
        saelens="clt",
        loads_saelens=False,  # saelab's own cfg.json names the family; SAELens has no CLT
        colour="tab:olive",
        order=70,
        cross_layer=True,
    )
)
