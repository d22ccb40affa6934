"""Directions from contrastive sets: difference in means (and PCA) at every layer and chosen positions.

Two sets of prompts that differ in one behaviour (code requests vs prose requests, harmful vs
harmless instructions) are run through the model; the residual stream is read at chosen token
positions of every layer, and the direction is mean(positive) - mean(negative) (unnormalised: its
norm is the size of the shift between the two sets, which is the natural scale for adding it).

Positions are labels:
- an int p < 0 counts back from the end of the (chat-formatted) prompt: -1 is its last token; the
  post-instruction tokens (Arditi et al. 2024), e.g. "<|im_end|>\\n<|im_start|>assistant\\n", are
  -n..-1 with n = `post_instruction_positions(tokenizer)`; "post_instruction" expands to them;
- an int p >= 0 counts from the first real (unpadded) token;
- "answer" is the last token of an answer appended after the prompt (CAA: the letter of "(A").

Answers are tokenized on their own and appended to the prompt's tokens, exactly as the model would
see its own first generated tokens, so the prompt's positions mean the same with or without one.
Batches are left-padded and the model receives position ids from the mask, so padding does not
change any activation. A `DirectionSet` saves to a folder (safetensors + JSON, never pickle) with its
provenance: model, the two sets (names, sizes, hash), method, chat template, date, saelab version.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.core.fileio import atomic_folder
from saelab.errors import (
    ActivationError,
    DataError,
    DimensionMismatchError,
    DirectionFileError,
    DirectionLookupError,
)
from saelab.interventions.generation import encode_left_padded, format_prompts, pad_rows

FORMAT = "saelab.directions"
FORMAT_VERSION = 1
TENSORS_FILE = "directions.safetensors"
META_FILE = "directions.json"
_MARKER = "saelab instruction marker"

Position = int | str


# ---- the stored result ---------------------------------------------------------------------------
@dataclass
class DirectionSet:
    """Directions [n_hooks, n_positions, d_model] (float32) with their hook points, positions and provenance."""

    vectors: Tensor
    hooks: list[str]
    positions: list[Position]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.vectors = torch.as_tensor(self.vectors).detach().float().cpu()
        self.hooks, self.positions = list(self.hooks), list(self.positions)
        want = (len(self.hooks), len(self.positions))
        if self.vectors.ndim != 3 or tuple(self.vectors.shape[:2]) != want:
            raise DimensionMismatchError(
                f"vectors have shape {tuple(self.vectors.shape)} but {want[0]} hooks and {want[1]} positions "
                f"need [{want[0]}, {want[1]}, d_model]."
            )

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    def get(self, hook: str | int, position: Position = -1) -> Tensor:
        """The direction at `hook` (a name, or a layer number when one hook of that layer is stored)."""
        return self.vectors[self._hook_index(hook), self._position_index(position)].clone()

    def _hook_index(self, hook: str | int) -> int:
        if isinstance(hook, int):
            matches = [i for i, h in enumerate(self.hooks) if h.startswith(f"blocks.{hook}.")]
            if len(matches) == 1:
                return matches[0]
            raise DirectionLookupError(
                f"layer {hook} matches {len(matches)} stored hooks; name the hook: one of {self.hooks}."
            )
        if hook not in self.hooks:
            raise DirectionLookupError(
                f"no direction at {hook!r}; this set has hooks {self.hooks}. Pick one of them."
            )
        return self.hooks.index(hook)

    def _position_index(self, position: Position) -> int:
        if position not in self.positions:
            raise DirectionLookupError(
                f"no direction at position {position!r}; this set has positions {self.positions}. Pick one of them."
            )
        return self.positions.index(position)

    def save(self, path: str | Path) -> Path:
        """Write the folder `path` (directions.safetensors + directions.json) atomically, replacing it whole."""
        path = Path(path)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "hooks": self.hooks,
            "positions": self.positions,
            "shape": list(self.vectors.shape),
            "provenance": self.provenance,
        }
        with atomic_folder(path) as tmp:
            save_file(
                {"vectors": self.vectors.contiguous()}, str(tmp / TENSORS_FILE), metadata={"format": FORMAT}
            )
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> DirectionSet:
        """Read a folder written by `save`; a missing, corrupt or foreign file is a DirectionFileError."""
        folder = _folder_of(Path(path))
        meta = _read_meta(folder / META_FILE)
        try:
            tensors = load_file(str(folder / TENSORS_FILE))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DirectionFileError(
                f"{folder / TENSORS_FILE} is corrupt or truncated ({exc}). Recompute the directions and save "
                "them again."
            ) from exc
        if "vectors" not in tensors:
            raise DirectionFileError(
                f"{folder / TENSORS_FILE} has no 'vectors' tensor (it holds {sorted(tensors)}); it was not "
                "written by DirectionSet.save. Recompute and save the directions."
            )
        vectors = tensors["vectors"]
        if list(vectors.shape) != list(meta.get("shape", [])):
            raise DirectionFileError(
                f"{folder} is inconsistent: directions.json says shape {meta.get('shape')} but the tensors "
                f"have {list(vectors.shape)}. The two files come from different saves; save the set again."
            )
        return cls(vectors, meta["hooks"], meta["positions"], meta.get("provenance", {}))


def _folder_of(path: Path) -> Path:
    if path.is_file() and path.name in (TENSORS_FILE, META_FILE):
        path = path.parent
    if path.is_file():
        raise DirectionFileError(
            f"{path} is a file; a direction set is a folder with {TENSORS_FILE} and {META_FILE} (pickled "
            ".pt files are never loaded). Pass the folder that DirectionSet.save wrote."
        )
    if not path.is_dir():
        raise DirectionFileError(f"no direction set at {path}: the folder does not exist. Check the path.")
    missing = [name for name in (META_FILE, TENSORS_FILE) if not (path / name).is_file()]
    if missing:
        raise DirectionFileError(
            f"{path} is not a direction set: {', '.join(missing)} missing. Pass a folder written by "
            "DirectionSet.save."
        )
    return path


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DirectionFileError(
            f"{path} is not valid JSON ({exc}); the save was damaged. Save the set again."
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DirectionFileError(
            f"{path} is not a saelab direction set (its 'format' is "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}). Pass a folder "
            "written by DirectionSet.save."
        )
    if meta.get("version", 0) > FORMAT_VERSION:
        raise DirectionFileError(
            f"{path} was written by a newer saelab (format version {meta['version']}); upgrade saelab to read it."
        )
    for key in ("hooks", "positions", "shape"):
        if key not in meta:
            raise DirectionFileError(
                f"{path} lacks the key {key!r}; the file is damaged. Save the set again."
            )
    return meta


# ---- token positions -----------------------------------------------------------------------------
def _encode_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt, with the same BOS rule as `encode_left_padded`."""
    return tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))["input_ids"]


