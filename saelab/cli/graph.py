"""`saelab graph`: the attribution graph of one prompt over a per-layer transcoder set or a cross-layer
transcoder, pruned and written as Neuronpedia graph JSON (checked against its schema before it is written).

Feature labels (`clerp`) come from feature stores (`saelab analyze` writes one `features.db` per
dictionary): `--store` names one store, a dictionary folder holding one, the set folder (each member's
folder is searched) or a folder of dictionary folders (a run's `saes/`). A cross-layer transcoder has one
store for all its layers (latent l * width + f is feature f of layer l).
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm, resolve_model
from saelab.errors import GraphError

if TYPE_CHECKING:
    from saelab.circuits.graph import Graph, PrunedGraph
    from saelab.circuits.transcoders import Transcoders
    from saelab.core.models import HookedLM

STORE_FILE = "features.db"


def graph_command(
    prompt: str = typer.Argument(..., help="The prompt to attribute (plain text; BOS is prepended)."),
    transcoders: Path = typer.Option(
        ...,
        help="A per-layer transcoder set (saelab's set.json or circuit-tracer's transcoder_set) or a cross-layer "
        "transcoder (a saelab clt folder or circuit-tracer's cross_layer_transcoder).",
    ),
    model: str = typer.Option(
        None, help="The model (hub id, folder or .gguf); default: the set's model, else the embedded one."
    ),
    out: Path = typer.Option(Path("graph.json"), help="Where to write the graph JSON."),
    node_threshold: float = typer.Option(
        0.8, min=0.0, max=1.0, help="Share of influence the kept nodes hold."
    ),
    edge_threshold: float = typer.Option(
        0.98, min=0.0, max=1.0, help="Share of influence the kept edges hold."
    ),
    max_logits: int = typer.Option(10, min=1, help="At most this many target logits."),
    logit_probability: float = typer.Option(
        0.95, min=0.0, max=1.0, help="Target logits: the smallest top set with this cumulative probability."
    ),
    max_feature_nodes: int = typer.Option(
        None, min=0, help="Keep only this many features (the most influential); default: every active one."
    ),
    batch_size: int = typer.Option(32, min=1, help="Adjacency rows per backward pass."),
    slug: str = typer.Option(None, help="The graph's slug in Neuronpedia; default: from the prompt."),
    store: Path = typer.Option(
        None,
        help="Feature labels from feature stores: a features.db, a dictionary folder holding one, the set "
        "folder (each member's store) or a folder of dictionary folders.",
    ),  # fmt: skip
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Attribute a prompt's next-token logits to transcoder features, errors and tokens, prune the graph
    and write it as Neuronpedia graph JSON (open it in circuit-tracer's or Neuronpedia's viewer)."""
    from saelab.circuits.graph import attribute, prune
    from saelab.circuits.graph_json import graph_json
    from saelab.circuits.graph_schema import validate_graph
    from saelab.circuits.transcoders import Transcoders
    from saelab.core.fileio import atomic_write_json
    from saelab.dictionaries.transcoders import load_transcoders

    if not prompt.strip():
        raise GraphError("the prompt is empty; give the text whose next token the graph should explain.")
    started = time.perf_counter()
    dset = Transcoders(load_transcoders(transcoders))
    lm = load_lm(model or set_model_name(dset), device=device, dtype=dtype)
    dset.to(lm.device)
    ids, has_bos = prompt_ids(lm, prompt)
    attributing = time.perf_counter()
    graph = attribute(
        lm, dset, ids, logit_probability, max_logits, max_feature_nodes, batch_size, zero_bos=has_bos
    )
    pruned = prune(graph, node_threshold, edge_threshold)
    seconds = {"total": 0.0, "attribution": time.perf_counter() - attributing}
    labels = store_labels(store, transcoders, dset, kept_features(pruned)) if store is not None else {}
    document = graph_json(
        pruned, lm, labels=labels, slug=slug or slug_of(prompt), node_threshold=node_threshold
    )
    validate_graph(document)
    atomic_write_json(out, document)
    seconds["total"] = time.perf_counter() - started
    _print_summary(graph, pruned, document, out, labels, seconds, lm.device)


# ---- inputs -------------------------------------------------------------------------------------
def set_model_name(dset: Transcoders) -> str | None:
    """The model the transcoders were trained on: the set's own name for it, else its first member's metadata."""
    if dset.model_name:
        return resolve_model(dset.model_name)
    if dset.cross_layer:
        return None
    first = next(iter(dset.source.members.values()))
    return resolve_model(first.cfg.metadata.get("model_name"))


def prompt_ids(lm: HookedLM, prompt: str) -> tuple[list[int], bool]:
    """The prompt's tokens after one BOS (else EOS) token, as saelab's training contexts start, and
    whether that start token is there: it is the attention sink, so it gets no feature or error nodes."""
    tokenizer = lm.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GraphError(f"the prompt {prompt!r} has no tokens for {lm.name}'s tokenizer.")
    start = next((int(v) for v in (tokenizer.bos_token_id, tokenizer.eos_token_id) if v is not None), None)
    return (ids, False) if start is None else ([start, *ids], True)


