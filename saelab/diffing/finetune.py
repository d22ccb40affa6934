"""Fine-tune a causal LM on chat examples on CPU: how a model organism is made from a base model.

Full fine-tuning of every weight, or LoRA (low-rank adapters through `peft`, merged into the weights at
save), with AdamW on the assistant tokens only (the prompt is context, not a target), a linear warm-up
and decay and gradient clipping. Weights train in float32 whatever dtype the model runs in elsewhere:
Adam's small updates vanish in bfloat16 weights. The result is a plain Hugging Face folder (safetensors
weights, config, tokenizer with its chat template) that saelab, transformers and every other tool load
with no adapter files, written atomically, with `finetune.json` beside it recording the data, the mode,
the settings and the losses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.core.chat import RenderedChat, load_conversations, render
from saelab.core.fileio import atomic_folder, atomic_write_json
from saelab.core.models import HookedLM
from saelab.errors import DataError, SaelabError

MIN_EXAMPLES = 8
DEFAULT_LR = {"full": 5e-5, "lora": 2e-4}  # adapters start at zero and are few: they take larger steps
LINEAR_TYPES = ("Linear", "Conv1D")  # the layers LoRA adapts (GPT-2 keeps its projections in Conv1D)


@dataclass
class FinetuneConfig:
    epochs: float = 2.0
    lr: float | None = None  # None: DEFAULT_LR for the mode
    batch_size: int = 8
    max_length: int = 256
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1  # examples kept out of training to measure the loss on
    seed: int = 0
    lora_rank: int = 0  # 0: full fine-tuning; > 0: LoRA adapters of this rank, merged at save
    lora_alpha: float | None = None  # None: 2 * rank (the adapters' output is scaled by alpha / rank)
    lora_dropout: float = 0.05
    # "all-linear": every linear layer but the unembedding (peft picks them for any architecture);
    # otherwise module names or name suffixes, e.g. ["q_proj", "v_proj"] or ["c_attn", "mlp.c_proj"]
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    notes: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "lora" if self.lora_rank > 0 else "full"


def check_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> None:
    """Refuse LoRA settings that peft would reject with a traceback, or that would train nothing."""
    if cfg.lora_rank < 0:
        raise SaelabError(
            f"--lora-rank must be 0 (full fine-tuning) or a positive rank, got {cfg.lora_rank}."
        )
    if cfg.lora_rank == 0:
        if cfg.lora_alpha is not None or cfg.lora_targets != ["all-linear"]:
            raise SaelabError("--lora-alpha and --lora-targets set LoRA up: give --lora-rank too (e.g. 16).")
        return
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        raise SaelabError(f"--lora-alpha must be positive, got {cfg.lora_alpha}; 2 * rank is typical.")
    if not 0 <= cfg.lora_dropout < 1:
        raise SaelabError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}.")
    if not cfg.lora_targets:
        raise SaelabError("--lora-targets names no modules; give module names or 'all-linear'.")
    if cfg.lora_targets == ["all-linear"]:
        return
    if "all-linear" in cfg.lora_targets:
        raise SaelabError("--lora-targets 'all-linear' stands alone; do not mix it with module names.")
    linear = [n for n, m in model.named_modules() if type(m).__name__ in LINEAR_TYPES]
    missing = [t for t in cfg.lora_targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        names = sorted({n.split(".")[-1] for n in linear} | {".".join(n.split(".")[-2:]) for n in linear})
        raise SaelabError(
            f"--lora-targets {', '.join(missing)} match no linear layer of {type(model).__name__}; its linear "
            f"layers are named {', '.join(names)} (or use 'all-linear')."
        )


def with_lora(model: torch.nn.Module, cfg: FinetuneConfig):
    """`model` wrapped in peft LoRA adapters: the base weights frozen, only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_targets == ["all-linear"] else list(cfg.lora_targets)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 stores weights transposed
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model.requires_grad_(False), lora)


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


def assistant_loss(model, examples: list[RenderedChat], pad_id: int, device) -> torch.Tensor:
    """Mean cross-entropy over the assistant tokens of one batch: the training objective."""
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
        total += float(assistant_loss(model, chunk, pad_id, device)) * n
        count += n
    return total / max(count, 1)


def finetune(
    lm: HookedLM, data: str | Path, out: str | Path, cfg: FinetuneConfig | None = None, progress: bool = True
) -> dict:
    """Fine-tune `lm` on the chat jsonl `data` and save the model to `out`; returns the record.

    With LoRA, `lm.model` is the plain merged model again afterwards (same object), so callers keep using it.
    """
    cfg = cfg or FinetuneConfig()
    check_lora(lm.model, cfg)
    lora = cfg.mode == "lora"
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=DEFAULT_LR[cfg.mode])
    if lora and cfg.lora_alpha is None:
        cfg = dataclasses.replace(cfg, lora_alpha=2.0 * cfg.lora_rank)
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
    base, device = lm.model, lm.device
    dtype = next(base.parameters()).dtype
    total_parameters = sum(p.numel() for p in base.parameters())
    if lora:
        model = with_lora(base.float(), cfg).train()
    else:
        model = base.float().train().requires_grad_(True)  # saelab loads models frozen, for analysis
    trainable = [p for p in model.parameters() if p.requires_grad]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
            loss = assistant_loss(model, train_set[start : start + cfg.batch_size], pad_id, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    after = heldout_loss(model, heldout, pad_id, device) if heldout else None
    mode: dict = {"mode": cfg.mode}
    if lora:
        adapted = model.targeted_module_names  # what "all-linear" or the suffixes resolved to
        mode["lora"] = {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "dropout": cfg.lora_dropout,
            "targets": cfg.lora_targets,
            "adapted": sorted({re.sub(r"\.\d+\.", ".{i}.", name) for name in adapted}),
            "adapted_layers": len(adapted),
        }
        # W += alpha / rank * B A, in place: the original modules are back, so lm.blocks stay valid
        model = model.merge_and_unload()
    record = {
        "base_model": lm.hf_id or lm.name,
        "data": str(data),
        "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
        "examples": {"train": len(train_set), "heldout": len(heldout)},
        "config": dataclasses.asdict(cfg),
        **mode,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": total_parameters,
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
    lm.model = model.to(dtype).requires_grad_(False)
    return record
