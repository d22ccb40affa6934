"""Self-explanation on tiny random models: the injection (only the placeholder positions, only at the
injection layer, only over the prompt), scales in units of the measured norm, a deterministic sweep,
per-row seeded samples, the choice rule on hand-made points, bad input, and one run on the real model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from saelab.core.data import exclusion_mask
from saelab.core.models import HookedLM
from saelab.errors import DataError, DimensionMismatchError
from saelab.explain.explainer import ExplanationResult
from saelab.explain.selfexplain import (
    RULES,
    ScalePoint,
    SelfExplainConfig,
    SelfExplainer,
    SelfTemplate,
    build_prompt,
    default_layer,
    parse_self_label,
    typical_residual_norm,
)
from tests.helpers import SPECIAL, make_docs, make_model, make_tokenizer, write_corpus

CHAT = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)
TEMPLATE = SelfTemplate(user='w10 w11 " X " w12', prefill=' w13 " X " w14 "', system="w15 w16")
SMALL = dict(template=TEMPLATE, scales=(0.5, 1.0, 2.0, 4.0), max_new_tokens=5, n_samples=2)


def tiny_lm(kind="llama", chat=True):
    tokenizer = make_tokenizer()
    if chat:
        tokenizer.chat_template = CHAT
    return HookedLM(make_model(kind, n_layers=3), tokenizer)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def explainer(lm):
    return SelfExplainer(lm, SelfExplainConfig(**SMALL), norm=2.5)


def direction(seed=0, d=32):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def test_prompt_finds_every_placeholder_token_in_the_chat(lm, explainer):
    ids, positions = build_prompt(lm.tokenizer, TEMPLATE)
    tok = lm.tokenizer
    words = tok.convert_ids_to_tokens(ids)  # the quotes and X are not in the word-level vocabulary
    assert " ".join(words) == "w1 w15 w16 w2 w1 w10 w11 Q Q Q w12 w2 w3 w13 Q Q Q w14 Q".replace("Q", "<unk>")
    assert positions == [8, 15]
    assert (explainer.ids, explainer.positions) == (ids, positions)
    assert explainer.layer == default_layer(3) == 1 and explainer.hook == "blocks.1.hook_resid_pre"
    assert explainer.probe_hook == "blocks.2.hook_resid_post"
    # Without a chat template: "role: content" turns, placeholders still found.
    plain = tiny_lm(chat=False)
    ids, positions = build_prompt(plain.tokenizer, SelfTemplate(user="w5 X w6", prefill="w7 X"))
    assert len(positions) == 2 and all(ids[p] == SPECIAL["<unk>"] for p in positions)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_injection_replaces_only_the_placeholder_positions_at_the_layer(kind):
    lm = tiny_lm(kind)
    ex = SelfExplainer(lm, SelfExplainConfig(**SMALL), norm=1.0)
    ids = torch.tensor([ex.ids] * 2)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    earlier, later = "blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"
    clean = lm.capture(ids, [earlier, ex.hook, later])
    with ex.inject(vectors):
        got = lm.capture(ids, [earlier, ex.hook, later])
    at = torch.zeros(ids.shape[1], dtype=torch.bool)
    at[ex.positions] = True
    assert torch.equal(got[ex.hook][:, at], vectors[:, None].expand(2, 2, 32))
    assert torch.equal(got[ex.hook][:, ~at], clean[ex.hook][:, ~at])
    assert torch.equal(got[earlier], clean[earlier])  # nothing before the injection site moves
    assert not torch.allclose(got[later][:, at], clean[later][:, at])  # and the model reads it
    # The first position after the first placeholder sees it through attention, the ones before do not.
    first = ex.positions[0]
    assert torch.equal(got[later][:, :first], clean[later][:, :first])
    # A decoding step on the KV cache (one new token) is left alone.
    with ex.inject(vectors):
        step = lm.capture(ids[:, :1], ex.hook)[ex.hook]
    assert torch.equal(step, lm.capture(ids[:, :1], ex.hook)[ex.hook])


def test_typical_norm_is_the_median_over_real_tokens(lm):
    docs = make_docs(12, seed=4)
    norm = typical_residual_norm(lm, 1, docs, context_size=16)
    from saelab.core.data import iter_contexts

    ids = torch.stack(list(iter_contexts(docs, lm.tokenizer, 16)))
    acts = lm.capture(ids, "blocks.1.hook_resid_pre")["blocks.1.hook_resid_pre"].norm(dim=-1)
    keep = ~exclusion_mask(ids, lm.tokenizer)
    assert not keep[:, 0].any() and (ids[keep] != SPECIAL["<eos>"]).all()
    assert norm == pytest.approx(float(acts[keep].median()), rel=1e-6)
    assert norm != pytest.approx(float(acts.flatten().median()), rel=1e-6)  # the exclusions matter
    # Token batches give the same as the texts they were packed from.
    assert typical_residual_norm(lm, 1, [ids[:5], ids[5:]]) == pytest.approx(norm, rel=1e-6)
    assert typical_residual_norm(lm, 1, [ids], batch_size=3) == pytest.approx(norm, rel=1e-6)  # chunked
    with pytest.raises(DataError, match="no text"):
        typical_residual_norm(lm, 1, [])


@pytest.mark.parametrize(("n_docs", "split"), [(600, "eval"), (5, "all")])
def test_norm_is_measured_on_held_out_text_of_the_norm_source(lm, tmp_path, n_docs, split):
    """The norm comes from the source's held-out (eval) text, or all of it when it holds none."""
    from saelab.core.data import token_batches

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=n_docs)
    cfg = SelfExplainConfig(**SMALL, norm_source=str(corpus), norm_tokens=200)
    ex = SelfExplainer(lm, cfg)
    batches = token_batches(str(corpus), lm.tokenizer, 128, 16, split=split, max_contexts=2)
    assert ex.norm == pytest.approx(typical_residual_norm(lm, 1, batches, max_tokens=200), rel=1e-6)
    with pytest.raises(DataError):
        SelfExplainer(lm, SelfExplainConfig(**SMALL, norm_source=str(tmp_path / "missing.txt")))


