"""Directions from contrastive sets and Arditi-style selection, on tiny random models (no downloads)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.core.models import HookedLM
from saelab.errors import DataError, UnknownHookError
from saelab.interventions.directions import (
    DirectionFileError,
    DirectionSet,
    collect_activations,
    log_odds,
    mean_difference,
    pca_direction,
    pca_directions,
    post_instruction_positions,
)
from saelab.interventions.hooks import ablation, steer
from saelab.interventions.selection import (
    BehaviourMetric,
    SelectionConfig,
    SelectionError,
    load_prompt_sets,
    select_direction,
)
from tests.helpers import make_model, make_tokenizer

# A chat template over the word-level vocabulary: "w1 <instruction> w2 w3" then " w4" for the reply.
TEMPLATE = "{% for m in messages %}w1 {{ m['content'] }} w2 w3{% endfor %}{% if add_generation_prompt %} w4{% endif %}"
POSITIVE = ["w10 w11 w12", "w10 w13", "w10 w14 w15 w16 w17", "w10 w18 w19", "w10 w20 w21 w22"]
NEGATIVE = ["w30 w31", "w30 w32 w33 w34", "w30 w35 w36", "w30 w37", "w30 w38 w39 w40 w41 w42"]


def make_lm(kind: str = "llama", n_layers: int = 3, chat: bool = False) -> HookedLM:
    tok = make_tokenizer()
    if chat:
        tok.chat_template = TEMPLATE
    return HookedLM(make_model(kind, n_layers=n_layers), tok)


def reference_acts(lm: HookedLM, text_ids: list[list[int]], hooks: list[str], index) -> torch.Tensor:
    """[n, n_hooks, d]: each text run alone (no padding, no mask), read at index(len)."""
    rows = []
    for ids in text_ids:
        acts = lm.capture(torch.tensor([ids]), hooks, stop_early=False)
        rows.append(torch.stack([acts[h][0, index(len(ids))] for h in hooks]))
    return torch.stack(rows).float()


def ids_of(lm: HookedLM, texts: list[str]) -> list[list[int]]:
    return [lm.tokenizer(t)["input_ids"] for t in texts]


# ---- mean difference -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mean_difference_matches_reference_per_prompt(kind):
    lm = make_lm(kind)
    hooks = [f"blocks.{i}.hook_resid_pre" for i in range(lm.n_layers)]
    ds = mean_difference(lm, POSITIVE, NEGATIVE, positions=(-1, -2, 0), chat=False, batch_size=2)
    assert ds.hooks == hooks and ds.positions == [-1, -2, 0] and ds.vectors.shape == (3, 3, 32)
    for k, index in enumerate((lambda n: n - 1, lambda n: n - 2, lambda n: 0)):
        want = reference_acts(lm, ids_of(lm, POSITIVE), hooks, index).mean(0) - reference_acts(
            lm, ids_of(lm, NEGATIVE), hooks, index
        ).mean(0)
        torch.testing.assert_close(ds.vectors[:, k], want, rtol=1e-4, atol=1e-5)
    assert ds.provenance["method"] == "mean_difference"
    assert ds.provenance["sets"]["positive"]["size"] == 5 and len(ds.provenance["sets"]["sha256"]) == 64


def test_mean_difference_with_answers_reads_the_answer_token():
    lm = make_lm()
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_post"]
    pos_pairs = [(p, "w1 w2") for p in POSITIVE]
    neg_pairs = [(p, "w3") for p in POSITIVE]
    ds = mean_difference(lm, pos_pairs, neg_pairs, hooks=hooks, chat=False, batch_size=3)
    assert ds.positions == ["answer"]
    pos_ids = [ids + lm.tokenizer("w1 w2")["input_ids"] for ids in ids_of(lm, POSITIVE)]
    neg_ids = [ids + lm.tokenizer("w3")["input_ids"] for ids in ids_of(lm, POSITIVE)]
    want = reference_acts(lm, pos_ids, hooks, lambda n: n - 1).mean(0) - reference_acts(
        lm, neg_ids, hooks, lambda n: n - 1
    ).mean(0)
    torch.testing.assert_close(ds.get("blocks.1.hook_resid_pre", "answer"), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ds.get("blocks.2.hook_resid_post", "answer"), want[1], rtol=1e-4, atol=1e-5)
    # The same through the answers= argument; prompt positions still count from the prompt's end.
    same = mean_difference(
        lm,
        POSITIVE,
        POSITIVE,
        hooks=hooks,
        chat=False,
        answers=(["w1 w2"] * 5, ["w3"] * 5),
        positions=("answer", -1),
    )
    torch.testing.assert_close(same.get(hooks[0], "answer"), ds.get(hooks[0], "answer"))
    torch.testing.assert_close(same.get(hooks[0], -1), torch.zeros(32))  # same prompts: no difference there


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padding_does_not_change_activations(kind):
    lm = make_lm(kind)
    prompts = POSITIVE + NEGATIVE
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"]
    alone = collect_activations(lm, prompts, hooks, positions=(-1, -2), chat=False, batch_size=1)
    batched = collect_activations(lm, prompts, hooks, positions=(-1, -2), chat=False, batch_size=len(prompts))
    assert batched.shape == (10, 2, 2, 32)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_post_instruction_positions_counts_template_tokens():
    lm = make_lm(chat=True)
    assert post_instruction_positions(lm.tokenizer, chat=True) == 3  # "w2 w3 w4"
    assert post_instruction_positions(lm.tokenizer, chat=False) == 0
    assert post_instruction_positions(make_tokenizer(), chat=True) == 0  # no template
    ds = mean_difference(lm, POSITIVE, NEGATIVE, positions=("post_instruction",))
    assert ds.positions == [-3, -2, -1]
    # resid_pre of block 0 is the token embedding: the template tokens are the same in both sets.
    assert torch.equal(ds.vectors[0], torch.zeros(3, 32))
    assert ds.vectors[1:].abs().sum() > 0
    assert ds.provenance["chat"] is True and ds.provenance["post_instruction_tokens"] == 3
    assert ds.provenance["example_text"].startswith("w1 w10")


def test_bad_positions_hooks_and_sets_are_clear_errors():
    lm = make_lm()
    with pytest.raises(DataError, match="outside some prompts"):
        collect_activations(lm, ["w1 w2"], ["blocks.0.hook_resid_pre"], positions=(-3,), chat=False)
    with pytest.raises(DataError, match="unknown position"):
        collect_activations(lm, ["w1 w2"], ["blocks.0.hook_resid_pre"], positions=("middle",), chat=False)
    with pytest.raises(DataError, match="needs an answer"):
        collect_activations(lm, ["w1 w2"], ["blocks.0.hook_resid_pre"], positions=("answer",), chat=False)
    with pytest.raises(UnknownHookError):
        mean_difference(lm, POSITIVE, NEGATIVE, hooks=["blocks.9.hook_resid_pre"], chat=False)
    with pytest.raises(DataError, match="mixes"):
        mean_difference(lm, [("w1", "w2"), "w3"], NEGATIVE, chat=False)
    with pytest.raises(DataError, match="empty"):
        mean_difference(lm, [], NEGATIVE, chat=False)


# ---- PCA -----------------------------------------------------------------------------------------
def planted_pairs(seed: int, n: int = 40, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    base = torch.randn(n, 2, d, generator=g) * 3  # [n, n_hooks, d]: shared per pair
    shift = (1.0 + torch.rand(n, 2, 1, generator=g)) * u
    pos = base + shift + 0.05 * torch.randn(n, 2, d, generator=g)
    neg = base + 0.05 * torch.randn(n, 2, d, generator=g)
    return pos, neg, u


@pytest.mark.parametrize("seed", range(3))
def test_pca_recovers_planted_direction_with_sign_convention(seed):
    pos, neg, u = planted_pairs(seed)
    v = pca_directions(pos, neg)
    assert v.shape == (2, 16)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2))
    assert (v @ u > 0.99).all()  # recovered, and pointing from negative to positive
    assert torch.equal(v, pca_directions(pos, neg))  # deterministic
    assert torch.equal(pca_directions(neg, pos), -v)  # swapping the sets flips the sign, nothing else
    assert ((pos - neg).mean(0) * v).sum(-1).gt(0).all()


def test_pca_tie_break_makes_largest_coordinate_positive():
    d = torch.tensor([[0.5, -2.0, 1.0]])
    pos = torch.cat([d, -d])[:, None]  # differences d and -d: mean projection exactly 0
    v = pca_directions(pos, torch.zeros_like(pos))
    assert v[0, 1] > 0 and v[0, 1] == v[0].abs().max()
    with pytest.raises(Exception, match="identical"):
        pca_directions(torch.ones(3, 1, 4), torch.ones(3, 1, 4))


def test_pca_direction_on_a_model_is_unit_and_deterministic():
    lm = make_lm()
    a = pca_direction(lm, POSITIVE, NEGATIVE, hooks=["blocks.1.hook_resid_pre"], chat=False)
    b = pca_direction(lm, POSITIVE, NEGATIVE, hooks=["blocks.1.hook_resid_pre"], chat=False)
    assert torch.equal(a.vectors, b.vectors) and a.provenance["method"] == "pca"
    torch.testing.assert_close(a.vectors.norm(dim=-1), torch.ones(1, 1))
    md = mean_difference(lm, POSITIVE, NEGATIVE, hooks=["blocks.1.hook_resid_pre"], chat=False)
    assert float(a.get(1) @ md.get(1)) > 0  # positive set projects higher on average
    with pytest.raises(DataError, match="same number"):
        pca_direction(lm, POSITIVE, NEGATIVE[:3], chat=False)


# ---- save / load ---------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    vectors = torch.randn(2, 3, 8)
    ds = DirectionSet(
        vectors, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], [-2, -1, "answer"], {"x": 1}
    )
    path = ds.save(tmp_path / "dirs")
    assert sorted(p.name for p in path.iterdir()) == ["directions.json", "directions.safetensors"]
    back = DirectionSet.load(path)
    assert (
        torch.equal(back.vectors, vectors) and back.hooks == ds.hooks and back.positions == [-2, -1, "answer"]
    )
    assert back.provenance == {"x": 1}
    assert torch.equal(back.get("blocks.1.hook_resid_pre", "answer"), vectors[1, 2])
    assert torch.equal(DirectionSet.load(path / "directions.json").vectors, vectors)
    with pytest.raises(KeyError, match="positions"):
        back.get("blocks.0.hook_resid_pre", -7)


def test_load_errors_name_the_problem(tmp_path):
    ds = DirectionSet(torch.ones(1, 1, 4), ["blocks.0.hook_resid_pre"], [-1])
    path = ds.save(tmp_path / "dirs")
    with pytest.raises(DirectionFileError, match="does not exist"):
        DirectionSet.load(tmp_path / "nowhere")
    (path / "directions.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DirectionFileError, match="corrupt or truncated"):
        DirectionSet.load(path)
    ds.save(path)
    (path / "directions.json").write_text("{not json")
    with pytest.raises(DirectionFileError, match="not valid JSON"):
        DirectionSet.load(path)
    (path / "directions.json").write_text(json.dumps({"d_in": 4, "architecture": "topk"}))
    with pytest.raises(DirectionFileError, match="not a saelab direction set"):
        DirectionSet.load(path)
    ds.save(path)
    (path / "directions.safetensors").unlink()
    with pytest.raises(DirectionFileError, match="missing"):
        DirectionSet.load(path)
    torch.save({"vectors": torch.ones(1)}, tmp_path / "dirs.pt")
    with pytest.raises(DirectionFileError, match="never loaded"):
        DirectionSet.load(tmp_path / "dirs.pt")


# ---- selection -----------------------------------------------------------------------------------
def test_behaviour_metric_is_log_odds_of_the_token_set():
    logits = torch.randn(4, 50)
    metric = BehaviourMetric([3, 7, 7])
    p = logits.softmax(-1)[:, [3, 7]].sum(-1)
    torch.testing.assert_close(metric(logits), torch.log(p / (1 - p)))
    torch.testing.assert_close(log_odds(logits, [3, 7]), metric(logits))
    tok = make_tokenizer()
    m = BehaviourMetric.from_strings(tok, ["w5 w6", "w9"], name="x")
    assert m.token_ids == sorted([tok.convert_tokens_to_ids("w5"), tok.convert_tokens_to_ids("w9")])
    with pytest.raises(SelectionError):
        BehaviourMetric([])


def run_selection(**cfg):
    lm = make_lm(n_layers=5, chat=True)
    metric = BehaviourMetric.from_strings(lm.tokenizer, ["w10", "w11"], name="toy")
    result = select_direction(
        lm, POSITIVE, NEGATIVE, POSITIVE[:3], NEGATIVE[:3], metric, cfg=SelectionConfig(**cfg), name="toy"
    )
    return lm, metric, result


def test_selection_never_picks_the_last_20_percent_of_layers():
    lm, metric, result = run_selection(kl_threshold=math.inf, min_addition_score=-math.inf)
    assert len(result.candidates) == 5 * 3  # every layer x the 3 post-instruction positions
    assert len(result.random_kl) == 3 and all(k >= 0 for k in result.random_kl)
    late = [c for c in result.candidates if c.layer >= 4]
    assert late and all("last 20% of layers" in c.filtered for c in late)
    zero = [c for c in result.candidates if c.layer == 0]  # template tokens: identical embeddings
    assert all(c.norm == 0 and "zero direction" in c.filtered for c in zero)
    best = result.best
    assert best is not None and best.layer < 4 and best.rank == 1 and best.filtered is None
    kept = [c.ablation_score for c in result.candidates if c.filtered is None]
    assert kept == sorted(kept) and best.ablation_score == kept[0]
    # The ablation score is the metric on the positive validation prompts with r ablated everywhere.
    r = result.direction()
    from saelab.core.prompts import encode
    from saelab.interventions.directions import last_logits

    batch = encode(lm, POSITIVE[:3])
    with steer(lm, ablation(lm, r)):
        want = float(metric(last_logits(lm, batch.input_ids, batch.attention_mask)).mean())
    assert best.ablation_score == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_selection_filters_high_kl_with_a_reason(tmp_path):
    _, _, result = run_selection(kl_threshold=0.0, min_addition_score=-math.inf)
    scored = [c for c in result.candidates if c.kl_score is not None]
    assert scored and all(c.kl_score > 0 and "KL" in c.filtered for c in scored)
    assert result.best is None
    with pytest.raises(SelectionError, match="filtered out"):
        result.direction()
    _, _, strict = run_selection(kl_threshold=math.inf, min_addition_score=math.inf)
    assert strict.best is None and all(
        "does not induce" in c.filtered for c in strict.candidates if c.norm > 0
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["best"] is None and len(data["candidates"]) == 15 and data["layer_cutoff"] == 4
    png = result.plot(tmp_path / "sel.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    folder = result.save(tmp_path / "sel")
    assert DirectionSet.load(folder).vectors.shape == (5, 3, 32)
    assert json.loads((folder / "selection.json").read_text())["metric"]["name"] == "toy"


def test_shipped_selection_sets_are_large_enough():
    sets = load_prompt_sets("code")
    assert len(sets.positive) >= 32 and len(sets.negative) >= 32
    assert len(sets.positive_val) >= 8 and len(sets.negative_val) >= 8
    assert not set(sets.positive) & set(sets.positive_val) and not set(sets.negative) & set(sets.negative_val)
    with pytest.raises(DataError, match="shipped"):
        load_prompt_sets("no_such_set")
