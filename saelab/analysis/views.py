"""The view model: feature-store rows as display objects, shared by the JSON API, the exports and the HTML.

The store keeps token ids, padded windows and raw histogram counts. What a reader sees (token text,
windows without their padding, the nonzero histogram range, logit tables with token text) is derived
here once, so the web app, the Neuronpedia JSON and the static dashboard cannot drift apart.
Values are passed through as stored (the store rounds window values; a zero may come back as an int).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from saelab.analysis.store import DETECTION, FeatureStore


def token_text(vocab: Sequence[str], token_id: int) -> str:
    """A token id as text; an id outside the vocabulary shows as `<id>` rather than failing."""
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


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


@dataclass(frozen=True)
class Bar:
    """One bar of a drawn histogram: [lo, hi) holds `count` values; hi None is the open overflow bin."""

    lo: float
    hi: float | None
    count: int


@dataclass(frozen=True)
class Histogram:
    """A latent's activation histogram over the bins shared by all latents, and its nonzero range."""

    edges: list[float]
    counts: list[int]
    bins: list[dict]

    @classmethod
    def of(cls, counts: list[int], edges: list[float]) -> Histogram:
        return cls(edges, counts, hist_bins(counts, edges))

    @property
    def bars(self) -> list[Bar]:
        return [Bar(b["lo"], b["hi"], b["count"]) for b in self.bins]

    @property
    def bar_heights(self) -> list[int]:
        return [int(b["count"]) for b in self.bins]

    @property
    def bar_centres(self) -> list[float]:
        """Each bin's geometric centre (the bins are log-spaced); the overflow bin counts as [lo, 2 lo)."""
        centres = []
        for b in self.bins:
            hi = b["hi"] if b["hi"] is not None else b["lo"] * 2
            centres.append(math.sqrt(b["lo"] * hi) if b["lo"] > 0 else hi / 2)
        return centres

    def api(self) -> dict:
        return {"edges": self.edges, "counts": self.counts, "bins": self.bins}


@dataclass(frozen=True)
class LogitHistogram:
    """How a latent's decoder row moves every vocabulary logit: equal-width bins from min to max."""

    min: float
    max: float
    counts: list[int]

    @classmethod
    def of(cls, raw: dict | None) -> LogitHistogram:
        raw = raw or {"min": 0.0, "max": 0.0, "counts": []}
        return cls(raw["min"], raw["max"], raw["counts"])

    @property
    def width(self) -> float:
        return (self.max - self.min) / max(len(self.counts), 1)

    @property
    def bar_centres(self) -> list[float]:
        return [self.min + (i + 0.5) * self.width for i in range(len(self.counts))]

    @property
    def bars(self) -> list[Bar]:
        step = self.width
        return [Bar(self.min + i * step, self.min + (i + 1) * step, c) for i, c in enumerate(self.counts)]


@dataclass(frozen=True)
class LogitEntry:
    """One row of a promoted/suppressed token table."""

    token_id: int
    token: str
    value: float

    def api(self) -> dict:
        return {"token_id": self.token_id, "token": self.token, "value": self.value}


@dataclass(frozen=True)
class Neighbour:
    """A latent whose decoder row is close to this one's."""

    idx: int
    cosine: float


@dataclass(frozen=True)
class CoFiring:
    """A latent firing on the same tokens as this one, `count` times."""

    idx: int
    count: int


@dataclass(frozen=True)
class WindowToken:
    id: int
    text: str
    value: float

    def api(self) -> dict:
        return {"id": self.id, "text": self.text, "value": self.value}


def member_label(name: str) -> str:
    """A member model's short name for tables: the last part of its path or hub id."""
    return name.rstrip("/").rsplit("/", 1)[-1] or name


@dataclass(frozen=True)
class MemberValue:
    """What a crosscoder latent writes into one member model on an example: activation x ||d_i^m||."""

    member: str
    value: float

    @property
    def label(self) -> str:
        return member_label(self.member)

    def api(self) -> dict:
        return {"member": self.member, "label": self.label, "value": self.value}