def test_scales_are_in_units_of_the_measured_norm(lm):
    norm = typical_residual_norm(lm, 1, make_docs(8), context_size=16)
    ex = SelfExplainer(lm, SelfExplainConfig(**SMALL), norm=norm)
    seen = {}

    def spy(vectors):  # what the sweep injects (test_injection_... checks that inject puts it in place)
        seen["x"] = vectors.norm(dim=-1)
        return SelfExplainer.inject(ex, vectors)

    ex.inject = spy
    d = direction() * 7.0  # the direction's own length does not matter
    points = ex.sweep(d)
    expected = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0]) * norm
    assert torch.allclose(seen["x"], expected, rtol=1e-5)
    assert [p.scale for p in points] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert [p.absolute for p in points] == pytest.approx(expected.tolist())


def test_sweep_is_deterministic_and_reports_the_criteria(explainer):
    d = direction(1)
    first, again = explainer.sweep(d), explainer.sweep(d.clone())
    assert [p.to_dict() for p in first] == [p.to_dict() for p in again]
    for p in first:
        assert -1 <= p.self_similarity <= 1 and p.entropy >= 0
        assert len(p.top_ids) == len(p.top_tokens) == len(p.top_probs) == 5
        assert p.top_probs == sorted(p.top_probs, reverse=True)
    assert [p.to_dict() for p in explainer.sweep(-d)] != [p.to_dict() for p in first]