def post_instruction_positions(tokenizer, chat: bool = True) -> int:
    """How many template tokens follow the user's instruction (0 without a chat template).

    Formats a marker instruction and counts the tokens after the longest token prefix it shares with
    the text cut just after the marker, so the count is exact whatever the template looks like.
    """
    if not chat or not getattr(tokenizer, "chat_template", None):
        return 0
    text = format_prompts(tokenizer, [_MARKER], chat=True)[0]
    cut = text.rindex(_MARKER) + len(_MARKER)
    full, prefix = _encode_ids(tokenizer, text), _encode_ids(tokenizer, text[:cut])
    common = 0
    while common < min(len(full), len(prefix)) and full[common] == prefix[common]:
        common += 1
    return len(full) - common


def resolve_positions(tokenizer, positions: Sequence[Position], chat: bool = True) -> list[Position]:
    """Expand "post_instruction" into -n..-1 and check every label; returns the stored labels."""
    out: list[Position] = []
    for p in positions:
        if p == "post_instruction":
            n = post_instruction_positions(tokenizer, chat)
            out += list(range(-n, 0)) if n else [-1]
        elif isinstance(p, bool) or not isinstance(p, (int, str)) or (isinstance(p, str) and p != "answer"):
            raise DataError(
                f"unknown position {p!r}: use an int (-1 = last prompt token, 0 = first token), "
                "'post_instruction' (the chat template's tokens after the instruction) or 'answer'."
            )
        else:
            out.append(p)
    if not out:
        raise DataError("no token positions given; pass at least one, e.g. positions=(-1,).")
    if len(set(out)) != len(out):
        raise DataError(f"positions {out} repeat a label; give each position once.")
    return out


