"""Sizing the demo to its time budget from measured speeds (saelab.cli.budget)."""

from __future__ import annotations

import pytest

from saelab.cli.budget import SAFETY, measure_train_step, plan_demo, stage_seconds
from saelab.dictionaries import DictionaryConfig

# Speeds (harvest, TopK step, full forward; tok/s): measured on a 2-core AMX Xeon in bfloat16, and
# the harvest of a 2-core AVX2-only EPYC in float32 with the other two scaled from the emulation.
AMX = (3000.0, 9000.0, 730.0)
EMULATED_AVX2 = (1092.0, 6000.0, 390.0)
AVX2 = (721.0, 5000.0, 260.0)


def _seconds(plan, speeds):
    harvest, train, forward = speeds
    return sum(
        stage_seconds(
            harvest,
            train,
            plan.harvest_tokens,
            plan.train_tokens,
            plan.eval_tokens,
            plan.ce_contexts,
            plan.analyze_tokens,
            forward_tok_s=forward,
        ).values()
    )


def test_a_fast_machine_gets_the_full_demo():
    plan = plan_demo(*AMX[:2], budget_s=13 * 60, forward_tok_s=AMX[2])
    assert (plan.harvest_tokens, plan.train_tokens) == (1_000_000, 1_000_000)
    assert (plan.eval_tokens, plan.ce_contexts, plan.analyze_tokens) == (65_536, 128, 131_072)
    assert plan.epochs == 1.0 and "fits" in plan.reason


def test_a_slow_machine_harvests_less_and_trains_more_epochs():
    plan = plan_demo(*EMULATED_AVX2[:2], budget_s=12 * 60, forward_tok_s=EMULATED_AVX2[2])
    assert plan.train_tokens == 1_000_000
    assert 262_144 <= plan.harvest_tokens < 1_000_000
    assert plan.epochs > 1.5 and "epochs" in plan.reason and "1,092 tok/s" in plan.reason
    assert _seconds(plan, EMULATED_AVX2) <= SAFETY * 12 * 60 + 1  # the estimate fits the budget


def test_a_slower_machine_goes_below_the_quality_floor_and_says_so():
    plan = plan_demo(*AVX2[:2], budget_s=12 * 60, forward_tok_s=AVX2[2])
    assert 131_072 <= plan.harvest_tokens < 262_144 and plan.train_tokens == 1_000_000
    assert "about 0.97" in plan.reason and "721 tok/s" in plan.reason
    assert _seconds(plan, AVX2) <= SAFETY * 12 * 60 + 1


def test_cuts_go_in_order_and_always_fit_when_possible():
    previous = None
    for minutes in (20, 13, 10, 8, 6, 4):
        plan = plan_demo(*AVX2[:2], budget_s=minutes * 60, forward_tok_s=AVX2[2])
        assert plan.estimate_s == pytest.approx(_seconds(plan, AVX2))
        if previous is not None:
            assert plan.harvest_tokens <= previous.harvest_tokens
            assert plan.analyze_tokens <= previous.analyze_tokens
        previous = plan
    assert previous.analyze_tokens == 32_768 and previous.ce_contexts == 32  # quartered at 4 minutes


def test_a_hopelessly_slow_machine_still_gets_a_plan_and_says_so():
    plan = plan_demo(50.0, 500.0, budget_s=60)
    assert plan.harvest_tokens >= 1024 and plan.train_tokens >= plan.harvest_tokens
    assert "slow" in plan.reason


def test_tokens_given_disable_the_sizing():
    plan = plan_demo(*AVX2[:2], budget_s=60, fixed_tokens=50_000)
    assert (plan.harvest_tokens, plan.train_tokens) == (50_000, 50_000)
    assert "--tokens" in plan.reason


def test_measure_train_step_returns_a_rate():
    rate = measure_train_step(DictionaryConfig(architecture="topk", d_in=16, d_sae=64, k=4), batch_size=64)
    assert rate > 0


def test_the_explanation_stage_is_set_aside_before_the_other_stages_are_sized():
    without = plan_demo(*EMULATED_AVX2[:2], budget_s=12 * 60, forward_tok_s=EMULATED_AVX2[2])
    plan = plan_demo(*EMULATED_AVX2[:2], budget_s=12 * 60, forward_tok_s=EMULATED_AVX2[2], explain_latents=64)
    assert plan.explain_latents == 64 and without.explain_latents == 0
    assert plan.harvest_tokens < without.harvest_tokens  # the 64 latents' time came out of the harvest
    stages = stage_seconds(
        EMULATED_AVX2[0], EMULATED_AVX2[1], plan.harvest_tokens, plan.train_tokens, plan.eval_tokens,
        plan.ce_contexts, plan.analyze_tokens, forward_tok_s=EMULATED_AVX2[2], explain_latents=64,
    )  # fmt: skip
    assert stages["explain"] > 0 and plan.estimate_s == pytest.approx(sum(stages.values()))
    assert plan.estimate_s <= SAFETY * 12 * 60 + 1
    old = {k: v for k, v in plan.to_dict().items() if k != "explain_latents"}  # a plan file from before
    assert type(plan)(**old).explain_latents == 0
