"""saelab.analysis.evaluation checked against brute-force computations on a tiny random Llama (no downloads)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from saelab.analysis.evaluation import EvalConfig, _score, downstream_metrics, evaluate, load_eval
from saelab.core.data import DataConfig, token_batches
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.errors import DimensionMismatchError
from tests.helpers import SPECIAL, save_model, write_corpus

D = 32
HOOK = "blocks.0.hook_resid_post"
CTX = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_model(root / "model", hidden=D, n_layers=2)
    corpus = write_corpus(root / "corpus.jsonl", n_docs=150)
    lm = load_model(root / "model", device="cpu", dtype=torch.float32)
    with torch.no_grad():  # larger weights than the 0.02-std init, so ablations visibly change the loss
        for name, param in lm.model.named_parameters():
            if "norm" not in name:
                param.mul_(8)
    data = DataConfig(source=str(corpus), split="all", context_size=CTX)
    return lm, data


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(**({"n_tokens": 300, "ce_contexts": 8, "batch_contexts": 4, "split": "all"} | kw))


def _dictionary(kind: str, hook: str = HOOK, output_hook: str | None = None, d_in: int = D, seed: int = 0):
    cfg = DictionaryConfig(
        architecture="relu",
        d_in=d_in,
        d_sae=2 * d_in,
        hook_name=hook,
        output_hook_name=output_hook,
        normalize_activations="none",
        apply_b_dec_to_input=kind == "random",
        seed=seed,
    )
    sae = build_dictionary(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "identity":  # relu(x) - relu(-x) = x exactly
            eye = torch.eye(d_in)
            sae.W_enc.copy_(torch.cat([eye, -eye], 1))
            sae.W_dec.copy_(torch.cat([eye, -eye], 0))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        elif kind == "zero":
            for p in sae.parameters():
                p.zero_()
        elif kind == "random":
            sae.W_enc.copy_(torch.randn(d_in, 2 * d_in, generator=g) * 3)
            sae.b_enc.copy_(torch.randn(2 * d_in, generator=g) * 0.2 - 0.2)
            sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.01)
            sae.b_enc[:4] = -1e3  # never fire: dead
            sae.b_enc[4:8] = 1e3  # always fire: dense (decoder rows zeroed so the error stays sane)
            sae.W_dec[4:8] = 0
    return sae


def _contexts(lm, data: DataConfig, n: int) -> torch.Tensor:
    batches = token_batches(
        data.source, lm.tokenizer, context_size=data.context_size, batch_size=64, split="all", max_contexts=n
    )
    return torch.cat(list(batches))


def _brute_reconstruction(lm, data, sae, n_tokens, out_hook=None):
    out_hook = out_hook or sae.cfg.hook_name
    ids = _contexts(lm, data, n_tokens // (CTX - 1) + 10)
    keep = ~data.mask(ids, lm.tokenizer)
    acts = lm.capture(ids, [sae.cfg.hook_name, out_hook])
    x = acts[sae.cfg.hook_name][keep][:n_tokens].double()
    y = acts[out_hook][keep][:n_tokens].double()
    assert x.shape[0] == n_tokens
    with torch.no_grad():
        f = sae.encode(x.float()).double()
        y_hat = sae.decode(f.float()).double()
    density = (f > 0).double().mean(0)
    return (
        {
            "tokens": n_tokens,
            "l0": float((f > 0).sum(-1).double().mean()),
            "l1": float(f.abs().sum(-1).mean()),
            "mse": float((y - y_hat).pow(2).mean()),
            "explained_variance": float(1 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()),
            "cosine_similarity": float(F.cosine_similarity(y_hat, y, dim=-1).mean()),
            "l2_ratio": float((y_hat.norm(dim=-1) / y.norm(dim=-1)).mean()),
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > 0.1).double().mean()),
        },
        density,
        y,
    )


def _replace_at_kept(module, keep, fn):
    """Our own forward hook (independent of saelab's patching): module output -> fn at kept positions."""

    def hook(_mod, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = h.clone()
        new[keep] = fn(h[keep]).to(h.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


def _ce(logits, ids, mask):
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return float((losses.view(ids.shape[0], -1) * mask).sum() / mask.sum())


def _kl(p_logits, q_logits, mask):
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)[:, :-1]
    return float((kl * mask).sum() / mask.sum())


def _brute_downstream(lm, data, module, replace, n_contexts):
    """CE clean / replaced / zeroed and KLs, with predictions counted at kept positions only."""
    ids = _contexts(lm, data, n_contexts)
    keep = ~data.mask(ids, lm.tokenizer)
    mask = keep[:, :-1].double()
    with torch.no_grad():
        clean = lm.model(ids).logits.double()
        handle = _replace_at_kept(module, keep, replace)
        try:
            replaced = lm.model(ids).logits.double()
        finally:
            handle.remove()
        handle = _replace_at_kept(module, keep, torch.zeros_like)
        try:
            zeroed = lm.model(ids).logits.double()
        finally:
            handle.remove()
    out = {
        "ce_clean": _ce(clean, ids, mask),
        "ce_sae": _ce(replaced, ids, mask),
        "ce_zero": _ce(zeroed, ids, mask),
        "kl_sae": _kl(clean, replaced, mask),
        "kl_zero": _kl(clean, zeroed, mask),
        "ce_tokens": int(mask.sum()),
    }
    out["ce_loss_score"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["kl_score"] = (out["kl_zero"] - out["kl_sae"]) / out["kl_zero"]
    return out


def _assert_close(got: dict, want: dict, rel=1e-4, abs_=1e-6):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=abs_), key


def test_metrics_match_brute_force(setup, tmp_path):
    lm, data = setup
    sae = _dictionary("random")
    metrics = evaluate(lm, sae, data, _cfg(), out_dir=tmp_path, progress=False)
    want, density, _ = _brute_reconstruction(lm, data, sae, 300)
    _assert_close(metrics, want)
    assert metrics["fvu"] == pytest.approx(1 - want["explained_variance"], rel=1e-4)
    assert metrics["dead_latents"] == int((density == 0).sum()) >= 4
    assert bool((density[:4] == 0).all()) and bool((density[4:8] == 1).all())
    assert 0 < metrics["dead_fraction"] < 1 and 0 < metrics["dense_fraction"] < 1

    layer0 = lm.model.model.layers[0]
    want = _brute_downstream(lm, data, layer0, lambda x: sae(x.float()), 8)
    _assert_close(metrics, want, rel=1e-4, abs_=1e-5)

    # eval.json (equal to what was returned) and density.png are written into out_dir
    saved = load_eval(tmp_path)
    assert saved["hook_name"] == HOOK and saved["data"]["split"] == "all"
    for key in ("l0", "explained_variance", "ce_loss_score", "kl_score", "dead_fraction"):
        assert saved[key] == pytest.approx(metrics[key])
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_identity_dictionary_is_perfect(setup):
    lm, data = setup
    metrics = evaluate(lm, _dictionary("identity"), data, _cfg(), progress=False)
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["mse"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_clean"], abs=1e-9)
    assert metrics["ce_zero"] != pytest.approx(metrics["ce_clean"], abs=1e-6)
    assert metrics["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["kl_sae"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["kl_score"] == pytest.approx(1.0, abs=1e-6)


def test_zero_dictionary_scores_zero(setup):
    lm, data = setup
    metrics = evaluate(lm, _dictionary("zero"), data, _cfg(), progress=False)
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_zero"], abs=1e-9)
    assert metrics["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["l0"] == 0 and metrics["dead_fraction"] == 1.0 and metrics["dense_fraction"] == 0.0


def test_excluded_positions_are_untouched_by_the_splice(setup):
    lm, data = setup
    sae = _dictionary("random")
    seen: list[torch.Tensor] = []

    def record(_mod, args, kwargs):  # the input of block 1 is what block 0 (maybe spliced) returned
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = lm.model.model.layers[1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        downstream_metrics(lm, sae, data, _cfg(ce_contexts=8, batch_contexts=4), progress=False)
    finally:
        handle.remove()
    ids = _contexts(lm, data, 8)
    excluded = data.mask(ids, lm.tokenizer)
    assert bool(excluded[:, 0].all()) and bool((ids[:, 1:] == SPECIAL["<eos>"]).any())
    assert bool(excluded[ids == SPECIAL["<eos>"]].all())  # special tokens are excluded too
    assert len(seen) == 6  # two batches x (clean, spliced, zeroed)
    for b in range(2):
        clean, spliced, zeroed = seen[3 * b : 3 * b + 3]
        skip = excluded[4 * b : 4 * b + 4]
        torch.testing.assert_close(spliced[skip], clean[skip], rtol=0, atol=0)
        torch.testing.assert_close(zeroed[skip], clean[skip], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(spliced[~skip], sae(clean[~skip]), rtol=1e-5, atol=1e-6)
        assert bool((zeroed[~skip] == 0).all())


def test_excluding_fewer_positions_counts_more_tokens(setup):
    lm, data = setup
    everything = DataConfig(**(data.to_dict() | {"exclude_bos": False, "exclude_special": False}))
    cfg = _cfg(n_tokens=10**6, ce_contexts=4)
    some = evaluate(lm, _dictionary("zero"), data, cfg, progress=False)
    more = evaluate(lm, _dictionary("zero"), everything, cfg, progress=False)
    assert more["tokens"] > some["tokens"] and more["ce_tokens"] == 4 * (CTX - 1) > some["ce_tokens"]


def test_transcoder_splices_at_the_output_hook(setup):
    lm, data = setup
    hook, out_hook = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    tc = _dictionary("zero", hook=hook, output_hook=out_hook)
    _, _, y = _brute_reconstruction(lm, data, tc, 300, out_hook)
    with torch.no_grad():  # a constant output: the mean of the target over the eval tokens
        tc.b_dec.copy_(y.mean(0).float())
    metrics = evaluate(lm, tc, data, _cfg(), progress=False)
    assert metrics["output_hook_name"] == out_hook
    assert metrics["explained_variance"] == pytest.approx(0.0, abs=1e-5)  # the target is mlp_out
    mlp = lm.model.model.layers[1].mlp
    want = _brute_downstream(lm, data, mlp, lambda x: tc.b_dec.expand_as(x), 8)
    _assert_close(metrics, want, rel=1e-4, abs_=1e-5)


def test_wrong_width_is_a_dimension_mismatch(setup):
    lm, data = setup
    with pytest.raises(DimensionMismatchError, match=r"d_in=16.*width 32"):
        evaluate(lm, _dictionary("random", d_in=16), data, _cfg(), progress=False)
    tc = build_dictionary(
        DictionaryConfig(
            architecture="relu",
            d_in=D,
            d_out=8,
            d_sae=64,
            hook_name="blocks.1.ln2.hook_normalized",
            output_hook_name="blocks.1.hook_mlp_out",
        )
    )
    with pytest.raises(DimensionMismatchError, match=r"d_out=8.*width 32"):
        evaluate(lm, tc, data, _cfg(), progress=False)


def test_score_is_nan_when_ablation_changes_nothing():
    assert _score(3.0, 3.5, 2.0) == pytest.approx(-0.5)
    assert _score(2.0, 2.1, 2.1) == pytest.approx(1.0)  # zero-ablation lowering the loss is no -1e9
    assert math.isnan(_score(2.0, 2.0, 2.0))
    assert math.isnan(json.loads(json.dumps({"s": _score(1.0, 1.0, 1.0)}))["s"])  # eval.json keeps it
