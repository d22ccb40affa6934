"""Size a job to a wall-clock budget from speeds measured on this machine.

The demo promises 15 minutes on any 2-core CPU, but harvest speed differs 4x between an AMX Xeon
in bfloat16 and an AVX2-only CPU in float32. So the demo measures the harvest and a training step
on the first batches and sizes every stage to fit the time left: it harvests fewer tokens and
trains on them for more than one epoch (each in a new order), and shortens the evaluation and the
feature analysis only when it must. Every number is printed with the reason.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from saelab.core.data import DataConfig
    from saelab.core.models import HookedLM
    from saelab.dictionaries import DictionaryConfig

# Costs relative to the measured speeds, from stage times of whole demo runs (SmolLM2-135M,
# blocks.15): the harvest loop (cache writes, shuffling) runs at ~1/1.15 of one timed capture; the
# feature-analysis pass costs ~1.35x the harvest plus ~10 s of fixed work. The CE/KL evaluation is
# timed directly (`measure_full_forward`): a full forward with its 49k-token log-softmax costs ~6x
# an early exit on an AMX CPU in bfloat16, where the softmax gains nothing from the bf16 units.
HARVEST_LOOP_COST = 1.15
EVAL_OVERHEAD = 1.3  # the SAE's encoding, the KL terms and the batching around the timed forward
ANALYSIS_COST, ANALYSIS_FIXED_S = 1.35, 10.0
CE_FORWARDS = 3  # clean, with the SAE spliced in, zero-ablated
# The explanation stage (`saelab.cli.demo.demo_explain_config`) costs about as much per latent as this many
# tokens of early-exit harvest: its example sets, the explainer's prompt and reply, and the judge's
# detection and embedding passes over 12 windows with two labels (measured in CPU time on one thread of an
# AVX2 EPYC in float32: 9.1 s a latent against 585 harvested tokens a second), plus a fixed model load.
# In a whole fresh-clone demo on that EPYC at 2 threads it cost more, 6,200 (387 s for 64 latents at
# 1,034 tok/s): the planner's 10% margin absorbed it (880 s of 900). Planning with 6,200 there would
# cut training from 3.6 epochs of 131,072 tokens to one, for 40 s, so the one-thread figure is kept.
EXPLAIN_TOKENS_PER_LATENT = 5500
EXPLAIN_FIXED_S = 5.0
SAFETY = 0.9  # plan to 90% of the time left: speeds drift as the machine warms or shares its cores


@dataclass
class DemoPlan:
    """How many tokens each demo stage gets, and why."""

    harvest_tokens: int
    train_tokens: int
    eval_tokens: int
    ce_contexts: int
    analyze_tokens: int
    harvest_tok_s: float
    train_tok_s: float
    forward_tok_s: float | None
    budget_s: float
    estimate_s: float
    reason: str
    explain_latents: int = 0

    @property
    def epochs(self) -> float:
        return self.train_tokens / self.harvest_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def stage_seconds(
    harvest_tok_s: float,
    train_tok_s: float,
    harvest_tokens: int,
    train_tokens: int,
    eval_tokens: int,
    ce_contexts: int,
    analyze_tokens: int,
    forward_tok_s: float | None = None,
    context_size: int = 128,
    explain_latents: int = 0,
) -> dict[str, float]:
    """Estimated seconds of each stage at the measured speeds (forward_tok_s: full forward + loss)."""
    forward_tok_s = forward_tok_s or harvest_tok_s / 6.0
    analysis = ANALYSIS_COST * analyze_tokens / harvest_tok_s + (ANALYSIS_FIXED_S if analyze_tokens else 0.0)
    return {
        "harvest": HARVEST_LOOP_COST * harvest_tokens / harvest_tok_s,
        "train": train_tokens / train_tok_s,
        "eval": EVAL_OVERHEAD
        * (eval_tokens / harvest_tok_s + CE_FORWARDS * ce_contexts * context_size / forward_tok_s),
        "analyze": analysis,
        "explain": (EXPLAIN_TOKENS_PER_LATENT * explain_latents / harvest_tok_s + EXPLAIN_FIXED_S)
        if explain_latents
        else 0.0,
    }


def plan_demo(
    harvest_tok_s: float,
    train_tok_s: float,
    budget_s: float,
    tokens: int = 1_000_000,
    eval_tokens: int = 65_536,
    ce_contexts: int = 128,
    analyze_tokens: int = 131_072,
    min_harvest: int = 262_144,
    fixed_tokens: int | None = None,
    forward_tok_s: float | None = None,
    explain_latents: int = 0,
) -> DemoPlan:
    """The largest demo that fits `budget_s` at these speeds.

    Cuts, from what costs quality least (measured on SmolLM2, TopK k32, 1M training tokens):
    (1) harvest fewer tokens, down to `min_harvest`, and train more epochs on them: 262,144
    harvested (3.8 epochs) gave EV 0.950 and CE loss score 0.984, 163,840 (6.1) 0.944 and 0.976,
    131,072 (7.6) 0.941 and 0.969; (2) halve, then quarter, the evaluation and analysis tokens and the CE contexts (their
    figures get noisier, not worse); (3) harvest down to half `min_harvest`; (4) fewer training
    tokens. The `explain_latents` most frequent latents are always explained: their time is set aside
    first. `fixed_tokens` (the user's --tokens) disables the sizing.
    """
    full = dict(eval_tokens=eval_tokens, ce_contexts=ce_contexts, analyze_tokens=analyze_tokens)
    usable = SAFETY * budget_s

    def cost(harvest: int, train: int, **stages) -> float:
        return sum(
            stage_seconds(
                harvest_tok_s,
                train_tok_s,
                harvest,
                train,
                **stages,
                forward_tok_s=forward_tok_s,
                explain_latents=explain_latents,
            ).values()
        )

    def plan(harvest: int, train: int, reason: str, **stages) -> DemoPlan:
        return DemoPlan(
            harvest, train, stages["eval_tokens"], stages["ce_contexts"], stages["analyze_tokens"],
            harvest_tok_s, train_tok_s, forward_tok_s, budget_s, cost(harvest, train, **stages), reason,
            explain_latents,
        )  # fmt: skip

    if fixed_tokens is not None:
        return plan(fixed_tokens, fixed_tokens, "--tokens given: no sizing", **full)
    best = plan(tokens, tokens, "the full demo fits the time left", **full)
    if best.estimate_s <= usable:
        return best
    steps = (
        (1, min_harvest, ""),
        (2, min_harvest, "; evaluation and analysis halved"),
        (4, min_harvest, "; evaluation and analysis quartered"),
        (4, min_harvest // 2, "; evaluation and analysis quartered (CE score about 0.97 at this size)"),
    )
    for divisor, floor, note in steps:
        stages = _scaled(full, divisor)
        others = cost(0, tokens, **stages)
        harvest = min(tokens, int((usable - others) * harvest_tok_s / HARVEST_LOOP_COST))
        if harvest >= floor:
            return plan(
                harvest,
                tokens,
                f"harvest runs at {harvest_tok_s:,.0f} tok/s, so {tokens:,} fresh tokens would not fit: "
                f"{harvest:,} are harvested and trained on for {tokens / harvest:.1f} epochs{note}",
                **stages,
            )
    stages = _scaled(full, 4)
    harvest = min_harvest // 2
    others = cost(harvest, 0, **stages)
    train = max(harvest, min(tokens, int((usable - others) * train_tok_s)))
    return plan(
        harvest,
        train,
        f"this machine is slow (harvest {harvest_tok_s:,.0f} tok/s, training {train_tok_s:,.0f} tok/s): "
        f"{harvest:,} tokens harvested, {train:,} trained; evaluation and analysis quartered",
        **stages,
    )


def _scaled(stages: dict, divisor: int) -> dict:
    return {key: max(1, value // divisor) for key, value in stages.items()}


# -- measurements ---------------------------------------------------------------------------------
def measure_harvest(
    lm: HookedLM, data: DataConfig, hook: str, batch_contexts: int = 32, timed: int = 2
) -> float:
    """Tokens per second of the early-exit capture, timed on `timed` batches after a warm-up batch."""
    batches = iter(data.batches(lm.tokenizer, batch_contexts))
    lm.capture(next(batches), [hook])  # warm-up: kernel selection, allocator, thread pool
    tokens, start = 0, time.perf_counter()
    for _ in range(timed):
        batch = next(batches)
        lm.capture(batch, [hook])
        tokens += batch.numel()
    return tokens / (time.perf_counter() - start)


def measure_full_forward(lm: HookedLM, data: DataConfig, contexts: int = 8) -> float:
    """Tokens per second of a full forward with its log-softmax, as the CE/KL evaluation runs it."""
    batch = next(iter(data.batches(lm.tokenizer, contexts)))
    with torch.no_grad():
        lm.forward(batch[:2]).float().log_softmax(-1)  # warm-up
        start = time.perf_counter()
        lm.forward(batch).float().log_softmax(-1).exp()
    return batch.numel() / (time.perf_counter() - start)


def measure_train_step(
    dictionary_cfg: DictionaryConfig, batch_size: int = 1024, steps: int = 8, warmup: int = 3
) -> float:
    """Tokens per second of training steps of this dictionary (forward, backward, Adam) on random rows."""
    from saelab.dictionaries import StepContext, build_dictionary

    dictionary = build_dictionary(dictionary_cfg)
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=1e-4)
    x = torch.randn(batch_size, dictionary_cfg.d_in, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        out = dictionary.training_loss(x, x, StepContext(dead_mask=None, progress=0.5))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    for _ in range(warmup):  # Adam's state, the allocator and oneDNN's primitives settle in a few steps
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)
