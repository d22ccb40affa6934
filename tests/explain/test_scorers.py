"""Scorers on hand-built example sets with a scripted judge (exact answers), the metrics and bootstrap,
and the real LocalClient through the same scorer code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from saelab.analysis.store import flagged
from saelab.errors import DataError
from saelab.explain.clients import LocalClient
from saelab.explain.examples import Example, ExampleSet
from saelab.explain.explainer import PROMPT_VERSION, Explainer, build_prompt, parse_label
from saelab.explain.scorers import SCORERS, auc, balanced_accuracy, bootstrap_ci, get_scorer
from saelab.explain.scorers.fuzzing import wrong_marks
from tests.helpers import make_model, make_tokenizer


class ScriptedJudge:
    """An LMClient whose answers depend only on whether a word of the explanation is in the text: a
    perfect judge for a latent that fires on that word. It reads the scorers' real prompts."""

    def __init__(self, always: str | None = None, labels=("the word w7",)):
        self.always, self.labels, self.calls = always, list(labels), []

    @staticmethod
    def _words(text: str) -> set[str]:
        return set(re.findall(r"w\d+", text))

    def _match(self, explanation: str, text: str) -> bool:
        return bool(self._words(explanation) & self._words(text))

    def generate(self, prompts, *, max_new_tokens, temperature=0.0, seed=0):
        self.calls.append(("generate", len(prompts), temperature, seed))
        return [self.labels[seed % len(self.labels)] for _ in prompts]

    def logprobs(self, prompts, candidates):
        out = []
        for p in prompts:
            explanation = re.search(r"(?:explanation: |example of )(.*?)(?:\n|\.\nText:)", p).group(1)
            marked = re.search(r"marked <<like this>>:\n(.*?)\n\nAre", p, re.S)
            if marked:  # fuzzing: yes when every marked run is a word of the explanation
                runs = re.findall(r"<<(.*?)>>", marked.group(1))
                yes = bool(runs) and all(self._match(explanation, r) for r in runs)
            elif "Text: " in p and "\n\nDoes" in p:  # detection
                yes = self._match(explanation, re.search(r"Text: (.*?)\n\nDoes", p, re.S).group(1))
            else:  # surprisal: candidates are texts
                out.append([-1.0 if self._match(explanation, c) else -2.0 for c in candidates])
                continue
            if self.always is not None:
                yes = self.always == "yes"
            assert [c.strip() for c in candidates] == ["Yes", "No"]
            out.append([0.0, -3.0] if yes else [-3.0, 0.0])
        return out

    def embed(self, texts):
        vocab = [f"w{i}" for i in range(200)]
        return torch.tensor([[float(w in self._words(t)) for w in vocab] + [1e-3] for t in texts])

    def describe(self):
        return {"kind": "scripted", "always": self.always}


def ex(words, fire="w7", source="activating", context=0):
    pieces = tuple((" " if i else "") + w for i, w in enumerate(words))
    values = tuple(1.5 if (w == fire and source == "activating") else 0.0 for w in words)
    return Example(0, "top", None, 0, context, 3, tuple(range(len(words))), pieces, values, source)


def example_set():
    test = [ex(["w1", "w7", "w2", "w3"], context=1), ex(["w7", "w4", "w5"], context=2),
            ex(["w9", "w9", "w7", "w8", "w7"], context=3), ex(["w11", "w7"], context=4)]  # fmt: skip
    random_ = [ex(["w1", "w2", "w3"], source="random", context=10 + i) for i in range(6)]
    hard = [ex(["w70", "w17", "w77"], source="hard", context=20 + i) for i in range(4)]
    return ExampleSet(0, [ex(["w7"], context=9)], test, random_, hard)


@pytest.mark.parametrize("name", list(SCORERS))
def test_right_label_scores_one_and_shuffled_scores_chance(name):
    judge = ScriptedJudge()
    result = get_scorer(name).score(
        "the word w7", example_set(), judge, "the word w150", seed=0, n_bootstrap=200
    )
    assert result.scorer == name
    assert result.score == 1.0 and result.chance == 0.5 and result.shuffled == 0.5
    assert result.ci_low == result.ci_high == 1.0
    assert not result.flagged
    n_items = 8 if name == "fuzzing" else 14
    assert result.n == n_items == len(result.details["items"])
    assert result.details["shuffled_explanation"] == "the word w150"
    swapped = get_scorer(name).score("the word w150", example_set(), judge, "the word w7", n_bootstrap=200)
    assert swapped.score == 0.5 and swapped.shuffled == 1.0 and swapped.flagged


