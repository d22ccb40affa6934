"""Prompts as the model sees them: chat formatting, left-padded batches, activations at token positions.

Every feature that runs prompts through the model (generation, probes, directions, CAA, selection)
formats and pads them here, so one prompt gives the same tokens and positions everywhere. Batches
are left-padded and `HookedLM.prepare` derives position ids from the mask, so padding changes no
activation. Answers are tokenized on their own and appended to the prompt's tokens, exactly as the
model would see its own first generated tokens, so the prompt's positions mean the same with or
without one.

Positions are labels (`Position`):
- an int p < 0 counts back from the end of the (chat-formatted) prompt: -1 is its last token;
- an int p >= 0 counts from the first real (unpadded) token;
- "answer" is the last token of an answer appended after the prompt (CAA: the letter of "(A").
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.errors import ActivationError, DataError

Position = int | str


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[str]:
    """The exact text fed to the model: the chat template's user turn, or the prompt as is."""
    if chat and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    return list(prompts)


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt; chat texts carry their own BOS, so none is added to them."""
    return tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))["input_ids"]


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the pad token, else EOS, else BOS, else 0 (masked out either way)."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = True) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths -> input_ids and attention_mask [batch, width], padded left or right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def encode_left_padded(tokenizer, texts: Sequence[str], device) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask [batch, width], padded on the left; chat texts carry their own BOS."""
    rows = [prompt_token_ids(tokenizer, t) for t in texts]
    if not rows or any(len(r) == 0 for r in rows):
        raise DataError("an empty prompt cannot be completed; give every prompt some text.")
    ids, mask = pad_rows(rows, pad_token_id(tokenizer))
    return ids.to(device), mask.to(device)


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
    lm: HookedLM, prompts: Sequence[str], answers: Sequence[str] | None = None, chat: bool = True
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


def iter_prompt_activations(
    lm: HookedLM,
    prompts: Sequence[str],
    hooks: Sequence[str],
    positions: Sequence[Position],
    chat: bool = True,
    batch_size: int = 16,
    answers: Sequence[str] | None = None,
) -> Iterator[Tensor]:
    """Batches of activations [batch, n_hooks, n_positions, d] (float32, CPU), in prompt order.

    Each forward pass stops after the last hook point needed. Interventions active around the
    iteration (`steer(lm, ...)`) act on every pass.
    """
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


def load_prompts(path, key: str | None = None) -> list[str]:
    """Prompts from a file: .txt (one per non-empty line), .json (a list, or `key` of an object) or .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"prompt file {path} does not exist; give a .txt (one prompt per line), .json or .jsonl file."
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                if key is None or key not in data:
                    raise DataError(
                        f"{path} holds an object with keys {sorted(data)}; name the list to use ({path}:KEY)."
                    )
                data = data[key]
            prompts = data
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = [r if isinstance(r, str) else r.get(key or "prompt", r.get("text")) for r in rows]
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON ({err}); fix the file or use one prompt per line in a .txt."
        ) from None
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise DataError(
            f"{path} holds no prompts (or some are not non-empty strings); give at least one prompt."
        )
    return prompts
