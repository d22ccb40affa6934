"""Interventions as composable hooks: add a vector, clamp a feature, ablate or cap a direction.

An intervention names a hook point and a scope: the prompt tokens, the generated tokens, or all.
`steer(lm, interventions, prompt_len)` applies any number of them, in order, for every forward
pass while the context is active (KV-cached generation included) and removes every hook when it
exits. A token's absolute position is read from arguments whose meaning is part of the Hugging Face
model contract, not from cache internals: the 2-D attention_mask spans past and current tokens, so
the first current token sits at `mask width - tokens in this pass`. A generated token thus knows it
was generated whether the model recomputes the whole sequence or only the new token.

Edits outside their scope leave values bit-identical (`torch.where`), and an addition with
multiplier 0 is skipped, so "steered with 0" is exactly "unsteered".
"""

from __future__ import annotations

import contextlib
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.errors import DimensionMismatchError, InterventionError

SCOPES = ("all", "prompt", "generated")


def _finite_vector(vector, d: int | None, what: str) -> Tensor:
    if vector is None:
        raise InterventionError(f"{what} is missing; pass it by keyword (vector=... or direction=...).")
    vector = (
        torch.as_tensor(vector).detach().reshape(-1) if not isinstance(vector, Tensor) else vector.detach()
    )
    if vector.ndim != 1:
        raise InterventionError(f"{what} must be one vector [d_model], got shape {tuple(vector.shape)}.")
    if d is not None and vector.shape[0] != d:
        raise DimensionMismatchError(
            f"{what} has width {vector.shape[0]} but the hook point has width {d}. Use a vector built "
            "at a hook point of this model."
        )
    if not torch.isfinite(vector).all():
        raise InterventionError(f"{what} contains NaN or inf values; rebuild it from finite activations.")
    return vector


def _finite_scalar(value, what: str) -> float | None:
    if value is not None and not math.isfinite(float(value)):
        raise InterventionError(
            f"{what} is {value}; NaN or inf would turn every steered activation into NaN."
        )
    return None if value is None else float(value)


def unit(direction: Tensor) -> Tensor:
    """The direction scaled to norm 1 (float32); a zero vector is an error, not a silent no-op."""
    direction = _finite_vector(direction, None, "the direction").float()
    norm = direction.norm()
    if norm == 0:
        raise InterventionError("the direction is the zero vector; it has no direction to ablate or cap.")
    return direction / norm


@dataclass
class Intervention(ABC):
    """Base: `edit` maps activations [batch, seq, d] to new ones at `hook`, within `scope`."""

    hook: str
    scope: str = field(default="all", kw_only=True)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise InterventionError(f"unknown scope {self.scope!r}: use one of {', '.join(SCOPES)}.")

    @abstractmethod
    def edit(self, x: Tensor) -> Tensor | None:
        """The edited activations, or None when this intervention changes nothing."""

    @abstractmethod
    def check(self, d: int) -> None:
        """Raise a clear error when this intervention cannot act on width-`d` activations."""


@dataclass
class AddVector(Intervention):
    """x + alpha * vector (ActAdd / CAA steering; feature steering with a decoder row)."""

    vector: Tensor = None
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vector = _finite_vector(self.vector, None, "the steering vector")
        self.alpha = _finite_scalar(self.alpha, "alpha")

    def check(self, d: int) -> None:
        _finite_vector(self.vector, d, "the steering vector")

    def edit(self, x: Tensor) -> Tensor | None:
        if self.alpha == 0:
            return None
        return x + (self.alpha * self.vector.to(x.device, torch.float32)).to(x.dtype)


@dataclass
class Ablate(Intervention):
    """Directional ablation: x - (x . d) d with d of unit norm, so the projection on d becomes 0."""

    direction: Tensor = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.direction = unit(self.direction)

    def check(self, d: int) -> None:
        _finite_vector(self.direction, d, "the direction")

    def edit(self, x: Tensor) -> Tensor:
        d = self.direction.to(x.device)
        proj = x.float() @ d
        return (x.float() - proj[..., None] * d).to(x.dtype)