@dataclass(frozen=True)
class ExampleWindow:
    """One stored example without its padding; `center` indexes the activating token in `tokens`;
    `members` (crosscoders only) the activation as written into each member model."""

    rank: int
    quantile: int | None
    value: float
    context_id: int
    position: int
    center: int | None
    tokens: list[WindowToken]
    members: list[MemberValue] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Index of the window's largest activation (the first of equals; 0 for an empty window)."""
        values = [t.value for t in self.tokens]
        return max(range(len(values)), key=values.__getitem__) if values else 0

    @property
    def scale(self) -> float:
        """The activation that gets full colour: the largest in the window (never 0)."""
        return max([t.value for t in self.tokens] + [self.value, 1e-9])

    def alpha(self, value: float) -> float:
        """How strongly to shade a token of this window, 0 to 1."""
        return min(1.0, max(0.0, value / self.scale))

    def api(self) -> dict:
        return {
            "rank": self.rank, "quantile": self.quantile, "value": self.value, "context_id": self.context_id,
            "position": self.position, "center": self.center, "tokens": [t.api() for t in self.tokens],
            **({"members": [m.api() for m in self.members]} if self.members else {}),  # crosscoders only
        }  # fmt: skip


PREVIEW_CHARS = 120  # a list row's preview of its top example: one line, at most this many characters


def preview_text(vocab: Sequence[str], tokens: list[int] | None, max_chars: int = PREVIEW_CHARS) -> str:
    """A stored window as one line of text: padding dropped, newlines as ↵, cut to `max_chars` with …."""
    text = "".join(token_text(vocab, t) for t in tokens or [] if t >= 0)
    text = text.replace("\r", "").replace("\n", "↵")
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


@dataclass(frozen=True)
class Score:
    """One scorer's score of an explanation beside its two controls; `flagged`: it does not beat the
    shuffled-label control (saelab.analysis.store.flagged)."""

    scorer: str
    score: float
    chance: float
    shuffled: float
    ci_low: float | None
    ci_high: float | None
    n: int | None
    flagged: bool
    details: dict | None = None  # the scorer's own record (per-example results); not in the API

    @classmethod
    def of(cls, scorer: str, raw: dict) -> Score:
        return cls(scorer, raw["score"], raw["chance"], raw["shuffled"], raw["ci_low"], raw["ci_high"],
                   raw["n"], raw["flagged"], raw.get("details"))  # fmt: skip

    def api(self) -> dict:
        return {
            "score": self.score, "chance": self.chance, "shuffled": self.shuffled, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "n": self.n, "flagged": self.flagged,
        }  # fmt: skip


@dataclass(frozen=True)
class Explanation:
    """One label of a latent (kind human, auto or self), what made it, and its scores by scorer."""

    id: int
    kind: str
    text: str
    source: dict
    created: str
    scores: dict[str, Score]

    @classmethod
    def of(cls, raw: dict) -> Explanation:
        scores = {name: Score.of(name, s) for name, s in raw["scores"].items()}
        return cls(raw["id"], raw["kind"], raw["text"], raw["source"], raw["created"], scores)

    @property
    def detection(self) -> Score | None:
        return self.scores.get(DETECTION)

    def api(self) -> dict:
        return {
            "id": self.id, "kind": self.kind, "text": self.text, "source": self.source, "created": self.created,
            "scores": {name: s.api() for name, s in self.scores.items()},
        }  # fmt: skip


@dataclass(frozen=True)
class Dream:
    """One dreamed prompt (fluent dreaming): its tokens' texts, the latent's activation on it against the
    latent's dataset maximum, and the prompt's cross-entropy under the model (lower: more fluent)."""

    id: int
    tokens: list[str]
    activation: float
    cross_entropy: float
    lam: float | None
    of_max: float | None  # activation / the dataset maximum (None for a latent that never fired)
    run_key: str
    source: dict

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def api(self) -> dict:
        return {
            "id": self.id, "text": self.text, "tokens": self.tokens, "activation": self.activation,
            "cross_entropy": self.cross_entropy, "lam": self.lam, "of_max": self.of_max,
            "run_key": self.run_key,
        }  # fmt: skip


@dataclass(frozen=True)
class Member:
    """One member model of a crosscoder latent: its decoder norm ||d_i^m|| (normalised space), its share of
    the latent's norms, and the logit effects of d_i^m through that model's unembedding."""

    index: int
    name: str
    decoder_norm: float
    share: float
    logits_pos: list[LogitEntry]
    logits_neg: list[LogitEntry]

    @property
    def label(self) -> str:
        return member_label(self.name)

    def api(self) -> dict:
        return {
            "index": self.index, "name": self.name, "label": self.label, "decoder_norm": self.decoder_norm,
            "share": self.share,
            "logits_pos": [e.api() for e in self.logits_pos], "logits_neg": [e.api() for e in self.logits_neg],
        }  # fmt: skip


@dataclass(frozen=True)
class LatentDiffView:
    """A crosscoder latent's model-diffing figures (saelab.diffing): tag, Δnorm, decoder cosine, and
    Latent Scaling's ν^ε and ν^r when `saelab diff` ran with data (else None)."""

    tag: str
    delta_norm: float
    cosine: float | None
    nu_eps: float | None
    nu_r: float | None

    def api(self) -> dict:
        return {
            "tag": self.tag, "delta_norm": self.delta_norm, "cosine": self.cosine, "nu_eps": self.nu_eps,
            "nu_r": self.nu_r,
        }  # fmt: skip


