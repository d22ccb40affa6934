"""Feature analysis: one streaming pass over tokens that fills a feature store for every latent at once.

Memory stays bounded whatever the token count: each batch is folded into fixed-size accumulators
(kept on the CPU) and dropped. A batch is read densely once, to list its active (token, latent,
value) entries; every accumulator works from that list, so the cost per batch grows with the
number of active entries, not with tokens x d_sae. What is computed, and how:

* Statistics: n_active, density (n_active / non-excluded tokens), mean over active tokens, max, and
  an exact histogram over bins shared by all latents (`HIST_EDGES`: 20 log-spaced bins per decade
  from 1e-6 to 1e6, plus an underflow bin (0, 1e-6) and an overflow bin [1e6, inf)).
* Top examples: the k strongest activations with at most ONE example per (context, latent), namely
  that context's maximum for the latent, so no two shown windows of a latent ever overlap. A
  [d_sae, k] buffer is merged with each batch's per-context maxima by a stable sort (ties: the
  earlier context first); the token window (window_left tokens before, window_right after) and the
  latent's values on it are kept with each entry, so the data is never read twice. Windows are cut
  only for the entries that enter the buffer, into storage rows that never move (a [d_sae, k] map
  from rank to row follows the sort).
* Quantile examples: a per-latent uniform reservoir sample (Algorithm R, seeded generator) of
  active (token, latent) entries with their windows. At the end the quantile edges (equal-count
  rank quantiles of the nonzero activations) come from the exact histogram, interpolated linearly
  inside the bin that holds each boundary rank; reservoir items are assigned to quantiles by those
  edges, and the first `per_quantile` items of each quantile (in reservoir order, which is random)
  are kept. An item of quantile q satisfies edges[q] <= value < edges[q+1] (the last includes max).
* Co-activation: for every pair, the number of tokens on which both fire, from the active entries
  of each batch by index arithmetic (never a dense token x latent product): each token's latents
  are laid out in a row and the pairs row < col read off its upper triangle. Exact counts are kept
  in a dense int32 [d_sae, d_sae] matrix while d_sae <= `coactivation_dense_max` (8192: 256 MiB),
  added with index_add and only above the diagonal (a latent's partners: its row and its column);
  above that each latent keeps a buffer of its `coactivation_buffer` most frequent partners, merged
  each batch: counts of pairs that stay in the buffer are exact, a pair evicted and seen again
  restarts from zero (so wider dictionaries get lower bounds). The top `coactivation_top` partners
  (ties: lower index first) are stored.
* Geometry (no data): logit effects (decoder row * final-norm weight @ W_U^T, normalisation scale
  ignored), top/bottom tokens and a histogram over the vocabulary; nearest latents by decoder
  cosine similarity. Both in chunks of latents.
* Crosscoders: `lm` holds the member models (`lm.lms`, as `saelab.diffing.paired.PairedModels` does;
  a plain model for a crosscoder across its own layers). Each latent also gets, per member m, its
  decoder norm ||d_i^m|| (normalised space) and the logit effects of d_i^m through model m's own final
  norm and unembedding; the main logit columns are those of the member it writes most into. A
  two-member crosscoder's latents are tagged from Δnorm with their decoder cosine (the figures of
  `saelab.diffing.diff_latents` without data), or from `latent_diff` rows (`saelab diff`'s, with ν).
* Resume: every `checkpoint_every_batches` batches the whole accumulator state, generator included,
  is saved atomically beside the database (``<db>.state.pt``) and the store's progress row updated;
  ``resume=True`` skips the contexts already seen, so the final database is identical to an
  uninterrupted run's. A state file of another accumulator layout (`_STATE_VERSION`) is refused.

Excluded positions (BOS / special tokens, see `saelab.core.data.exclusion_mask`) count as zero: they
are never active, never examples and not in the density denominator; windows still show them.
Memory: about d_sae * (top_k + reservoir_size) * W * 12 bytes for the windows (W = window_left +
1 + window_right; 16k latents, defaults: ~500 MB), plus the co-activation matrix.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelab.analysis.store import FeatureStore
from saelab.core.data import DataConfig
from saelab.core.fileio import atomic_torch_save
from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.dictionaries.families.crosscoder import Crosscoder, relative_decoder_norm, tag_latents
from saelab.errors import DimensionMismatchError, ModelNotFoundError, RunFolderError

HIST_EDGES = torch.logspace(-6, 6, 241, dtype=torch.float64)
N_HIST = len(HIST_EDGES) + 1  # underflow + 240 bins + overflow
_MAX_PAIRS = 1 << 23  # pairs expanded at once when counting co-activations


@dataclass
class AnalysisConfig:
    """How much data to read and how much to keep per latent; stored in the database's meta."""

    n_tokens: int = 262_144  # rounded up to whole contexts
    batch_contexts: int = 32
    top_k: int = 20
    n_quantiles: int = 10
    per_quantile: int = 5
    reservoir_size: int = 100
    window_left: int = 16
    window_right: int = 4
    coactivation_top: int = 10
    coactivation_dense_max: int = 8192
    coactivation_buffer: int = 64
    logit_top: int = 10
    logit_bins: int = 40
    neighbours: int = 10
    geometry_chunk: int = 1024
    seed: int = 0
    checkpoint_every_batches: int = 50

    def __post_init__(self) -> None:
        positive = ("n_tokens", "batch_contexts", "top_k", "n_quantiles", "reservoir_size", "logit_bins")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AnalysisConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def window(self) -> int:
        return self.window_left + 1 + self.window_right


