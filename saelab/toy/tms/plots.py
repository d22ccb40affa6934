"""The experiments' figures: paper-style panels of W, the phase diagram and dimensionality plots.

matplotlib is imported only when a figure is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import torch

from saelab.toy.tms.geometry import (
    PHASES,
    REPRESENTED_NORM,
    STICKY_FRACTIONS,
    feature_norms,
    polygon_angles,
    superposition_interference,
)

PHASE_COLOURS = ("#d9d9d9", "#3b6ea5", "#e07b39")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _best_instance(losses: torch.Tensor, instances: list[int]) -> int:
    return min(instances, key=lambda i: float(losses[i]))


# ----------------------------------------------------------------------------- 1. sparsity sweep


def _shown_columns(count: int, most: int = 5) -> list[int]:
    """Up to `most` indices spread evenly from first to last."""
    most = min(most, count)
    return sorted({round(i * (count - 1) / max(1, most - 1)) for i in range(most)})


def plot_sweep(W, losses, densities, seeds, summaries, n, name):
    """Paper-style panels for a few densities (the lowest-loss seed) plus a summary over all of them."""
    plt = _pyplot()
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    shown = _shown_columns(len(densities))
    polygon = W.shape[1] == 2
    rows = 3 + polygon
    fig = plt.figure(figsize=(3.1 * len(shown) + 1.2, 2.9 * rows + 0.6))
    grid = fig.add_gridspec(rows, len(shown) + 1, width_ratios=[1] * len(shown) + [0.08])
    sharing = LinearSegmentedColormap.from_list("superposition", ["black", "gold"])
    norm = Normalize(0.0, 1.0, clip=True)
    for col, k in enumerate(shown):
        best = _best_instance(losses, list(range(k * seeds, (k + 1) * seeds)))
        Wk = W[best]
        heat = fig.add_subplot(grid[0, col])
        image = heat.imshow((Wk.T @ Wk).numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0)
        heat.set_title(f"1-S = {densities[k]:g}\nW$^T$W (lowest-loss seed)", fontsize=10)
        heat.set_xlabel("feature j")
        heat.set_ylabel("feature i")
        bars = fig.add_subplot(grid[1, col])
        colours = sharing(norm(superposition_interference(Wk).numpy()))
        bars.barh(range(n), feature_norms(Wk).numpy(), color=colours)
        bars.invert_yaxis()
        bars.axvline(REPRESENTED_NORM, color="grey", lw=0.8, ls="--")
        bars.set_xlabel("||W$_i$||")
        bars.set_ylabel("feature i (importance 0.9$^i$)")
        bars.set_title(f"{summaries[k]['best_n_represented']} of {n} represented", fontsize=10)
        if polygon:
            _plot_polygon(fig.add_subplot(grid[2, col]), Wk)
    fig.colorbar(image, cax=fig.add_subplot(grid[0, -1]), label="W$^T$W entry")
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=sharing),
        cax=fig.add_subplot(grid[1, -1]),
        label="$\\sum_{j\\neq i} (\\hat W_i \\cdot W_j)^2$",
    )
    _plot_sweep_summary(fig.add_subplot(grid[rows - 1, :-1]), densities, summaries, n)
    fig.suptitle(f"{name}: superposition as features get sparser ({seeds} seeds per density)", fontsize=12)
    fig.tight_layout()
    return fig


def _plot_polygon(ax, W) -> None:
    """The columns W_i as arrows in the 2-D hidden space: the paper's polygons."""
    import matplotlib.pyplot as plt

    n = W.shape[1]
    colours = plt.cm.viridis(torch.linspace(0, 0.9, n).numpy())
    for i in range(n):
        x, y = float(W[0, i]), float(W[1, i])
        ax.plot([0, x], [0, y], color=colours[i], lw=1.5)
        ax.scatter([x], [y], color=colours[i], s=18, zorder=3)
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    gaps = polygon_angles(W)
    label = ", ".join(f"{g:.0f}" for g in gaps.tolist()) if len(gaps) else "-"
    ax.set_title(f"columns W$_i$; gaps (deg): {label}", fontsize=9)
    ax.set_aspect("equal")
    lim = max(1.2, float(feature_norms(W).max()) * 1.15)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.axhline(0, color="lightgrey", lw=0.6)
    ax.axvline(0, color="lightgrey", lw=0.6)
    ax.set_xlabel("hidden dim 0")
    ax.set_ylabel("hidden dim 1")


