"""Attribution graphs as Neuronpedia graph JSON (the format circuit-tracer writes and its viewer reads).

Node ids keep Neuronpedia's layout except for error nodes. circuit-tracer names an error node
`"0_{layer}_{pos}"`, which is also the id of the layer-0 feature `layer` at `pos` (seen: `0_10_2`), so
one node would silently replace the other. saelab's ids:

* feature: `"{layer}_{feature}_{pos}"` (digits only, layer below n_layers)
* error: `"err_{layer}_{pos}"` (the only ids starting with `err_`)
* token: `"E_{token_id}_{pos}"` (the only ids starting with `E_`)
* logit: `"{n_layers + 1}_{token_id}_{pos}"` (digits only, layer n_layers + 1, above every feature's)

so no two nodes can share an id. The viewer reads a node's kind from `feature_type`, not its id. A
feature node's `feature` is its index within its layer's transcoder (circuit-tracer adds a layer offset
only for the preset scans Neuronpedia hosts).
"""

from __future__ import annotations

import torch

from saelab.circuits.graph import Graph, PrunedGraph, cumulative_share, graph_scores, node_influence
from saelab.core.models import HookedLM

SCHEMA_VERSION = 1
FEATURE_TYPE = "cross layer transcoder"  # what Neuronpedia calls every transcoder feature node


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([token_id])
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def node_ids(graph: Graph) -> list[str]:
    """Every node's id, in the graph's node order."""
    ids = [f"{layer}_{feature}_{pos}" for layer, pos, feature in graph.features.tolist()]
    ids += [f"err_{layer}_{pos}" for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    ids += [f"E_{token}_{pos}" for pos, token in enumerate(graph.prompt_ids.tolist())]
    ids += [f"{graph.n_layers + 1}_{token}_{graph.n_pos - 1}" for token in graph.logit_tokens.tolist()]
    return ids


def _node(graph: Graph, index: int, node_id: str, influence: float, tokenizer, labels) -> dict:
    """One node in Neuronpedia's fields; `influence` is the node's cumulative influence share."""
    node = {"node_id": node_id, "jsNodeId": node_id, "influence": influence, "activation": None, "clerp": "",
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}  # fmt: skip
    if index < graph.n_features:
        layer, pos, feature = graph.features[index].tolist()
        label = labels.get((layer, feature), "")
        node.update(feature=feature, layer=str(layer), ctx_idx=pos, feature_type=FEATURE_TYPE, clerp=label,
                    jsNodeId=f"{layer}_{feature}-0", activation=float(graph.activations[index]))  # fmt: skip
    elif index < graph.token_index(0):
        layer, pos = divmod(index - graph.n_features, graph.n_pos)
        node.update(feature=-1, layer=str(layer), ctx_idx=pos, feature_type="mlp reconstruction error")
    elif index < graph.logit_index(0):
        pos = index - graph.token_index(0)
        token = int(graph.prompt_ids[pos])
        node.update(
            feature=pos, layer="E", ctx_idx=pos, feature_type="embedding", jsNodeId=f"E_{token}-{pos}"
        )
    else:
        k = index - graph.logit_index(0)
        token, prob = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k])
        node.update(feature=token, layer=str(graph.n_layers + 1), ctx_idx=graph.n_pos - 1, feature_type="logit",
                    token_prob=prob, is_target_logit=k == 0, jsNodeId=f"L_{token}-{graph.n_pos - 1}",
                    clerp=f'Output "{_token_text(tokenizer, token)}" (p={prob:.3f})')  # fmt: skip
    return node


def graph_json(
    graph: Graph | PrunedGraph,
    lm: HookedLM | None = None,
    labels: dict[tuple[int, int], str] | None = None,
    slug: str = "saelab-graph",
    scan: str | None = None,
    node_threshold: float | None = None,
) -> dict:
    """Neuronpedia graph JSON of a pruned graph (or of a whole graph: every node, every nonzero edge).

    `lm` supplies the tokenizer for token strings; `labels` maps (layer, feature) to a feature label
    (`clerp`). Only nodes with a kept edge appear, plus all tokens and logits.
    """
    labels = labels or {}
    tokenizer = lm.tokenizer if lm is not None else None
    if isinstance(graph, PrunedGraph):
        pruned, graph = graph, graph.graph
        keep, edges, cumulative = pruned.node_mask, pruned.edge_mask, pruned.cumulative
        scores = pruned.scores
    else:
        keep = torch.ones(graph.n_nodes, dtype=torch.bool)
        edges, scores = graph.adjacency != 0, graph_scores(graph)
        cumulative = cumulative_share(node_influence(graph))
    ids = node_ids(graph)
    targets, sources = (edges & keep[:, None] & keep[None, :]).nonzero(as_tuple=True)
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
        for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    always = graph.n_features + graph.n_errors  # tokens and logits from here on
    nodes = [
        _node(graph, i, ids[i], float(cumulative[i]), tokenizer, labels)
        for i in range(graph.n_nodes)
        if keep[i] and (ids[i] in linked or i >= always)
    ]
    prompt_tokens = [_token_text(tokenizer, t) for t in graph.prompt_ids.tolist()]
    prompt = tokenizer.decode(graph.prompt_ids.tolist()) if tokenizer is not None else " ".join(prompt_tokens)
    metadata = {
        "slug": slug,
        "scan": scan or f"{graph.transcoder_name or graph.model_name}-saelab-transcoders",
        "transcoder_list": [],
        "prompt_tokens": prompt_tokens,
        "prompt": prompt,
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "info": {
            "generator": {"name": "saelab"},
            "model": graph.model_name,
            "replacement_score": scores.replacement,
            "completeness_score": scores.completeness,
        },
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}
