"""Activations: streamed harvest with early exit, a shuffling buffer, and a memory-mapped disk cache.

Every source yields training batches as {hook_name: float32 [batch, d]} and can report and restore its
position (`state_dict` / `load_state_dict`), so a resumed training run sees exactly the batches an
uninterrupted one would have seen. Memory stays bounded by the buffer or one shard, whatever the
dataset size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saelab.core import distributed
from saelab.core.data import DataConfig
from saelab.core.fileio import atomic_write_json
from saelab.core.models import HookedLM
from saelab.errors import ActivationError, DataError

CACHE_VERSION = 1
MANIFEST = "manifest.json"


def check_finite(acts: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/inf activations with advice instead of training on garbage."""
    for hook, tensor in acts.items():
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).any(-1).sum())
            raise ActivationError(
                f"{bad} activation vectors at {hook!r} ({where}) contain NaN or inf values. Load the model "
                "in float32 (half precision can overflow in the residual stream), keep the attention-sink "
                "position excluded (exclude_bos), or re-harvest a corrupted activation cache."
            )


def harvest(
    lm: HookedLM,
    data: DataConfig,
    hooks: Sequence[str],
    n_tokens: int | None,
    batch_contexts: int = 32,
    skip_contexts: int = 0,
    progress: bool = True,
    desc: str = "harvest",
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Yield ({hook: [kept_tokens, d] float32}, contexts_used) batches until n_tokens kept tokens.

    One forward pass per batch captures every hook and stops after the last needed layer. Excluded
    positions (the position-0 attention sink / BOS, special tokens, chat tokens of roles not chosen:
    `DataConfig.masked_batches`) never leave this function.
    With world_size > 1 only this rank's contexts are read (see `token_batches`); skip_contexts
    and contexts_used then count this rank's contexts.
    """
    hooks = list(dict.fromkeys(hooks))
    for hook in hooks:
        lm.hook_dim(hook)  # raises UnknownHookError early with the list of valid names
    produced = 0
    bar = tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress, leave=False)
    batches = data.masked_batches(
        lm.tokenizer, batch_contexts, skip_contexts=skip_contexts, rank=rank, world_size=world_size
    )
    try:
        for input_ids, keep in batches:
            captured = lm.capture(input_ids.to(lm.device), hooks)
            keep = keep.to(lm.device)
            acts = {hook: captured[hook][keep].float().cpu() for hook in hooks}
            check_finite(acts, "harvest")
            count = int(keep.sum())
            if n_tokens is not None and produced + count > n_tokens:
                acts = {hook: value[: n_tokens - produced] for hook, value in acts.items()}
                count = n_tokens - produced
            produced += count
            bar.update(count)
            yield acts, int(input_ids.shape[0])
            if n_tokens is not None and produced >= n_tokens:
                return
    finally:
        bar.close()
    # A resumed stream may simply be at its end; one rank's share of a tiny dataset may be empty
    # while the others' are not (StreamingActivations.peek then decides for every rank at once).
    if produced == 0 and skip_contexts == 0 and world_size == 1:
        raise DataError(
            f"the dataset {data.source or 'embedded corpus'!r} gave no usable tokens: every position was "
            "excluded or the text was empty. Point --data at a non-empty source."
        )


class ShuffleBuffer:
    """A bounded pool of activation rows: filled from a stream, shuffled, drained from the end.

    Added batches wait in a list and are concatenated once, when the rows are next needed: a
    concatenation per added batch would copy the whole buffer every forward pass.
    """

    def __init__(self, dims: dict[str, int], capacity: int, generator: torch.Generator):
        self.dims = dims
        self.capacity = capacity
        self.generator = generator
        self._rows = {hook: torch.empty(0, d) for hook, d in dims.items()}
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_len = 0

    @property
    def rows(self) -> dict[str, torch.Tensor]:
        if self._pending:
            self._rows = {h: torch.cat([self._rows[h]] + [p[h] for p in self._pending]) for h in self.dims}
            self._pending, self._pending_len = [], 0
        return self._rows

    @rows.setter
    def rows(self, value: dict[str, torch.Tensor]) -> None:
        self._rows, self._pending, self._pending_len = value, [], 0

    def __len__(self) -> int:
        return next(iter(self._rows.values())).shape[0] + self._pending_len

    def add(self, acts: dict[str, torch.Tensor]) -> None:
        self._pending.append({hook: acts[hook] for hook in self.dims})
        self._pending_len += next(iter(acts.values())).shape[0]

    def shuffle(self) -> None:
        order = torch.randperm(len(self), generator=self.generator)
        self.rows = {hook: value[order] for hook, value in self.rows.items()}

    def take(self, n: int) -> dict[str, torch.Tensor]:
        rows = self.rows
        keep = len(self) - n
        out = {hook: value[keep:] for hook, value in rows.items()}
        self.rows = {hook: value[:keep] for hook, value in rows.items()}
        return out


class StreamingActivations:
    """Train straight from the model: harvest into a shuffle buffer, no disk. Resumable exactly.

    With world_size > 1 each rank harvests only its own contexts (rank, rank + world_size, ... of the
    stream; see `token_batches`) into its own buffer of buffer_tokens / world_size rows, and serves
    batch_size / world_size rows a step: N ranks run the model once over the data between them, and
    the global batch is still batch_size rows. In a process group, `peek` and `next_batch` are
    collective (every rank calls them equally often, as the trainer does), so every rank
    initialises from the same rows and all ranks stop at the same step when one runs out.
    """

    def __init__(
        self,
        lm: HookedLM,
        data: DataConfig,
        hooks: Sequence[str],
        batch_size: int,
        n_tokens: int | None = None,
        buffer_tokens: int = 65536,
        batch_contexts: int = 32,
        seed: int = 0,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ActivationError(f"rank {rank} is not a rank of a world of {world_size} processes.")
        if batch_size % world_size:
            lower = max(world_size, batch_size // world_size * world_size)
            raise ActivationError(
                f"batch_size {batch_size} does not split evenly over {world_size} processes (each rank "
                f"trains on batch_size / world_size rows of its own). Use a multiple of {world_size}, "
                f"such as {lower} or {lower + world_size}."
            )
        self.lm, self.data, self.hooks = lm, data, list(dict.fromkeys(hooks))
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.n_tokens = batch_size, n_tokens
        self.local_batch = batch_size // world_size
        # This rank's share of n_tokens and of the buffer: together the ranks hold what one process
        # would, and each buffer mixes rows from the same stretch of the stream as one process's.
        self.local_tokens = None
        if n_tokens is not None:
            self.local_tokens = n_tokens // world_size + int(rank < n_tokens % world_size)
        self.capacity = max(buffer_tokens // world_size, 2 * self.local_batch)
        self.batch_contexts, self.progress = batch_contexts, progress
        self.generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)  # rank 0: seed itself
        self.buffer = ShuffleBuffer({h: lm.hook_dim(h) for h in self.hooks}, self.capacity, self.generator)
        self.contexts_used = 0  # this rank's contexts
        self.tokens_harvested = 0
        self.exhausted = False
        self._stream: Iterator | None = None

    def _grouped(self) -> bool:
        """Whether the ranks are processes of one torch.distributed group (else each stands alone)."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _refill(self) -> None:
        if self._stream is None:
            remaining = None if self.local_tokens is None else self.local_tokens - self.tokens_harvested
            self._stream = harvest(
                self.lm,
                self.data,
                self.hooks,
                remaining,
                self.batch_contexts,
                skip_contexts=self.contexts_used,
                progress=False,
                rank=self.rank,
                world_size=self.world_size,
            )
        while len(self.buffer) < self.capacity:
            try:
                acts, contexts = next(self._stream)
            except StopIteration:
                self.exhausted = True
                break
            self.buffer.add(acts)
            self.contexts_used += contexts
            self.tokens_harvested += next(iter(acts.values())).shape[0]
        self.buffer.shuffle()

    def _fill_if_low(self) -> None:
        if len(self.buffer) < self.capacity // 2 + self.local_batch and not self.exhausted:
            self._refill()

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        """This rank's next batch_size / world_size rows, or None when the stream (any rank's) is done."""
        self._fill_if_low()
        ready = len(self.buffer) >= self.local_batch
        if self._grouped():
            # Decided together: a rank that stopped alone would leave the others waiting forever in
            # the gradient all-reduce. The rows of the ranks that still have some stay in their buffers.
            flag = torch.tensor([int(ready)], device=distributed._collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ready = bool(flag.item())
        return self.buffer.take(self.local_batch) if ready else None

    def dims(self) -> dict[str, int]:
        return dict(self.buffer.dims)

    def peek(self, n_rows: int) -> dict[str, torch.Tensor]:
        """The first rows of the stream, without consuming them (to initialise scales and b_dec).

        Each rank gives its first n_rows / world_size rows; in a process group every rank gets all
        of them in rank order, so every rank initialises its dictionaries from the same rows.
        """
        self._fill_if_low()
        share = max(1, n_rows // self.world_size)
        rows = {hook: value[-share:].clone() for hook, value in self.buffer.rows.items()}
        if self._grouped():
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, rows)
            rows = {hook: torch.cat([part[hook] for part in parts]) for hook in self.hooks}
        if next(iter(rows.values())).shape[0] == 0:
            raise DataError("no activations to initialise from: the dataset gave no usable tokens.")
        return rows

    def state_dict(self) -> dict:
        """This rank's position only: a multi-process run must keep one state per rank."""
        return {
            "kind": "stream",
            "rank": self.rank,
            "world_size": self.world_size,
            "contexts_used": self.contexts_used,
            "tokens_harvested": self.tokens_harvested,
            "exhausted": self.exhausted,
            "rng": self.generator.get_state(),
            "buffer": {hook: value.clone() for hook, value in self.buffer.rows.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (int(state.get("rank", 0)), int(state.get("world_size", 1)))
        if saved != (self.rank, self.world_size):
            raise ActivationError(
                f"this streaming position belongs to rank {saved[0]} of {saved[1]} processes, not rank "
                f"{self.rank} of {self.world_size}: each rank harvests its own contexts, so resume a "
                f"streamed run with the same number of processes ({saved[1]}), or start it afresh."
            )
        self.contexts_used = int(state["contexts_used"])
        self.tokens_harvested = int(state["tokens_harvested"])
        self.exhausted = bool(state["exhausted"])
        self.generator.set_state(state["rng"])
        self.buffer.rows = {hook: value.clone() for hook, value in state["buffer"].items()}
        self._stream = None


# ---- the on-disk cache --------------------------------------------------------------------------


def _hook_folder(hook: str) -> str:
    return hook.replace("/", "_")


@dataclass
class CacheInfo:
    """What a cache's manifest says: its hooks and widths, shards, and where its tokens came from."""

    path: Path
    hooks: dict[str, int]
    shards: list[int]
    n_tokens: int
    complete: bool
    source: dict

    @classmethod
    def read(cls, path: str | Path) -> CacheInfo:
        path = Path(path)
        manifest = path / MANIFEST
        if not manifest.exists():
            raise ActivationError(
                f"{path} is not an activation cache (no {MANIFEST}). Create one with `saelab harvest "
                f"--out {path}`, or pass the folder that `saelab harvest` wrote."
            )
        try:
            data = json.loads(manifest.read_text())
            return cls(
                path,
                dict(data["hooks"]),
                list(data["shards"]),
                int(data["n_tokens"]),
                bool(data["complete"]),
                dict(data.get("source", {})),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ActivationError(
                f"the activation cache manifest {manifest} is corrupt ({err}). Delete the folder and run "
                "`saelab harvest` again."
            ) from None

    def write(self) -> None:
        atomic_write_json(
            self.path / MANIFEST,
            {
                "version": CACHE_VERSION,
                "hooks": self.hooks,
                "shards": self.shards,
                "n_tokens": self.n_tokens,
                "complete": self.complete,
                "dtype": "float32",
                "source": self.source,
            },
        )

    def shard_path(self, hook: str, index: int) -> Path:
        return self.path / _hook_folder(hook) / f"shard_{index:05d}.npy"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def harvest_to_cache(
    lm: HookedLM,
    data: DataConfig,
    hooks: Sequence[str],
    n_tokens: int,
    out: str | Path,
    shard_tokens: int = 32768,
    batch_contexts: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> CacheInfo:
    """Harvest n_tokens into memory-mapped .npy shards (rows pre-shuffled across ~4 shards).

    Resumable: the manifest is rewritten after each shard, and a rerun continues after the last
    complete shard. Memory is bounded by the shuffle buffer (about 4 shards).
    """
    out = Path(out)
    hooks = list(dict.fromkeys(hooks))
    dims = {hook: lm.hook_dim(hook) for hook in hooks}
    source = {"model": lm.name, "data": data.to_dict(), "seed": seed, "shard_tokens": shard_tokens}
    if getattr(lm, "names", None):  # several models on the same tokens (saelab.diffing.paired): each one
        source["models"] = list(lm.names)
    if (out / MANIFEST).exists():
        info = CacheInfo.read(out)
        if (
            info.hooks != dims
            or info.source.get("data") != source["data"]
            or info.source.get("model") != lm.name
        ):
            raise ActivationError(
                f"{out} already holds activations from another model, dataset or hook set. "
                "Choose a new --out folder, or delete this one."
            )
        if info.complete and info.n_tokens >= n_tokens:
            return info
    else:
        info = CacheInfo(out, dims, [], 0, False, source)
    state = info.source.setdefault("state", {"contexts_used": 0})
    generator = torch.Generator().manual_seed(seed + len(info.shards))
    buffer = ShuffleBuffer(dims, 4 * shard_tokens, generator)
    bar = tqdm(
        total=n_tokens,
        initial=info.n_tokens,
        desc="harvest",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    stream = harvest(
        lm,
        data,
        hooks,
        n_tokens - info.n_tokens,
        batch_contexts,
        skip_contexts=state["contexts_used"],
        progress=False,
    )
    skipped = state["contexts_used"]
    read = 0

    def flush(count: int) -> None:
        rows = buffer.take(count)
        index = len(info.shards)
        for hook in hooks:
            _save_npy_atomic(info.shard_path(hook, index), rows[hook].numpy())
        info.shards.append(count)
        info.n_tokens += count
        # After a crash the rerun skips every context read so far: rows still in the buffer are
        # dropped (never duplicated), a small loss for a harvest that is resumable at all.
        state["contexts_used"] = skipped + read
        info.write()

    try:
        for acts, contexts in stream:
            buffer.add(acts)
            read += contexts
            bar.update(next(iter(acts.values())).shape[0])  # tokens harvested (written in shards)
            if len(buffer) >= 4 * shard_tokens:
                # A loop, not one flush: a forward pass may bring more rows than a shard, and the
                # buffer must still stay at about 4 shards (plus one batch) whatever the sizes.
                buffer.shuffle()
                while len(buffer) >= 4 * shard_tokens:
                    flush(shard_tokens)
        buffer.shuffle()
        while len(buffer) > 0:
            flush(min(shard_tokens, len(buffer)))
        state["contexts_used"] = skipped + read
        info.complete = True
        info.write()
    finally:
        bar.close()
    if info.n_tokens < n_tokens:
        raise DataError(
            f"the dataset {data.source or 'embedded corpus'!r} ran out after {info.n_tokens:,} tokens, "
            f"fewer than the {n_tokens:,} asked for. Ask for fewer tokens (--tokens) or add more text."
        )
    return info


class CachedActivations:
    """Training batches from a disk cache: shard order and rows reshuffled every epoch, exact resume.

    With world_size > 1 every rank walks the same global batches and keeps rows rank::world_size, so
    data-parallel training sees exactly the batches of a single process.
    """

    def __init__(
        self,
        path: str | Path,
        hooks: Sequence[str],
        batch_size: int,
        seed: int = 0,
        n_tokens: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.info = CacheInfo.read(path)
        missing = [hook for hook in hooks if hook not in self.info.hooks]
        if missing:
            raise ActivationError(
                f"the activation cache {path} has no {missing} (it holds {sorted(self.info.hooks)}). "
                "Harvest those hook points, or train on the ones it has."
            )
        if not self.info.complete:
            raise ActivationError(
                f"the activation cache {path} is incomplete (its harvest was interrupted). Run the same "
                "`saelab harvest` command again to finish it."
            )
        self.hooks = list(dict.fromkeys(hooks))
        self.batch_size, self.seed = batch_size, seed
        self.n_tokens = n_tokens if n_tokens is not None else self.info.n_tokens
        self.rank, self.world_size = rank, world_size
        self.epoch, self.shard_pos, self.row_pos, self.served = 0, 0, 0, 0
        self._loaded: tuple[int, int, dict[str, torch.Tensor]] | None = None
        self._carry: dict[str, torch.Tensor] | None = None

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.info.shards), generator=generator).tolist()

    def _shard(self, epoch: int, pos: int) -> dict[str, torch.Tensor]:
        if self._loaded is not None and self._loaded[:2] == (epoch, pos):
            return self._loaded[2]
        index = self._order(epoch)[pos]
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch * 104729 + index)
        perm = torch.randperm(self.info.shards[index], generator=generator)
        rows = {}
        for hook in self.hooks:
            array = np.load(self.info.shard_path(hook, index), mmap_mode="r", allow_pickle=False)
            rows[hook] = torch.from_numpy(np.array(array))[perm]
        check_finite(rows, f"cache shard {index}")
        self._loaded = (epoch, pos, rows)
        return rows

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        if self.served + self.batch_size > self.n_tokens:
            return None
        parts: list[dict[str, torch.Tensor]] = []
        need = self.batch_size
        while need > 0:
            rows = self._shard(self.epoch, self.shard_pos)
            available = next(iter(rows.values())).shape[0] - self.row_pos
            take = min(need, available)
            parts.append({h: v[self.row_pos : self.row_pos + take] for h, v in rows.items()})
            self.row_pos += take
            need -= take
            if self.row_pos >= next(iter(rows.values())).shape[0]:
                self.row_pos = 0
                self.shard_pos += 1
                if self.shard_pos >= len(self.info.shards):
                    self.shard_pos, self.epoch = 0, self.epoch + 1
        self.served += self.batch_size
        batch = {h: torch.cat([p[h] for p in parts]) if len(parts) > 1 else parts[0][h] for h in self.hooks}
        if self.world_size > 1:
            batch = {h: v[self.rank :: self.world_size] for h, v in batch.items()}
        return batch

    def dims(self) -> dict[str, int]:
        return {hook: int(self.info.hooks[hook]) for hook in self.hooks}

    def peek(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Rows from the start of epoch 0, without moving the read position."""
        rows = self._shard(0, 0)
        return {hook: value[:n_rows].clone() for hook, value in rows.items()}

    def state_dict(self) -> dict:
        return {
            "kind": "cache",
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "row_pos": self.row_pos,
            "served": self.served,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos = int(state["epoch"]), int(state["shard_pos"])
        self.row_pos, self.served = int(state["row_pos"]), int(state["served"])
        self._loaded = None


def steps_for(n_tokens: int, batch_size: int) -> int:
    return max(1, math.floor(n_tokens / batch_size))
