"""Example sets for explaining and scoring one latent, read from the feature store.

Activating examples are the latent's stored top and quantile windows. They are grouped by stratum
(the top examples, then each rank quantile), shuffled within each stratum (seeded) and dealt round-robin
across strata, alternately to the explain set and the test set: both sets span the quantiles and never
share a window (delphi samples its 40 + 50 the same way from 10 quantiles).

Non-activating examples are windows stored for OTHER latents: *random* ones (from randomly chosen live
latents) and *hard* ones (from this latent's co-firing partners and decoder neighbours, which look most
like it). A window stored for another latent may still make this one fire, so every candidate is
re-encoded on its own with the LM and the dictionary (a BOS prepended when the tokenizer has one; BOS and
special tokens excluded, as in the analysis) and kept only if this latent stays at 0 on every token. At
most 4 x the wanted number of candidates is checked, so a latent that fires almost everywhere gets fewer
non-activating examples rather than an unbounded search.

A window is shown to an LM as text with its activating tokens marked ``<<like this>>`` (runs of adjacent
activating tokens share one mark), padding dropped; see `format_example`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from saelab.analysis.store import FeatureStore
from saelab.analysis.views import token_text
from saelab.core.data import exclusion_mask
from saelab.core.models import HookedLM, special_token_ids
from saelab.core.prompts import pad_rows, pad_token_id
from saelab.dictionaries import Dictionary
from saelab.errors import DataError

OPEN, CLOSE = "<<", ">>"


@dataclass(frozen=True)
class Example:
    """One window shown to an LM: token ids (padding dropped), their texts, this latent's values on them."""

    feature: int  # the latent the store kept this window for (another latent for non-activating ones)
    kind: str  # "top" or "quantile" (the store's kind)
    quantile: int | None
    rank: int
    context_id: int
    position: int
    tokens: tuple[int, ...]
    pieces: tuple[str, ...]  # each token's text
    values: tuple[float, ...]  # the explained latent's activation on each token (all 0: non-activating)
    source: str  # "activating", "random" or "hard"

    @property
    def id(self) -> list[int]:
        """[context_id, position]: where in the analysed data the window is centred (for provenance)."""
        return [self.context_id, self.position]

    @property
    def activating(self) -> bool:
        return self.source == "activating"

    @property
    def marked(self) -> tuple[int, ...]:
        """Indices of the tokens on which the latent fires."""
        return tuple(i for i, v in enumerate(self.values) if v > 0)

    @property
    def text(self) -> str:
        """The window as plain text, nothing marked."""
        return "".join(self.pieces)


@dataclass
class ExampleSet:
    """What one latent is explained from and scored on."""

    feature: int
    explain: list[Example]
    test: list[Example]  # activating, across the quantiles, disjoint from `explain`
    random: list[Example] = field(default_factory=list)
    hard: list[Example] = field(default_factory=list)

    @property
    def non_activating(self) -> list[Example]:
        return self.random + self.hard

    def ids(self) -> dict[str, list[list[int]]]:
        return {name: [e.id for e in getattr(self, name)] for name in ("explain", "test", "random", "hard")}


def token_pieces(
    tokens: Sequence[int], vocab: Sequence[str], tokenizer=None, context: int = 4
) -> tuple[str, ...]:
    """Each token's text. With a tokenizer: the text a token adds to the decoded `context` tokens before
    it (so spaces and multi-byte characters come out as the model writes them; 4 covers any UTF-8
    character), special tokens as ""; else the store's vocabulary entry."""
    if tokenizer is None:
        return tuple(token_text(vocab, t) for t in tokens)
    specials = special_token_ids(tokenizer)
    pieces = []
    for i, t in enumerate(tokens):
        if t in specials:
            pieces.append("")
            continue
        before = list(tokens[max(0, i - context) : i])
        head = tokenizer.decode(before, skip_special_tokens=True) if before else ""
        text = tokenizer.decode(before + [t], skip_special_tokens=True)
        # A prefix that re-decodes differently (a completed multi-byte character): the token alone.
        pieces.append(text[len(head) :] if text.startswith(head) else tokenizer.decode([t]))
    return tuple(pieces)


