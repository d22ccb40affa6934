"""Attribution graphs over per-layer transcoders: direct effects in one prompt's local replacement model.

Nodes, in this order: active features (layer, position, feature), error nodes (layer, position), token
embeddings (position) and the target logits. `Graph.adjacency[t, s]` is the direct effect of source `s`
on target `t`: on a feature's pre-activation, or on a target's demeaned logit (the logit minus the mean
logit over the vocabulary, i.e. the demeaned unembedding column). In the replacement model
(`saelab.circuits.replacement`) these maps are linear, so one backward pass per target row, with the
target's read direction injected as the gradient, gives its whole row exactly: gradient · contribution
at each source's write site. Rows are batched by running the frozen model on copies of the prompt; the
frozen model does not depend on the targets, so that forward runs once and every batch of rows is one
more backward pass through it. It stops at the final norm: a logit's read direction is carried back
through the (linear) unembedding once, so no batch pays for the vocabulary.

`prune` keeps the nodes and edges that carry most of the logits' influence and computes the
replacement and completeness scores (Ameisen et al. 2025, circuit-tracer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.circuits.replacement import ReplacementModel
from saelab.circuits.transcoders import Transcoders
from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.sets import DictionarySet
from saelab.errors import GraphError


@dataclass
class Graph:
    """One prompt's attribution graph. Node order: [features, errors, tokens, logits]."""

    prompt_ids: Tensor  # [n_pos]
    features: Tensor  # [n_features, 3]: layer, position, feature index
    activations: Tensor  # [n_features]
    logit_tokens: Tensor  # [n_logits] vocabulary ids
    logit_probabilities: Tensor  # [n_logits]
    adjacency: Tensor  # [n_nodes, n_nodes]: rows targets, columns sources
    n_layers: int
    model_name: str = ""
    transcoder_name: str | None = None
    zero_bos: bool = False

    @property
    def n_pos(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, k: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + k

    def logit_weights(self) -> Tensor:
        """w: the logit probabilities on the logit nodes, zero elsewhere (what influence is measured against)."""
        weights = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        weights[self.logit_index(0) :] = self.logit_probabilities.to(weights.dtype)
        return weights


# ---- building ----------------------------------------------------------------------------------
def logit_targets(logits: Tensor, probability: float = 0.95, max_logits: int = 10) -> tuple[Tensor, Tensor]:
    """(token ids, probabilities): the smallest top set of next tokens with cumulative probability ≥ `probability`."""
    if not 0 < probability <= 1 or max_logits < 1:
        raise GraphError(
            f"logit_probability must be in (0, 1] and max_logits at least 1; got {probability} and {max_logits}."
        )
    probs = torch.softmax(logits.double(), dim=-1)
    top_p, top_ids = probs.topk(min(max_logits, probs.numel()))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(probability, dtype=top_p.dtype))) + 1
    return top_ids[:cutoff], top_p[:cutoff].to(logits.dtype)


def _active_features(rm: ReplacementModel) -> Tensor:
    """[n, 3] (layer, pos, feature) of every nonzero activation, ordered by layer, position, feature."""
    rows = []
    for layer, acts in enumerate(rm.activations):
        where = acts.nonzero()
        rows.append(torch.cat([torch.full_like(where[:, :1], layer), where], dim=1))
    return torch.cat(rows).cpu()


def attribute(
    lm: HookedLM,
    transcoders: DictionarySet | Dictionary | Transcoders,
    prompt_ids,
    logit_probability: float = 0.95,
    max_logits: int = 10,
    max_feature_nodes: int | None = None,
    batch_size: int = 32,
    zero_bos: bool | None = None,
) -> Graph:
    """The attribution graph of one prompt (a 1-D sequence of token ids) over a per-layer transcoder set.

    Every active feature is a node, unless `max_feature_nodes` caps them: then, as in circuit-tracer,
    rows are computed greedily for the features with the most influence on the logits so far (a batch
    at a time) and only those features stay nodes; the others' effects leave the graph. Edges are
    exact either way. `zero_bos` (default: when the prompt starts with the tokenizer's BOS token)
    gives position 0 no feature or error nodes: its MLP outputs become constants, as circuit-tracer
    treats the attention sink.
    """
    if batch_size < 1 or (max_feature_nodes is not None and max_feature_nodes < 0):
        raise GraphError(
            f"batch_size must be at least 1 and max_feature_nodes at least 0; got {batch_size} and "
            f"{max_feature_nodes}."
        )
    rm = ReplacementModel(lm, transcoders, prompt_ids, zero_bos)
    features = _active_features(rm)
    tokens, probs = logit_targets(rm.logits[-1], logit_probability, max_logits)
    graph = Graph(
        prompt_ids=rm.input_ids.cpu(),
        features=features,
        activations=rm.activations_of(features).cpu(),
        logit_tokens=tokens.cpu(),
        logit_probabilities=probs.cpu(),
        adjacency=torch.zeros(0),
        n_layers=rm.n_layers,
        model_name=lm.name,
        transcoder_name=rm.transcoders.model_name,
        zero_bos=rm.zero_bos,
    )
    dtype = torch.promote_types(rm.dtype, torch.float32)  # half-precision models: sums of edges in float32
    graph.adjacency = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=dtype)
    every = max_feature_nodes is None or max_feature_nodes >= graph.n_features
    rows_at_once = graph.n_features if every else max_feature_nodes
    frozen = _FrozenPass(rm, graph, min(batch_size, max(graph.n_logits, rows_at_once)))
    _fill_rows(frozen, [graph.logit_index(k) for k in range(graph.n_logits)])
    if every:
        _fill_rows(frozen, list(range(graph.n_features)))
        return graph
    chosen = _greedy_features(frozen, max_feature_nodes)
    return _restricted(graph, chosen)


