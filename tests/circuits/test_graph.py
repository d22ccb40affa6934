"""Attribution graphs on tiny random models with random JumpReLU transcoders at every layer: the
replacement model is exact, every edge equals the direct effect measured by intervening on its source
in the frozen replacement model, graphs do not depend on batching, and graph JSON ids never collide."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.circuits import graph as graph_module
from saelab.circuits import replacement
from saelab.circuits.graph import Graph, attribute, graph_scores, influence, normalized, prune
from saelab.circuits.graph_json import graph_json, node_ids
from saelab.circuits.replacement import ReplacementModel
from saelab.core.models import HookedLM
from saelab.dictionaries.sets import dictionary_set
from saelab.errors import DictionarySetError, GraphError, TextTooLongError
from tests.helpers import make_model, make_tokenizer, random_clt, random_dictionary

D_MODEL, D_TC, N_LAYERS = 8, 16, 2
PROMPT = [1, 5, 9, 17, 30, 8]  # starts with <bos>
OTHER = [7, 40, 12, 99, 3]
KINDS = ["llama", "gpt2"]


# other layouts: parallel residual, norm gain stored as 1 + weight, sandwich norms, post-norms
OTHER_LAYOUTS = {
    "gpt_neox": {},
    "gpt_neox_sequential": {"use_parallel_residual": False},
    "gemma": {},
    "gemma2": {"final_logit_softcapping": None},  # soft-capped logits are refused (tested below)
    "olmo2": {},
}


def tiny_lm(kind: str, dtype=torch.float64, **overrides) -> HookedLM:
    model = make_model(kind.removesuffix("_sequential"), n_layers=N_LAYERS, hidden=D_MODEL, **overrides)
    return HookedLM(model.to(dtype), make_tokenizer(), name=kind)


def transcoder(layer: int, dtype=torch.float64, hook_in="ln2.hook_normalized", hook_out="hook_mlp_out"):
    """A random JumpReLU transcoder with low thresholds, so that several features fire at each position."""
    return random_dictionary(layer, D_MODEL, D_TC, hook_in, hook_out).to(dtype)


def transcoders(dtype=torch.float64, **hooks):
    return dictionary_set([transcoder(layer, dtype, **hooks) for layer in range(N_LAYERS)], model_name="tiny")


@pytest.fixture(scope="module", params=KINDS)
def setup(request):
    lm, dset = tiny_lm(request.param), transcoders()
    return lm, dset, attribute(lm, dset, PROMPT)


# ---- 1. the replacement model is exact ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_the_replacement_model_reproduces_the_logits(kind, dtype):
    lm, dset = tiny_lm(kind, dtype), transcoders(dtype)
    rm = ReplacementModel(lm, dset, PROMPT)
    assert all(int((acts != 0).sum()) >= 10 for acts in rm.activations)  # features do fire
    assert all(float(err.abs().max()) > 1e-3 for err in rm.errors)  # and the transcoders are not exact
    with torch.no_grad():
        real = lm.forward(torch.tensor(PROMPT))[0]
    _, logits = rm.run()
    torch.testing.assert_close(logits, real, atol=1e-5, rtol=0)
    for layer in range(N_LAYERS):  # with BOS zeroed, position 0 has no nodes; elsewhere tc + error = MLP
        torch.testing.assert_close(
            rm.output(layer, rm.activations)[1:] + rm.errors[layer][1:], rm.mlp_outputs[layer][1:]
        )
    assert rm.zero_bos and not rm.activations[0][0].any() and not rm.errors[0][0].any()


@pytest.mark.parametrize("kind", KINDS)
def test_the_replacement_model_is_linear_in_its_nodes(kind):
    """With attention patterns and norm scales frozen, doubling every node doubles every change."""
    lm, dset = tiny_lm(kind), transcoders()
    rm = ReplacementModel(lm, dset, PROMPT)
    zero = rm.run([a * 0 for a in rm.activations], [e * 0 for e in rm.errors], rm.embeddings * 0)[1]
    one = rm.run()[1]
    half = rm.run([a * 0.5 for a in rm.activations], [e * 0.5 for e in rm.errors], rm.embeddings * 0.5)[1]
    torch.testing.assert_close(half - zero, (one - zero) / 2, atol=1e-10, rtol=1e-8)
    assert (one - zero).abs().max() > 0.1


# ---- 2. every edge is a measured direct effect --------------------------------------------------
def _readouts(rm: ReplacementModel, graph: Graph, ins, logits) -> torch.Tensor:
    """Each target's value: feature pre-activations, then demeaned target logits."""
    values = [rm.preactivations(layer, ins[layer][pos])[idx] for layer, pos, idx in graph.features.tolist()]
    last = logits[-1]
    values += [last[tok] - last.mean() for tok in graph.logit_tokens.tolist()]
    return torch.stack(values)