def test_same_seed_same_samples_and_each_sample_seeded_by_seed_plus_i(lm):
    ex = SelfExplainer(lm, SelfExplainConfig(**{**SMALL, "temperature": 1.5, "max_new_tokens": 6}), norm=2.5)
    d = direction(2)
    three = [r.raw for r in ex.explain(d, n=3, seed=0)]
    assert [r.raw for r in ex.explain(d, n=3, seed=0)] == three
    assert [r.raw for r in ex.explain(d, n=3, seed=10)] != three
    assert [r.raw for r in ex.explain(d, n=1, seed=0)] == three[:1]  # independent of the batch size
    assert [r.raw for r in ex.explain(d, n=1, seed=2)] == three[2:]  # sample i is seeded seed + i
    assert len(set(three)) > 1  # the rows are not one draw repeated


def test_explain_records_the_method_and_its_provenance(lm, explainer):
    d = direction(5)
    results = explainer.explain(d, seed=7)
    sweep = explainer.sweep(d)
    chosen = explainer.choose(sweep)
    assert len(results) == 2 and all(isinstance(r, ExplanationResult) for r in results)
    for i, r in enumerate(results):
        s = r.source
        assert s["method"] == "self" and s["template"] == TEMPLATE.to_dict() and s["layer"] == 1
        assert s["seed"] == 7 + i and s["sample"] == i and s["raw"] == r.raw
        assert s["scale"] == chosen.scale and s["scale_absolute"] == pytest.approx(chosen.scale * 2.5)
        assert s["chosen"] == chosen.to_dict() and s["sweep"] == [p.to_dict() for p in sweep]
        assert s["settings"] == explainer.settings() and s["settings"]["norm"] == 2.5
        assert (r.text is None) == (r.error is not None)
    assert explainer.settings()["config"] == SelfExplainConfig(**SMALL).to_dict()
    greedy = SelfExplainer(lm, SelfExplainConfig(**{**SMALL, "temperature": 0.0}), norm=2.5)
    assert greedy.explain(d, n=1)[0].raw == greedy.explain(d, n=1, seed=99)[0].raw


def point(scale, sim, ent):
    return ScalePoint(scale, scale, sim, ent, [0] * 5, [""] * 5, [0.2] * 5)


@pytest.mark.parametrize(
    ("rule", "expected"), [("composite", 2.0), ("self_similarity", 4.0), ("entropy", 1.0)]
)
def test_choice_rules_on_hand_made_points(lm, rule, expected):
    ex = SelfExplainer(lm, SelfExplainConfig(**{**SMALL, "rule": rule}), norm=1.0)
    points = [
        point(0.0, 0.9, 0.1),  # the baseline is never chosen, however good it looks
        point(1.0, 0.20, 2.0),  # lowest entropy, low similarity
        point(2.0, 0.45, 2.5),  # the compromise: sim 0.625 - entropy 0.25 (min-max normalised)
        point(4.0, 0.60, 4.0),  # highest similarity, the model unsure
        point(8.0, 0.10, 6.0),
    ]
    assert ex.choose(points).scale == expected
    assert set(RULES) == {"composite", "self_similarity", "entropy"}


def test_choice_ties_go_to_the_smaller_scale_and_needs_a_scale_above_zero(explainer):
    flat = [point(s, 0.3, 1.0) for s in (0.0, 3.0, 1.0, 2.0)]
    assert explainer.choose(flat).scale == 1.0
    with pytest.raises(DataError, match="no point"):
        explainer.choose([point(0.0, 0.3, 1.0)])
    with pytest.raises(DataError, match="no point"):
        explainer.choose([point(1.0, float("nan"), 1.0)])


def test_bad_directions_are_refused_clearly(explainer):
    with pytest.raises(DataError, match="zero"):
        explainer.explain(torch.zeros(32))
    with pytest.raises(DataError, match="NaN"):
        explainer.sweep(torch.full((32,), float("nan")))
    with pytest.raises(DataError, match="NaN or inf"):
        explainer.sweep(torch.tensor([float("inf")] + [0.0] * 31))
    with pytest.raises(DimensionMismatchError, match="width 32"):
        explainer.sweep(torch.ones(33))
    with pytest.raises(DimensionMismatchError, match="shape"):
        explainer.sweep(torch.ones(2, 32))


