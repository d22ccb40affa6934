"""Node effects for sparse feature circuits (Marks et al., ICLR 2025): how much each dictionary latent and
each error node, at each hook and position, moves a metric on the output when its value goes from the
clean run's to a patch run's (or to zero, or to its mean).

At every hook of the circuit the activation x is written as decode(f) + err, with f = encode(x) and
err = x - decode(f): the value is unchanged, so the spliced model is the model, and f and err become
nodes whose effects can be measured. Three estimates, from cheap to exact:

* ``atp`` (attribution patching): one backward pass on the clean run, effect ~ grad . (target - clean).
* ``ig`` (integrated gradients, `steps` points, as feature-circuits uses for nodes): for one hook at a
  time its nodes are interpolated from clean to target while later hooks run freely; the gradient
  averaged over the points, times (target - clean).
* ``exact``: one forward per node with only that node set to its target value; the reference (one pass
  per active latent and position, so only for small models or few nodes).

Effects are averaged over the batch of prompt pairs and kept per position; `NodeEffects.summed()`
adds up the positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.errors import DataError

METHODS = ("atp", "ig", "exact")
ABLATIONS = ("patch", "zero", "mean")
Metric = Callable[[Tensor], Tensor]  # logits [B, T, V] -> one value per prompt [B]


@dataclass
class Submodule:
    """A hook of the model with the dictionary that reads (and rewrites) it."""

    hook: str
    dictionary: Dictionary


@dataclass
class Nodes:
    """One hook's activations as nodes: latents f [B, T, F] and the error err [B, T, D]."""

    features: Tensor
    error: Tensor

    def detached(self) -> Nodes:
        return Nodes(self.features.detach(), self.error.detach())


@dataclass
class NodeEffects:
    """Per hook: latent effects [T, F] and error-node effects [T] (or [F] and [] once summed)."""

    method: str
    features: dict[str, Tensor]
    errors: dict[str, Tensor]

    def summed(self) -> NodeEffects:
        """Effects added up over positions: one node per latent and one error node per hook."""
        return NodeEffects(
            self.method,
            {h: e.sum(0) for h, e in self.features.items()},
            {h: e.sum(0) for h, e in self.errors.items()},
        )

    def flat(self) -> Tensor:
        """Every effect in one vector (features then errors, hook by hook), for ranking and comparing."""
        parts = [t.reshape(-1) for h in self.features for t in (self.features[h], self.errors[h])]
        return torch.cat(parts)


def split(dictionary: Dictionary, x: Tensor) -> Nodes:
    f = dictionary.encode(x)
    return Nodes(f, x - dictionary.decode(f))


def join(dictionary: Dictionary, nodes: Nodes) -> Tensor:
    return dictionary.decode(nodes.features) + nodes.error


def decompose(lm: HookedLM, submodules: Sequence[Submodule], ids: Tensor, mask: Tensor | None = None):
    """{hook: Nodes} of one run, from the activations of the unmodified model."""
    acts = lm.capture(ids, [s.hook for s in submodules], attention_mask=mask)
    with torch.no_grad():
        return {s.hook: split(s.dictionary, acts[s.hook]) for s in submodules}


def mean_nodes(nodes: dict[str, Nodes]) -> dict[str, Nodes]:
    """The batch mean of each node at each position: the values of a mean ablation."""
    return {
        h: Nodes(n.features.mean(0, keepdim=True), n.error.mean(0, keepdim=True)) for h, n in nodes.items()
    }


def ablation_targets(clean: dict[str, Nodes], ablation: str, patch: dict[str, Nodes] | None, means):
    """The values each node moves to: the patch run's, zeros, or the means."""
    if ablation == "patch":
        if patch is None:
            raise DataError(
                "ablation 'patch' needs patch inputs (patch_ids); or use ablation 'zero' or 'mean'."
            )
        return patch
    if ablation == "zero":
        return {h: Nodes(torch.zeros_like(n.features), torch.zeros_like(n.error)) for h, n in clean.items()}
    if means is None:
        raise DataError("ablation 'mean' needs the nodes' means (mean_nodes of a reference batch).")
    return {
        h: Nodes(m.features.expand_as(clean[h].features), m.error.expand_as(clean[h].error))
        for h, m in means.items()
    }


def _check(
    submodules: Sequence[Submodule], clean_ids: Tensor, patch_ids: Tensor | None, method: str, ablation: str
):
    if method not in METHODS:
        raise DataError(f"unknown attribution method {method!r}; choose from {', '.join(METHODS)}.")
    if ablation not in ABLATIONS:
        raise DataError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}.")
    if not submodules:
        raise DataError("no submodules to attribute to: give at least one (hook, dictionary).")
    if patch_ids is not None and tuple(patch_ids.shape) != tuple(clean_ids.shape):
        raise DataError(
            f"clean inputs have shape {tuple(clean_ids.shape)} but patch inputs {tuple(patch_ids.shape)}: "
            "each clean prompt needs a patch prompt of the same length."
        )


