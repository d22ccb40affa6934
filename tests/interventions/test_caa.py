"""CAA: vectors from A/B items and the normalized-probability evaluation, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.core.models import HookedLM
from saelab.errors import DataError
from saelab.interventions.caa import (
    ABItem,
    CAAConfig,
    CAAError,
    _AddAfter,
    caa_vectors,
    evaluate_ab,
    format_item,
    letter_token_ids,
    load_items,
    run_caa,
    split_items,
)
from saelab.interventions.directions import DirectionSet
from tests.helpers import make_model, make_tokenizer

# The word-level test tokenizer has no "(" or "A": letters are words, the answer prefix a word too.
CFG = dict(letters=("w1", "w2"), answer_prefix="w3 ", choice_format="{letter} {text}", chat=False)


def make_lm() -> HookedLM:
    return HookedLM(make_model("llama", n_layers=3), make_tokenizer())


def make_items(n: int = 8) -> list[ABItem]:
    return [
        ABItem(
            question=f"w{20 + i} w{40 + i}",
            a=f"w{60 + i} w70",
            b=f"w{80 + i}",
            matching="A" if i % 2 == 0 else "B",
            split="test" if i % 4 == 3 else "train",
        )
        for i in range(n)
    ]


@torch.no_grad()
def p_match_direct(lm, items, cfg) -> torch.Tensor:
    """Each item alone, no padding and no steering: p(match) / (p(w1) + p(w2))."""
    a_id, b_id = (lm.tokenizer.convert_tokens_to_ids(t) for t in cfg.letters)
    out = []
    for it in items:
        ids = lm.tokenizer(format_item(it, cfg))["input_ids"] + lm.tokenizer(cfg.answer_prefix)["input_ids"]
        probs = lm.forward(torch.tensor([ids]))[0, -1].softmax(-1)
        pa, pb = probs[a_id], probs[b_id]
        out.append(float((pa if it.matching == "A" else pb) / (pa + pb)))
    return torch.tensor(out)


def test_vector_is_the_mean_difference_at_the_letter():
    lm, items = make_lm(), make_items()
    cfg = CAAConfig(layers=[0, 2], **CFG)
    vectors = caa_vectors(lm, items, cfg, behaviour="toy")
    assert vectors.hooks == ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"]
    assert vectors.positions == ["answer"] and vectors.provenance["name"] == "caa_toy"
    for k, hook in enumerate(vectors.hooks):
        diffs = []
        for it in items:
            base = lm.tokenizer(format_item(it, cfg))["input_ids"]
            rows = []
            for letter in (it.matching, "B" if it.matching == "A" else "A"):
                shown = cfg.letters[0] if letter == "A" else cfg.letters[1]
                ids = base + lm.tokenizer(cfg.answer_prefix + shown)["input_ids"]
                rows.append(lm.capture(torch.tensor([ids]), [hook])[hook][0, -1])
            diffs.append(rows[0] - rows[1])
        torch.testing.assert_close(vectors.vectors[k, 0], torch.stack(diffs).mean(0), rtol=1e-4, atol=1e-5)


def test_probabilities_in_unit_interval_and_multiplier_zero_is_unsteered(tmp_path):
    lm, items = make_lm(), make_items(12)
    cfg = CAAConfig(layers=[1, 2], multipliers=(-4.0, 0.0, 4.0), batch_size=5, **CFG)
    vectors, result = run_caa(lm, items, cfg, behaviour="toy")
    test = split_items(items)[1]
    assert result.p_match.shape == (2, 3, len(test))
    assert ((result.p_match >= 0) & (result.p_match <= 1)).all()
    direct = p_match_direct(lm, test, cfg)
    for i in range(2):
        torch.testing.assert_close(result.p_match[i, 1], direct, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(result.p_match[:, 0], result.p_match[:, 2])  # the vector does something
    data = json.loads(json.dumps(result.to_dict()))
    assert data["n_train"] == len(items) - len(test) and data["multipliers"] == [-4.0, 0.0, 4.0]
    assert {row["layer"] for row in data["layers"]} == {1, 2}
    assert result.best_layer() in (1, 2) and "m=+4" in result.table()
    assert result.plot(tmp_path / "caa.png").read_bytes()[:4] == b"\x89PNG"


def test_steering_after_the_instruction_touches_only_the_last_positions():
    add = _AddAfter("blocks.0.hook_resid_pre", vector=torch.ones(4), alpha=2.0, last=2)
    x = torch.zeros(3, 5, 4)
    out = add.edit(x)
    assert torch.equal(out[:, :3], x[:, :3]) and torch.equal(out[:, 3:], torch.full((3, 2, 4), 2.0))
    assert _AddAfter("blocks.0.hook_resid_pre", vector=torch.ones(4), alpha=0.0).edit(x) is None
    # "all" and "after_instruction" differ: the question's tokens are only steered by "all".
    lm, items = make_lm(), make_items()
    train, test = split_items(items)
    vectors = caa_vectors(lm, train, CAAConfig(layers=[1], **CFG))
    after = evaluate_ab(lm, test, vectors, CAAConfig(layers=[1], multipliers=(3.0,), **CFG))
    everywhere = evaluate_ab(
        lm, test, vectors, CAAConfig(layers=[1], multipliers=(3.0,), steer_positions="all", **CFG)
    )
    assert not torch.allclose(after.p_match, everywhere.p_match)


def test_letters_must_be_single_tokens_and_items_valid():
    tok = make_tokenizer()
    assert letter_token_ids(tok, CAAConfig(**CFG)) == (
        tok.convert_tokens_to_ids("w1"),
        tok.convert_tokens_to_ids("w2"),
    )
    with pytest.raises(CAAError, match="does not tokenize"):
        letter_token_ids(tok, CAAConfig(letters=("w1 w5", "w2"), answer_prefix="", chat=False))
    with pytest.raises(CAAError, match="same token"):
        letter_token_ids(tok, CAAConfig(letters=("x1", "x2"), answer_prefix="", chat=False))  # both <unk>
    with pytest.raises(CAAError, match="matching"):
        ABItem("q", "a", "b", matching="C")
    with pytest.raises(CAAError, match="steer_positions"):
        CAAConfig(steer_positions="question")
    with pytest.raises(DataError, match="train and test"):
        split_items([ABItem("q", "a", "b", "A", split="train")])
    with pytest.raises(CAAError, match="layers"):
        caa_vectors(make_lm(), make_items(), CAAConfig(layers=[7], **CFG))


def test_shipped_items_are_balanced_and_held_out():
    behaviour, items = load_items("optimism")
    train, test = split_items(items)
    assert behaviour == "optimism" and len(items) >= 40 and len(test) >= 12
    for part in (train, test):
        letters = [it.matching for it in part]
        assert abs(letters.count("A") - letters.count("B")) <= 1  # the letter cancels in the difference
    assert not {it.question for it in train} & {it.question for it in test}
    with pytest.raises(DataError, match="shipped"):
        load_items("no_such_behaviour")


@pytest.mark.integration
def test_caa_probability_rises_with_multiplier_on_the_embedded_model():
    from saelab.core.models import load_model

    torch.set_num_threads(1)
    lm = load_model(None)
    behaviour, items = load_items("optimism")
    train, test = split_items(items)
    cfg = CAAConfig(layers=[LAYER], multipliers=(-1.0, 0.0, 1.0))
    vectors = caa_vectors(lm, train, cfg, behaviour)
    assert isinstance(vectors, DirectionSet)
    result = evaluate_ab(lm, test, vectors, cfg, behaviour)
    low, mid, high = result.means[0].tolist()
    assert low < mid < high


LAYER = 15  # the layer with the largest rise in examples/caa_ab.py (9-18 all rise)
