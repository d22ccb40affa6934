"""Exports: Neuronpedia-style JSON agrees with the store; the static HTML is self-contained."""

from __future__ import annotations

import json
import re

import pytest
from markupsafe import escape

from saelab.analysis.store import FeatureStore
from saelab.analysis.views import hist_bins
from saelab.errors import SaelabError
from saelab.export import export_html, export_neuronpedia, neuronpedia_feature
from tests.helpers import run
from tests.stores import explain_tiny_store, write_tiny_store

NEURONPEDIA_FIELDS = {
    "modelId", "layer", "index", "maxActApprox", "frac_nonzero", "pos_str", "pos_values", "neg_str", "neg_values",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "topkCosSimIndices", "topkCosSimValues", "activations",
}  # fmt: skip


@pytest.fixture(scope="module")
def alive(analysed):
    with FeatureStore(analysed[2], create=False) as store:
        return [row["idx"] for row in store.list_features("density", True, 0, 3)]


def test_neuronpedia_json_matches_the_store(analysed, alive, tmp_path):
    path = analysed[2]
    written = export_neuronpedia(path, tmp_path, alive)
    assert [p.name for p in written] == [f"{i}.json" for i in alive]
    with FeatureStore(path, create=False) as store:
        vocab = store.vocab()
        for idx in alive:
            data = json.loads((tmp_path / f"{idx}.json").read_text())
            assert NEURONPEDIA_FIELDS <= set(data)
            feature = store.feature(idx)
            assert data["index"] == str(idx) and data["frac_nonzero"] == feature["density"]
            assert data["maxActApprox"] == feature["max_act"]
            assert data["pos_str"] == [vocab[t] for t, _ in feature["logits_pos"]]
            assert data["neg_values"] == [v for _, v in feature["logits_neg"]]
            assert sum(data["freq_hist_data_bar_heights"]) == feature["n_active"]
            assert sum(data["logits_hist_data_bar_heights"]) == len(vocab)
            top = store.examples(idx, "top")
            assert len(data["activations"]) == len(top) + len(store.examples(idx, "quantile"))
            first = data["activations"][0]
            assert len(first["tokens"]) == len(first["values"])
            assert first["maxValue"] == pytest.approx(top[0]["value"], rel=1e-3)
            assert first["values"][first["maxValueTokenIndex"]] == first["maxValue"]


def test_html_is_self_contained_and_works_from_a_file_url(analysed, alive, tmp_path):
    out = export_html(analysed[2], tmp_path / "dash.html", alive)
    text = out.read_text()
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:)?//", text)
    for idx in alive:
        assert f'id="feature-{idx}"' in text
    assert 'class="tok center"' in text and "<svg" in text
    ids = re.findall(r'id="([^"]+)"', text)
    assert len(ids) == len(set(ids))  # one page, several latents: every element id stays unique
    with FeatureStore(analysed[2], create=False) as store:
        vocab = store.vocab()
        for idx in alive:
            section = _section(text, idx)
            f = store.feature(idx)
            assert f"<dd>{f['density']:.4g}</dd>" in section and f"<dd>{f['max_act']:.4g}</dd>" in section
            assert section.count('class="bar"') == len(
                hist_bins(f["hist"], store.meta()["hist_edges"])
            ) + len(f["logit_hist"]["counts"])
            for t, v in f["logits_pos"] + f["logits_neg"]:
                assert f"<code>{escape(repr(vocab[t]))}</code></td><td>{v:+.3f}</td>" in section
            for o, c in f["neighbours"]:
                shown = (
                    f'<a href="#feature-{o}" class="feature-link" data-idx="{o}">#{o}</a>'
                    if o in alive
                    else f"#{o}"
                )
                assert f'<li>{shown}<span class="muted"> cos {c:.3f}</span></li>' in section
            windows = store.examples(idx, "top") + store.examples(idx, "quantile")
            assert section.count('<div class="example"') == len(windows)
            for w in windows:
                for t, v in zip(w["tokens"], w["values"], strict=True):
                    if t >= 0:
                        assert f'title="{v:.4g}" data-value="{v}">{escape(vocab[t])}</span>' in section
    from tests.browser import require_browser

    CHROMIUM, sync_api = require_browser()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(out.as_uri())
        assert page.locator("section.feature").count() == len(alive)
        assert page.locator("span.tok[style*='background']").count() > 0
        browser.close()


