"""Exports of an analysed dictionary: Neuronpedia-style feature JSON and a self-contained HTML dashboard.

Both read only the feature store and build from the same view objects as the web app's API
(`saelab.analysis.views`). The dashboard is rendered with the web app's own Jinja templates (the feature
page's parts, server-side), with its stylesheet inlined and no script, so it works from a file:// URL
with no server and no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from saelab.analysis.store import FeatureStore
from saelab.analysis.views import DisplayContext, ExampleWindow, Explanation, FeaturePage
from saelab.core.fileio import atomic_write_json, atomic_write_text
from saelab.errors import SaelabError

WEB = Path(__file__).parent / "server"  # the web app's templates and stylesheet, read as files


def _activation_record(window: ExampleWindow) -> dict:
    """One example as Neuronpedia's activation object (padding dropped)."""
    values = [float(t.value) for t in window.tokens]
    return {
        "tokens": [t.text for t in window.tokens],
        "values": values,
        "maxValue": max(values) if values else 0.0,
        "maxValueTokenIndex": window.peak,
    }


def _first(mapping: dict | None, *keys: str) -> str | None:
    """The first of `keys` that `mapping` holds (a dotted key reads a nested dict), as text."""
    for key in keys:
        value = mapping
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value:
            return str(value)
    return None


def _neuronpedia_explanation(e: Explanation) -> dict:
    """One explanation in the field names of Neuronpedia's Explanation and ExplanationScore records
    (hijohnnylin/neuronpedia, its Prisma schema: description, typeName, explanationModelName, scores of
    value / explanationScoreTypeName / explanationScoreModelName / jsonDetails as a JSON string).

    typeName is "saelab_" + the source's "method" if given, else "saelab_<kind>"; explanationModelName is
    the source's "explainer_model", "model" or "explainer.model" (what `saelab explain` records), None for
    a human label; a score's model is its details' "scorer_model", "model" or "judge.model". Both
    controls, the interval, n and the flag go in jsonDetails."""
    scores = []
    for name, s in e.scores.items():
        details = {"chance": s.chance, "shuffled": s.shuffled, "ci_low": s.ci_low, "ci_high": s.ci_high,
                   "n": s.n, "flagged": s.flagged}  # fmt: skip
        scores.append({
            "value": s.score, "explanationScoreTypeName": name,
            "explanationScoreModelName": _first(s.details, "scorer_model", "model", "judge.model"),
            "jsonDetails": json.dumps(details),
        })  # fmt: skip
    return {
        "description": e.text,
        "typeName": f"saelab_{_first(e.source, 'method') or e.kind}",
        "explanationModelName": None
        if e.kind == "human"
        else _first(e.source, "explainer_model", "model", "explainer.model"),
        "scores": scores,
    }


def neuronpedia_record(page: FeaturePage, model_id: str, layer: str) -> dict:
    """One latent's view in Neuronpedia's feature JSON shape (field names as its exports use them)."""
    f = page.feature
    logit_hist = f.logit_histogram
    return {
        "modelId": model_id,
        "layer": layer,
        "index": str(f.idx),
        "maxActApprox": f.max_act,
        "frac_nonzero": f.density,
        "pos_str": [e.token for e in f.logits_pos],
        "pos_values": [e.value for e in f.logits_pos],
        "neg_str": [e.token for e in f.logits_neg],
        "neg_values": [e.value for e in f.logits_neg],
        "freq_hist_data_bar_heights": f.hist.bar_heights,
        "freq_hist_data_bar_values": f.hist.bar_centres,
        "logits_hist_data_bar_heights": logit_hist.counts,
        "logits_hist_data_bar_values": logit_hist.bar_centres,
        "topkCosSimIndices": [n.idx for n in f.neighbours],
        "topkCosSimValues": [n.cosine for n in f.neighbours],
        "explanations": [_neuronpedia_explanation(e) for e in f.explanations],
        "activations": [_activation_record(w) for w in page.examples],
        # saelab's extra (a key Neuronpedia ignores): a crosscoder latent's member models and diff
        **({"saelab_crosscoder": {"members": [m.api() for m in f.members], "diff": f.diff and f.diff.api()}}
           if f.members else {}),
    }  # fmt: skip


def _page(store: FeatureStore, context: DisplayContext, idx: int) -> FeaturePage:
    page = context.page(store, idx)
    if page is None:
        raise KeyError(f"feature {idx} does not exist in {store.path}")
    return page


def neuronpedia_feature(
    store: FeatureStore, idx: int, model_id: str, layer: str, vocab: list[str] | None = None
) -> dict:
    """One latent in Neuronpedia's feature JSON shape (field names as its exports use them).

    Pass `vocab` (store.vocab()) when exporting many latents: it is the largest table to read.
    """
    return neuronpedia_record(_page(store, DisplayContext.of(store, vocab), idx), model_id, layer)


def _layer_name(meta: dict) -> str:
    return str(meta.get("hook_name", "hook"))


def _model_id(meta: dict) -> str:
    model = meta.get("model") or {}
    name = model.get("name") if isinstance(model, dict) else model
    return str(name or "model").split("/")[-1].lower()


def export_neuronpedia(
    store_path: str | Path, out_dir: str | Path, features: list[int] | None = None
) -> list[Path]:
    """One `<index>.json` per latent (default: every latent that fires) into out_dir."""
    out_dir = Path(out_dir)
    written = []
    with FeatureStore(store_path, create=False) as store:
        meta, context = store.meta(), DisplayContext.of(store)
        for idx in _chosen(store, features):
            path = out_dir / f"{idx}.json"
            atomic_write_json(
                path, neuronpedia_record(_page(store, context, idx), _model_id(meta), _layer_name(meta))
            )
            written.append(path)
    return written


def _chosen(store: FeatureStore, features: list[int] | None) -> list[int]:
    if features is not None:
        n = store.count_features(include_dead=True)
        bad = [i for i in features if not 0 <= i < n]
        if bad:
            raise SaelabError(f"features {bad} do not exist; this dictionary has {n} latents (0-{n - 1}).")
        return list(features)
    return [row["idx"] for row in store.list_features("idx", False, 0, 10**9)]


def _templates() -> jinja2.Environment:
    """The web app's templates, configured as the app configures them (HTML autoescaped)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(WEB / "templates"), autoescape=jinja2.select_autoescape()
    )


def export_html(store_path: str | Path, out_path: str | Path, features: list[int]) -> Path:
    """A single self-contained HTML dashboard of the chosen features."""
    out_path = Path(out_path)
    with FeatureStore(store_path, create=False) as store:
        meta, context = store.meta(), DisplayContext.of(store)
        chosen = _chosen(store, features)
        views = [_page(store, context, idx) for idx in chosen]
    page = (
        _templates()
        .get_template("export.html")
        .render(
            title=f"saelab features: {_model_id(meta)} {_layer_name(meta)}",
            views=views,
            exported=set(chosen),
            css=(WEB / "static" / "style.css").read_text(),
        )
    )
    atomic_write_text(out_path, page + "\n")
    return out_path
