"""Contrastive Activation Addition (Rimsky et al. 2024) with A/B multiple-choice evaluation.

An item is a question with two answers, one of which shows the behaviour. The steering vector at a
layer is the mean difference of the residual stream at the answer letter between the question
followed by the matching answer ("... (A") and by the other one ("... (B"); the matching letter is A
for some items and B for others, so the letter itself cancels and the behaviour remains.

Evaluation on HELD-OUT items: the prompt ends with the answer prefix "(" and the score is the
normalized probability of the matching letter, p(match) / (p(A) + p(B)), under
multiplier * vector added at one layer's resid_pre. As in the paper the vector is added at every
position after the instruction (the chat template's post-instruction tokens and the answer prefix),
not to the question itself; `steer_positions="all"` adds it everywhere. Multiplier 0 is exactly the
unsteered model. If the vector carries the behaviour, the probability rises with the multiplier.

Item files are JSON: {"behaviour", "description", "items": [{"question", "a", "b", "matching": "A"|"B",
"split": "train"|"test"}]}; `load_items("optimism")` reads the one shipped in
saelab/interventions/prompts/caa_optimism.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from saelab.core.fileio import save_figure
from saelab.core.models import HookedLM
from saelab.core.prompts import encode
from saelab.errors import CAAError, DataError
from saelab.interventions.directions import (
    DirectionSet,
    last_logits,
    mean_difference,
    post_instruction_positions,
)
from saelab.interventions.hooks import AddVector, steer

PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass
class ABItem:
    """A question with two answers; `matching` ("A" or "B") is the one that shows the behaviour."""

    question: str
    a: str
    b: str
    matching: str
    split: str = "train"

    def __post_init__(self) -> None:
        if self.matching not in ("A", "B"):
            raise CAAError(
                f"item {self.question[:40]!r}: matching must be 'A' or 'B', got {self.matching!r}."
            )


@dataclass
class CAAConfig:
    """How items are shown to the model and where the vector is added."""

    layers: list[int] | None = None  # None = every layer
    multipliers: tuple[float, ...] = (-1.0, 0.0, 1.0)
    letters: tuple[str, str] = ("A", "B")  # the labels shown for choice A and choice B
    answer_prefix: str = "("  # the assistant turn starts with it; the next token is the letter
    choice_format: str = "({letter}) {text}"
    chat: bool = True
    steer_positions: str = "after_instruction"  # or "all"
    hook_template: str = "blocks.{layer}.hook_resid_pre"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.steer_positions not in ("after_instruction", "all"):
            raise CAAError(
                f"steer_positions must be 'after_instruction' or 'all', got {self.steer_positions!r}."
            )
        if len(self.letters) != 2 or self.letters[0] == self.letters[1]:
            raise CAAError(f"letters must be two different labels, got {self.letters!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def load_items(name_or_path: str | Path) -> tuple[str, list[ABItem]]:
    """(behaviour, items) from a JSON file, or from a shipped set by name (caa_<name>.json)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / f"caa_{name_or_path}.json"
    if not path.is_file():
        shipped = sorted(p.stem[4:] for p in PROMPTS_DIR.glob("caa_*.json"))
        raise DataError(
            f"no A/B item file {name_or_path!r}: pass a JSON file or one of the shipped sets {shipped}."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items = [ABItem(**item) for item in data["items"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{path} is not an A/B item file ({exc}); it needs {{'behaviour', 'items': [{{'question', 'a', 'b', "
            "'matching', 'split'}]}."
        ) from exc
    return data.get("behaviour", path.stem), items


def split_items(items: Sequence[ABItem]) -> tuple[list[ABItem], list[ABItem]]:
    """(train, test) by each item's `split`; both must be non-empty."""
    train = [it for it in items if it.split == "train"]
    test = [it for it in items if it.split == "test"]
    if not train or not test:
        raise DataError(
            f"need train and test items, got {len(train)} and {len(test)}; set each item's split."
        )
    return train, test


def format_item(item: ABItem, cfg: CAAConfig) -> str:
    """The user turn: the question, then the two labelled choices."""
    choices = [
        cfg.choice_format.format(letter=cfg.letters[i], text=t) for i, t in enumerate((item.a, item.b))
    ]
    return f"{item.question}\n\nChoices:\n" + "\n".join(choices)


def letter_token_ids(tokenizer, cfg: CAAConfig) -> tuple[int, int]:
    """Token ids of the two letters as the model writes them right after the answer prefix."""
    prefix = tokenizer(cfg.answer_prefix, add_special_tokens=False)["input_ids"] if cfg.answer_prefix else []
    ids = []
    for letter in cfg.letters:
        full = tokenizer(cfg.answer_prefix + letter, add_special_tokens=False)["input_ids"]
        if len(full) != len(prefix) + 1 or full[: len(prefix)] != prefix:
            raise CAAError(
                f"{cfg.answer_prefix + letter!r} does not tokenize as the prefix {cfg.answer_prefix!r} plus one "
                f"token for {letter!r}; choose letters and an answer_prefix this tokenizer keeps apart."
            )
        ids.append(full[-1])
    if ids[0] == ids[1]:
        raise CAAError(f"the letters {cfg.letters} map to the same token; choose distinct letters.")
    return ids[0], ids[1]


def _other(letter: str) -> str:
    return "B" if letter == "A" else "A"


def _shown(letter: str, cfg: CAAConfig) -> str:
    return cfg.letters[0] if letter == "A" else cfg.letters[1]


def _layers(lm: HookedLM, cfg: CAAConfig) -> list[int]:
    layers = list(range(lm.n_layers)) if cfg.layers is None else [int(i) for i in cfg.layers]
    bad = [i for i in layers if not 0 <= i < lm.n_layers]
    if bad or not layers:
        raise CAAError(f"layers {bad or layers} are not in 0-{lm.n_layers - 1}; choose layers of this model.")
    return layers


def caa_vectors(
    lm: HookedLM, items: Sequence[ABItem], cfg: CAAConfig | None = None, behaviour: str = "behaviour"
) -> DirectionSet:
    """Mean difference at the answer letter (matching - non-matching), at each chosen layer."""
    cfg = cfg or CAAConfig()
    if not items:
        raise DataError("no training items; CAA needs at least one A/B item to build a vector.")
    letter_token_ids(lm.tokenizer, cfg)
    prompts = [format_item(it, cfg) for it in items]
    matching = [cfg.answer_prefix + _shown(it.matching, cfg) for it in items]
    other = [cfg.answer_prefix + _shown(_other(it.matching), cfg) for it in items]
    hooks = [cfg.hook_template.format(layer=i) for i in _layers(lm, cfg)]
    return mean_difference(
        lm,
        prompts,
        prompts,
        hooks=hooks,
        positions=("answer",),
        chat=cfg.chat,
        name=f"caa_{behaviour}",
        answers=(matching, other),
        set_names=(f"{behaviour}: matching answer", f"{behaviour}: other answer"),
        batch_size=cfg.batch_size,
    )


@dataclass
class _AddAfter(AddVector):
    """AddVector on the last `last` positions only (the post-instruction tokens of a left-padded batch)."""

    last: int = 1

    def edit(self, x: Tensor) -> Tensor | None:
        if self.alpha == 0:
            return None
        out = x.clone()
        out[..., -self.last :, :] += (self.alpha * self.vector.to(x.device, torch.float32)).to(x.dtype)
        return out


@dataclass
class CAAResult:
    """Normalized probability of the matching letter per layer, multiplier and held-out item."""

    behaviour: str
    layers: list[int]
    multipliers: list[float]
    p_match: Tensor  # [n_layers, n_multipliers, n_items]
    vector_norms: list[float]
    n_train: int
    config: dict = field(default_factory=dict)

    @property
    def means(self) -> Tensor:
        """[n_layers, n_multipliers] mean normalized probability of the matching letter."""
        return self.p_match.mean(-1)

    def rises(self, layer: int) -> bool:
        """True when the mean probability strictly increases with the multiplier at `layer`."""
        row = self.means[self.layers.index(layer)]
        order = sorted(range(len(self.multipliers)), key=lambda j: self.multipliers[j])
        return all(row[a] < row[b] for a, b in zip(order, order[1:], strict=False))

    def best_layer(self) -> int:
        """The layer with the largest rise from the lowest to the highest multiplier."""
        lo, hi = self.multipliers.index(min(self.multipliers)), self.multipliers.index(max(self.multipliers))
        spread = self.means[:, hi] - self.means[:, lo]
        return self.layers[int(spread.argmax())]

    def to_dict(self) -> dict:
        means = self.means
        return {
            "behaviour": self.behaviour,
            "metric": "p(matching letter) / (p(A) + p(B)) on held-out items",
            "n_train": self.n_train,
            "n_test": int(self.p_match.shape[-1]),
            "multipliers": self.multipliers,
            "best_layer": self.best_layer(),
            "layers": [
                {
                    "layer": layer,
                    "vector_norm": self.vector_norms[i],
                    "mean_p_match": {
                        str(m): round(float(means[i, j]), 6) for j, m in enumerate(self.multipliers)
                    },
                    "rises": self.rises(layer),
                }
                for i, layer in enumerate(self.layers)
            ],
            "config": self.config,
        }

    def table(self) -> str:
        """A plain-text table: one row per layer, one column per multiplier."""
        head = "layer  norm    " + "  ".join(f"m={m:+g}".rjust(8) for m in self.multipliers) + "  rises"
        rows = [head]
        for i, layer in enumerate(self.layers):
            cells = "  ".join(f"{float(v):8.3f}" for v in self.means[i])
            rows.append(
                f"{layer:5d}  {self.vector_norms[i]:6.2f}  {cells}  {'yes' if self.rises(layer) else 'no'}"
            )
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """PNG: normalized probability of the matching letter against the multiplier, one line per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        cmap = plt.get_cmap("viridis")
        for i, layer in enumerate(self.layers):
            color = cmap(i / max(1, len(self.layers) - 1))
            ax.plot(self.multipliers, self.means[i].tolist(), marker="o", color=color, label=f"layer {layer}")
        ax.set(
            xlabel="multiplier",
            ylabel="p(matching) / (p(A) + p(B))",
            title=f"CAA: {self.behaviour} (held-out)",
        )
        if len(self.layers) <= 12:
            ax.legend(fontsize=7)
        # Right: the change from the unsteered model per layer (the effect, on its own scale).
        ref = self.multipliers.index(0.0) if 0.0 in self.multipliers else None
        for j, m in enumerate(self.multipliers):
            if j == ref:
                continue
            delta = self.means[:, j] - (self.means[:, ref] if ref is not None else 0)
            ax2.plot(self.layers, delta.tolist(), marker=".", label=f"multiplier {m:+g}")
        ax2.axhline(0.0, color="grey", lw=0.8, ls=":")
        ylabel = "change from multiplier 0" if ref is not None else "mean normalized probability"
        ax2.set(xlabel="layer", ylabel=ylabel, title="effect by layer")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


@torch.no_grad()
def _p_match(lm: HookedLM, prompts, matching, letter_ids, cfg, interventions) -> Tensor:
    """Normalized probability of each item's matching letter under `interventions`."""
    out = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        answers = [cfg.answer_prefix] * len(chunk) if cfg.answer_prefix else None
        batch = encode(lm, chunk, answers, cfg.chat)
        with steer(lm, interventions):
            probs = last_logits(lm, batch.input_ids, batch.attention_mask).softmax(-1)
        pa, pb = probs[:, letter_ids[0]], probs[:, letter_ids[1]]
        is_a = torch.tensor(matching[start : start + cfg.batch_size], device=probs.device)
        out.append((torch.where(is_a, pa, pb) / (pa + pb)).cpu())
    return torch.cat(out)


def _steered_tail(lm: HookedLM, cfg: CAAConfig) -> int:
    """How many final positions count as 'after the instruction': template tokens plus answer prefix."""
    prefix = (
        len(lm.tokenizer(cfg.answer_prefix, add_special_tokens=False)["input_ids"])
        if cfg.answer_prefix
        else 0
    )
    return max(1, post_instruction_positions(lm.tokenizer, cfg.chat) + prefix)


def evaluate_ab(
    lm: HookedLM,
    items: Sequence[ABItem],
    vectors: DirectionSet,
    cfg: CAAConfig | None = None,
    behaviour: str = "behaviour",
) -> CAAResult:
    """p(match)/(p(A)+p(B)) on `items` for every layer of `vectors` and every multiplier in `cfg`."""
    cfg = cfg or CAAConfig()
    if not items:
        raise DataError("no held-out items to evaluate; give at least one A/B item.")
    letter_ids = letter_token_ids(lm.tokenizer, cfg)
    prompts = [format_item(it, cfg) for it in items]
    matching = [it.matching == "A" for it in items]
    layers = [lm.layer_of(h) for h in vectors.hooks]
    tail = _steered_tail(lm, cfg)
    position = vectors.positions[0]
    unsteered = _p_match(lm, prompts, matching, letter_ids, cfg, [])
    grid = torch.empty(len(layers), len(cfg.multipliers), len(items))
    for i, hook in enumerate(vectors.hooks):
        vec = vectors.get(hook, position)
        for j, m in enumerate(cfg.multipliers):
            if m == 0:
                grid[i, j] = unsteered
                continue
            if cfg.steer_positions == "all":
                add = AddVector(hook, vector=vec, alpha=float(m))
            else:
                add = _AddAfter(hook, vector=vec, alpha=float(m), last=tail)
            grid[i, j] = _p_match(lm, prompts, matching, letter_ids, cfg, [add])
    norms = [float(vectors.get(h, position).norm()) for h in vectors.hooks]
    n_train = int(vectors.provenance.get("sets", {}).get("positive", {}).get("size", 0))
    return CAAResult(
        behaviour, layers, [float(m) for m in cfg.multipliers], grid, norms, n_train, cfg.to_dict()
    )


def run_caa(
    lm: HookedLM, items: Sequence[ABItem], cfg: CAAConfig | None = None, behaviour: str = "behaviour"
) -> tuple[DirectionSet, CAAResult]:
    """Vectors from the train items, evaluated on the held-out test items (each item's `split`)."""
    cfg = cfg or CAAConfig()
    train, test = split_items(items)
    vectors = caa_vectors(lm, train, cfg, behaviour)
    return vectors, evaluate_ab(lm, test, vectors, cfg, behaviour)
