"""saelab.analysis.features checked against brute-force computations on a tiny random Llama (no downloads)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from saelab.analysis.features import HIST_EDGES, AnalysisConfig, analyze, state_path_for
from saelab.analysis.store import FeatureStore
from saelab.core.data import DataConfig
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.errors import DimensionMismatchError, RunFolderError
from tests.helpers import random_topk_sae, save_model, write_corpus

D, D_SAE, CTX = 32, 64, 16
HOOK = "blocks.0.hook_resid_post"


def _cfg(**kw) -> AnalysisConfig:
    base = dict(
        n_tokens=24 * CTX, batch_contexts=4, top_k=5, n_quantiles=4, per_quantile=3, reservoir_size=12,
        window_left=4, window_right=2, coactivation_top=6, logit_top=5, neighbours=4, geometry_chunk=24,
        checkpoint_every_batches=2,
    )  # fmt: skip
    return AnalysisConfig(**(base | kw))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    save_model(root / "model", hidden=D, n_layers=2)
    corpus = write_corpus(root / "corpus.jsonl", n_docs=150)
    lm = load_model(root / "model", device="cpu", dtype=torch.float32)
    data = DataConfig(source=str(corpus), split="all", context_size=CTX)
    sae = random_topk_sae(D, D_SAE, HOOK)
    cfg = _cfg()
    path = root / "one.db"
    summary = analyze(lm, sae, data, cfg, path, progress=False)
    return lm, sae, data, cfg, path, summary, root


@pytest.fixture(scope="module")
def reference(setup):
    """Every activation of the same batches, kept at once, and what the analysis should find from them."""
    lm, sae, data, cfg, *_ = setup
    n_ctx = math.ceil(cfg.n_tokens / CTX)
    ids, acts = [], []
    with torch.no_grad():
        for batch in data.batches(lm.tokenizer, cfg.batch_contexts, max_contexts=n_ctx):
            keep = ~data.mask(batch, lm.tokenizer)
            acts.append(sae.encode(lm.capture(batch, HOOK)[HOOK]) * keep[..., None])
            ids.append(batch)
    ids, acts = torch.cat(ids), torch.cat(acts)
    keep = ~data.mask(ids, lm.tokenizer)
    return ids, acts, keep


def test_statistics_match_brute_force(setup, reference):
    *_, cfg, path, summary, _ = setup
    ids, acts, keep = reference
    flat = acts.reshape(-1, D_SAE)
    n_active = (flat > 0).sum(0)
    assert summary == {"complete": True, "batches": 6, "contexts": 24, "tokens": int(keep.sum())}
    with FeatureStore(path, create=False) as store:
        rows = {f["idx"]: f for f in store.list_features(sort="idx", descending=False, limit=10_000)}
        assert len(rows) == D_SAE and n_active.sum() > 0
        for latent in range(D_SAE):
            row, values = rows[latent], flat[:, latent][flat[:, latent] > 0]
            assert row["n_active"] == len(values)
            assert row["density"] == pytest.approx(len(values) / int(keep.sum()))
            assert row["max_act"] == pytest.approx(float(values.max()) if len(values) else 0.0, rel=1e-6)
            mean = float(values.double().mean()) if len(values) else 0.0
            assert row["mean_act"] == pytest.approx(mean, rel=1e-5)
            bins = torch.bucketize(values.double(), HIST_EDGES, right=True)
            hist = torch.bincount(bins, minlength=len(HIST_EDGES) + 1).tolist()
            assert store.feature(latent)["hist"] == hist


def test_top_examples_match_brute_force(setup, reference):
    *_, cfg, path, _, _ = setup
    ids, acts, _ = reference
    cmax, cpos = acts.max(dim=1)  # one example per (context, latent): the context's maximum
    padded = F.pad(ids, (cfg.window_left, cfg.window_right), value=-1)
    checked = 0
    with FeatureStore(path, create=False) as store:
        for latent in range(D_SAE):
            ctxs = [
                c
                for c in torch.argsort(cmax[:, latent], descending=True, stable=True).tolist()
                if cmax[c, latent] > 0
            ]
            expected = [(c, int(cpos[c, latent])) for c in ctxs[: cfg.top_k]]
            got = store.examples(latent, "top")
            assert [(e["context_id"], e["position"]) for e in got] == expected
            assert [e["value"] for e in got] == pytest.approx([float(cmax[c, latent]) for c, _ in expected])
            assert len({e["context_id"] for e in got}) == len(got)  # never two windows of one context
            for e in got:
                p = e["position"]
                assert e["tokens"] == padded[e["context_id"], p : p + cfg.window].tolist()
                assert e["token"] == int(ids[e["context_id"], p])
                assert e["values"][cfg.window_left] == pytest.approx(e["value"], rel=1e-3)
            checked += len(got)
    assert checked > D_SAE  # the comparison is not vacuous


def _reference_coactivation(acts: torch.Tensor) -> torch.Tensor:
    active = (acts.reshape(-1, D_SAE) > 0).double()
    counts = (active.T @ active).long()
    counts.fill_diagonal_(0)
    return counts


def test_coactivation_matches_brute_force(setup, reference):
    *_, cfg, path, _, _ = setup
    counts = _reference_coactivation(reference[1])
    with FeatureStore(path, create=False) as store:
        for latent in range(D_SAE):
            got = store.feature(latent)["coactivation"]
            assert all(counts[latent, g["other"]] == g["count"] for g in got)
            best = sorted((c for c in counts[latent].tolist() if c > 0), reverse=True)[: cfg.coactivation_top]
            assert [g["count"] for g in got] == best


def test_buffered_coactivation_is_exact_when_the_buffer_holds_every_partner(setup):
    lm, sae, data, cfg, path, _, root = setup
    other = root / "buffered.db"
    analyze(lm, sae, data, _cfg(coactivation_dense_max=0, coactivation_buffer=D_SAE), other, progress=False)
    with FeatureStore(path) as a, FeatureStore(other) as b:
        assert a.dump()["coactivation"] == b.dump()["coactivation"]
        assert len(a.dump()["coactivation"]) > D_SAE


def test_resumed_pass_writes_the_same_database(setup):
    lm, sae, data, cfg, path, _, root = setup
    split = root / "split.db"
    first = analyze(lm, sae, data, cfg, split, progress=False, stop_after_batches=3)
    assert first["complete"] is False and state_path_for(split).exists()
    with FeatureStore(split) as store:
        assert store.progress()["status"] == "running" and store.progress()["batches"] == 3
        assert store.count_features() == 0
    second = analyze(lm, sae, data, cfg, split, progress=False, stop_after_batches=1, resume=True)
    assert second["batches"] == 4 and not second["complete"]
    last = analyze(lm, sae, data, cfg, split, progress=False, resume=True)
    assert last["complete"] and not state_path_for(split).exists()
    with FeatureStore(path) as a, FeatureStore(split) as b:
        assert a.dump() == b.dump()


def test_resume_refuses_missing_or_mismatched_state(setup):
    lm, sae, data, cfg, _, _, root = setup
    with pytest.raises(RunFolderError, match="Nothing to resume"):
        analyze(lm, sae, data, cfg, root / "none.db", progress=False, resume=True)
    path = root / "mismatch.db"
    analyze(lm, sae, data, cfg, path, progress=False, stop_after_batches=1)
    with pytest.raises(RunFolderError, match="same settings"):
        analyze(lm, sae, data, _cfg(top_k=3), path, progress=False, resume=True)


def test_quantile_examples_lie_within_their_edges(setup, reference):
    *_, cfg, path, _, _ = setup
    flat = reference[1].reshape(-1, D_SAE)
    n_examples = 0
    with FeatureStore(path, create=False) as store:
        for latent in range(D_SAE):
            feature, values = store.feature(latent), flat[:, latent][flat[:, latent] > 0].double()
            examples = store.examples(latent, "quantile")
            if not len(values):
                assert feature["quantile_edges"] is None and examples == []
                continue
            edges = feature["quantile_edges"]
            assert edges == sorted(edges) and len(edges) == cfg.n_quantiles + 1
            cum = torch.bincount(torch.bucketize(values, HIST_EDGES, right=True), minlength=242).cumsum(0)
            for q in range(1, cfg.n_quantiles):  # edges are exact up to the bin holding the boundary rank
                rank = len(values) * q / cfg.n_quantiles
                b = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype), right=True))
                below = int((values < edges[q]).sum())
                assert (cum[b - 1] if b else 0) <= below <= cum[b]
            per_q = {}
            for e in examples:
                q = e["quantile"]
                per_q[q] = per_q.get(q, 0) + 1
                assert edges[q] <= e["value"] and (e["value"] < edges[q + 1] or q == cfg.n_quantiles - 1)
                assert e["value"] <= edges[-1]
                assert e["values"][cfg.window_left] == pytest.approx(e["value"], rel=1e-3)
            assert all(n <= cfg.per_quantile for n in per_q.values())
            n_examples += len(examples)
    assert n_examples > D_SAE


def test_logit_effects_and_neighbours_match_a_direct_computation(setup):
    lm, sae, _, cfg, path, _, _ = setup
    W_dec = sae.W_dec.detach()
    with torch.no_grad():
        effects = lm.model.lm_head(W_dec * lm.model.model.norm.weight)
    with FeatureStore(path, create=False) as store:
        for latent in range(D_SAE):
            feature = store.feature(latent)
            row = effects[latent]
            top = torch.argsort(row, descending=True)[: cfg.logit_top].tolist()
            bottom = torch.argsort(row)[: cfg.logit_top].tolist()
            assert [t for t, _ in feature["logits_pos"]] == top
            assert [t for t, _ in feature["logits_neg"]] == bottom
            assert [v for _, v in feature["logits_pos"]] == pytest.approx(row[top].tolist(), rel=1e-4)
            hist = feature["logit_hist"]
            assert sum(hist["counts"]) == len(row) and hist["max"] == pytest.approx(float(row.max()))
            cos = [float(F.cosine_similarity(W_dec[latent], W_dec[j], dim=0)) for j in range(D_SAE)]
            others = sorted((j for j in range(D_SAE) if j != latent), key=lambda j: -cos[j])[: cfg.neighbours]
            assert [o for o, _ in feature["neighbours"]] == others
            assert [v for _, v in feature["neighbours"]] == pytest.approx([cos[o] for o in others], abs=1e-5)


def test_meta_vocab_and_token_search(setup):
    lm, sae, data, cfg, path, _, _ = setup
    with FeatureStore(path, create=False) as store:
        meta = store.meta()
        assert meta["config"] == cfg.to_dict() and meta["data"] == data.to_dict()
        assert meta["hook_name"] == HOOK and meta["dictionary"]["d_sae"] == D_SAE
        assert store.vocab()[5] == lm.tokenizer.decode([5])
        word = store.examples(3, "top")[0]["token"]
        hits = store.search_tokens(lm.tokenizer.decode([word]))
        assert 3 in [h["idx"] for h in hits]
        assert store.progress()["status"] == "complete"
        json.dumps(store.feature(0))  # everything read back is plain JSON


def test_wrong_width_dictionary_is_refused(setup):
    lm, _, data, cfg, _, _, root = setup
    wide = build_dictionary(DictionaryConfig(architecture="relu", d_in=D + 1, d_sae=8, hook_name=HOOK))
    with pytest.raises(DimensionMismatchError, match="d_in=33"):
        analyze(lm, wide, data, cfg, root / "wide.db", progress=False)


def _sparse_batches(n_batches: int = 3, b: int = 4, t: int = 10, d: int = 40) -> list[tuple]:
    """Random activations with very uneven activity per token (0 to ~d latents), some ties, and ids."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n_batches):
        density = torch.rand(b, t, 1, generator=gen) ** 3
        acts = torch.rand(b, t, d, generator=gen) * (torch.rand(b, t, d, generator=gen) < density)
        acts[0, 3] = 0  # a token with nothing active
        acts[1, :, 5] = acts[1, 2, 5]  # equal values along a context: the first position is its max
        out.append((acts.round(decimals=2), torch.randint(0, 100, (b, t), generator=gen)))
    out.append((torch.zeros(b, t, d), torch.randint(0, 100, (b, t), generator=gen)))  # an empty batch
    return out


