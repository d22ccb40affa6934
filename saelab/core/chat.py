"""Chat data: a jsonl of conversations, checked line by line, rendered with the model's chat template, and
the token positions that belong to each role (to train or harvest on assistant tokens only).

One conversation per line: `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant",
"content": "..."}, ...]}` (roles: system, user, assistant). A tokenizer without a chat template gets
ChatML, the template of SmolLM2 and many other instruct models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    """One conversation as token ids, with the positions of assistant tokens (the ones trained on)."""

    input_ids: list[int]
    assistant: list[bool]


def render(tokenizer, messages: list[dict], max_length: int | None = None) -> RenderedChat:
    """Token ids of the conversation in the tokenizer's chat template, and which are assistant tokens.

    An assistant turn's tokens are those the template adds after the generation prompt: its text and its
    end-of-turn token, which the model must learn to emit.
    """
    ensure_chat_template(tokenizer)
    ids = _ids(tokenizer, messages, generation_prompt=False)
    mask = [False] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:turn], generation_prompt=True)) if turn else 0
        end = len(_ids(tokenizer, messages[: turn + 1], generation_prompt=False))
        for pos in range(start, min(end, len(ids))):
            mask[pos] = True
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return RenderedChat(ids, mask)


def _ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)
