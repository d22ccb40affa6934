"""saelab's own decoding loop: one prefill, then one token per forward pass on the model's KV cache.

It lives in core because every room that generates text needs it: steered generation
(`saelab.interventions.generation`) and the local LM client that explains features
(`saelab.explain.clients.local`). It is not `model.generate`: each pass gets an explicit
attention_mask and position_ids, so saelab owns the positions every hook sees, and neither generate's
internals nor its hidden sampling defaults (any penalty a model's generation_config sets) change the
text from one transformers release to the next. Sampling is exactly temperature, then top_k, then top_p.
"""

from __future__ import annotations

import inspect
import math

import torch

from saelab.core.models import HookedLM
from saelab.core.prompts import pad_token_id


def _parameters(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_keyword(module) -> str:
    """The forward keyword that takes a KV cache: `cache` since transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in _parameters(module) else "past_key_values"


def returned_cache(output):
    """The KV cache a forward pass returned: `cache` since transformers 5.24, `past_key_values` before."""
    for key in ("cache", "past_key_values"):
        if key in output and output[key] is not None:
            return output[key]
    return None


def stop_ids(lm: HookedLM) -> list[int]:
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


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
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
    cache_key = cache_keyword(model)
    keep_key = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    stop = torch.tensor(stop_ids(lm), device=input_ids.device, dtype=torch.long)
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
        cache = returned_cache(output) if use_cache else None
        token = next_tokens(output.logits[:, -1], temperature, top_p, top_k)
        token = torch.where(done, torch.full_like(token, pad), token)
        new.append(token)
        done |= torch.isin(token, stop)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return ids[:, input_ids.shape[1] :]


def decode_new(tokenizer, rows: torch.Tensor, stop: list[int]) -> list[str]:
    """The text of each row of new tokens, up to (not including) its first stop id."""
    texts = []
    for row in rows.tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts
