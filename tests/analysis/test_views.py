"""saelab.analysis.views: store rows as the display objects that the API, the exports and the pages share."""

from __future__ import annotations

import math

import pytest

from saelab.analysis.views import (
    PREVIEW_CHARS,
    DisplayContext,
    Histogram,
    LogitHistogram,
    hist_bins,
    preview_text,
    token_text,
)
from tests.stores import EDGES, FEATURES, VOCAB, explain_tiny_store, write_tiny_store


@pytest.fixture
def tiny(tmp_path):
    with write_tiny_store(tmp_path / "tiny.db") as store:
        yield store


def test_token_text_shows_unknown_ids_as_their_number():
    assert token_text(VOCAB, 1) == "the" and token_text(VOCAB, 3) == "a\nb"
    assert token_text(VOCAB, 99) == "<99>" and token_text(VOCAB, -1) == "<-1>"


def test_hist_bins_cover_the_nonzero_range():
    assert hist_bins([0, 2, 0, 1], EDGES) == [
        {"lo": 0.1, "hi": 1.0, "count": 2}, {"lo": 1.0, "hi": 10.0, "count": 0},
        {"lo": 10.0, "hi": None, "count": 1},
    ]  # fmt: skip
    assert hist_bins([3, 0, 0, 0], EDGES) == [{"lo": 0.0, "hi": 0.1, "count": 3}]
    assert hist_bins([0, 0, 0, 0], EDGES) == [] and hist_bins([], EDGES) == []


def test_histogram_bar_centres_are_geometric():
    h = Histogram.of([1, 2, 0, 4], EDGES)
    assert h.bar_heights == [1, 2, 0, 4]
    assert h.bar_centres == [0.05, math.sqrt(0.1), math.sqrt(10.0), math.sqrt(200.0)]
    assert [(b.lo, b.hi, b.count) for b in h.bars] == [
        (0.0, 0.1, 1),
        (0.1, 1.0, 2),
        (1.0, 10.0, 0),
        (10.0, None, 4),
    ]
    assert h.api() == {"edges": EDGES, "counts": [1, 2, 0, 4], "bins": hist_bins([1, 2, 0, 4], EDGES)}


def test_logit_histogram_bars_span_min_to_max():
    h = LogitHistogram.of({"min": -1.0, "max": 1.0, "counts": [1, 0, 3, 1]})
    assert h.bar_centres == [-0.75, -0.25, 0.25, 0.75]
    assert [(b.lo, b.hi, b.count) for b in h.bars] == [
        (-1.0, -0.5, 1),
        (-0.5, 0.0, 0),
        (0.0, 0.5, 3),
        (0.5, 1.0, 1),
    ]
    empty = LogitHistogram.of(None)
    assert empty.counts == [] and empty.bar_centres == [] and empty.bars == []


def test_windows_drop_padding_and_index_the_activating_token(tiny):
    context = DisplayContext.of(tiny)
    assert context.window_left == 2 and context.vocab == VOCAB and context.hist_edges == EDGES
    first, second = context.windows(tiny, 0, "top")
    assert [t.text for t in first.tokens] == ["cat", "a\nb", "<i>"] and first.center == 0 == first.peak
    assert [t.value for t in first.tokens] == [2.0, 0, 1.0]  # as stored: a zero may be an int
    assert [t.id for t in second.tokens] == [1, 4, 3] and second.center == 2 and second.peak == 1
    assert second.scale == 1.75 and second.alpha(1.75) == 1.0 and second.alpha(-1.0) == 0.0
    assert first.api() == {
        "rank": 0, "quantile": None, "value": 2.0, "context_id": 4, "position": 0, "center": 0,
        "tokens": [{"id": 2, "text": "cat", "value": 2.0}, {"id": 3, "text": "a\nb", "value": 0},
                   {"id": 4, "text": "<i>", "value": 1.0}],
    }  # fmt: skip
    (q,) = context.windows(tiny, 0, "quantile")
    assert q.quantile == 0 and q.center == 2


def test_feature_view_carries_token_text_and_the_api_shape(tiny):
    context = DisplayContext.of(tiny)
    page = context.page(tiny, 0)
    f = page.feature
    assert [(e.token_id, e.token, e.value) for e in f.logits_pos] == [(1, "the", 0.5), (99, "<99>", 0.25)]
    assert [(n.idx, n.cosine) for n in f.neighbours] == [(1, 0.5), (2, 0.25)]
    assert [(c.idx, c.count) for c in f.coactivation] == [(1, 4)] and not f.dead
    assert len(page.top) == 2 and len(page.quantile) == 1 and page.examples == page.top + page.quantile
    api = f.api()
    assert list(api) == ["idx", "density", "mean_act", "max_act", "n_active", "dead", "explanation",
                         "quantile_edges", "hist", "logits_pos", "logits_neg", "logit_hist", "neighbours",
                         "coactivation", "explanations", "dreams"]  # fmt: skip
    assert api["logits_neg"] == [{"token_id": 2, "token": "cat", "value": -0.5}]
    assert (
        api["hist"]["bins"] == hist_bins([0, 2, 1, 0], EDGES)
        and api["logit_hist"] == FEATURES[0]["logit_hist"]
    )
    dead = context.page(tiny, 2).feature
    assert (
        dead.dead
        and dead.hist.bins == []
        and dead.logit_histogram.bars == []
        and dead.api()["logit_hist"] is None
    )
    assert context.page(tiny, 3) is None


