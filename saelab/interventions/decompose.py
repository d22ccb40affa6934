"""Decompose a vector into dictionary features: a sparse, by default non-negative, sum of decoder rows.

A steering vector, a probe direction or a difference of activations is a *direction* in the space
the decoder writes to, not an activation: it is decomposed as ``vector ~= sum_i c_i * W_dec[i]``
with no ``b_dec`` (the bias is a point, not a direction, and cancels in any difference). The
coefficients ``c_i`` are in the units of the actual decoder rows, like latent activations.

Two ways to choose the features:
- ``gradient_pursuit``: greedy selection on unit-normalised decoder rows with an exact line-search
  gradient step on the support (Blumensath & Davies 2008; Sharkey's inference-time optimisation of
  SAEs), then an optional non-negative least-squares refit on the chosen support.
- ``encoder_then_refine``: let the SAE's own encoder pick candidates, then fit them by NNLS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from saelab.errors import ActivationError, DecompositionError, DimensionMismatchError

METHODS = ("pursuit", "encoder")


# ---- checks ------------------------------------------------------------------------------------
def _check_vectors(target: torch.Tensor, width: int, where: str) -> None:
    if target.ndim not in (1, 2) or target.shape[-1] != width:
        raise DimensionMismatchError(
            f"the vector to decompose has shape {tuple(target.shape)}, but this dictionary's decoder writes "
            f"vectors of width {width} {where}. Pass one vector [{width}] or a batch [n, {width}] taken at that "
            "hook point (of the same model), or use a dictionary trained there."
        )
    if not torch.isfinite(target).all():
        raise ActivationError(
            "the vector to decompose contains NaN or inf values. Recompute it in float32 (not float16), "
            "and check that no activation it was built from overflowed."
        )
    zero = target.reshape(-1, width).norm(dim=-1) == 0
    if bool(zero.any()):
        rows = zero.nonzero().flatten().tolist()
        raise DecompositionError(
            f"the vector to decompose is all zeros (rows {rows[:10]}): a zero vector has no direction. "
            "Check how it was computed (e.g. a difference of identical activations)."
        )


def _check_n_features(n_features: int, d_sae: int) -> None:
    if isinstance(n_features, bool) or not isinstance(n_features, int) or not 1 <= n_features <= d_sae:
        raise DecompositionError(
            f"n_features must be a whole number from 1 to d_sae={d_sae}, got {n_features!r}. "
            "Ask for fewer features (10 to 50 is usual)."
        )


def _where(dictionary) -> str:
    cfg = dictionary.cfg
    if cfg.is_transcoder:
        return f"(d_out={cfg.out_dim}, at {cfg.output_hook_name!r})"
    return f"(d_in={cfg.d_in}, at {cfg.hook_name!r})"


def _work(D: torch.Tensor) -> torch.Tensor:
    """D in float64 (round-off would otherwise blur small coefficients); on CPU for MPS (no float64)."""
    return D.detach().to("cpu" if D.device.type == "mps" else D.device, torch.float64)


def _unit_rows(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normalised rows (dead zero rows stay zero) and the row norms, in the working dtype."""
    D = _work(D)
    norms = D.norm(dim=1)
    return D / norms.clamp_min(1e-30)[:, None], norms