def test_a_judge_that_always_says_no_gets_the_majority_accuracy_but_chance_balanced():
    result = SCORERS["detection"].score("w7", example_set(), ScriptedJudge(always="no"), "w150")
    d = result.details
    assert result.score == result.chance == 0.5 and result.flagged
    assert d["accuracy"] == d["accuracy_chance"] == pytest.approx(10 / 14)  # SAEBench's 0.714 trap
    assert d["auc"] == d["auc_chance"] == 0.5
    assert d["n_positive"] == 4 and d["n_negative"] == 10


def test_fuzzing_marks_wrong_tokens_of_the_same_count():
    import random

    rng = random.Random(0)
    wrong = wrong_marks(5, (2, 4), rng)
    assert len(wrong) == 2 and not set(wrong) & {2, 4}
    assert wrong_marks(2, (0, 1), rng) is None and wrong_marks(3, (), rng) is None


def test_scores_are_deterministic_and_seeded():
    a = SCORERS["fuzzing"].score("w7", example_set(), ScriptedJudge(always="yes"), "w150", seed=3)
    b = SCORERS["fuzzing"].score("w7", example_set(), ScriptedJudge(always="yes"), "w150", seed=3)
    assert a == b
    noisy = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0])
    margins = np.linspace(0, 1, 10)
    assert bootstrap_ci(auc, noisy, margins, 500, 1) == bootstrap_ci(auc, noisy, margins, 500, 1)
    assert bootstrap_ci(auc, noisy, margins, 500, 1) != bootstrap_ci(auc, noisy, margins, 500, 2)
    lo, hi = bootstrap_ci(auc, noisy, margins, 500, 1)
    assert lo <= auc(noisy, margins) <= hi
    assert bootstrap_ci(auc, noisy, margins, 0, 1) == (None, None)


def test_metrics():
    labels = np.array([1, 1, 0, 0, 0])
    assert auc(labels, np.array([0.9, 0.1, 0.5, 0.2, 0.0])) == pytest.approx(4 / 6)
    assert auc(labels, np.zeros(5)) == 0.5
    assert balanced_accuracy(labels, np.array([1, 0, 0, 0, 1])) == pytest.approx((0.5 + 2 / 3) / 2)
    assert balanced_accuracy(labels, np.ones(5)) == 0.5
    with pytest.raises(DataError, match="both"):
        auc(np.ones(3), np.zeros(3))


def test_scorers_refuse_sets_without_both_classes_and_blank_labels():
    only_active = example_set()
    only_active.random, only_active.hard = [], []
    for name in ("detection", "embedding", "surprisal"):
        with pytest.raises(DataError, match="non-activating"):
            SCORERS[name].score("w7", only_active, ScriptedJudge(), "w150")
    with pytest.raises(DataError, match="non-blank"):
        SCORERS["detection"].score(" ", example_set(), ScriptedJudge(), "w150")
    with pytest.raises(DataError, match="unknown scorer"):
        get_scorer("intruder")
    assert flagged(0.6, 0.5, 0.45) and not flagged(0.6, 0.5, 0.55)


def test_parse_label_and_prompt():
    assert parse_label('Explanation: "the word cat".') == "the word cat"
    assert parse_label("\n**Label:** numbers in lists\nmore text") == "numbers in lists"
    assert parse_label("- Feature: `w7 tokens`") == "w7 tokens"
    assert parse_label("<<The feature>> fires on <<cat>>") == "The feature fires on cat"
    with pytest.raises(DataError):
        parse_label("<<*>>\n\n<<*>>")
    long = parse_label("word " * 100, max_chars=30)
    assert len(long) <= 30 and long.endswith("word")
    for junk in ("", "   \n ", '"..."', "**"):
        with pytest.raises(DataError, match="holds no label"):
            parse_label(junk)
    chat = build_prompt([ex(["w1", "w7"])], show_values=True)
    assert chat[0]["role"] == "system" and "Example 1: w1 <<w7>>\nActivations: w7 (1.5)" in chat[1]["content"]