def _section(text: str, idx: int) -> str:
    start = text.index(f'<section class="feature" id="feature-{idx}">')
    end = text.find('<section class="feature"', start + 1)
    return text[start : end if end > 0 else None]


def test_html_escapes_text_and_shows_dead_latents(tmp_path):
    """Token texts with markup or newlines, unknown token ids, an explanation with markup, a dead latent."""
    path = tmp_path / "tiny.db"
    with write_tiny_store(path) as store:
        store.set_explanation(0, '<b>"cats"</b> & dogs')
    text = export_html(path, tmp_path / "tiny.html", [0, 2]).read_text()
    assert "<title>saelab features: tiny-lm blocks.0.hook_resid_post</title>" in text
    live = _section(text, 0)
    assert "&lt;b&gt;&#34;cats&#34;&lt;/b&gt; &amp; dogs" in live and "<b>" not in live
    assert ">a\u21b5b</span>" in live and ">&lt;i&gt;</span>" in live and "&#39;&lt;99&gt;&#39;" in live
    assert '<a href="#feature-2" class="feature-link" data-idx="2">#2</a>' in live  # exported: an anchor
    assert "<li>#1<span" in live  # not exported: no link to follow
    dead = _section(text, 2)
    assert dead.count('<p class="muted">no data</p>') == 2 and dead.count("no examples") == 2
    assert '<span id="explanation-2" class="muted">none</span>' in dead


def test_neuronpedia_record_of_a_hand_written_latent(tmp_path):
    with write_tiny_store(tmp_path / "tiny.db") as store:
        data = neuronpedia_feature(store, 0, "tiny-lm", "blocks.0.hook_resid_post")
        with pytest.raises(KeyError):
            neuronpedia_feature(store, 3, "tiny-lm", "blocks.0.hook_resid_post")
    assert data["pos_str"] == ["the", "<99>"] and data["neg_values"] == [-0.5]
    assert data["freq_hist_data_bar_heights"] == [2, 1]
    assert data["freq_hist_data_bar_values"] == [0.1**0.5, 10.0**0.5]
    assert data["logits_hist_data_bar_values"] == [-0.75, -0.25, 0.25, 0.75]
    assert data["topkCosSimIndices"] == [1, 2] and data["explanations"] == []
    first, second, quantile = data["activations"]
    assert first == {"tokens": ["cat", "a\nb", "<i>"], "values": [2.0, 0.0, 1.0], "maxValue": 2.0,
                     "maxValueTokenIndex": 0}  # fmt: skip
    assert all(isinstance(v, float) for v in first["values"])  # stored zeros are ints; Neuronpedia's are not
    assert second["maxValueTokenIndex"] == 1 and second["maxValue"] == 1.75
    assert quantile["values"] == [0.0, 0.0, 0.3, 0.0, 0.0] and quantile["maxValueTokenIndex"] == 2


def test_unknown_features_are_refused(analysed, tmp_path):
    with pytest.raises(SaelabError, match="do not exist"):
        export_neuronpedia(analysed[2], tmp_path, [10**6])


def test_export_command(analysed, tmp_path):
    code, out, err = run(
        "export", analysed[2], "--html", tmp_path / "d.html", "--neuronpedia", tmp_path / "np"
    )
    assert code == 0, err
    assert (tmp_path / "d.html").is_file() and any((tmp_path / "np").glob("*.json"))
    code, _, err = run("export", analysed[2])
    assert code == 2 and "nothing to export" in err
    code, _, err = run("export", tmp_path / "missing.db", "--html", tmp_path / "x.html")
    assert code == 2 and "saelab analyze" in err