def _without(rm: ReplacementModel, graph: Graph, source: int):
    """Run the frozen replacement model with one source node set to zero, all other nodes held fixed."""
    acts = [a.clone() for a in rm.activations]
    errors = [e.clone() for e in rm.errors]
    embeddings = rm.embeddings.clone()
    if source < graph.n_features:
        layer, pos, idx = graph.features[source].tolist()
        acts[layer][pos, idx] = 0
    elif source < graph.token_index(0):
        layer, pos = divmod(source - graph.n_features, graph.n_pos)
        errors[layer][pos] = 0
    else:
        embeddings[source - graph.token_index(0)] = 0
    return rm.run(acts, errors, embeddings)


def test_every_edge_equals_the_effect_of_removing_its_source(setup):
    _check_every_edge(*setup)


@pytest.mark.parametrize("kind", OTHER_LAYOUTS)
def test_every_edge_is_exact_in_the_other_block_layouts(kind):
    lm, dset = tiny_lm(kind, **OTHER_LAYOUTS[kind]), transcoders()
    _check_every_edge(lm, dset, attribute(lm, dset, PROMPT))


def _check_every_edge(lm: HookedLM, dset, graph: Graph) -> None:
    rm = ReplacementModel(lm, dset, PROMPT)
    base = _readouts(rm, graph, *rm.run())
    rows = list(range(graph.n_features)) + [graph.logit_index(k) for k in range(graph.n_logits)]
    n_sources = graph.logit_index(0)
    measured = torch.stack(
        [base - _readouts(rm, graph, *_without(rm, graph, s)) for s in range(n_sources)], 1
    )
    got = graph.adjacency[rows][:, :n_sources]
    torch.testing.assert_close(got[: graph.n_features], measured[: graph.n_features], atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(got[graph.n_features :], measured[graph.n_features :], atol=1e-8, rtol=1e-6)
    assert measured.abs().max() > 0.1 and (measured != 0).sum() > graph.n_features  # a real, nonempty graph
    # error and token nodes have no inputs, nothing reads the logits, and effects only go forward
    assert not graph.adjacency[graph.n_features : graph.logit_index(0)].any()
    assert not graph.adjacency[:, graph.logit_index(0) :].any()
    for t, (layer_t, pos_t, _) in enumerate(graph.features.tolist()):
        for s, (layer_s, pos_s, _) in enumerate(graph.features.tolist()):
            if layer_s >= layer_t or pos_s > pos_t:
                assert graph.adjacency[t, s] == 0


def test_every_edge_holds_in_float32_within_the_reference_tolerances():
    """circuit-tracer's own check: activations atol 1e-3, logits 1e-5 (here on the llama layout)."""
    lm, dset = tiny_lm("llama", torch.float32), transcoders(torch.float32)
    graph = attribute(lm, dset, PROMPT)
    rm = ReplacementModel(lm, dset, PROMPT)
    base = _readouts(rm, graph, *rm.run())
    for s in range(graph.logit_index(0)):
        effect = base - _readouts(rm, graph, *_without(rm, graph, s))
        got = graph.adjacency[list(range(graph.n_features)), s]
        torch.testing.assert_close(got, effect[: graph.n_features], atol=1e-3, rtol=0)
        got = graph.adjacency[[graph.logit_index(k) for k in range(graph.n_logits)], s]
        torch.testing.assert_close(got, effect[graph.n_features :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_models_are_attributed_not_refused(kind):
    """Half precision recomputes norms less exactly: the freezing checks allow for it; edges sum in float32."""
    graph = attribute(tiny_lm(kind, torch.bfloat16), transcoders(torch.bfloat16), torch.tensor([PROMPT]))
    exact = attribute(tiny_lm(kind), transcoders(), PROMPT)
    assert graph.adjacency.dtype == torch.float32 and torch.equal(graph.features, exact.features)
    error = (graph.adjacency.double() - exact.adjacency).abs().max()
    assert error < 0.1 * exact.adjacency.abs().max()


def test_logit_targets_are_the_smallest_top_set_reaching_the_probability(setup):
    lm, _, graph = setup
    with torch.no_grad():
        probs = torch.softmax(lm.forward(torch.tensor(PROMPT))[0, -1], -1)
    top = probs.sort(descending=True)
    k = graph.n_logits
    assert graph.logit_tokens.tolist() == top.indices[:k].tolist()
    torch.testing.assert_close(graph.logit_probabilities, top.values[:k])
    assert k == 10 or (top.values[:k].sum() >= 0.95 and top.values[: k - 1].sum() < 0.95)
    small = attribute(lm, setup[1], PROMPT, logit_probability=1e-9, max_logits=3)
    assert small.logit_tokens.tolist() == top.indices[:1].tolist()


def test_a_feature_cap_keeps_the_most_influential_features_with_exact_edges(setup):
    lm, dset, graph = setup
    same = attribute(lm, dset, PROMPT, max_feature_nodes=graph.n_features)
    torch.testing.assert_close(same.adjacency, graph.adjacency, atol=1e-12, rtol=1e-10)
    capped = attribute(lm, dset, PROMPT, max_feature_nodes=5, batch_size=2)
    assert capped.n_features == 5 and capped.n_nodes == graph.n_nodes - graph.n_features + 5
    full_index = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    chosen = torch.tensor([full_index[tuple(f)] for f in capped.features.tolist()])
    assert chosen.tolist() == sorted(chosen.tolist())  # node order stays layer, position, feature
    keep = torch.cat([chosen, torch.arange(graph.n_features, graph.n_nodes)])
    torch.testing.assert_close(capped.adjacency, graph.adjacency[keep][:, keep], atol=1e-12, rtol=1e-10)
    # the first pick is the feature with the most influence through the logit rows alone
    logit_rows_only = graph.adjacency.clone()
    logit_rows_only[: graph.n_features] = 0
    first = influence(normalized(logit_rows_only), graph.logit_weights())[: graph.n_features].argmax()
    one = attribute(lm, dset, PROMPT, max_feature_nodes=1, batch_size=1)
    assert one.features.tolist() == [graph.features[first].tolist()]
    assert attribute(lm, dset, PROMPT, max_feature_nodes=0).n_features == 0


# ---- 3. batching and independence ---------------------------------------------------------------
def test_the_graph_does_not_depend_on_how_rows_are_batched(setup):
    lm, dset, graph = setup
    for batch_size in (1, 7):
        other = attribute(lm, dset, PROMPT, batch_size=batch_size)
        torch.testing.assert_close(other.adjacency, graph.adjacency, atol=1e-12, rtol=1e-10)
        assert torch.equal(other.features, graph.features)


def _reference_rows(rm: ReplacementModel, graph: Graph) -> torch.Tensor:
    """The target rows computed the straightforward way: for each target alone, a frozen forward through the
    logits, one backward from its value (pre-activation or demeaned logit), then gradient · write per source."""
    rows = []
    for node in list(range(graph.n_features)) + [graph.logit_index(k) for k in range(graph.n_logits)]:
        embeddings = rm.embeddings[None].clone().requires_grad_()
        outputs = [out[None].clone().requires_grad_() for out in rm.mlp_outputs]
        with torch.enable_grad():
            ins, logits = rm.forward_frozen(embeddings, outputs)
            if node < graph.n_features:
                layer, pos, idx = graph.features[node].tolist()
                value = ins[layer][0, pos] @ rm.encoder(layer)[:, idx]
            else:
                last, token = logits[0, -1], graph.logit_tokens[node - graph.logit_index(0)]
                value = last[token] - last.mean()
            grads = torch.autograd.grad(value, [embeddings, *outputs], allow_unused=True)
        grad_emb, *grad_outs = [
            torch.zeros(rm.n_pos, D_MODEL, dtype=rm.dtype) if g is None else g[0] for g in grads
        ]
        row = torch.zeros(graph.n_nodes, dtype=graph.adjacency.dtype)
        for i, (layer, pos, idx) in enumerate(graph.features.tolist()):
            act = rm.activations[layer][pos, idx]  # a cross-layer feature writes to every target layer
            row[i] = sum(grad_outs[t][pos] @ (act * rm.decoder(layer, t)[idx]) for t in rm.targets(layer))
        for layer in range(graph.n_layers):
            for pos in range(graph.n_pos):
                row[graph.error_index(layer, pos)] = grad_outs[layer][pos] @ rm.errors[layer][pos]
        for pos in range(graph.n_pos):
            row[graph.token_index(pos)] = grad_emb[pos] @ rm.embeddings[pos]
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", [*KINDS, "gpt_neox", "gemma"])
def test_batched_rows_equal_rows_computed_one_target_at_a_time(kind):
    """The shared forward, the seeds at the final norm and the batched products change nothing."""
    lm, dset = tiny_lm(kind, **OTHER_LAYOUTS.get(kind, {})), transcoders()
    graph = attribute(lm, dset, PROMPT, batch_size=3)
    rows = list(range(graph.n_features)) + [graph.logit_index(k) for k in range(graph.n_logits)]
    reference = _reference_rows(ReplacementModel(lm, dset, PROMPT), graph)
    torch.testing.assert_close(graph.adjacency[rows], reference, atol=1e-12, rtol=1e-10)


def test_sources_split_over_pieces_give_the_same_graph(setup, monkeypatch):
    """With padding refused, busy write sites are split into pieces read through a gather: same edges."""
    lm, dset, graph = setup
    rm = ReplacementModel(lm, dset, PROMPT)
    assert graph_module._sources(rm, graph).piece_site is None  # by default: one piece per site
    monkeypatch.setattr(graph_module, "MAX_PADDING", 0.0)
    assert graph_module._sources(rm, graph).piece_site is not None
    torch.testing.assert_close(
        attribute(lm, dset, PROMPT, batch_size=5).adjacency, graph.adjacency, atol=1e-12, rtol=1e-10
    )


@pytest.mark.parametrize("kind", KINDS)
def test_logit_directions_are_demeaned_unembedding_rows(kind):
    lm, dset = tiny_lm(kind), transcoders()
    rm = ReplacementModel(lm, dset, PROMPT)
    unembed = lm.unembed.detach()
    tokens = torch.tensor([3, 17])
    torch.testing.assert_close(rm.logit_directions(tokens), unembed[tokens] - unembed.mean(0))


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_pass_leaves_the_model_as_it_was(kind):
    """MLPs are skipped and attention made eager (float32 and below) only while frozen; no hook outlives it."""
    lm, dset = tiny_lm(kind, torch.float32), transcoders(torch.float32)
    attention = lm.model.config._attn_implementation
    rm = ReplacementModel(lm, dset, PROMPT)
    with rm.frozen(rm.embeddings[None], [out[None] for out in rm.mlp_outputs], {}):
        assert lm.model.config._attn_implementation == "eager" != attention
        assert all("forward" in block.mlp.__dict__ for block in lm.blocks)
    with torch.no_grad():
        before = lm.forward(torch.tensor([OTHER]))
    attribute(lm, dset, PROMPT)
    rm.run()
    assert lm.model.config._attn_implementation == attention
    assert all("forward" not in block.mlp.__dict__ for block in lm.blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(lm.forward(torch.tensor([OTHER])), before, atol=0, rtol=0)


def test_graphs_of_different_prompts_are_independent_and_deterministic(setup):
    lm, dset, graph = setup
    other = attribute(lm, dset, OTHER)
    again = attribute(lm, dset, PROMPT)
    assert torch.equal(again.adjacency, graph.adjacency) and torch.equal(again.features, graph.features)
    assert other.n_pos == len(OTHER) and not other.zero_bos  # no BOS here: position 0 has nodes
    assert (other.features[:, 1] == 0).any()
    torch.testing.assert_close(attribute(lm, dset, OTHER).adjacency, other.adjacency, atol=0, rtol=0)


# ---- pruning and scores -------------------------------------------------------------------------
def test_influence_sums_the_series_of_the_normalised_matrix():
    matrix = torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [0.2, 0.8, 0]], dtype=torch.float64)
    weights = torch.tensor([0.0, 0, 1], dtype=torch.float64)
    series = weights @ (matrix + matrix @ matrix)
    torch.testing.assert_close(influence(matrix, weights), series)
    torch.testing.assert_close(
        normalized(torch.tensor([[2.0, -2.0], [0.0, 0.0]])), torch.tensor([[0.5, 0.5], [0, 0]])
    )
    with pytest.raises(GraphError, match="cycle"):
        influence(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0]), max_iter=50)


