"""Linear probes at any hook point, and the check that ablating a direction removes what they read.

A probe is an L2-regularised logistic regression fitted by full-batch L-BFGS (float64, convex, so
the same data and seed give the same probe). Features are standardised with the training split's
mean and standard deviation before fitting, so the penalty treats every coordinate alike whatever
its scale (residual streams have a few huge coordinates); the fitted weights are then mapped back,
and `ProbeResult.direction` / `bias` live in the ORIGINAL activation space:
``decision(x) = scale * (x . direction) + bias``. That is the direction an ablation must remove:
after ``x <- x - (x . direction) direction`` the probe outputs the same logit for every input, so its
accuracy falls to the majority-class share (chance).

Ablating one direction removes linear separability only *along* it; other directions may still
carry the distinction, and "chance" for the original probe often means it now calls every input
one class. `ablation_check` therefore also retrains a fresh probe on the ablated activations (how
much separability is left), and reports the share of inputs the original probe calls class 1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.core.prompts import iter_prompt_activations
from saelab.errors import ActivationError, DataError, ProbeError
from saelab.interventions.hooks import Intervention, ablation, steer, unit

DEFAULT_L2 = 1e-2  # on standardised features, per sample: enough to keep separable data finite


@dataclass
class ProbeResult:
    """A trained binary probe: ``decision(x) = scale * (x . direction) + bias`` (logit of class 1)."""

    direction: (
        Tensor  # [d] unit vector in the original activation space, pointing to class 1 (0 if no signal)
    )
    scale: float  # norm of the original-space weight vector
    bias: float
    train_accuracy: float
    test_accuracy: float | None  # None when test_fraction was 0
    train_idx: Tensor  # rows of X used for fitting
    test_idx: Tensor  # held-out rows (stratified)
    mean: Tensor  # standardisation statistics of the training split [d]
    std: Tensor
    l2: float
    seed: int
    converged: bool
    hook: str | None = None

    @property
    def weight(self) -> Tensor:
        """The original-space weight vector, scale * direction."""
        return self.scale * self.direction

    def decision(self, X) -> Tensor:
        """Logits of class 1 [n] for activations X [n, d] (raw, not standardised)."""
        X = _as_matrix(X, self.direction.shape[0])
        return (X.double() @ self.direction.double() * self.scale + self.bias).float()

    def predict(self, X) -> Tensor:
        """Predicted labels (0 or 1) [n]."""
        return (self.decision(X) > 0).long()

    def accuracy(self, X, y) -> float:
        """Share of rows of X whose predicted label equals y."""
        y = _labels(y)
        X = _as_matrix(X, self.direction.shape[0])
        if X.shape[0] != y.shape[0]:
            raise ProbeError(
                f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; give one label per row."
            )
        return float((self.predict(X) == y).float().mean())

    def to_dict(self) -> dict:
        """A JSON summary (the direction as a list)."""
        return {
            "hook": self.hook,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "n_train": int(self.train_idx.numel()),
            "n_test": int(self.test_idx.numel()),
            "scale": self.scale,
            "bias": self.bias,
            "l2": self.l2,
            "seed": self.seed,
            "converged": self.converged,
            "direction": self.direction.tolist(),
        }


# ---- checks ------------------------------------------------------------------------------------
def _as_matrix(X, width: int | None = None) -> Tensor:
    X = torch.as_tensor(X).detach()
    if X.ndim != 2:
        raise ProbeError(f"X must be a matrix [n_samples, d], got shape {tuple(X.shape)}.")
    if width is not None and X.shape[1] != width:
        raise ProbeError(
            f"X has width {X.shape[1]} but the probe reads width {width}; use activations from its hook point."
        )
    if not X.is_floating_point():
        X = X.float()
    if not torch.isfinite(X).all():
        raise ActivationError(
            "X contains NaN or inf values; collect the activations in float32 and check that no prompt "
            "overflowed (or drop those rows)."
        )
    return X.cpu()


def _labels(y) -> Tensor:
    y = torch.as_tensor(y).detach().cpu()
    if y.ndim != 1:
        raise ProbeError(f"y must be one label per sample [n], got shape {tuple(y.shape)}.")
    if y.dtype == torch.bool:
        y = y.long()
    if y.numel() and not bool(((y == 0) | (y == 1)).all()):
        raise ProbeError(f"labels must be 0 or 1 (or booleans), got values {sorted(set(y.tolist()))[:5]}.")
    return y.long()


def _check_data(X, y, test_fraction: float, l2: float) -> tuple[Tensor, Tensor]:
    if not 0 <= test_fraction < 1:
        raise ProbeError(f"test_fraction must be in [0, 1), got {test_fraction}; 0.25 is usual.")
    if not l2 > 0:
        raise ProbeError(f"l2 must be positive (separable data would give infinite weights), got {l2}.")
    X, y = _as_matrix(X), _labels(y)
    if X.shape[0] != y.shape[0]:
        raise ProbeError(f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; give one label per row.")
    counts = [int((y == c).sum()) for c in (0, 1)]
    if min(counts) == 0:
        raise ProbeError(
            f"y holds only one class ({counts[0]} zeros, {counts[1]} ones); a probe needs examples of both."
        )
    need = 2 if test_fraction > 0 else 1
    if min(counts) < need:
        raise ProbeError(
            f"too few samples: {counts[0]} of class 0 and {counts[1]} of class 1, but a train/test split "
            f"needs at least {need} of each. Collect more prompts (tens per class) or use test_fraction=0."
        )
    return X, y


# ---- training ----------------------------------------------------------------------------------
def stratified_split(y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train_idx, test_idx), sorted, with each class split in the same proportion; seeded."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in (0, 1):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = 0 if test_fraction == 0 else min(max(round(idx.numel() * test_fraction), 1), idx.numel() - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _fit_logistic(Z: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, float, bool]:
    """Weights and bias minimising mean BCE + l2/2 |w|^2 on standardised Z (float64 L-BFGS)."""
    params = torch.zeros(Z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    target = y.double()
    opt = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def loss_fn() -> Tensor:
        logits = Z @ params[:-1] + params[-1]
        return F.binary_cross_entropy_with_logits(logits, target) + 0.5 * l2 * params[:-1].pow(2).sum()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        opt.zero_grad()
        loss_fn().backward()
    converged = bool(params.grad.abs().max() < 1e-6)
    return params[:-1].detach(), float(params[-1].detach()), converged


def train_probe(
    X,
    y,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    hook: str | None = None,
    max_iter: int = 500,
) -> ProbeResult:
    """Fit a logistic-regression probe on a stratified train split and score it on the rest.

    X: activations [n, d]; y: labels 0/1 [n]. Standardisation uses the training split only; a
    coordinate that is constant there gets unit scale (it carries nothing). See the module docstring
    for what `direction` means.
    """
    X, y = _check_data(X, y, test_fraction, l2)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    Xtr = X[train_idx].double()
    mean = Xtr.mean(0)
    std = Xtr.std(0, unbiased=False)
    std = torch.where(std > 1e-8 * float(std.max()), std, torch.ones_like(std))  # constant coords: scale 1
    w_std, b_std, converged = _fit_logistic((Xtr - mean) / std, y[train_idx], l2, max_iter)
    w = w_std / std  # back to the original space: w_std . (x - mean) / std = w . x - w . mean
    scale = float(w.norm())
    # Equal class means on the training split (e.g. after projecting out their difference) make w = 0
    # the exact optimum: no linear signal. That probe is a constant; its direction is the zero vector.
    probe = ProbeResult(
        direction=(w / scale if scale > 0 else w).float(),
        scale=scale,
        bias=b_std - float(w @ mean),
        train_accuracy=0.0,
        test_accuracy=None,
        train_idx=train_idx,
        test_idx=test_idx,
        mean=mean.float(),
        std=std.float(),
        l2=l2,
        seed=seed,
        converged=converged,
        hook=hook,
    )
    probe.train_accuracy = probe.accuracy(X[train_idx], y[train_idx])
    if test_idx.numel():
        probe.test_accuracy = probe.accuracy(X[test_idx], y[test_idx])
    return probe


def project_out(X, direction) -> Tensor:
    """X - (X . d) d with d of unit norm: the activations with no component along the direction."""
    X = _as_matrix(X)
    d = unit(direction).to(X.dtype)
    if d.shape[0] != X.shape[1]:
        raise ProbeError(f"the direction has width {d.shape[0]} but X has width {X.shape[1]}.")
    return X - (X @ d)[:, None] * d


def chance_accuracy(y) -> float:
    """The accuracy of always predicting the majority class: what a probe that reads nothing gets."""
    y = _labels(y)
    if y.numel() == 0:
        raise ProbeError("no labels: chance accuracy of an empty set is undefined.")
    return max(float(y.float().mean()), 1 - float(y.float().mean()))


# ---- activations from prompts ------------------------------------------------------------------
def _check_prompts(prompts, what: str) -> list[str]:
    if isinstance(prompts, str):
        raise DataError(f"{what} must be a list of prompts, not one string; wrap it in a list.")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DataError(f"{what} must be a non-empty list of non-empty strings.")
    return prompts


@torch.no_grad()
def prompt_activations(
    lm: HookedLM,
    prompts: Sequence[str],
    hook: str,
    position: int = -1,
    chat: bool = True,
    interventions: Iterable[Intervention] = (),
    batch_size: int = 16,
) -> Tensor:
    """Activations [n, d] (float32, CPU) at `hook` and token `position` of each prompt, under `interventions`.

    Prompts are formatted like generation does (chat template when `chat`) and left-padded, so
    position -1 is every prompt's last token (with `chat`, the end of the assistant header).
    """
    prompts = _check_prompts(prompts, "prompts")
    interventions = list(interventions)
    lm.layer_of(hook)  # an unknown hook fails here, listing the valid ones
    with steer(lm, interventions):
        batches = iter_prompt_activations(lm, prompts, [hook], [position], chat, batch_size)
        return torch.cat([acts[:, 0, 0] for acts in batches])


def probe_activations(
    lm: HookedLM,
    prompts_pos: Sequence[str],
    prompts_neg: Sequence[str],
    hook: str,
    position: int = -1,
    chat: bool = True,
    interventions: Iterable[Intervention] = (),
    batch_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """(X [n_pos + n_neg, d], y) with y = 1 for `prompts_pos` and 0 for `prompts_neg`, in that order."""
    pos = _check_prompts(prompts_pos, "prompts_pos")
    neg = _check_prompts(prompts_neg, "prompts_neg")
    X = prompt_activations(lm, pos + neg, hook, position, chat, interventions, batch_size)
    y = torch.cat([torch.ones(len(pos), dtype=torch.long), torch.zeros(len(neg), dtype=torch.long)])
    return X, y


def fraction_predicted(
    lm: HookedLM,
    probe: ProbeResult,
    prompts: Sequence[str],
    label: int = 1,
    interventions: Iterable[Intervention] = (),
    hook: str | None = None,
    position: int = -1,
    chat: bool = True,
    batch_size: int = 16,
) -> float:
    """Share of `prompts` the probe assigns to `label` under `interventions` (e.g. after adding a direction)."""
    hook = hook or probe.hook
    if hook is None:
        raise ProbeError("the probe does not record its hook point; pass hook='blocks.N.hook_...'.")
    X = prompt_activations(lm, prompts, hook, position, chat, interventions, batch_size)
    return float((probe.predict(X) == label).float().mean())


# ---- the ablation check ------------------------------------------------------------------------
@dataclass
class AblatedProbe:
    """Probe accuracies on held-out prompts with one direction ablated throughout the model."""

    name: str
    original_probe_accuracy: float  # the clean probe, on ablated activations
    retrained_test_accuracy: float  # a fresh probe trained and tested on ablated activations
    retrained_train_accuracy: float
    projected_retrained_accuracy: (
        float  # a fresh probe on the CLEAN activations with d projected out at the hook only
    )
    max_abs_projection: float  # max |x . d| at the probe's hook after ablation (0 for resid hooks)
    predicted_positive_share: (
        float  # of held-out prompts, by the clean probe: 0 or 1 = it collapsed to one class
    )


@dataclass
class AblationCheck:
    """A probe's held-out accuracy before and after ablating directions (see `ablation_check`)."""

    hook: str
    chance: float  # majority-class share of the held-out split
    clean: ProbeResult
    ablated: list[AblatedProbe] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "hook": self.hook,
            "chance": self.chance,
            "clean_test_accuracy": self.clean.test_accuracy,
            "clean_train_accuracy": self.clean.train_accuracy,
            "ablated": [vars(a) for a in self.ablated],
        }

    def table(self) -> str:
        """A plain-text table, one row per ablated direction."""
        lines = [
            f"probe at {self.hook}: held-out accuracy {self.clean.test_accuracy:.3f} (chance {self.chance:.3f})",
            f"{'ablated direction':<40} {'original probe':>14} {'(says class 1)':>14} {'retrained probe':>15} "
            f"{'(hook-only projection)':>22} {'max |proj|':>10}",
        ]
        for a in self.ablated:
            lines.append(
                f"{a.name:<40} {a.original_probe_accuracy:>14.3f} {a.predicted_positive_share:>14.3f} "
                f"{a.retrained_test_accuracy:>15.3f} {a.projected_retrained_accuracy:>22.3f} "
                f"{a.max_abs_projection:>10.2e}"
            )
        return "\n".join(lines)


