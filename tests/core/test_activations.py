"""saelab.core.activations on a tiny random Llama: harvest, shuffle buffer, disk cache, streaming, resumption."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from saelab.core import activations
from saelab.core.activations import (
    MANIFEST,
    CachedActivations,
    CacheInfo,
    ShuffleBuffer,
    StreamingActivations,
    harvest,
    harvest_to_cache,
)
from saelab.core.data import DataConfig, exclusion_mask, token_batches
from saelab.core.models import HookedLM, load_model
from saelab.errors import ActivationError, UnknownHookError
from tests.helpers import save_model, write_corpus

CTX = 16
# blocks.0.hook_resid_post and blocks.1.hook_resid_pre are the same tensor: rows of the two hooks
# must stay aligned through every shuffle, which these tests check by comparing them.
POST0, PRE1, MLP0 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out"
HOOKS = [POST0, PRE1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("acts")
    model = save_model(root / "model", n_layers=2, hidden=32)
    corpus = write_corpus(root / "corpus.txt", n_docs=200)
    lm = load_model(str(model), device="cpu", dtype=torch.float32)
    return lm, DataConfig(source=str(corpus), context_size=CTX)


@pytest.fixture(scope="module")
def cache(world, tmp_path_factory):
    """1000 rows in shards of 128 (the last one smaller), harvested once for the read-side tests."""
    lm, data = world
    out = tmp_path_factory.mktemp("cache") / "acts"
    harvest_to_cache(lm, data, HOOKS, 1000, out, shard_tokens=128, batch_contexts=8, progress=False)
    return out


def _reference(lm, data, hooks, batch_contexts=8, skip_contexts=0):
    """Every kept row of the stream in order, computed directly with capture + exclusion_mask."""
    rows = {h: [] for h in hooks}
    ids_seen = []
    for ids in token_batches(data.source, lm.tokenizer, CTX, batch_contexts, skip_contexts=skip_contexts):
        keep = ~exclusion_mask(ids, lm.tokenizer)
        captured = lm.capture(ids, hooks)
        for h in hooks:
            rows[h].append(captured[h][keep])
        ids_seen.append(ids)
    return {h: torch.cat(v) for h, v in rows.items()}, torch.cat(ids_seen)


def _multiset(rows: torch.Tensor) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for row in rows.numpy():
        out[row.tobytes()] = out.get(row.tobytes(), 0) + 1
    return out


def _cache_rows(path, hook) -> torch.Tensor:
    info = CacheInfo.read(path)
    return torch.cat([torch.from_numpy(np.load(info.shard_path(hook, i))) for i in range(len(info.shards))])


# ---- harvest ------------------------------------------------------------------------------------


def test_harvest_matches_capture_at_kept_positions_and_stops(world):
    lm, data = world
    ref, ids = _reference(lm, data, [POST0, MLP0])
    eos = lm.tokenizer.eos_token_id
    assert bool((ids[:, 1:] == eos).any()), "the corpus must hold separators for the exclusion to matter"
    kept = ~exclusion_mask(ids, lm.tokenizer)
    assert not kept[:, 0].any() and not kept[ids == eos].any()

    out = list(harvest(lm, data, [POST0, MLP0], 1000, batch_contexts=8, progress=False))
    got = {h: torch.cat([a[h] for a, _ in out]) for h in (POST0, MLP0)}
    assert got[POST0].shape == (1000, 32) and got[MLP0].shape == (1000, 32)
    for h in (POST0, MLP0):
        torch.testing.assert_close(got[h], ref[h][:1000], rtol=0, atol=1e-6)
    # It stops at the first batch that completes the count: no further forward passes.
    per_context = kept.sum(1).cumsum(0)
    needed = (int((per_context < 1000).sum()) + 1 + 7) // 8  # batches of 8 contexts
    assert sum(c for _, c in out) == 8 * needed == 8 * len(out)

    everything = list(harvest(lm, data, [POST0], None, batch_contexts=8, progress=False))
    assert sum(a[POST0].shape[0] for a, _ in everything) == int(kept.sum())
    assert sum(c for _, c in everything) == ids.shape[0]


def test_harvest_unknown_hook_and_resumed_end(world):
    lm, data = world
    with pytest.raises(UnknownHookError, match="blocks.1"):
        next(harvest(lm, data, ["blocks.7.hook_resid_post"], 10, progress=False))
    # A stream resumed exactly at its end is empty, not an error (a resumed StreamingActivations).
    assert list(harvest(lm, data, [POST0], None, skip_contexts=10**6, progress=False)) == []


def test_shuffle_buffer_keeps_hooks_aligned():
    gen = torch.Generator().manual_seed(0)
    buf = ShuffleBuffer({"a": 3, "b": 3}, capacity=100, generator=gen)
    assert len(buf) == 0
    x = torch.arange(60.0).view(20, 3)
    buf.add({"a": x[:12], "b": -x[:12]})
    buf.add({"a": x[12:], "b": -x[12:]})
    assert len(buf) == 20
    buf.shuffle()
    assert not torch.equal(buf.rows["a"], x) and torch.equal(buf.rows["a"], -buf.rows["b"])
    assert torch.equal(buf.rows["a"][:, 0].sort().values, x[:, 0])
    tail = buf.rows["a"][-5:].clone()
    taken = buf.take(5)
    assert torch.equal(taken["a"], tail) and torch.equal(taken["b"], -tail) and len(buf) == 15
    rest = buf.take(15)
    assert len(buf) == 0
    together = torch.cat([rest["a"], taken["a"]])
    assert torch.equal(together[:, 0].sort().values, x[:, 0])


# ---- the disk cache -----------------------------------------------------------------------------


def test_harvest_to_cache_writes_shards_and_manifest(world, cache):
    lm, data = world
    info = CacheInfo.read(cache)
    assert info.complete and info.n_tokens == 1000 and sum(info.shards) == 1000
    assert info.hooks == {POST0: 32, PRE1: 32} and max(info.shards) <= 128
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["source"]["model"] == lm.name
    assert manifest["source"]["data"] == data.to_dict()
    for hook in HOOKS:
        for i, n in enumerate(info.shards):
            array = np.load(info.shard_path(hook, i), mmap_mode="r")
            assert array.shape == (n, 32) and array.dtype == np.float32
    post, pre = _cache_rows(cache, POST0), _cache_rows(cache, PRE1)
    assert torch.equal(post, pre)  # aligned across hooks
    ref, _ = _reference(lm, data, [POST0])
    # Pre-shuffled: not the stream order, but exactly the first 1000 kept rows.
    assert not torch.equal(post, ref[POST0][:1000])
    assert _multiset(post) == _multiset(ref[POST0][:1000])
    assert not list(cache.rglob("*.tmp"))


def test_harvest_to_cache_is_a_no_op_when_complete(world, cache, monkeypatch):
    lm, data = world
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}

    def no_harvest(*args, **kwargs):
        raise AssertionError("a complete cache must not be harvested again")

    monkeypatch.setattr(activations, "harvest", no_harvest)
    info = harvest_to_cache(lm, data, HOOKS, 1000, cache, shard_tokens=128, batch_contexts=8, progress=False)
    assert info.n_tokens == 1000
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before


def test_harvest_to_cache_refuses_another_model_or_hook_set(world, cache):
    lm, data = world
    with pytest.raises(ActivationError, match="another model"):
        harvest_to_cache(lm, data, [POST0, MLP0], 1000, cache, shard_tokens=128, progress=False)
    other = HookedLM(lm.model, lm.tokenizer, name="some-other-model")
    with pytest.raises(ActivationError, match="another model"):
        harvest_to_cache(other, data, HOOKS, 1000, cache, shard_tokens=128, progress=False)
    shorter = DataConfig(source=data.source, context_size=CTX + 1)
    with pytest.raises(ActivationError, match="dataset"):
        harvest_to_cache(lm, shorter, HOOKS, 1000, cache, shard_tokens=128, progress=False)


def test_harvest_to_cache_memory_stays_about_four_shards(world, tmp_path, monkeypatch):
    """A forward pass (8 contexts, ~110 kept rows) brings more rows than a shard (32): still bounded."""
    lm, data = world
    lengths = []
    real_add = ShuffleBuffer.add

    def add(self, acts):
        real_add(self, acts)
        lengths.append(len(self))

    monkeypatch.setattr(ShuffleBuffer, "add", add)
    info = harvest_to_cache(
        lm, data, [POST0], 1200, tmp_path / "c", shard_tokens=32, batch_contexts=8, progress=False
    )
    assert info.complete and info.n_tokens == 1200 and max(info.shards) == 32
    assert len(lengths) > 5
    assert max(lengths) <= 4 * 32 + 8 * (CTX - 1)


def test_interrupted_harvest_completes_on_rerun(world, tmp_path, monkeypatch):
    lm, data = world
    out = tmp_path / "c"
    real_harvest = activations.harvest

    def crashing(*args, **kwargs):
        for item in real_harvest(*args, **kwargs):
            if (out / MANIFEST).exists():  # the first shard has been flushed
                raise RuntimeError("simulated crash")
            yield item

    monkeypatch.setattr(activations, "harvest", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        harvest_to_cache(lm, data, HOOKS, 900, out, shard_tokens=100, batch_contexts=4, progress=False)
    partial = CacheInfo.read(out)
    assert not partial.complete and partial.shards == [100] and partial.n_tokens == 100
    with pytest.raises(ActivationError, match="incomplete"):
        CachedActivations(out, HOOKS, batch_size=10)
    shard0 = np.load(partial.shard_path(POST0, 0))
    contexts_done = partial.source["state"]["contexts_used"]
    assert contexts_done > 0

    monkeypatch.setattr(activations, "harvest", real_harvest)
    info = harvest_to_cache(lm, data, HOOKS, 900, out, shard_tokens=100, batch_contexts=4, progress=False)
    assert info.complete and info.n_tokens == 900 and sum(info.shards) == 900
    assert np.array_equal(np.load(info.shard_path(POST0, 0)), shard0)  # flushed rows are kept
    rows = _cache_rows(out, POST0)
    assert torch.equal(rows, _cache_rows(out, PRE1))
    # As the docstring says: rows that were still in the buffer are dropped, never duplicated; the
    # rerun continues with the contexts after the last flush.
    rest, _ = _reference(lm, data, [POST0], batch_contexts=4, skip_contexts=contexts_done)
    expected = torch.cat([torch.from_numpy(shard0), rest[POST0][:800]])
    assert _multiset(rows) == _multiset(expected)
    assert not list(out.rglob("*.tmp"))


def _epoch_rows(source, n_batches, hook=POST0):
    return [source.next_batch()[hook] for _ in range(n_batches)]


def test_cached_activations_serves_every_row_once_per_epoch(cache):
    source = CachedActivations(cache, HOOKS, batch_size=100, seed=3, n_tokens=2000)
    assert source.dims() == {POST0: 32, PRE1: 32}
    all_rows = _multiset(_cache_rows(cache, POST0))
    first = torch.cat(_epoch_rows(source, 10))
    second = torch.cat(_epoch_rows(source, 10))
    assert source.next_batch() is None  # n_tokens reached
    assert _multiset(first) == all_rows and _multiset(second) == all_rows
    assert not torch.equal(first, second)  # reshuffled
    assert not torch.equal(first, _cache_rows(cache, POST0))
    again = CachedActivations(cache, HOOKS, batch_size=100, seed=3, n_tokens=1000)
    assert torch.equal(torch.cat(_epoch_rows(again, 10)), first)  # deterministic for a seed
    other_seed = CachedActivations(cache, HOOKS, batch_size=100, seed=4, n_tokens=1000)
    assert not torch.equal(torch.cat(_epoch_rows(other_seed, 10)), first)
    peek = CachedActivations(cache, HOOKS, batch_size=100, seed=3).peek(50)
    assert peek[POST0].shape == (50, 32) and torch.equal(peek[POST0], peek[PRE1])


def test_cached_activations_resume_exactly(cache, tmp_path):
    # batch 96 does not divide the shards (128) or the epoch (1000): resumption mid-shard, mid-epoch.
    a = CachedActivations(cache, HOOKS, batch_size=96, seed=1, n_tokens=3000)
    _epoch_rows(a, 13)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.next_batch() for _ in range(15)]
    b = CachedActivations(cache, HOOKS, batch_size=96, seed=1, n_tokens=3000)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for want in expected:
        got = b.next_batch()
        assert all(torch.equal(got[h], want[h]) for h in HOOKS)


def test_cached_activations_rank_slices(cache):
    single = CachedActivations(cache, HOOKS, batch_size=100, seed=2, n_tokens=1500)
    ranks = [
        CachedActivations(cache, HOOKS, batch_size=100, seed=2, n_tokens=1500, rank=r, world_size=2)
        for r in range(2)
    ]
    for _ in range(15):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        for h in HOOKS:
            assert parts[0][h].shape[0] == parts[1][h].shape[0] == 50
            assert torch.equal(parts[0][h], whole[h][0::2]) and torch.equal(parts[1][h], whole[h][1::2])
    assert single.next_batch() is None and all(r.next_batch() is None for r in ranks)


def test_cached_activations_nan_shard_and_bad_folders(cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(cache, bad)
    info = CacheInfo.read(bad)
    path = info.shard_path(PRE1, 2)
    array = np.load(path)
    array[5, 3] = np.nan
    np.save(path, array)
    source = CachedActivations(bad, HOOKS, batch_size=100, seed=0)
    with pytest.raises(ActivationError, match="NaN") as err:
        for _ in range(10):
            source.next_batch()
    assert "float32" in str(err.value) and "re-harvest" in str(err.value)

    with pytest.raises(ActivationError, match="has no"):
        CachedActivations(cache, [MLP0], batch_size=10)
    with pytest.raises(ActivationError, match="not an activation cache"):
        CachedActivations(tmp_path, HOOKS, batch_size=10)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["complete"] = False
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ActivationError, match="incomplete"):
        CachedActivations(bad, HOOKS, batch_size=10)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(ActivationError, match="corrupt"):
        CachedActivations(bad, HOOKS, batch_size=10)


# ---- streaming ----------------------------------------------------------------------------------


def _stream(world, **kwargs):
    lm, data = world
    args = dict(batch_size=64, buffer_tokens=300, batch_contexts=4, seed=5, progress=False)
    args.update(kwargs)
    return StreamingActivations(lm, data, HOOKS, **args)


def test_streaming_resume_exactly(world, tmp_path):
    a = _stream(world)
    assert a.dims() == {POST0: 32, PRE1: 32}
    first = a.peek(40)
    assert first[POST0].shape == (40, 32) and torch.equal(first[POST0], first[PRE1])
    for _ in range(9):
        batch = a.next_batch()
        assert batch[POST0].shape == (64, 32) and torch.equal(batch[POST0], batch[PRE1])
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.next_batch() for _ in range(20)]
    b = _stream(world)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for want in expected:
        got = b.next_batch()
        assert all(torch.equal(got[h], want[h]) for h in HOOKS)


def test_streaming_serves_the_whole_stream_once_and_ends(world):
    lm, data = world
    source = _stream(world, n_tokens=1000, batch_size=50)
    rows = []
    while (batch := source.next_batch()) is not None:
        rows.append(batch[POST0])
    assert source.exhausted and len(rows) == 20
    ref, _ = _reference(lm, data, [POST0], batch_contexts=4)
    got = torch.cat(rows)
    assert not torch.equal(got, ref[POST0][:1000])
    assert _multiset(got) == _multiset(ref[POST0][:1000])
