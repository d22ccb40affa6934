"""`saelab finetune`: chat examples are checked line by line, rendered with the chat template (ChatML when
the tokenizer has none), trained on assistant tokens only, and the model is saved as a Hugging Face folder
that loads again; too little or malformed data is refused in one paragraph."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.core.chat import load_conversations, render
from saelab.core.models import load_model
from saelab.diffing.finetune import FinetuneConfig, finetune
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


def test_lora_trains_only_low_rank_adapters_and_saves_them_merged_into_a_plain_folder(base, tmp_path):
    from transformers import AutoModelForCausalLM

    data, out = tmp_path / "chats.jsonl", tmp_path / "organism"
    write_chats(data, 24)
    lm = load_model(str(base), dtype=torch.float32)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    modules = [id(m) for m in lm.model.modules()]  # what lm.blocks and its hooks hold on to
    cfg = FinetuneConfig(epochs=6, lr=2e-2, lora_rank=2, lora_targets=["q_proj", "v_proj"], lora_dropout=0.0)
    record = finetune(lm, data, out, cfg, progress=False)
    adapted = {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight"))}
    assert (
        record["mode"] == "lora" and record["lora"]["alpha"] == 4.0 and record["lora"]["adapted_layers"] == 4
    )
    assert record["trainable_parameters"] == sum(2 * sum(before[k].shape) for k in adapted)
    assert record["heldout_loss_after"] < record["heldout_loss_before"] - 0.1  # 5.24 -> 5.06
    # the caller's model is the plain merged model again, with the same modules its hooks resolve onto
    assert type(lm.model).__name__ == "LlamaForCausalLM" and [id(m) for m in lm.model.modules()] == modules
    assert not any("lora" in name for name in lm.model.state_dict())
    after = lm.model.state_dict()
    assert after.keys() == before.keys()
    for key in before.keys() - adapted:  # the base weights never trained
        assert torch.equal(after[key], before[key]), key
    for key in adapted:  # merged: W + alpha / rank * B A, a change of rank <= 2
        delta = after[key] - before[key]
        assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta, atol=1e-6) <= 2, key
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    ids = torch.tensor([[1, 5, 9, 17, 30]])
    with torch.no_grad():
        merged = lm.model(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, merged)
    assert torch.equal(load_model(str(out), dtype=torch.float32).forward(ids), lm.forward(ids))


def test_lora_from_the_command_line_defaults_to_its_own_learning_rate_and_every_linear_layer(base, tmp_path):
    data, out = tmp_path / "chats.jsonl", tmp_path / "organism"
    write_chats(data, 16)
    code, stdout, err = run(
        "finetune", data, "--out", out, "--model", base, "--epochs", 0.5, "--lora-rank", 4
    )
    assert code == 0, err
    record = json.loads((out / "finetune.json").read_text())
    assert record["config"]["lr"] == 2e-4 and record["lora"]["alpha"] == 8.0
    assert len(record["lora"]["adapted"]) == 7  # q k v o gate up down; not the unembedding
    assert "LoRA rank 4, merged" in " ".join(stdout.split())
    code, _, err = run("finetune", data, "--out", tmp_path / "full", "--model", base, "--epochs", 0.5)
    assert code == 0, err
    full = json.loads((tmp_path / "full" / "finetune.json").read_text())
    assert full["mode"] == "full" and "lora" not in full and full["config"]["lr"] == 5e-5
    assert full["trainable_parameters"] == full["total_parameters"] > record["trainable_parameters"]


def test_bad_lora_settings_are_refused_before_training(base, tmp_path):
    data, out = tmp_path / "chats.jsonl", tmp_path / "o"
    write_chats(data, 16)
    args = ("finetune", data, "--out", out, "--model", base)
    assert "--lora-rank must be 0" in refused(*args, "--lora-rank", -1)
    assert "--lora-alpha must be positive" in refused(*args, "--lora-rank", 4, "--lora-alpha", 0)
    assert "give --lora-rank too" in refused(*args, "--lora-alpha", 8)
    message = refused(*args, "--lora-rank", 4, "--lora-targets", "q_proj,query_key_value")
    assert "query_key_value match no linear layer of LlamaForCausalLM" in message
    assert "q_proj" in message.split("named")[1] and "down_proj" in message
    assert not out.exists()
