"""Causal tests of a crosscoder latent: does its organism decoder direction carry the organism's behaviour?

Two interventions, each measured by the behaviour rate of fresh answers to the trigger prompts:
- **steer the base**: add the latent's organism decoder direction, in activation units, times a multiple of
  the latent's largest activation seen, at the crosscoder's hook at every position. If the latent is the
  behaviour, the base starts to show it;
- **ablate in the organism**: project the directions out of the organism's activations at that hook
  (directional ablation of their span). If the latents are the behaviour, the organism stops showing it.

Steered answers count only while they stay fluent (their loss under the unsteered model within
`FLUENT_MARGIN` nats of the unsteered answers'): at large strengths a model emits gibberish, which can
hold any word. Ablations report their price on ordinary text: the corpus loss under the same edit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from saelab.core.data import DataConfig
from saelab.core.models import HookedLM
from saelab.errors import DataError
from saelab.interventions.evaluation import corpus_loss
from saelab.interventions.generation import GenerationConfig, completion_loss, generate
from saelab.interventions.hooks import Ablate, AddVector, Intervention

FLUENT_MARGIN = 1.0  # nats per token above the unsteered answers' loss


def orthonormal_span(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [r, d] of the rows' span; directions within float32 noise of the others add none."""
    if directions.shape[0] == 0:
        return directions.float()
    _, singular, basis = torch.linalg.svd(directions.double(), full_matrices=False)
    return basis[singular > 1e-5 * singular[0]].float()


def ablations(hook: str, directions: torch.Tensor) -> list[Intervention]:
    """Directional ablation of the span of `directions` at `hook`, as one ablation per basis vector."""
    return [Ablate(hook, direction=v) for v in orthonormal_span(directions)]


def fluency(lm: HookedLM, prompts: Sequence[str], texts: Sequence[str], cfg: GenerationConfig) -> float:
    """Mean per-token loss of `texts` under the unsteered `lm` (nan when all are empty): steering that
    wrecks the text scores high, and its behaviour rate counts for nothing (gibberish can hold any word)."""
    try:
        return completion_loss(lm, prompts, texts, chat=cfg.chat, batch_size=cfg.batch_size)
    except DataError:
        return math.nan


def steer_rates(
    lm: HookedLM,
    hook: str,
    vector: torch.Tensor,
    alphas: Sequence[float],
    prompts: Sequence[str],
    rate: Callable[[Sequence[str]], float],
    cfg: GenerationConfig,
) -> list[dict]:
    """[{alpha, rate, loss, samples}] of `lm` with `alpha * vector` added at `hook` (same seed at every
    alpha); `loss` is the answers' fluency (`fluency`)."""
    out = []
    for alpha in alphas:
        texts = generate(lm, prompts, [AddVector(hook, vector=vector, alpha=float(alpha))], cfg)
        out.append(
            {
                "alpha": float(alpha),
                "rate": rate(texts),
                "loss": fluency(lm, prompts, texts, cfg),
                "samples": texts[:3],
            }
        )
    return out


def ablated_rate(
    lm: HookedLM,
    hook: str,
    directions: torch.Tensor,
    prompts: Sequence[str],
    rate: Callable[[Sequence[str]], float],
    cfg: GenerationConfig,
) -> dict:
    """{rate, samples} of `lm` answering `prompts` with the span of `directions` removed at `hook`."""
    texts = generate(lm, prompts, ablations(hook, directions), cfg)
    return {"rate": rate(texts), "samples": texts[:3]}


def ablated_loss(
    lm: HookedLM, hook: str, directions: torch.Tensor, data: DataConfig, n_contexts: int
) -> float:
    """Corpus loss of `lm` with the span of `directions` removed at `hook`."""
    return corpus_loss(lm, data, n_contexts, ablations(hook, directions))