def class_mean_difference(X, y) -> Tensor:
    """mean(X[y == 1]) - mean(X[y == 0]): the direction along which the class means differ."""
    X, y = _as_matrix(X), _labels(y)
    return X[y == 1].mean(0) - X[y == 0].mean(0)


def ablation_check(
    lm: HookedLM,
    prompts_pos: Sequence[str],
    prompts_neg: Sequence[str],
    hook: str,
    directions: Mapping[str, Tensor] | None = None,
    *,
    position: int = -1,
    chat: bool = True,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    layers: Iterable[int] | None = None,
    batch_size: int = 16,
) -> AblationCheck:
    """Train a probe at `hook`, then ablate directions throughout the model and probe again.

    Directions ablated, each on its own (with `ablation(lm, d, layers)`; layers=None = every write
    to the residual stream): (a) "probe", the clean probe's own direction; (b) "mean_difference",
    the difference of the class means at `hook` on the training split; plus any in `directions`.
    For each: the clean probe's held-out accuracy on the ablated activations, and a fresh probe
    retrained (same split and seed) on them, which measures the separability that is left. For
    contrast, a fresh probe is also trained on the clean activations with d projected out at `hook`
    only: with the mean difference that leaves equal class means (no linear signal at all), while the
    ablation throughout the model lets later layers rebuild the distinction in other directions.
    """
    X, y = probe_activations(lm, prompts_pos, prompts_neg, hook, position, chat, (), batch_size)
    clean = train_probe(X, y, test_fraction, seed, l2, hook=hook)
    if not clean.test_idx.numel():
        raise ProbeError("ablation_check needs held-out prompts: use test_fraction > 0.")
    tr, te = clean.train_idx, clean.test_idx
    todo = {"probe": clean.direction, "mean_difference": class_mean_difference(X[tr], y[tr])}
    todo.update(directions or {})
    result = AblationCheck(hook=hook, chance=chance_accuracy(y[te]), clean=clean)
    for name, direction in todo.items():
        d = unit(direction)
        ivs = ablation(lm, d, layers)
        Xa, _ = probe_activations(lm, prompts_pos, prompts_neg, hook, position, chat, ivs, batch_size)
        fresh = train_probe(Xa, y, test_fraction, seed, l2, hook=hook)
        result.ablated.append(
            AblatedProbe(
                name=name,
                original_probe_accuracy=clean.accuracy(Xa[te], y[te]),
                retrained_test_accuracy=float(fresh.test_accuracy),
                retrained_train_accuracy=fresh.train_accuracy,
                projected_retrained_accuracy=float(
                    train_probe(project_out(X, d), y, test_fraction, seed, l2).test_accuracy
                ),
                max_abs_projection=float((Xa @ d).abs().max()),
                predicted_positive_share=float(clean.predict(Xa[te]).float().mean()),
            )
        )
    return result
