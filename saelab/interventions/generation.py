"""Generation with and without interventions, side by side, with the same seed; and fluency.

Prompts are left-padded into one batch (the chat template applied when the tokenizer has one and
`chat=True`), so the prompt occupies positions [0, prompt_len) of every row and an intervention's
scope ("prompt" / "generated") means the same thing in every row. Sampling uses a fixed seed in a
forked RNG: steered and unsteered runs draw the same random numbers, and the caller's RNG is untouched.

Decoding is saelab's own loop (`generate_tokens`), not `model.generate`: one prefill, then one token
per forward pass on the model's KV cache, with explicit attention_mask and position_ids. saelab thus
owns the positions every hook sees, and neither generate's internals nor its hidden sampling defaults
(any penalty a model's generation_config sets) change the text from one transformers release to the
next. Sampling is exactly temperature, then top_k (50 by default, as transformers' default), then top_p.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

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


def _parameters(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _returned_cache(output):
    """The KV cache a forward pass returned: `cache` since transformers 5.24, `past_key_values` before."""
    for key in ("cache", "past_key_values"):
        if key in output and output[key] is not None:
            return output[key]
    return None


def _stop_ids(lm: HookedLM) -> list[int]:
    """End-of-sequence ids: the model's generation config, its config and the tokenizer's EOS."""
    ids: list[int] = []
    for value in (
        getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None),
        getattr(lm.model.config, "eos_token_id", None),
        getattr(lm.tokenizer, "eos_token_id", None),
    ):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """One token per row: argmax when temperature is 0, else top-k and nucleus sampling at that temperature."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).
        ascending, order = logits.sort(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


@torch.no_grad()
def generate_tokens(
    lm: HookedLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    top_k: int = 0,
) -> torch.Tensor:
    """New token ids [batch, <= max_new_tokens] after left-padded prompts; rows end at EOS, then pad.

    Each forward pass gets the full 2-D attention_mask (cached + new tokens) and position_ids that
    count real tokens only, as `lm.forward` does, so a steered hook can place every token exactly.
    Random draws come from torch's global RNG, one batch-wide draw per step; seed it to reproduce.
    Without `use_cache` (or for a model that returns no cache) every step recomputes the sequence.
    """
    model, pad = lm.model, pad_token_id(lm.tokenizer)
    params = _parameters(model)
    cache_key = "cache" if "cache" in params else "past_key_values"
    keep_key = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    stop = torch.tensor(_stop_ids(lm), device=input_ids.device, dtype=torch.long)
    ids, mask = input_ids, attention_mask.long()
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    cache, new = None, []
    for _ in range(max_new_tokens):
        fresh = ids if cache is None else ids[:, -1:]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -fresh.shape[1] :]
        inputs = {
            "input_ids": fresh,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": use_cache,
            "return_dict": True,
        }
        if cache is not None:
            inputs[cache_key] = cache
        if keep_key is not None:
            inputs[keep_key] = 1
        output = model(**inputs)
        cache = _returned_cache(output) if use_cache else None
        token = _next_tokens(output.logits[:, -1], temperature, top_p, top_k)
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        done |= torch.isin(token, stop)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return ids[:, input_ids.shape[1] :]


def _decode(tokenizer, rows: torch.Tensor, stop: list[int]) -> list[str]:
    texts = []
    for row in rows.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


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
