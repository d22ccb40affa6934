"""A sparse feature circuit for a task, end to end: node effects, the nodes above a threshold, the edges
between them, and the faithfulness curve; everything `saelab circuit` writes.

Nodes are kept per position. A task's rows are padded into one batch; only the rows of its most common
token length are used, so that a position means the same slot of the template in every row (the
agreement templates are built that way; the count used is reported).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from saelab.circuits.attribution import Submodule, decompose, mean_nodes, node_effects
from saelab.circuits.edges import edge_effects
from saelab.circuits.faithfulness import circuit_at, faithfulness_curve, nodes_needed
from saelab.circuits.tasks import PAIRS, Task, TaskBatch, metric
from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.sets import DictionarySet
from saelab.errors import DataError

RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@dataclass
class CircuitConfig:
    """What `find_circuit` runs; saved beside the circuit."""

    method: str = "ig"
    steps: int = 10
    ablation: str = "patch"  # pairs: the patch prompts; prompts: "mean" or "zero"
    node_threshold: float = 0.1  # feature-circuits' README defaults
    edge_threshold: float = 0.01
    thresholds: list[float] = field(default_factory=list)  # the faithfulness curve (empty: 12 log-spaced)
    keep_errors: bool = False
    max_rows: int = 64
    edges: bool = True


def submodules_of(items: Sequence[DictionarySet | Dictionary]) -> list[Submodule]:
    """The circuit's submodules: every member of each set, and each single SAE at the hook it reads."""
    subs: dict[str, Submodule] = {}
    for item in items:
        if isinstance(item, DictionarySet):
            if item.is_transcoder_set:
                raise DataError(
                    "sparse feature circuits splice SAEs into the hooks they read; this set holds transcoders. "
                    "Use SAEs here (e.g. at blocks.{i}.hook_resid_post), and transcoder sets with `saelab graph`."
                )
            pairs = [(item.hook(layer), member) for layer, member in item]
        else:
            if item.cfg.is_transcoder:
                raise DataError(
                    f"{item.cfg.hook_name} -> {item.cfg.output_hook_name} is a transcoder; give SAEs."
                )
            pairs = [(item.cfg.hook_name, item)]
        for hook, member in pairs:
            if hook in subs:
                raise DataError(f"two dictionaries read {hook}; give each hook one dictionary.")
            subs[hook] = Submodule(hook, member)
    return list(subs.values())


def rows_of_one_length(batch: TaskBatch, max_rows: int) -> tuple[TaskBatch, int]:
    """The rows of the most common length (no padding left), at most `max_rows` of them."""
    lengths = batch.clean_mask.sum(-1)
    common = int(lengths.mode().values)
    rows = (lengths == common).nonzero().flatten()[:max_rows]
    chosen = batch.select(rows)
    width = chosen.clean_ids.shape[1]
    trimmed = {
        name: (
            value[:, width - common :] if name.endswith(("_ids", "_mask")) and value is not None else value
        )
        for name, value in vars(chosen).items()
    }
    trimmed["last"] = torch.full_like(chosen.last, common - 1)
    return TaskBatch(**trimmed), int((lengths == common).sum())


def adjacent_pairs(lm: HookedLM, hooks: Sequence[str]) -> list[tuple[str, str]]:
    """(upstream, downstream) hook pairs with no residual-stream hook between them: the edges a circuit
    draws (resid -> attn, mlp, next resid; attn -> mlp, resid; mlp -> resid)."""
    order = lm.execution_order(hooks)
    pairs = []
    for j, down in enumerate(order):
        for i in range(j - 1, -1, -1):
            pairs.append((order[i], down))
            if order[i].rsplit(".", 1)[-1] in RESIDUAL:
                break
    return pairs


