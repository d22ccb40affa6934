"""Exports of an analysed dictionary: Neuronpedia-style feature JSON and a self-contained HTML dashboard.

Both read only the feature store. The HTML file embeds its CSS and draws everything server-side
(coloured tokens with hover values, inline SVG histograms), so it works from a file:// URL with no
server and no JavaScript.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from saelab.analysis.features import hist_bins
from saelab.analysis.store import FeatureStore
from saelab.core.fileio import atomic_write_json, atomic_write_text

BAR_COUNT = 40  # bars of the Neuronpedia-style histograms


def _token_text(vocab: list[str], token_id: int) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


def _activation_record(example: dict, vocab: list[str]) -> dict:
    """One example as Neuronpedia's activation object (padding dropped)."""
    pairs = [(t, v) for t, v in zip(example["tokens"], example["values"], strict=True) if t >= 0]
    values = [float(v) for _, v in pairs]
    top = max(range(len(values)), key=values.__getitem__) if values else 0
    return {
        "tokens": [_token_text(vocab, t) for t, _ in pairs],
        "values": values,
        "maxValue": max(values) if values else 0.0,
        "maxValueTokenIndex": top,
    }


def _log_hist_bars(counts: list[int], edges: list[float]) -> tuple[list[int], list[float]]:
    """The nonzero range of the shared log histogram as bar heights and (geometric) bar centres."""
    heights, centres = [], []
    for b in hist_bins(counts, edges):
        hi = b["hi"] if b["hi"] is not None else b["lo"] * 2
        heights.append(int(b["count"]))
        centres.append(math.sqrt(b["lo"] * hi) if b["lo"] > 0 else hi / 2)
    return heights, centres


def neuronpedia_feature(
    store: FeatureStore, idx: int, model_id: str, layer: str, vocab: list[str] | None = None
) -> dict:
    """One latent in Neuronpedia's feature JSON shape (field names as its exports use them).

    Pass `vocab` (store.vocab()) when exporting many latents: it is the largest table to read.
    """
    feature = store.feature(idx)
    if feature is None:
        raise KeyError(f"feature {idx} does not exist in {store.path}")
    vocab = vocab if vocab is not None else store.vocab()
    edges = store.meta().get("hist_edges") or []
    heights, centres = _log_hist_bars(feature.get("hist") or [], edges)
    logit_hist = feature.get("logit_hist") or {"min": 0.0, "max": 0.0, "counts": []}
    n_bins = len(logit_hist["counts"])
    width = (logit_hist["max"] - logit_hist["min"]) / max(n_bins, 1)
    examples = store.examples(idx, "top") + store.examples(idx, "quantile")
    return {
        "modelId": model_id,
        "layer": layer,
        "index": str(idx),
        "maxActApprox": feature["max_act"],
        "frac_nonzero": feature["density"],
        "pos_str": [_token_text(vocab, t) for t, _ in feature.get("logits_pos") or []],
        "pos_values": [v for _, v in feature.get("logits_pos") or []],
        "neg_str": [_token_text(vocab, t) for t, _ in feature.get("logits_neg") or []],
        "neg_values": [v for _, v in feature.get("logits_neg") or []],
        "freq_hist_data_bar_heights": heights,
        "freq_hist_data_bar_values": centres,
        "logits_hist_data_bar_heights": logit_hist["counts"],
        "logits_hist_data_bar_values": [logit_hist["min"] + (i + 0.5) * width for i in range(n_bins)],
        "topkCosSimIndices": [o for o, _ in feature.get("neighbours") or []],
        "topkCosSimValues": [c for _, c in feature.get("neighbours") or []],
        "explanations": [{"description": feature["explanation"]}] if feature.get("explanation") else [],
        "activations": [_activation_record(e, vocab) for e in examples],
    }


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
        meta, vocab = store.meta(), store.vocab()
        for idx in _chosen(store, features):
            path = out_dir / f"{idx}.json"
            atomic_write_json(
                path, neuronpedia_feature(store, idx, _model_id(meta), _layer_name(meta), vocab)
            )
            written.append(path)
    return written


def _chosen(store: FeatureStore, features: list[int] | None) -> list[int]:
    if features is not None:
        n = store.count_features(include_dead=True)
        bad = [i for i in features if not 0 <= i < n]
        if bad:
            from saelab.errors import SaelabError

            raise SaelabError(f"features {bad} do not exist; this dictionary has {n} latents (0-{n - 1}).")
        return list(features)
    return [row["idx"] for row in store.list_features("idx", False, 0, 10**9)]