@dataclass
class CapProjection(Intervention):
    """Keep the projection on d within [low, high] (either may be None); other components unchanged."""

    direction: Tensor = None
    high: float | None = None
    low: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.direction = unit(self.direction)
        self.high, self.low = _finite_scalar(self.high, "high"), _finite_scalar(self.low, "low")
        if self.high is None and self.low is None:
            raise InterventionError("CapProjection needs a high cap, a low cap or both.")
        if self.high is not None and self.low is not None and self.low > self.high:
            raise InterventionError(f"CapProjection low={self.low} is above high={self.high}.")

    def check(self, d: int) -> None:
        _finite_vector(self.direction, d, "the direction")

    def edit(self, x: Tensor) -> Tensor:
        d = self.direction.to(x.device)
        proj = x.float() @ d
        target = proj.clamp(min=self.low, max=self.high)
        return (x.float() + (target - proj)[..., None] * d).to(x.dtype)


@dataclass
class ClampFeature(Intervention):
    """Set dictionary latents to fixed values, keeping the SAE error term (Scaling Monosemanticity).

    encode x, set latent i to its value, decode, add back the error x - decode(encode(x)): for a
    linear decoder that is exactly x + (value - current) * W_dec[i] / output_scale, which is what is
    computed, so clamping a latent to its current value changes nothing at all.
    """

    dictionary: Dictionary = None
    features: Sequence[int] = ()
    values: Sequence[float] = ()
    only_active: bool = False  # clamp only where the latent already fires (Neuronpedia's "amplify")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.dictionary, Dictionary):
            raise InterventionError("ClampFeature needs dictionary=, the SAE whose features it clamps.")
        self.features = [
            int(i) for i in (self.features if isinstance(self.features, Iterable) else [self.features])
        ]
        self.values = [
            _finite_scalar(v, "a clamp value")
            for v in (self.values if isinstance(self.values, Iterable) else [self.values])
        ]
        repeated = sorted({i for i in self.features if self.features.count(i) > 1})
        if repeated:
            raise InterventionError(
                f"feature {repeated[0]} is listed more than once; give each feature one value."
            )
        if not self.features or len(self.features) != len(self.values):
            raise InterventionError("ClampFeature needs one value per feature (and at least one feature).")
        bad = [i for i in self.features if not 0 <= i < self.dictionary.d_sae]
        if bad:
            raise InterventionError(
                f"feature index {bad[0]} is out of range: the dictionary has {self.dictionary.d_sae} latents."
            )

    def check(self, d: int) -> None:
        if d != self.dictionary.d_in:
            raise DimensionMismatchError(
                f"the dictionary reads width {self.dictionary.d_in} but {self.hook} has width {d}; clamp its "
                "features at the hook point it was trained on."
            )

    def edit(self, x: Tensor) -> Tensor:
        sae = self.dictionary
        idx = torch.tensor(self.features, device=x.device)
        with torch.no_grad():
            current = sae.encode(x)[..., idx].float()
            target = torch.tensor(self.values, device=x.device, dtype=torch.float32).expand_as(current)
            if self.only_active:
                target = torch.where(current > 0, target, current)
            rows = (sae.W_dec[idx].float() / sae.output_scale).to(x.device)
            return (x.float() + (target - current) @ rows).to(x.dtype)


def add_feature(
    dictionary: Dictionary, feature: int, alpha: float, hook: str | None = None, **kw
) -> AddVector:
    """Steer with a feature: add alpha times its decoder row (Neuronpedia's steering)."""
    if not 0 <= feature < dictionary.d_sae:
        raise InterventionError(
            f"feature index {feature} is out of range: the dictionary has {dictionary.d_sae} latents."
        )
    row = dictionary.W_dec[feature].detach().float() / dictionary.output_scale
    return AddVector(
        hook or dictionary.cfg.output_hook_name or dictionary.cfg.hook_name, vector=row, alpha=alpha, **kw
    )


def ablation(lm: HookedLM, direction: Tensor, layers: Iterable[int] | None = None, **kw) -> list[Ablate]:
    """Directional ablation at chosen layers' resid_pre, or (layers=None) from every write to the stream.

    `layers=None` follows Arditi et al.: the embedding output (blocks.0.hook_resid_pre) and every
    attention and MLP output, so no residual-stream state at any layer or position keeps a component
    along the direction; this is what weight orthogonalization reproduces in the weights.
    """
    if layers is None:
        hooks = ["blocks.0.hook_resid_pre"]
        for i in range(lm.n_layers):
            hooks += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
    else:
        hooks = [f"blocks.{i}.hook_resid_pre" for i in layers]
    return [Ablate(h, direction=direction, **kw) for h in hooks]