def test_neuronpedia_explanations_carry_every_label_and_its_scores(tmp_path):
    """Neuronpedia's Explanation fields (description, typeName, explanationModelName) and ExplanationScore
    fields (value, explanationScoreTypeName, explanationScoreModelName, jsonDetails), best first."""
    with write_tiny_store(tmp_path / "tiny.db") as store:
        store.set_explanation(1, "only a human label")
        human_only = neuronpedia_feature(store, 1, "tiny-lm", "blocks.0.hook_resid_post")["explanations"]
        explain_tiny_store(store)
        data = neuronpedia_feature(store, 0, "tiny-lm", "blocks.0.hook_resid_post")
    assert human_only == [
        {
            "description": "only a human label",
            "typeName": "saelab_human",
            "explanationModelName": None,
            "scores": [],
        }
    ]
    auto, own, human = data["explanations"]
    assert (auto["description"], auto["typeName"], auto["explanationModelName"]) == (
        "the word cat", "saelab_auto", "tiny-explainer",
    )  # fmt: skip
    assert (own["typeName"], own["explanationModelName"]) == ("saelab_self", "tiny-lm")
    assert human == {"description": "cats & <dogs>", "typeName": "saelab_human", "explanationModelName": None,
                     "scores": []}  # fmt: skip
    detection, fuzzing = auto["scores"]
    assert {k: detection[k] for k in ("value", "explanationScoreTypeName", "explanationScoreModelName")} == {
        "value": 0.9, "explanationScoreTypeName": "detection", "explanationScoreModelName": "tiny-judge",
    }  # fmt: skip
    assert json.loads(detection["jsonDetails"]) == {
        "chance": 0.5, "shuffled": 0.55, "ci_low": 0.8, "ci_high": 0.97, "n": 40, "flagged": False,
    }  # fmt: skip
    assert fuzzing["explanationScoreTypeName"] == "fuzzing" and fuzzing["explanationScoreModelName"] is None
    assert json.loads(own["scores"][0]["jsonDetails"])["flagged"] is True


def test_html_shows_explanations_and_scores_like_the_feature_page(tmp_path):
    path = tmp_path / "tiny.db"
    with write_tiny_store(path) as store:
        ids = explain_tiny_store(store)
    text = export_html(path, tmp_path / "tiny.html", [0, 1, 2]).read_text()
    first, second, dead = _section(text, 0), _section(text, 1), _section(text, 2)
    assert 'id="explanations-0"' in first and first.count('<div class="expl-entry"') == 3
    assert first.index(f'data-id="{ids["auto0"]}"') < first.index(f'data-id="{ids["human0"]}"')
    assert "felines &lt;b&gt;" in first and "<b>" not in first
    assert first.count('class="flagged"') == 1 and second.count('class="flagged"') == 1
    assert (
        "no better than a shuffled label" in second and "<td>0.600</td><td>0.500</td><td>0.500</td>" in second
    )
    assert '<p class="muted">no explanations</p>' in dead
    assert "<script" not in text and "http://" not in text and "https://" not in text


def test_neuronpedia_model_names_come_from_what_saelab_explain_records(tmp_path):
    """`saelab explain` records the explainer and judge as describe() dicts; their model names are the
    Neuronpedia explanationModelName and explanationScoreModelName."""
    with write_tiny_store(tmp_path / "tiny.db") as store:
        e = store.add_explanation(
            0, "the word cat", "auto", {"method": "auto", "explainer": {"kind": "local", "model": "smol"}}
        )
        store.set_score(e, "detection", 0.9, 0.5, 0.55, 0.8, 0.97, 40, {"judge": {"model": "smol-judge"}})
        s = store.add_explanation(0, "cats", "self", {"method": "self", "explainer": {"model": "smol"}})
        data = neuronpedia_feature(store, 0, "smollm2", "blocks.0.hook_resid_post")
    by_text = {x["description"]: x for x in data["explanations"]}
    assert (by_text["the word cat"]["typeName"], by_text["the word cat"]["explanationModelName"]) == (
        "saelab_auto", "smol",
    )  # fmt: skip
    assert by_text["the word cat"]["scores"][0]["explanationScoreModelName"] == "smol-judge"
    assert (by_text["cats"]["typeName"], by_text["cats"]["explanationModelName"]) == ("saelab_self", "smol")
    assert s > e