# --- accumulators --------------------------------------------------------------------------------

_STATE_VERSION = 2  # the accumulators' layout; a state file of another layout cannot be resumed


def _new_state(d: int, cfg: AnalysisConfig) -> dict:
    k, r, w = cfg.top_k, cfg.reservoir_size, cfg.window
    state = {
        "version": _STATE_VERSION,
        "batches": 0,
        "contexts": 0,
        "tokens": 0,  # non-excluded tokens
        "n_active": torch.zeros(d, dtype=torch.long),
        "sum_act": torch.zeros(d, dtype=torch.float64),
        "max_act": torch.zeros(d),
        "hist": torch.zeros(d, N_HIST, dtype=torch.long),
        "top_val": torch.full((d, k), -math.inf),
        "top_ctx": torch.full((d, k), -1, dtype=torch.long),
        "top_pos": torch.full((d, k), -1, dtype=torch.long),
        "top_slot": torch.arange(k).repeat(d, 1),  # rank -> row of top_tokens / top_values
        "top_tokens": torch.full((d, k, w), -1, dtype=torch.int32),
        "top_values": torch.zeros(d, k, w),
        "res_val": torch.zeros(d, r),
        "res_ctx": torch.full((d, r), -1, dtype=torch.long),
        "res_pos": torch.full((d, r), -1, dtype=torch.long),
        "res_tokens": torch.full((d, r, w), -1, dtype=torch.int32),
        "res_values": torch.zeros(d, r, w),
    }
    if d <= cfg.coactivation_dense_max:
        state["coact"] = torch.zeros(d, d, dtype=torch.int32)  # pairs row < col only
    else:
        state["coact_other"] = torch.full((d, cfg.coactivation_buffer), -1, dtype=torch.long)
        state["coact_count"] = torch.zeros(d, cfg.coactivation_buffer, dtype=torch.long)
    return state