def test_pruning_keeps_tokens_logits_and_connected_influential_nodes(setup):
    _, _, graph = setup
    pruned = prune(graph, node_threshold=0.8, edge_threshold=0.98)
    inner = graph.n_features + graph.n_errors
    assert pruned.node_mask[inner:].all()
    kept = pruned.node_mask[:inner]
    assert 0 < int(kept.sum()) < inner  # something is kept, something is dropped
    assert not pruned.edge_mask[~pruned.node_mask].any() and not pruned.edge_mask[:, ~pruned.node_mask].any()
    for i in kept.nonzero().flatten().tolist():  # every kept feature or error has an outgoing edge
        assert pruned.edge_mask[:, i].any()
    for i in pruned.node_mask[: graph.n_features].nonzero().flatten().tolist():
        assert pruned.edge_mask[i].any()  # and every kept feature an incoming one
    # features and errors are kept by rank: those within 0.8 of the cumulative influence
    cutoff = pruned.cumulative[pruned.cumulative >= 0.8].min()
    assert pruned.cumulative[: graph.n_features + graph.n_errors][kept].max() <= cutoff
    assert pruned.cumulative[pruned.influence.argmax()] == pruned.cumulative.min()
    assert float(pruned.cumulative.max()) == pytest.approx(1.0)
    everything = prune(graph, node_threshold=1.0, edge_threshold=1.0)
    assert everything.node_mask.sum() >= pruned.node_mask.sum()
    assert 0 < pruned.scores.replacement <= 1 and 0 < pruned.scores.completeness <= 1
    assert pruned.scores == graph_scores(graph)
    with pytest.raises(GraphError, match="node_threshold"):
        prune(graph, node_threshold=1.5)


