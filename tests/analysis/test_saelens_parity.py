"""saelab's `saelens_*` metrics against the installed sae-lens's own `run_evals`, on the same tokens.

What is compared: the same SAE (saved by saelab, loaded by `sae_lens.SAE.load_from_disk`), the same
tiny random Llama (wrapped for SAELens by its `HookedProxyLM`, hook `model.layers.0` = saelab's
`blocks.0.hook_resid_post`) and the same contexts (saelab's packing, handed to SAELens's
`ActivationsStore` as a pre-tokenized dataset, so both read identical token ids in identical batches).
SAELens applies its own position rule (structural special-token ids) and its own aggregation; saelab
must reproduce every number. With prepend_bos=False position 0 is an ordinary word: saelab's own
metrics leave it out, SAELens's keep it, and the saelens_* keys must follow SAELens.
"""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.anchors import SAELENS_SPECIAL_ATTRS, special_keep
from saelab.analysis.evaluation import EvalConfig, evaluate
from saelab.core.data import DataConfig
from saelab.core.models import load_model
from saelab.dictionaries.io import save_dictionary
from tests.helpers import random_topk_sae, save_model, write_corpus

D, CTX, BATCH = 32, 16, 4
SV_BATCHES, CE_BATCHES = 3, 2

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    save_model(root / "model", hidden=D, n_layers=2)
    corpus = write_corpus(root / "corpus.jsonl", n_docs=150)
    lm = load_model(root / "model", device="cpu", dtype=torch.float32)
    with torch.no_grad():  # larger weights than the 0.02-std init, so ablations visibly change the loss
        for name, param in lm.model.named_parameters():
            if "norm" not in name:
                param.mul_(8)
    sae = random_topk_sae(D, 4 * D, "blocks.0.hook_resid_post", k=8)
    return lm, corpus, sae, save_dictionary(sae, root / "sae")