def node_effects(
    lm: HookedLM,
    submodules: Sequence[Submodule],
    metric: Metric,
    clean_ids: Tensor,
    patch_ids: Tensor | None = None,
    mask: Tensor | None = None,
    method: str = "ig",
    ablation: str = "patch",
    means: dict[str, Nodes] | None = None,
    steps: int = 10,
) -> NodeEffects:
    """The effect of every latent and error node on `metric`, clean -> target, batch-averaged."""
    _check(submodules, clean_ids, patch_ids, method, ablation)
    clean = decompose(lm, submodules, clean_ids, mask)
    patch = decompose(lm, submodules, patch_ids, mask) if patch_ids is not None else None
    target = ablation_targets(clean, ablation, patch, means)
    run = {"atp": _atp, "ig": _ig, "exact": _exact}[method]
    features, errors = {}, {}
    for hook, (f_effect, e_effect) in run(
        lm, submodules, metric, clean_ids, mask, clean, target, steps
    ).items():
        features[hook], errors[hook] = f_effect.mean(0), e_effect.mean(0)
    return NodeEffects(method, features, errors)


def _effect(grads: Nodes, clean: Nodes, target: Nodes) -> tuple[Tensor, Tensor]:
    return (
        grads.features * (target.features - clean.features),
        (grads.error * (target.error - clean.error)).sum(-1),
    )


def pass_through(sub: Submodule, live: dict[str, Nodes]):
    """A patch that passes x on unchanged (value and gradient) plus a zero-valued term through its nodes,
    kept in `live` as leaves: the gradient at a node is then the derivative with every other node of
    that hook held fixed (writing x = decode(f) + err directly would make err depend on f and cancel
    f's gradient)."""

    def fn(x):
        with torch.no_grad():
            values = split(sub.dictionary, x)
        nodes = Nodes(values.features.requires_grad_(), values.error.requires_grad_())
        live[sub.hook] = nodes
        through = join(sub.dictionary, nodes)
        return x + (through - through.detach())

    return fn


def grads_of(value: Tensor, nodes: Sequence[Nodes], retain: bool = False) -> list[Nodes]:
    """d value / d each node (zeros where value does not depend on it)."""
    leaves = [t for n in nodes for t in (n.features, n.error)]
    grads = torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=retain)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves, strict=True)]
    return [Nodes(grads[2 * i], grads[2 * i + 1]) for i in range(len(nodes))]


def clean_gradients(lm, submodules, metric, ids, mask=None) -> dict[str, Nodes]:
    """d metric / d node for every node of every hook, on the clean run."""
    live: dict[str, Nodes] = {}
    with torch.enable_grad(), lm.patch({s.hook: pass_through(s, live) for s in submodules}):
        value = metric(lm.forward(ids, mask)).sum()
        grads = grads_of(value, [live[s.hook] for s in submodules])
    return {s.hook: g for s, g in zip(submodules, grads, strict=True)}


def _atp(lm, submodules, metric, ids, mask, clean, target, steps):
    """One backward pass on the clean run through the pass-through splices."""
    grads = clean_gradients(lm, submodules, metric, ids, mask)
    return {s.hook: _effect(grads[s.hook], clean[s.hook], target[s.hook]) for s in submodules}


def _ig(lm, submodules, metric, ids, mask, clean, target, steps):
    """Per hook: gradients at `steps` points from clean to target (later hooks run freely)."""
    out = {}
    for sub in submodules:
        c, t = clean[sub.hook], target[sub.hook]
        total = Nodes(torch.zeros_like(c.features), torch.zeros_like(c.error))
        for step in range(steps):
            alpha = step / steps
            point = Nodes(
                ((1 - alpha) * c.features + alpha * t.features).requires_grad_(),
                ((1 - alpha) * c.error + alpha * t.error).requires_grad_(),
            )
            with torch.enable_grad(), lm.patch({sub.hook: lambda _x, p=point, d=sub.dictionary: join(d, p)}):
                value = metric(lm.forward(ids, mask)).sum()
                g_f, g_e = torch.autograd.grad(value, [point.features, point.error], allow_unused=True)
            total.features += 0 if g_f is None else g_f
            total.error += 0 if g_e is None else g_e
        mean = Nodes(total.features / steps, total.error / steps)
        out[sub.hook] = _effect(mean, c, t)
    return out


@torch.no_grad()
def _exact(lm, submodules, metric, ids, mask, clean, target, steps):
    """One forward per node whose target differs from its clean value, with only that node changed."""
    base = metric(lm.forward(ids, mask))
    out = {}
    for sub in submodules:
        c, t = clean[sub.hook], target[sub.hook]
        f_effect = torch.zeros_like(c.features)
        e_effect = torch.zeros(c.error.shape[:2], dtype=c.error.dtype, device=c.error.device)
        changed = (c.features != t.features).any(0)  # [T, F]
        for pos, latent in changed.nonzero().tolist():
            nodes = Nodes(c.features.clone(), c.error)
            nodes.features[:, pos, latent] = t.features[:, pos, latent]
            f_effect[:, pos, latent] = _run(lm, sub, nodes, metric, ids, mask) - base
        for pos in range(c.error.shape[1]):
            if torch.equal(c.error[:, pos], t.error[:, pos]):
                continue
            nodes = Nodes(c.features, c.error.clone())
            nodes.error[:, pos] = t.error[:, pos]
            e_effect[:, pos] = _run(lm, sub, nodes, metric, ids, mask) - base
        out[sub.hook] = (f_effect, e_effect)
    return out


def _run(lm, sub: Submodule, nodes: Nodes, metric, ids, mask) -> Tensor:
    with lm.patch({sub.hook: lambda _x: join(sub.dictionary, nodes)}):
        return metric(lm.forward(ids, mask))
