"""Several models on identical tokens, seen as one: what a crosscoder between them is trained on.

`PairedModels` wraps models that share a tokenizer and a width and answers the calls the harvester and
the streaming buffer make of one model (`capture`, `hook_dim`, `tokenizer`, `device`, `name`). Its hook
points are the members' own, prefixed by the member: `model0/blocks.13.hook_resid_post` is model 0's.
So one data pass fills one cache (or one shuffle buffer) with every model's activations on the same
tokens, and a crosscoder reads them with `hook_name="model{i}/blocks.13.hook_resid_post", layers=[0, 1]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from saelab.core.models import HookedLM
from saelab.errors import DiffingError

MEMBER_HOOK = re.compile(r"^model(\d+)/(.+)$")


def member_hook(member: int, hook: str) -> str:
    """`blocks.13.hook_resid_post` of member 1 -> `model1/blocks.13.hook_resid_post`."""
    return f"model{member}/{hook}"


def _vocabulary(lm: HookedLM) -> dict[str, int]:
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise DiffingError(f"{lm.name} has no tokenizer; paired activations need each model's tokenizer.")
    return tokenizer.get_vocab()


def check_same_tokens(lms: Sequence[HookedLM]) -> None:
    """Refuse models that would not read the same token ids the same way (vocabulary or special tokens)."""
    first = lms[0]
    vocab = _vocabulary(first)
    specials = {"bos": first.tokenizer.bos_token_id, "eos": first.tokenizer.eos_token_id}
    for other in lms[1:]:
        theirs = _vocabulary(other)
        if theirs != vocab:
            only_first = len(set(vocab) - set(theirs))
            only_other = len(set(theirs) - set(vocab))
            raise DiffingError(
                f"{first.name} and {other.name} have different tokenizers ({len(vocab):,} and {len(theirs):,} "
                f"tokens; {only_first:,} only in the first, {only_other:,} only in the second), so they cannot "
                "read identical tokens. Diff a model against its own fine-tune, or models of one family."
            )
        other_specials = {"bos": other.tokenizer.bos_token_id, "eos": other.tokenizer.eos_token_id}
        if other_specials != specials:
            raise DiffingError(
                f"{first.name} and {other.name} share a vocabulary but not their special tokens ({specials} "
                f"against {other_specials}); contexts would start differently. Use the same tokenizer for both."
            )


class PairedModels:
    """Models sharing a tokenizer and a width, run on the same tokens; hooks are `model{i}/<hook>`."""

    def __init__(self, lms: Sequence[HookedLM]):
        if len(lms) < 2:
            raise DiffingError(f"paired activations need at least two models; got {len(lms)}.")
        check_same_tokens(lms)
        widths = {lm.name: lm.d_model for lm in lms}
        if len(set(widths.values())) > 1:
            raise DiffingError(
                f"the models have different widths ({widths}); a crosscoder reads the same hook of models "
                "with the same d_model. Diff a model against its own fine-tune."
            )
        self.lms = list(lms)
        self.tokenizer = lms[0].tokenizer
        self.device = lms[0].device
        self.name = " | ".join(lm.name for lm in lms)

    @property
    def names(self) -> list[str]:
        """The member models, in member order (what a crosscoder's `member_models` records)."""
        return [lm.name for lm in self.lms]

    def _split(self, name: str) -> tuple[int, str]:
        match = MEMBER_HOOK.match(name)
        if not match or int(match.group(1)) >= len(self.lms):
            raise DiffingError(
                f"{name!r} names no member's hook point; paired hooks are model0/<hook> to "
                f"model{len(self.lms) - 1}/<hook>, e.g. model1/blocks.13.hook_resid_post."
            )
        return int(match.group(1)), match.group(2)

    def hook_dim(self, name: str) -> int:
        member, hook = self._split(name)
        return self.lms[member].hook_dim(hook)

    @torch.no_grad()
    def capture(
        self, input_ids, hook_names, attention_mask=None, stop_early: bool = True
    ) -> dict[str, torch.Tensor]:
        """Every member's activations on the same `input_ids`, by prefixed hook name, on the first model's device."""
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        by_member: dict[int, list[str]] = {}
        for name in names:
            member, hook = self._split(name)
            by_member.setdefault(member, []).append(hook)
        out = {}
        for member, hooks in by_member.items():
            lm = self.lms[member]
            captured = lm.capture(input_ids.to(lm.device), hooks, attention_mask, stop_early)
            out.update({member_hook(member, hook): value.to(self.device) for hook, value in captured.items()})
        return out
