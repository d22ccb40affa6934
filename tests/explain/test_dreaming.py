"""Fluent dreaming (EPO) on tiny random models: the gradient candidates, the Pareto front, the λ
trade-off, restarts, what the activation and the cross-entropy mean, reproducibility and bad input;
one run on the embedded model."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from saelab.core.models import HookedLM, special_token_ids
from saelab.errors import DataError, DimensionMismatchError, UnknownHookError
from saelab.explain.dreaming import (
    DreamConfig,
    direction_target,
    dream,
    latent_target,
    log_lambdas,
    logit_target,
    pareto_front,
)
from saelab.explain.dreaming.epo import _allowed_tokens, _Evaluator
from tests.helpers import make_model, make_tokenizer, random_topk_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm():
    return HookedLM(make_model("llama", n_layers=2, hidden=32), make_tokenizer())


@pytest.fixture(scope="module")
def sae():
    return random_topk_sae(32, 64, HOOK, k=4)


def small(**changes) -> DreamConfig:
    base = dict(seq_len=6, population=4, lambdas=log_lambdas(4), iterations=12, children=6, top_k=16)
    return DreamConfig(**{**base, **changes})


def direction(seed=0):
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


def test_log_lambdas_and_reference_sizes():
    lams = log_lambdas(8)
    assert len(lams) == 8 and lams[0] == pytest.approx(0.1) and lams[-1] == pytest.approx(10.0)
    assert all(b / a == pytest.approx(lams[1] / lams[0]) for a, b in zip(lams, lams[1:], strict=False))
    ref = DreamConfig.reference()
    assert (ref.iterations, ref.population, ref.children, ref.top_k, ref.seq_len) == (300, 8, 32, 512, 12)
    assert ref.restart_every == 50 and ref.to_dict()["lambdas"] == list(lams)
    assert DreamConfig.from_dict({**ref.to_dict(), "newer": 1}) == ref


def test_gradient_candidates_beat_random_swaps(lm):
    """One swap to a top-gradient token raises the objective far more often than a random swap."""
    target = direction_target(HOOK, direction())
    allowed = _allowed_tokens(lm)
    ev = _Evaluator(lm, target, allowed, batch_size=64)
    gen = torch.Generator().manual_seed(0)
    ok = allowed.nonzero().squeeze(1)
    ids = ok[torch.randint(len(ok), (8, 6), generator=gen)]
    base = torch.tensor([v[0] for v in ev.evaluate(ids)])
    g_obj, g_ce = ev.gradients(ids)
    cand = torch.stack([ev.candidates(g_obj[b], g_ce[b], 0.0, top_k=4) for b in range(8)])
    assert cand.shape == (8, 6, 4) and bool(allowed[cand].all())
    grad_rows, rand_rows = [], []
    for b in range(8):
        for p in range(6):
            for r in range(4):
                row = ids[b].clone()
                row[p] = cand[b, p, r]
                grad_rows.append(row)
                row = ids[b].clone()
                row[p] = ok[torch.randint(len(ok), (), generator=gen)]
                rand_rows.append(row)
    reps = base.repeat_interleave(24)
    grad_gain = torch.tensor([v[0] for v in ev.evaluate(torch.stack(grad_rows))]) - reps
    rand_gain = torch.tensor([v[0] for v in ev.evaluate(torch.stack(rand_rows))]) - reps
    assert grad_gain.mean() > 5 * rand_gain.mean().abs()
    assert (grad_gain > 0).float().mean() > 0.9 > 0.7 > (rand_gain > 0).float().mean()


def test_gradients_are_the_one_hot_gradients_of_objective_minus_lambda_ce(lm, sae):
    """What GCG / dreamy differentiate: objective - λ CE with respect to a one-hot encoding of the tokens."""
    target = latent_target(sae, 3)
    allowed = _allowed_tokens(lm)
    ev = _Evaluator(lm, target, allowed, batch_size=64)
    ids = torch.tensor([[10, 20, 30, 40, 50, 60], [7, 7, 9, 100, 150, 199]])
    g_obj, g_ce = ev.gradients(ids)
    weight = lm.model.get_input_embeddings().weight
    full = torch.cat([torch.ones(2, 1, dtype=torch.long), ids], 1)
    one_hot = F.one_hot(full, weight.shape[0]).float().requires_grad_(True)
    obj, _, ce = ev._forward(ids, one_hot @ weight)
    (obj - 0.7 * ce).sum().backward()
    expected = one_hot.grad[:, 1:, : len(allowed)]
    assert torch.allclose(g_obj - 0.7 * g_ce, expected, atol=1e-5)
    top = ev.candidates(g_obj[1], g_ce[1], 0.7, top_k=5)
    masked = expected[1].masked_fill(~allowed, -torch.inf)
    assert torch.equal(top, masked.topk(5, dim=-1).indices)


def test_dreaming_raises_the_target_far_above_random_prompts(lm, sae):
    """The best dreamed activation beats every one of 200 random prompts, and the latent fires."""
    target = latent_target(sae, 7)
    result = dream(lm, target, small(iterations=15), progress=False)
    allowed = _allowed_tokens(lm)
    ok = allowed.nonzero().squeeze(1)
    ids = ok[torch.randint(len(ok), (200, 6), generator=torch.Generator().manual_seed(5))]
    random_best = max(v[1] for v in _Evaluator(lm, target, allowed, 64).evaluate(ids))
    assert result.best().activation > max(random_best, 0.0)


def test_front_is_the_pareto_front_of_every_evaluated_prompt(lm, sae):
    result = dream(lm, latent_target(sae, 3), small(), progress=False)
    points = result.points
    assert len(points) == result.evaluations > len(result.front) > 1
    front = [(d.activation, d.cross_entropy) for d in result.front]
    assert [c for _, c in front] == sorted(c for _, c in front)
    for a, c in front:  # nothing evaluated dominates a front point
        assert not any(pa >= a and pc <= c and (pa > a or pc < c) for pa, pc in points)
    for pa, pc in points:  # every evaluated point is matched or beaten by a front point
        assert any(a >= pa and c <= pc for a, c in front)
    restarts = {h["restart_lambda"] for h in result.history} - {None}
    assert all(d.lam is None or d.lam in set(log_lambdas(4)) | restarts for d in result.front)
    assert pareto_front([(1.0, 1.0), (2.0, 2.0), (1.5, 3.0), (2.0, 2.0), (0.5, 0.5)]) == [4, 0, 1]


def test_lambda_zero_only_maximises_the_activation(lm):
    target = direction_target(HOOK, direction(1))
    cfg = small(population=1, lambdas=(0.0,), restart_every=0, iterations=15)
    result = dream(lm, target, cfg, progress=False)
    objective = [h["objective"][0] for h in result.history]
    assert objective == sorted(objective)  # the member only ever moves up
    assert objective[-1] == max(a for a, _ in result.points)  # and holds the best prompt ever evaluated
    assert result.best().activation == objective[-1]
    fluent = dream(
        lm, target, small(population=1, lambdas=(50.0,), restart_every=0, iterations=15), progress=False
    )
    assert fluent.history[-1]["cross_entropy"][0] < result.history[-1]["cross_entropy"][0]


def test_penalties_trade_activation_for_fluency(lm, sae):
    """Members with larger λ hold prompts of lower (or equal) cross-entropy."""
    result = dream(lm, latent_target(sae, 3), small(restart_every=0, iterations=10), progress=False)
    ce = result.history[-1]["cross_entropy"]
    act = result.history[-1]["activation"]
    assert all(b <= a + 1e-6 for a, b in zip(ce, ce[1:], strict=False))
    assert all(b <= a + 1e-6 for a, b in zip(act, act[1:], strict=False))


def test_logit_target_reaches_a_high_logit(lm):
    token = 57
    target = logit_target(token)
    result = dream(lm, target, small(iterations=15), progress=False)
    allowed = _allowed_tokens(lm)
    ok = allowed.nonzero().squeeze(1)
    ids = ok[torch.randint(len(ok), (200, 6), generator=torch.Generator().manual_seed(2))]
    random_logits = torch.tensor([v[1] for v in _Evaluator(lm, target, allowed, 64).evaluate(ids)])
    best = result.best().activation
    assert best > random_logits.max()
    with torch.no_grad():  # the value is the final position's logit, BOS prepended
        logits = lm.forward([[1, *result.best().token_ids]])[0, -1]
    assert best == pytest.approx(float(logits[token]), abs=1e-4)
    assert int((logits > logits[token]).sum()) < 5  # near the top of the vocabulary


def test_activation_and_cross_entropy_are_what_the_docstring_says(lm, sae):
    """BOS prepended and excluded; latent read by dictionary.encode at the last (or max) token; CE the
    mean loss of every prompt token; texts re-tokenise to their ids; no special token in a prompt."""
    specials = special_token_ids(lm.tokenizer)
    for position in ("last", "max"):
        result = dream(lm, latent_target(sae, 3, position=position), small(iterations=4), progress=False)
        for d in result.front:
            assert not set(d.token_ids) & specials and len(d.token_ids) == 6
            assert lm.tokenizer(d.text, add_special_tokens=False)["input_ids"] == d.token_ids
            ids = torch.tensor([[lm.tokenizer.bos_token_id, *d.token_ids]])
            x = lm.capture(ids, HOOK, stop_early=False)[HOOK]
            acts = sae.encode(x)[0, 1:, 3].detach()
            expected = acts[-1] if position == "last" else acts.max()
            assert d.activation == pytest.approx(float(expected), abs=1e-5)
            with torch.no_grad():
                logits = lm.forward(ids)[0]
            ce = F.cross_entropy(logits[:-1], ids[0, 1:])
            assert d.cross_entropy == pytest.approx(float(ce), abs=1e-5)


def test_restarts_put_every_member_on_one_prompt(lm, sae):
    result = dream(lm, latent_target(sae, 3), small(restart_every=3, iterations=7), progress=False)
    restarts = [h["iteration"] for h in result.history if h["restart_lambda"] is not None]
    assert restarts == [0, 3, 6]
    for h in result.history:
        if h["restart_lambda"] is not None:
            assert 2.0 / 3 <= h["restart_lambda"] <= 6.0
            assert len(set(zip(h["activation"], h["cross_entropy"], strict=True))) == 1
    between = result.history[2]
    assert len(set(zip(between["activation"], between["cross_entropy"], strict=True))) > 1


def test_same_seed_same_prompts(lm, sae):
    target = latent_target(sae, 3)
    one = dream(lm, target, small(seed=4), progress=False).to_dict(points=True)
    two = dream(lm, target, small(seed=4), progress=False).to_dict(points=True)
    other = dream(lm, target, small(seed=5), progress=False).to_dict(points=True)
    for d in (one, two, other):
        d.pop("seconds")
    assert one == two
    assert [f["token_ids"] for f in one["front"]] != [f["token_ids"] for f in other["front"]]


def test_start_from_model_samples_or_random_tokens(lm, sae):
    allowed = _allowed_tokens(lm)
    ev = _Evaluator(lm, latent_target(sae, 3), allowed, 64)
    one = ev.sample(5, 6, torch.Generator().manual_seed(3))
    assert (
        one
        == ev.sample(5, 6, torch.Generator().manual_seed(3))
        != ev.sample(5, 6, torch.Generator().manual_seed(4))
    )
    assert all(len(r) == 6 and all(allowed[t] for t in r) for r in one)
    for init in ("sample", "random"):
        result = dream(lm, latent_target(sae, 3), small(iterations=2, init=init, seed=3), progress=False)
        assert len(result.initial) == 4 and all(len(m["token_ids"]) == 6 for m in result.initial)
    assert result.initial[0]["token_ids"] not in one  # random tokens, not the model's samples
    with pytest.raises(DataError, match="init"):
        dream(lm, latent_target(sae, 3), small(init="zeros"), progress=False)


def test_bad_input_is_refused_with_a_fix(lm, sae):
    with pytest.raises(DataError, match="out of range"):
        latent_target(sae, 64)
    with pytest.raises(DataError, match="out of range"):
        latent_target(sae, -1)
    with pytest.raises(DataError, match="zero"):
        direction_target(HOOK, torch.zeros(32))
    with pytest.raises(DataError, match="NaN"):
        direction_target(HOOK, torch.full((32,), float("nan")))
    with pytest.raises(DataError, match="position"):
        latent_target(sae, 1, position="first")
    with pytest.raises(DimensionMismatchError, match="width 16"):
        dream(lm, direction_target(HOOK, torch.ones(16)), small(), progress=False)
    with pytest.raises(UnknownHookError):
        dream(lm, direction_target("blocks.9.hook_resid_post", torch.ones(32)), small(), progress=False)
    with pytest.raises(DataError, match="outside the vocabulary"):
        dream(lm, logit_target(10_000), small(), progress=False)
    with pytest.raises(DataError, match="non-negative"):
        logit_target(-3)
    with pytest.raises(DataError, match="seq_len"):
        dream(lm, logit_target(5), small(seq_len=0), progress=False)
    with pytest.raises(DataError, match="empty"):
        dream(lm, logit_target(5), small(lambdas=()), progress=False)
    with pytest.raises(DataError, match="finite and >= 0"):
        dream(lm, logit_target(5), small(lambdas=(0.1, -1.0, 1.0, 2.0)), progress=False)
    with pytest.raises(DataError, match="0 < low"):
        log_lambdas(4, 0.0, 1.0)
    with pytest.raises(DataError, match="one member per λ"):
        dream(lm, logit_target(5), small(population=3), progress=False)
    with pytest.raises(DataError, match="restart_every"):
        dream(lm, logit_target(5), small(restart_every=-1), progress=False)
    wide = random_topk_sae(16, 8, HOOK)
    with pytest.raises(DimensionMismatchError, match="d_in=16"):
        dream(lm, latent_target(wide, 0), small(), progress=False)


def test_no_bos_tokenizer_scores_tokens_two_onwards(lm):
    tok = make_tokenizer()
    tok.bos_token = None
    plain = HookedLM(lm.model, tok)
    result = dream(plain, logit_target(9), small(iterations=3), progress=False)
    d = result.front[0]
    ids = torch.tensor([d.token_ids])
    with torch.no_grad():
        logits = plain.forward(ids)[0]
    assert d.cross_entropy == pytest.approx(float(F.cross_entropy(logits[:-1], ids[0, 1:])), abs=1e-5)
    assert d.activation == pytest.approx(float(logits[-1, 9]), abs=1e-4)
    with pytest.raises(DataError, match="BOS"):
        dream(plain, logit_target(9), small(seq_len=1), progress=False)


@pytest.mark.integration
def test_embedded_model_dreams_a_stable_fluent_front():
    from saelab.core.models import load_model

    lm = load_model()
    start = time.perf_counter()
    target = direction_target(
        "blocks.3.hook_resid_post", torch.randn(576, generator=torch.Generator().manual_seed(0))
    )
    cfg = DreamConfig(seq_len=6, population=2, lambdas=(0.3, 3.0), iterations=4, children=4, top_k=64)
    result = dream(lm, target, cfg, progress=False)
    assert time.perf_counter() - start < 60
    assert result.front and result.evaluations > 2
    bos = lm.tokenizer.bos_token_id
    for d in result.front:
        assert lm.tokenizer(d.text, add_special_tokens=False)["input_ids"] == d.token_ids
        assert bos not in d.token_ids and 0 < d.cross_entropy < 20
        x = lm.capture(torch.tensor([[bos, *d.token_ids]]), "blocks.3.hook_resid_post")[
            "blocks.3.hook_resid_post"
        ]
        unit = target.read(x[:, 1:])[1][0, -1]
        assert d.activation == pytest.approx(float(unit), rel=1e-4, abs=1e-3)
    first = result.history[0]["objective"][0]
    assert max(result.history[-1]["objective"]) >= first
    # The model's own samples start far more fluent than dreamy's uniform random tokens.
    allowed = _allowed_tokens(lm)
    ev = _Evaluator(lm, target, allowed, 32)
    sampled = [v[2] for v in ev.evaluate(torch.tensor(ev.sample(8, 12, torch.Generator().manual_seed(0))))]
    ok = allowed.nonzero().squeeze(1)
    uniform = ok[torch.randint(len(ok), (8, 12), generator=torch.Generator().manual_seed(0))]
    random_ce = [v[2] for v in ev.evaluate(uniform)]
    assert max(sampled) < min(random_ce) and sum(sampled) / 8 < 7 < 10 < sum(random_ce) / 8
