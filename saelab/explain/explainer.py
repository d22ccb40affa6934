"""The explainer: a versioned prompt of marked examples, an LM's completion, a short parsed label.

`Explainer.explain` returns `n` explanations of one latent (sample 0 greedy unless a temperature is
set; each sample seeded by `seed + i`), each with its full provenance: the client's `describe()`, the
prompt version, the ids of the examples shown, the seed and the settings, and the raw completion.

Parsing (`parse_label`): the `<<` `>>` marks dropped, then the first non-empty line, with a leading "Explanation:" / "Label:" / "Answer:"
(and similar) prefix, bullets, markdown emphasis, surrounding quotes and a trailing period removed, cut
at `max_chars` on a word boundary. A completion with no letter or digit left is junk: `parse_label`
raises DataError, and `explain` records it as a failure (``text`` None, ``error`` set) rather than
stopping a run over thousands of latents on one bad sample.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from saelab.errors import DataError
from saelab.explain.clients.base import LMClient
from saelab.explain.examples import CLOSE, OPEN, Example, format_example

PROMPT_VERSION = "explain-v1"

SYSTEM = (
    "You are a meticulous interpretability researcher. You study one feature of a language model: "
    "a unit that fires on some tokens of some texts."
)
INSTRUCTIONS = (
    "Below are texts on which the feature fires. The tokens where it fires are marked <<like this>>.\n"
    "Find what the marked tokens, and the text just before them, have in common.\n\n"
    "{examples}\n\n"
    "Reply with a short label for the feature, at most 15 words, and nothing else."
)
_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:feature\s+)?(?:final\s+)?(?:explanation|label|answer|description|summary|feature)"
    r"\s*[:\-]\s*",
    re.IGNORECASE,
)
_WRAP = "\"'`*_“”‘’«» "


def build_prompt(examples: Sequence[Example], show_values: bool = False) -> list[dict]:
    """The chat asking for a label of the latent that fires on `examples` (version `PROMPT_VERSION`)."""
    if not examples:
        raise DataError("an explanation needs at least one activating example to show the explainer.")
    listed = "\n".join(
        f"Example {i + 1}: {format_example(e, show_values=show_values)}" for i, e in enumerate(examples)
    )
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": INSTRUCTIONS.format(examples=listed)},
    ]


def parse_label(completion: str, max_chars: int = 120) -> str:
    """A short label from a completion (see the module docstring); DataError for junk or nothing."""
    # The examples' marks are not part of a label (small models copy them): drop them first.
    completion = (completion or "").replace(OPEN, "").replace(CLOSE, "")
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    text = ""
    for line in lines:
        text = _PREFIX.sub("", line.lstrip("-*•# ").strip())
        if text.strip(_WRAP):
            break
    text = text.strip(_WRAP).rstrip(".").strip(_WRAP)
    text = re.sub(r"\s+", " ", text)
    if len(text) > max_chars:
        cut = text[: max_chars + 1].rsplit(" ", 1)[0]
        text = (cut if cut else text[:max_chars]).rstrip(" ,;:-")
    if not re.search(r"\w", text):
        raise DataError(
            f"the explainer's completion {completion[:80]!r} holds no label; try a larger explainer "
            "model, more max_new_tokens, or a lower temperature."
        )
    return text


@dataclass
class ExplanationResult:
    """One sampled explanation: its label (None when the completion was junk), what made it, the raw reply."""

    text: str | None
    source: dict
    raw: str
    error: str | None = None


@dataclass
class Explainer:
    """Labels a latent from its activating examples with `client.generate`."""

    client: LMClient
    max_new_tokens: int = 48
    temperature: float | None = None  # None: 0 (greedy) for one explanation, 0.7 for several
    show_values: bool = False
    max_chars: int = 120
    extra: dict = field(default_factory=dict)  # more settings to record in the provenance

    def settings(self, n: int) -> dict:
        temperature = self.temperature if self.temperature is not None else (0.0 if n == 1 else 0.7)
        return {
            "max_new_tokens": self.max_new_tokens, "temperature": temperature,
            "show_values": self.show_values, "max_chars": self.max_chars, **self.extra,
        }  # fmt: skip

    def explain(self, examples: Sequence[Example], n: int = 1, seed: int = 0) -> list[ExplanationResult]:
        """`n` explanations from the same prompt, sample i seeded by seed + i."""
        return self.explain_many([examples], n, seed)[0]

    def explain_many(
        self, example_lists: Sequence[Sequence[Example]], n: int = 1, seed: int = 0
    ) -> list[list[ExplanationResult]]:
        """`explain` for several latents at once: their prompts go to the client in one `generate` call per
        sample, so a local model decodes them as one batch. Each result is the one `explain` would give
        (greedy decoding is batch-independent up to float rounding; samples are seeded per prompt)."""
        if not (isinstance(n, int) and n >= 1):
            raise DataError(f"n (explanations per latent) is {n!r}; use a whole number >= 1.")
        settings = self.settings(n)
        if n > 1 and settings["temperature"] == 0:
            raise DataError("several explanations per latent need a temperature above 0 (greedy gives one).")
        prompts = [build_prompt(examples, self.show_values) for examples in example_lists]
        describe = self.client.describe()
        out: list[list[ExplanationResult]] = [[] for _ in prompts]
        for i in range(n):
            raws = self.client.generate(
                prompts,
                max_new_tokens=self.max_new_tokens,
                temperature=settings["temperature"],
                seed=seed + i,
            )
            for results, examples, raw in zip(out, example_lists, raws, strict=True):
                source = {
                    "method": "auto", "explainer": describe, "prompt_version": PROMPT_VERSION,
                    "example_ids": [e.id for e in examples], "seed": seed + i, "sample": i,
                    "settings": settings, "raw": raw,
                }  # fmt: skip
                try:
                    results.append(ExplanationResult(parse_label(raw, self.max_chars), source, raw))
                except DataError as e:
                    results.append(ExplanationResult(None, source, raw, str(e)))
        return out