# ---- static HTML --------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1a1a1a;background:#fafafa}
section.feature{border-top:2px solid #ccc;padding-top:1em;margin-top:2em}
.stats span{margin-right:1.5em}.muted{color:#777}
.tok{white-space:pre;border-radius:2px;padding:0 1px}.center{outline:1px solid #c50}
.example{font-family:ui-monospace,monospace;font-size:13px;margin:2px 0}
table{border-collapse:collapse;margin-right:2em}td{padding:1px 8px;font-family:ui-monospace,monospace}
.row{display:flex;flex-wrap:wrap;gap:1em}svg rect{fill:#e07b2a}
"""


def _svg_bars(heights: list[float], label_lo: str, label_hi: str, width: int = 360, height: int = 110) -> str:
    if not heights:
        return '<p class="muted">no data</p>'
    top = max(heights) or 1
    bar = width / len(heights)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - h / top * height:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{h / top * height:.1f}"><title>{h:g}</title></rect>'
        for i, h in enumerate(heights)
    )
    return (
        f'<svg width="{width}" height="{height + 16}" role="img">{rects}'
        f'<text x="0" y="{height + 13}" font-size="10">{html.escape(label_lo)}</text>'
        f'<text x="{width}" y="{height + 13}" font-size="10" text-anchor="end">{html.escape(label_hi)}</text></svg>'
    )


def _tokens_html(record: dict) -> str:
    top = record["maxValue"] or 1.0
    spans = []
    for i, (text, value) in enumerate(zip(record["tokens"], record["values"], strict=True)):
        alpha = max(0.0, min(1.0, value / top))
        style = f' style="background:rgba(255,110,0,{alpha:.3f})"' if alpha > 0 else ""
        cls = "tok center" if i == record["maxValueTokenIndex"] and value > 0 else "tok"
        shown = html.escape(text.replace("\n", "\u21b5"))
        spans.append(f'<span class="{cls}"{style} title="{value:.4g}">{shown}</span>')
    return "".join(spans)


def _logit_table(words: list[str], values: list[float]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(repr(w))}</td><td>{v:+.3f}</td></tr>"
        for w, v in zip(words, values, strict=True)
    )
    return f"<table>{rows}</table>"


def _feature_html(data: dict, exported: set[int]) -> str:
    idx = data["index"]
    expl = data["explanations"][0]["description"] if data["explanations"] else None
    neighbours = " ".join(
        (f'<a href="#feature-{o}">#{o}</a>' if o in exported else f"#{o}")
        + f' <span class="muted">{c:.3f}</span>'
        for o, c in zip(data["topkCosSimIndices"], data["topkCosSimValues"], strict=True)
    )
    examples = "".join(f'<div class="example">{_tokens_html(a)}</div>' for a in data["activations"])
    freq = data["freq_hist_data_bar_values"]
    logit_values = data["logits_hist_data_bar_values"]
    return f"""
<section class="feature" id="feature-{idx}">
<h2>Feature {idx}</h2>
<p class="stats"><span>density {data["frac_nonzero"]:.4g}</span><span>max activation {data["maxActApprox"]:.4g}</span></p>
<p>Explanation: {html.escape(expl) if expl else '<span class="muted">none</span>'}</p>
<div class="row">
<div><h3>Activation histogram</h3>{_svg_bars(data["freq_hist_data_bar_heights"], f"{freq[0]:.3g}" if freq else "", f"{freq[-1]:.3g}" if freq else "")}</div>
<div><h3>Logit effects over the vocabulary</h3>{_svg_bars(data["logits_hist_data_bar_heights"], f"{logit_values[0]:.3g}" if logit_values else "", f"{logit_values[-1]:.3g}" if logit_values else "")}</div>
</div>
<div class="row">
<div><h3>Promoted tokens</h3>{_logit_table(data["pos_str"], data["pos_values"])}</div>
<div><h3>Suppressed tokens</h3>{_logit_table(data["neg_str"], data["neg_values"])}</div>
<div><h3>Nearest latents</h3><p>{neighbours}</p></div>
</div>
<h3>Examples (top, then quantile samples)</h3>{examples}
</section>"""


def export_html(store_path: str | Path, out_path: str | Path, features: list[int]) -> Path:
    """A single self-contained HTML dashboard of the chosen features."""
    out_path = Path(out_path)
    with FeatureStore(store_path, create=False) as store:
        meta, vocab = store.meta(), store.vocab()
        chosen = _chosen(store, features)
        sections = [
            _feature_html(
                neuronpedia_feature(store, idx, _model_id(meta), _layer_name(meta), vocab), set(chosen)
            )
            for idx in chosen
        ]
    title = f"saelab features: {_model_id(meta)} {_layer_name(meta)}"
    index = " ".join(f'<a href="#feature-{i}">#{i}</a>' for i in chosen)
    page = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{index}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    atomic_write_text(out_path, page)
    return out_path
