"""Attribution graphs and sparse feature circuits saved beside the served dictionary, as pages and JSON.

They live in the `graphs/` folder of the served dictionary's folder (the one holding features.db):

* `graphs/<name>.json`: an attribution graph (`saelab graph ... --out <sae>/graphs/<name>.json`);
* `graphs/<name>/circuit.json`: a circuit (`saelab circuit ... --out <sae>/graphs/<name>`).

A name is looked up in that folder only: names are plain (letters, digits, `.`, `_`, `-`, no `..`) and the
resolved file must lie inside the folder, so no request can read a file elsewhere. Both kinds are served
in one shape (`view`): nodes with a kind, a context position and a row (graphs: embeddings at the
bottom, then the layers, logits on top; circuits: one row per hook, upstream first), edges by node id,
the token labels, and for circuits the faithfulness curve. A node links to its feature page only when it
is a latent of the served dictionary (same hook), since the app serves that dictionary alone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from saelab.circuits.replacement import INPUT_SUFFIX
from saelab.server.deps import State
from saelab.server.routers.pages import page
from saelab.server.state import ServerState

router = APIRouter()

GRAPHS_FOLDER = "graphs"
CIRCUIT_FILE = "circuit.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
KINDS = {"embedding": "embedding", "logit": "logit", "mlp reconstruction error": "error"}


class GraphFileError(ValueError):
    """A file in graphs/ that is not a readable graph or circuit; the API answers 422 with its message."""


def graphs_folder(state: ServerState) -> Path:
    return state.store_path.parent / GRAPHS_FOLDER


def locate(folder: Path, name: str) -> tuple[str, Path] | None:
    """(kind, file) for a name, or None: never a path outside `folder` (no separators, no `..`, no link out)."""
    if not NAME.fullmatch(name) or ".." in name:
        return None
    for kind, path in (("graph", folder / f"{name}.json"), ("circuit", folder / name / CIRCUIT_FILE)):
        if path.is_file() and path.resolve().is_relative_to(folder.resolve()):
            return kind, path
    return None


def names(folder: Path) -> list[str]:
    """Every servable name in the folder, sorted; a graph file wins over a circuit folder of the same name."""
    if not folder.is_dir():
        return []
    found = {p.name[: -len(".json")] for p in folder.glob("*.json")} | {
        p.parent.name for p in folder.glob(f"*/{CIRCUIT_FILE}")
    }
    return sorted(n for n in found if locate(folder, n) is not None)


def _served_hook(state: ServerState) -> str | None:
    return state.meta.get("hook_name")


def _feature_link(state: ServerState, hook: str | None, latent) -> str | None:
    """The feature page of a node that is a latent of the served dictionary, else None.

    A served cross-layer transcoder (hook `blocks.{i}...`, `layers` in its config) numbers its latents
    layer-major, so feature f of layer l is latent l * width + f.
    """
    if hook is None or not isinstance(latent, int):
        return None
    served = _served_hook(state) or ""
    if "{i}" in served:
        cfg = state.meta.get("dictionary") or {}
        layers = cfg.get("layers") or []
        width = int(cfg.get("d_sae") or 0) // max(1, len(layers))
        match = next((i for i, layer in enumerate(layers) if served.replace("{i}", str(layer)) == hook), None)
        if match is None or not 0 <= latent < width:
            return None
        latent = match * width + latent
    elif hook != served:
        return None
    return f"/feature/{latent}" if latent in state.latents else None


def _number(x) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _layer_order(layer: str) -> float:
    return -1 if layer == "E" else float(layer)


def graph_view(state: ServerState, doc: dict) -> dict:
    """An attribution graph (Neuronpedia's graph JSON) in the page's shape."""
    meta = doc.get("metadata") or {}
    tokens = [str(t) for t in meta.get("prompt_tokens") or []]
    raw = doc["nodes"]
    layers = sorted({str(n["layer"]) for n in raw}, key=_layer_order)
    logit_layers = {str(n["layer"]) for n in raw if KINDS.get(n.get("feature_type")) == "logit"}
    rows = ["emb" if x == "E" else "logit" if x in logit_layers else f"L{x}" for x in layers]
    row_of = {layer: row for row, layer in enumerate(layers)}
    nodes = []
    for n in raw:
        layer, pos = str(n["layer"]), int(n.get("ctx_idx", 0))
        kind = KINDS.get(n.get("feature_type"), "feature")
        label = n.get("clerp") or ""
        if kind == "embedding" and not label and 0 <= pos < len(tokens):
            label = f"token {tokens[pos]!r}"
        hook = f"blocks.{layer}.{INPUT_SUFFIX}" if kind == "feature" else None
        nodes.append({
            "id": str(n["node_id"]), "kind": kind, "pos": pos, "row": row_of[layer], "layer": layer,
            "feature": n.get("feature"), "label": label, "activation": _number(n.get("activation")),
            "influence": _number(n.get("influence")), "effect": None,
            "link": _feature_link(state, hook, n.get("feature")),
        })  # fmt: skip
    edges = [(str(e["source"]), str(e["target"]), e["weight"]) for e in doc["links"]]
    info = meta.get("info") or {}
    scores = {k: info.get(k) for k in ("replacement_score", "completeness_score") if k in info}
    title = meta.get("prompt") or "".join(tokens)
    return _view("graph", title, tokens, rows, nodes, edges, [], scores)


def circuit_view(state: ServerState, doc: dict) -> dict:
    """A sparse feature circuit (`saelab circuit`'s circuit.json) in the page's shape."""
    hooks = list(doc.get("hooks") or [])
    for hook in [n["hook"] for n in doc["nodes"]]:
        if hook not in hooks:
            hooks.append(hook)

    def node_id(n: dict) -> str:
        return f"{n['hook']}:{int(n['pos'])}:{int(n['latent'])}"

    nodes = []
    for n in doc["nodes"]:
        latent, hook = int(n["latent"]), n["hook"]
        nodes.append({
            "id": node_id(n), "kind": "error" if latent < 0 else "feature", "pos": int(n["pos"]),
            "row": hooks.index(hook), "layer": hook, "feature": latent,
            "label": f"{hook} error" if latent < 0 else f"{hook} #{latent}", "activation": None,
            "influence": None, "effect": _number(n.get("effect")), "link": _feature_link(state, hook, latent),
        })  # fmt: skip
    edges = [(node_id(e["source"]), node_id(e["target"]), e["weight"]) for e in doc["edges"]]
    curve = [
        {k: _number(p.get(k)) for k in ("threshold", "n_nodes", "faithfulness", "completeness")}
        for p in doc.get("curve") or []
    ]
    scores = {k: doc[k] for k in ("metric", "metric_full", "metric_empty", "nodes_for_f08") if k in doc}
    tokens = [str(t) for t in doc.get("tokens") or []]
    return _view("circuit", str(doc.get("task") or ""), tokens, hooks, nodes, edges, curve, scores)


def _view(kind, title, tokens, rows, nodes, edges, curve, scores) -> dict:
    """The shared shape; edges whose ends are not nodes, or whose weight is not finite, are dropped."""
    ids = {n["id"] for n in nodes}
    kept = [
        {"source": s, "target": t, "weight": float(w)}
        for s, t, w in edges
        if s in ids and t in ids and _number(w) is not None
    ]
    return {"kind": kind, "title": title, "tokens": tokens, "rows": rows, "nodes": nodes, "edges": kept,
            "curve": curve, "scores": scores}  # fmt: skip


def load_view(state: ServerState, name: str) -> dict:
    """The named graph or circuit in the page's shape; 404 for a name not in graphs/, GraphFileError for
    a file that is not one."""
    found = locate(graphs_folder(state), name)
    if found is None:
        raise HTTPException(
            404, f"no graph or circuit named {name!r} in {GRAPHS_FOLDER}/ of the served folder"
        )
    kind, path = found
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        view = graph_view(state, doc) if kind == "graph" else circuit_view(state, doc)
    except (OSError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # JSON errors too
        raise GraphFileError(f"{path.name} is not a readable {kind} file: {type(e).__name__} {e}") from None
    return {"name": name, **view}


def summaries(state: ServerState) -> list[dict]:
    """One row per name for the list: kind, prompt or task, counts (or why the file cannot be read)."""
    rows = []
    for name in names(graphs_folder(state)):
        try:
            v = load_view(state, name)
            rows.append({"name": name, "kind": v["kind"], "title": v["title"], "n_nodes": len(v["nodes"]),
                         "n_edges": len(v["edges"]), "error": None})  # fmt: skip
        except GraphFileError as e:
            rows.append(
                {"name": name, "kind": None, "title": "", "n_nodes": None, "n_edges": None, "error": str(e)}
            )
    return rows


def graphs_using(state: ServerState, idx: int) -> list[dict]:
    """The saved graphs and circuits with a node on latent `idx` of the served dictionary, for its
    feature page: [{name, kind, title, node, pos, token, value}] (value: the effect or activation)."""
    found = []
    for name in names(graphs_folder(state)):
        try:
            view = _cached_view(state, name)
        except GraphFileError:
            continue
        for n in view["nodes"]:
            if n.get("link") == f"/feature/{idx}":
                value = n["effect"] if n.get("effect") is not None else n.get("activation")
                token = view["tokens"][n["pos"]] if 0 <= n["pos"] < len(view["tokens"]) else ""
                found.append({"name": name, "kind": view["kind"], "title": view["title"], "node": n["id"],
                              "pos": n["pos"], "token": token, "value": value})  # fmt: skip
    return sorted(found, key=lambda r: -abs(r["value"] or 0.0))


_VIEWS: dict[tuple[str, str, float], dict] = {}


def _cached_view(state: ServerState, name: str) -> dict:
    """load_view, kept while the file is unchanged: feature pages would otherwise reread every graph."""
    found = locate(graphs_folder(state), name)
    if found is None:
        raise GraphFileError(f"{name} is gone")
    key = (str(graphs_folder(state)), name, found[1].stat().st_mtime)
    if key not in _VIEWS:
        for old in [k for k in _VIEWS if k[:2] == key[:2]]:  # an earlier version of this file
            del _VIEWS[old]
        _VIEWS[key] = load_view(state, name)
    return _VIEWS[key]


@router.get("/api/graphs")
def api_graphs(state: State) -> dict:
    """The graphs and circuits in graphs/ of the served folder: {items: [{name, kind, title, n_nodes, ...}]}."""
    return {"items": summaries(state)}


@router.get("/api/graphs/{name}")
def api_graph(name: str, state: State) -> dict:
    """One graph or circuit: {name, kind, title, tokens, rows, nodes, edges, curve, scores}; 404 unknown
    name, 422 a file that is not a graph or circuit."""
    try:
        return load_view(state, name)
    except GraphFileError as e:
        raise HTTPException(422, str(e)) from None


@router.get("/graphs", response_class=HTMLResponse, include_in_schema=False)
def graphs_page(request: Request, state: State):
    return page(request, state, "graphs.html", title="saelab: graphs", items=summaries(state),
                folder=GRAPHS_FOLDER)  # fmt: skip


@router.get("/graphs/{name}", response_class=HTMLResponse, include_in_schema=False)
def graph_page(request: Request, state: State, name: str):
    if locate(graphs_folder(state), name) is None:
        return page(request, state, "error.html", 404, message=f"no graph or circuit named {name!r}")
    return page(request, state, "graph.html", title=f"saelab: graph {name}", graph=name)
