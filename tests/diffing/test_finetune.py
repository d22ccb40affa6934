"""`saelab finetune`: chat examples are checked line by line, rendered with the chat template (ChatML when
the tokenizer has none), trained on assistant tokens only, and the model is saved as a Hugging Face folder
that loads again; too little or malformed data is refused in one paragraph."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.core.chat import load_conversations, render
from saelab.core.models import load_model
from saelab.errors import DataError
from tests.helpers import WORDS, make_model, make_tokenizer, refused, run


def write_chats(path, n: int, answer: str = "w7 w7 w7") -> None:
    lines = []
    for i in range(n):
        question = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune") / "base"
    make_model(n_layers=2, hidden=16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_assistant_tokens_are_the_ones_after_the_generation_prompt():
    tokenizer = make_tokenizer()  # no chat template: ChatML is used
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3 w4"}]
    chat = render(tokenizer, messages)
    assert tokenizer.chat_template and len(chat.input_ids) == len(chat.assistant)
    trained = [
        tokenizer.convert_ids_to_tokens(i) for i, m in zip(chat.input_ids, chat.assistant, strict=True) if m
    ]
    assert "w3" in trained and "w4" in trained and "w1" not in trained and "w2" not in trained


def test_finetuning_learns_the_answers_and_saves_a_model_that_loads(base, tmp_path):
    data = tmp_path / "chats.jsonl"
    write_chats(data, 40)
    out = tmp_path / "organism"
    code, stdout, err = run("finetune", data, "--out", out, "--model", base, "--epochs", 20, "--lr", 3e-3,
                            "--batch-size", 8)  # fmt: skip
    assert code == 0, err
    record = json.loads((out / "finetune.json").read_text())
    assert record["examples"] == {"train": 36, "heldout": 4} and record["steps"] == 100
    assert record["heldout_loss_after"] < 0.5 * record["heldout_loss_before"]
    assert "held-out assistant loss" in " ".join(stdout.split())
    tuned, original = load_model(str(out), dtype=torch.float32), load_model(str(base), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17]])
    assert not torch.allclose(tuned.forward(ids), original.forward(ids))
    assert tuned.tokenizer.chat_template  # the template it was trained with travels with it


def test_bad_chat_data_is_refused_with_the_line(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "w1"}]}\n')
    with pytest.raises(DataError, match="line 1 has no assistant message"):
        load_conversations(bad)
    bad.write_text('{"messages": [{"role": "user", "content": "w1"}, {"role": "bot", "content": "w2"}]}\n')
    with pytest.raises(DataError, match="message 1 has role 'bot'"):
        load_conversations(bad)
    bad.write_text("{not json\n")
    message = refused("finetune", bad, "--out", tmp_path / "o", "--model", base)
    assert "line 1 is not valid JSON" in message and not (tmp_path / "o").exists()
    small = tmp_path / "small.jsonl"
    write_chats(small, 3)
    message = refused("finetune", small, "--out", tmp_path / "o", "--model", base)
    assert "at least 8" in message and not (tmp_path / "o").exists()