@pytest.mark.parametrize("dense", [True, False])
def test_accumulators_match_brute_force_on_uneven_activity(dense):
    from saelab.analysis.features import _new_state, _top_partners, update_state

    batches = _sparse_batches()
    d = batches[0][0].shape[-1]
    cfg = _cfg(top_k=3, window_left=2, window_right=1, coactivation_dense_max=d if dense else 0,
               coactivation_buffer=d, coactivation_top=d)  # fmt: skip
    state, gen = _new_state(d, cfg), torch.Generator().manual_seed(0)
    for acts, ids in batches:
        update_state(state, acts, ids, gen, cfg)
    acts, ids = torch.cat([a for a, _ in batches]), torch.cat([i for _, i in batches])
    flat = acts.reshape(-1, d)
    assert torch.equal(state["n_active"], (flat > 0).sum(0))
    assert torch.allclose(state["sum_act"], flat.double().sum(0))
    assert torch.equal(state["max_act"], flat.amax(0))
    hist = torch.stack([torch.bincount(torch.bucketize(c[c > 0].double(), HIST_EDGES, right=True), minlength=242)
                        for c in flat.T])  # fmt: skip
    assert torch.equal(state["hist"], hist)
    # Co-activation: every partner with its exact count (the buffer holds all d here).
    active = (flat > 0).double()
    counts = (active.T @ active).long().fill_diagonal_(0)
    expected = sorted((i, j, int(counts[i, j])) for i in range(d) for j in range(d) if counts[i, j] > 0)
    assert sorted(_top_partners(state, d, 7)) == expected and expected
    # Top examples: by value, then the earlier context; the position is the context's first maximum.
    cmax, cpos = acts.max(dim=1)
    padded = F.pad(ids, (2, 1), value=-1)
    for latent in range(d):
        ctxs = [
            c
            for c in torch.argsort(cmax[:, latent], descending=True, stable=True).tolist()
            if cmax[c, latent] > 0
        ]
        ranks = range(len(ctxs[: cfg.top_k]))
        assert state["top_ctx"][latent, : len(ranks)].tolist() == ctxs[: cfg.top_k]
        for r, c in zip(ranks, ctxs, strict=False):
            p = int(cpos[c, latent])
            assert int(state["top_pos"][latent, r]) == p
            row = int(state["top_slot"][latent, r])
            assert state["top_tokens"][latent, row].tolist() == padded[c, p : p + 4].tolist()
            window = F.pad(acts[c, :, latent], (2, 1))[p : p + 4]
            assert torch.equal(state["top_values"][latent, row], window)