def test_scores_are_one_without_errors_and_fall_with_them(setup):
    _, _, graph = setup
    no_errors = Graph(**{**graph.__dict__, "adjacency": graph.adjacency.clone()})
    no_errors.adjacency[:, graph.n_features : graph.token_index(0)] = 0
    scores = graph_scores(no_errors)
    assert scores.replacement == pytest.approx(1.0) and scores.completeness == pytest.approx(1.0)
    real = graph_scores(graph)
    assert real.replacement < 1 and real.completeness < 1


# ---- 4. Neuronpedia JSON ------------------------------------------------------------------------
def test_graph_json_has_neuronpedia_fields_and_consistent_links(setup):
    lm, _, graph = setup
    pruned = prune(graph)
    labels = {tuple(graph.features[0, [0, 2]].tolist()): "a label"}
    data = json.loads(json.dumps(graph_json(pruned, lm, labels=labels, slug="tiny", node_threshold=0.8)))
    meta = data["metadata"]
    assert {
        "slug",
        "scan",
        "transcoder_list",
        "prompt_tokens",
        "prompt",
        "node_threshold",
        "schema_version",
    } <= set(meta)
    assert meta["slug"] == "tiny" and meta["prompt_tokens"] == ["<bos>", "w1", "w5", "w13", "w26", "w4"]
    assert {"pinnedIds", "supernodes", "linkType"} <= set(data["qParams"])
    ids = [node["node_id"] for node in data["nodes"]]
    assert len(ids) == len(set(ids))
    fields = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
              "activation", "token_prob", "is_target_logit"}  # fmt: skip
    assert all(fields <= set(node) for node in data["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in data["links"])
    assert len(data["links"]) == int(pruned.edge_mask.sum())
    kinds = {node["feature_type"] for node in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    logits = [node for node in data["nodes"] if node["feature_type"] == "logit"]
    assert len(logits) == graph.n_logits and sum(node["is_target_logit"] for node in logits) == 1
    assert logits[0]["node_id"] == f"{N_LAYERS + 1}_{int(graph.logit_tokens[0])}_{len(PROMPT) - 1}"
    whole = graph_json(graph, lm, labels=labels)  # every node with a nonzero edge
    assert len(whole["nodes"]) > len(data["nodes"])
    first = next(node for node in whole["nodes"] if node["node_id"] == node_ids(graph)[0])
    assert first["clerp"] == "a label" and first["activation"] == pytest.approx(float(graph.activations[0]))


def test_error_ids_cannot_collide_with_layer_0_feature_ids():
    """circuit-tracer would give error (layer 1, pos 2) and layer-0 feature 1 at pos 2 the same id 0_1_2."""
    features = torch.tensor([[0, 2, 1], [0, 2, 10], [1, 2, 0]])
    n_pos, n_layers = 3, 11
    graph = Graph(
        prompt_ids=torch.tensor([4, 5, 6]), features=features, activations=torch.ones(3),
        logit_tokens=torch.tensor([7]), logit_probabilities=torch.tensor([1.0]),
        adjacency=torch.zeros(3 + n_layers * n_pos + n_pos + 1, 3 + n_layers * n_pos + n_pos + 1), n_layers=n_layers,
    )  # fmt: skip
    ids = node_ids(graph)
    assert len(ids) == graph.n_nodes == len(set(ids))
    assert ids[0] == "0_1_2" and ids[graph.error_index(1, 2)] == "err_1_2"
    assert ids[1] == "0_10_2" and ids[graph.error_index(10, 2)] == "err_10_2"
    assert ids[graph.logit_index(0)] == "12_7_2" and ids[graph.token_index(2)] == "E_6_2"


# ---- refusals -----------------------------------------------------------------------------------
def test_unusable_sets_and_prompts_are_refused():
    lm = tiny_lm("llama")
    with pytest.raises(DictionarySetError, match="ln2.hook_normalized"):
        attribute(lm, transcoders(hook_in="hook_resid_pre", hook_out="hook_resid_post"), PROMPT)
    with pytest.raises(DictionarySetError, match="missing layers"):
        attribute(lm, dictionary_set([transcoder(0)]), PROMPT)
    with pytest.raises(TextTooLongError, match="at most 64"):
        attribute(lm, transcoders(), [5] * 65)
    with pytest.raises(GraphError, match="non-empty"):
        attribute(lm, transcoders(), [])


def test_models_that_are_not_linear_once_frozen_are_refused(monkeypatch):
    with pytest.raises(GraphError, match="soft-caps its logits"):
        attribute(tiny_lm("gemma2"), transcoders(), PROMPT)
    # were attention patterns left live, the frozen model would not be linear: the check catches it
    monkeypatch.setattr(replacement, "_replay_qk", lambda site: lambda *_: None)
    with pytest.raises(GraphError, match="not linear"):
        attribute(tiny_lm("llama"), transcoders(), PROMPT)


# ---- 6. cross-layer transcoders -------------------------------------------------------------------
def clt(dtype=torch.float64):
    """A random CLT over both layers: layer 0's features write to layers 0 and 1."""
    return random_clt(N_LAYERS, D_MODEL, D_TC).to(dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cross_layer_replacement_model_reproduces_the_logits(kind):
    lm, transcoders_ = tiny_lm(kind), clt()
    rm = ReplacementModel(lm, transcoders_, PROMPT)
    assert list(rm.targets(0)) == [0, 1] and list(rm.targets(1)) == [1]
    assert all(int((acts != 0).sum()) >= 10 for acts in rm.activations)
    with torch.no_grad():
        real = lm.forward(torch.tensor(PROMPT))[0]
    torch.testing.assert_close(rm.run()[1], real, atol=1e-5, rtol=0)
    # layer 1's MLP output holds what layer 0's features write to it
    only_layer0 = [rm.activations[0], torch.zeros_like(rm.activations[1])]
    expected = rm.activations[0] @ rm.decoder(0, 1) + rm.transcoders.b_dec(1)
    torch.testing.assert_close(rm.output(1, only_layer0), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_every_cross_layer_edge_equals_the_effect_of_removing_its_source(kind):
    lm, transcoders_ = tiny_lm(kind), clt()
    graph = attribute(lm, transcoders_, PROMPT)
    _check_every_edge(lm, transcoders_, graph)
    rows = list(range(graph.n_features)) + [graph.logit_index(k) for k in range(graph.n_logits)]
    reference = _reference_rows(ReplacementModel(lm, transcoders_, PROMPT), graph)
    torch.testing.assert_close(graph.adjacency[rows], reference, atol=1e-12, rtol=1e-10)
    for batch_size in (1, 5):
        other = attribute(lm, transcoders_, PROMPT, batch_size=batch_size)
        torch.testing.assert_close(other.adjacency, graph.adjacency, atol=1e-12, rtol=1e-10)
    # a layer-0 feature's edge to a logit includes its direct write to layer 1 (a per-layer set has none)
    without_bridge = clt()
    with torch.no_grad():
        without_bridge.W_dec[0][:, 1] = 0
    bridged = attribute(lm, without_bridge, PROMPT)
    assert not torch.allclose(bridged.adjacency, graph.adjacency)
    document = graph_json(prune(graph), lm)
    ids = [node["node_id"] for node in document["nodes"]]
    assert len(ids) == len(set(ids))


def test_cross_layer_transcoders_that_miss_a_layer_are_refused():
    lm = tiny_lm("llama")
    short = random_clt(1, D_MODEL, D_TC).double()
    with pytest.raises(DictionarySetError, match="every MLP must be replaced"):
        attribute(lm, short, PROMPT)
