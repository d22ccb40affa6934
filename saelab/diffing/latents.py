"""Per-latent model diffing of a crosscoder: relative decoder norm, tags, decoder cosine, Latent Scaling.

Relative decoder norm (Minder et al. 2025; REFERENCES.md): with d_A, d_B a latent's decoders for
members A (0) and B (1),
    Δnorm = ½ ((||d_A|| − ||d_B||) / max(||d_A||, ||d_B||) + 1)
so Δnorm is 0 for a latent that only B uses and 1 for one only A uses; tags: B-only Δ < 0.1,
A-only Δ > 0.9, shared 0.4 ≤ Δ ≤ 0.6, other otherwise. (Writing ½((||d_B|| − ||d_A||)/max + 1)
instead mirrors the axis and swaps the two thresholds: the tags are the same.) Norms are compared in
the space of each member's normalised activations, where the crosscoder was trained.

Latent Scaling (Minder et al. 2025): for latent j with activations f_j over tokens and the reference
member's decoder d = d_j^ref, the β minimising Σ_t ||β f_j(t) d − y_t||² is
    β = dᵀ (Yᵀ f_j) / (||f_j||² ||d||²).
With the probed member p (A for a B-only latent) and the reference member (B):
* ε (complete shrinkage): y = x_m − x̂_m + f_j d_j^m, member m's error with latent j's own write
  added back (for a B-only latent d_j^A ≈ 0, so for A this is A's reconstruction error);
* r (latent decoupling): y = x̂_p − f_j d_j^p for the probed member (its reconstruction by the other
  latents), and the full x̂_ref for the reference.
ν^ε = β^ε_p / β^ε_ref and ν^r = β^r_p / β^r_ref. A latent truly specific to the reference member has
both near 0; high ν^ε means the probed model holds the direction in its error (complete shrinkage),
high ν^r that other latents reconstruct it there (latent decoupling). Everything is accumulated as
per-latent sums over batches, so no token is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saelab.dictionaries.families.crosscoder import (  # the tags live with the family: analysis reads them too
    A_ONLY_ABOVE,  # noqa: F401 (re-exported)
    B_ONLY_BELOW,  # noqa: F401
    SHARED_RANGE,  # noqa: F401
    TAGS,
    Crosscoder,
    relative_decoder_norm,
    tag_latents,
)
from saelab.errors import DiffingError, DimensionMismatchError

GENUINE_NU = 0.2  # a model-specific latent is genuine when both ν^ε and ν^r are below this


def check_crosscoder(dictionary, members: int | None = 2) -> Crosscoder:
    if not isinstance(dictionary, Crosscoder):
        name = getattr(getattr(dictionary, "cfg", None), "architecture", type(dictionary).__name__)
        raise DiffingError(
            f"model diffing needs a crosscoder (family crosscoder or crosscoder_batchtopk), not a {name} "
            "dictionary. Train one over paired activations with hook_name='model{i}/...' and layers=[0, 1]."
        )
    if members is not None and dictionary.n_members != members:
        raise DiffingError(
            f"this analysis compares {members} members, but the crosscoder reads {dictionary.n_members} "
            f"({', '.join(dictionary.members)}). Pass members=(a, b) to pick two of them."
        )
    return dictionary


def _batches(crosscoder: Crosscoder, data) -> Iterable[torch.Tensor]:
    """Raw paired activations [N, n, d] from tensors or from batches {hook: [N, d]}."""
    for item in data:
        if isinstance(item, dict):
            missing = [hook for hook in crosscoder.cfg.input_hooks if hook not in item]
            if missing:
                raise DiffingError(
                    f"a batch lacks the crosscoder's hook(s) {', '.join(missing)} (it has "
                    f"{', '.join(item)}); pass batches of the activations it was trained on."
                )
            item = crosscoder.training_inputs(item)[0]
        yield item


@torch.no_grad()
def latent_scaling(
    crosscoder: Crosscoder, data: Iterable, probe: int = 0, reference: int = 1, chunk: int = 4096
) -> dict[str, torch.Tensor]:
    """β^ε, β^r of the probed and reference members and ν^ε, ν^r per latent, in one streaming pass.

    `data` yields raw paired activations [N, n, d] (or batches {hook: [N, d]}). Latents that never
    fire get NaN. Returns [F] tensors: beta_eps_probe, beta_eps_ref, beta_r_probe, beta_r_ref,
    nu_eps, nu_r, and the firing count of every latent (`fired`).
    """
    return _scaling(crosscoder, data, [(probe, reference)], chunk)[0]


def _scaling(crosscoder: Crosscoder, data: Iterable, pairs: list[tuple[int, int]], chunk: int = 4096):
    """Latent Scaling for several (probe, reference) pairs over one pass of the data."""
    check_crosscoder(crosscoder, members=None)
    for member in {m for pair in pairs for m in pair}:
        if not 0 <= member < crosscoder.n_members:
            raise DiffingError(f"member {member} does not exist: the crosscoder has {crosscoder.n_members}.")
    crosscoder = crosscoder.eval()
    device, dtype = crosscoder.W_dec.device, torch.float64
    width, n, d = crosscoder.cfg.d_sae, crosscoder.n_members, crosscoder.cfg.d_in
    scales = (crosscoder.folded_scales * crosscoder.input_scale).to(device)
    decoders = crosscoder.normalized_decoders().to(dtype)  # [F, n, d]
    references = sorted({ref for _, ref in pairs})
    # Σ_t f_j(t) d_jᵀ y_t, for d the reference's decoder and y each member's error or reconstruction.
    error_sums = {
        (m, ref): torch.zeros(width, dtype=dtype, device=device) for m in range(n) for ref in references
    }
    recon_sums = {key: torch.zeros_like(value) for key, value in error_sums.items()}
    ff = torch.zeros(width, dtype=dtype, device=device)
    fired = torch.zeros(width, dtype=torch.long, device=device)
    tokens = 0
    for x in _batches(crosscoder, data):
        if x.ndim != 3 or tuple(x.shape[1:]) != (n, d):
            raise DimensionMismatchError(
                f"Latent Scaling needs paired activations [N, {n}, {d}] (one row per token, one slot per "
                f"member), got {tuple(x.shape)}."
            )
        for start in range(0, x.shape[0], chunk):
            raw = x[start : start + chunk].to(device, crosscoder.W_enc.dtype)
            f = crosscoder.encode(raw)
            recon = (crosscoder.decode(f) * scales[:, None]).to(dtype)
            error = (raw * scales[:, None]).to(dtype) - recon
            f = f.to(dtype)
            tokens += raw.shape[0]
            fired += (f > 0).sum(0)
            ff += f.pow(2).sum(0)
            for m, ref in error_sums:
                error_sums[m, ref] += (f * (error[:, m] @ decoders[:, ref].T)).sum(0)
                recon_sums[m, ref] += (f * (recon[:, m] @ decoders[:, ref].T)).sum(0)
    if tokens == 0:
        raise DiffingError("Latent Scaling got no activations: the data iterable was empty.")
    results = []
    for probe, ref in pairs:
        direction = decoders[:, ref]
        own = {m: (decoders[:, m] * direction).sum(-1) * ff for m in (probe, ref)}  # Σ f² d·d_j^m
        denominator = torch.where(ff > 0, ff * direction.pow(2).sum(-1), torch.full_like(ff, math.nan))
        beta_eps_probe = (error_sums[probe, ref] + own[probe]) / denominator  # latent j's write added back
        beta_eps_ref = (error_sums[ref, ref] + own[ref]) / denominator
        beta_r_probe = (recon_sums[probe, ref] - own[probe]) / denominator  # reconstruction without j
        beta_r_ref = recon_sums[ref, ref] / denominator
        results.append(
            {
                "beta_eps_probe": beta_eps_probe.float().cpu(),
                "beta_eps_ref": beta_eps_ref.float().cpu(),
                "beta_r_probe": beta_r_probe.float().cpu(),
                "beta_r_ref": beta_r_ref.float().cpu(),
                "nu_eps": (beta_eps_probe / beta_eps_ref).float().cpu(),
                "nu_r": (beta_r_probe / beta_r_ref).float().cpu(),
                "fired": fired.cpu(),
                "tokens": torch.tensor(tokens),
            }
        )
    return results


@dataclass
class LatentDiff:
    """Every latent's diffing figures, members A (index `a`) and B (index `b`) of the crosscoder."""

    members: list[str]
    norm_a: torch.Tensor  # [F] ||d_A|| (normalised space)
    norm_b: torch.Tensor
    delta_norm: torch.Tensor  # [F]
    tags: list[str]
    cosine: torch.Tensor  # [F] cos(d_A, d_B)
    # Latent Scaling with B's decoder probed in A (ν for B-only latents) and A's probed in B (A-only).
    scaling_b: dict[str, torch.Tensor] = field(default_factory=dict)
    scaling_a: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nu_eps(self) -> torch.Tensor:
        """[F] ν^ε of each latent, probing the member it is specific to (B's decoder for B-leaning latents)."""
        return self._nu("nu_eps")

    @property
    def nu_r(self) -> torch.Tensor:
        return self._nu("nu_r")

    def _nu(self, name: str) -> torch.Tensor:
        if not self.scaling_b:
            raise DiffingError("no Latent Scaling was computed: call diff_latents with data.")
        if not self.scaling_a:
            return self.scaling_b[name]
        return torch.where(self.delta_norm <= 0.5, self.scaling_b[name], self.scaling_a[name])

    @property
    def live(self) -> torch.Tensor:
        """[F] bool: latents that fired on the data (all of them when no data was given)."""
        if not self.scaling_b:
            return torch.ones(len(self.tags), dtype=torch.bool)
        return self.scaling_b["fired"] > 0

    def indices(self, tag: str) -> torch.Tensor:
        """The live latents with this tag (a latent that never fires has no ν and counts as dead)."""
        if tag not in TAGS:
            raise DiffingError(f"unknown tag {tag!r}; the tags are {', '.join(TAGS)}.")
        live = self.live.tolist()
        return torch.tensor([i for i, t in enumerate(self.tags) if t == tag and live[i]], dtype=torch.long)

    def counts(self) -> dict[str, int]:
        """Live latents per tag, and the dead ones (never fired on the data)."""
        out = {tag: int(self.indices(tag).numel()) for tag in TAGS}
        out["dead"] = int((~self.live).sum())
        return out

    def genuine(self, tag: str = "b_only", threshold: float = GENUINE_NU) -> torch.Tensor:
        """Latents of `tag` that Latent Scaling confirms: both ν below `threshold`."""
        idx = self.indices(tag)
        ok = (self.nu_eps[idx] < threshold) & (self.nu_r[idx] < threshold)
        return idx[ok]

    def rows(self) -> list[dict]:
        """One JSON-ready record per latent (NaN as None)."""

        def value(t: torch.Tensor | None, i: int):
            if t is None:
                return None
            v = float(t[i])
            return None if math.isnan(v) else round(v, 6)

        has_scaling = bool(self.scaling_b)
        out = []
        for i, tag in enumerate(self.tags):
            out.append(
                {
                    "latent": i,
                    "tag": tag,
                    "delta_norm": value(self.delta_norm, i),
                    "norm_a": value(self.norm_a, i),
                    "norm_b": value(self.norm_b, i),
                    "cosine": value(self.cosine, i),
                    "nu_eps": value(self.nu_eps if has_scaling else None, i),
                    "nu_r": value(self.nu_r if has_scaling else None, i),
                    "fired": int(self.scaling_b["fired"][i]) if has_scaling else None,
                }
            )
        return out

    def save_json(self, path: str | Path) -> Path:
        from saelab.core.fileio import atomic_write_json

        path = Path(path)
        atomic_write_json(path, {"members": self.members, "counts": self.counts(), "latents": self.rows()})
        return path