# ---- least squares on a support ----------------------------------------------------------------
def _refit(
    U: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, nonneg: bool
) -> torch.Tensor:
    """(Non-negative) least squares of y [B, d] on the rows U[idx] [B, m, d] where valid [B, m].

    NNLS is Lawson & Hanson's active-set method, batched with masks, warm-started from LS that drops
    negative coefficients until the rest stay positive (often already the answer). It is exact.
    """
    A = U[idx] * valid[..., None]
    G = A @ A.transpose(1, 2)
    b = (A @ y[..., None]).squeeze(-1)
    eye = torch.eye(idx.shape[1], dtype=U.dtype, device=U.device)
    tol = 1e-10 * b.abs().amax(1, keepdim=True).clamp_min(1e-30)

    def solve(mask):  # LS on the masked slots, zero elsewhere
        Gm = G * (mask[:, :, None] & mask[:, None, :]) + eye * (~mask)[:, None, :]
        return (torch.linalg.pinv(Gm, hermitian=True) @ (b * mask)[..., None]).squeeze(-1)

    def tidy(v):  # below a millionth of the largest is round-off (of float32 inputs), not a feature
        return v * (v.abs() > 1e-6 * v.abs().amax(1, keepdim=True))

    if not nonneg:
        return tidy(solve(valid))
    P = valid.clone()
    for _ in range(idx.shape[1] + 1):
        x = solve(P)
        if not bool((P & (x <= 0)).any()):
            break
        P &= x > 0
    x = x * P
    for _ in range(3 * idx.shape[1]):
        gain = b - (G @ x[..., None]).squeeze(-1)  # minus the gradient
        candidates = ~P & valid & (gain > tol)
        inner = candidates.any(1)
        if not bool(inner.any()):
            break
        best = gain.masked_fill(~candidates, -math.inf).argmax(1, keepdim=True)
        P |= torch.zeros_like(P).scatter(1, best, True) & inner[:, None]
        for _ in range(idx.shape[1] + 1):
            s = solve(P)
            bad = P & (s <= 0) & inner[:, None]
            fine = inner & ~bad.any(1)
            x = torch.where(fine[:, None], s, x)
            inner &= ~fine
            if not bool(inner.any()):
                break
            # Step back from x towards s until the first coefficient reaches 0, and let it go.
            alpha = torch.where(bad, x / (x - s).clamp_min(1e-30), torch.inf).amin(1, keepdim=True)
            x = torch.where(inner[:, None], x + alpha * (s - x), x)
            P &= ~(inner[:, None] & (x <= 1e-12 * x.abs().amax(1, keepdim=True)))
    return tidy(x.clamp_min(0) * P)


def _to_decoder_units(a: torch.Tensor, norms: torch.Tensor, shape, like: torch.Tensor) -> torch.Tensor:
    """Coefficients on unit rows -> on the actual rows, in the caller's shape, D's dtype and device."""
    c = torch.where(a != 0, a / norms.clamp_min(1e-30), torch.zeros_like(a))
    return c.reshape(*shape[:-1], -1).to(like.device, like.dtype)


def _support_refit(U, y, a, n_features, nonneg):
    """Refit the nonzero entries of a [B, d_sae] (at most n_features per row) and scatter back."""
    values, idx = a.abs().topk(n_features, dim=1)
    fitted = _refit(U, y, idx, values > 0, nonneg)
    return torch.zeros_like(a).scatter(1, idx, fitted)


# ---- the two methods ---------------------------------------------------------------------------
@torch.no_grad()
def gradient_pursuit(
    D: torch.Tensor,
    target: torch.Tensor,
    n_features: int,
    nonneg: bool = True,
    refit: bool = True,
) -> torch.Tensor:
    """Coefficients [..., d_sae] with at most `n_features` nonzeros such that `coeffs @ D ~= target`.

    D is the decoder [d_sae, d] and target [d] or a batch [B, d]. Each of `n_features` iterations adds
    the unit row with the largest inner product with the residual (largest *positive* one when
    `nonneg`; largest in absolute value otherwise), then takes one gradient step on the whole
    support with the exact line-search step, clamping negative coefficients to 0 when `nonneg`
    (a clamped feature leaves the support and may be picked again). Selection uses unit rows so that
    a row's norm does not buy it a place; `refit` then solves (NN)LS on the final support, which
    makes a planted combination come back exactly. Works in float64 on D's device (CPU for MPS).
    """
    d_sae, width = D.shape
    _check_n_features(n_features, d_sae)
    _check_vectors(target, width, f"(the width of D {tuple(D.shape)})")
    U, norms = _unit_rows(D)
    y = target.detach().to(U.device, U.dtype).reshape(-1, width)
    dead = norms == 0
    a = torch.zeros(y.shape[0], d_sae, dtype=U.dtype, device=U.device)
    rows = torch.arange(y.shape[0], device=U.device)
    for _ in range(n_features):
        residual = y - a @ U
        inner = residual @ U.T
        score = (inner if nonneg else inner.abs()).masked_fill(dead, -math.inf)
        best, pick = score.max(dim=1)
        selected = a != 0
        selected[rows, pick] |= best > 0  # nothing left to add when no row reduces the residual
        grad = inner * selected
        c = grad @ U
        step = (c * residual).sum(1, keepdim=True) / (c * c).sum(1, keepdim=True).clamp_min(1e-30)
        a = a + step * grad
        if nonneg:
            a = a.clamp_min(0)
    if refit:
        a = _support_refit(U, y, a, n_features, nonneg)
    return _to_decoder_units(a, norms, target.shape, D)


