"""Edges of a sparse feature circuit (Marks et al.): how much an upstream node moves the metric *through*
a downstream node, along the direct path between their hooks.

For a downstream node d with metric gradient w_d = dm/dd on the clean run, the edge from upstream node u
is w_d . (dd/du) . (u_target - u_clean): a vector-Jacobian product taken with every circuit hook between
the two held fixed (their outputs detached), so only the path that does not pass through another
submodule counts (for resid_{l-1} -> resid_l: the skip connection; attention and MLP are submodules of
their own). One backward pass per downstream node, all upstream nodes at once. A downstream error node
counts as the scalar w_err . err.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.circuits.attribution import (
    ABLATIONS,
    Metric,
    Nodes,
    Submodule,
    ablation_targets,
    clean_gradients,
    decompose,
    grads_of,
    pass_through,
    split,
)
from saelab.core.models import HookedLM
from saelab.errors import DataError


def edge_effects(
    lm: HookedLM,
    submodules: Sequence[Submodule],
    metric: Metric,
    upstream: str,
    downstream: str,
    targets: Sequence[tuple[int, int]],
    clean_ids: Tensor,
    patch_ids: Tensor | None = None,
    mask: Tensor | None = None,
    ablation: str = "patch",
    means: dict[str, Nodes] | None = None,
) -> dict[tuple[int, int], Nodes]:
    """For each downstream node (position, latent; latent -1 for the error node): the edge weights from
    every upstream node, as Nodes(features [T, F], errors [T]) averaged over the batch."""
    order = lm.execution_order([s.hook for s in submodules])
    by_hook = {s.hook: s for s in submodules}
    for hook in (upstream, downstream):
        if hook not in by_hook:
            raise DataError(f"{hook!r} is not one of the circuit's hooks ({', '.join(order)}).")
    if order.index(upstream) >= order.index(downstream):
        raise DataError(
            f"{upstream!r} does not come before {downstream!r} in the forward pass: edges run forward."
        )
    if ablation not in ABLATIONS:
        raise DataError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}.")
    between = order[order.index(upstream) + 1 : order.index(downstream)]
    clean = decompose(lm, submodules, clean_ids, mask)
    patch = decompose(lm, submodules, patch_ids, mask) if patch_ids is not None else None
    delta_source = ablation_targets(clean, ablation, patch, means)[upstream]
    delta = Nodes(
        delta_source.features - clean[upstream].features, delta_source.error - clean[upstream].error
    )
    weight = clean_gradients(lm, [by_hook[downstream]], metric, clean_ids, mask)[downstream]

    live: dict[str, Nodes] = {}
    seen: dict[str, Nodes] = {}

    def read(x):
        seen["down"] = split(by_hook[downstream].dictionary, x)
        raise _Stop

    patches = {upstream: pass_through(by_hook[upstream], live), downstream: read}
    patches.update({hook: (lambda x: x.detach()) for hook in between})
    with torch.enable_grad(), lm.patch(patches):
        try:
            lm.forward(clean_ids, mask)
        except _Stop:
            pass
        down = seen["down"]
        out = {}
        for n, (pos, latent) in enumerate(targets):
            if latent >= 0:
                scalar = (weight.features[:, pos, latent] * down.features[:, pos, latent]).sum()
            else:
                scalar = (weight.error[:, pos] * down.error[:, pos]).sum()
            (grad,) = grads_of(scalar, [live[upstream]], retain=n < len(targets) - 1)
            out[(pos, latent)] = Nodes(
                (grad.features * delta.features).mean(0).detach(),
                (grad.error * delta.error).sum(-1).mean(0).detach(),
            )
    return out


class _Stop(Exception):
    """Ends the forward pass once the downstream hook has been read."""
