"""What every dictionary shares: parameters in SAELens layout, input scaling, and folding it away."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.registry import family
from saelab.errors import ActivationError, DimensionMismatchError


@dataclass
class StepContext:
    """What the trainer tells a dictionary about the step: which latents are dead, how far along."""

    dead_mask: torch.Tensor | None = None
    progress: float = 1.0
    step: int = 0


@dataclass
class TrainOutput:
    """A training step's loss plus the numbers the trainer logs (floats, already detached)."""

    loss: torch.Tensor
    fired: torch.Tensor  # [d_sae] int: on how many tokens of the batch each latent fired
    terms: dict[str, float] = field(default_factory=dict)


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` (robust b_dec init)."""
    device = points.device
    points = points.to("cpu" if device.type == "mps" else device, torch.float64)  # MPS has no float64
    median = points.mean(0)
    for _ in range(iterations):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        update = (weights[:, None] * points).sum(0) / weights.sum()
        if (update - median).norm() <= tol * max(1.0, median.norm().item()):
            median = update
            break
        median = update
    return median.to(device, torch.float32)


class Dictionary(nn.Module, ABC):
    """Base class of every family. Works on raw activations; scaling lives in two scalar buffers.

    While training, inputs are multiplied by `input_scale` (and targets by `output_scale`) so that
    hyperparameters carry across models; `fold_scales()` moves those factors into the weights so the
    saved dictionary is an ordinary SAELens-layout SAE on raw activations.
    """

    has_b_enc = True

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.out_dim
        W_dec = torch.randn(d_sae, d_out, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if not family(cfg.architecture).unit_norm_decoder:
            W_dec *= 0.1  # Anthropic's April 2024 init for decoder-norm-weighted L1.
        if d_out == d_in:
            W_enc = W_dec.t().clone()
        else:
            W_enc = torch.randn(d_in, d_sae, generator=generator) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(W_enc)
        if self.has_b_enc:
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("output_scale", torch.tensor(1.0))

    # ---- shapes and checks -------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether the family keeps decoder rows at unit norm (else the norms are learned)."""
        return family(self.cfg.architecture).unit_norm_decoder

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise DimensionMismatchError(
                f"this {self.cfg.architecture} dictionary expects activations of width d_in={self.cfg.d_in} "
                f"(trained on {self.cfg.hook_name!r}), but got width {x.shape[-1]}. Use the hook point and "
                "model it was trained on, or train a dictionary for this one."
            )

    # ---- inference on raw activations --------------------------------------------------------
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    @abstractmethod
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The family's nonlinearity: pre-activations -> dense latents."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [..., d_sae] for raw activations [..., d_in]."""
        self.check_input(x)
        return self.activation(self.preacts(x.to(self.W_enc.dtype)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents @ self.W_dec + self.b_dec) / self.output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- training helpers --------------------------------------------------------------------
    def training_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) from activations by hook name (targets: the inputs for an SAE); a dictionary
        reading several hooks (cfg.layers) gets them stacked as [..., n, d]."""
        x = self._stacked(batch, self.cfg.input_hooks)
        return x, (self._stacked(batch, self.cfg.output_hooks) if self.cfg.output_hook_name else x)

    def _stacked(self, captured: dict[str, torch.Tensor], hooks: list[str]) -> torch.Tensor:
        if self.cfg.layers is None:
            return captured[hooks[0]]
        return torch.stack([captured[hook] for hook in hooks], dim=-2)

    def normalized(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        if y.shape[-1] != self.cfg.out_dim:
            raise DimensionMismatchError(
                f"this {self.cfg.architecture} dictionary predicts targets of width "
                f"d_out={self.cfg.out_dim}, but the targets have width {y.shape[-1]}. Pass the activations "
                "of the output hook it was configured with, or set d_out to match."
            )
        return x * self.input_scale, y * self.output_scale

    def decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def residual_directions(self) -> torch.Tensor:
        """[d_sae, d_out]: what each latent adds to the model's stream (a cross-layer one sums its writes)."""
        return self.W_dec

    def capture_inputs(self, captured: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dictionary's input from activations captured at `cfg.input_hooks` (stacked per layer if several)."""
        return self._stacked(captured, self.cfg.input_hooks)

    @abstractmethod
    def training_loss(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> TrainOutput:
        """The family's loss on raw inputs x and targets y (y is x for an autoencoder)."""

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set the input/output scales and b_dec from a first sample of activations."""
        if not torch.isfinite(x).all() or not torch.isfinite(y).all():
            raise ActivationError(
                "the activations used to initialise the dictionary contain NaN or inf values. "
                "Check the model's dtype (try float32) and exclude the attention-sink position."
            )
        if self.cfg.normalize_activations == "expected_average_only_in":
            self.input_scale.fill_(math.sqrt(self.cfg.d_in) / x.norm(dim=-1).mean().clamp_min(1e-8))
            self.output_scale.fill_(math.sqrt(self.cfg.out_dim) / y.norm(dim=-1).mean().clamp_min(1e-8))
        target = y * self.output_scale
        if self.cfg.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(target[:4096]))
        elif self.cfg.b_dec_init == "mean":
            self.b_dec.copy_(target.mean(0))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep only the gradient component orthogonal to each unit-norm decoder row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
            parallel = (self.W_dec.grad * rows).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * rows)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def resample(self, latents: torch.Tensor, x: torch.Tensor, y: torch.Tensor, generator=None) -> None:
        """Point dead `latents` at what the dictionary explains worst (Anthropic, "Towards Monosemanticity").

        Rows of the batch are drawn with probability proportional to their squared reconstruction
        loss; each chosen row's unexplained part becomes a dead latent's decoder direction, and the
        encoder reads that direction with the mean norm of the living encoder columns. The latent then
        fires on inputs like the one it was made from, and training takes it from there.
        """
        n = latents.numel()
        if n == 0:
            return
        xn, yn = self.normalized(x.to(self.W_enc.dtype), y.to(self.W_enc.dtype))
        residual = yn - (self.activation(self.preacts(x.to(self.W_enc.dtype))) @ self.W_dec + self.b_dec)
        loss = residual.pow(2).sum(-1).double()
        weights = loss.pow(2)
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        rows = torch.multinomial(weights, n, replacement=n > weights.numel(), generator=generator)
        out_dir = residual[rows] / residual[rows].norm(dim=1, keepdim=True).clamp_min(1e-8)
        if self.cfg.is_transcoder:  # the encoder reads the input that produced the unexplained output
            source = xn[rows]
            in_dir = source / source.norm(dim=1, keepdim=True).clamp_min(1e-8)
        else:
            in_dir = out_dir
        alive = torch.ones(self.d_sae, dtype=torch.bool, device=latents.device)
        alive[latents] = False
        reference = alive if bool(alive.any()) else ~alive
        enc_norm = self.W_enc[:, reference].norm(dim=0).mean()
        dec_norm = 1.0 if self.unit_norm_decoder else self.decoder_norms()[reference].mean()
        self.W_dec[latents] = out_dir * dec_norm
        self.W_enc[:, latents] = (in_dir * enc_norm).t()
        self.reset_latent_biases(latents, reference)

    @torch.no_grad()
    def reset_latent_biases(self, latents: torch.Tensor, alive: torch.Tensor) -> None:
        """Start resampled latents with a zero encoder bias (families with more state override)."""
        self.b_enc[latents] = 0.0

    def latent_parameters(self) -> dict[str, int]:
        """Parameters with one slice per latent: name -> the dimension that indexes latents."""
        dims = {"W_enc": 1, "W_dec": 0}
        for name, _ in self.named_parameters():
            if name not in dims and name != "b_dec":
                dims[name] = 0
        return dims

    # ---- saving ------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_scales(self) -> None:
        """Fold the input/output scales into the weights; latent values are unchanged."""
        s_in, s_out = self.input_scale.item(), self.output_scale.item()
        if self.cfg.apply_b_dec_to_input and s_in != s_out:
            # The encoder subtracts b_dec, which is about to be divided by s_out rather than s_in:
            # move the difference into the encoder bias so the pre-activations stay the same.
            self.shift_encoder_bias((s_in / s_out - 1.0) * (self.b_dec @ self.W_enc))
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    @torch.no_grad()
    def shift_encoder_bias(self, shift: torch.Tensor) -> None:
        """Add `shift` [d_sae] to the pre-activations (used by fold_scales)."""
        self.b_enc.add_(shift)

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the SAELens file, by SAELens name (call fold_scales() first)."""
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict().items()
            if name not in ("input_scale", "output_scale")
        }

    def load_saelens_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.saelens_tensors()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise KeyError(f"missing tensors {missing}")
        with torch.no_grad():
            for name, value in own.items():
                if tuple(tensors[name].shape) != tuple(value.shape):
                    raise ValueError(
                        f"tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(value.shape)}"
                    )
                value.copy_(tensors[name].to(value.dtype))
