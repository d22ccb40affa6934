"""The sweep over scales, the choice of a scale, and the sampled explanations (see the package docstring)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from saelab.core.decoding import decode_new, generate_tokens, stop_ids
from saelab.core.models import HookedLM
from saelab.errors import DataError, DimensionMismatchError
from saelab.explain.explainer import ExplanationResult
from saelab.explain.selfexplain.prompt import (
    SelfTemplate,
    build_prompt,
    default_layer,
    injection_hook,
    parse_self_label,
    source_norm,
)

METHOD_VERSION = "self-v1"
RULES = ("composite", "self_similarity", "entropy")


@dataclass
class SelfExplainConfig:
    """How to self-explain a direction; stored whole in every explanation's source."""

    template: SelfTemplate = field(default_factory=SelfTemplate)
    layer: int | None = None  # None: default_layer(n_layers)
    # x the typical norm; 0 (the baseline) is always swept and never chosen
    scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    rule: str = "composite"  # how the scale is chosen: one of RULES
    n_samples: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 24
    seed: int = 0
    probe_layer: int | None = None  # whose resid_post gives the self-similarity; None: the last block
    norm_source: str | None = None  # text for the typical norm (`iter_texts` sources); None: embedded
    norm_tokens: int = 8192
    max_chars: int = 120

    def __post_init__(self) -> None:
        if isinstance(self.template, dict):
            self.template = SelfTemplate(**self.template)
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else ()
        if not all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in scales):
            raise DataError(
                f"scales {self.scales!r} must be finite numbers >= 0 (units of the typical norm)."
            )
        if not any(s > 0 for s in scales):
            raise DataError(f"scales {self.scales!r} hold no scale above 0; give e.g. (0.5, 1, 2, 4).")
        self.scales = tuple(sorted({float(s) for s in scales if s > 0}))
        if self.rule not in RULES:
            raise DataError(f"rule {self.rule!r} is unknown; use one of {', '.join(RULES)}.")
        for name in ("n_samples", "max_new_tokens", "norm_tokens", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} is {value!r}; use a whole number >= 1.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"seed is {self.seed!r}; use a whole number.")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise DataError(f"temperature is {self.temperature!r}; use a number >= 0 (0 is greedy).")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scales"] = list(self.scales)
        return out


@dataclass
class ScalePoint:
    """One scale of a sweep: the two criteria and the likeliest first explanation tokens."""

    scale: float  # in units of the typical norm
    absolute: float  # norm of the injected vector
    self_similarity: float
    entropy: float
    top_ids: list[int]
    top_tokens: list[str]
    top_probs: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


