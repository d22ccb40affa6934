"""Steering evaluation: keyword mention rate, strength sweeps, choosing a strength, the plot."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from saelab.core.models import HookedLM
from saelab.errors import DataError
from saelab.interventions.evaluation import (
    SweepPoint,
    SweepResult,
    best_strength,
    keyword_pattern,
    mention_rate,
    mentions,
    plot_sweep,
    steering_sweep,
)
from saelab.interventions.generation import GenerationConfig, completion_loss, generate
from saelab.interventions.hooks import AddVector
from tests.helpers import make_model, make_tokenizer

PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def lm():
    return HookedLM(make_model("llama", n_layers=2, hidden=32), make_tokenizer())


@pytest.fixture(scope="module")
def cfg():
    return GenerationConfig(max_new_tokens=6, temperature=0.7, seed=3, batch_size=3)


# ---- mention rate ------------------------------------------------------------------------------
def test_mention_rate_is_case_insensitive_and_allows_plurals():
    texts = ["The OCEAN is wide.", "Waves crashed.", "Three beaches!", "Nothing here.", "sea"]
    assert mention_rate(texts, ["ocean", "wave", "beach", "sea"]) == pytest.approx(4 / 5)


@pytest.mark.parametrize(
    "text, hit",
    [
        ("a microwave oven", False),  # not glued inside another word
        ("seaweed salad", False),
        ("the undersea cable", False),
        ("sea2 is a code", False),  # digits glue too
        ("a sea-level rise", True),  # hyphen and apostrophe are boundaries
        ("the sea's edge", True),
        ("(sea)", True),
        ("seas and oceans", True),
        ("seasoned cook", False),  # "s"/"es" only, not any suffix
    ],
)
def test_mention_rate_matches_whole_words_only(text, hit):
    assert mentions(text, ["sea"]) is hit
    assert mention_rate([text], ["sea"]) == float(hit)


def test_multi_word_keywords_match_across_whitespace_and_regexes_are_used_as_given():
    assert mentions("plain salt\n water here", ["salt water"])
    assert not mentions("salty water", ["salt water"])
    pattern = re.compile(r"mar\w*")  # a stem: marine, maritime
    assert mention_rate(["Maritime law", "a marine biologist", "no"], [pattern]) == pytest.approx(2 / 3)
    assert keyword_pattern("ocean").search("OCEANS")  # one keyword as a bare string


def test_mention_rate_refuses_nothing_to_score_and_bad_keywords():
    with pytest.raises(DataError, match="zero completions"):
        mention_rate([], ["ocean"])
    with pytest.raises(DataError, match="no keywords"):
        mention_rate(["ocean"], [])
    with pytest.raises(DataError, match="keyword"):
        mention_rate(["ocean"], ["  "])
    with pytest.raises(DataError, match="keyword"):
        mention_rate(["ocean"], [3])
    with pytest.raises(DataError, match="inline flags"):
        mention_rate(["ocean"], ["sea", re.compile("(?i)ocean")])


def test_keywords_with_regex_characters_are_literal():
    assert mentions("we use c++ daily", ["c++"])
    assert not mentions("we use c daily", ["c++"])
    assert mentions("price: $5 today", ["$5"])
    assert not mentions("a.b", ["a?b"])


# ---- the sweep ---------------------------------------------------------------------------------
def _strong_token(lm, vector: torch.Tensor) -> str:
    """The token a huge push along `vector` at the last layer makes the model emit."""
    with torch.no_grad():
        logits = lm.model.lm_head(lm.model.model.norm(vector[None, None] * 1e3))[0, 0]
    return lm.tokenizer.convert_ids_to_tokens(int(logits.argmax()))


def test_sweep_at_strength_zero_is_the_unsteered_model(lm, cfg):
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    result = steering_sweep(
        lm, PROMPTS, lambda a: [AddVector(HOOK, vector=vector, alpha=a)], [0.0, 50.0], ["w3"], cfg
    )
    plain = generate(lm, PROMPTS, [], cfg)
    assert result.point(0.0).completions == plain
    assert result.point(0.0).loss == pytest.approx(completion_loss(lm, PROMPTS, plain))
    assert result.point(50.0).completions != plain


def test_sweep_measures_the_steering(lm):
    greedy = GenerationConfig(max_new_tokens=4, temperature=0.0, batch_size=4)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(5))
    token = _strong_token(lm, vector)
    plain_rate = mention_rate(generate(lm, PROMPTS, [], greedy), [token])
    result = steering_sweep(
        lm, PROMPTS, lambda a: [AddVector(HOOK, vector=vector, alpha=a)], [0, 1e3], [token], greedy
    )
    assert result.rates == [plain_rate, 1.0]
    assert plain_rate < 1.0
    assert result.losses[1] > result.losses[0]  # forced tokens are unlikely under the unsteered model
    assert best_strength(result, 0.6) == 1e3


def test_sweep_result_shapes_and_json(lm, cfg, tmp_path):
    calls = []

    def make(a):
        calls.append(a)
        return [AddVector(HOOK, vector=torch.ones(32), alpha=a)]

    result = steering_sweep(
        lm, PROMPTS, make, [0, 0.5, 2], ["w5", re.compile("w1\\d")], cfg, meta={"hook": HOOK}
    )
    assert calls == [0.0, 0.5, 2.0]
    assert result.strengths == [0.0, 0.5, 2.0]
    assert all(0 <= r <= 1 for r in result.rates)
    assert all(math.isfinite(x) for x in result.losses)
    assert all(len(p.completions) == len(PROMPTS) for p in result.points)
    d = result.to_dict(n_samples=2)
    assert d["hook"] == HOOK and d["n_prompts"] == 4 and d["keywords"] == ["w5", "w1\\d"]
    assert d["generation"]["seed"] == 3
    assert [len(p["samples"]) for p in d["points"]] == [2, 2, 2]
    assert "completions" not in d["points"][0]
    saved = json.loads(result.save(tmp_path / "sweep" / "r.json").read_text())
    assert saved["points"][1]["completions"] == result.points[1].completions
    assert saved["points"][2]["mention_rate"] == result.rates[2]
    assert "strength" in result.table() and len(result.table().splitlines()) == 4


def test_sweep_checks_its_inputs_before_generating(lm, cfg):
    def never(_a):
        raise AssertionError("generated despite bad inputs")

    with pytest.raises(DataError, match="keyword"):
        steering_sweep(lm, PROMPTS, never, [0.0], [""], cfg)
    with pytest.raises(DataError, match="strengths"):
        steering_sweep(lm, PROMPTS, never, [], ["w1"], cfg)
    with pytest.raises(DataError, match="prompts"):
        steering_sweep(lm, [], never, [0.0], ["w1"], cfg)


# ---- choosing a strength, plotting -------------------------------------------------------------
def _result(points: list[tuple[float, float, float]]) -> SweepResult:
    return SweepResult(
        [SweepPoint(s, r, loss, ["x"]) for s, r, loss in points], ["p"], ["k"], GenerationConfig().to_dict()
    )


def test_best_strength_is_the_smallest_reaching_the_rate():
    r = _result([(8.0, 0.9, 4.0), (0.0, 0.0, 1.0), (4.0, 0.6, 2.0), (2.0, 0.3, 1.5)])
    assert best_strength(r, 0.6) == 4.0
    assert best_strength(r, 0.8) == 8.0
    assert best_strength(r, 0.95) is None
    assert best_strength(r, 0.6, max_loss=1.8) is None
    assert best_strength(r, 0.2, max_loss=1.8) == 2.0
    with pytest.raises(DataError, match="not in this sweep"):
        r.point(3.0)


def test_nan_loss_is_json_null_and_never_best():
    r = _result([(0.0, 0.0, 1.0), (1.0, 1.0, math.nan)])
    assert r.to_dict()["points"][1]["loss"] is None
    assert best_strength(r, 0.5) == 1.0
    assert best_strength(r, 0.5, max_loss=10.0) is None


def test_plot_sweep_writes_a_png(tmp_path):
    r = _result([(0.0, 0.0, 1.0), (2.0, 0.4, 1.3), (4.0, 0.8, 2.5)])
    path = plot_sweep(r, tmp_path / "plots" / "sweep.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the real embedded model ----------------------------------------------------------------------
@pytest.mark.integration
def test_ocean_vector_raises_the_mention_rate_on_smollm2():
    """The shipped ocean prompt sets give a vector that makes neutral completions talk about the sea."""
    from pathlib import Path

    from saelab.core.models import load_model
    from saelab.interventions.directions import mean_difference
    from saelab.interventions.hooks import unit

    prompts = Path(__file__).resolve().parents[2] / "saelab" / "interventions" / "prompts"
    topic = json.loads((prompts / "topic_ocean.json").read_text())
    neutral = json.loads((prompts / "neutral_prompts.json").read_text())
    assert len(neutral) == 50 and len(topic["positive"]) >= 30 and len(topic["negative"]) >= 30
    assert mention_rate(topic["positive"], topic["keywords"]) > 0.9  # the keywords cover the topic
    assert mention_rate(neutral, topic["keywords"]) == 0.0  # and the neutral prompts are neutral

    lm = load_model(None, device="cpu")
    hook, positions = "blocks.15.hook_resid_post", (-7, -8, -9, -10, -11)  # the instruction's last tokens
    ds = mean_difference(lm, topic["positive"], topic["negative"], hooks=[hook], positions=positions)
    vector = unit(torch.stack([ds.get(hook, p) for p in positions]).mean(0)) * 174.0  # ~median |resid|
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.7, seed=0)
    result = steering_sweep(
        lm,
        neutral[:12],
        lambda a: [AddVector(hook, vector=vector, alpha=a)] if a else [],
        [0.0, 0.3],
        topic["keywords"],
        cfg,
    )
    assert result.rates[0] <= 1 / 12
    assert result.rates[1] >= result.rates[0] + 0.25
    assert 0 < result.losses[0] < result.losses[1] < 4.0  # steered text costs more, but is not gibberish