@dataclass(frozen=True)
class FeatureSummary:
    """One row of the feature list: statistics, the label, the best explanation with its detection score
    and controls, and a one-line preview of the strongest top example."""

    idx: int
    density: float
    mean_act: float
    max_act: float
    n_active: int
    explanation: str | None
    best: Explanation | None
    preview: str
    tag: str | None = None  # crosscoders: the model-diffing tag and Δnorm
    delta_norm: float | None = None

    def api(self) -> dict:
        best = self.best
        detection = best.detection if best else None
        return {
            "idx": self.idx, "density": self.density, "mean_act": self.mean_act, "max_act": self.max_act,
            "n_active": self.n_active, "explanation": self.explanation,
            "score": detection.score if detection else None,
            "best": None if best is None else {
                "id": best.id, "kind": best.kind, "text": best.text,
                "detection": detection.api() if detection else None,
            },
            "preview": self.preview,
            **({"tag": self.tag, "delta_norm": self.delta_norm} if self.tag is not None else {}),  # crosscoders
        }  # fmt: skip


@dataclass(frozen=True)
class FeatureView:
    """One latent as every reader shows it: statistics, histograms, logit tables, neighbours, its label
    (`explanation`) and every explanation best first with its scores."""

    idx: int
    density: float
    mean_act: float
    max_act: float
    n_active: int
    explanation: str | None
    quantile_edges: list[float] | None
    hist: Histogram
    logits_pos: list[LogitEntry]
    logits_neg: list[LogitEntry]
    logit_hist: dict | None  # as stored: {min, max, counts}, or None
    neighbours: list[Neighbour]
    coactivation: list[CoFiring]
    explanations: list[Explanation] = field(default_factory=list)  # best first
    dreams: list[Dream] = field(default_factory=list)  # newest run first, each by cross-entropy
    members: list[Member] = field(default_factory=list)  # a crosscoder latent's member models
    diff: LatentDiffView | None = None

    @property
    def dead(self) -> bool:
        return self.n_active == 0

    @property
    def best(self) -> Explanation | None:
        return self.explanations[0] if self.explanations else None

    @property
    def logit_histogram(self) -> LogitHistogram:
        return LogitHistogram.of(self.logit_hist)

    def api(self) -> dict:
        return {
            "idx": self.idx,
            "density": self.density,
            "mean_act": self.mean_act,
            "max_act": self.max_act,
            "n_active": self.n_active,
            "dead": self.dead,
            "explanation": self.explanation,
            "quantile_edges": self.quantile_edges,
            "hist": self.hist.api(),
            "logits_pos": [e.api() for e in self.logits_pos],
            "logits_neg": [e.api() for e in self.logits_neg],
            "logit_hist": self.logit_hist,
            "neighbours": [{"idx": n.idx, "cosine": n.cosine} for n in self.neighbours],
            "coactivation": [{"idx": c.idx, "count": c.count} for c in self.coactivation],
            "explanations": [e.api() for e in self.explanations],
            "dreams": [d.api() for d in self.dreams],
            # A crosscoder latent's member models and diffing figures (other dictionaries: absent).
            **({"members": [m.api() for m in self.members]} if self.members else {}),
            **({"diff": self.diff.api()} if self.diff is not None else {}),
        }


@dataclass(frozen=True)
class FeaturePage:
    """Everything one latent's page shows: its summary and its top and quantile example windows."""

    feature: FeatureView
    top: list[ExampleWindow]
    quantile: list[ExampleWindow]

    @property
    def examples(self) -> list[ExampleWindow]:
        return self.top + self.quantile


