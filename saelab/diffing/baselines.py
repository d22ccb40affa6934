"""Baselines to set beside a crosscoder: what simpler tools already say about how two models differ.

- **Activation-difference lens**: the mean of (B's activation − A's) at one hook over the same tokens,
  decomposed into an SAE's features with the decomposition `steering` uses. A behaviour that
  fine-tuning added everywhere shows up as a few features of the difference.
- **Per-token KL** between the models' next-token distributions on the same text, with the tokens
  where they differ most (where to look first).
- **SAE transfer**: the CE loss score of one SAE spliced into each model; an SAE trained on A that
  still explains B says the fine-tune left that hook mostly alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saelab.analysis.evaluation import EvalConfig, evaluate
from saelab.core.data import DataConfig
from saelab.diffing.paired import PairedModels, member_hook
from saelab.errors import DataError
from saelab.interventions.decompose import Decomposition, decompose


def _batches(paired: PairedModels, data: DataConfig, n_tokens: int, batch_contexts: int):
    n_contexts = math.ceil(n_tokens / max(1, data.context_size - 1))
    yield from data.masked_batches(paired.tokenizer, batch_contexts, max_contexts=n_contexts)


@dataclass
class ActivationDifference:
    """The mean activation difference B − A at a hook, its size against A's activations, and its features."""

    hook: str
    mean_difference: torch.Tensor  # [d]
    mean_norm_a: float  # the mean norm of A's activations, for scale
    tokens: int
    features: Decomposition | None = None  # the difference decomposed into an SAE's features


@torch.no_grad()
def activation_difference(
    paired: PairedModels,
    data: DataConfig,
    hook: str,
    n_tokens: int = 65536,
    sae=None,
    n_features: int = 10,
    batch_contexts: int = 16,
    progress: bool = True,
) -> ActivationDifference:
    """mean(B − A) at `hook` over the same tokens (excluded positions left out), decomposed into `sae`'s
    features when one is given (an SAE at that hook, of either model)."""
    total, norm_a, count = None, 0.0, 0
    hooks = [member_hook(0, hook), member_hook(1, hook)]
    bar = tqdm(total=n_tokens, desc="activation difference", unit="tok", disable=not progress, leave=False)
    for input_ids, keep in _batches(paired, data, n_tokens, batch_contexts):
        acts = paired.capture(input_ids, hooks)
        keep = keep.to(acts[hooks[0]].device)
        a, b = acts[hooks[0]][keep].double(), acts[hooks[1]][keep].double()
        take = min(a.shape[0], n_tokens - count)
        a, b = a[:take], b[:take]
        total = (b - a).sum(0) if total is None else total + (b - a).sum(0)
        norm_a += float(a.norm(dim=-1).sum())
        count += take
        bar.update(take)
        if count >= n_tokens:
            break
    bar.close()
    if count == 0:
        raise DataError("the data gave no usable tokens; point --data at a non-empty source.")
    mean = (total / count).float().cpu()
    features = decompose(sae, mean.to(sae.W_dec.device), n_features=n_features) if sae is not None else None
    return ActivationDifference(hook, mean, norm_a / count, count, features)


@dataclass
class TokenKL:
    """KL(A's next-token distribution ‖ B's) per position: the mean, and the positions where it is largest."""

    mean_kl: float
    tokens: int
    top: list[dict]  # {"context": text up to the token, "token": its text, "kl": value}, largest first


@torch.no_grad()
def token_kl(
    paired: PairedModels, data: DataConfig, n_tokens: int = 16384, top: int = 20, batch_contexts: int = 8
) -> TokenKL:
    """Where the two models' predictions differ most on the same text (excluded positions left out)."""
    lm_a, lm_b = paired.lms[0], paired.lms[1]
    tokenizer = paired.tokenizer
    best: list[tuple[float, torch.Tensor, int]] = []
    total, count = 0.0, 0
    for input_ids, keep in _batches(paired, data, n_tokens, batch_contexts):
        log_a = lm_a.forward(input_ids.to(lm_a.device)).float().log_softmax(-1).cpu()
        log_b = lm_b.forward(input_ids.to(lm_b.device)).float().log_softmax(-1).cpu()
        kl = (log_a.exp() * (log_a - log_b)).sum(-1)  # [batch, seq]: the prediction made at each position
        kl = kl.masked_fill(~keep, float("-inf"))
        valid = keep.sum()
        total += float(kl[keep].sum())
        count += int(valid)
        values, flat = kl.flatten().topk(min(top, int(valid)))
        for value, index in zip(values.tolist(), flat.tolist(), strict=True):
            row, pos = divmod(index, kl.shape[1])
            best.append((value, input_ids[row, : pos + 1].clone(), pos))
        best = sorted(best, key=lambda item: -item[0])[:top]
        if count >= n_tokens:
            break
    if count == 0:
        raise DataError("the data gave no usable tokens; point --data at a non-empty source.")
    rows = [
        {
            "context": tokenizer.decode(ids[:-1].tolist()),
            "token": tokenizer.decode([int(ids[-1])]),
            "kl": value,
        }
        for value, ids, _ in best
    ]
    return TokenKL(total / count, count, rows)


def sae_transfer(
    sae, paired: PairedModels, data: DataConfig, cfg: EvalConfig | None = None
) -> dict[str, dict]:
    """The SAE's metrics spliced into each model in turn (its own and the other): model name -> metrics."""
    cfg = cfg or EvalConfig(n_tokens=16384, ce_contexts=64)
    return {lm.name: evaluate(lm, sae, data, cfg, progress=False) for lm in paired.lms}
