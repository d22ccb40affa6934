"""Chat data: a jsonl of conversations, checked line by line, rendered with the model's chat template, and
the token positions that belong to each role (to train or harvest on assistant tokens only).

One conversation per line: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant",
"content": "..."}, ...]}` (roles: system, user, assistant). A tokenizer without a chat template gets
ChatML, the template of SmolLM2 and many other instruct models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from saelab.errors import DataError

ROLES = ("system", "user", "assistant")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Every conversation of a jsonl file, each checked: the error names the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a .jsonl file with one conversation per line.")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} is not valid JSON ({err.msg}); write one JSON object per line."
            ) from None
        conversations.append(_check_conversation(record, where))
    if not conversations:
        raise DataError(f'{path} holds no conversations; write one {{"messages": [...]}} object per line.')
    return conversations


def _check_conversation(record, where: str) -> list[dict]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f'{where} has no "messages" list; write {{"messages": [{{"role": "user", "content": ...}}, '
            '{"role": "assistant", "content": ...}]}.'
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(
                f"{where}: message {i} has role {message.get('role') if isinstance(message, dict) else None!r}; "
                f"each message needs a role of {', '.join(ROLES)}."
            )
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise DataError(f'{where}: message {i} ({message["role"]}) has no text in "content".')
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where} has no assistant message, so there is nothing to learn from it.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template ChatML (what SmolLM2-Instruct uses)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML


@dataclass
class RenderedChat:
    """One conversation as token ids, with the assistant tokens (fine-tuning targets) and each token's role.

    `assistant` marks what a fine-tune learns to emit: an assistant turn's text and end-of-turn token, not
    its header (the generation prompt, given at inference). `roles` gives every token the role of the turn
    the template wrote it for, header included, so `<|im_start|>assistant\n` is assistant: the positions
    where the model reads "now I answer" belong to the answer when harvesting by role. What a template
    writes before the first message (a BOS, a default system prompt like SmolLM2's) is system.
    """

    input_ids: list[int]
    assistant: list[bool]
    roles: list[str] = field(default_factory=list)


def render(tokenizer, messages: list[dict], max_length: int | None = None) -> RenderedChat:
    """Token ids of the conversation in the tokenizer's chat template, its assistant tokens and roles.

    A turn's tokens are those its message adds to the render of the turns before it (templates render
    prefixes of a conversation as prefixes of its tokens); an assistant turn's trained tokens start after
    the generation prompt.
    """
    ensure_chat_template(tokenizer)
    ids = _ids(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(ids)
    roles = [messages[0]["role"]] * len(ids)
    head = min(_preamble(tokenizer, messages[0]), len(ids))
    roles[:head] = ["system"] * head
    for turn, message in enumerate(messages):
        end = min(len(_ids(tokenizer, messages[: turn + 1], generation_prompt=False)), len(ids))
        if turn:
            start = min(len(_ids(tokenizer, messages[:turn], generation_prompt=False)), end)
            roles[start:end] = [message["role"]] * (end - start)
        if message["role"] == "assistant":
            start = len(_ids(tokenizer, messages[:turn], generation_prompt=True)) if turn else 0
            for pos in range(start, end):
                mask[pos] = True
    if max_length is not None:
        ids, mask, roles = ids[:max_length], mask[:max_length], roles[:max_length]
    return RenderedChat(ids, mask, roles)


def _preamble(tokenizer, first: dict) -> int:
    """How many tokens the template writes before the first message's own turn (0 if none, or unknown).

    The first turn alone, rendered after a system message, is its own tokens; whatever more the template
    writes when that turn opens the conversation is preamble (a BOS, a default system prompt).
    """
    if first["role"] == "system":
        return 0
    try:
        system = [{"role": "system", "content": "."}]
        turn = _ids(tokenizer, system + [first], False)[len(_ids(tokenizer, system, False)) :]
    except Exception:  # a template that refuses a system message (Gemma's) writes no system preamble
        return 0
    alone = _ids(tokenizer, [first], False)
    extra = len(alone) - len(turn)
    return extra if extra > 0 and alone[extra:] == turn else 0


def conversation_key(messages: list[dict]) -> str:
    """The text the train/eval split hashes for a conversation (`saelab.core.splits`): its messages as JSON."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)
