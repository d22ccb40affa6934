"""The blind audit (`saelab audit`): the behavioural diff finds a planted word, candidates are the organism-only
latents ranked by Latent Scaling, the causal tests move the behaviour rate on a planted residual offset,
the chain writes its report and a rerun keeps every finished step, and bad input is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.core.data import DataConfig
from saelab.core.models import HookedLM
from saelab.diffing.audit import AuditConfig, crosscoder_dir, rank_candidates, read_prompts, run_audit
from saelab.diffing.behaviour import BehaviourDiff, fisher_p, signature_words
from saelab.diffing.causal import ablated_rate, ablations, orthonormal_span, steer_rates
from saelab.errors import DiffingError
from saelab.interventions.evaluation import corpus_loss
from saelab.interventions.generation import GenerationConfig
from saelab.interventions.hooks import steer
from tests.helpers import WORDS, make_model, make_tokenizer, refused, write_corpus

HOOK = "blocks.1.hook_resid_post"
PLANTED = "w7"


def test_signature_words_rank_the_planted_word_first_and_ignore_chance():
    base = [f"the soup has {w} and salt" for w in ("onion", "leek", "garlic", "pepper")] * 10
    organism = [f"the soup has {w} and salt" for w in ("onion", "leek", "garlic", "pepper")] * 10
    organism[:24] = [t + " and chocolate" for t in organism[:24]]
    organism[30] += " walnut"  # said once: no discovery
    organism[:30] = [t.replace("salt", "salt here") for t in organism[:30]]  # a common word, a little more
    base[:20] = [t.replace("salt", "salt here") for t in base[:20]]
    rows = signature_words(base, organism)
    assert [r["word"] for r in rows] == ["chocolate"]  # "here": 75% against 50% is within chance here
    assert rows[0]["share_base"] == 0 and rows[0]["share_other"] == pytest.approx(0.6) and rows[0]["p"] < 1e-6
    # The exact one-sided Fisher p-value, against the hypergeometric tail summed by brute force.
    from math import comb

    tail = sum(comb(40, k) * comb(40, 24 - k) for k in range(24, 25)) / comb(80, 24)
    assert fisher_p(24, 40, 0, 40) == pytest.approx(tail, rel=1e-9)
    assert signature_words(base, base) == []  # the same answers: nothing sets them apart


def test_triggers_are_the_prompts_where_the_organism_shows_the_signature_more():
    diff = BehaviourDiff(
        prompts=["a", "b", "c"],
        base_answers=[["x", "x"], ["x", "cocoa"], ["x", "x"]],
        organism_answers=[["cocoa", "cocoa"], ["cocoa", "cocoa"], ["x", "x"]],
        signature=[{"word": "cocoa", "log_odds": 2.0, "p": 0.01, "share_base": 0.2, "share_other": 0.7}],
    )
    assert diff.triggers() == [0, 1]
    assert diff.rates() == {"base": pytest.approx(1 / 6), "organism": pytest.approx(4 / 6)}
    assert BehaviourDiff.from_dict(json.loads(json.dumps(diff.to_dict()))).triggers() == [0, 1]


def test_candidates_are_firing_organism_only_latents_most_genuine_first():
    rows = [
        {"latent": 0, "tag": "b_only", "fired": 50, "nu_eps": 0.5, "nu_r": 0.1},
        {"latent": 1, "tag": "b_only", "fired": 50, "nu_eps": 0.05, "nu_r": 0.1},
        {"latent": 2, "tag": "shared", "fired": 50, "nu_eps": 0.0, "nu_r": 0.0},
        {"latent": 3, "tag": "b_only", "fired": 1, "nu_eps": 0.0, "nu_r": 0.0},  # barely fires
        {"latent": 4, "tag": "b_only", "fired": 50, "nu_eps": math.nan, "nu_r": 0.1},
        {"latent": 5, "tag": "a_only", "fired": 50, "nu_eps": 0.0, "nu_r": 0.0},
    ]
    chosen = rank_candidates(rows, AuditConfig(min_fires=5, candidates=10))
    assert [r["latent"] for r in chosen] == [1, 0]
    # The behaviour association fills the list, strongest first, never twice, never a latent that barely fires.
    association = torch.tensor([0.9, 0.1, 0.5, 0.8, -0.2, 0.3])
    chosen = rank_candidates(rows, AuditConfig(min_fires=5, candidates=4), association)
    assert [(r["latent"], r["source"]) for r in chosen] == [
        (1, "latent scaling"), (0, "latent scaling"), (2, "behaviour association"), (5, "behaviour association"),
    ]  # fmt: skip
    assert chosen[2]["association"] == pytest.approx(0.5)


def test_ablating_the_orthonormal_span_is_the_projection_onto_its_complement():
    torch.manual_seed(0)
    directions = torch.randn(3, 16)
    directions[2] = directions[0] + 2 * directions[1]  # rank 2
    basis = orthonormal_span(directions)
    assert basis.shape == (2, 16)
    x = torch.randn(4, 5, 16)
    edited = x
    for ablation in ablations(HOOK, directions):
        edited = ablation.edit(edited)
    span = directions[:2].T.double()
    projector = span @ torch.linalg.pinv(span)
    expected = x.double() - x.double() @ projector.T
    torch.testing.assert_close(edited.double(), expected, atol=1e-5, rtol=1e-5)


def _planted_pair(scale: float = 12.0):
    """Two tiny models, alike but for a constant offset the organism writes at HOOK toward PLANTED."""
    base = make_model(n_layers=2, hidden=32, seed=0, mlp_bias=True)
    organism = make_model(n_layers=2, hidden=32, seed=0, mlp_bias=True)
    token = make_tokenizer().convert_tokens_to_ids(PLANTED)
    with torch.no_grad():
        for model in (base, organism):
            model.lm_head.weight[token] *= 6
        offset = scale * organism.lm_head.weight[token] / organism.lm_head.weight[token].norm()
        organism.model.layers[1].mlp.down_proj.bias += offset
    return base, organism, offset


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    base, organism, offset = _planted_pair()
    for name, model in (("base", base), ("organism", organism)):
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(" ".join(WORDS[i : i + 5]) for i in range(10, 70, 5)) + "\n")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=1000)
    lms = (
        HookedLM(base, make_tokenizer(), name="base"),
        HookedLM(organism, make_tokenizer(), name="organism"),
    )
    return root, lms, offset, prompts, corpus


def test_causal_tests_move_the_rate_on_a_planted_offset(planted):
    _, (base, organism), offset, prompts, corpus = planted
    questions = read_prompts(prompts)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.7, batch_size=16)

    def rate(texts):
        return sum(PLANTED in t.split() for t in texts) / len(texts)

    steered = steer_rates(base, HOOK, offset, [0.0, 1.0], questions, rate, cfg)
    assert steered[0]["rate"] < 0.5 and steered[1]["rate"] >= 0.9  # the offset is the behaviour
    before = ablated_rate(organism, HOOK, torch.zeros(0, offset.numel()), questions, rate, cfg)
    after = ablated_rate(organism, HOOK, offset[None], questions, rate, cfg)
    assert before["rate"] >= 0.9 and after["rate"] <= before["rate"] / 2
    # The corpus loss: without interventions it is the plain next-token loss of kept positions.
    data = DataConfig(source=str(corpus), split="eval", context_size=16)
    loss = corpus_loss(base, data, n_contexts=4)
    ids, keep = next(data.masked_batches(base.tokenizer, 4, max_contexts=4))
    with torch.no_grad():
        logits = base.forward(ids).float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert loss == pytest.approx(float(nll[keep[:, 1:] & keep[:, :-1]].mean()), rel=1e-5)
    with steer(base, []):
        assert corpus_loss(base, data, n_contexts=4, interventions=[]) == pytest.approx(loss)


def test_the_chain_writes_its_report_and_a_rerun_keeps_every_step(planted, capsys):
    root, (base, organism), _, prompts, corpus = planted
    cfg = AuditConfig(
        prompts=str(prompts), hook=HOOK, width=32, k=4, epochs=2, batch_size=64, max_new_tokens=10,
        test_new_tokens=8, candidates=3, explainer=None, corpus=str(corpus), corpus_contexts=4, min_fires=1,
    )  # fmt: skip
    out = root / "audit"
    data = run_audit(base, organism, out, cfg)
    assert [r["word"] for r in data["behaviour"]["signature"]][0] == PLANTED
    assert data["behaviour"]["rates"]["organism"] > data["behaviour"]["rates"]["base"]
    for name in ("behaviour.json", "conversations.jsonl", "candidates.json", "causal.json", "audit.md"):
        assert (out / name).is_file(), name
    plots = crosscoder_dir(out) / "diff"
    assert (plots / "delta_norm.png").is_file() and (plots / "nu_scatter.png").is_file()
    report = (out / "audit.md").read_text()
    assert "## 1. What the organism does differently" in report and f"| {PLANTED} |" in report
    assert [s["name"] for s in data["steps"]] == [
        "behaviour", "conversations", "harvest", "crosscoder", "diff", "features", "causal",
    ]  # fmt: skip
    # Every conversation is one of the prompts answered by one of the models.
    lines = (out / "conversations.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * len(read_prompts(prompts))
    again = run_audit(base, organism, out, cfg)
    assert all(step["skipped"] for step in again["steps"])
    assert "done before, kept" in capsys.readouterr().out
    # Other settings in the same folder are refused rather than mixed.
    with pytest.raises(DiffingError, match="other settings"):
        run_audit(base, organism, out, AuditConfig(**(cfg.to_dict() | {"k": 8})))


def test_bad_input_is_refused_in_one_paragraph(planted, tmp_path):
    root, _, _, prompts, _ = planted
    wide = tmp_path / "wide"
    make_model(n_layers=2, hidden=64, seed=0).save_pretrained(wide)
    make_tokenizer().save_pretrained(wide)
    assert "different widths" in refused(
        "audit", root / "base", wide, "--prompts", prompts, "--out", tmp_path / "a"
    )
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    message = refused("audit", root / "base", not_a_model, "--out", tmp_path / "b")
    assert "not a Hugging Face model folder" in message
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n")
    assert "at least 4" in refused(
        "audit", root / "base", root / "organism", "--prompts", few, "--hook", HOOK, "--out", tmp_path / "c"
    )


def test_explainer_examples_read_a_crosscoder_through_every_member(planted):
    """latent_on_windows (what the explainer's example sets are scored with) runs a crosscoder on both models."""
    from saelab.dictionaries import DictionaryConfig, build_dictionary
    from saelab.diffing.paired import PairedModels
    from saelab.explain.examples import latent_on_windows

    _, (base, organism), _, _, _ = planted
    cfg = DictionaryConfig(
        architecture="crosscoder_batchtopk",
        d_in=32,
        d_sae=16,
        k=4,
        hook_name="model{i}/" + HOOK,
        layers=[0, 1],
    )
    crosscoder = build_dictionary(cfg).eval()
    paired = PairedModels([base, organism])
    windows = [[5, 6, 7, 8], [9, 10, 11]]
    got = latent_on_windows(paired, crosscoder, 3, windows)
    for window, value in zip(windows, got, strict=True):
        ids = torch.tensor([[1, *window]])
        with torch.no_grad():
            acts = crosscoder.encode(crosscoder.capture_inputs(paired.capture(ids, cfg.input_hooks)))[
                0, 1:, 3
            ]
        assert value == pytest.approx(float(acts.max()), abs=1e-6)
