"""Direction selection after Arditi et al. 2024 ("Refusal is mediated by a single direction").

Candidates: the difference in means between a positive and a negative prompt set at every layer's
resid_pre and every post-instruction position (the chat template's tokens after the user's text).
Each candidate r is scored on held-out validation prompts with a behaviour metric, the log-odds
log(p / (1 - p)) of a set of first tokens (`BehaviourMetric`; Arditi's refusal score uses "I", "As"):
- ablation score: the metric on the POSITIVE validation prompts with r ablated from every write to
  the residual stream (`ablation(lm, r)`: embedding, every attn_out and mlp_out). Lower is better:
  the behaviour should go away.
- addition score: the metric on the NEGATIVE validation prompts with the (unnormalised) r added at
  layer i's resid_pre at every position. Higher is better: the behaviour should appear.
- KL score: KL(unablated || ablated) of the next-token distribution at the last position on a
  neutral set (default: the negative validation prompts). Low: ablation leaves other behaviour alone.
Filters (as in the paper): layers in the last 20% (layer >= 0.8 * n_layers), KL above 0.1, and
candidates whose addition does not induce the behaviour (addition score below 0, i.e. p < 0.5) are
discarded; the best remaining candidate has the lowest ablation score. Every candidate stays in the
ranked table with its scores and the reason it was filtered out.

The embedded SmolLM2-135M-Instruct barely refuses, so the shipped example uses a behaviour it has:
asked for code, it opens its answer with a code fence "```" (p ~ 0.6), and asked for a poem, story or
letter it practically never does (p < 0.01). `load_prompt_sets("code")` reads those sets. The
paper's filters are too strict for a model that small: ablating even a random unit direction
everywhere costs it KL 0.02-0.19 (`SelectionResult.random_kl` measures this for any model), so
examples/direction_selection.py relaxes kl_threshold and min_addition_score and says so.

Running the same pipeline on a refusing chat model (harmful vs harmless instructions)::

    import datasets
    from saelab.core.models import load_model
    from saelab.interventions.selection import SelectionConfig, refusal_metric, select_direction

    lm = load_model("Qwen/Qwen2.5-1.5B-Instruct")  # any chat model with a chat template
    harmful = datasets.load_dataset("walledai/AdvBench", split="train")["prompt"]  # or a local file
    alpaca = datasets.load_dataset("tatsu-lab/alpaca", split="train")
    harmless = [r["instruction"] for r in alpaca if not r["input"]]
    result = select_direction(
        lm, harmful[:128], harmless[:128], harmful[128:160], harmless[128:160],
        metric=refusal_metric(lm.tokenizer, ("I", "As")),  # Arditi's refusal tokens for Qwen
        cfg=SelectionConfig(progress=True),
    )
    print(result.table()); result.plot("runs/steering/refusal.png"); result.save("runs/steering/refusal")

or from the command line, with a JSON file of the four sets in the format of
saelab/interventions/prompts/selection_code.json: ``python examples/direction_selection.py --model
Qwen/Qwen2.5-1.5B-Instruct --sets refusal.json``. Arditi et al. used 128 prompts per training set
and 32 per validation set; on a GPU this takes minutes for a 1-2B model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saelab.core.fileio import atomic_write_json, save_figure
from saelab.core.models import HookedLM
from saelab.core.prompts import EncodedBatch, encode
from saelab.errors import DataError, SelectionError
from saelab.interventions.directions import (
    DirectionSet,
    last_logits,
    log_odds,
    mean_difference,
    post_instruction_positions,
)
from saelab.interventions.hooks import AddVector, Intervention, ablation, steer

PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass
class BehaviourMetric:
    """log(p / (1 - p)) with p the probability of any of `token_ids` as the first generated token."""

    token_ids: list[int]
    name: str = "behaviour"
    tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = sorted({int(i) for i in self.token_ids})
        if not self.token_ids:
            raise SelectionError(
                "a behaviour metric needs at least one token id, e.g. the first token of 'I cannot'."
            )

    @classmethod
    def from_strings(cls, tokenizer, strings: Sequence[str], name: str = "behaviour") -> BehaviourMetric:
        """The first token of each string, as the model would write it at the start of its answer."""
        ids, tokens = [], []
        for s in strings:
            encoded = tokenizer(s, add_special_tokens=False)["input_ids"]
            if not encoded:
                raise SelectionError(f"the metric string {s!r} has no tokens; give non-empty strings.")
            ids.append(encoded[0])
            tokens.append(tokenizer.decode([encoded[0]]))
        return cls(ids, name, tokens)

    def __call__(self, logits: Tensor) -> Tensor:
        """Log-odds [batch] from next-token logits [batch, vocab]."""
        return log_odds(logits, self.token_ids)

    def to_dict(self) -> dict:
        return {"name": self.name, "token_ids": self.token_ids, "tokens": self.tokens}


def refusal_metric(tokenizer, strings: Sequence[str] = ("I", "As")) -> BehaviourMetric:
    """Arditi et al.'s refusal score: log-odds of refusal-opening tokens ("I cannot", "As an AI")."""
    return BehaviourMetric.from_strings(tokenizer, strings, name="refusal")


