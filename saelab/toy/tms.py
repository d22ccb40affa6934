"""Toy Models of Superposition (Elhage et al. 2022), reproduced on a CPU in minutes.

The model: x_i = 0 with probability S, else U[0, 1]; h = W x; x' = ReLU(W^T W x + b); the loss is
sum_i I_i (x_i - x'_i)^2, summed over features and averaged over the batch. Many instances (each with
its own feature density, importance and initial weights) train at once as one batched model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from saelab.core.fileio import atomic_write_json, save_figure
from saelab.errors import ToyConfigError

LR_SCHEDULES = ("constant", "cosine")
# ||W_i|| above this: the feature is represented. Trained norms are bimodal (~1 kept, ~0 dropped).
REPRESENTED_NORM = 0.5
# Interference with the other represented features, sum_{j != i, j represented} (W_hat_i . W_j)^2, above
# this: feature i shares its dimensions. Orthogonal features score ~0, an antipodal partner of norm ~1
# ~1, a pentagon ~1.5; trained runs leave a wide empty gap around 0.1 (each sweep reports its own).
SUPERPOSITION_INTERFERENCE = 0.1
# The feature dimensionalities the paper marks as "sticky": a dedicated dimension (1), tetrahedron (3/4),
# triangle (2/3), antipodal pair (1/2), pentagon (2/5), square antiprism (3/8), and 1/3.
STICKY_FRACTIONS = {
    "1": 1.0,
    "3/4": 3 / 4,
    "2/3": 2 / 3,
    "1/2": 1 / 2,
    "2/5": 2 / 5,
    "3/8": 3 / 8,
    "1/3": 1 / 3,
}


@dataclass
class TMSConfig:
    """One batched training run: one instance per entry of `feature_probabilities` (1 - S)."""

    n_features: int = 5
    n_hidden: int = 2
    importance_decay: float = 0.9  # I_i = decay**i; 1.0 = uniform importance
    feature_probabilities: list[float] = field(default_factory=lambda: [1.0])
    steps: int = 10_000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": decays to 0 over the run (the experiments use it)
    # torch.optim.AdamW's default, as in the paper's colab; it pulls unused weights towards zero.
    weight_decay: float = 0.01
    seed: int = 0
    importance: list[float] | None = None  # one importance per feature, shared by all instances
    importances: list[list[float]] | None = None  # [instances][features]; wins over `importance`

    @property
    def n_instances(self) -> int:
        return len(self.feature_probabilities)

    def validate(self) -> None:
        if not self.feature_probabilities or not all(0.0 < p <= 1.0 for p in self.feature_probabilities):
            raise ToyConfigError(
                f"feature_probabilities must be a non-empty list of values in (0, 1] (one per instance), "
                f"got {self.feature_probabilities}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ToyConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if min(self.n_features, self.n_hidden, self.steps, self.batch_size) < 1:
            raise ToyConfigError("n_features, n_hidden, steps and batch_size must all be at least 1")
        self.importance_matrix()

    def importance_matrix(self) -> torch.Tensor:
        """[instances, features] importance, from the most specific field that is set."""
        if self.importances is not None:
            table = torch.tensor(self.importances, dtype=torch.float32)
        elif self.importance is not None:
            table = torch.tensor(self.importance, dtype=torch.float32).expand(self.n_instances, -1)
        else:
            row = self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32)
            table = row.expand(self.n_instances, -1)
        if table.shape != (self.n_instances, self.n_features):
            raise ToyConfigError(
                f"importance has shape {tuple(table.shape)}, expected ({self.n_instances} instances, "
                f"{self.n_features} features): give `importance` one value per feature or `importances` "
                "one row per instance"
            )
        return table.contiguous()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ToyModel(nn.Module):
    """Many independent toy models in one: x is [instances, batch, features] (instance-major for bmm)."""

    def __init__(self, n_instances: int, n_features: int, n_hidden: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # Xavier-normal per instance (std sqrt(2 / (n + m))), drawn instance by instance from one seed.
        std = math.sqrt(2.0 / (n_features + n_hidden))
        self.W = nn.Parameter(torch.randn(n_instances, n_hidden, n_features, generator=generator) * std)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h = W x: [instances, batch, features] -> [instances, batch, hidden]."""
        return torch.bmm(x, self.W.transpose(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x' = ReLU(W^T W x + b), same shape as x."""
        return torch.relu(torch.baddbmm(self.b.unsqueeze(1), self.hidden(x), self.W))


def sample_features(
    batch: int,
    probabilities: torch.Tensor | list[float],
    n: int,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """[instances, batch, n]: each x_i is U[0, 1] with probability p (its instance's), else 0.

    One uniform draw u serves both: u < p happens with probability p, and 1 - u / p is then U(0, 1],
    so x = max(1 - u / p, 0) (no boolean masks: they cost more than the draw on a CPU).
    """
    p = torch.as_tensor(probabilities, dtype=torch.float32).reshape(-1, 1, 1)
    u = torch.rand(p.shape[0], batch, n, generator=generator, out=out)
    return u.mul_(-1.0 / p).add_(1.0).clamp_min_(0.0)


def reconstruction_loss(model: ToyModel, x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-instance loss [instances]: importance-weighted squared error, summed over features."""
    err = (model(x) - x).square() * importance.unsqueeze(1)
    return err.sum(-1).mean(-1)


def _set_loss_gradients(
    model: ToyModel, x: torch.Tensor, importance: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Write d(sum of per-instance losses)/d(W, b) into .grad in closed form.

    Autograd gives the same numbers (tests check it) but makes more passes over the [instances, batch,
    features] tensors, which dominate the cost of these tiny models: a step with sampling took 1.3-1.8x
    as long with autograd here (n=5 with 72 instances, n=400 with 4).
    """
    W, b = model.W.detach(), model.b.detach()
    h = torch.bmm(x, W.transpose(1, 2))
    out, passes = scratch
    torch.baddbmm(b.unsqueeze(1), h, W, out=out)
    # dLoss/dpre = c * (pre - x) where pre > 0 (ReLU passes), with c = 2 I / batch per feature;
    # relu(pre) - x * sign(relu(pre)) is that without a boolean mask (torch.where is ~5x slower).
    out.clamp_min_(0.0)
    resid = out.addcmul_(x, torch.sign(out, out=passes), value=-1.0)
    c = importance * (2.0 / x.shape[1])
    grad_h = torch.bmm(resid, (W * c.unsqueeze(1)).transpose(1, 2))
    grad_W = torch.bmm(h.transpose(1, 2), resid) * c.unsqueeze(1) + torch.bmm(grad_h.transpose(1, 2), x)
    model.W.grad = grad_W
    model.b.grad = resid.sum(1) * c


def _lr_factor(schedule: str, step: int, steps: int) -> float:
    return 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / steps))


def train_toy_model(cfg: TMSConfig, progress: bool = False) -> ToyModel:
    """AdamW (weight decay cfg.weight_decay, the colab's default) on fresh samples every step.

    Weights come from cfg.seed and batches from a second generator derived from it, so a config
    always trains to the identical model (on the same machine and thread count).
    """
    cfg.validate()
    importance = cfg.importance_matrix()
    model = ToyModel(cfg.n_instances, cfg.n_features, cfg.n_hidden, seed=cfg.seed)
    probabilities = torch.tensor(cfg.feature_probabilities, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(cfg.lr_schedule, s, cfg.steps)
    )
    data_generator = torch.Generator().manual_seed(_data_seed(cfg.seed))
    # Buffers reused every step: fresh multi-MB tensors would each cost page faults on allocation.
    x = torch.empty(cfg.n_instances, cfg.batch_size, cfg.n_features)
    scratch = (torch.empty_like(x), torch.empty_like(x))
    for _ in tqdm(range(cfg.steps), desc="toy models", unit="step", disable=not progress, leave=False):
        sample_features(cfg.batch_size, probabilities, cfg.n_features, data_generator, out=x)
        _set_loss_gradients(model, x, importance, scratch)
        optimizer.step()
        schedule.step()
    return model


def _data_seed(seed: int) -> int:
    """A stream for batches that never coincides with another seed's weight stream."""
    return (seed + 1) * 1_000_003


@torch.no_grad()
def instance_losses(model: ToyModel, cfg: TMSConfig, n_samples: int = 8192, seed: int = 0) -> torch.Tensor:
    """Per-instance loss [instances] on fresh held-out samples, in chunks to bound memory."""
    probabilities = torch.tensor(cfg.feature_probabilities, dtype=torch.float32)
    importance = cfg.importance_matrix()
    generator = torch.Generator().manual_seed(_data_seed(seed) + 17)
    chunk = min(n_samples, cfg.batch_size)
    total = torch.zeros(cfg.n_instances)
    for _ in range(max(1, n_samples // chunk)):
        x = sample_features(chunk, probabilities, cfg.n_features, generator)
        total += reconstruction_loss(model, x, importance)
    return total / max(1, n_samples // chunk)


# ----------------------------------------------------------------------------- analysis of W [.., m, n]


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """||W_i|| for each feature (column): [..., m, n] -> [..., n]."""
    return W.norm(dim=-2)


def _overlaps(W: torch.Tensor) -> torch.Tensor:
    """[..., n, n] with entry (i, j) = W_hat_i . W_j."""
    W_hat = W / feature_norms(W).clamp_min(1e-12).unsqueeze(-2)
    return W_hat.transpose(-1, -2) @ W


def superposition_interference(W: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
    """sum_{j != i} (W_hat_i . W_j)^2: how much of feature i's direction other features also use.

    `among` (bool [..., n]) keeps only those j, e.g. the represented features: leftover weights of
    dropped features then no longer count as sharing.
    """
    squared = _overlaps(W).square()
    others = 1.0 - torch.eye(W.shape[-1], dtype=W.dtype)
    if among is not None:
        others = others * among.unsqueeze(-2).to(W.dtype)
    return (squared * others).sum(-1)


def feature_dimensionality(W: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """D_i = ||W_i||^2 / sum_j (W_hat_i . W_j)^2: the share of a dimension feature i gets (0 if W_i ~ 0).

    1 = a dedicated dimension, 1/2 = an antipodal pair, 2/5 = a pentagon, 2/3 = a triangle.
    """
    norms = feature_norms(W)
    dims = norms.square() / _overlaps(W).square().sum(-1).clamp_min(1e-30)
    return torch.where(norms > eps, dims, torch.zeros_like(dims))


def represented(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """Bool [..., n]: ||W_i|| > threshold."""
    return feature_norms(W) > threshold


def polygon_angles(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """Angular gaps (degrees, sorted) between angularly adjacent represented features of one 2-D W [2, n].

    A regular k-gon gives k gaps of 360/k; two orthogonal features give [90, 270]; fewer than two
    represented features give an empty tensor.
    """
    if W.dim() != 2 or W.shape[0] != 2:
        raise ValueError(
            f"polygon_angles needs one instance with 2 hidden dimensions, got W {tuple(W.shape)}"
        )
    columns = W[:, represented(W, threshold)].double()
    if columns.shape[1] < 2:
        return torch.zeros(0, dtype=torch.float64)
    angles = torch.rad2deg(torch.atan2(columns[1], columns[0])).sort().values
    gaps = torch.diff(torch.cat([angles, angles[:1] + 360.0]))
    return gaps.sort().values


# ----------------------------------------------------------------------------- shared experiment helpers


def _rounded(values, digits: int = 4):
    """Plain (nested) lists of rounded floats for JSON."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, list):
        return [_rounded(v, digits) for v in values]
    return round(float(values), digits)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_result(out_dir: str | Path, name: str, result: dict, fig, start: float) -> dict:
    """Save `<name>.png` and `<name>.json`; the wall time covers training, analysis and the figure."""
    out_dir = Path(out_dir)
    save_figure(fig, out_dir / f"{name}.png")
    result["wall_seconds"] = round(time.perf_counter() - start, 2)
    result["files"] = {"json": str(out_dir / f"{name}.json"), "png": str(out_dir / f"{name}.png")}
    atomic_write_json(out_dir / f"{name}.json", result)
    return result


def _best_instance(losses: torch.Tensor, instances: list[int]) -> int:
    return min(instances, key=lambda i: float(losses[i]))


# ----------------------------------------------------------------------------- 1. sparsity sweep

SWEEP_DENSITIES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.01)
QUICK_SWEEP_DENSITIES = (1.0, 0.3, 0.1, 0.03, 0.01)
# The experiments train at 10x the paper's lr with a cosine decay: 3k steps then reach lower losses than
# 10k constant-lr steps at 1e-3 (measured on n=5, m=2), which keeps the full run within minutes on a CPU.
EXPERIMENT_LR = 1e-2


def _sweep_defaults(n: int, quick: bool) -> tuple[int, int]:
    """(instances per density, steps): the cost grows with n, so wider models get fewer seeds."""
    small = n <= 5
    if quick:
        return (4, 1500) if small else (2, 1000)
    return (8, 3000) if small else (4, 3000)


def _max_abs_cosine(W: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |cos| between two distinct represented features (0 when fewer than two)."""
    cols = W[:, mask]
    if cols.shape[1] < 2:
        return 0.0
    unit = cols / cols.norm(dim=0, keepdim=True)
    cos = (unit.T @ unit).abs() - torch.eye(cols.shape[1])
    return float(cos.max())


def _describe_instance(W: torch.Tensor, b: torch.Tensor, loss: float) -> dict:
    """Everything the sweep reports about one trained instance W [m, n]."""
    mask = represented(W)
    among_represented = superposition_interference(W, among=mask)
    sharing = mask & (among_represented > SUPERPOSITION_INTERFERENCE)
    info = {
        "loss": round(loss, 6),
        "n_represented": int(mask.sum()),
        "represented": mask.nonzero().flatten().tolist(),
        "n_superposition": int(sharing.sum()),
        "superposition": sharing.nonzero().flatten().tolist(),
        "max_abs_cos_represented": round(_max_abs_cosine(W, mask), 4),
        "norms": _rounded(feature_norms(W)),
        "interference": _rounded(superposition_interference(W)),
        "interference_among_represented": _rounded(among_represented),
        "dimensionality": _rounded(feature_dimensionality(W)),
        "bias": _rounded(b),
        "W": _rounded(W),
    }
    if W.shape[0] == 2:
        gaps = polygon_angles(W)
        info["angles"] = _rounded(gaps, 2)
        info["polygon_deviation_deg"] = (
            round(float((gaps - 360.0 / len(gaps)).abs().max()), 2) if len(gaps) else None
        )
    return info


def _density_summary(density: float, instances: list[dict], n: int) -> dict:
    counts = [inst["n_represented"] for inst in instances]
    sets: dict[str, int] = {}
    for inst in instances:
        key = ",".join(map(str, inst["represented"])) or "none"
        sets[key] = sets.get(key, 0) + 1
    best = min(range(len(instances)), key=lambda k: instances[k]["loss"])
    summary = {
        "density": density,
        "sparsity": round(1.0 - density, 6),
        "n_represented": counts,
        "n_superposition": [inst["n_superposition"] for inst in instances],
        "n_all_represented": sum(c == n for c in counts),
        "n_instances": len(instances),
        "represented_sets": sets,
        "best_seed": best,
        "best_n_represented": counts[best],
    }
    if "angles" in instances[0]:
        summary["best_angles"] = instances[best]["angles"]
    return summary


def _sweep_checks(summaries: list[dict], instances: list[list[dict]], n: int, m: int) -> dict:
    """The acceptance numbers: dense -> exactly the m most important features, orthogonal; sparse -> most."""
    dense = [
        inst for s, group in zip(summaries, instances, strict=True) if s["density"] == 1.0 for inst in group
    ]
    sparse = [
        inst for s, group in zip(summaries, instances, strict=True) if s["density"] <= 0.1 for inst in group
    ]
    first_m = list(range(m))
    checks = {
        "dense_instances": len(dense),
        "dense_exactly_first_m": sum(inst["represented"] == first_m for inst in dense),
        "dense_max_abs_cos": max((inst["max_abs_cos_represented"] for inst in dense), default=None),
        "sparse_means": "1-S <= 0.1",
        "sparse_instances": len(sparse),
        "sparse_at_least_n_minus_1": sum(inst["n_represented"] >= n - 1 for inst in sparse),
        "sparse_all_n": sum(inst["n_represented"] == n for inst in sparse),
    }
    if m == 2:
        deviations = [inst["polygon_deviation_deg"] for inst in sparse if inst["n_represented"] >= n - 1]
        checks["sparse_max_polygon_deviation_deg"] = max(deviations, default=None)
    return checks


def _interference_gap(instances: list[list[dict]]) -> dict:
    """Interference values of represented features either side of the threshold: evidence it is a gap."""
    values = [
        v
        for group in instances
        for inst in group
        for i, v in enumerate(inst["interference_among_represented"])
        if inst["norms"][i] > REPRESENTED_NORM
    ]
    below = [v for v in values if v <= SUPERPOSITION_INTERFERENCE]
    above = [v for v in values if v > SUPERPOSITION_INTERFERENCE]
    return {
        "threshold": SUPERPOSITION_INTERFERENCE,
        "largest_below": max(below, default=None),
        "smallest_above": min(above, default=None),
        "n_below": len(below),
        "n_above": len(above),
    }


def _experiment_config(
    n: int, m: int, probabilities: list[float], steps: int, seed: int, **extra
) -> TMSConfig:
    """The experiments' shared recipe: lr 1e-2 with cosine decay (as good as the paper's 10k steps)."""
    return TMSConfig(
        n_features=n,
        n_hidden=m,
        feature_probabilities=probabilities,
        steps=steps,
        lr=EXPERIMENT_LR,
        lr_schedule="cosine",
        seed=seed,
        **extra,
    )


def sparsity_sweep(
    out_dir: str | Path,
    n: int = 5,
    m: int = 2,
    densities: list[float] | None = None,
    seeds: int | None = None,
    steps: int | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    name: str | None = None,
) -> dict:
    """The paper's first result: as features get sparser, more of them fit into m dimensions.

    Every (density, seed) pair is one instance of one batched model; importance 0.9**i. `seeds` is the
    number of differently initialised instances per density.
    """
    name = name or f"superposition_n{n}_m{m}"
    default_seeds, default_steps = _sweep_defaults(n, quick)
    densities = list(densities or (QUICK_SWEEP_DENSITIES if quick else SWEEP_DENSITIES))
    seeds, steps = seeds or default_seeds, steps or default_steps
    cfg = _experiment_config(n, m, [d for d in densities for _ in range(seeds)], steps, seed)
    start = time.perf_counter()
    model = train_toy_model(cfg, progress=progress)
    losses = instance_losses(model, cfg, seed=seed)
    W, b = model.W.detach(), model.b.detach()
    instances = [
        [
            _describe_instance(W[k * seeds + s], b[k * seeds + s], float(losses[k * seeds + s]))
            for s in range(seeds)
        ]
        for k in range(len(densities))
    ]
    summaries = [_density_summary(d, group, n) for d, group in zip(densities, instances, strict=True)]
    result = {
        "name": name,
        "config": cfg.to_dict() | {"instances_per_density": seeds, "densities": densities},
        "thresholds": {
            "represented_norm": REPRESENTED_NORM,
            "superposition_interference": SUPERPOSITION_INTERFERENCE,
        },
        "interference_gap": _interference_gap(instances),
        "checks": _sweep_checks(summaries, instances, n, m),
        "per_density": summaries,
        "instances": instances,
    }
    fig = _plot_sweep(W, losses, densities, seeds, summaries, n, name)
    return _write_result(out_dir, name, result, fig, start)


def _shown_columns(count: int, most: int = 5) -> list[int]:
    """Up to `most` indices spread evenly from first to last."""
    most = min(most, count)
    return sorted({round(i * (count - 1) / max(1, most - 1)) for i in range(most)})


def _plot_sweep(W, losses, densities, seeds, summaries, n, name):
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

PHASES = ("not represented", "dedicated dimension", "superposition")
PHASE_COLOURS = ("#d9d9d9", "#3b6ea5", "#e07b39")


def classify_extra_feature(W: torch.Tensor, threshold: float = REPRESENTED_NORM) -> torch.Tensor:
    """Phase index per instance of W [instances, 1, 2]: 0 extra feature (1) not represented, 1 it has the
    dimension to itself (feature 0 dropped), 2 both represented (then necessarily antipodal in 1-D)."""
    mask = represented(W, threshold)
    extra, first = mask[:, 1], mask[:, 0]
    return torch.where(~extra, 0, torch.where(first, 2, 1))


def _phase_defaults(quick: bool) -> tuple[list[float], list[float], int, int]:
    """(relative importances, densities, seeds per cell, steps)."""
    if quick:
        return torch.logspace(-1, 1, 5).tolist(), [1.0, 0.1, 0.03, 0.01], 4, 1500
    return torch.logspace(-1, 1, 9).tolist(), torch.logspace(0, -2, 9).tolist(), 10, 1500


def _cell_summary(density: float, ratio: float, phases: list[int], losses: list[float]) -> dict:
    """Lowest-loss phase (the optimum the seeds found), majority phase, and how far the seeds agree."""
    counts = [phases.count(p) for p in range(len(PHASES))]
    best = phases[min(range(len(phases)), key=lambda k: losses[k])]
    top = max(counts)
    majority = best if counts[best] == top else counts.index(top)  # ties go to the lowest-loss phase
    return {
        "density": round(density, 6),
        "relative_importance": round(ratio, 6),
        "phase": PHASES[best],
        "majority": PHASES[majority],
        "agreement": round(top / len(phases), 3),
        "seeds_in_lowest_loss_phase": counts[best],
        "counts": dict(zip(PHASES, counts, strict=True)),
        "losses": _rounded(losses, 6),
    }


def phase_diagram(
    out_dir: str | Path,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    ratios: list[float] | None = None,
    densities: list[float] | None = None,
    seeds: int | None = None,
    steps: int | None = None,
) -> dict:
    """The paper's "one extra feature" phase diagram: n=2 features, m=1 hidden dimension.

    Feature 0 has importance 1, feature 1 relative importance r; both have density 1-S. Each cell
    trains `seeds` instances. Two features in one dimension have local minima (a feature whose weight
    starts on the wrong side of zero can stay unrepresented), so the cell's phase is the lowest-loss
    seed's, the best solution found; the majority vote and agreement are reported beside it.
    Batches of 256 (not 1024) suffice for two features and make the 81-cell grid 4x cheaper.
    """
    default_ratios, default_densities, default_seeds, default_steps = _phase_defaults(quick)
    ratios, densities = list(ratios or default_ratios), list(densities or default_densities)
    seeds, steps = seeds or default_seeds, steps or default_steps
    cells = [(d, r) for d in densities for r in ratios]
    cfg = TMSConfig(
        n_features=2,
        n_hidden=1,
        feature_probabilities=[d for d, _ in cells for _ in range(seeds)],
        importances=[[1.0, r] for _, r in cells for _ in range(seeds)],
        steps=steps,
        batch_size=256,
        lr=EXPERIMENT_LR,
        lr_schedule="cosine",
        seed=seed,
    )
    start = time.perf_counter()
    model = train_toy_model(cfg, progress=progress)
    losses = instance_losses(model, cfg, n_samples=32768, seed=seed).reshape(len(cells), seeds).tolist()
    phases = classify_extra_feature(model.W.detach()).reshape(len(cells), seeds).tolist()
    summaries = [_cell_summary(d, r, p, loss) for (d, r), p, loss in zip(cells, phases, losses, strict=True)]
    grid = [summaries[i * len(ratios) : (i + 1) * len(ratios)] for i in range(len(densities))]
    result = {
        "name": "phase_diagram",
        "config": cfg.to_dict()
        | {"seeds_per_cell": seeds, "relative_importances": ratios, "densities": densities},
        "phases": list(PHASES),
        "phase_rule": "not represented: ||W_1|| <= 0.5; dedicated: ||W_1|| > 0.5 and ||W_0|| <= 0.5; "
        "superposition: both > 0.5",
        "mean_agreement": round(sum(s["agreement"] for s in summaries) / len(summaries), 3),
        "cells_where_majority_differs": sum(s["phase"] != s["majority"] for s in summaries),
        "grid": grid,
    }
    fig = _plot_phases(grid, ratios, densities, seeds)
    return _write_result(out_dir, "phase_diagram", result, fig, start)


def _log_edges(values: list[float]) -> list[float]:
    """Cell edges for pcolormesh on a log axis: geometric midpoints, extended at both ends."""
    logs = torch.tensor(values, dtype=torch.float64).log()
    mids = (logs[1:] + logs[:-1]) / 2
    first, last = logs[:1] - (mids[:1] - logs[:1]), logs[-1:] + (logs[-1:] - mids[-1:])
    if len(values) == 1:
        first, last = logs - 0.5, logs + 0.5
    return torch.cat([first, mids, last]).exp().tolist()


def _plot_phases(grid: list[list[dict]], ratios, densities, seeds):
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

# 1/(1-S): dense sampling over 1..10, where the model moves through its sticky geometries at n=400,
# m=30 (measured), then a few points out to 1000, where every feature is represented.
DIMENSIONALITY_INVERSE_DENSITIES = (
    1,
    1.26,
    1.58,
    2,
    2.51,
    3.16,
    3.98,
    5.01,
    6.31,
    7.94,
    10,
    20,
    50,
    200,
    1000,
)
QUICK_DIMENSIONALITY_INVERSE_DENSITIES = (1, 2.5, 4, 6, 10, 100)


def _dimensionality_defaults(n: int, m: int, quick: bool) -> tuple[int, int, list[float], int]:
    """(n, m, inverse densities, steps); quick shrinks the model 4x each way."""
    if quick:
        return max(2, n // 4), max(1, m // 4), list(QUICK_DIMENSIONALITY_INVERSE_DENSITIES), 600
    return n, m, list(DIMENSIONALITY_INVERSE_DENSITIES), 1000


def _near_sticky(values: torch.Tensor, tolerance: float) -> torch.Tensor:
    fractions = torch.tensor(list(STICKY_FRACTIONS.values()), dtype=values.dtype)
    return ((values.unsqueeze(-1) - fractions).abs() <= tolerance).any(-1)


def _chance_near_sticky(low: float, high: float, tolerance: float) -> float:
    """Share of [low, high] within `tolerance` of a sticky fraction: the hit rate of a uniform spread."""
    if high <= low:
        return float(_near_sticky(torch.tensor([low], dtype=torch.float64), tolerance))
    grid = torch.linspace(low, high, 100_001, dtype=torch.float64)
    return float(_near_sticky(grid, tolerance).double().mean())


def _clustering(dims: torch.Tensor, tolerance: float) -> dict:
    """How many represented features sit on a sticky fraction, against chance for a uniform spread."""
    if dims.numel() == 0:
        return {"tolerance": tolerance, "n_features": 0}
    near = _near_sticky(dims, tolerance)
    fractions = torch.tensor(list(STICKY_FRACTIONS.values()), dtype=dims.dtype)
    closest = (dims.unsqueeze(-1) - fractions).abs().argmin(-1)[near]
    nearest = {label: int((closest == k).sum()) for k, label in enumerate(STICKY_FRACTIONS)}
    return {
        "tolerance": tolerance,
        "n_features": int(dims.numel()),
        "fraction_near_sticky": round(float(near.double().mean()), 4),
        "chance_uniform_0_1": round(_chance_near_sticky(0.0, 1.0, tolerance), 4),
        "chance_uniform_observed_range": round(
            _chance_near_sticky(float(dims.min()), float(dims.max()), tolerance), 4
        ),
        "observed_range": [round(float(dims.min()), 4), round(float(dims.max()), 4)],
        "count_by_nearest_fraction": nearest,
    }


def _quantiles(values: torch.Tensor) -> dict | None:
    """10/25/50/75/90th percentiles: how tightly one model's represented D_i cluster."""
    if values.numel() == 0:
        return None
    levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=values.dtype)
    return dict(zip(("q10", "q25", "q50", "q75", "q90"), _rounded(values.quantile(levels)), strict=True))


def _median_iqr(per_density: list[dict]) -> float | None:
    spreads = [
        p["represented_quantiles"]["q75"] - p["represented_quantiles"]["q25"]
        for p in per_density
        if p["represented_quantiles"]
    ]
    return round(float(torch.tensor(spreads).median()), 4) if spreads else None


def dimensionality(
    out_dir: str | Path,
    n: int = 400,
    m: int = 30,
    quick: bool = False,
    seed: int = 0,
    progress: bool = False,
    inverse_densities: list[float] | None = None,
    steps: int | None = None,
) -> dict:
    """Dimensions per feature (m / ||W||_F^2) and every D_i against sparsity, uniform importance.

    The paper's finding: D_i clusters at the fractions of a few geometries (1, 3/4, 2/3, 1/2, 2/5,
    3/8, 1/3) and dims per feature lingers at 1/2 (antipodal pairs). 1000 steps (cosine lr) change
    dims per feature by < 1% against 2000 at n=400, m=30 (measured).
    """
    n, m, default_inverse, default_steps = _dimensionality_defaults(n, m, quick)
    inverse = list(inverse_densities or default_inverse)
    steps = steps or default_steps
    cfg = _experiment_config(n, m, [1.0 / v for v in inverse], steps, seed, importance_decay=1.0)
    start = time.perf_counter()
    model = train_toy_model(cfg, progress=progress)
    losses = instance_losses(model, cfg, n_samples=2048, seed=seed)
    W = model.W.detach()
    dims, mask = feature_dimensionality(W), represented(W)
    per_density = [
        {
            "inverse_density": v,
            "density": round(1.0 / v, 6),
            "dims_per_feature": round(m / float(W[k].square().sum()), 4),
            "n_represented": int(mask[k].sum()),
            "loss": round(float(losses[k]), 6),
            "clustering_0.05": _clustering(dims[k][mask[k]], 0.05),
            "represented_quantiles": _quantiles(dims[k][mask[k]]),
            "dimensionalities": _rounded(dims[k], 3),
            "norms": _rounded(feature_norms(W[k]), 3),
        }
        for k, v in enumerate(inverse)
    ]
    pooled = dims[mask]
    sticky_region = dims[mask & (torch.tensor(inverse) <= 10).unsqueeze(1)]
    result = {
        "name": "dimensionality",
        "config": cfg.to_dict() | {"inverse_densities": inverse},
        "sizes": {"n_features": n, "n_hidden": m, "steps": steps, "densities": len(inverse)},
        "sticky_fractions": STICKY_FRACTIONS,
        "clustering": {
            "all_represented_0.05": _clustering(pooled, 0.05),
            "all_represented_0.02": _clustering(pooled, 0.02),
            "represented_at_inverse_density_le_10_0.05": _clustering(sticky_region, 0.05),
            "represented_at_inverse_density_le_10_0.02": _clustering(sticky_region, 0.02),
        },
        "median_within_density_iqr": _median_iqr(per_density),
        "notes": [
            "D_i of represented features is tightly clustered within each density (see represented_quantiles "
            "and median_within_density_iqr) but, past the 1/2 plateau, mostly at values between or below the "
            "listed fractions, so fraction_near_sticky is compared with chance over the observed range.",
            "At the densest points uniform importance leaves the model symmetric: it spreads a rank-m "
            "projection over all n features (dims per feature ~1, every ||W_i|| ~ sqrt(m/n) < 0.5), so none "
            "counts as represented there within this many steps.",
        ],
        "per_density": per_density,
    }
    fig = _plot_dimensionality(inverse, per_density, dims, mask, n, m)
    return _write_result(out_dir, "dimensionality", result, fig, start)


def _plot_dimensionality(inverse, per_density, dims, mask, n, m):
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


# ----------------------------------------------------------------------------- everything


def run_all(out_dir: str | Path, quick: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """Every experiment above into out_dir: {name: result}."""
    return {
        "superposition_n5_m2": sparsity_sweep(out_dir, n=5, m=2, quick=quick, seed=seed, progress=progress),
        "superposition_n20_m5": sparsity_sweep(out_dir, n=20, m=5, quick=quick, seed=seed, progress=progress),
        "phase_diagram": phase_diagram(out_dir, quick=quick, seed=seed, progress=progress),
        "dimensionality": dimensionality(out_dir, quick=quick, seed=seed, progress=progress),
    }