def test_explainer_samples_are_seeded_and_carry_provenance():
    judge = ScriptedJudge(labels=["Label: w7 tokens", "...", "w8 tokens"])
    examples = [ex(["w1", "w7"], context=5), ex(["w7"], context=6)]
    results = Explainer(judge, max_new_tokens=9).explain(examples, n=3, seed=0)
    assert [r.text for r in results] == ["w7 tokens", None, "w8 tokens"]
    assert "holds no label" in results[1].error and results[1].raw == "..."
    source = results[2].source
    assert source["prompt_version"] == PROMPT_VERSION and source["seed"] == 2 and source["sample"] == 2
    assert source["example_ids"] == [[5, 3], [6, 3]] and source["explainer"] == {
        "kind": "scripted",
        "always": None,
    }
    assert source["settings"]["temperature"] == 0.7 and source["settings"]["max_new_tokens"] == 9
    assert [c[3] for c in judge.calls] == [0, 1, 2]
    greedy = Explainer(judge).explain(examples)
    assert greedy[0].source["settings"]["temperature"] == 0.0
    with pytest.raises(DataError, match="temperature above 0"):
        Explainer(judge, temperature=0.0).explain(examples, n=2)


def test_the_real_local_client_runs_every_scorer():
    tokenizer = make_tokenizer()
    model = make_model("llama", n_layers=2, hidden=32, seed=3, initializer_range=0.3)
    from saelab.core.models import HookedLM

    client = LocalClient(lm=HookedLM(model, tokenizer, name="tiny"), batch_size=4)
    for name, scorer in SCORERS.items():
        a = scorer.score("w7", example_set(), client, "w150", seed=1, n_bootstrap=100)
        b = scorer.score("w7", example_set(), client, "w150", seed=1, n_bootstrap=100)
        assert a == b, name
        assert 0 <= a.score <= 1 and 0 <= a.shuffled <= 1 and a.chance == 0.5
        assert a.ci_low <= a.score <= a.ci_high
        assert a.details["judge"]["kind"] == "local"
        margins = [item[2] for item in a.details["items"]]
        if scorer.metric == "auc":
            assert len(set(margins)) > 1, name  # a real model's margins vary by item
        else:  # the word-level test vocabulary has no "Yes" or "No" (both <unk>): a constant judge
            assert set(margins) == {0.0} and a.score == a.shuffled == a.chance, name


class EchoLocalClient(LocalClient):
    """The local client's logprobs as they were before batching: one echo pass per prompt + candidate."""

    def logprobs(self, prompts, candidates):
        from saelab.explain.clients import candidate_logprob

        texts = [p + c for p in prompts for c in candidates]
        scores = self.score_tokens(texts)
        flat = [
            candidate_logprob(s, len(p), len(t), "echo")
            for s, p, t in zip(scores, [p for p in prompts for _ in candidates], texts, strict=True)
        ]
        n = len(candidates)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def test_batched_judge_calls_give_the_unbatched_scores():
    from saelab.core.models import HookedLM

    lm = HookedLM(make_model("llama", n_layers=2, hidden=32, seed=3, initializer_range=0.3),
                  make_tokenizer(), name="tiny")  # fmt: skip
    fast, echo = LocalClient(lm=lm, batch_size=4), EchoLocalClient(lm=lm, batch_size=1)
    for name, scorer in SCORERS.items():
        a = scorer.score("w7", example_set(), fast, "w150", seed=1, n_bootstrap=100)
        b = scorer.score("w7", example_set(), echo, "w150", seed=1, n_bootstrap=100)
        assert a.score == pytest.approx(b.score, abs=1e-4) and a.shuffled == pytest.approx(
            b.shuffled, abs=1e-4
        )
        for x, y in zip(a.details["items"], b.details["items"], strict=True):
            assert x[:2] == y[:2] and x[2:] == pytest.approx(y[2:], abs=1e-4), name