def _example(row: dict, pieces_of, source: str, zero: bool) -> Example:
    keep = [j for j, t in enumerate(row["tokens"]) if t >= 0]
    tokens = tuple(int(row["tokens"][j]) for j in keep)
    values = tuple(0.0 if zero else float(row["values"][j]) for j in keep)
    return Example(
        feature=row["feature"], kind=row["kind"], quantile=row["quantile"], rank=row["rank"],
        context_id=row["context_id"], position=row["position"], tokens=tokens, pieces=pieces_of(tokens),
        values=values, source=source,
    )  # fmt: skip


def format_example(
    example: Example, marked: Sequence[int] | None = None, show_values: bool = False, mark: bool = True
) -> str:
    """The window as text with the tokens at `marked` (default: where the latent fires) in ``<<...>>``;
    adjacent marked tokens share one mark and a marked token's leading whitespace stays outside it.
    `show_values` adds a line listing each marked token with its activation."""
    chosen = set(example.marked if marked is None else marked) if mark else set()
    out, i, n = [], 0, len(example.pieces)
    while i < n:
        if i not in chosen:
            out.append(example.pieces[i])
            i += 1
            continue
        j = i
        while j < n and j in chosen:
            j += 1
        run = "".join(example.pieces[i:j])
        stripped = run.lstrip()
        out.append(run[: len(run) - len(stripped)] + OPEN + stripped + CLOSE if stripped else run)
        i = j
    text = "".join(out)
    if show_values and chosen:
        listed = ", ".join(
            f"{example.pieces[k].strip() or repr(example.pieces[k])} ({example.values[k]:.3g})"
            for k in sorted(chosen)
        )
        text += f"\nActivations: {listed}"
    return text


def split_activating(pool: list[Example], n_explain: int, n_test: int, seed: int):
    """(explain, test): strata shuffled (seeded), dealt round-robin across strata, alternately to each set
    (the set a stratum starts with alternates too, so both sets see every stratum)."""
    strata: dict[int, list[Example]] = {}
    for e in pool:
        strata.setdefault(-1 if e.quantile is None else e.quantile, []).append(e)
    rng = random.Random(seed)
    groups = []
    for key in sorted(strata, reverse=True):  # top first, then quantiles from the highest
        group = list(strata[key])
        rng.shuffle(group)
        groups.append(group)
    sets = ([], n_explain), ([], n_test)
    for r in range(max((len(g) for g in groups), default=0)):
        for s, group in enumerate(groups):
            if r >= len(group):
                continue
            for chosen, limit in sets if (r + s) % 2 == 0 else sets[::-1]:
                if len(chosen) < limit:
                    chosen.append(group[r])
                    break
    return sets[0][0], sets[1][0]


@torch.no_grad()
def latent_on_windows(
    lm: HookedLM, dictionary: Dictionary, idx: int, windows: Sequence[Sequence[int]], batch_size: int = 32
) -> list[float]:
    """The largest activation of latent `idx` on each window, each run on its own (a BOS prepended when the
    tokenizer has one and the window does not start with it; special tokens excluded as in the analysis)."""
    tokenizer, hooks = lm.tokenizer, dictionary.cfg.input_hooks  # several for a CLT or a crosscoder
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if isinstance(bos, int) else []
    out: list[float] = []
    for start in range(0, len(windows), batch_size):
        rows = [
            (prefix if list(w[:1]) != prefix else []) + list(w) for w in windows[start : start + batch_size]
        ]
        ids, mask = pad_rows(rows, pad_token_id(tokenizer), left=False)
        x = dictionary.capture_inputs(lm.capture(ids.to(lm.device), hooks, attention_mask=mask.to(lm.device)))
        acts = dictionary.encode(x)[..., idx].float().cpu()
        # The BOS is a special token, so excluding special tokens drops it wherever it sits.
        excluded = exclusion_mask(ids, tokenizer, exclude_bos=False) | (mask == 0)
        acts[excluded] = 0.0
        out += acts.max(1).values.tolist()
    return out