# ---- activations ---------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    """A left-padded batch with, per row, where the prompt ends and where the text ends."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_end: Tensor  # index (in the padded row) one past the prompt's last token
    lengths: Tensor  # real tokens per row (prompt + answer)

    def index(self, position: Position) -> Tensor:
        """Column of `position` in each row; positions outside a row are an error, not a wrap-around."""
        width = self.input_ids.shape[1]
        start = width - self.lengths
        if position == "answer":
            if bool((self.prompt_end >= width).any()):
                raise DataError("position 'answer' needs an answer appended to every prompt; pass answers.")
            return torch.full_like(self.lengths, width - 1)
        idx = self.prompt_end + position if position < 0 else start + position
        if bool(((idx < start) | (idx >= self.prompt_end)).any()):
            raise DataError(
                f"position {position!r} is outside some prompts (the shortest has "
                f"{int((self.prompt_end - start).min())} tokens); choose positions every prompt has."
            )
        return idx


def encode(
    lm, prompts: Sequence[str], answers: Sequence[str] | None = None, chat: bool = True
) -> EncodedBatch:
    """Format prompts (chat template), append each answer's own tokens, left-pad into one batch."""
    texts = format_prompts(lm.tokenizer, prompts, chat)
    ids, mask = encode_left_padded(lm.tokenizer, texts, "cpu")
    width = ids.shape[1]
    if answers is None:
        lengths = mask.sum(1)
        return EncodedBatch(ids.to(lm.device), mask.to(lm.device), torch.full_like(lengths, width), lengths)
    if len(answers) != len(prompts):
        raise DataError(f"{len(prompts)} prompts but {len(answers)} answers; give one answer per prompt.")
    rows, ends = [], []
    for row, keep, answer in zip(ids, mask.bool(), answers, strict=True):
        extra = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not extra:
            raise DataError(f"the answer {answer!r} has no tokens; give every prompt a non-empty answer.")
        rows.append(row[keep].tolist() + list(extra))
        ends.append(int(keep.sum()))
    pad = int(ids[mask == 0][0]) if bool((mask == 0).any()) else int(lm.tokenizer.pad_token_id or 0)
    out, new_mask = pad_rows(rows, pad)
    width = out.shape[1]
    lengths = new_mask.sum(1)
    prompt_end = width - lengths + torch.tensor(ends)
    return EncodedBatch(out.to(lm.device), new_mask.to(lm.device), prompt_end, lengths)


def _default_hooks(lm) -> list[str]:
    return [f"blocks.{i}.hook_resid_pre" for i in range(lm.n_layers)]


def iter_activations(
    lm,
    prompts: Sequence[str],
    hooks: Sequence[str],
    positions: Sequence[Position],
    chat: bool = True,
    batch_size: int = 16,
    answers: Sequence[str] | None = None,
) -> Iterator[Tensor]:
    """Batches of activations [batch, n_hooks, n_positions, d] (float32, CPU), in prompt order."""
    if not prompts:
        raise DataError("an empty prompt set has no activations; give at least one prompt.")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, len(prompts), batch_size):
        chunk_answers = None if answers is None else answers[start : start + batch_size]
        batch = encode(lm, prompts[start : start + batch_size], chunk_answers, chat)
        acts = lm.capture(batch.input_ids, hooks, attention_mask=batch.attention_mask, stop_early=True)
        cols = [batch.index(p).to(lm.device) for p in positions]
        rows = torch.arange(batch.input_ids.shape[0], device=lm.device)
        per_hook = [torch.stack([acts[h][rows, c] for c in cols], dim=1) for h in hooks]
        out = torch.stack(per_hook, dim=1).float().cpu()
        if not torch.isfinite(out).all():
            raise ActivationError(
                "the model produced NaN or inf activations; load it in float32 (load_model(..., "
                "dtype=torch.float32)) or check its weights."
            )
        yield out


def collect_activations(
    lm,
    prompts: Sequence[str],
    hooks: Sequence[str] | None = None,
    positions: Sequence[Position] = (-1,),
    chat: bool = True,
    batch_size: int = 16,
    answers: Sequence[str] | None = None,
) -> Tensor:
    """Activations [n_prompts, n_hooks, n_positions, d] at `hooks` (None = every resid_pre) and positions."""
    hooks = list(hooks) if hooks is not None else _default_hooks(lm)
    positions = resolve_positions(lm.tokenizer, positions, chat)
    return torch.cat(list(iter_activations(lm, list(prompts), hooks, positions, chat, batch_size, answers)))