class _Positions:
    """The absolute position of each forward pass's first token, read in a pre-hook on the whole model.

    Sources, most stable first: a 2-D attention_mask (it covers past + current tokens in every
    transformers release, and saelab's own generation loop always passes one); `cache_position`
    (older releases pass it); the cache's own length as a last resort. A pass with no cache at all
    starts at 0. Keyword names changed across releases (`past_key_values` became `cache` in 5.24),
    so both are read, and positional arguments are bound to the model's signature.
    """

    def __init__(self, model) -> None:
        try:
            self._signature = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self._signature = None
        self._width: int | None = None  # columns of a 2-D mask: past + current tokens
        self._offset: int | None = 0  # or the first position itself
        self._problem = ""

    def _arguments(self, args, kwargs) -> dict:
        if args and self._signature is not None:
            try:
                return {**self._signature.bind_partial(*args, **kwargs).arguments, **kwargs}
            except TypeError:
                pass
        return {"input_ids": args[0], **kwargs} if args else dict(kwargs)

    def __call__(self, _module, args, kwargs) -> None:
        arguments = self._arguments(args, kwargs)
        self._width, self._offset, self._problem = None, None, ""
        mask = arguments.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim == 2:
            self._width = mask.shape[-1]
            return
        where = arguments.get("cache_position")
        if isinstance(where, Tensor) and where.numel() > 0:
            self._offset = int(where.reshape(-1)[0])
            return
        cache = arguments.get("cache", arguments.get("past_key_values"))
        if cache is None:
            self._offset = 0
        elif hasattr(cache, "get_seq_length"):
            self._offset = int(cache.get_seq_length())
        elif isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
            self._offset = int(cache[0][0].shape[-2])  # a legacy tuple cache: [layer][key/value] tensors
        else:
            self._problem = (
                f"this forward pass got a KV cache ({type(cache).__name__}) but no 2-D attention_mask, so a "
                "scoped intervention cannot tell prompt tokens from generated ones. Pass attention_mask "
                "covering the cached and the new tokens, or generate with saelab.interventions.generate."
            )

    def first(self, n: int) -> int:
        """The absolute position of the first of the `n` tokens in the current forward pass."""
        if self._width is not None:
            if self._width < n:
                raise InterventionError(
                    f"the attention_mask has {self._width} columns but this forward pass has {n} tokens; "
                    "it must cover the cached tokens and the new ones."
                )
            return self._width - n
        if self._offset is None:
            raise InterventionError(self._problem)
        return self._offset


def _scoped(interventions: list[Intervention], tracker: _Positions, prompt_len: int | None):
    def fn(x: Tensor) -> Tensor | None:
        changed = None
        for iv in interventions:
            current = x if changed is None else changed
            if iv.scope == "generated" and prompt_len is None:
                continue
            new = iv.edit(current)
            if new is None:
                continue
            if iv.scope != "all" and prompt_len is not None:
                positions = tracker.first(x.shape[-2]) + torch.arange(x.shape[-2], device=x.device)
                inside = positions < prompt_len if iv.scope == "prompt" else positions >= prompt_len
                new = torch.where(inside[:, None], new, current)
            changed = new
        return changed

    return fn


@contextlib.contextmanager
def steer(lm: HookedLM, interventions: Iterable[Intervention], prompt_len: int | None = None) -> Iterator:
    """Apply `interventions` to every forward pass of `lm` inside the context; all hooks go on exit.

    `prompt_len` is the (left-padded) prompt width: positions below it are "prompt", the rest
    "generated". Without it every position counts as prompt and "generated" interventions do nothing.
    Scopes work for `lm.forward` / `lm.capture` (no cache: positions start at 0), for
    `saelab.interventions.generate` and for a caller's own `lm.model.generate(..., attention_mask=...)`.
    """
    interventions = list(interventions)
    by_hook: dict[str, list[Intervention]] = {}
    for iv in interventions:
        lm.layer_of(iv.hook)  # unknown hook points fail here, with the list of valid ones
        iv.check(lm.hook_dim(iv.hook))
        by_hook.setdefault(iv.hook, []).append(iv)
    tracker = _Positions(lm.model)
    scoped = prompt_len is not None and any(iv.scope != "all" for iv in interventions)
    handle = lm.model.register_forward_pre_hook(tracker, with_kwargs=True) if scoped else None
    try:
        with lm.patch({h: _scoped(ivs, tracker, prompt_len) for h, ivs in by_hook.items()}):
            yield lm
    finally:
        if handle is not None:
            handle.remove()