def _greedy_features(frozen: _FrozenPass, limit: int) -> Tensor:
    """Compute rows for the `limit` most influential features, a batch at a time; their indices, sorted."""
    graph = frozen.graph
    visited = torch.zeros(graph.n_features, dtype=torch.bool)
    weights = graph.logit_weights()
    while int(visited.sum()) < limit:
        scores = influence(normalized(graph.adjacency), weights)[: graph.n_features]
        scores[visited] = -1.0
        picked = scores.topk(min(frozen.batch, limit - int(visited.sum()))).indices
        _fill_rows(frozen, sorted(picked.tolist()))
        visited[picked] = True
    return visited.nonzero().flatten()


def _restricted(graph: Graph, chosen: Tensor) -> Graph:
    """The graph with only the `chosen` features (rows and columns); errors, tokens and logits all stay."""
    keep = torch.cat([chosen, torch.arange(graph.n_features, graph.n_nodes)])
    return Graph(
        **{
            **graph.__dict__,
            "features": graph.features[chosen],
            "activations": graph.activations[chosen],
            "adjacency": graph.adjacency[keep][:, keep],
        }
    )


@dataclass
class _Sources:
    """Every source (feature, error, token) as the vector it writes at its write site.

    Sites are the positions of the embeddings, then of each layer's MLP output; an edge is the
    target's gradient at the source's site · the source's write. Sources are grouped into pieces of
    at most `width` sources of one site, so a whole row is one batched product (padding stays
    bounded however unevenly the features are spread over sites).
    """

    piece_site: Tensor | None  # [n_pieces]: the site each piece reads the gradient at; None: one per site
    writes: Tensor  # [n_pieces, width, d]: the pieces' writes, zero-padded
    slots: Tensor  # [n_writes]: where each write's product lands among the flattened products
    # [n_writes]: the adjacency column of each write (None: write i is column i). A cross-layer
    # transcoder's feature writes at its own and every later layer: its edge sums those writes' products.
    columns: Tensor | None = None


def _sources(rm: ReplacementModel, graph: Graph) -> _Sources:
    n_pos, n_sites = graph.n_pos, (rm.n_layers + 1) * graph.n_pos
    device = rm.embeddings.device
    feature_writes, feature_sites, feature_columns = [], [], []
    for layer in range(rm.n_layers):
        chosen = (graph.features[:, 0] == layer).nonzero().flatten()
        p, f = graph.features[chosen, 1].to(device), graph.features[chosen, 2].to(device)
        acts = rm.activations[layer][p, f, None]
        for target in rm.targets(layer):  # one layer, or this and every later one (cross-layer)
            feature_writes.append(acts * rm.decoder(layer, target)[f])
            feature_sites.append((target + 1) * n_pos + p)
            feature_columns.append(chosen.to(device))
    # errors (layer by layer, position by position) and tokens: one column and one site each
    columns = torch.cat([*feature_columns, graph.n_features + torch.arange(n_sites, device=device)])
    writes = torch.cat([*feature_writes, *rm.errors, rm.embeddings])
    site = torch.cat(
        [*feature_sites, torch.arange(n_pos, n_sites, device=device), torch.arange(n_pos, device=device)]
    )
    sources = _pieces(site, writes, n_sites)
    if not torch.equal(columns, torch.arange(columns.numel(), device=device)):
        sources.columns = columns
    return sources


MAX_PADDING = 4.0  # padded writes may be this many times the unpadded ones before sites are split