def slug_of(prompt: str) -> str:
    """A Neuronpedia-style slug from the prompt's first words: lower case, dashes, at most 48 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "graph"


def kept_features(pruned: PrunedGraph) -> set[tuple[int, int]]:
    """(layer, feature) of every feature node the pruning kept: the only ones that need a label."""
    graph = pruned.graph
    kept = pruned.node_mask[: graph.n_features].nonzero().flatten()
    return {(layer, feature) for layer, _, feature in graph.features[kept].tolist()}


# ---- labels from feature stores -----------------------------------------------------------------
def store_paths(path: Path, set_folder: Path) -> list[Path]:
    """The feature stores `--store` names (see the module docstring)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise GraphError(f"--store {path} does not exist; name a {STORE_FILE} or a folder holding some.")
    if (path / STORE_FILE).is_file():
        return [path / STORE_FILE]
    members = _member_folders(path) if (path / "set.json").is_file() else []
    found = [m / STORE_FILE for m in members if (m / STORE_FILE).is_file()]
    found = found or sorted(path.glob(f"*/{STORE_FILE}")) or sorted(path.glob(f"saes/*/{STORE_FILE}"))
    if not found:
        hint = "run `saelab analyze` on the set's members first" if path == set_folder else "check the path"
        raise GraphError(f"no feature store ({STORE_FILE}) found in {path}: {hint}.")
    return found


def _member_folders(set_folder: Path) -> list[Path]:
    """The member folders a saelab set.json lists (relative to the set; a run's set points into saes/)."""
    import json

    index = json.loads((set_folder / "set.json").read_text())
    return [(set_folder / sub).resolve() for sub in (index.get("layers") or {}).values()]


def store_labels(
    path: Path, set_folder: Path, dset: Transcoders, features: set[tuple[int, int]]
) -> dict[tuple[int, int], str]:
    """(layer, feature) -> label for the `features` that the stores of these transcoders explain."""
    from saelab.analysis.store import FeatureStore

    if dset.cross_layer:
        by_layer = dict.fromkeys(dset.layers, _clt_store(store_paths(path, set_folder), dset))
    else:
        by_layer = _stores_by_layer(store_paths(path, set_folder), dset.source)
    labels = {}
    for db in dict.fromkeys(by_layer.values()):
        layers = {layer for layer, store in by_layer.items() if store == db}
        with FeatureStore(db, create=False) as fs:
            for lay, idx in sorted(features):
                row = fs.feature(dset.feature_store_index(lay, idx)) if lay in layers else None
                if row and row.get("explanation"):
                    labels[lay, idx] = row["explanation"]
    return labels


def _clt_store(paths: list[Path], dset: Transcoders) -> Path:
    """The one store that describes this cross-layer transcoder (same hook template and width)."""
    from saelab.analysis.store import FeatureStore

    cfg = dset.source.cfg
    for db in paths:
        with FeatureStore(db, create=False) as fs:
            meta = fs.meta()
        if (
            meta.get("hook_name") == cfg.hook_name
            and (meta.get("dictionary") or {}).get("d_sae") == cfg.d_sae
        ):
            return db
    raise GraphError(
        f"none of the feature stores found ({', '.join(map(str, paths[:3]))}) belongs to this cross-layer "
        f"transcoder ({cfg.hook_name}, {cfg.d_sae} latents): run `saelab analyze` on its folder first."
    )


def _stores_by_layer(paths: list[Path], dset) -> dict[int, Path]:
    """Each store under the layer of the member it describes (its hook and width match that member's)."""
    from saelab.analysis.store import FeatureStore
    from saelab.dictionaries.sets import split_hook

    by_layer: dict[int, Path] = {}
    for db in paths:
        with FeatureStore(db, create=False) as fs:
            meta = fs.meta()
        hook, width = meta.get("hook_name"), (meta.get("dictionary") or {}).get("d_sae")
        layer = split_hook(hook)[0] if hook and hook.startswith("blocks.") else None
        if layer not in dset.layers or hook != dset.hook(layer) or width != dset[layer].cfg.d_sae:
            continue
        if layer in by_layer:
            raise GraphError(
                f"two feature stores describe a layer-{layer} dictionary of this set ({by_layer[layer]} and "
                f"{db}); point --store at the set folder or at one store."
            )
        by_layer[layer] = db
    if not by_layer:
        raise GraphError(
            f"none of the feature stores found ({', '.join(map(str, paths[:3]))}) belongs to this set: their "
            f"hooks or widths differ from its transcoders (blocks.{{i}}.{dset.hook_suffix})."
        )
    return by_layer


# ---- output -------------------------------------------------------------------------------------
def peak_memory_mib() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def gpu_peak_mib(device) -> float | None:
    """The peak memory torch allocated on a CUDA device, or None elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _print_summary(
    graph: Graph, pruned: PrunedGraph, document: dict, out: Path, labels: dict, seconds: dict, device
):
    edges = int((graph.adjacency != 0).sum())
    console.print(
        f"graph: {graph.n_nodes} nodes ({graph.n_features} features, {graph.n_errors} errors, {graph.n_pos} "
        f"tokens, {graph.n_logits} logits), {edges} edges"
    )
    console.print(f"pruned: {len(document['nodes'])} nodes, {len(document['links'])} edges")
    full, kept = pruned.scores, pruned.pruned_scores
    console.print(
        f"replacement score {full.replacement:.3f} (pruned {kept.replacement:.3f}), "
        f"completeness {full.completeness:.3f} (pruned {kept.completeness:.3f})"
    )
    if labels:
        console.print(f"labels: {len(labels)} features labelled from feature stores")
    gpu = gpu_peak_mib(device)
    console.print(
        f"time {seconds['total']:.1f} s ({seconds['attribution']:.1f} s attribution and pruning), peak memory "
        f"{peak_memory_mib():.0f} MiB" + ("" if gpu is None else f", GPU peak {gpu:.0f} MiB")
    )
    console.print(f"wrote {out}")
