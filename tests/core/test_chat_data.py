"""Chat data: conversations rendered with the model's chat template, packed into contexts like documents,
each token with the role of its turn; positions of roles not chosen are excluded everywhere positions are
(harvest, paired harvest, training, analysis), resumption and ranks stay exact, bad input is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saelab.core.activations import CacheInfo, harvest
from saelab.core.chat import CHATML, ROLES, conversation_key, render
from saelab.core.data import DataConfig, chat_batches, exclusion_mask, split_conversations
from saelab.core.models import load_model
from saelab.core.splits import is_eval_text
from saelab.diffing.paired import PairedModels
from saelab.errors import DataError
from tests.helpers import WORDS, make_model, make_tokenizer, refused, run

CTX = 16
HOOK = "blocks.1.hook_resid_post"
# Each role's text comes from its own words, so a token's role can be read off its id.
ROLE_WORDS = {"system": WORDS[180:200], "user": WORDS[0:60], "assistant": WORDS[100:160]}


def chat_tokenizer(template: str = CHATML):
    """The word-level test tokenizer plus ChatML's special tokens and role names, with a chat template."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(list(ROLES))
    tokenizer.chat_template = template
    return tokenizer


def conversation(i: int) -> list[dict]:
    def words(role, n):
        return " ".join(ROLE_WORDS[role][(i * 7 + j) % len(ROLE_WORDS[role])] for j in range(n))

    messages = [{"role": "system", "content": words("system", 2)}] if i % 3 == 0 else []
    for turn in range(1 + i % 2):
        messages += [
            {"role": "user", "content": words("user", 3 + turn)},
            {"role": "assistant", "content": words("assistant", 2 + i % 4)},
        ]
    return messages


def write_chats(path, n: int = 120):
    path.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in range(n)))
    return path