@dataclass
class SelectionConfig:
    """Which candidates to score and how to filter them (defaults follow Arditi et al. 2024)."""

    layers: list[int] | None = None  # None = every layer
    positions: list[int] | None = None  # None = every post-instruction position (-n..-1)
    max_layer_fraction: float = 0.8  # discard layers >= this fraction of n_layers (the last 20%)
    kl_threshold: float = 0.1
    min_addition_score: float = 0.0  # adding r must raise the metric on negative prompts to at least this
    chat: bool = True
    batch_size: int = 16
    n_random: int = 3  # random unit directions ablated for a KL reference (how fragile the model is)
    seed: int = 0
    progress: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """One (layer, position) direction with its scores; `filtered` says why it cannot be chosen."""

    layer: int
    position: int
    hook: str
    norm: float
    ablation_score: float | None = None
    addition_score: float | None = None
    kl_score: float | None = None
    filtered: str | None = None
    rank: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SelectionResult:
    """All candidates ranked (kept ones first, by ablation score) plus the directions and baselines."""

    candidates: list[Candidate]
    directions: DirectionSet
    metric: BehaviourMetric
    baseline_positive: float  # metric on the positive validation prompts, no intervention
    baseline_negative: float
    n_layers: int
    config: dict = field(default_factory=dict)
    random_kl: list[float] = field(default_factory=list)  # KL of ablating random unit directions

    @property
    def best(self) -> Candidate | None:
        """The selected candidate, or None when every candidate was filtered out."""
        kept = [c for c in self.candidates if c.filtered is None]
        return kept[0] if kept else None

    def direction(self, candidate: Candidate | None = None) -> Tensor:
        """The unnormalised direction of `candidate` (default: the selected one)."""
        candidate = candidate or self.best
        if candidate is None:
            raise SelectionError(
                "every candidate was filtered out, so there is no selected direction. Look at the table's "
                "reasons: raise kl_threshold, lower min_addition_score, or use larger or cleaner prompt sets."
            )
        return self.directions.get(candidate.hook, candidate.position)

    def to_dict(self) -> dict:
        best = self.best
        return {
            "metric": self.metric.to_dict(),
            "baseline_positive": self.baseline_positive,
            "baseline_negative": self.baseline_negative,
            "n_layers": self.n_layers,
            "random_direction_kl": self.random_kl,
            "layer_cutoff": _cutoff(self.n_layers, self.config.get("max_layer_fraction", 0.8)),
            "best": None if best is None else best.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "config": self.config,
            "provenance": self.directions.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """A folder: the directions (directions.safetensors/json) and the ranked table (selection.json)."""
        path = self.directions.save(path)
        atomic_write_json(path / "selection.json", self.to_dict())
        return path

    def table(self, top: int = 15) -> str:
        """The first `top` rows of the ranked table, as text."""
        rows = [
            f"{'rank':>4} {'layer':>5} {'pos':>4} {'norm':>7} {'ablate':>8} {'add':>8} {'KL':>8}  filtered"
        ]
        for c in self.candidates[:top]:
            cells = [_fmt(c.ablation_score), _fmt(c.addition_score), _fmt(c.kl_score)]
            rows.append(
                f"{c.rank:4d} {c.layer:5d} {c.position:4d} {c.norm:7.2f} "
                + " ".join(cells)
                + f"  {c.filtered or '-'}"
            )
        rows.append(
            f"baseline {self.metric.name} log-odds: positive {self.baseline_positive:.3f}, "
            f"negative {self.baseline_negative:.3f}"
        )
        if self.random_kl:
            rows.append(
                "KL of ablating random unit directions: " + ", ".join(f"{k:.3f}" for k in self.random_kl)
            )
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """PNG like the paper's figure: each score against the layer, one line per position."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
        positions = sorted({c.position for c in self.candidates})
        cmap = plt.get_cmap("viridis")
        panels = [
            ("ablation_score", f"{self.metric.name} log-odds, r ablated\n(positive prompts; lower = better)"),
            ("addition_score", f"{self.metric.name} log-odds, r added\n(negative prompts; higher = better)"),
            ("kl_score", "KL(unablated || ablated)\n(neutral prompts)"),
        ]
        for ax, (key, label) in zip(axes, panels, strict=True):
            for k, pos in enumerate(positions):
                pts = sorted((c.layer, getattr(c, key)) for c in self.candidates if c.position == pos)
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    color = cmap(k / max(1, len(positions) - 1))
                    ax.plot(*zip(*pts, strict=True), marker=".", color=color, label=f"position {pos}")
            ax.set_ylabel(label, fontsize=8)
            ax.axvspan(
                _cutoff(self.n_layers, self.config.get("max_layer_fraction", 0.8)) - 0.5,
                self.n_layers - 0.5,
                color="grey",
                alpha=0.15,
            )
        axes[0].axhline(self.baseline_positive, color="black", ls="--", lw=0.8, label="no intervention")
        axes[1].axhline(self.baseline_negative, color="black", ls="--", lw=0.8, label="no intervention")
        axes[1].axhline(
            self.config.get("min_addition_score", 0.0), color="red", ls=":", lw=0.8, label="filter"
        )
        axes[2].axhline(self.config.get("kl_threshold", 0.1), color="red", ls=":", lw=0.8, label="filter")
        axes[2].set_yscale("symlog", linthresh=0.01)
        best = self.best
        if best is not None:
            for ax, key in zip(axes, ("ablation_score", "addition_score", "kl_score"), strict=True):
                ax.plot(
                    [best.layer],
                    [getattr(best, key)],
                    marker="*",
                    ms=14,
                    color="red",
                    ls="none",
                    label=f"selected (layer {best.layer}, pos {best.position})",
                )
        axes[0].legend(fontsize=7, ncol=2)
        axes[-1].set_xlabel("layer (grey: last 20%, filtered)")
        fig.suptitle(f"Direction selection: {self.metric.name}")
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


def _fmt(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:8.3f}"


def _cutoff(n_layers: int, fraction: float) -> int:
    """The first discarded layer: int(fraction * n_layers), as in the paper's code (24 of 30 layers)."""
    return int(fraction * n_layers + 1e-9)


# ---- scoring -------------------------------------------------------------------------------------
def _encode_all(lm: HookedLM, prompts: Sequence[str], cfg: SelectionConfig) -> list[EncodedBatch]:
    if not prompts:
        raise DataError("a validation or neutral set is empty; give it at least one prompt.")
    return [
        encode(lm, prompts[s : s + cfg.batch_size], None, cfg.chat)
        for s in range(0, len(prompts), cfg.batch_size)
    ]


@torch.no_grad()
def _logits(lm: HookedLM, batches: list[EncodedBatch], interventions: Sequence[Intervention] = ()) -> Tensor:
    """Next-token logits [n_prompts, vocab] at the last position under `interventions`."""
    with steer(lm, interventions):
        return torch.cat([last_logits(lm, b.input_ids, b.attention_mask) for b in batches])


def _kl(base_logprobs: Tensor, logits: Tensor) -> float:
    """Mean KL(base || other) over prompts."""
    other = logits.log_softmax(-1)
    return float((base_logprobs.exp() * (base_logprobs - other)).sum(-1).mean())


def _filter_reason(c: Candidate, n_layers: int, cfg: SelectionConfig) -> str | None:
    reasons = []
    cutoff = _cutoff(n_layers, cfg.max_layer_fraction)
    if c.layer >= cutoff:
        reasons.append(f"last {round(100 * (1 - cfg.max_layer_fraction))}% of layers (layer >= {cutoff})")
    if c.kl_score is not None and c.kl_score > cfg.kl_threshold:
        reasons.append(f"KL {c.kl_score:.3f} > {cfg.kl_threshold}")
    if c.addition_score is not None and c.addition_score < cfg.min_addition_score:
        reasons.append(
            f"adding it does not induce the behaviour ({c.addition_score:.2f} < {cfg.min_addition_score})"
        )
    return "; ".join(reasons) or None


def _check_positions(lm: HookedLM, cfg: SelectionConfig) -> list[int]:
    n_post = post_instruction_positions(lm.tokenizer, cfg.chat)
    positions = (
        list(cfg.positions) if cfg.positions is not None else (list(range(-n_post, 0)) if n_post else [-1])
    )
    if any(isinstance(p, bool) or not isinstance(p, int) or p >= 0 for p in positions) or not positions:
        raise SelectionError(
            f"positions {positions} must be negative ints (-1 = last prompt token); the post-instruction "
            f"positions of this template are -{n_post}..-1."
        )
    return positions


def _check_layers(lm: HookedLM, cfg: SelectionConfig) -> list[int]:
    layers = list(range(lm.n_layers)) if cfg.layers is None else sorted({int(i) for i in cfg.layers})
    if not layers or any(not 0 <= i < lm.n_layers for i in layers):
        raise SelectionError(f"layers {cfg.layers} must be within 0-{lm.n_layers - 1} (and not empty).")
    return layers


def select_direction(
    lm: HookedLM,
    positive: Sequence[str],
    negative: Sequence[str],
    positive_val: Sequence[str],
    negative_val: Sequence[str],
    metric: BehaviourMetric,
    neutral: Sequence[str] | None = None,
    cfg: SelectionConfig | None = None,
    name: str = "direction",
    set_names: tuple[str, str] = ("positive", "negative"),
) -> SelectionResult:
    """Score every (layer, post-instruction position) candidate and pick one, as Arditi et al. 2024.

    `positive`/`negative` build the directions (difference in means); `positive_val` and
    `negative_val` are held-out prompts for the ablation and addition scores; `neutral` (default:
    `negative_val`) is where the KL of ablation is measured.
    """
    cfg = cfg or SelectionConfig()
    layers, positions = _check_layers(lm, cfg), _check_positions(lm, cfg)
    hooks = [f"blocks.{i}.hook_resid_pre" for i in layers]
    directions = mean_difference(
        lm,
        positive,
        negative,
        hooks=hooks,
        positions=positions,
        chat=cfg.chat,
        name=name,
        set_names=set_names,
        batch_size=cfg.batch_size,
    )
    pos_val, neg_val = _encode_all(lm, list(positive_val), cfg), _encode_all(lm, list(negative_val), cfg)
    neutral_batches = neg_val if neutral is None else _encode_all(lm, list(neutral), cfg)
    base_pos = float(metric(_logits(lm, pos_val)).mean())
    base_neg = float(metric(_logits(lm, neg_val)).mean())
    base_neutral = _logits(lm, neutral_batches).log_softmax(-1)
    generator = torch.Generator().manual_seed(cfg.seed)
    random_kl = [
        _kl(
            base_neutral,
            _logits(lm, neutral_batches, ablation(lm, torch.randn(lm.d_model, generator=generator))),
        )
        for _ in range(cfg.n_random)
    ]

    grid = [(layer, hook, p) for layer, hook in zip(layers, hooks, strict=True) for p in positions]
    if cfg.progress:
        from tqdm import tqdm

        grid = tqdm(grid, desc="scoring candidates")
    candidates = []
    for layer, hook, p in grid:
        r = directions.get(hook, p)
        c = Candidate(layer, p, hook, float(r.norm()))
        if c.norm == 0:
            c.filtered = "zero direction: both sets have the same activations here"
            candidates.append(c)
            continue
        ablate = ablation(lm, r)
        c.ablation_score = float(metric(_logits(lm, pos_val, ablate)).mean())
        c.kl_score = _kl(base_neutral, _logits(lm, neutral_batches, ablate))
        c.addition_score = float(metric(_logits(lm, neg_val, [AddVector(hook, vector=r, alpha=1.0)])).mean())
        c.filtered = _filter_reason(c, lm.n_layers, cfg)
        candidates.append(c)

    def key(c: Candidate):
        return (
            c.filtered is not None,
            c.ablation_score is None,
            c.ablation_score or 0.0,
            c.layer,
            c.position,
        )

    candidates.sort(key=key)
    for rank, c in enumerate(candidates, start=1):
        c.rank = rank
    config = cfg.to_dict() | {
        "layers": layers,
        "positions": positions,
        "neutral": "negative_val" if neutral is None else "given",
    }
    return SelectionResult(candidates, directions, metric, base_pos, base_neg, lm.n_layers, config, random_kl)


# ---- shipped prompt sets -------------------------------------------------------------------------
@dataclass
class PromptSets:
    """Train and validation prompts of both sets, and the behaviour's metric strings."""

    behaviour: str
    positive: list[str]
    negative: list[str]
    positive_val: list[str]
    negative_val: list[str]
    metric_strings: list[str]
    names: tuple[str, str] = ("positive", "negative")
    description: str = ""


def load_prompt_sets(name_or_path: str | Path) -> PromptSets:
    """Sets from a JSON file, or a shipped one by name (selection_<name>.json).

    Format: {"behaviour", "description", "metric_strings": [...], "positive": {"name", "train": [...],
    "val": [...]}, "negative": {same}}.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / f"selection_{name_or_path}.json"
    if not path.is_file():
        shipped = sorted(p.stem[len("selection_") :] for p in PROMPTS_DIR.glob("selection_*.json"))
        raise DataError(
            f"no prompt-set file {name_or_path!r}: pass a JSON file or one of the shipped sets {shipped}."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pos, neg = data["positive"], data["negative"]
        sets = PromptSets(
            behaviour=data["behaviour"],
            positive=list(pos["train"]),
            negative=list(neg["train"]),
            positive_val=list(pos["val"]),
            negative_val=list(neg["val"]),
            metric_strings=list(data["metric_strings"]),
            names=(pos.get("name", "positive"), neg.get("name", "negative")),
            description=data.get("description", ""),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is not a prompt-set file ({exc}); it needs {{'behaviour', 'metric_strings', 'positive': "
            "{'train', 'val'}, 'negative': {'train', 'val'}}."
        ) from exc
    if not all((sets.positive, sets.negative, sets.positive_val, sets.negative_val, sets.metric_strings)):
        raise DataError(f"{path} has an empty set; every train and val list and metric_strings need entries.")
    return sets