def test_bad_settings_are_refused_clearly(lm, explainer):
    with pytest.raises(DataError, match="no placeholder"):
        SelfTemplate(user="What does it mean?", prefill="It means")
    with pytest.raises(DataError, match="not a token of its own"):
        SelfExplainer(lm, SelfExplainConfig(template=SelfTemplate(user="w1 XX w2", prefill="w3")), norm=1.0)
    for scales in [(), (0.0,), (-1.0, 2.0), (float("nan"),)]:
        with pytest.raises(DataError, match="scale"):
            SelfExplainConfig(scales=scales)
    with pytest.raises(DataError, match="rule"):
        SelfExplainConfig(rule="best")
    with pytest.raises(DataError, match="n_samples"):
        SelfExplainConfig(n_samples=0)
    with pytest.raises(DataError, match="temperature"):
        SelfExplainConfig(temperature=-1)
    with pytest.raises(DataError, match="blocks 0-2"):
        SelfExplainer(lm, SelfExplainConfig(**{**SMALL, "layer": 3}), norm=1.0)
    with pytest.raises(DataError, match="norm"):
        SelfExplainer(lm, SelfExplainConfig(**SMALL), norm=float("nan"))
    with pytest.raises(DataError, match="whole number"):
        explainer.explain(direction(), n=0)
    greedy = SelfExplainer(lm, SelfExplainConfig(**{**SMALL, "temperature": 0}), norm=1.0)
    with pytest.raises(DataError, match="temperature above 0"):
        greedy.explain(direction(), n=2)


def test_config_round_trips_and_sorts_scales():
    cfg = SelfExplainConfig(template=TEMPLATE.to_dict(), scales=[4, 0, 1, 1])
    assert cfg.scales == (1.0, 4.0) and cfg.template == TEMPLATE
    again = SelfExplainConfig(**cfg.to_dict())
    assert again == cfg and dataclasses.asdict(again)["template"] == TEMPLATE.to_dict()


def test_labels_are_cut_at_the_closing_quote():
    quoted = SelfTemplate()
    assert parse_self_label('cat" and that is all', quoted) == "cat"
    assert parse_self_label("a small animal", quoted) == "a small animal"
    assert parse_self_label("Feline.\nMore text", SelfTemplate(prefill="X means")) == "Feline"
    with pytest.raises(DataError):
        parse_self_label('" ...', quoted)


@pytest.mark.integration
def test_real_model_names_a_word_from_its_residual():
    """The embedded model, default settings: the layer-15 residual direction of " Paris" (in a sentence of
    its own), injected at the default layer, comes back as "Paris" among the likeliest first explanation
    tokens at some scale of the sweep; explain samples at the chosen scale."""
    from saelab.core.models import load_model

    lm = load_model()
    ex = SelfExplainer(lm, SelfExplainConfig(n_samples=2, max_new_tokens=12, norm_tokens=2048))
    assert ex.layer == default_layer(30) == 1 and 20 < ex.norm < 200
    tok, hook = lm.tokenizer, "blocks.15.hook_resid_post"
    ids = tok(f"{tok.bos_token}I wrote the word Paris on the wall.", add_special_tokens=False)["input_ids"]
    (word,) = tok(" Paris", add_special_tokens=False)["input_ids"]
    residual = lm.capture(torch.tensor([ids]), hook)[hook][0, ids.index(word)]
    points = ex.sweep(residual)
    assert "Paris" in {t.strip() for p in points[1:] for t in p.top_tokens}
    assert "Paris" not in {t.strip() for t in points[0].top_tokens}  # not without the injection
    results = ex.explain(residual)
    assert len(results) == 2 and all(r.raw for r in results)
    assert results[0].source["chosen"]["scale"] in ex.cfg.scales
