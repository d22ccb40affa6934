"""Generation with and without interventions, side by side, with the same seed; and fluency.

Prompts are left-padded into one batch (the chat template applied when the tokenizer has one and
`chat=True`), so the prompt occupies positions [0, prompt_len) of every row and an intervention's
scope ("prompt" / "generated") means the same thing in every row. Sampling uses a fixed seed in a
forked RNG: steered and unsteered runs draw the same random numbers, and the caller's RNG is untouched.

Decoding is saelab's own loop (`generate_tokens`, in `saelab.core.decoding` because the explain room's
local LM client uses it too), not `model.generate`: one prefill, then one token per forward pass on the
model's KV cache, with explicit attention_mask and position_ids. Sampling is exactly temperature, then
top_k (50 by default, as transformers' default), then top_p.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from saelab.core.decoding import decode_new as _decode
from saelab.core.decoding import generate_tokens
from saelab.core.decoding import next_tokens as _next_tokens  # noqa: F401 (re-exported: tests use it)
from saelab.core.decoding import stop_ids as _stop_ids
from saelab.core.models import HookedLM
from saelab.core.prompts import encode_left_padded, format_prompts, pad_rows, pad_token_id, prompt_token_ids
from saelab.errors import DataError
from saelab.interventions.hooks import Intervention, steer


@dataclass
class GenerationConfig:
    """Sampling settings shared by steered and unsteered runs."""

    max_new_tokens: int = 40
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 50  # 0 = no top-k cut (transformers' default is 50, which saelab keeps)
    seed: int = 0
    chat: bool = True  # wrap each prompt in the tokenizer's chat template as a user turn
    batch_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise a clear error for settings that cannot be sampled with."""
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0):
            raise DataError(f"max_new_tokens is {self.max_new_tokens!r}; use a whole number >= 0.")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise DataError(f"temperature is {self.temperature}; use 0 (greedy) or a positive number.")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise DataError(f"top_p is {self.top_p}; use a value in (0, 1] (1 keeps every token).")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise DataError(f"top_k is {self.top_k!r}; use a whole number >= 0 (0 keeps every token).")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise DataError(f"batch_size is {self.batch_size!r}; use a whole number >= 1.")


@torch.no_grad()
def generate(
    lm: HookedLM,
    prompts: Sequence[str],
    interventions: Iterable[Intervention] = (),
    cfg: GenerationConfig | None = None,
) -> list[str]:
    """Completions of `prompts` (new text only, up to EOS) under `interventions`, sampled with `cfg.seed`."""
    cfg = cfg or GenerationConfig()
    cfg.check()
    interventions = list(interventions)
    texts = format_prompts(lm.tokenizer, prompts, cfg.chat)
    out: list[str] = []
    for start in range(0, len(texts), cfg.batch_size):
        ids, mask = encode_left_padded(lm.tokenizer, texts[start : start + cfg.batch_size], lm.device)
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + start)
            with steer(lm, interventions, prompt_len=ids.shape[1]):
                new = generate_tokens(
                    lm, ids, mask, cfg.max_new_tokens, cfg.temperature, cfg.top_p, top_k=cfg.top_k
                )
        out += _decode(lm.tokenizer, new, _stop_ids(lm))
    return out


def compare(
    lm: HookedLM,
    prompts: Sequence[str],
    interventions: Iterable[Intervention],
    cfg: GenerationConfig | None = None,
) -> list[dict]:
    """[{prompt, unsteered, steered}] with the same seed, for side-by-side reading."""
    interventions = list(interventions)
    plain = generate(lm, prompts, (), cfg)
    steered = generate(lm, prompts, interventions, cfg)
    return [
        {"prompt": p, "unsteered": a, "steered": b} for p, a, b in zip(prompts, plain, steered, strict=True)
    ]


@torch.no_grad()
def completion_loss(
    lm: HookedLM, prompts: Sequence[str], completions: Sequence[str], chat: bool = True, batch_size: int = 16
) -> float:
    """Mean per-token cross-entropy of `completions` after their prompts under the UNSTEERED model.

    A fluency check for steered text: gibberish gets a high loss, fluent on-topic text a low one.
    """
    texts = format_prompts(lm.tokenizer, prompts, chat)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows, starts = [], []
        for prompt, completion in zip(
            texts[start : start + batch_size], completions[start : start + batch_size], strict=True
        ):
            p = prompt_token_ids(lm.tokenizer, prompt)
            c = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
            rows.append(p + c)
            starts.append(len(p))
        ids, mask = pad_rows(rows, pad_token_id(lm.tokenizer), left=False)
        logits = lm.forward(ids, mask).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none")
        for i, r in enumerate(rows):
            scored = nll[i, starts[i] - 1 : len(r) - 1]
            total += float(scored.sum())
            count += scored.numel()
    if count == 0:
        raise DataError("the completions are all empty; there is nothing to score.")
    return total / count