def _pieces(site: Tensor, writes: Tensor, n_sites: int) -> _Sources:
    """Group sources by site: one piece per site, padded to the busiest site, unless that would make the
    writes more than MAX_PADDING times larger; then pieces of the average number of sources per site."""
    n = site.numel()
    counts = torch.bincount(site, minlength=n_sites)
    busiest, average = int(counts.max()), max(1, -(-n // n_sites))
    width = busiest if n_sites * busiest <= MAX_PADDING * (n + n_sites) else average
    order = torch.argsort(site, stable=True)
    rank = torch.empty_like(site)
    rank[order] = torch.arange(n, device=site.device) - (counts.cumsum(0) - counts)[site[order]]
    pieces = (-(-counts // width)).clamp(min=1)  # every site has a piece: one per site needs no gather
    piece = (pieces.cumsum(0) - pieces)[site] + rank // width
    slot = rank % width
    padded = writes.new_zeros(int(pieces.sum()), width, writes.shape[-1])
    padded[piece, slot] = writes
    piece_site = torch.repeat_interleave(torch.arange(n_sites, device=site.device), pieces)
    return _Sources(None if len(piece_site) == n_sites else piece_site, padded, piece * width + slot)


class _FrozenPass:
    """The frozen forward of `batch` copies of the prompt, run once, with a leaf at every write site.

    The frozen model is the same for every target, so each batch of rows is one more backward pass
    through this graph (kept with retain_graph), seeded with that batch's read directions.
    """

    def __init__(self, rm: ReplacementModel, graph: Graph, batch: int):
        self.rm, self.graph, self.batch = rm, graph, batch
        self.sources = _sources(rm, graph)
        self.logit_reads = rm.logit_directions(graph.logit_tokens.to(rm.embeddings.device))
        self.embeddings = rm.embeddings.expand(batch, -1, -1).clone().requires_grad_()
        self.outputs = [out.expand(batch, -1, -1).clone().requires_grad_() for out in rm.mlp_outputs]
        with torch.enable_grad():
            self.mlp_inputs, self.final = rm.forward_frozen(self.embeddings, self.outputs, logits=False)

    def gradients(self, chunk: list) -> Tensor:
        """[n_sites, len(chunk), d]: each target's gradient at every write site (embeddings, then MLP outputs).

        Copies beyond the chunk (a last, smaller chunk) carry no seed; sites the targets do not reach
        (later layers) get zeros.
        """
        roots, seeds = _seeds(self, chunk)
        leaves = [self.embeddings, *self.outputs]
        with torch.enable_grad():
            grads = torch.autograd.grad(roots, leaves, seeds, retain_graph=True, allow_unused=True)
        n = len(chunk)
        grads = [
            torch.zeros_like(leaf[:n]) if g is None else g[:n] for g, leaf in zip(grads, leaves, strict=True)
        ]
        return torch.stack([grad.transpose(0, 1) for grad in grads]).flatten(0, 1)


def _target(graph: Graph, node: int) -> tuple[str, int, int, int]:
    """What a row's node reads: (kind, layer, position, feature index or logit number)."""
    if node < graph.n_features:
        layer, pos, idx = graph.features[node].tolist()
        return "feature", layer, pos, idx
    return "logit", -1, graph.n_pos - 1, node - graph.logit_index(0)


def _fill_rows(frozen: _FrozenPass, nodes: list[int]) -> None:
    """Compute the adjacency rows of `nodes` into the graph's adjacency, `frozen.batch` rows per backward pass."""
    graph = frozen.graph
    for start in range(0, len(nodes), frozen.batch):
        chunk = nodes[start : start + frozen.batch]
        rows = _rows(frozen, [_target(graph, n) for n in chunk])
        graph.adjacency[chunk] = rows.to("cpu", graph.adjacency.dtype)


def _rows(frozen: _FrozenPass, chunk: list) -> Tensor:
    """Adjacency rows of a batch of targets: gradient · write at every source's site, in one product."""
    graph, sources = frozen.graph, frozen.sources
    grads = frozen.gradients(chunk)  # [n_sites, batch, d]
    at_pieces = grads if sources.piece_site is None else grads.index_select(0, sources.piece_site)
    products = torch.bmm(at_pieces, sources.writes.transpose(1, 2))  # [n_pieces, batch, width]
    result = grads.new_zeros(len(chunk), graph.n_nodes)
    edges = products.permute(1, 0, 2).flatten(1)[:, sources.slots]
    if sources.columns is None:
        result[:, : sources.slots.numel()] = edges
    else:
        result.index_add_(1, sources.columns, edges)
    return result


def _seeds(frozen: _FrozenPass, chunk: list) -> tuple[list[Tensor], list[Tensor]]:
    """The roots of the backward pass and the gradient injected at each: each target's read direction.

    A feature reads its layer's MLP input through its encoder column; a logit reads the final norm's
    output through its demeaned unembedding direction.
    """
    rm = frozen.rm
    roots: dict[int, Tensor] = {}  # by layer; -1: the final norm's output, read by the logits
    seeds: dict[int, Tensor] = {}
    for b, (_kind, layer, pos, idx) in enumerate(chunk):
        if layer not in roots:
            roots[layer] = frozen.final if layer < 0 else frozen.mlp_inputs[layer]
            seeds[layer] = torch.zeros_like(roots[layer])
        seeds[layer][b, pos] = frozen.logit_reads[idx] if layer < 0 else rm.encoder(layer)[:, idx]
    return list(roots.values()), list(seeds.values())


# ---- pruning and scores ------------------------------------------------------------------------
def normalized(adjacency: Tensor) -> Tensor:
    """Â: |A| with each row summing to one (rows without inputs stay zero)."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(matrix: Tensor, weights: Tensor, max_iter: int = 10_000) -> Tensor:
    """w·(M + M² + …): the total (indirect included) influence of each node on the weighted targets.

    The graph is a DAG, so the series ends after at most its depth.
    """
    current = weights @ matrix
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ matrix
        total += current
    raise GraphError("influence did not converge: the adjacency matrix has a cycle, so it is not a graph's.")


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the top scores that together hold `fraction` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    index = min(
        int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1
    )
    return ordered[index]


def node_influence(graph: Graph) -> Tensor:
    """Each node's total influence on the target logits, weighted by their probabilities."""
    return influence(normalized(graph.adjacency), graph.logit_weights())


def cumulative_share(scores: Tensor) -> Tensor:
    """For each node, the share of the total held by it and every node scoring higher (Neuronpedia's influence)."""
    ordered, order = scores.sort(descending=True)
    cumulative = torch.zeros_like(scores)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp(min=1e-30)
    return cumulative


@dataclass
class GraphScores:
    """Replacement score: token influence / (token + error influence). Completeness: the share of
    (influence + logit weight) that flows in through non-error inputs."""

    replacement: float
    completeness: float


def graph_scores(graph: Graph, adjacency: Tensor | None = None) -> GraphScores:
    """The scores of `graph`, or of its pruned adjacency when one is given."""
    matrix = normalized(graph.adjacency if adjacency is None else adjacency)
    weights = graph.logit_weights()
    influences = influence(matrix, weights)
    errors = slice(graph.n_features, graph.n_features + graph.n_errors)
    tokens = slice(graph.token_index(0), graph.token_index(0) + graph.n_pos)
    token_influence, error_influence = influences[tokens].sum(), influences[errors].sum()
    replacement = token_influence / (token_influence + error_influence).clamp(min=1e-30)
    non_error = 1 - matrix[:, errors].sum(dim=1)
    output = influences + weights
    completeness = (non_error * output).sum() / output.sum()
    return GraphScores(float(replacement), float(completeness))


@dataclass
class PrunedGraph:
    """A graph with the nodes and edges kept by `prune`, each node's influence, and the scores."""

    graph: Graph
    node_mask: Tensor  # [n_nodes] bool
    edge_mask: Tensor  # [n_nodes, n_nodes] bool
    influence: Tensor  # [n_nodes]: each node's influence on the logits (full graph)
    cumulative: Tensor  # [n_nodes]: share of total influence held by nodes at least this influential
    scores: GraphScores  # of the full graph
    pruned_scores: GraphScores  # of the kept nodes and edges only

    @property
    def adjacency(self) -> Tensor:
        """The graph's adjacency with everything not kept set to zero."""
        return self.graph.adjacency * self.edge_mask


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Keep the nodes holding `node_threshold` of the logits' influence (tokens and logits always), then
    the edges holding `edge_threshold` of the edge influence among them; drop nodes left without edges."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise GraphError(f"{name} must be between 0 and 1; got {value}.")
    weights = graph.logit_weights()
    influences = node_influence(graph)
    keep = influences >= _threshold(influences, node_threshold)
    inner = graph.n_features + graph.n_errors  # features and errors; tokens and logits follow
    keep[inner:] = True
    kept = graph.adjacency * (keep[:, None] & keep[None, :])
    kept_matrix = normalized(kept)
    edge_scores = kept_matrix * (influence(kept_matrix, weights) + weights)[:, None]
    edges = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
    edges &= kept != 0
    keep, edges = _drop_dangling(graph, keep, edges, inner)
    cumulative = cumulative_share(influences)
    full, kept_scores = graph_scores(graph), graph_scores(graph, graph.adjacency * edges)
    return PrunedGraph(graph, keep, edges, influences, cumulative, full, kept_scores)


def _drop_dangling(graph: Graph, keep: Tensor, edges: Tensor, inner: int) -> tuple[Tensor, Tensor]:
    """Repeatedly drop features and errors without outgoing edges, and features without incoming ones."""
    while True:
        edges = edges & keep[:, None] & keep[None, :]
        new = keep.clone()
        new[:inner] &= edges[:, :inner].any(0)
        new[: graph.n_features] &= edges[: graph.n_features].any(1)
        if torch.equal(new, keep):
            return keep, edges
        keep = new
