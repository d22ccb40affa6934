"""Next-token logits at the last prompt position, and the log-odds of a set of tokens."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.errors import ActivationError


@torch.no_grad()
def last_logits(lm: HookedLM, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Next-token logits [batch, vocab] (float32) at the last position of a left-padded batch.

    Only the last position goes through the unembedding (`logits_to_keep=1`), which on a 135M model
    is a third of the compute; models whose forward lacks that argument get the full logits sliced.
    """
    kwargs = lm.prepare(input_ids, attention_mask)  # position_ids from the mask, as every forward
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