@torch.no_grad()
def encoder_then_refine(
    dictionary,
    target: torch.Tensor,
    n_features: int,
    candidates: int | None = None,
    nonneg: bool = True,
) -> torch.Tensor:
    """Let the SAE's encoder choose the features, then fit their coefficients by NNLS on the decoder.

    A steering vector is a difference, not an activation, so it is not run through `encode()`:
    the encoder bias and threshold are tuned to activations, and a small vector would fire nothing.
    The candidates are instead the latents with the largest linear encoder reading `target @ W_enc`
    (positive ones when `nonneg`), and NNLS on their decoder rows gives the coefficients. By default
    the n_features top latents are fitted, so a larger n_features never fits worse. `candidates` >
    n_features widens the pool (at most d_in is sensible): the fit over the pool is pruned to its
    n_features largest parts, which are refitted; that recovers more, but is no longer nested.
    Returns coefficients [..., d_sae] like `gradient_pursuit`. Not for transcoders, whose encoder
    reads a different space than the decoder writes to.
    """
    cfg = dictionary.cfg
    if cfg.is_transcoder:
        raise DecompositionError(
            f"method 'encoder' needs an encoder that reads the space the decoder writes to, but this "
            f"transcoder reads {cfg.hook_name!r} and writes {cfg.output_hook_name!r}. Use method='pursuit'."
        )
    D = dictionary.W_dec / dictionary.output_scale
    width = D.shape[1]
    _check_n_features(n_features, dictionary.d_sae)
    _check_vectors(target, width, _where(dictionary))
    pool = min(dictionary.d_sae, candidates or n_features)
    if pool < n_features:
        raise DecompositionError(f"candidates ({candidates}) must be at least n_features ({n_features}).")
    U, norms = _unit_rows(D)
    y = target.detach().to(U.device, U.dtype).reshape(-1, width)
    scores = y @ dictionary.W_enc.detach().to(U.dtype)
    scores = (scores if nonneg else scores.abs()).masked_fill(norms == 0, -math.inf)
    top, idx = scores.topk(pool, dim=1)
    valid = top > 0 if nonneg else torch.isfinite(top)
    fitted = _refit(U, y, idx, valid, nonneg)
    a = torch.zeros(y.shape[0], dictionary.d_sae, dtype=U.dtype, device=U.device).scatter(1, idx, fitted)
    if pool > n_features:  # prune to the largest parts and refit them
        keep = a.abs().topk(n_features, dim=1).indices
        a = torch.zeros_like(a).scatter(1, keep, a.gather(1, keep))
        a = _support_refit(U, y, a, n_features, nonneg)
    return _to_decoder_units(a, norms, target.shape, D)


# ---- the report --------------------------------------------------------------------------------
class Feature(NamedTuple):
    """One feature of a decomposition."""

    index: int
    coefficient: float  # in units of the decoder row: coefficient * W_dec[index] is its part
    cosine: float  # cosine of the decoder row with the vector
    share: float  # <coefficient * W_dec[index], vector> / |vector|^2; the shares sum to <recon, vector>/|vector|^2
    url: str | None = None


