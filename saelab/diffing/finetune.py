"""Fine-tune a causal LM on chat examples on CPU: how a model organism is made from a base model.

Full fine-tuning of every weight with AdamW, on the assistant tokens only (the prompt is context, not a
target), with a linear warm-up and decay and gradient clipping. Weights train in float32 whatever
dtype the model runs in elsewhere: Adam's small updates vanish in bfloat16 weights. The result is a
plain Hugging Face folder (safetensors weights, config, tokenizer with its chat template) that saelab,
transformers and every other tool load, written atomically, with `finetune.json` beside it recording
the data, the settings and the losses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.core.chat import RenderedChat, load_conversations, render
from saelab.core.fileio import atomic_folder, atomic_write_json
from saelab.core.models import HookedLM
from saelab.errors import DataError

MIN_EXAMPLES = 8


@dataclass
class FinetuneConfig:
    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 8
    max_length: int = 256
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1  # examples kept out of training to measure the loss on
    seed: int = 0
    notes: dict = field(default_factory=dict)


def _batch(examples: list[RenderedChat], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 everywhere but assistant tokens)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        mask = torch.tensor(example.assistant)
        labels[row, :n] = torch.where(mask, ids[row, :n], torch.tensor(-100))
    return ids, attention, labels


def _loss(model, examples: list[RenderedChat], pad_id: int, device) -> torch.Tensor:
    ids, attention, labels = (t.to(device) for t in _batch(examples, pad_id))
    return model(input_ids=ids, attention_mask=attention, labels=labels).loss


@torch.no_grad()
def heldout_loss(model, examples: list[RenderedChat], pad_id: int, device, batch_size: int = 8) -> float:
    """Mean cross-entropy per assistant token over `examples`."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        n = sum(
            sum(e.assistant[1:]) for e in chunk
        )  # labels shift by one: the first token is never predicted
        total += float(_loss(model, chunk, pad_id, device)) * n
        count += n
    return total / max(count, 1)


def finetune(
    lm: HookedLM, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None, progress: bool = True
) -> dict:
    """Fine-tune `lm`'s weights on the chat jsonl `data` and save the model to `out`; returns the record."""
    cfg = cfg or FinetuneConfig()
    conversations = load_conversations(data)
    examples = [render(lm.tokenizer, messages, cfg.max_length) for messages in conversations]
    examples = [e for e in examples if any(e.assistant[1:])]
    if len(examples) < MIN_EXAMPLES:
        raise DataError(
            f"{data} gives {len(examples)} usable conversations (with assistant tokens within --max-length "
            f"{cfg.max_length}); fine-tuning needs at least {MIN_EXAMPLES}. Add examples."
        )
    rng = random.Random(cfg.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_heldout = max(1, int(cfg.heldout_fraction * len(examples))) if cfg.heldout_fraction > 0 else 0
    heldout = [examples[i] for i in order[:n_heldout]]
    train_set = [examples[i] for i in order[n_heldout:]]
    torch.manual_seed(cfg.seed)
    model, device = lm.model, lm.device
    dtype = next(model.parameters()).dtype
    model.float().train().requires_grad_(True)  # saelab loads models frozen, for analysis
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    before = heldout_loss(model.eval(), heldout, pad_id, device) if heldout else None
    model.train()
    losses, started = [], time.perf_counter()
    bar = tqdm(total=total_steps, desc="finetune", unit="step", disable=not progress)
    step = 0
    while step < total_steps:
        rng.shuffle(train_set)
        for start in range(0, len(train_set), cfg.batch_size):
            if step >= total_steps:
                break
            loss = _loss(model, train_set[start : start + cfg.batch_size], pad_id, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    after = heldout_loss(model, heldout, pad_id, device) if heldout else None
    record = {
        "base_model": lm.hf_id or lm.name,
        "data": str(data),
        "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
        "examples": {"train": len(train_set), "heldout": len(heldout)},
        "config": dataclasses.asdict(cfg),
        "steps": step,
        "seconds": round(time.perf_counter() - started, 1),
        "train_loss_first_10": sum(losses[:10]) / len(losses[:10]),
        "train_loss_last_10": sum(losses[-10:]) / len(losses[-10:]),
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "losses": [round(x, 5) for x in losses],
    }
    with atomic_folder(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "finetune.json", record)
    model.to(dtype).requires_grad_(False)
    return record