def test_context_takes_a_vocabulary_already_read(tiny):
    assert DisplayContext.of(tiny, vocab=["x"]).token_text(0) == "x"


def test_preview_is_one_bounded_line_without_padding():
    assert preview_text(VOCAB, [-1, 1, 3, -1, 9]) == "thea↵b<9>"
    assert preview_text(VOCAB, None) == "" and preview_text(VOCAB, [-1, -1]) == ""
    long = preview_text(["word "], [0] * 100)
    assert len(long) == PREVIEW_CHARS and long.endswith("…") and long.startswith("word word")
    assert preview_text(["x\r\ny"], [0], max_chars=10) == "x↵y"


def test_explanations_and_list_rows_as_views(tiny):
    ids = explain_tiny_store(tiny)
    context = DisplayContext.of(tiny)
    f = context.page(tiny, 0).feature
    assert [e.id for e in f.explanations] == [
        ids["auto0"],
        ids["self0"],
        ids["human0"],
    ] and f.best.kind == "auto"
    assert f.explanation == "cats & <dogs>"  # the label stays the human one
    auto, own, human = f.api()["explanations"]
    assert list(auto) == ["id", "kind", "text", "source", "created", "scores"]
    assert auto["source"]["explainer_model"] == "tiny-explainer" and auto["source"]["example_ids"] == [
        [4, 0],
        [1, 5],
    ]
    assert auto["scores"] == {
        "detection": {"score": 0.9, "chance": 0.5, "shuffled": 0.55, "ci_low": 0.8, "ci_high": 0.97, "n": 40,
                      "flagged": False},
        "fuzzing": {"score": 0.7, "chance": 0.5, "shuffled": 0.6, "ci_low": None, "ci_high": None, "n": 40,
                    "flagged": False},
    }  # fmt: skip
    assert own["scores"]["detection"]["flagged"] is True and human["scores"] == {}
    assert f.best.detection.details == {"scorer_model": "tiny-judge"}  # kept for the exports, not the API

    rows = [context.summary(r).api() for r in tiny.list_features("score", True, 0, 10)]
    assert [r["idx"] for r in rows] == [0, 1, 2]
    assert list(rows[0]) == ["idx", "density", "mean_act", "max_act", "n_active", "explanation", "score", "best",
                             "preview"]  # fmt: skip
    assert rows[0]["best"] == {
        "id": ids["auto0"], "kind": "auto", "text": "the word cat",
        "detection": auto["scores"]["detection"],
    }  # fmt: skip
    assert (
        rows[0]["score"] == 0.9
        and rows[0]["preview"] == "cata↵b<i>"
        and rows[0]["explanation"] == "cats & <dogs>"
    )
    assert rows[1]["best"]["detection"]["flagged"] is True  # its interval reaches down to the shuffled score
    assert rows[2] == {**rows[2], "score": None, "best": None, "explanation": None, "preview": ""}


def test_dreams_are_views_against_the_dataset_maximum(tiny):
    max_act = tiny.feature(0)["max_act"]
    tiny.set_dreams(0, [
        {"token_ids": [1, 2], "text": "thecat", "activation": 2 * max_act, "cross_entropy": 6.0, "lam": 0.1},
        {"token_ids": [3, 99], "text": "", "activation": max_act / 2, "cross_entropy": 3.5, "lam": 10.0},
    ], run_key="r", source={"seed": 0})  # fmt: skip
    tiny.set_dreams(2, [{"token_ids": [1], "text": "the", "activation": 0.5, "cross_entropy": 4.0, "lam": None}],
                    run_key="r")  # fmt: skip
    context = DisplayContext.of(tiny)
    f = context.page(tiny, 0).feature
    assert [(d.tokens, d.of_max, d.lam) for d in f.dreams] == [
        (["a\nb", "<99>"], 0.5, 10.0),
        (["the", "cat"], 2.0, 0.1),
    ]
    assert f.dreams[1].text == "thecat"
    api = f.api()["dreams"]
    assert api[0] == {"id": api[0]["id"], "text": "a\nb<99>", "tokens": ["a\nb", "<99>"], "activation": max_act / 2,
                      "cross_entropy": 3.5, "lam": 10.0, "of_max": 0.5, "run_key": "r"}  # fmt: skip
    (dead,) = context.page(tiny, 2).feature.dreams  # a latent that never fired has no share of a maximum
    assert dead.of_max is None
