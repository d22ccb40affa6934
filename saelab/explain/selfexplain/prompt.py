"""What the model reads: the template, its tokens and placeholder positions, the injection site and the
typical residual norm there (the unit of every scale), and the label parsed from a reply."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import chain, islice

import torch

from saelab.core.data import exclusion_mask, iter_contexts, token_batches
from saelab.core.models import HookedLM
from saelab.errors import DataError
from saelab.explain.clients.base import format_chat
from saelab.explain.explainer import parse_label

_CLOSING = {'"': '"', "“": "”", "'": "'", "«": "»", "`": "`"}


def default_layer(n_layers: int) -> int:
    """The injection layer when none is given: the input of block n_layers // 16 (at least 1), block 1 of
    SmolLM2's 30 (the write-up used 2 of Gemma-2B's 18). Measured with
    `benchmarks/acceptance_self_explain.py --calibrate`: layer-15 residuals of 40 common words,
    mean-centred like decoder rows, were named among the top 5 at the chosen scale for 24, 14 and 14 of 40
    words when injected at layers 1, 2 and 3 (at some scale of the sweep: 34, 35, 31)."""
    return max(1, min(n_layers - 1, n_layers // 16))


def injection_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@dataclass(frozen=True)
class SelfTemplate:
    """A chat turn and an assistant prefill; every `placeholder` in either is one injected token."""

    user: str = 'What is the meaning of the word "X"?'
    prefill: str = 'The meaning of the word "X" is "'
    placeholder: str = "X"
    system: str | None = None  # None: the chat template's default system turn, if it has one

    def __post_init__(self) -> None:
        if not isinstance(self.placeholder, str) or not self.placeholder.strip():
            raise DataError("the template's placeholder is empty; use a short word such as 'X'.")
        if self.placeholder not in self.user + self.prefill:
            raise DataError(
                f"the template has no placeholder {self.placeholder!r} in its user turn or prefill "
                f"(user {self.user!r}, prefill {self.prefill!r}); write it where the direction goes."
            )

    def to_dict(self) -> dict:
        return asdict(self)


def typical_residual_norm(
    lm: HookedLM,
    layer: int,
    texts_or_token_batches: Iterable,
    max_tokens: int = 8192,
    context_size: int = 128,
    batch_size: int = 16,
) -> float:
    """Median residual norm at ``blocks.{layer}.hook_resid_pre`` over real text: texts (packed into
    BOS-started contexts, as a harvest sees them) or LongTensor token batches. Position 0 (the
    attention sink) and special tokens are left out."""
    hook, items = injection_hook(layer), iter(texts_or_token_batches)
    first = next(items, None)
    if first is None:
        raise DataError("no text to measure the typical residual norm on; give some texts or token batches.")
    items = chain([first], items)
    if isinstance(first, str):
        rows = iter_contexts(items, lm.tokenizer, context_size)
        batches = (torch.stack(b) for b in iter(lambda: list(islice(rows, batch_size)), []))
    else:
        batches = (part for b in items for part in _rows(b).split(batch_size))
    norms, seen = [], 0
    for ids in batches:
        acts = lm.capture(ids, hook)[hook].float()
        keep = ~exclusion_mask(ids, lm.tokenizer).to(acts.device)
        norms.append(acts.norm(dim=-1)[keep].cpu())
        seen += int(keep.sum())
        if seen >= max_tokens:
            break
    values = torch.cat(norms) if norms else torch.zeros(0)
    if not values.numel() or not bool(torch.isfinite(values).all()):
        raise DataError(
            "the text gave no usable token (only position 0 and special tokens?); give more text."
        )
    return float(values.median())


def source_norm(lm: HookedLM, layer: int, source: str | None = None, max_tokens: int = 8192) -> float:
    """`typical_residual_norm` on a data source (`iter_texts` names; None: the embedded corpus): its
    held-out (eval) text, or all of it when it holds too little."""

    def batches(split: str):
        return token_batches(source, lm.tokenizer, 128, 16, split=split, max_contexts=-(-max_tokens // 127))

    try:
        return typical_residual_norm(lm, layer, batches("eval"), max_tokens=max_tokens)
    except DataError:
        return typical_residual_norm(lm, layer, batches("all"), max_tokens=max_tokens)


def _rows(batch) -> torch.Tensor:
    batch = torch.as_tensor(batch)
    return batch.reshape(-1, batch.shape[-1])


def build_prompt(tokenizer, template: SelfTemplate) -> tuple[list[int], list[int]]:
    """Token ids of the chat + prefill, and the index of each placeholder token (user turn, prefill)."""
    messages = ([{"role": "system", "content": template.system}] if template.system else []) + [
        {"role": "user", "content": template.user}
    ]
    head = format_chat(tokenizer, messages)
    start = head.rfind(template.user)
    if start < 0:
        raise DataError("the chat template rewrote the user turn, so the placeholder cannot be found.")
    text, ph = head + template.prefill, template.placeholder
    spans = [(start + m.start(), start + m.end()) for m in re.finditer(re.escape(ph), template.user)]
    spans += [
        (len(head) + m.start(), len(head) + m.end()) for m in re.finditer(re.escape(ph), template.prefill)
    ]
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "self-explanation needs a fast tokenizer (character offsets) to find the placeholder."
        )
    enc = tokenizer(
        text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"), return_offsets_mapping=True
    )
    offsets, positions = enc["offset_mapping"], []
    for a, b in spans:
        hits = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
        if len(hits) != 1 or text[offsets[hits[0]][0] : offsets[hits[0]][1]].strip() != ph:
            pieces = [text[offsets[i][0] : offsets[i][1]] for i in hits]
            raise DataError(
                f"the placeholder {ph!r} is not a token of its own in {text[max(0, a - 20) : b + 20]!r} "
                f"(the tokenizer reads {pieces!r}); put a space or a quote on each side of it, or "
                "choose another placeholder."
            )
        positions.append(hits[0])
    return list(enc["input_ids"]), positions


def parse_self_label(raw: str, template: SelfTemplate, max_chars: int = 120) -> str:
    """The reply up to the quote closing the prefill's opening quote (if it ends with one), as a label."""
    quote = template.prefill.rstrip()[-1:]
    if quote in _CLOSING and (cut := raw.find(_CLOSING[quote])) >= 0:
        raw = raw[:cut]
    return parse_label(raw, max_chars)