class SelfExplainer:
    """Sweeps scales, chooses one, and samples explanations of a direction from the model itself."""

    def __init__(self, lm: HookedLM, cfg: SelfExplainConfig | None = None, norm: float | None = None):
        self.lm, self.cfg = lm, cfg or SelfExplainConfig()
        cfg = self.cfg
        self.layer = default_layer(lm.n_layers) if cfg.layer is None else cfg.layer
        self.probe_layer = lm.n_layers - 1 if cfg.probe_layer is None else cfg.probe_layer
        for name, value in (("layer", self.layer), ("probe_layer", self.probe_layer)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < lm.n_layers:
                raise DataError(f"{name} is {value!r}; this model has blocks 0-{lm.n_layers - 1}.")
        self.hook, self.probe_hook = injection_hook(self.layer), f"blocks.{self.probe_layer}.hook_resid_post"
        self.ids, self.positions = build_prompt(lm.tokenizer, cfg.template)
        if norm is None:
            norm = source_norm(lm, self.layer, cfg.norm_source, cfg.norm_tokens)
        if not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0):
            raise DataError(f"norm is {norm!r}; the typical residual norm must be a finite number > 0.")
        self.norm = float(norm)

    def settings(self) -> dict:
        """Everything that changes a result: model, resolved layers, norm and the whole config."""
        return {
            "method": "self", "version": METHOD_VERSION, "model": self.lm.name, "layer": self.layer,
            "hook": self.hook, "probe_hook": self.probe_hook, "norm": self.norm, "config": self.cfg.to_dict(),
        }  # fmt: skip

    def unit(self, direction: Tensor) -> Tensor:
        """The direction as a unit vector [d_model]; DataError for zero, NaN or inf, wrong width refused."""
        d = torch.as_tensor(direction).detach()
        if d.shape != (self.lm.d_model,):
            raise DimensionMismatchError(
                f"the direction has shape {tuple(d.shape)} but the model's residual has width "
                f"{self.lm.d_model}; give one decoder row (dictionary.W_dec[idx]) of a dictionary of this model."
            )
        d = d.float()
        if not bool(torch.isfinite(d).all()):
            raise DataError("the direction holds NaN or inf values; check the dictionary's weights.")
        if float(d.norm()) == 0:
            raise DataError(
                "the direction is zero, so it has no meaning to explain; give a nonzero direction."
            )
        return d / d.norm()

    @contextlib.contextmanager
    def inject(self, vectors: Tensor):
        """While active, forward passes over the prompt see row i of `vectors` [batch, d] at every
        placeholder position at the injection hook (decoding steps on the KV cache are left alone)."""
        width, pos = len(self.ids), torch.tensor(self.positions)

        def replace(value: Tensor) -> Tensor | None:
            if value.shape[1] < width:
                return None
            value = value.clone()
            value[:, pos.to(value.device)] = vectors.to(value.device, value.dtype)[:, None, :]
            return value

        with self.lm.patch({self.hook: replace}):
            yield

    @torch.no_grad()
    def sweep(self, direction: Tensor) -> list[ScalePoint]:
        """The scale-0 baseline and every configured scale, in one batch (see the module docstring)."""
        unit = self.unit(direction)
        scales = [0.0, *self.cfg.scales]
        vectors = torch.tensor(scales)[:, None] * self.norm * unit[None]
        ids = torch.tensor([self.ids] * len(scales))
        seen: dict[str, Tensor] = {}

        def record(value: Tensor) -> None:
            seen["last"] = value[:, -1].float()

        with self.inject(vectors), self.lm.patch({self.probe_hook: record}):
            logits = self.lm.forward(ids, torch.ones_like(ids))[:, -1].float()
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1).cpu()
        cos = torch.nn.functional.cosine_similarity(seen["last"], unit[None].to(seen["last"].device)).cpu()
        top = logp.topk(5, dim=-1)
        decode = self.lm.tokenizer.decode
        return [
            ScalePoint(
                scale=s,
                absolute=s * self.norm,
                self_similarity=float(cos[i]),
                entropy=float(entropy[i]),
                top_ids=top.indices[i].tolist(),
                top_tokens=[decode([t]) for t in top.indices[i].tolist()],
                top_probs=[round(float(p), 6) for p in top.values[i].exp()],
            )  # fmt: skip
            for i, s in enumerate(scales)
        ]

    def choose(self, points: list[ScalePoint]) -> ScalePoint:
        """The point the rule picks among those with scale > 0 (ties: the smaller scale)."""
        cands = [p for p in points if p.scale > 0 and math.isfinite(p.self_similarity + p.entropy)]
        if not cands:
            raise DataError("the sweep has no point with a scale above 0 and finite criteria to choose from.")

        def spread(values: list[float]) -> list[float]:
            lo, hi = min(values), max(values)
            return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

        sims, ents = spread([p.self_similarity for p in cands]), spread([p.entropy for p in cands])
        keys = {
            "composite": [s - e for s, e in zip(sims, ents, strict=True)],
            "self_similarity": [p.self_similarity for p in cands],
            "entropy": [-p.entropy for p in cands],
        }[self.cfg.rule]
        return max(zip(keys, cands, strict=True), key=lambda kc: (kc[0], -kc[1].scale))[1]

    @contextlib.contextmanager
    def _sampling(self, n: int, seed: int):
        """Exact temperature sampling through greedy decoding: each row's logits / T plus Gumbel noise
        from that row's own generator (seed + row), added after the model's own logit processing."""
        if self.cfg.temperature == 0:
            yield
            return
        device, t = self.lm.device, float(self.cfg.temperature)
        gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]

        def noisy(_module, _args, output):
            logits = output.logits.float()
            u = torch.stack([torch.rand(logits.shape[-1], generator=g, device=device) for g in gens])
            output.logits = logits / t - torch.log(-torch.log(u))[:, None, :]
            return output

        handle = self.lm.model.register_forward_hook(noisy)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def explain(
        self, direction: Tensor, n: int | None = None, seed: int | None = None
    ) -> list[ExplanationResult]:
        """`n` (default cfg.n_samples) explanations at the chosen scale; sample i seeded `seed + i`
        (default seed: cfg.seed). Each source holds the template, layer, scale, whole sweep and settings."""
        cfg = self.cfg
        n = cfg.n_samples if n is None else n
        seed = cfg.seed if seed is None else seed
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"n (explanations per direction) is {n!r}; use a whole number >= 1.")
        if n > 1 and cfg.temperature == 0:
            raise DataError("several explanations need a temperature above 0 (greedy gives one).")
        points = self.sweep(direction)
        chosen = self.choose(points)
        vector = (self.unit(direction) * chosen.absolute).expand(n, -1)
        ids = torch.tensor([self.ids] * n, device=self.lm.device)
        with self.inject(vector), self._sampling(n, seed):
            new = generate_tokens(self.lm, ids, torch.ones_like(ids), cfg.max_new_tokens, temperature=0.0)
        raws = decode_new(self.lm.tokenizer, new, stop_ids(self.lm))
        base = {
            "method": "self", "version": METHOD_VERSION, "template": cfg.template.to_dict(),
            "layer": self.layer, "hook": self.hook, "norm": self.norm, "scale": chosen.scale,
            "scale_absolute": chosen.absolute, "rule": cfg.rule, "chosen": chosen.to_dict(),
            "sweep": [p.to_dict() for p in points], "settings": self.settings(),
        }  # fmt: skip
        out = []
        for i, raw in enumerate(raws):
            source = {**base, "seed": seed + i, "sample": i, "raw": raw}
            try:
                out.append(ExplanationResult(parse_self_label(raw, cfg.template, cfg.max_chars), source, raw))
            except DataError as e:
                out.append(ExplanationResult(None, source, raw, str(e)))
        return out
