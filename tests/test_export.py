"""Exports: Neuronpedia-style JSON agrees with the store; the static HTML is self-contained."""

from __future__ import annotations

import json
import re

import pytest

from saelab.analysis.store import FeatureStore
from saelab.errors import SaelabError
from saelab.export import export_html, export_neuronpedia
from tests.test_cli import run
from tests.test_server import setup  # noqa: F401 (the tiny analysed store, as a fixture)

NEURONPEDIA_FIELDS = {
    "modelId", "layer", "index", "maxActApprox", "frac_nonzero", "pos_str", "pos_values", "neg_str", "neg_values",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "topkCosSimIndices", "topkCosSimValues", "activations",
}  # fmt: skip


@pytest.fixture(scope="module")
def alive(setup):  # noqa: F811
    with FeatureStore(setup[2], create=False) as store:
        return [row["idx"] for row in store.list_features("density", True, 0, 3)]


def test_neuronpedia_json_matches_the_store(setup, alive, tmp_path):  # noqa: F811
    path = setup[2]
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


def test_html_is_self_contained_and_works_from_a_file_url(setup, alive, tmp_path):  # noqa: F811
    out = export_html(setup[2], tmp_path / "dash.html", alive)
    text = out.read_text()
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:)?//", text)
    for idx in alive:
        assert f'id="feature-{idx}"' in text
    assert 'class="tok center"' in text and "<svg" in text
    from tests.test_browser import CHROMIUM, sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(out.as_uri())
        assert page.locator("section.feature").count() == len(alive)
        assert page.locator("span.tok[style*='background']").count() > 0
        browser.close()


def test_unknown_features_are_refused(setup, tmp_path):  # noqa: F811
    with pytest.raises(SaelabError, match="do not exist"):
        export_neuronpedia(setup[2], tmp_path, [10**6])


def test_export_command(setup, tmp_path):  # noqa: F811
    code, out, err = run("export", setup[2], "--html", tmp_path / "d.html", "--neuronpedia", tmp_path / "np")
    assert code == 0, err
    assert (tmp_path / "d.html").is_file() and any((tmp_path / "np").glob("*.json"))
    code, _, err = run("export", setup[2])
    assert code == 2 and "nothing to export" in err
    code, _, err = run("export", tmp_path / "missing.db", "--html", tmp_path / "x.html")
    assert code == 2 and "saelab analyze" in err