def _plot_sweep_summary(ax, densities, summaries, n) -> None:
    """Features represented per instance against density, with the count that reach all n."""
    for d, s in zip(densities, summaries, strict=True):
        counts = torch.tensor(s["n_represented"], dtype=torch.float32)
        jitter = 1.0 + 0.06 * (torch.arange(len(counts)) - (len(counts) - 1) / 2) / max(1, len(counts))
        ax.scatter((d * jitter).numpy(), counts.numpy(), s=14, color="#3b6ea5", alpha=0.7)
        ax.annotate(
            f"{s['n_all_represented']}/{s['n_instances']}", (d, 1.08 * n + 0.2), ha="center", fontsize=8
        )
    means = [sum(s["n_represented"]) / s["n_instances"] for s in summaries]
    ax.plot(densities, means, color="black", lw=1, label="mean over seeds")
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_ylim(0, 1.18 * n + 0.5)
    ax.set_xlabel("feature density 1-S (log; sparser to the right); numbers: instances with all features")
    ax.set_ylabel("features represented")
    ax.legend(loc="lower right", fontsize=8)


# ----------------------------------------------------------------------------- 2. phase diagram


def _log_edges(values: list[float]) -> list[float]:
    """Cell edges for pcolormesh on a log axis: geometric midpoints, extended at both ends."""
    logs = torch.tensor(values, dtype=torch.float64).log()
    mids = (logs[1:] + logs[:-1]) / 2
    first, last = logs[:1] - (mids[:1] - logs[:1]), logs[-1:] + (logs[-1:] - mids[-1:])
    if len(values) == 1:
        first, last = logs - 0.5, logs + 0.5
    return torch.cat([first, mids, last]).exp().tolist()


def plot_phases(grid: list[list[dict]], ratios, densities, seeds):
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = ListedColormap(PHASE_COLOURS)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    for ax, key, title in (
        (axes[0], "phase", f"lowest-loss phase of {seeds} seeds"),
        (axes[1], "majority", f"majority vote of {seeds} seeds (text: agreement)"),
    ):
        codes = torch.tensor([[PHASES.index(cell[key]) for cell in row] for row in grid])
        ax.pcolormesh(
            _log_edges(ratios), _log_edges(densities), codes.numpy(), cmap=colours, vmin=-0.5, vmax=2.5
        )
        if key == "majority":
            for row in grid:
                for cell in row:
                    ax.text(
                        cell["relative_importance"],
                        cell["density"],
                        f"{cell['agreement']:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("relative importance of the extra feature (log)")
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("feature density 1-S (log; sparser downwards)")
    handles = [Patch(color=c, label=p) for c, p in zip(PHASE_COLOURS, PHASES, strict=True)]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9)
    fig.suptitle("One extra feature: n=2 features, m=1 hidden dimension", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


# ----------------------------------------------------------------------------- 3. feature dimensionality


def plot_dimensionality(inverse, per_density, dims, mask, n, m):
    """Left: dims per feature and every D_i against 1/(1-S); right: the histogram of represented D_i."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12, 5.5), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    for k, v in enumerate(inverse):
        jitter = torch.exp(0.04 * torch.randn(n, generator=torch.Generator().manual_seed(k)))
        xs = (v * jitter).numpy()
        ax.scatter(xs[~mask[k]], dims[k][~mask[k]].numpy(), s=4, color="lightgrey", alpha=0.6)
        ax.scatter(xs[mask[k]], dims[k][mask[k]].numpy(), s=5, color="#3b6ea5", alpha=0.5)
    ax.plot(
        inverse,
        [p["dims_per_feature"] for p in per_density],
        color="black",
        lw=2,
        label="dims per feature m/||W||$_F^2$",
    )
    ax.scatter([], [], s=10, color="#3b6ea5", label="D$_i$, represented (||W$_i$|| > 0.5)")
    ax.scatter([], [], s=10, color="lightgrey", label="D$_i$, not represented")
    represented_dims = dims[mask].numpy()
    hist.hist(represented_dims, bins=100, range=(0, 1.02), orientation="horizontal", color="#3b6ea5")
    hist.set_xscale("log")
    for label, value in STICKY_FRACTIONS.items():
        for axis in (ax, hist):
            axis.axhline(value, color="#e07b39", lw=0.8, ls="--")
        hist.annotate(
            label,
            (1.0, value),
            xycoords=("axes fraction", "data"),
            xytext=(3, -3),
            textcoords="offset points",
            fontsize=8,
            color="#e07b39",
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("1/(1-S) (log): inverse feature density")
    ax.set_ylabel("dimensions per feature / feature dimensionality D$_i$")
    ax.set_title(f"n={n} features, m={m} hidden dimensions, uniform importance", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    hist.set_xlabel("represented features, all densities (log)")
    hist.set_title("histogram of D$_i$", fontsize=10)
    fig.tight_layout()
    return fig
