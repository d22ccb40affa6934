"""Circuit tasks: loading and its errors, encoding, the metrics by hand, and the shipped files."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.circuits.tasks import (
    PAIRS,
    PROMPTS,
    PromptPair,
    TargetPrompt,
    Task,
    accuracy,
    last_logits,
    list_tasks,
    load_task,
    logit_diff,
    metric,
    target_logprob,
    top1,
)
from saelab.core.models import HookedLM
from saelab.errors import SaelabError, TaskError
from tests.helpers import VOCAB, make_model, make_tokenizer

SHIPPED = {
    "agreement_simple",
    "agreement_across_pp",
    "agreement_across_rc",
    "agreement_within_rc",
    "capitals",
    "capitals_pairs",
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def pair(clean="w1 w2", patch="w1 w3", a=" w4", b=" w5", case="") -> dict:
    return {"clean_prefix": clean, "patch_prefix": patch, "clean_answer": a, "patch_answer": b, "case": case}


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def pairs_task() -> Task:
    rows = [PromptPair("w1 w2 w3", "w1 w6 w3", " w4", " w5"), PromptPair("w7", "w8", " w9", " w10")]
    return Task("toy", rows, PAIRS)


# -- loading --------------------------------------------------------------------------------------
def test_a_jsonl_file_loads_as_pairs_or_prompts(tmp_path):
    task = load_task(write_jsonl(tmp_path / "mine.jsonl", [pair(case="singular"), "", pair("w6", "w7")]))
    assert (task.name, task.kind, len(task)) == ("mine", PAIRS, 2)
    assert task.rows[0] == PromptPair("w1 w2", "w1 w3", " w4", " w5", "singular")
    prompts = load_task(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2", "target": " w3"}]))
    assert prompts.kind == PROMPTS and prompts.rows == [TargetPrompt("w1 w2", " w3")]


def test_task_errors_are_saelab_and_value_errors():
    assert issubclass(TaskError, SaelabError) and issubclass(TaskError, ValueError)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_an_empty_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(TaskError, match="holds no rows"):
        load_task(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [pair(), '{"clean_prefix": "w1",'])
    with pytest.raises(TaskError, match=r"line 2 is not valid JSON"):
        load_task(path)


def test_a_missing_field_names_the_line_and_the_field(tmp_path):
    broken = pair()
    del broken["patch_answer"]
    path = write_jsonl(tmp_path / "missing.jsonl", [pair(), broken])
    with pytest.raises(TaskError, match=r"line 2: missing field 'patch_answer'"):
        load_task(path)
    path = write_jsonl(tmp_path / "no_target.jsonl", [{"prompt": "w1"}])
    with pytest.raises(TaskError, match=r"line 1: missing field 'target'"):
        load_task(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "line 2 is a list, not a JSON object"),
        (json.dumps({**pair(), "answer": " w1"}), "line 2: unknown field 'answer'"),
        (json.dumps(pair(a=" w4", b=" w4")), "line 2: clean_answer and patch_answer are both"),
        (json.dumps(pair(clean="")), "line 2: field 'clean_prefix' must be a non-empty string"),
        (json.dumps(pair(a=3)), "line 2: field 'clean_answer' must be a non-empty string"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [pair(), line])
    with pytest.raises(TaskError, match=message):
        load_task(path)


def test_an_unknown_name_lists_the_shipped_tasks():
    with pytest.raises(TaskError, match="agreement_simple") as err:
        load_task("no_such_task")
    assert "no_such_task" in str(err.value)


def test_a_task_holds_one_kind_of_row():
    with pytest.raises(TaskError, match="row 1 is a TargetPrompt"):
        Task("mixed", [PromptPair("w1", "w2", " w3", " w4"), TargetPrompt("w1", " w2")], PAIRS)
    with pytest.raises(TaskError, match="no rows"):
        Task("empty", [], PAIRS)
    with pytest.raises(TaskError, match="kind must be"):
        Task("odd", [TargetPrompt("w1", " w2")], "triples")


# -- encoding -------------------------------------------------------------------------------------
def test_pairs_encode_left_padded_with_the_answers(tok):
    batch = pairs_task().encode(tok)
    w = {f"w{i}": tok.convert_tokens_to_ids(f"w{i}") for i in range(11)}
    pad = tok.pad_token_id
    assert batch.clean_ids.tolist() == [[w["w1"], w["w2"], w["w3"]], [pad, pad, w["w7"]]]
    assert batch.patch_ids.tolist() == [[w["w1"], w["w6"], w["w3"]], [pad, pad, w["w8"]]]
    assert batch.clean_mask.tolist() == batch.patch_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.clean_answer.tolist() == [w["w4"], w["w9"]]
    assert batch.patch_answer.tolist() == [w["w5"], w["w10"]]
    assert batch.last.tolist() == [2, 2]


def test_right_padding_puts_the_last_token_at_each_rows_end(tok):
    batch = pairs_task().encode(tok, left=False)
    assert batch.clean_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.last.tolist() == [2, 0]


def test_prompts_encode_targets_and_no_patch(tok):
    task = Task("p", [TargetPrompt("w1 w2", " w3"), TargetPrompt("w4", " w5")], PROMPTS)
    batch = task.encode(tok)
    assert batch.patch_ids is None and batch.patch_answer is None
    assert batch.clean_answer.tolist() == [tok.convert_tokens_to_ids("w3"), tok.convert_tokens_to_ids("w5")]


def test_prefixes_of_different_lengths_name_the_row(tok):
    task = Task(
        "uneven", [PromptPair("w1", "w2", " w3", " w4"), PromptPair("w1 w2", "w1 w2 w3", " w4", " w5")]
    )
    with pytest.raises(
        TaskError, match=r"row 1: clean_prefix 'w1 w2' has 2 tokens but patch_prefix 'w1 w2 w3' has 3"
    ):
        task.encode(tok)


@pytest.mark.parametrize("field", ["clean_answer", "patch_answer"])
def test_an_answer_of_two_tokens_is_named_with_its_tokens(tok, field):
    answers = {"clean_answer": " w3", "patch_answer": " w4", field: " w8 w9"}
    task = Task("long", [PromptPair("w1", "w2", **answers)])
    with pytest.raises(
        TaskError, match=rf"row 0: the {field} ' w8 w9' is 2 tokens for this tokenizer, \['w8', 'w9'\]"
    ):
        task.encode(tok)


def test_a_target_that_is_not_one_token_is_refused(tok):
    task = Task("p", [TargetPrompt("w1", " w2"), TargetPrompt("w1", " w2 w3")], PROMPTS)
    with pytest.raises(TaskError, match=r"row 1: the target ' w2 w3' is 2 tokens"):
        task.encode(tok)


def test_select_keeps_every_tensor_in_step(tok):
    batch = pairs_task().encode(tok)
    one = batch.select(slice(1, 2))
    assert len(one) == 1 and one.kind == PAIRS
    assert one.patch_answer.tolist() == batch.patch_answer[1:].tolist()
    assert one.last.tolist() == [2]


# -- metrics --------------------------------------------------------------------------------------
def known_logits() -> torch.Tensor:
    """Two rows over a vocabulary of 12: each row favours one of its two answers by a known margin."""
    logits = torch.zeros(2, 12)
    logits[0, [4, 5]] = torch.tensor([3.0, 1.0])  # row 0: clean answer w4 +2 over w5
    logits[1, [9, 10]] = torch.tensor([0.5, 2.0])  # row 1: clean answer w9 -1.5 under w10
    return logits


def toy_batch():
    """A batch whose answer ids are the small numbers of known_logits (ids set by hand)."""
    batch = pairs_task().encode(make_tokenizer())
    batch.clean_answer = torch.tensor([4, 9])
    batch.patch_answer = torch.tensor([5, 10])
    return batch


def test_logit_diff_and_accuracy_match_a_hand_computation():
    batch, logits = toy_batch(), known_logits()
    assert logit_diff(logits, batch).tolist() == [2.0, -1.5]
    assert float(logit_diff(logits, batch, mean=True)) == pytest.approx(0.25)
    assert float(metric(logits, batch)) == pytest.approx(0.25)
    assert accuracy(logits, batch) == 0.5


def test_full_logits_are_read_at_the_last_position():
    batch = toy_batch()
    full = torch.randn(2, 3, 12)
    full[:, 2] = known_logits()
    assert logit_diff(full, batch).tolist() == [2.0, -1.5]
    right = pairs_task().encode(make_tokenizer(), left=False)
    right.clean_answer, right.patch_answer = batch.clean_answer, batch.patch_answer
    full = torch.randn(2, 3, 12)
    full[0, 2], full[1, 0] = known_logits()
    assert logit_diff(full, right).tolist() == [2.0, -1.5]


def test_target_logprob_and_top1_match_a_hand_computation(tok):
    task = Task("p", [TargetPrompt("w1", " w2"), TargetPrompt("w3", " w4")], PROMPTS)
    batch = task.encode(tok)
    batch.clean_answer = torch.tensor([4, 9])
    logits = known_logits()
    expected = [3.0 - torch.logsumexp(logits[0], 0).item(), 0.5 - torch.logsumexp(logits[1], 0).item()]
    assert target_logprob(logits, batch).tolist() == pytest.approx(expected)
    assert float(metric(logits, batch)) == pytest.approx(sum(expected) / 2)
    assert top1(logits, batch).tolist() == [True, False]
    assert accuracy(logits, batch) == 0.5
    with pytest.raises(TaskError, match="logit_diff needs a pairs task"):
        logit_diff(logits, batch)


def test_logits_of_the_wrong_shape_are_refused():
    batch = toy_batch()
    with pytest.raises(TaskError, match="3 rows but the batch has 2"):
        logit_diff(torch.zeros(3, 12), batch)
    with pytest.raises(TaskError, match="must be"):
        logit_diff(torch.zeros(2, 12, 1, 1), batch)


def test_logit_diff_keeps_gradients():
    logits = known_logits().requires_grad_()
    logit_diff(logits, toy_batch(), mean=True).backward()
    assert logits.grad[0, 4] == 0.5 and logits.grad[0, 5] == -0.5


def test_last_logits_of_a_padded_batch_match_each_prompt_alone(tok):
    lm = HookedLM(make_model(), tok)
    batch = pairs_task().encode(tok)
    got = last_logits(lm, batch.clean_ids, batch.clean_mask, batch.last, batch_size=1)
    assert got.shape == (2, VOCAB)
    for i, row in enumerate(pairs_task().rows):
        alone = lm.forward(tok(row.clean_prefix)["input_ids"])[0, -1]
        assert torch.allclose(got[i], alone, atol=1e-5)


# -- the shipped tasks ----------------------------------------------------------------------------
def test_the_shipped_tasks_load():
    assert set(list_tasks()) == SHIPPED
    for name in SHIPPED:
        task = load_task(name)
        assert task.name == name and len(task) >= 30
        assert task.kind == (PROMPTS if name == "capitals" else PAIRS)


@pytest.mark.parametrize("name", sorted(n for n in SHIPPED if n.startswith("agreement")))
def test_agreement_pairs_differ_only_in_the_subjects_number(name):
    task = load_task(name)
    assert len(task) >= 150
    assert {row.case.split("_")[0] for row in task.rows} == {"singular", "plural"}
    for row in task.rows:
        clean, patch = row.clean_prefix.split(), row.patch_prefix.split()
        changed = [(c, p) for c, p in zip(clean, patch, strict=True) if c != p]
        assert len(changed) == 1, row
        clean_word, patch_word = changed[0]
        if row.case.startswith("singular"):
            assert patch_word == clean_word + "s", row
        else:
            assert clean_word == patch_word + "s", row
        assert row.clean_answer != row.patch_answer


@pytest.mark.integration
def test_the_embedded_model_solves_the_shipped_rows():
    """Every shipped row is single-token and equal-length for SmolLM2, and the model solves a sample."""
    from saelab.core.models import load_model

    torch.set_num_threads(1)
    lm = load_model(None, device="cpu", dtype=torch.float32)
    for name in list_tasks():
        batch = load_task(name).encode(lm.tokenizer).select(slice(0, 24))
        clean = last_logits(lm, batch.clean_ids, batch.clean_mask, batch.last)
        assert accuracy(clean, batch) == 1.0, name
        if batch.kind == PAIRS:
            patch = last_logits(lm, batch.patch_ids, batch.patch_mask, batch.last)
            assert bool((logit_diff(patch, batch) < 0).all()), name
