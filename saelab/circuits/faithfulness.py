"""Faithfulness and completeness of a circuit (Marks et al.): F(C) = (m(C) - m(empty)) / (m(M) - m(empty)).

m(C) runs the model with every node outside the circuit C mean-ablated, hook after hook in one forward
pass (each hook's latents and error are recomputed from the already ablated upstream, then the nodes
outside C are set to their means); m(M) is the model itself and m(empty) the model with every node
ablated. Completeness is F of the complement, M minus C. With `keep_errors`, error nodes are never
ablated (the circuit is then read as "these latents plus everything the dictionaries miss").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.circuits.attribution import Metric, NodeEffects, Nodes, Submodule, join, split
from saelab.core.models import HookedLM
from saelab.errors import DataError


@dataclass
class Circuit:
    """Nodes kept per hook: latents [T, F] (or [F], every position) and error nodes [T] (or [])."""

    features: dict[str, Tensor]
    errors: dict[str, Tensor]

    @property
    def n_nodes(self) -> int:
        return int(sum(m.sum() for m in self.features.values()) + sum(m.sum() for m in self.errors.values()))

    def complement(self) -> Circuit:
        return Circuit({h: ~m for h, m in self.features.items()}, {h: ~m for h, m in self.errors.items()})


def circuit_at(effects: NodeEffects, threshold: float) -> Circuit:
    """The nodes whose |effect| exceeds `threshold`."""
    return Circuit(
        {h: e.abs() > threshold for h, e in effects.features.items()},
        {h: e.abs() > threshold for h, e in effects.errors.items()},
    )


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    """A kept-node mask [T, F] / [F] (or [T] / [] for errors) broadcast to a batch [B, T, ...]."""
    while mask.ndim < like.ndim - 1:
        mask = mask.unsqueeze(0)
    return mask.unsqueeze(0).expand(like.shape[0], *mask.shape).expand_as(like)


@torch.no_grad()
def ablated_metric(
    lm: HookedLM,
    submodules: Sequence[Submodule],
    metric: Metric,
    ids: Tensor,
    means: dict[str, Nodes],
    circuit: Circuit | None,
    mask: Tensor | None = None,
    keep_errors: bool = False,
) -> float:
    """The batch-mean metric with every node outside `circuit` mean-ablated (None: nothing ablated)."""
    if circuit is None:
        return float(metric(lm.forward(ids, mask)).mean())

    def ablate(sub: Submodule):
        def fn(x):
            nodes = split(sub.dictionary, x)
            mean = means[sub.hook]
            keep_f = _expand(circuit.features[sub.hook], nodes.features)
            f = torch.where(keep_f, nodes.features, mean.features.expand_as(nodes.features))
            if keep_errors:
                err = nodes.error
            else:
                keep_e = _expand(circuit.errors[sub.hook], nodes.error[..., 0]).unsqueeze(-1)
                err = torch.where(keep_e, nodes.error, mean.error.expand_as(nodes.error))
            return join(sub.dictionary, Nodes(f, err))

        return fn

    with lm.patch({s.hook: ablate(s) for s in submodules}):
        return float(metric(lm.forward(ids, mask)).mean())


@dataclass
class CurvePoint:
    threshold: float
    n_nodes: int
    faithfulness: float
    completeness: float


def faithfulness_curve(
    lm: HookedLM,
    submodules: Sequence[Submodule],
    metric: Metric,
    ids: Tensor,
    effects: NodeEffects,
    means: dict[str, Nodes],
    thresholds: Sequence[float] | None = None,
    mask: Tensor | None = None,
    keep_errors: bool = False,
) -> tuple[list[CurvePoint], dict[str, float]]:
    """F and completeness at each threshold (default: 12 log-spaced between the largest and 1e-4 of it),
    with m(M) and m(empty)."""
    top = float(effects.flat().abs().max()) if effects.flat().numel() else 0.0
    if thresholds is None:
        if top == 0.0:
            raise DataError(
                "every node effect is zero: the metric does not depend on these dictionaries' nodes."
            )
        thresholds = torch.logspace(
            torch.log10(torch.tensor(top)) - 4, torch.log10(torch.tensor(top)), 12
        ).tolist()
    empty = Circuit(
        {h: torch.zeros_like(e, dtype=torch.bool) for h, e in effects.features.items()},
        {h: torch.zeros_like(e, dtype=torch.bool) for h, e in effects.errors.items()},
    )
    full = ablated_metric(lm, submodules, metric, ids, means, None, mask)
    none = ablated_metric(lm, submodules, metric, ids, means, empty, mask, keep_errors)
    span = full - none
    if span == 0:
        raise DataError("the full model and the fully ablated one score the same: faithfulness is undefined.")
    points = []
    for threshold in sorted(thresholds, reverse=True):
        circuit = circuit_at(effects, threshold)
        kept = ablated_metric(lm, submodules, metric, ids, means, circuit, mask, keep_errors)
        rest = ablated_metric(lm, submodules, metric, ids, means, circuit.complement(), mask, keep_errors)
        points.append(CurvePoint(threshold, circuit.n_nodes, (kept - none) / span, (rest - none) / span))
    return points, {"full": full, "empty": none}


def nodes_needed(points: Sequence[CurvePoint], target: float = 0.8) -> int | None:
    """The fewest nodes of a curve point with faithfulness >= target (None if no point reaches it)."""
    reached = [p.n_nodes for p in points if p.faithfulness >= target]
    return min(reached) if reached else None