def expected_role(tokenizer, token_id: int) -> str | None:
    """A content or header token's role from its word alone (None for the template's special tokens)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token in ROLES:
        return token
    return next((role for role, words in ROLE_WORDS.items() if token in words), None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(base folder, tuned folder, chats.jsonl): two tiny Llamas that share the chat tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    tokenizer = chat_tokenizer()
    folders = []
    for name, seed in (("base", 0), ("tuned", 1)):
        make_model(n_layers=2, hidden=16, seed=seed, vocab_size=len(tokenizer)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders.append(root / name)
    return folders[0], folders[1], write_chats(root / "chats.jsonl")


@pytest.fixture(scope="module")
def lm(assets):
    return load_model(str(assets[0]), device="cpu", dtype=torch.float32)


def reference_stream(tokenizer, path, split="all"):
    """The packed stream computed by hand: every conversation rendered, concatenated, cut after a BOS."""
    ids, roles = [], []
    for messages in split_conversations(path, split):
        chat = render(tokenizer, messages)
        ids += chat.input_ids
        roles += chat.roles
    n = CTX - 1
    k = len(ids) // n
    rows = torch.tensor(ids[: k * n]).view(k, n)
    bos = torch.full((k, 1), tokenizer.bos_token_id)
    return torch.cat([bos, rows], 1), [["-"] + roles[i * n : (i + 1) * n] for i in range(k)]


def test_each_token_has_the_role_of_its_turn_headers_included():
    tokenizer = chat_tokenizer()
    messages = conversation(3)  # system, user, assistant, user, assistant
    chat = render(tokenizer, messages)
    assert len(chat.roles) == len(chat.input_ids) == len(chat.assistant)
    tokens = tokenizer.convert_ids_to_tokens(chat.input_ids)
    for pos, (token_id, role) in enumerate(zip(chat.input_ids, chat.roles, strict=True)):
        want = expected_role(tokenizer, token_id)
        if want is None:  # <|im_start|> opens the turn of the header after it, <|im_end|> closes its own
            want = chat.roles[pos + 1] if tokens[pos] == "<|im_start|>" else chat.roles[pos - 1]
        assert role == want, (pos, tokens[pos])
    # The fine-tuning targets are the assistant turns without their header.
    trained = [t for t, m in zip(tokens, chat.assistant, strict=True) if m]
    assert "assistant" not in trained and set(trained) - {"<|im_end|>"} <= set(ROLE_WORDS["assistant"])
    assert all(r == "assistant" for r, m in zip(chat.roles, chat.assistant, strict=True) if m)


def test_what_a_template_writes_before_the_first_message_is_system():
    injecting = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nw190 w191<|im_end|>\n{% endif %}"
        + CHATML
    )
    tokenizer = chat_tokenizer(injecting)
    chat = render(tokenizer, conversation(1))  # no system message: the template adds one
    tokens = tokenizer.convert_ids_to_tokens(chat.input_ids)
    assert tokens[:5] == ["<|im_start|>", "system", "w190", "w191", "<|im_end|>"]
    assert chat.roles[:5] == ["system"] * 5 and chat.roles[5:8] == ["user"] * 3


def test_packed_batches_carry_the_role_mask(assets):
    tokenizer = chat_tokenizer()
    path = assets[2]
    ids, roles = reference_stream(tokenizer, path)
    for chosen in (["assistant"], ["user", "system"], None):
        cfg = DataConfig(str(path), split="all", context_size=CTX, chat=True, roles=chosen)
        batches = list(cfg.masked_batches(tokenizer, batch_size=7))
        got_ids = torch.cat([b for b, _ in batches])
        keep = torch.cat([k for _, k in batches])
        assert torch.equal(got_ids, ids)
        allowed = torch.tensor([[chosen is None or r in chosen for r in row] for row in roles])
        assert torch.equal(keep, allowed & ~exclusion_mask(ids, tokenizer))
        assert torch.equal(torch.cat(list(cfg.batches(tokenizer, 7))), ids)
    # Every kept assistant token is an assistant word or header; none of the user's words.
    cfg = DataConfig(str(path), split="all", context_size=CTX, chat=True, roles=["assistant"])
    kept = {expected_role(tokenizer, int(t)) for b, k in cfg.masked_batches(tokenizer, 8) for t in b[k]}
    assert kept == {"assistant"}


def test_resumption_and_ranks_give_exactly_the_uninterrupted_stream(assets):
    tokenizer = chat_tokenizer()
    path = str(assets[2])

    def stream(**kwargs):
        batches = list(chat_batches(path, tokenizer, CTX, 5, split="all", roles=["assistant"], **kwargs))
        return torch.cat([b for b, _ in batches]), torch.cat([r for _, r in batches])

    full_ids, full_roles = stream()
    ids, codes = stream(skip_contexts=13)
    assert torch.equal(ids, full_ids[13:]) and torch.equal(codes, full_roles[13:])
    ids, codes = stream(skip_contexts=3, max_contexts=9)
    assert torch.equal(ids, full_ids[3:12]) and torch.equal(codes, full_roles[3:12])
    shares = [stream(rank=r, world_size=3)[0] for r in range(3)]
    for r in range(3):
        assert torch.equal(shares[r], full_ids[r::3])
    assert torch.equal(stream(skip_contexts=2, rank=1, world_size=3)[0], full_ids[1::3][2:])


def test_the_train_eval_split_hashes_each_conversation(tmp_path):
    path = write_chats(tmp_path / "many.jsonl", 400)
    every = split_conversations(path, "all")
    train, held = split_conversations(path, "train"), split_conversations(path, "eval")
    assert held and len(train) + len(held) == len(every)
    assert all(is_eval_text(conversation_key(c)) for c in held)
    assert not any(is_eval_text(conversation_key(c)) for c in train)


def test_harvest_keeps_only_assistant_tokens(lm, assets):
    cfg = DataConfig(str(assets[2]), split="all", context_size=CTX, chat=True, roles=["assistant"])
    rows, contexts = [], 0
    for ids, keep in cfg.masked_batches(lm.tokenizer, 8):
        rows.append(lm.capture(ids, [HOOK])[HOOK][keep])
        contexts += ids.shape[0]
    reference = torch.cat(rows)
    out = list(harvest(lm, cfg, [HOOK], None, batch_contexts=8, progress=False))
    got = torch.cat([acts[HOOK] for acts, _ in out])
    assert sum(n for _, n in out) == contexts
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    everything = DataConfig(str(assets[2]), split="all", context_size=CTX, chat=True)
    n_all = sum(a[HOOK].shape[0] for a, _ in harvest(lm, everything, [HOOK], None, 8, progress=False))
    assert 0 < got.shape[0] < n_all


def test_paired_harvest_on_chat_data_records_the_roles(assets, tmp_path):
    base, tuned, chats = assets
    lms = [load_model(str(f), device="cpu", dtype=torch.float32) for f in (base, tuned)]
    paired = PairedModels(lms)
    hooks = [f"model0/{HOOK}", f"model1/{HOOK}"]
    cfg = DataConfig(str(chats), split="all", context_size=CTX, chat=True, roles=["assistant"])
    reference = []
    for ids, keep in cfg.masked_batches(paired.tokenizer, 8):
        captured = paired.capture(ids, hooks)
        reference.append(torch.cat([captured[h][keep] for h in hooks], 1))
    reference = torch.cat(reference)
    out = tmp_path / "cache"
    code, _, err = run(
        "harvest", "--model", base, "--model", tuned, "--hook", HOOK, "--data", chats, "--chat",
        "--roles", "assistant", "--split", "all", "--tokens", reference.shape[0], "--context-size", CTX,
        "--out", out, "--dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    info = CacheInfo.read(out)
    assert info.source["data"]["chat"] is True and info.source["data"]["roles"] == ["assistant"]
    assert info.n_tokens == reference.shape[0]
    cached = torch.cat(
        [
            torch.cat([torch.from_numpy(np.load(info.shard_path(h, i))) for h in hooks], 1)
            for i in range(len(info.shards))
        ]
    )
    # The cache is shuffled: the same rows (both models' activations at one token side by side).
    assert torch.equal(torch.sort(cached, 0).values, torch.sort(reference, 0).values)
    assert sorted(map(tuple, cached.tolist())) == sorted(map(tuple, reference.tolist()))


def test_train_and_analyze_follow_the_chat_roles(assets, tmp_path):
    base, _, chats = assets
    run_dir = tmp_path / "run"
    code, _, err = run(
        "train", "--run-dir", run_dir, "--model", base, "--hook", HOOK, "--data", chats, "--chat",
        "--roles", "assistant", "--context-size", CTX, "--stream", "--width", 32, "--k", 4,
        "--tokens", 512, "--batch-size", 64, "--dtype", "float32",
    )  # fmt: skip
    assert code == 0, err
    (folder,) = (run_dir / "saes").iterdir()
    meta = json.loads((folder / "cfg.json").read_text())["saelab"]["config"]["metadata"]
    assert meta["chat"] is True and meta["roles"] == ["assistant"]
    assert json.loads((folder / "eval.json").read_text())  # evaluated on the held-out conversations
    code, _, err = run("analyze", folder, "--tokens", 256, "--dtype", "float32")
    assert code == 0, err
    from saelab.analysis.store import FeatureStore

    with FeatureStore(folder / "features.db", create=False) as store:
        data = store.meta()["data"]
    assert data["chat"] is True and data["roles"] == ["assistant"]
    other = tmp_path / "user.db"  # the options override what the SAE was trained on
    code, _, err = run("analyze", folder, "--data", chats, "--chat", "--roles", "user", "--tokens", 256,
                       "--dtype", "float32", "--out", other)  # fmt: skip
    assert code == 0, err
    with FeatureStore(other, create=False) as store:
        assert store.meta()["data"]["roles"] == ["user"]


def test_bad_chat_input_is_refused_before_anything_is_written(assets, tmp_path):
    base, _, chats = assets
    bad = tmp_path / "bad.jsonl"
    lines = chats.read_text().splitlines()[:2] + ['{"messages": [{"role": "user", "content": "w1"}]}']
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    common = ["--model", base, "--hook", HOOK, "--context-size", CTX, "--out", out, "--tokens", 64]
    message = refused("harvest", "--data", bad, "--chat", *common)
    assert "line 3 has no assistant message" in message and not out.exists()
    message = refused("harvest", "--data", chats, "--chat", "--roles", "assistant,bot", *common)
    assert "unknown role 'bot'; choose from system, user, assistant" in message and not out.exists()
    message = refused("harvest", "--data", chats, "--roles", "assistant", *common)
    assert "roles only apply to chat data" in message
    no_system = tmp_path / "no_system.jsonl"
    no_system.write_text("".join(json.dumps({"messages": conversation(i)}) + "\n" for i in (1, 2, 4, 5)))
    message = refused(
        "harvest", "--data", no_system, "--chat", "--roles", "system", "--split", "all", *common
    )
    assert "has no system token to keep" in message and not out.exists()
    with pytest.raises(DataError, match="local .jsonl file of conversations"):
        next(DataConfig(str(tmp_path / "missing.jsonl"), chat=True).masked_batches(make_tokenizer()))