@torch.no_grad()
def diff_latents(
    crosscoder: Crosscoder,
    data: Iterable | None = None,
    members: tuple[int, int] = (0, 1),
    both_directions: bool = True,
) -> LatentDiff:
    """Δnorm, tags and decoder cosines of every latent, plus Latent Scaling when `data` is given.

    One pass over `data` fits B's decoders in A (the ν of B-leaning latents) and, with
    `both_directions`, A's decoders in B (A-leaning latents).
    """
    check_crosscoder(crosscoder, members=None)
    a, b = members
    if a == b or not (0 <= a < crosscoder.n_members and 0 <= b < crosscoder.n_members):
        raise DiffingError(
            f"members must be two different members of 0..{crosscoder.n_members - 1}, got {members}."
        )
    decoders = crosscoder.normalized_decoders().detach().double().cpu()
    norm_a, norm_b = decoders[:, a].norm(dim=-1), decoders[:, b].norm(dim=-1)
    delta = relative_decoder_norm(norm_a, norm_b)
    cosine = torch.nn.functional.cosine_similarity(decoders[:, a], decoders[:, b], dim=-1, eps=1e-12)
    names = crosscoder.members
    out = LatentDiff(
        members=[names[a], names[b]],
        norm_a=norm_a.float(),
        norm_b=norm_b.float(),
        delta_norm=delta.float(),
        tags=tag_latents(delta),
        cosine=cosine.float(),
    )
    if data is not None:
        pairs = [(a, b), (b, a)] if both_directions else [(a, b)]
        results = _scaling(crosscoder, data, pairs)
        out.scaling_b = results[0]
        out.scaling_a = results[1] if both_directions else {}
    return out