# ---- directions ----------------------------------------------------------------------------------
def _split_pairs(
    items: Sequence, answers: Sequence[str] | None, what: str
) -> tuple[list[str], list[str] | None]:
    """Plain prompts, or (prompt, answer) pairs, into prompts and answers."""
    items = list(items)
    if not items:
        raise DataError(f"the {what} set is empty; give it at least one prompt.")
    pairs = [isinstance(x, (tuple, list)) for x in items]
    if any(pairs):
        if not all(pairs) or any(len(x) != 2 for x in items) or answers is not None:
            raise DataError(
                f"the {what} set mixes prompts and (prompt, answer) pairs (or also got answers=); use one form."
            )
        return [str(p) for p, _ in items], [str(a) for _, a in items]
    return [str(x) for x in items], None if answers is None else list(answers)


def _fingerprint(positive, pos_answers, negative, neg_answers) -> str:
    blob = json.dumps([positive, pos_answers, negative, neg_answers], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _provenance(
    lm, method, set_names, positive, pos_answers, negative, neg_answers, chat, n_post, **extra
) -> dict:
    from saelab import __version__

    template = getattr(lm.tokenizer, "chat_template", None) if chat else None
    return {
        "model": lm.name,
        "hf_id": lm.hf_id,
        "method": method,
        "sets": {
            "positive": {
                "name": set_names[0],
                "size": len(positive),
                "with_answers": pos_answers is not None,
            },
            "negative": {
                "name": set_names[1],
                "size": len(negative),
                "with_answers": neg_answers is not None,
            },
            "sha256": _fingerprint(positive, pos_answers, negative, neg_answers),
        },
        "chat": bool(template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "example_text": format_prompts(lm.tokenizer, positive[:1], chat)[0]
        + (pos_answers[0] if pos_answers else ""),
        "post_instruction_tokens": n_post,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "saelab_version": __version__,
        **extra,
    }


def _prepare(lm, positive, negative, hooks, positions, chat, answers):
    pos_answers, neg_answers = (None, None) if answers is None else answers
    positive, pos_answers = _split_pairs(positive, pos_answers, "positive")
    negative, neg_answers = _split_pairs(negative, neg_answers, "negative")
    if (pos_answers is None) != (neg_answers is None):
        raise DataError("only one of the two sets has answers; give answers to both sets or to neither.")
    hooks = list(hooks) if hooks is not None else _default_hooks(lm)
    for h in hooks:
        lm.layer_of(h)  # unknown hook names fail here with the valid ones listed
    if positions is None:
        positions = ("answer",) if pos_answers is not None else (-1,)
    positions = resolve_positions(lm.tokenizer, positions, chat)
    return positive, pos_answers, negative, neg_answers, hooks, positions


@torch.no_grad()
def mean_difference(
    lm,
    positive: Sequence,
    negative: Sequence,
    hooks: Sequence[str] | None = None,
    positions: Sequence[Position] | None = None,
    chat: bool = True,
    name: str = "direction",
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    set_names: tuple[str, str] = ("positive", "negative"),
    batch_size: int = 16,
) -> DirectionSet:
    """mean(positive) - mean(negative) of the residual stream at every hook and position (unnormalised).

    `positive`/`negative` are prompts, or (prompt, answer) pairs (or prompts with `answers=(for the
    positive, for the negative)`); with answers the default position is "answer" (CAA), without it
    -1 (the last prompt token). `hooks=None` reads blocks.{i}.hook_resid_pre of every layer.
    """
    positive, pos_answers, negative, neg_answers, hooks, positions = _prepare(
        lm, positive, negative, hooks, positions, chat, answers
    )
    means = []
    for prompts, ans in ((positive, pos_answers), (negative, neg_answers)):
        total = None
        for acts in iter_activations(lm, prompts, hooks, positions, chat, batch_size, ans):
            part = acts.double().sum(0)
            total = part if total is None else total + part
        means.append(total / len(prompts))
    vectors = (means[0] - means[1]).float()
    n_post = post_instruction_positions(lm.tokenizer, chat)
    prov = _provenance(
        lm,
        "mean_difference",
        set_names,
        positive,
        pos_answers,
        negative,
        neg_answers,
        chat,
        n_post,
        name=name,
    )
    return DirectionSet(vectors, hooks, positions, prov)


def pca_directions(activations_pos: Tensor, activations_neg: Tensor) -> Tensor:
    """Unit first principal component of paired differences pos[i] - neg[i], per trailing index.

    Inputs [n, ..., d] (the same n: item i of one set is paired with item i of the other); returns
    [..., d]. The PCA is uncentered (an SVD of the differences), which equals RepE's PCA over pairs
    in random order: a centered PCA would throw away the mean shift, which is the signal. Sign
    convention: the positive set projects higher on average, i.e. mean(pos - neg) . v > 0; where that
    mean projection is exactly 0, the coordinate of largest magnitude (the first such) is positive.
    Computed in float64 on the CPU, so the same inputs always give the same direction.
    """
    pos, neg = torch.as_tensor(activations_pos), torch.as_tensor(activations_neg)
    if pos.shape != neg.shape or pos.ndim < 2:
        raise DimensionMismatchError(
            f"paired PCA needs two tensors of the same shape [n, ..., d], got {tuple(pos.shape)} and "
            f"{tuple(neg.shape)}; pair every positive item with one negative item."
        )
    diffs = (pos.double().cpu() - neg.double().cpu()).movedim(0, -2)  # [..., n, d]
    if not torch.isfinite(diffs).all():
        raise ActivationError("the activations contain NaN or inf; recompute them from a float32 model.")
    if bool((diffs.abs().amax(dim=(-2, -1)) == 0).any()):
        raise ActivationError(
            "the positive and negative activations are identical at some hook/position, so the difference "
            "has no direction; use prompt sets that differ, or a later layer/position."
        )
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    v = vh[..., 0, :]
    mean_proj = (diffs.mean(-2) * v).sum(-1)
    largest = v.gather(-1, v.abs().argmax(-1, keepdim=True)).squeeze(-1)
    sign = torch.where(mean_proj != 0, mean_proj.sign(), largest.sign())
    return (v * sign[..., None]).float()


@torch.no_grad()
def pca_direction(
    lm,
    positive: Sequence,
    negative: Sequence,
    hooks: Sequence[str] | None = None,
    positions: Sequence[Position] | None = None,
    chat: bool = True,
    name: str = "direction",
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    set_names: tuple[str, str] = ("positive", "negative"),
    batch_size: int = 16,
) -> DirectionSet:
    """Unit first principal components of paired differences (see `pca_directions`), as a DirectionSet.

    Item i of `positive` is paired with item i of `negative` (e.g. the same question with the
    matching and the non-matching answer), so both sets must have the same size.
    """
    positive, pos_answers, negative, neg_answers, hooks, positions = _prepare(
        lm, positive, negative, hooks, positions, chat, answers
    )
    if len(positive) != len(negative):
        raise DataError(
            f"PCA pairs item i of each set, but the sets have {len(positive)} and {len(negative)} items; "
            "give both the same number, or use mean_difference."
        )
    acts_pos = torch.cat(
        list(iter_activations(lm, positive, hooks, positions, chat, batch_size, pos_answers))
    )
    acts_neg = torch.cat(
        list(iter_activations(lm, negative, hooks, positions, chat, batch_size, neg_answers))
    )
    n_post = post_instruction_positions(lm.tokenizer, chat)
    prov = _provenance(
        lm,
        "pca",
        set_names,
        positive,
        pos_answers,
        negative,
        neg_answers,
        chat,
        n_post,
        name=name,
        unit_norm=True,
    )
    return DirectionSet(pca_directions(acts_pos, acts_neg), hooks, positions, prov)


# ---- logits at the last position -----------------------------------------------------------------
@torch.no_grad()
def last_logits(lm, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token logits [batch, vocab] (float32) at the last position of a left-padded batch.

    Only the last position goes through the unembedding (`logits_to_keep=1`), which on a 135M model
    is a third of the compute; models whose forward lacks that argument get the full logits sliced.
    """
    kwargs = lm._prepare(input_ids, attention_mask)  # position_ids from the mask, as every forward
    if "logits_to_keep" in inspect.signature(lm.model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = lm.model(**kwargs).logits[:, -1].float()
    if not torch.isfinite(out).all():
        raise ActivationError(
            "the model produced NaN or inf logits; load it in float32 or lower the multiplier."
        )
    return out


def log_odds(logits: Tensor, token_ids: Sequence[int]) -> Tensor:
    """log(p / (1 - p)) with p the total probability of `token_ids`, computed stably from logits [.., vocab]."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=logits.device)
    inside = logits.index_select(-1, ids).logsumexp(-1)
    rest = logits.index_fill(-1, ids, -math.inf).logsumexp(-1)
    return inside - rest