@dataclass(frozen=True)
class DisplayContext:
    """What turns any row of one store into a view: token texts, the shared histogram edges, and where
    the activating token sits in a stored window. Read once per store (the vocabulary is its largest table)."""

    vocab: list[str]
    hist_edges: list[float]
    window_left: int
    members: list[str] = field(default_factory=list)  # a crosscoder's member models, by member index

    @classmethod
    def of(cls, store: FeatureStore, vocab: list[str] | None = None) -> DisplayContext:
        meta = store.meta()
        return cls(
            vocab if vocab is not None else store.vocab(),
            meta.get("hist_edges") or [],
            int((meta.get("config") or {}).get("window_left", 0)),
            [str(m) for m in meta.get("members") or []],
        )

    def member_name(self, index: int) -> str:
        return self.members[index] if 0 <= index < len(self.members) else f"member {index}"

    def member_views(self, rows: list[dict] | None) -> list[Member]:
        """A `FeatureStore.feature` row's ``members`` as views, each with its share of the decoder norms."""
        rows = rows or []
        total = sum(r["decoder_norm"] for r in rows)
        return [
            Member(r["member"], self.member_name(r["member"]), r["decoder_norm"],
                   r["decoder_norm"] / total if total > 0 else 0.0,
                   self.logit_table(r.get("logits_pos")), self.logit_table(r.get("logits_neg")))
            for r in rows
        ]  # fmt: skip

    def token_text(self, token_id: int) -> str:
        return token_text(self.vocab, token_id)

    def logit_table(self, pairs: list | None) -> list[LogitEntry]:
        return [LogitEntry(t, self.token_text(t), v) for t, v in pairs or []]

    def feature(self, row: dict) -> FeatureView:
        """A `FeatureStore.feature` row as a view."""
        return FeatureView(
            idx=row["idx"],
            density=row["density"],
            mean_act=row["mean_act"],
            max_act=row["max_act"],
            n_active=row["n_active"],
            explanation=row.get("explanation"),
            quantile_edges=row.get("quantile_edges"),
            hist=Histogram.of(row.get("hist") or [], self.hist_edges),
            logits_pos=self.logit_table(row.get("logits_pos")),
            logits_neg=self.logit_table(row.get("logits_neg")),
            logit_hist=row.get("logit_hist"),
            neighbours=[Neighbour(o, c) for o, c in row.get("neighbours") or []],
            coactivation=[CoFiring(c["other"], c["count"]) for c in row.get("coactivation") or []],
            explanations=[Explanation.of(e) for e in row.get("explanations") or []],
            dreams=[self.dream(d, row["max_act"]) for d in row.get("dreams") or []],
            members=self.member_views(row.get("members")),
            diff=None if not row.get("diff") else LatentDiffView(
                row["diff"]["tag"], row["diff"]["delta_norm"], row["diff"].get("cosine"),
                row["diff"].get("nu_eps"), row["diff"].get("nu_r"),
            ),
        )  # fmt: skip

    def dream(self, row: dict, max_act: float) -> Dream:
        """A `FeatureStore.dreams` row as a view, its activation against the latent's dataset maximum."""
        return Dream(
            row["id"], [self.token_text(t) for t in row["token_ids"]], row["activation"], row["cross_entropy"],
            row["lam"], row["activation"] / max_act if max_act > 0 else None, row["run_key"], row["source"],
        )  # fmt: skip

    def summary(self, row: dict) -> FeatureSummary:
        """A `FeatureStore.list_features` row as a list row."""
        return FeatureSummary(
            idx=row["idx"],
            density=row["density"],
            mean_act=row["mean_act"],
            max_act=row["max_act"],
            n_active=row["n_active"],
            explanation=row.get("explanation"),
            best=None if row.get("best") is None else Explanation.of(row["best"]),
            preview=preview_text(self.vocab, row.get("top_tokens")),
            tag=row.get("tag"),
            delta_norm=row.get("delta_norm"),
        )

    def window(self, row: dict, members: list[Member] | None = None) -> ExampleWindow:
        """A `FeatureStore.examples` row as a window: padding (token id < 0) dropped; with a crosscoder
        latent's `members`, the activation each member model receives (value x ||d_i^m||)."""
        tokens, center = [], None
        for j, (t, v) in enumerate(zip(row["tokens"], row["values"], strict=True)):
            if t < 0:
                continue
            if j == self.window_left:
                center = len(tokens)
            tokens.append(WindowToken(t, self.token_text(t), v))
        written = [MemberValue(m.name, row["value"] * m.decoder_norm) for m in members or []]
        return ExampleWindow(
            row["rank"],
            row["quantile"],
            row["value"],
            row["context_id"],
            row["position"],
            center,
            tokens,
            written,
        )

    def windows(
        self, store: FeatureStore, idx: int, kind: str, members: list[Member] | None = None
    ) -> list[ExampleWindow]:
        if members is None and self.members:  # a crosscoder store: each example's per-member activation
            members = self.member_views(store.members(idx))
        return [self.window(r, members) for r in store.examples(idx, kind)]

    def page(self, store: FeatureStore, idx: int) -> FeaturePage | None:
        """Latent `idx` with its examples, or None if the store has no such latent."""
        row = store.feature(idx)
        if row is None:
            return None
        view = self.feature(row)
        return FeaturePage(
            view,
            self.windows(store, idx, "top", view.members),
            self.windows(store, idx, "quantile", view.members),
        )