def _saelens_run(lm, data, folder):
    sae_lens = pytest.importorskip("sae_lens")
    from datasets import Dataset
    from sae_lens.evals import EvalConfig as LensEvalConfig
    from sae_lens.evals import run_evals
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    sae = sae_lens.SAE.load_from_disk(folder)
    sae.cfg.metadata.hook_name = "model.layers.0"
    proxy = HookedProxyLM(lm.model, lm.tokenizer, hook_names=["model.layers.0"])
    contexts = torch.cat(list(data.batches(lm.tokenizer, BATCH, max_contexts=BATCH * SV_BATCHES)))
    store = ActivationsStore.from_sae(
        proxy,
        sae,
        dataset=Dataset.from_dict({"input_ids": contexts.tolist()}),
        context_size=CTX,
        streaming=False,
        store_batch_size_prompts=BATCH,
    )
    cfg = LensEvalConfig(
        batch_size_prompts=BATCH,
        n_eval_reconstruction_batches=CE_BATCHES,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=SV_BATCHES,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(sae, store, proxy, ActivationScaler(None), cfg)
    return {k: v for group in metrics.values() for k, v in group.items()}, contexts


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_saelens_named_metrics_equal_saelens_run_evals(setup, prepend_bos):
    lm, corpus, sae, folder = setup
    data = DataConfig(source=str(corpus), split="all", context_size=CTX, prepend_bos=prepend_bos)
    ref, contexts = _saelens_run(lm, data, folder)
    # saelab stops after the batch in which it reaches n_tokens of its own kept tokens: ask for exactly
    # the kept tokens of SV_BATCHES batches, so that both tools read the same whole batches.
    kept = data.masked_batches(lm.tokenizer, BATCH, max_contexts=BATCH * SV_BATCHES)
    n_kept = sum(int(keep.sum()) for _, keep in kept)
    cfg = EvalConfig(
        n_tokens=n_kept, ce_contexts=BATCH * CE_BATCHES, batch_contexts=BATCH, split="all", anchor_ce=True
    )
    ours = evaluate(lm, sae, data, cfg, progress=False)

    n_lens = int(special_keep(contexts, lm.tokenizer, SAELENS_SPECIAL_ATTRS).sum())
    assert ours["saelens_tokens"] == n_lens
    assert (ours["saelens_tokens"] > ours["tokens"]) == (not prepend_bos)  # position 0 kept only by SAELens
    pairs = {
        "explained_variance": "saelens_explained_variance",
        "explained_variance_legacy": "saelens_explained_variance_legacy",
        "mse": "saelens_mse",
        "cossim": "saelens_cossim",
        "l2_ratio": "saelens_l2_ratio",
        "relative_reconstruction_bias": "saelens_relative_reconstruction_bias",
        "l0": "saelens_l0",
        "l1": "saelens_l1",
        "ce_loss_score": "saelens_ce_loss_score",
        "ce_loss_with_sae": "saelens_ce_loss_with_sae",
        "ce_loss_without_sae": "saelens_ce_loss_without_sae",
        "ce_loss_with_ablation": "saelens_ce_loss_with_ablation",
        "kl_div_score": "saelens_kl_div_score",
        "kl_div_with_sae": "saelens_kl_div_with_sae",
        "kl_div_with_ablation": "saelens_kl_div_with_ablation",
    }
    for theirs, mine in pairs.items():
        assert ours[mine] == pytest.approx(ref[theirs], rel=1e-5, abs=1e-5), (mine, ours[mine], ref[theirs])
    # The SAELens zero-ablation also zeroes excluded positions, so its CE with ablation is not saelab's.
    assert ours["saelens_ce_loss_with_ablation"] != pytest.approx(ours["ce_zero"], rel=1e-6)


def test_saebench_explained_variance_follows_its_code(setup):
    """SAEBench core (main.py, get_sparsity_and_variance_metrics) transcribed on the same batches."""
    lm, corpus, sae, _ = setup
    data = DataConfig(source=str(corpus), split="all", context_size=CTX)
    batches = list(data.masked_batches(lm.tokenizer, BATCH, max_contexts=BATCH * SV_BATCHES))
    sum_sq, sq_dim, resid, mse = [], [], [], []
    with torch.no_grad():
        for ids, _ in batches:
            keep = special_keep(ids, lm.tokenizer, ("pad_token_id", "eos_token_id", "bos_token_id"))
            x = lm.capture(ids, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"].flatten(0, 1)
            x = x[keep.flatten()].float()
            r = sae(x)
            err = (x - r).pow(2).sum(-1)
            mse.append(err / keep.sum())
            sum_sq.append(x.pow(2).sum(-1).mean(0))
            sq_dim.append(x.pow(2).mean(0))
            resid.append(err.mean(0))
    total = torch.stack(sum_sq).mean(0) - torch.cat(sq_dim).mean(0) ** 2
    want_ev = float(1 - torch.stack(resid).mean(0) / total)
    n_kept = sum(int(k.sum()) for _, k in batches)
    ours = evaluate(
        lm,
        sae,
        data,
        EvalConfig(n_tokens=n_kept, ce_contexts=0, batch_contexts=BATCH, split="all"),
        progress=False,
    )
    assert ours["saebench_explained_variance"] == pytest.approx(want_ev, rel=1e-5)
    assert ours["saebench_mse"] == pytest.approx(float(torch.cat(mse).mean()), rel=1e-5)


def test_trimmed_explained_variance_drops_the_largest_norm_tokens(setup):
    """explained_variance_trimmed equals the pooled EV recomputed without the largest-norm tokens."""
    lm, corpus, sae, _ = setup
    data = DataConfig(source=str(corpus), split="all", context_size=CTX)
    cfg = EvalConfig(n_tokens=2000, ce_contexts=0, batch_contexts=BATCH, split="all")
    ours = evaluate(lm, sae, data, cfg, progress=False)
    xs = []
    with torch.no_grad():
        for ids, keep in data.masked_batches(lm.tokenizer, BATCH):
            xs.append(lm.capture(ids, ["blocks.0.hook_resid_post"])["blocks.0.hook_resid_post"][keep].float())
            if sum(len(x) for x in xs) >= cfg.n_tokens:
                break
        x = torch.cat(xs)[: cfg.n_tokens].double()
        r = sae(x.float()).double()
    drop = x.pow(2).sum(-1).topk(ours["trimmed_tokens"]).indices
    rest = torch.ones(len(x), dtype=torch.bool)
    rest[drop] = False
    xr, rr = x[rest], r[rest]
    want = 1 - (xr - rr).pow(2).sum() / (xr - xr.mean(0)).pow(2).sum()
    assert ours["trimmed_tokens"] == 2
    assert ours["explained_variance_trimmed"] == pytest.approx(float(want), rel=1e-6)
    centred = (x - x.mean(0)).pow(2).sum(-1)
    assert ours["variance_top_token_share"] == pytest.approx(
        float(centred[drop].max() / centred.sum()), rel=1e-6
    )
