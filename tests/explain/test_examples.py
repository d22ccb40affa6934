"""Example sets from the tiny analysed store: the explain/test split across quantiles, non-activating
windows re-checked with the LM and the SAE, seeded determinism, and the <<marked>> text format."""

from __future__ import annotations

import pytest
import torch

from saelab.analysis.store import FeatureStore
from saelab.errors import DataError
from saelab.explain.examples import (
    Example,
    build_examples,
    format_example,
    latent_on_windows,
    live_latents,
    split_activating,
    token_pieces,
)


def example(pieces, values, quantile=None, rank=0, context=0, position=0, source="activating"):
    return Example(
        feature=0, kind="top" if quantile is None else "quantile", quantile=quantile, rank=rank,
        context_id=context, position=position, tokens=tuple(range(len(pieces))), pieces=tuple(pieces),
        values=tuple(values), source=source,
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(analysed):
    with FeatureStore(analysed[2]) as s:
        yield s


def sparse_latent(store) -> int:
    """A live latent of low density: it leaves most windows of other latents non-activating."""
    rows = store.list_features(sort="density", descending=False, limit=100, include_dead=False)
    for r in rows:
        stored = store.examples(r["idx"], "top") + store.examples(r["idx"], "quantile")
        if len({(e["context_id"], e["position"]) for e in stored}) >= 8:
            return r["idx"]
    raise AssertionError("the tiny store has no latent with 8 distinct windows")


def test_format_marks_runs_and_drops_padding_whitespace_outside():
    e = example([" the", " cat", " sat", " on", " it"], [0, 2.0, 0.5, 0, 1.25])
    assert format_example(e) == " the <<cat sat>> on <<it>>"
    assert format_example(e, marked=[0]) == " <<the>> cat sat on it"
    assert format_example(e, mark=False) == e.text == " the cat sat on it"
    assert format_example(e, show_values=True).endswith("\nActivations: cat (2), sat (0.5), it (1.25)")
    assert e.marked == (1, 2, 4) and e.id == [0, 0]


def test_split_spans_quantiles_and_is_disjoint():
    pool = [example(["a"], [1], quantile=q, rank=r, context=10 * q + r) for q in range(4) for r in range(6)]
    explain, test = split_activating(pool, 8, 8, seed=0)
    assert len(explain) == len(test) == 8
    assert not {tuple(e.id) for e in explain} & {tuple(e.id) for e in test}
    assert {e.quantile for e in explain} == {e.quantile for e in test} == {0, 1, 2, 3}
    again = split_activating(pool, 8, 8, seed=0)
    assert [e.id for e in again[0]] == [e.id for e in explain]
    assert [e.id for e in split_activating(pool, 8, 8, seed=1)[0]] != [e.id for e in explain]
    # more wanted than there are: everything is used once, the explain set first
    small_explain, small_test = split_activating(pool[:5], 40, 50, seed=0)
    assert len(small_explain) + len(small_test) == 5


def test_token_pieces_follow_the_tokenizer(analysed):
    lm = analysed[0]
    ids = lm.tokenizer("w1 w2 w33")["input_ids"]
    pieces = token_pieces(ids, [], lm.tokenizer)
    assert pieces == ("w1", " w2", " w33") and "".join(pieces) == lm.tokenizer.decode(ids)
    assert token_pieces([0, 5], ["a", "b"]) == ("a", "<5>")


def test_build_examples_from_the_store(analysed, store):
    lm, sae, _ = analysed
    idx = sparse_latent(store)
    ex = build_examples(store, idx, lm, sae, n_explain=4, n_test=4, n_random=5, n_hard=5, seed=0)
    assert len(ex.explain) == len(ex.test) == 4
    assert not {tuple(e.id) for e in ex.explain} & {tuple(e.id) for e in ex.test}
    assert all(e.activating and e.feature == idx and max(e.values) > 0 for e in ex.explain + ex.test)
    assert all(-1 not in e.tokens for e in ex.explain + ex.test + ex.non_activating)
    assert ex.random and ex.hard
    row = store.feature(idx)
    partners = {c["other"] for c in row["coactivation"]} | {o for o, _ in row["neighbours"]}
    assert all(e.feature in partners for e in ex.hard)
    assert all(e.feature != idx and not e.activating and set(e.values) == {0.0} for e in ex.non_activating)
    # the check is real: re-encoded on its own, the latent stays at 0 on every kept window
    assert latent_on_windows(lm, sae, idx, [e.tokens for e in ex.non_activating]) == [0.0] * len(
        ex.non_activating
    )
    windows = [e.text for e in ex.non_activating]
    assert len(windows) == len(set(windows))
    again = build_examples(store, idx, lm, sae, n_explain=4, n_test=4, n_random=5, n_hard=5, seed=0)
    assert again == ex


def test_the_check_drops_windows_on_which_the_latent_fires(analysed, store):
    lm, sae, _ = analysed
    dense = store.list_features(sort="density", descending=True, limit=1)[0]["idx"]
    own = [tuple(t for t in r["tokens"] if t >= 0) for r in store.examples(dense, "top")]
    fired = latent_on_windows(lm, sae, dense, own)
    assert max(fired) > 0  # its own windows make it fire, so they could never pass as non-activating
    ex = build_examples(store, dense, lm, sae, n_explain=2, n_test=2, n_random=50, n_hard=50)
    values = latent_on_windows(lm, sae, dense, [e.tokens for e in ex.non_activating])
    assert all(v == 0 for v in values)


def test_live_latents_and_unknown_latent(analysed, store):
    lm, sae, _ = analysed
    live = live_latents(store)
    assert live == sorted(live) and all(store.feature(i)["n_active"] > 0 for i in live)
    with pytest.raises(DataError, match="latent 999"):
        build_examples(store, 999, lm, sae)


def test_latent_on_windows_matches_a_direct_forward_pass(analysed, store):
    lm, sae, _ = analysed
    idx = store.list_features(sort="density", descending=True, limit=1)[0]["idx"]
    windows = [tuple(t for t in r["tokens"] if t >= 0) for r in store.examples(idx, "top")[:3]]
    got = latent_on_windows(lm, sae, idx, windows, batch_size=2)
    for window, value in zip(windows, got, strict=True):
        ids = torch.tensor([[lm.tokenizer.bos_token_id, *window]])
        with torch.no_grad():
            acts = sae.encode(lm.capture(ids, sae.cfg.hook_name)[sae.cfg.hook_name])[0, 1:, idx]
        assert value == pytest.approx(float(acts.max()), abs=1e-6)


def test_stored_padding_is_dropped(analysed, tmp_path):
    from tests.helpers import random_topk_sae
    from tests.stores import STORE_D, STORE_HOOK, write_tiny_store

    lm = analysed[0]
    sae = random_topk_sae(STORE_D, 3, STORE_HOOK, k=1)
    with write_tiny_store(tmp_path / "tiny.db") as store:
        ex = build_examples(store, 0, lm, sae, n_explain=2, n_test=2, n_random=2, n_hard=2)
    shown = {tuple(e.id): e for e in ex.explain + ex.test}
    assert set(shown) == {(4, 0), (1, 5), (2, 3)}
    assert shown[(4, 0)].tokens == (2, 3, 4) and shown[(4, 0)].values == (2.0, 0.0, 1.0)
    assert shown[(1, 5)].tokens == (1, 4, 3) and shown[(1, 5)].marked == (0, 1, 2)