def find_circuit(
    lm: HookedLM, submodules: Sequence[Submodule], task: Task, cfg: CircuitConfig, progress=None
) -> dict:
    """Node effects, the circuit at `cfg.node_threshold`, its edges and the faithfulness curve."""
    started = time.perf_counter()
    by_hook = {s.hook: s for s in submodules}
    submodules = [by_hook[h] for h in lm.execution_order(list(by_hook))]
    full = task.encode(lm.tokenizer).to(lm.device)
    batch, same_length = rows_of_one_length(full, cfg.max_rows)
    is_pairs = batch.kind == PAIRS
    ablation = cfg.ablation if is_pairs else ("mean" if cfg.ablation == "patch" else cfg.ablation)

    def score(logits):
        return metric(logits, batch, mean=False)

    clean, patch = batch.clean_ids, batch.patch_ids if is_pairs else None
    means = mean_nodes(decompose(lm, submodules, clean))
    effects = node_effects(
        lm, submodules, score, clean, patch if ablation == "patch" else None, method=cfg.method,
        ablation=ablation, means=means, steps=cfg.steps,
    )  # fmt: skip
    circuit = circuit_at(effects, cfg.node_threshold)
    nodes = []
    for hook in effects.features:
        for pos, latent in circuit.features[hook].nonzero().tolist():
            nodes.append(
                {
                    "hook": hook,
                    "pos": pos,
                    "latent": latent,
                    "effect": float(effects.features[hook][pos, latent]),
                }
            )
        for (pos,) in circuit.errors[hook].nonzero().tolist():
            nodes.append({"hook": hook, "pos": pos, "latent": -1, "effect": float(effects.errors[hook][pos])})
    edges = []
    if cfg.edges:
        for up, down in adjacent_pairs(lm, [s.hook for s in submodules]):
            targets = [(n["pos"], n["latent"]) for n in nodes if n["hook"] == down]
            sources = circuit.features[up], circuit.errors[up]
            if not targets or not (sources[0].any() or sources[1].any()):
                continue
            found = edge_effects(
                lm, submodules, score, up, down, targets, clean, patch if ablation == "patch" else None,
                ablation=ablation, means=means,
            )  # fmt: skip
            for (pos, latent), weights in found.items():
                for u_pos, u_latent in (
                    (sources[0] & (weights.features.abs() > cfg.edge_threshold)).nonzero().tolist()
                ):
                    edges.append(
                        _edge(up, u_pos, u_latent, down, pos, latent, weights.features[u_pos, u_latent])
                    )
                for (u_pos,) in (sources[1] & (weights.error.abs() > cfg.edge_threshold)).nonzero().tolist():
                    edges.append(_edge(up, u_pos, -1, down, pos, latent, weights.error[u_pos]))
    points, ends = faithfulness_curve(
        lm,
        submodules,
        score,
        clean,
        effects,
        means,
        thresholds=cfg.thresholds or None,
        keep_errors=cfg.keep_errors,
    )
    with torch.no_grad():
        clean_metric = float(score(lm.forward(clean)).mean())
    return {
        "task": task.name,
        "kind": batch.kind,
        "rows": len(batch),
        "rows_same_length": same_length,
        "rows_in_task": len(full),
        "tokens": [lm.tokenizer.decode([i]) for i in batch.clean_ids[0].tolist()],  # the first row's text
        "metric": clean_metric,
        "config": asdict(cfg),
        "ablation": ablation,
        "hooks": [s.hook for s in submodules],
        "nodes": sorted(nodes, key=lambda n: -abs(n["effect"])),
        "edges": sorted(edges, key=lambda e: -abs(e["weight"])),
        "curve": [asdict(p) for p in points],
        "metric_full": ends["full"],
        "metric_empty": ends["empty"],
        "nodes_for_f08": nodes_needed(points, 0.8),
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _edge(up, u_pos, u_latent, down, pos, latent, weight) -> dict:
    return {
        "source": {"hook": up, "pos": u_pos, "latent": u_latent},
        "target": {"hook": down, "pos": pos, "latent": latent},
        "weight": float(weight),
    }