def test_row_histograms_bin_like_the_direct_formula():
    from saelab.analysis.features import _row_histograms

    values = torch.randn(37, 101, generator=torch.Generator().manual_seed(0))
    values[5] = 1.5  # a constant row: everything in bin 0
    low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    bins = ((values - low) / (high - low).clamp(min=1e-30) * 7).long().clamp(0, 6)
    expected = torch.stack([torch.bincount(row, minlength=7) for row in bins])
    assert torch.equal(_row_histograms(values, low, high, 7), expected)


def test_resume_refuses_a_state_of_another_layout(setup):
    lm, sae, data, cfg, _, _, root = setup
    path = root / "layout.db"
    analyze(lm, sae, data, cfg, path, progress=False, stop_after_batches=1)
    state = torch.load(state_path_for(path), weights_only=True)
    state["version"] = 1
    torch.save(state, state_path_for(path))
    with pytest.raises(RunFolderError, match="another version"):
        analyze(lm, sae, data, cfg, path, progress=False, resume=True)


def test_window_text_is_what_json_and_format_write():
    from saelab.analysis.features import _format_rows

    values = torch.tensor([[0.0, 1e-7, 0.123456, 12345.678, 3.0], [2.5e6, 1.0, 0.5, 0.0, 7e-5]])
    ids = torch.tensor([[-1, 0, 7, 49151, 3], [1, 2, 3, 4, 5]], dtype=torch.int32)
    assert _format_rows("[" + ",".join(["%.4g"] * 5) + "]", values) == [
        "[" + ",".join(f"{v:.4g}" for v in row) + "]" for row in values.tolist()
    ]
    assert _format_rows("[" + ", ".join(["%d"] * 5) + "]", ids) == [json.dumps(row) for row in ids.tolist()]
    assert _format_rows("[%d]", ids[:0, :1]) == []


def test_top_partners_read_rows_and_columns_of_the_upper_triangle():
    from saelab.analysis.features import _top_partners

    d, m = 700, 6  # wider than one 256-row tile, chunks not aligned with tiles
    counts = torch.randint(0, 5, (d, d), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    upper = counts.triu(1)
    expected = []
    for i, row in enumerate((upper + upper.T).tolist()):
        best = sorted((-c, j) for j, c in enumerate(row) if c > 0)[:m]
        expected += [(i, j, -c) for c, j in best]
    assert _top_partners({"coact": upper}, m, 300) == expected
