"""Feature stores for the server, export, view and browser tests: one analysed on a tiny model, one
written by hand (three latents, one dead, with padding, an unknown token id and odd token texts)."""

from __future__ import annotations

from pathlib import Path

import torch

from saelab.analysis.features import AnalysisConfig, analyze
from saelab.analysis.store import FeatureStore
from saelab.core.data import DataConfig
from saelab.core.models import load_model
from tests.helpers import random_topk_sae, save_model, write_corpus

STORE_D, STORE_D_SAE, STORE_CTX = 32, 64, 16
STORE_HOOK = "blocks.0.hook_resid_post"
STORE_TEXT = "w1 w2 w3 w10 w42 w7 w199 w3"


def analysed_store(root: Path):
    """(lm, sae, features.db path): a random TopK SAE on a tiny Llama, analysed over a small corpus."""
    save_model(root / "model", hidden=STORE_D, n_layers=2)
    corpus = write_corpus(root / "corpus.jsonl", n_docs=60)
    lm = load_model(root / "model", device="cpu", dtype=torch.float32)
    data = DataConfig(source=str(corpus), split="all", context_size=STORE_CTX)
    sae = random_topk_sae(STORE_D, STORE_D_SAE, STORE_HOOK)
    cfg = AnalysisConfig(
        n_tokens=16 * STORE_CTX, batch_contexts=8, top_k=5, n_quantiles=4, per_quantile=2, reservoir_size=8,
        window_left=4, window_right=2, coactivation_top=5, logit_top=5, neighbours=4, geometry_chunk=32,
    )  # fmt: skip
    path = root / "features.db"
    analyze(lm, sae, data, cfg, path, progress=False)
    return lm, sae, path


VOCAB = ["<bos>", "the", "cat", "a\nb", "<i>"]
EDGES = [0.1, 1.0, 10.0]  # bins: underflow [0, 0.1), [0.1, 1), [1, 10), overflow [10, inf)
META = {
    "hist_edges": EDGES, "config": {"window_left": 2}, "dictionary": {"d_sae": 3},
    "hook_name": "blocks.0.hook_resid_post", "model": {"name": "org/Tiny-LM"},
}  # fmt: skip
FEATURES = [
    {"idx": 0, "density": 0.25, "mean_act": 1.25, "max_act": 2.0, "n_active": 3, "hist": [0, 2, 1, 0],
     "quantile_edges": [0.0, 0.5, 2.0], "logits_pos": [[1, 0.5], [99, 0.25]], "logits_neg": [[2, -0.5]],
     "logit_hist": {"min": -1.0, "max": 1.0, "counts": [1, 0, 3, 1]}, "neighbours": [[1, 0.5], [2, 0.25]]},
    {"idx": 1, "density": 0.5, "mean_act": 20.0, "max_act": 30.0, "n_active": 2, "hist": [1, 0, 0, 1],
     "logits_pos": [], "logits_neg": [], "neighbours": [[0, 0.5]]},
    {"idx": 2, "density": 0.0, "mean_act": 0.0, "max_act": 0.0, "n_active": 0, "hist": [0, 0, 0, 0]},
]  # fmt: skip
EXAMPLES = [  # window_left 2: the activating token is the window's third entry; -1 is padding
    {"feature": 0, "kind": "top", "quantile": None, "rank": 0, "value": 2.0, "context_id": 4, "position": 0,
     "token": 2, "tokens": [-1, -1, 2, 3, 4], "values": [0, 0, 2.0, 0, 1.0]},
    {"feature": 0, "kind": "top", "quantile": None, "rank": 1, "value": 1.5, "context_id": 1, "position": 5,
     "token": 3, "tokens": [1, 4, 3, -1, -1], "values": [0.25, 1.75, 1.5, 0, 0]},
    {"feature": 0, "kind": "quantile", "quantile": 0, "rank": 0, "value": 0.3, "context_id": 2, "position": 3,
     "token": 3, "tokens": [1, 2, 3, 4, 1], "values": [0, 0, 0.3, 0, 0]},
    {"feature": 1, "kind": "top", "quantile": None, "rank": 0, "value": 30.0, "context_id": 0, "position": 2,
     "token": 4, "tokens": [1, 1, 4, 2, 2], "values": [0, 0, 30.0, 0, 0]},
]  # fmt: skip


def write_tiny_store(path) -> FeatureStore:
    """A hand-written three-latent store (one dead) with padding, an unknown token id and odd token texts."""
    store = FeatureStore(path)
    store.begin_analysis(META, vocab=VOCAB)
    store.write_results(FEATURES, EXAMPLES, [(0, 1, 4)], {"batches": 1, "contexts": 8, "tokens": 40})
    return store


def explain_tiny_store(store: FeatureStore) -> dict[str, int]:
    """Explanations and scores on the tiny store, by name -> explanation id. Latent 0: an auto label that
    beats its shuffled control, a self label that does not (flagged), a human label with markup; latent
    1: an auto label whose score beats shuffled but whose interval reaches down to it (flagged)."""
    ids = {}
    ids["auto0"] = store.add_explanation(
        0, "the word cat", "auto",
        {"explainer_model": "tiny-explainer", "prompt_version": "v1", "example_ids": [[4, 0], [1, 5]], "seed": 0},
    )  # fmt: skip
    store.set_score(ids["auto0"], "detection", 0.9, 0.5, 0.55, 0.8, 0.97, 40, {"scorer_model": "tiny-judge"})
    store.set_score(ids["auto0"], "fuzzing", 0.7, 0.5, 0.6, n=40)
    ids["self0"] = store.add_explanation(0, "felines <b>", "self", {"model": "tiny-lm", "seed": 1})
    store.set_score(ids["self0"], "detection", 0.52, 0.5, 0.55, 0.4, 0.64, 40)
    store.set_explanation(0, "cats & <dogs>")
    ids["human0"] = _human_id(store, 0)
    ids["auto1"] = store.add_explanation(
        1, "angle-bracket tags", "auto", {"explainer_model": "tiny-explainer"}
    )
    store.set_score(ids["auto1"], "detection", 0.6, 0.5, 0.5, 0.45, 0.75, 40)
    return ids


def _human_id(store: FeatureStore, idx: int) -> int:
    return next(e["id"] for e in store.explanations(idx) if e["kind"] == "human")