class _Batch:
    """One batch's activations [B, T, d] (excluded positions zeroed), its active entries, windows."""

    def __init__(self, acts: Tensor, input_ids: Tensor, offset: int, cfg: AnalysisConfig):
        self.acts, self.offset, self.cfg = acts.detach().float().contiguous(), offset, cfg
        self.ids = input_ids.to(torch.int32).contiguous()
        self.steps = torch.arange(cfg.window) - cfg.window_left
        d = acts.shape[-1]
        # The active entries, sorted by token then latent: numpy's nonzero is several times faster.
        flat = self.acts.view(-1)
        index = torch.from_numpy(np.flatnonzero(flat.numpy() > 0))
        self.token, self.latent, self.values = index // d, index % d, flat[index]

    def windows(self, b: Tensor, p: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (-1 past the context) and the latent's values (0 there) [..., W] around (b, p)."""
        t, d = self.acts.shape[1:]
        cols = p[..., None] + self.steps
        outside = (cols < 0) | (cols >= t)
        where = (b * t)[..., None] + cols.clamp(0, t - 1)  # flat token index
        tokens = self.ids.view(-1)[where].masked_fill_(outside, -1)
        index = (where * d + latent[..., None]).view(-1)
        values = self.acts.view(-1).index_select(0, index).view(where.shape).masked_fill_(outside, 0.0)
        return tokens, values


def _update_stats(state: dict, batch: _Batch) -> None:
    latent, values = batch.latent, batch.values
    state["n_active"] += torch.bincount(latent, minlength=len(state["n_active"]))
    state["sum_act"].index_add_(0, latent, values.double())
    state["max_act"].scatter_reduce_(0, latent, values, "amax")
    bins = torch.bucketize(values.double(), HIST_EDGES, right=True)
    state["hist"].view(-1).index_add_(0, latent * N_HIST + bins, torch.ones_like(bins))


def _update_top(state: dict, batch: _Batch) -> None:
    """Merge each context's maximum per latent into the [d, k] buffer of strongest examples."""
    d, k = state["top_val"].shape
    n_ctx, t = batch.acts.shape[:2]
    # Per (context, latent): the maximum and its first position, from the active entries alone.
    b, p = batch.token // t, batch.token % t
    key = b * d + batch.latent
    cmax = torch.zeros(n_ctx * d).scatter_reduce_(0, key, batch.values, "amax")
    first = batch.values == cmax[key]
    cpos = torch.full((n_ctx * d,), t).scatter_reduce_(0, key[first], p[first], "amin")
    cand = torch.where(cmax > 0, cmax, -math.inf).view(n_ctx, d).T
    cpos = cpos.view(n_ctx, d).T
    # A stable sort keeps ties in context order (the buffer holds earlier contexts), so equal
    # activations (the same token right after BOS, say) resolve the same way in any run.
    values, j = torch.cat([state["top_val"], cand], 1).sort(dim=1, descending=True, stable=True)
    values, j = values[:, :k].contiguous(), j[:, :k]
    new = j >= k
    jb, jo = (j - k).clamp(min=0), j.clamp(max=k - 1)
    pos = cpos.gather(1, jb)
    state["top_val"] = values
    state["top_ctx"] = torch.where(new, batch.offset + jb, state["top_ctx"].gather(1, jo))
    state["top_pos"] = torch.where(new, pos, state["top_pos"].gather(1, jo))
    # Windows stay in their storage rows; a new entry takes a row that an evicted entry freed (each
    # latent frees as many as it gains), so only the new entries' windows are cut and written.
    kept = torch.zeros(d, k + 1, dtype=torch.bool).scatter_(1, torch.where(new, k, j), True)[:, :k]
    free = state["top_slot"][~kept]  # row-major, like the new entries below
    rows, ranks = new.nonzero(as_tuple=True)
    slot = state["top_slot"].gather(1, jo)
    slot[rows, ranks] = free
    state["top_slot"] = slot
    tokens, vals = batch.windows(jb[rows, ranks], pos[rows, ranks], rows)
    state["top_tokens"][rows, free] = tokens
    state["top_values"][rows, free] = vals


def _update_reservoir(state: dict, batch: _Batch, gen: torch.Generator) -> None:
    """Algorithm R per latent, vectorised: entry i of a latent lands in slot i (i < R) or a random slot."""
    d, size = state["res_val"].shape
    order = torch.argsort(batch.latent.int(), stable=True)  # by latent, then token
    latent, token, values = batch.latent[order], batch.token[order], batch.values[order]
    counts = torch.bincount(latent, minlength=d)
    start = counts.cumsum(0) - counts
    i = state["n_active"][latent] + torch.arange(len(latent)) - start[latent]
    u = torch.rand(len(latent), generator=gen, dtype=torch.float64)
    slot = torch.where(i < size, i, (u * (i + 1).double()).long())
    take = (slot < size).nonzero().squeeze(1)
    # Within a latent later entries overwrite earlier ones in the same slot: keep the last.
    last = torch.full((d * size,), -1).scatter_reduce_(0, latent[take] * size + slot[take], take, "amax")
    last = last[last >= 0]
    lat, sl, tok = latent[last], slot[last], token[last]
    t = batch.acts.shape[1]
    b, p = tok // t, tok % t
    tokens, vals = batch.windows(b, p, lat)
    state["res_val"][lat, sl] = values[last]
    state["res_ctx"][lat, sl] = batch.offset + b
    state["res_pos"][lat, sl] = p
    state["res_tokens"][lat, sl] = tokens
    state["res_values"][lat, sl] = vals


def _pair_keys(token: Tensor, latent: Tensor, n_tokens: int, d: int):
    """Chunks of keys row * d + col (row < col), one per pair of latents active on the same token.

    `token` must be sorted and the latents ascending within each token. Tokens with the same
    power-of-two bound m on their count are laid out as rows [tokens, m] (those with fewer than m
    padded with d, which sorts last) and their pairs read off the strict upper triangle, at most
    `_MAX_PAIRS` (padded) pairs at a time. Nothing is sorted.
    """
    counts = torch.bincount(token, minlength=n_tokens)
    starts = counts.cumsum(0) - counts
    dtype = torch.int32 if (d + 1) * (d + 1) < 2**31 else torch.long
    lat = latent.to(dtype)
    busy = (counts >= 2).nonzero().squeeze(1)
    power = torch.ceil(torch.log2(counts[busy].double())).long()
    for e in power.unique().tolist():
        m = 1 << e
        i, j = torch.triu_indices(m, m, 1)
        steps, per_chunk = torch.arange(m), max(1, _MAX_PAIRS // len(i))
        group = busy[power == e]
        full = counts[group] == m
        for toks, padded in ((group[full], False), (group[~full], True)):
            for lo in range(0, len(toks), per_chunk):
                t = toks[lo : lo + per_chunk]
                index = (starts[t][:, None] + steps).clamp(max=len(lat) - 1)
                rows = torch.where(steps < counts[t][:, None], lat[index], d) if padded else lat[index]
                b = rows.index_select(1, j)
                keys = torch.add(b, rows.index_select(1, i), alpha=d)
                yield keys[b < d] if padded else keys.view(-1)  # b is the later column: a is real if b is


def _pair_counts(token: Tensor, latent: Tensor, n_tokens: int, d: int) -> tuple[Tensor, Tensor]:
    """(row * d + col, count) over all ordered pairs of distinct latents active on the same token."""
    keys, totals = [], []
    for upper in _pair_keys(token, latent, n_tokens, d):
        upper = upper.long()
        u, c = torch.cat([upper, (upper % d) * d + upper // d]).unique(return_counts=True)
        keys.append(u)
        totals.append(c)
    if not keys:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    keys_all, inv = torch.cat(keys).unique(return_inverse=True)
    return keys_all, torch.zeros(len(keys_all), dtype=torch.long).scatter_add_(0, inv, torch.cat(totals))


def _merge_coact_buffer(state: dict, keys: Tensor, counts: Tensor, d: int) -> None:
    """Add a batch's pair counts into each latent's buffer of most frequent partners (see module doc)."""
    other, count = state["coact_other"], state["coact_count"]
    size = other.shape[1]
    valid = other >= 0
    rows = torch.arange(d)[:, None].expand_as(other)[valid]
    all_keys = torch.cat([rows * d + other[valid], keys])
    uniq, inv = all_keys.unique(return_inverse=True)
    total = torch.zeros(len(uniq), dtype=torch.long).scatter_add_(0, inv, torch.cat([count[valid], counts]))
    order = torch.argsort(-total, stable=True)
    order = order[torch.argsort(uniq[order] // d, stable=True)]  # by row, then count desc, then other
    r, o, total = uniq[order] // d, uniq[order] % d, total[order]
    per_row = torch.bincount(r, minlength=d)
    rank = torch.arange(len(r)) - (per_row.cumsum(0) - per_row)[r]
    keep = rank < size
    state["coact_other"] = torch.full_like(other, -1).index_put_((r[keep], rank[keep]), o[keep])
    state["coact_count"] = torch.zeros_like(count).index_put_((r[keep], rank[keep]), total[keep])


def _update_coactivation(state: dict, batch: _Batch) -> None:
    n_ctx, t, d = batch.acts.shape
    if "coact" in state:
        coact = state["coact"].view(-1)
        for keys in _pair_keys(batch.token, batch.latent, n_ctx * t, d):
            coact.index_add_(0, keys, torch.ones(len(keys), dtype=torch.int32))
        return
    keys, counts = _pair_counts(batch.token, batch.latent, n_ctx * t, d)
    if len(keys):
        _merge_coact_buffer(state, keys, counts, d)


def update_state(state: dict, acts: Tensor, input_ids: Tensor, gen: torch.Generator, cfg: AnalysisConfig):
    """Fold one batch of latent activations [B, T, d] (excluded positions already zero) into `state`."""
    batch = _Batch(acts, input_ids, state["contexts"], cfg)
    _update_reservoir(state, batch, gen)  # needs n_active from before this batch
    _update_stats(state, batch)
    _update_top(state, batch)
    _update_coactivation(state, batch)
    state["batches"] += 1
    state["contexts"] += acts.shape[0]


# --- results -------------------------------------------------------------------------------------


def quantile_edges(hist: Tensor, max_act: Tensor, n_quantiles: int) -> Tensor:
    """[d, Q+1] value edges of equal-count rank quantiles, from exact histogram counts.

    Each inner edge is interpolated linearly inside the bin holding its boundary rank, so the
    number of activations below it is exact to within that bin's count. Edge 0 is 0, edge Q max.
    """
    d = hist.shape[0]
    lows = torch.cat([torch.zeros(1, dtype=torch.float64), HIST_EDGES])[None].expand(d, -1)
    # Bins end at the latent's max at the latest, so that edges never pass it (they stay sorted).
    highs = torch.minimum(
        torch.cat([HIST_EDGES[None].expand(d, -1), max_act.double()[:, None]], 1), max_act.double()[:, None]
    )
    cum = hist.cumsum(1).double()
    n = cum[:, -1:]
    ranks = n * torch.arange(1, n_quantiles, dtype=torch.float64) / n_quantiles  # [d, Q-1]
    b = torch.searchsorted(cum, ranks, right=True).clamp(max=N_HIST - 1)
    count = hist.double().gather(1, b)
    frac = ((ranks - (cum.gather(1, b) - count)) / count.clamp(min=1)).clamp(0, 1)
    lo, hi = lows.gather(1, b), torch.maximum(highs.gather(1, b), lows.gather(1, b))
    inner = lo + frac * (hi - lo)
    return torch.cat([torch.zeros(d, 1, dtype=torch.float64), inner, max_act.double()[:, None]], 1)


def _quantile_choice(state: dict, edges: Tensor, per_quantile: int) -> tuple[Tensor, Tensor]:
    """For every reservoir slot: its quantile and whether it is among the first per_quantile of it."""
    d, size = state["res_val"].shape
    q_count = edges.shape[1] - 1
    filled = torch.arange(size)[None] < state["n_active"].clamp(max=size)[:, None]
    q = (state["res_val"].double()[:, :, None] >= edges[:, None, 1:-1]).sum(-1)
    key = torch.where(filled, q * size + torch.arange(size), q_count * size)
    sorted_key, _ = key.sort(dim=1)
    first = torch.searchsorted(sorted_key, (key // size) * size)  # first slot of the same quantile
    rank_in_q = torch.searchsorted(sorted_key, key) - first
    return q, filled & (rank_in_q < per_quantile)


def _ranks_in_groups(group: Tensor) -> Tensor:
    """0, 1, 2, ... within each run of equal values of a sorted 1-D tensor."""
    steps = torch.arange(len(group))
    start = torch.ones(len(group), dtype=torch.bool)
    start[1:] = group[1:] != group[:-1]
    return steps - torch.where(start, steps, 0).cummax(0).values


def _format_rows(fmt: str, x: Tensor) -> list[str]:
    """Each row of the 2-D `x` as text, by one %-operation over all rows (not one per row)."""
    return ((fmt + "\n") * len(x) % tuple(x.reshape(-1).tolist())).split("\n")[:-1]


def _quantile_examples(state: dict, cfg: AnalysisConfig, edges: Tensor) -> tuple[Tensor, ...]:
    """(latent, slot, quantile, rank) of the quantile examples, by latent, quantile, value, slot."""
    q, chosen = _quantile_choice(state, edges, cfg.per_quantile)
    lat, s = chosen.nonzero(as_tuple=True)  # by latent, then slot
    # Stable sorts from the last key to the first.
    order = torch.argsort(state["res_val"][lat, s], stable=True)
    lat, s = lat[order], s[order]
    group = lat * (edges.shape[1] - 1) + q[lat, s]
    order = torch.argsort(group, stable=True)
    lat, s, group = lat[order], s[order], group[order]
    return lat, s, q[lat, s], _ranks_in_groups(group)


def _example_rows(state: dict, cfg: AnalysisConfig, edges: Tensor, block: int = 256):
    """Each latent's top examples (strongest first) then its quantile examples, as store rows.

    Blocks of latents are gathered and converted to Python at once, and their windows turned into
    JSON text in bulk (the same text as json.dumps for the token ids and as f"{v:.4g}" for values).
    """
    d, k = state["top_val"].shape
    w, left = cfg.window, cfg.window_left
    tokens_json = "[" + ", ".join(["%d"] * w) + "]"
    values_json = "[" + ",".join(["%.4g"] * w) + "]"
    q_lat, q_slot, q_quantile, q_rank = _quantile_examples(state, cfg, edges)
    q_end = torch.bincount(q_lat, minlength=d).cumsum(0).tolist()
    for lo in range(0, d, block):
        hi = min(d, lo + block)
        filled = state["top_val"][lo:hi] > -math.inf  # sorted: the empty entries come last
        n_top = filled.sum(1).tolist()
        slot = state["top_slot"][lo:hi, :, None].expand(-1, -1, w)
        top_val, top_ctx, top_pos = (
            state[n][lo:hi][filled].tolist() for n in ("top_val", "top_ctx", "top_pos")
        )
        top_ids = state["top_tokens"][lo:hi].gather(1, slot)[filled]
        top_token = top_ids[:, left].tolist()
        top_tokens = _format_rows(tokens_json, top_ids)
        top_values = _format_rows(values_json, state["top_values"][lo:hi].gather(1, slot)[filled])
        qa, qb = q_end[lo - 1] if lo else 0, q_end[hi - 1]
        lat, s = q_lat[qa:qb], q_slot[qa:qb]
        q_val, q_ctx, q_pos = (state[n][lat, s].tolist() for n in ("res_val", "res_ctx", "res_pos"))
        quantile, rank = q_quantile[qa:qb].tolist(), q_rank[qa:qb].tolist()
        q_ids = state["res_tokens"][lat, s]
        q_token = q_ids[:, left].tolist()
        q_tokens = _format_rows(tokens_json, q_ids)
        q_values = _format_rows(values_json, state["res_values"][lat, s])
        i = 0
        for latent in range(lo, hi):
            for r in range(n_top[latent - lo]):
                yield {
                    "feature": latent, "kind": "top", "quantile": None, "rank": r, "value": top_val[i],
                    "context_id": top_ctx[i], "position": top_pos[i], "token": top_token[i],
                    "tokens": top_tokens[i], "values": top_values[i],
                }  # fmt: skip
                i += 1
            for j in range((q_end[latent - 1] if latent else 0) - qa, q_end[latent] - qa):
                yield {
                    "feature": latent, "kind": "quantile", "quantile": quantile[j], "rank": rank[j],
                    "value": q_val[j], "context_id": q_ctx[j], "position": q_pos[j], "token": q_token[j],
                    "tokens": q_tokens[j], "values": q_values[j],
                }  # fmt: skip


def _top_partners(state: dict, m: int, chunk: int) -> list[tuple[int, int, int]]:
    """(feature, other, count) for each latent's m most frequent co-firing partners, count > 0."""
    rows = []
    if "coact" in state:
        coact = state["coact"]
        d = coact.shape[0]
        tie = d - 1 - torch.arange(d)  # equal counts: the lower index first
        for lo in range(0, d, chunk):
            hi = min(d, lo + chunk)
            # Only pairs row < col are counted: a row's partners are its row plus its column, whose
            # nonzero part (rows < hi) is added in square-ish tiles, a cache-friendly transpose.
            block = coact[lo:hi].clone()
            for top in range(0, hi, 256):
                end = min(top + 256, hi)
                block[:, top:end] += coact[top:end, lo:hi].T
            score, other = block.long().mul_(d).add_(tie).topk(min(m, d), dim=1)
            for i, (s_row, o_row) in enumerate(zip(score.tolist(), other.tolist(), strict=True)):
                rows += [(lo + i, o, s // d) for s, o in zip(s_row, o_row, strict=True) if s // d > 0]
    else:
        for i, (o_row, c_row) in enumerate(
            zip(state["coact_other"].tolist(), state["coact_count"].tolist(), strict=True)
        ):
            rows += [(i, o, c) for o, c in zip(o_row[:m], c_row[:m], strict=True) if o >= 0 and c > 0]
    return rows


def _row_histograms(values: Tensor, low: Tensor, high: Tensor, n_bins: int, rows: int = 16) -> Tensor:
    """[n, n_bins] counts of each row of `values` in n_bins equal bins from its low to its high.

    Bin of v: int((v - low) / (high - low) * n_bins), clamped to the last bin. Computed a few rows at
    a time, so that every pass over the values stays in cache.
    """
    n, width = values.shape
    scale = (high - low).clamp(min=1e-30)
    offsets = torch.arange(rows, dtype=torch.int32)[:, None] * n_bins
    out = torch.empty(n, n_bins, dtype=torch.long)
    for lo in range(0, n, rows):
        block = values[lo : lo + rows] - low[lo : lo + rows]
        block.div_(scale[lo : lo + rows]).mul_(n_bins).clamp_(0, n_bins - 1)  # >= 0: trunc is floor
        bins = block.to(torch.int32).add_(offsets[: len(block)])
        out[lo : lo + rows] = torch.bincount(bins.view(-1), minlength=len(block) * n_bins).view(-1, n_bins)
    return out


@torch.no_grad()
def logit_effects(lm: HookedLM, W_dec: Tensor, cfg: AnalysisConfig):
    """Per latent: top and bottom (token, effect) pairs and a histogram over the whole vocabulary."""
    gain = lm.final_norm_gain()  # the adapter knows its family's norm (Gemma: 1 + weight)
    W_U = lm.unembed.detach().float().cpu()
    nb = cfg.logit_bins
    for lo in range(0, W_dec.shape[0], cfg.geometry_chunk):
        effects = (W_dec[lo : lo + cfg.geometry_chunk].float().cpu() * gain) @ W_U.T
        m = min(cfg.logit_top, effects.shape[1])
        pos_v, pos_i = effects.topk(m, dim=1)
        neg_v, neg_i = effects.topk(m, dim=1, largest=False)
        low, high = neg_v[:, :1], pos_v[:, :1]  # the row's min and max
        hist = _row_histograms(effects, low, high, nb)
        # One conversion per chunk: per-row .tolist() calls cost more than the matmul.
        chunk = zip(
            pos_i.tolist(), pos_v.tolist(), neg_i.tolist(), neg_v.tolist(),
            low.squeeze(1).tolist(), high.squeeze(1).tolist(), hist.tolist(), strict=True,
        )  # fmt: skip
        for p_i, p_v, n_i, n_v, lo_v, hi_v, counts in chunk:
            yield {
                "logits_pos": [list(pair) for pair in zip(p_i, p_v, strict=True)],
                "logits_neg": [list(pair) for pair in zip(n_i, n_v, strict=True)],
                "logit_hist": {"min": lo_v, "max": hi_v, "counts": counts},
            }


@torch.no_grad()
def decoder_neighbours(W_dec: Tensor, n: int, chunk: int):
    """Per latent: the n other latents with the most similar decoder direction, as [other, cosine]."""
    unit = F.normalize(W_dec.detach().float().cpu(), dim=1)
    d = unit.shape[0]
    n = min(n, d - 1)
    for lo in range(0, d, chunk):
        sims = unit[lo : lo + chunk] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(lo, lo + len(sims))] = -math.inf
        values, others = sims.topk(n, dim=1)
        for v_row, o_row in zip(values.tolist(), others.tolist(), strict=True):
            yield [[o, v] for o, v in zip(o_row, v_row, strict=True)]


def member_models(lm, dictionary: Crosscoder) -> list[HookedLM]:
    """The model each member of a crosscoder writes into, for its logit lens: the paired models (`lm.lms`,
    duck-typed so that analysis needs nothing of saelab.diffing), or `lm` itself for every member of a
    crosscoder across one model's layers."""
    n = dictionary.n_members
    lms = getattr(lm, "lms", None)
    hooks = dictionary.cfg.input_hooks
    if lms is None and any(h.startswith("model") and "/" in h for h in hooks):
        raise ModelNotFoundError(
            f"this crosscoder reads {n} models ({', '.join(hooks)}) but one model was given. Analyse it over "
            "its member models: analyze(PairedModels([lm_a, lm_b]), ...) (saelab.diffing.paired), or "
            "`saelab analyze CROSSCODER`, which loads its member_models (or --model once per member)."
        )
    if lms is None:
        return [lm] * n
    if len(lms) != n:
        raise ModelNotFoundError(
            f"the crosscoder has {n} members ({', '.join(dictionary.members)}) but {len(lms)} models were "
            f"given. Pass one model per member, in member order."
        )
    return list(lms)


def _latent_diff(dictionary: Crosscoder, rows) -> list[dict] | None:
    """Per latent: tag, Δnorm and decoder cosine from the decoders (two members only), updated by `rows`
    (LatentDiff.rows() or diff.json's "latents": they add ν^ε, ν^r and firing counts)."""
    if dictionary.n_members != 2:
        return None
    decoders = dictionary.normalized_decoders().detach().double().cpu()  # as diff_latents computes them
    norm_a, norm_b = decoders[:, 0].norm(dim=-1), decoders[:, 1].norm(dim=-1)
    delta = relative_decoder_norm(norm_a, norm_b)
    cosine = F.cosine_similarity(decoders[:, 0], decoders[:, 1], dim=-1, eps=1e-12)
    out = [
        {"tag": tag, "delta_norm": d, "cosine": c, "nu_eps": None, "nu_r": None, "fired": None}
        for tag, d, c in zip(tag_latents(delta), delta.float().tolist(), cosine.float().tolist(), strict=True)
    ]
    rows = list(rows.rows() if hasattr(rows, "rows") else rows or [])
    if rows and len(rows) != len(out):
        raise DimensionMismatchError(
            f"the latent diff has {len(rows)} rows but the crosscoder has {len(out)} latents: it is another "
            "crosscoder's. Re-run saelab diff on this crosscoder, or leave the diff out."
        )
    for i, row in enumerate(rows):
        out[i].update({k: row[k] for k in out[i] if row.get(k) is not None})
    return out


def _crosscoder_geometry(lm, dictionary: Crosscoder, cfg: AnalysisConfig, latent_diff):
    """Per latent: the main logit columns (its strongest member's), `members` and `diff` (see the module doc)."""
    lms = member_models(lm, dictionary)
    norms = dictionary.member_decoder_norms().detach().float().cpu()
    effects = [
        logit_effects(lms[m], dictionary.decoder(m).detach(), cfg) for m in range(dictionary.n_members)
    ]
    diffs = _latent_diff(dictionary, latent_diff)
    for i, (row, per_member) in enumerate(zip(norms.tolist(), zip(*effects, strict=True), strict=True)):
        home = max(range(len(row)), key=row.__getitem__)
        yield {
            **per_member[home],
            "members": [{"decoder_norm": n, **e} for n, e in zip(row, per_member, strict=True)],
            "diff": diffs[i] if diffs else None,
        }


def _feature_rows(
    state: dict, dictionary: Dictionary, lm: HookedLM, cfg: AnalysisConfig, edges: Tensor, latent_diff=None
):
    n_active = state["n_active"]
    density = n_active.double() / max(state["tokens"], 1)
    mean = state["sum_act"] / n_active.clamp(min=1)
    stats = zip(density.tolist(), mean.tolist(), state["max_act"].tolist(), n_active.tolist(), strict=True)
    if isinstance(dictionary, Crosscoder):
        logits = _crosscoder_geometry(lm, dictionary, cfg, latent_diff)
    else:
        logits = logit_effects(lm, dictionary.residual_directions(), cfg)
    geometry = zip(
        logits,
        decoder_neighbours(dictionary.residual_directions(), cfg.neighbours, cfg.geometry_chunk),
        strict=True,
    )
    for idx, ((dens, mu, top, n), (logits, near), hist, qe) in enumerate(
        zip(stats, geometry, state["hist"].tolist(), edges.tolist(), strict=True)
    ):
        yield {
            "idx": idx,
            "density": dens,
            "mean_act": mu,
            "max_act": top,
            "n_active": n,
            "hist": hist,
            "quantile_edges": qe if n else None,
            "neighbours": near,
            **logits,
        }


# --- the pass ------------------------------------------------------------------------------------


def state_path_for(store_path: str | Path) -> Path:
    return Path(f"{store_path}.state.pt")


def _run_meta(
    lm: HookedLM, dictionary: Dictionary, data: DataConfig, cfg: AnalysisConfig, extra: dict | None
) -> dict:
    crosscoder = {}
    if isinstance(dictionary, Crosscoder):
        lms = member_models(lm, dictionary)
        crosscoder = {
            "members": getattr(lm, "names", None) or dictionary.members,
            "member_models": [{"name": m.name, "hf_id": m.hf_id} for m in lms],
        }
    return {
        "dictionary": dictionary.cfg.to_dict(),
        "model": {"name": lm.name, "hf_id": getattr(lm, "hf_id", None)},  # paired models have no hub id
        "hook_name": dictionary.cfg.hook_name,
        "data": data.to_dict(),
        "config": cfg.to_dict(),
        "hist_edges": HIST_EDGES.tolist(),
        **crosscoder,
        **(extra or {}),
    }


def _vocab(lm: HookedLM) -> list[str]:
    lm = getattr(lm, "lms", [lm])[0]  # paired models share one tokenizer; the first one's unembedding
    n = lm.unembed.shape[0]
    known = min(n, len(lm.tokenizer))
    return lm.tokenizer.batch_decode([[i] for i in range(known)]) + [""] * (n - known)


def _load_resume_state(path: Path, meta_json: str) -> dict:
    if not path.exists():
        raise RunFolderError(
            f"Nothing to resume: no analysis state at {path}. Run the analysis without resume to start it."
        )
    state = torch.load(path, weights_only=True)
    if state.get("version") != _STATE_VERSION:
        raise RunFolderError(
            f"The analysis state at {path} was written by another version of saelab, whose accumulators "
            "this one cannot continue. Run the analysis without resume to start over."
        )
    if state["meta_json"] != meta_json:
        raise RunFolderError(
            f"The analysis state at {path} was written for another dictionary, model, data or config. "
            "Resume with the same settings, or run without resume to start over."
        )
    return state


def _checkpoint(state: dict, gen: torch.Generator, path: Path, store: FeatureStore) -> None:
    state["generator"] = gen.get_state()
    atomic_torch_save(state, path)
    store.set_progress(state["batches"], state["contexts"], state["tokens"], path.name)


def _check_width(lm: HookedLM, dictionary: Dictionary) -> None:
    hook = dictionary.cfg.input_hooks[-1]  # a cross-layer dictionary's deepest layer
    width = lm.hook_dim(hook)
    if width != dictionary.cfg.d_in:
        raise DimensionMismatchError(
            f"the dictionary expects d_in={dictionary.cfg.d_in} but {hook!r} of {lm.name} "
            f"has width {width}. Analyse it on the model and hook point it was trained on."
        )


@torch.no_grad()
def analyze(
    lm: HookedLM,
    dictionary: Dictionary,
    data: DataConfig,
    cfg: AnalysisConfig | None = None,
    store_path: str | Path = "features.db",
    progress: bool = True,
    stop_after_batches: int | None = None,
    resume: bool = False,
    extra_meta: dict | None = None,
    latent_diff=None,
) -> dict:
    """Stream the data once and write every latent's dashboard data into the store at `store_path`.

    A crosscoder is analysed over its member models (`lm.lms`: `saelab.diffing.paired.PairedModels`);
    `latent_diff` (`saelab diff`'s rows) adds Latent Scaling's ν to its latents' tags.

    Returns {"complete", "batches", "contexts", "tokens"}. With `stop_after_batches` it stops after
    that many batches of this call, checkpointed, so that `resume=True` continues the same pass.
    """
    cfg = cfg or AnalysisConfig()
    if isinstance(dictionary, Crosscoder):
        member_models(lm, dictionary)  # refuse a missing member model before any data is read
    _check_width(lm, dictionary)
    dictionary = dictionary.to(lm.device).eval()
    hooks, d = dictionary.cfg.input_hooks, dictionary.cfg.d_sae
    meta = _run_meta(lm, dictionary, data, cfg, extra_meta)
    meta_json = json.dumps(meta, sort_keys=True)
    path = state_path_for(store_path)
    with FeatureStore(store_path) as store:
        if resume:
            state = _load_resume_state(path, meta_json)
        else:
            path.unlink(missing_ok=True)
            store.begin_analysis(meta, _vocab(lm))
            state = _new_state(d, cfg) | {"meta_json": meta_json}
        gen = torch.Generator().manual_seed(cfg.seed)
        if "generator" in state:
            gen.set_state(state["generator"])
        n_contexts = math.ceil(cfg.n_tokens / data.context_size)
        batches = data.masked_batches(
            lm.tokenizer, cfg.batch_contexts, max_contexts=n_contexts - state["contexts"],
            skip_contexts=state["contexts"],
        )  # fmt: skip
        bar = tqdm(
            total=n_contexts, initial=state["contexts"], desc="features", unit="ctx", disable=not progress
        )
        done_here = 0
        for input_ids, keep in batches:
            x = dictionary.capture_inputs(lm.capture(input_ids.to(lm.device), hooks))
            acts = dictionary.encode(x).float().cpu()
            acts[~keep] = 0  # in place: excluded positions are few, a product would copy every value
            state["tokens"] += int(keep.sum())
            update_state(state, acts, input_ids, gen, cfg)
            bar.update(len(input_ids))
            done_here += 1
            if stop_after_batches is not None and done_here >= stop_after_batches:
                break
            if cfg.checkpoint_every_batches and state["batches"] % cfg.checkpoint_every_batches == 0:
                _checkpoint(state, gen, path, store)
        bar.close()
        summary = {k: state[k] for k in ("batches", "contexts", "tokens")}
        if (
            stop_after_batches is not None
            and done_here >= stop_after_batches
            and state["contexts"] < n_contexts
        ):
            _checkpoint(state, gen, path, store)
            return {"complete": False, **summary}
        edges = quantile_edges(state["hist"], state["max_act"], cfg.n_quantiles)
        store.write_results(
            _feature_rows(state, dictionary, lm, cfg, edges, latent_diff),
            _example_rows(state, cfg, edges),
            _top_partners(state, cfg.coactivation_top, cfg.geometry_chunk),
            summary,
        )
        path.unlink(missing_ok=True)
    return {"complete": True, **summary}