@dataclass
class Decomposition:
    """A vector written as a sparse sum of decoder rows, with honest figures of how well it fits."""

    features: list[Feature]
    reconstruction: torch.Tensor
    cosine: float  # cosine of the reconstruction with the vector
    residual_norm: float  # |vector - reconstruction|
    vector_norm: float
    method: str
    hook_name: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def relative_residual(self) -> float:
        return self.residual_norm / self.vector_norm

    def to_dict(self) -> dict:
        """JSON-ready figures (no tensors) for the CLI and the web UI."""
        return {
            "method": self.method,
            "hook_name": self.hook_name,
            "cosine": self.cosine,
            "residual_norm": self.residual_norm,
            "vector_norm": self.vector_norm,
            "relative_residual": self.relative_residual,
            "features": [f._asdict() for f in self.features],
            **self.meta,
        }

    def table(self, markdown: bool = True) -> str:
        """The features as a Markdown (or plain-text) table, with the fit on top."""
        head = (
            f"{self.method}: {len(self.features)} features, reconstruction cosine {self.cosine:.4f}, "
            f"residual norm {self.residual_norm:.4g} of vector norm {self.vector_norm:.4g}"
        )
        names = ["rank", "feature", "coefficient", "cosine", "share"]
        rows = []
        for rank, f in enumerate(self.features, 1):
            name = f"[{f.index}]({f.url})" if markdown and f.url else str(f.index)
            rows.append([str(rank), name, f"{f.coefficient:.4g}", f"{f.cosine:+.3f}", f"{f.share:+.3f}"])
            if f.url and not markdown:
                rows[-1].append(f.url)
        if not markdown:
            if any(f.url for f in self.features):
                names.append("link")
            widths = [max(len(r[i]) if i < len(r) else 0 for r in [names, *rows]) for i in range(len(names))]
            lines = [
                "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)).rstrip()
                for r in [names, *rows]
            ]
            return "\n".join([head, *lines])
        lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join([head, "", *lines])


@torch.no_grad()
def decompose(
    dictionary,
    vector: torch.Tensor,
    n_features: int = 10,
    method: str = "pursuit",
    feature_url: str | None = None,
    nonneg: bool = True,
    **kwargs,
) -> Decomposition | list[Decomposition]:
    """Decompose `vector` [d] (or each row of [B, d]) into at most `n_features` decoder rows.

    The vector is a direction in the space the decoder writes to; b_dec plays no part. `method` is
    "pursuit" (gradient pursuit + refit) or "encoder" (encoder picks, NNLS fits); extra keyword
    arguments go to that function. `feature_url`, e.g. "http://127.0.0.1:8000/feature/{index}",
    gives each feature its dashboard link (`{hook}` is also filled in). Features are ranked by the
    norm of their part, |coefficient| * |W_dec[index]|.
    """
    if method not in METHODS:
        raise DecompositionError(
            f"unknown decomposition method {method!r}; choose one of {', '.join(METHODS)}."
        )
    D = dictionary.W_dec / dictionary.output_scale
    _check_n_features(n_features, dictionary.d_sae)
    _check_vectors(vector, D.shape[1], _where(dictionary))
    if method == "pursuit":
        coeffs = gradient_pursuit(D, vector, n_features, nonneg=nonneg, **kwargs)
    else:
        coeffs = encoder_then_refine(dictionary, vector, n_features, nonneg=nonneg, **kwargs)
    hook = dictionary.cfg.output_hook_name if dictionary.cfg.is_transcoder else dictionary.cfg.hook_name
    Dw = _work(D)
    norms = Dw.norm(dim=1)
    results = []
    for v, c in zip(vector.detach().reshape(-1, D.shape[1]), coeffs.reshape(-1, D.shape[0]), strict=True):
        v, c = v.to(Dw), c.to(Dw)
        recon = c @ Dw
        vnorm = v.norm()
        idx = c.nonzero().flatten()
        idx = idx[(c[idx].abs() * norms[idx]).argsort(descending=True)]
        features = [
            Feature(
                index=i,
                coefficient=c[i].item(),
                cosine=(Dw[i] @ v / (norms[i] * vnorm)).item(),
                share=(c[i] * (Dw[i] @ v) / vnorm**2).item(),
                url=feature_url.format(index=i, hook=hook) if feature_url else None,
            )
            for i in idx.tolist()
        ]
        results.append(
            Decomposition(
                features=features,
                reconstruction=recon.to(D.device, D.dtype),
                cosine=(recon @ v / (recon.norm() * vnorm)).item() if features else 0.0,
                residual_norm=(v - recon).norm().item(),
                vector_norm=vnorm.item(),
                method=method,
                hook_name=hook,
                meta={"n_features": n_features, "nonneg": nonneg},
            )
        )
    return results[0] if vector.ndim == 1 else results


__all__ = [
    "Decomposition",
    "DecompositionError",
    "Feature",
    "decompose",
    "encoder_then_refine",
    "gradient_pursuit",
]
