"""Generation with and without interventions, side by side, with the same seed; and fluency.

Prompts are left-padded into one batch (the chat template applied when the tokenizer has one and
`chat=True`), so the prompt occupies positions [0, prompt_len) of every row and an intervention's
scope ("prompt" / "generated") means the same thing in every row. Sampling uses a fixed seed in a
forked RNG: steered and unsteered runs draw the same random numbers, and the caller's RNG is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from saelab.errors import DataError
from saelab.steering.interventions import Intervention, steer


@dataclass
class GenerationConfig:
    """Sampling settings shared by steered and unsteered runs."""

    max_new_tokens: int = 40
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int = 0
    chat: bool = True  # wrap each prompt in the tokenizer's chat template as a user turn
    batch_size: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool) -> list[str]:
    """The exact text fed to the model: the chat template's user turn, or the prompt as is."""
    if chat and getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    return list(prompts)


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, left: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> input_ids and attention_mask [batch, width], padded left or right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def encode_left_padded(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [batch, width], padded on the left; chat texts carry their own BOS."""
    rows = [
        tokenizer(t, add_special_tokens=not t.startswith(tokenizer.bos_token or "\0"))["input_ids"]
        for t in texts
    ]
    if not rows or any(len(r) == 0 for r in rows):
        raise DataError("an empty prompt cannot be completed; give every prompt some text.")
    ids, mask = pad_rows(rows, _pad_id(tokenizer))
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    lm,
    prompts: Sequence[str],
    interventions: Iterable[Intervention] = (),
    cfg: GenerationConfig | None = None,
) -> list[str]:
    """Completions of `prompts` (new text only) under `interventions`, sampled with `cfg.seed`."""
    cfg = cfg or GenerationConfig()
    interventions = list(interventions)
    texts = format_prompts(lm.tokenizer, prompts, cfg.chat)
    out: list[str] = []
    for start in range(0, len(texts), cfg.batch_size):
        ids, mask = encode_left_padded(lm.tokenizer, texts[start : start + cfg.batch_size], lm.device)
        sampling = (
            {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p}
            if cfg.temperature > 0
            else {"do_sample": False}
        )
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + start)
            with steer(lm, interventions, prompt_len=ids.shape[1]):
                new = lm.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=_pad_id(lm.tokenizer),
                    **sampling,
                )
        out += lm.tokenizer.batch_decode(new[:, ids.shape[1] :], skip_special_tokens=True)
    return out


def compare(
    lm, prompts: Sequence[str], interventions: Iterable[Intervention], cfg: GenerationConfig | None = None
) -> list[dict]:
    """[{prompt, unsteered, steered}] with the same seed, for side-by-side reading."""
    interventions = list(interventions)
    plain = generate(lm, prompts, (), cfg)
    steered = generate(lm, prompts, interventions, cfg)
    return [
        {"prompt": p, "unsteered": a, "steered": b} for p, a, b in zip(prompts, plain, steered, strict=True)
    ]


@torch.no_grad()
def completion_loss(
    lm, prompts: Sequence[str], completions: Sequence[str], chat: bool = True, batch_size: int = 16
) -> float:
    """Mean per-token cross-entropy of `completions` after their prompts under the UNSTEERED model.

    A fluency check for steered text: gibberish gets a high loss, fluent on-topic text a low one.
    """
    texts = format_prompts(lm.tokenizer, prompts, chat)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        rows, starts = [], []
        for prompt, completion in zip(
            texts[start : start + batch_size], completions[start : start + batch_size], strict=True
        ):
            p = lm.tokenizer(
                prompt, add_special_tokens=not prompt.startswith(lm.tokenizer.bos_token or "\0")
            )["input_ids"]
            c = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
            rows.append(p + c)
            starts.append(len(p))
        ids, mask = pad_rows(rows, _pad_id(lm.tokenizer), left=False)
        logits = lm.forward(ids, mask).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none")
        for i, r in enumerate(rows):
            scored = nll[i, starts[i] - 1 : len(r) - 1]
            total += float(scored.sum())
            count += scored.numel()
    if count == 0:
        raise DataError("the completions are all empty; there is nothing to score.")
    return total / count


def load_prompts(path, key: str | None = None) -> list[str]:
    """Prompts from a file: .txt (one per non-empty line), .json (a list, or `key` of an object) or .jsonl."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"prompt file {path} does not exist; give a .txt (one prompt per line), .json or .jsonl file."
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                if key is None or key not in data:
                    raise DataError(
                        f"{path} holds an object with keys {sorted(data)}; name the list to use ({path}:KEY)."
                    )
                data = data[key]
            prompts = data
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = [r if isinstance(r, str) else r.get(key or "prompt", r.get("text")) for r in rows]
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path} is not valid JSON ({err}); fix the file or use one prompt per line in a .txt."
        ) from None
    if (
        not isinstance(prompts, list)
        or not prompts
        or not all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise DataError(
            f"{path} holds no prompts (or some are not non-empty strings); give at least one prompt."
        )
    return prompts
