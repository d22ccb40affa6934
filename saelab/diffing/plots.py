"""The two pictures of a crosscoder diff: the Δnorm histogram and the ν^ε against ν^r scatter (Agg, PNG)."""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.diffing.latents import A_ONLY_ABOVE, B_ONLY_BELOW, GENUINE_NU, SHARED_RANGE, LatentDiff


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_delta_norm(diff: LatentDiff, path: str | Path, title: str | None = None, bins: int = 50) -> Path:
    """Histogram of Δnorm over live latents (log count), with the tag thresholds marked."""
    plt = _pyplot()
    live = ((diff.norm_a + diff.norm_b) > 0) & diff.live
    values = diff.delta_norm[live].numpy()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(values, bins=bins, range=(0.0, 1.0), color="tab:blue")
    ax.set_yscale("log")
    for x in (B_ONLY_BELOW, A_ONLY_ABOVE, *SHARED_RANGE):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
    a, b = diff.members
    ax.set_xlabel(f"Δnorm   (0: only {b}, 1: only {a})")
    ax.set_ylabel("latents")
    counts = diff.counts()
    ax.set_title(
        title
        or f"B-only {counts['b_only']}, A-only {counts['a_only']}, shared {counts['shared']}, "
        f"other {counts['other']}, dead {counts['dead']}"
    )
    return _save(fig, path)


def plot_nu_scatter(
    diff: LatentDiff,
    path: str | Path,
    latents: torch.Tensor | None = None,
    groups: dict[str, torch.Tensor] | None = None,
    title: str | None = None,
    limit: float = 1.5,
) -> Path:
    """ν^ε against ν^r of the B-only latents (or `latents`, or named `groups` of them), clipped to [-0.5, limit].

    Genuine B-only latents sit in the corner below GENUINE_NU on both axes; complete shrinkage
    pushes ν^ε up, latent decoupling ν^r.
    """
    plt = _pyplot()
    if groups is None:
        groups = {"B-only latents": diff.indices("b_only") if latents is None else latents}
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    nu_eps, nu_r = diff.nu_eps, diff.nu_r
    for colour, (label, idx) in enumerate(groups.items()):
        idx = torch.as_tensor(idx, dtype=torch.long)
        x = nu_eps[idx].clamp(-0.5, limit).numpy()
        y = nu_r[idx].clamp(-0.5, limit).numpy()
        ax.scatter(x, y, s=14, alpha=0.8, color=f"C{colour}", label=f"{label} ({len(idx)})")
    ax.axvline(GENUINE_NU, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(GENUINE_NU, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.5, limit)
    ax.set_ylim(-0.5, limit)
    ax.set_xlabel("ν^ε  (complete shrinkage)")
    ax.set_ylabel("ν^r  (latent decoupling)")
    ax.set_title(title or "Latent Scaling", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write the figure (creating its folder) and free it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