def _candidates(store: FeatureStore, latents: Sequence[int], rng: random.Random, per_latent: int):
    """Up to `per_latent` stored windows of each latent in turn (a seeded choice among its examples)."""
    for other in latents:
        rows = store.examples(other, "top") + store.examples(other, "quantile")
        rng.shuffle(rows)
        yield from rows[:per_latent]


def _non_activating(
    store, idx, latents, n, rng, lm, dictionary, pieces_of, source, seen, per_latent, batch_size
) -> list[Example]:
    """Up to `n` windows of `latents` on which latent `idx` stays at 0, checked in batches; at most
    4 n candidates are checked, so a latent that fires almost everywhere costs a bounded time."""
    found: list[Example] = []
    pending: list[dict] = []
    budget = max(4 * n, batch_size)  # candidates checked at most: a dense latent fires on most windows

    def flush():
        values = latent_on_windows(lm, dictionary, idx, [r["kept"] for r in pending], batch_size)
        for row, value in zip(pending, values, strict=True):
            if value <= 0 and len(found) < n:
                found.append(_example(row, pieces_of, source, zero=True))
        pending.clear()

    for row in _candidates(store, latents, rng, per_latent):
        if len(found) >= n or budget == 0:
            break
        kept = tuple(t for t in row["tokens"] if t >= 0)
        if not kept or kept in seen:
            continue
        seen.add(kept)
        budget -= 1
        pending.append({**row, "kept": kept})
        # check about twice as many as are still missing at a time: a few windows, not a whole batch
        if len(pending) >= min(batch_size, 2 * (n - len(found))):
            flush()
    if pending and len(found) < n:
        flush()
    return found


def live_latents(store: FeatureStore) -> list[int]:
    """Indices of the latents that fired at least once, ascending."""
    n = store.count_features(include_dead=False)
    return [f["idx"] for f in store.list_features(sort="idx", descending=False, limit=n, include_dead=False)]


def build_examples(
    store: FeatureStore,
    idx: int,
    lm: HookedLM,
    dictionary: Dictionary,
    n_explain: int = 40,
    n_test: int = 50,
    n_random: int = 50,
    n_hard: int = 50,
    seed: int = 0,
    vocab: Sequence[str] | None = None,
    batch_size: int = 32,
    live: Sequence[int] | None = None,
) -> ExampleSet:
    """The explain / test / random / hard example sets of latent `idx` (see the module docstring).

    `live` (the store's live latents, by index) may be passed in when many latents are built in a row."""
    row = store.feature(idx)
    if row is None:
        raise DataError(f"latent {idx} is not in the feature store {store.path}.")
    vocab = store.vocab() if vocab is None else vocab
    tokenizer = lm.tokenizer

    def pieces_of(tokens):
        return token_pieces(tokens, vocab, tokenizer)

    stored = store.examples(idx, "top") + store.examples(idx, "quantile")
    pool, seen, where = [], set(), set()
    for r in stored:
        kept = tuple(t for t in r["tokens"] if t >= 0)
        if (r["context_id"], r["position"]) in where or not kept:
            continue
        seen.add(kept)
        where.add((r["context_id"], r["position"]))
        pool.append(_example(r, pieces_of, "activating", zero=False))
    explain, test = split_activating(pool, n_explain, n_test, seed)
    rng = random.Random(seed * 1_000_003 + idx)
    hard_latents = []
    for other in [c["other"] for c in row["coactivation"]] + [o for o, _ in row.get("neighbours") or []]:
        if other != idx and other not in hard_latents:
            hard_latents.append(other)
    hard = _non_activating(
        store, idx, hard_latents, n_hard, rng, lm, dictionary, pieces_of, "hard", seen, 10**9, batch_size
    )
    live = [i for i in (live_latents(store) if live is None else live) if i != idx]
    rng.shuffle(live)
    rand = _non_activating(
        store, idx, live, n_random, rng, lm, dictionary, pieces_of, "random", seen, 1, batch_size
    )
    return ExampleSet(idx, explain, test, rand, hard)
