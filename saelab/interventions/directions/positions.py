"""Token positions of a direction set: the chat template's post-instruction tokens, and label checks.

Besides the labels of `saelab.core.prompts.Position`, "post_instruction" expands to the tokens the
chat template puts after the user's instruction (Arditi et al. 2024), e.g.
"<|im_end|>\\n<|im_start|>assistant\\n": -n..-1 with n = `post_instruction_positions(tokenizer)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from saelab.core.prompts import Position, format_prompts, prompt_token_ids
from saelab.errors import DataError

_MARKER = "saelab instruction marker"


def post_instruction_positions(tokenizer, chat: bool = True) -> int:
    """How many template tokens follow the user's instruction (0 without a chat template).

    Formats a marker instruction and counts the tokens after the longest token prefix it shares with
    the text cut just after the marker, so the count is exact whatever the template looks like.
    """
    if not chat or not getattr(tokenizer, "chat_template", None):
        return 0
    text = format_prompts(tokenizer, [_MARKER], chat=True)[0]
    cut = text.rindex(_MARKER) + len(_MARKER)
    full, prefix = prompt_token_ids(tokenizer, text), prompt_token_ids(tokenizer, text[:cut])
    common = 0
    while common < min(len(full), len(prefix)) and full[common] == prefix[common]:
        common += 1
    return len(full) - common


def resolve_positions(tokenizer, positions: Sequence[Position], chat: bool = True) -> list[Position]:
    """Expand "post_instruction" into -n..-1 and check every label; returns the stored labels."""
    out: list[Position] = []
    for p in positions:
        if p == "post_instruction":
            n = post_instruction_positions(tokenizer, chat)
            out += list(range(-n, 0)) if n else [-1]
        elif isinstance(p, bool) or not isinstance(p, (int, str)) or (isinstance(p, str) and p != "answer"):
            raise DataError(
                f"unknown position {p!r}: use an int (-1 = last prompt token, 0 = first token), "
                "'post_instruction' (the chat template's tokens after the instruction) or 'answer'."
            )
        else:
            out.append(p)
    if not out:
        raise DataError("no token positions given; pass at least one, e.g. positions=(-1,).")
    if len(set(out)) != len(out):
        raise DataError(f"positions {out} repeat a label; give each position once.")
    return out
