"""Feature analysis: one streaming pass over tokens that fills a feature store for every latent at once.

Memory stays bounded whatever the token count: each batch is folded into fixed-size accumulators
(kept on the CPU) and dropped. What is computed, and how:

* Statistics: n_active, density (n_active / non-excluded tokens), mean over active tokens, max, and
  an exact histogram over bins shared by all latents (`HIST_EDGES`: 20 log-spaced bins per decade
  from 1e-6 to 1e6, plus an underflow bin (0, 1e-6) and an overflow bin [1e6, inf)).
* Top examples: the k strongest activations with at most ONE example per (context, latent), namely
  that context's maximum for the latent, so no two shown windows of a latent ever overlap. A
  [d_sae, k] buffer is merged with each batch's per-context maxima by a stable sort (ties: the
  earlier context first); the token
  window (window_left tokens before, window_right after) and the latent's values on it are kept
  with each entry, so the data is never read twice.
* Quantile examples: a per-latent uniform reservoir sample (Algorithm R, seeded generator) of
  active (token, latent) entries with their windows. At the end the quantile edges (equal-count
  rank quantiles of the nonzero activations) come from the exact histogram, interpolated linearly
  inside the bin that holds each boundary rank; reservoir items are assigned to quantiles by those
  edges, and the first `per_quantile` items of each quantile (in reservoir order, which is random)
  are kept. An item of quantile q satisfies edges[q] <= value < edges[q+1] (the last includes max).
* Co-activation: for every pair, the number of tokens on which both fire, from the active entries
  of each batch by index arithmetic (never a dense token x latent product). Exact counts are kept in
  a dense int32 [d_sae, d_sae] matrix while d_sae <= `coactivation_dense_max` (8192: 256 MiB);
  above that each latent keeps a buffer of its `coactivation_buffer` most frequent partners, merged
  each batch: counts of pairs that stay in the buffer are exact, a pair evicted and seen again
  restarts from zero (so wider dictionaries get lower bounds). The top `coactivation_top` partners
  (ties: lower index first) are stored.
* Geometry (no data): logit effects (decoder row * final-norm weight @ W_U^T, normalisation scale
  ignored), top/bottom tokens and a histogram over the vocabulary; nearest latents by decoder
  cosine similarity. Both in chunks of latents.
* Resume: every `checkpoint_every_batches` batches the whole accumulator state, generator included,
  is saved atomically beside the database (``<db>.state.pt``) and the store's progress row updated;
  ``resume=True`` skips the contexts already seen, so the final database is identical to an
  uninterrupted run's.

Excluded positions (BOS / special tokens, see `saelab.data.exclusion_mask`) count as zero: they
are never active, never examples and not in the density denominator; windows still show them.
Memory: about d_sae * (top_k + reservoir_size) * W * 12 bytes for the windows (W = window_left +
1 + window_right; 16k latents, defaults: ~500 MB), plus the co-activation matrix.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelab.data import DataConfig
from saelab.dictionaries import Dictionary
from saelab.errors import DimensionMismatchError, RunFolderError
from saelab.fileio import atomic_torch_save
from saelab.store import FeatureStore

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


def _new_state(d: int, cfg: AnalysisConfig) -> dict:
    k, r, w = cfg.top_k, cfg.reservoir_size, cfg.window
    state = {
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
        "top_tokens": torch.full((d, k, w), -1, dtype=torch.int32),
        "top_values": torch.zeros(d, k, w),
        "res_val": torch.zeros(d, r),
        "res_ctx": torch.full((d, r), -1, dtype=torch.long),
        "res_pos": torch.full((d, r), -1, dtype=torch.long),
        "res_tokens": torch.full((d, r, w), -1, dtype=torch.int32),
        "res_values": torch.zeros(d, r, w),
    }
    if d <= cfg.coactivation_dense_max:
        state["coact"] = torch.zeros(d, d, dtype=torch.int32)
    else:
        state["coact_other"] = torch.full((d, cfg.coactivation_buffer), -1, dtype=torch.long)
        state["coact_count"] = torch.zeros(d, cfg.coactivation_buffer, dtype=torch.long)
    return state


class _Batch:
    """One batch's activations [B, T, d] (excluded positions zeroed) with padded windows to cut from."""

    def __init__(self, acts: Tensor, input_ids: Tensor, offset: int, cfg: AnalysisConfig):
        self.acts, self.offset, self.cfg = acts, offset, cfg
        left, right = cfg.window_left, cfg.window_right
        self.ids_pad = F.pad(input_ids.to(torch.int32), (left, right), value=-1)
        self.acts_pad = F.pad(acts, (0, 0, left, right))
        self.steps = torch.arange(cfg.window)

    def windows(self, b: Tensor, p: Tensor, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and the latent's values [..., W] around position p of batch row b."""
        cols = p[..., None] + self.steps
        return self.ids_pad[b[..., None], cols], self.acts_pad[b[..., None], cols, latent[..., None]]


def _update_stats(state: dict, batch: _Batch, latent: Tensor, values: Tensor) -> None:
    acts = batch.acts
    state["n_active"] += (acts > 0).sum((0, 1))
    state["sum_act"] += acts.double().sum((0, 1))
    state["max_act"] = torch.maximum(state["max_act"], acts.amax((0, 1)))
    bins = torch.bucketize(values.double(), HIST_EDGES, right=True)
    d = acts.shape[-1]
    state["hist"] += torch.bincount(latent * N_HIST + bins, minlength=d * N_HIST).view(d, N_HIST)


def _update_top(state: dict, batch: _Batch) -> None:
    """Merge each context's maximum per latent into the [d, k] buffer of strongest examples."""
    k = state["top_val"].shape[1]
    cmax, cpos = batch.acts.max(dim=1)  # [B, d]
    cand = torch.where(cmax > 0, cmax, -math.inf).T
    # A stable sort keeps ties in context order (the buffer holds earlier contexts), so equal
    # activations (the same token right after BOS, say) resolve the same way in any run.
    values, j = torch.cat([state["top_val"], cand], 1).sort(dim=1, descending=True, stable=True)
    values, j = values[:, :k], j[:, :k]
    new = j >= k
    jb, jo = (j - k).clamp(min=0), j.clamp(max=k - 1)
    latent = torch.arange(cand.shape[0])[:, None].expand_as(j)
    pos = cpos.T[latent, jb]
    tokens, vals = batch.windows(jb, pos, latent)
    state["top_val"] = values
    state["top_ctx"] = torch.where(new, batch.offset + jb, state["top_ctx"].gather(1, jo))
    state["top_pos"] = torch.where(new, pos, state["top_pos"].gather(1, jo))
    jw = jo[..., None].expand(-1, -1, tokens.shape[-1])
    state["top_tokens"] = torch.where(new[..., None], tokens, state["top_tokens"].gather(1, jw))
    state["top_values"] = torch.where(new[..., None], vals, state["top_values"].gather(1, jw))


def _update_reservoir(state: dict, batch: _Batch, latent: Tensor, token: Tensor, values: Tensor, gen) -> None:
    """Algorithm R per latent, vectorised: entry i of a latent lands in slot i (i < R) or a random slot."""
    d, size = state["res_val"].shape
    counts = torch.bincount(latent, minlength=d)
    start = counts.cumsum(0) - counts
    i = state["n_active"][latent] + torch.arange(len(latent)) - start[latent]
    u = torch.rand(len(latent), generator=gen, dtype=torch.float64)
    slot = torch.where(i < size, i, (u * (i + 1).double()).long())
    take = (slot < size).nonzero().squeeze(1)
    key = latent[take] * size + slot[take]
    uniq, inv = key.unique(return_inverse=True)
    # Within a latent later entries overwrite earlier ones in the same slot: keep the last.
    last = torch.full((len(uniq),), -1, dtype=torch.long).scatter_reduce(0, inv, take, "amax")
    lat, sl, tok = latent[last], slot[last], token[last]
    t = batch.acts.shape[1]
    b, p = tok // t, tok % t
    tokens, vals = batch.windows(b, p, lat)
    state["res_val"][lat, sl] = values[last]
    state["res_ctx"][lat, sl] = batch.offset + b
    state["res_pos"][lat, sl] = p
    state["res_tokens"][lat, sl] = tokens
    state["res_values"][lat, sl] = vals


def _pair_counts(token: Tensor, latent: Tensor, n_tokens: int, d: int) -> tuple[Tensor, Tensor]:
    """(row * d + col, count) over all pairs of latents active on the same token (diagonal included).

    `token` must be sorted. Pairs are expanded a bounded number at a time.
    """
    counts = torch.bincount(token, minlength=n_tokens)
    starts = counts.cumsum(0) - counts
    cost = (counts * counts).cumsum(0)
    keys, totals, lo = [], [], 0
    while lo < n_tokens:
        base = int(cost[lo - 1]) if lo else 0
        hi = min(n_tokens, max(lo + 1, int(torch.searchsorted(cost, base + _MAX_PAIRS, right=True))))
        e0, e1 = int(starts[lo]), int(starts[hi - 1] + counts[hi - 1])
        reps = counts[token[e0:e1]]
        a = torch.repeat_interleave(torch.arange(e0, e1), reps)
        within = torch.arange(len(a)) - torch.repeat_interleave(reps.cumsum(0) - reps, reps)
        b = starts[token[a]] + within
        u, c = (latent[a] * d + latent[b]).unique(return_counts=True)
        keys.append(u)
        totals.append(c)
        lo = hi
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


def _update_coactivation(state: dict, acts: Tensor) -> None:
    d = acts.shape[-1]
    flat = acts.reshape(-1, d)
    token, latent = (flat > 0).nonzero(as_tuple=True)  # row-major: sorted by token
    if len(token) == 0:
        return
    keys, counts = _pair_counts(token, latent, flat.shape[0], d)
    if "coact" in state:
        state["coact"].view(-1).index_add_(0, keys, counts.to(torch.int32))
    else:
        off_diagonal = keys // d != keys % d
        _merge_coact_buffer(state, keys[off_diagonal], counts[off_diagonal], d)


def update_state(state: dict, acts: Tensor, input_ids: Tensor, gen: torch.Generator, cfg: AnalysisConfig):
    """Fold one batch of latent activations [B, T, d] (excluded positions already zero) into `state`."""
    batch = _Batch(acts, input_ids, state["contexts"], cfg)
    d = acts.shape[-1]
    by_latent = acts.reshape(-1, d).T
    latent, token = (by_latent > 0).nonzero(as_tuple=True)  # sorted by latent, then token
    values = by_latent[latent, token]
    _update_reservoir(state, batch, latent, token, values, gen)  # needs n_active from before this batch
    _update_stats(state, batch, latent, values)
    _update_top(state, batch)
    _update_coactivation(state, acts)
    state["batches"] += 1
    state["contexts"] += acts.shape[0]


# --- results -------------------------------------------------------------------------------------


def hist_bins(counts: list[int], edges: list[float]) -> list[dict]:
    """The nonzero range of a latent's histogram as {lo, hi, count}; bin i counts edges[i-1] <= v < edges[i].

    Bin 0 is the underflow bin (lo 0); the last is the overflow bin (hi None: JSON has no inf).
    """
    nonzero = [i for i, c in enumerate(counts) if c]
    if not nonzero:
        return []
    bins = []
    for i in range(nonzero[0], nonzero[-1] + 1):
        lo = 0.0 if i == 0 else edges[i - 1]
        hi = edges[i] if i < len(edges) else None
        bins.append({"lo": lo, "hi": hi, "count": counts[i]})
    return bins


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


def _window_row(
    latent: int, kind: str, quantile, rank: int, value: float, ctx: int, pos: int, tokens, vals, left
):
    return {
        "feature": latent,
        "kind": kind,
        "quantile": quantile,
        "rank": rank,
        "value": value,
        "context_id": ctx,
        "position": pos,
        "token": tokens[left],
        "tokens": tokens,
        "values": "[" + ",".join(f"{v:.4g}" for v in vals) + "]",
    }


def _example_rows(state: dict, cfg: AnalysisConfig, edges: Tensor):
    d = state["top_val"].shape[0]
    q, chosen = _quantile_choice(state, edges, cfg.per_quantile)
    top = [state[k].tolist() for k in ("top_val", "top_ctx", "top_pos", "top_tokens", "top_values")]
    res = [state[k] for k in ("res_val", "res_ctx", "res_pos", "res_tokens", "res_values")]
    for latent in range(d):
        values, ctxs, positions, tokens, vals = (t[latent] for t in top)
        for rank, value in enumerate(values):
            if value == -math.inf:
                break
            yield _window_row(latent, "top", None, rank, value, ctxs[rank], positions[rank], tokens[rank],
                              vals[rank], cfg.window_left)  # fmt: skip
        slots = chosen[latent].nonzero().squeeze(1).tolist()
        items = sorted((int(q[latent, s]), float(res[0][latent, s]), s) for s in slots)
        rank, previous = 0, None
        for quantile, value, s in items:
            rank = rank + 1 if quantile == previous else 0
            previous = quantile
            yield _window_row(latent, "quantile", quantile, rank, value, int(res[1][latent, s]),
                              int(res[2][latent, s]), res[3][latent, s].tolist(), res[4][latent, s].tolist(),
                              cfg.window_left)  # fmt: skip


def _top_partners(state: dict, m: int, chunk: int) -> list[tuple[int, int, int]]:
    """(feature, other, count) for each latent's m most frequent co-firing partners, count > 0."""
    rows = []
    if "coact" in state:
        coact = state["coact"]
        d = coact.shape[0]
        for lo in range(0, d, chunk):
            block = coact[lo : lo + chunk].long()
            block[torch.arange(len(block)), torch.arange(lo, lo + len(block))] = 0
            score, other = (block * d + (d - 1 - torch.arange(d))).topk(min(m, d), dim=1)
            for i, (s_row, o_row) in enumerate(zip(score.tolist(), other.tolist(), strict=True)):
                rows += [(lo + i, o, s // d) for s, o in zip(s_row, o_row, strict=True) if s // d > 0]
    else:
        for i, (o_row, c_row) in enumerate(
            zip(state["coact_other"].tolist(), state["coact_count"].tolist(), strict=True)
        ):
            rows += [(i, o, c) for o, c in zip(o_row[:m], c_row[:m], strict=True) if o >= 0 and c > 0]
    return rows


def _norm_weight(lm) -> Tensor:
    """The final norm's elementwise gain (Gemma stores it as an offset from 1); ones if it has none."""
    weight = getattr(lm.final_norm, "weight", None)
    if weight is None:
        return torch.ones(lm.d_model)
    weight = weight.detach().float().cpu()
    return 1 + weight if "Gemma" in type(lm.final_norm).__name__ else weight


@torch.no_grad()
def logit_effects(lm, W_dec: Tensor, cfg: AnalysisConfig):
    """Per latent: top and bottom (token, effect) pairs and a histogram over the whole vocabulary."""
    gain = _norm_weight(lm)
    W_U = lm.unembed.detach().float().cpu()
    nb = cfg.logit_bins
    for lo in range(0, W_dec.shape[0], cfg.geometry_chunk):
        effects = (W_dec[lo : lo + cfg.geometry_chunk].float().cpu() * gain) @ W_U.T
        m = min(cfg.logit_top, effects.shape[1])
        pos_v, pos_i = effects.topk(m, dim=1)
        neg_v, neg_i = (-effects).topk(m, dim=1)
        low, high = effects.amin(1, keepdim=True), effects.amax(1, keepdim=True)
        bins = ((effects - low) / (high - low).clamp(min=1e-30) * nb).long().clamp(0, nb - 1)
        rows = torch.arange(len(effects))[:, None] * nb
        hist = torch.bincount((rows + bins).view(-1), minlength=len(effects) * nb).view(-1, nb)
        # One conversion per chunk: per-row .tolist() calls cost more than the matmul.
        chunk = zip(
            pos_i.tolist(), pos_v.tolist(), neg_i.tolist(), (-neg_v).tolist(),
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


def _feature_rows(state: dict, dictionary: Dictionary, lm, cfg: AnalysisConfig, edges: Tensor):
    n_active = state["n_active"]
    density = n_active.double() / max(state["tokens"], 1)
    mean = state["sum_act"] / n_active.clamp(min=1)
    stats = zip(density.tolist(), mean.tolist(), state["max_act"].tolist(), n_active.tolist(), strict=True)
    geometry = zip(
        logit_effects(lm, dictionary.W_dec, cfg),
        decoder_neighbours(dictionary.W_dec, cfg.neighbours, cfg.geometry_chunk),
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


def _run_meta(lm, dictionary: Dictionary, data: DataConfig, cfg: AnalysisConfig, extra: dict | None) -> dict:
    return {
        "dictionary": dictionary.cfg.to_dict(),
        "model": {"name": lm.name, "hf_id": lm.hf_id},
        "hook_name": dictionary.cfg.hook_name,
        "data": data.to_dict(),
        "config": cfg.to_dict(),
        "hist_edges": HIST_EDGES.tolist(),
        **(extra or {}),
    }


def _vocab(lm) -> list[str]:
    n = lm.unembed.shape[0]
    known = min(n, len(lm.tokenizer))
    return lm.tokenizer.batch_decode([[i] for i in range(known)]) + [""] * (n - known)


def _load_resume_state(path: Path, meta_json: str) -> dict:
    if not path.exists():
        raise RunFolderError(
            f"Nothing to resume: no analysis state at {path}. Run the analysis without resume to start it."
        )
    state = torch.load(path, weights_only=True)
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


def _check_width(lm, dictionary: Dictionary) -> None:
    width = lm.hook_dim(dictionary.cfg.hook_name)
    if width != dictionary.cfg.d_in:
        raise DimensionMismatchError(
            f"the dictionary expects d_in={dictionary.cfg.d_in} but {dictionary.cfg.hook_name!r} of {lm.name} "
            f"has width {width}. Analyse it on the model and hook point it was trained on."
        )


@torch.no_grad()
def analyze(
    lm,
    dictionary: Dictionary,
    data: DataConfig,
    cfg: AnalysisConfig | None = None,
    store_path: str | Path = "features.db",
    progress: bool = True,
    stop_after_batches: int | None = None,
    resume: bool = False,
    extra_meta: dict | None = None,
) -> dict:
    """Stream the data once and write every latent's dashboard data into the store at `store_path`.

    Returns {"complete", "batches", "contexts", "tokens"}. With `stop_after_batches` it stops after
    that many batches of this call, checkpointed, so that `resume=True` continues the same pass.
    """
    cfg = cfg or AnalysisConfig()
    _check_width(lm, dictionary)
    dictionary = dictionary.to(lm.device).eval()
    hook, d = dictionary.cfg.hook_name, dictionary.cfg.d_sae
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
        batches = data.batches(
            lm.tokenizer, cfg.batch_contexts, max_contexts=n_contexts - state["contexts"],
            skip_contexts=state["contexts"],
        )  # fmt: skip
        bar = tqdm(
            total=n_contexts, initial=state["contexts"], desc="features", unit="ctx", disable=not progress
        )
        done_here = 0
        for input_ids in batches:
            keep = ~data.mask(input_ids, lm.tokenizer)
            x = lm.capture(input_ids.to(lm.device), hook)[hook]
            acts = dictionary.encode(x).float().cpu() * keep[..., None]
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
            _feature_rows(state, dictionary, lm, cfg, edges),
            _example_rows(state, cfg, edges),
            _top_partners(state, cfg.coactivation_top, cfg.geometry_chunk),
            summary,
        )
        path.unlink(missing_ok=True)
    return {"complete": True, **summary}
