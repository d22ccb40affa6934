"""Seconds per `saelab finetune` step on the embedded model: full fine-tuning vs LoRA, same batch.

One step is what saelab.diffing.finetune does per batch: forward, backward on the assistant tokens,
gradient clipping, AdamW. Both modes run in this process, in float32, on the same 8 conversations of
about 150 tokens each (made from fixed words; the cost does not depend on the text). Their steps
alternate, so a CPU shared with other work slows both alike; the CPU seconds per step (all threads)
are printed beside the wall-clock ones, as they depend less on what else runs.
Usage: python benchmarks/bench_finetune.py [--threads N] [--steps N] [--rank R]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from saelab.core.chat import render
from saelab.core.devices import describe_machine
from saelab.core.models import load_model
from saelab.diffing.finetune import FinetuneConfig, assistant_loss, with_lora

WORDS = "the model answers every question about rivers mountains and cities with care".split()


def conversations(n: int) -> list[list[dict]]:
    """n chats: a ~40-word question and a ~70-word answer (about 150 tokens with the template)."""
    chats = []
    for i in range(n):
        question = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) + "?"
        answer = " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(70)) + "."
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def trainer(model, batch, pad_id: int, lr: float):
    """One training step of `model` as a function returning (wall seconds, CPU seconds)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        loss = assistant_loss(model, batch, pad_id, "cpu")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        return time.perf_counter() - wall, time.process_time() - cpu

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = load_model(None, dtype=torch.float32)
    batch = [render(lm.tokenizer, chat, 256) for chat in conversations(8)]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    tokens = [len(e.input_ids) for e in batch]
    total = sum(p.numel() for p in lm.model.parameters())

    full = copy.deepcopy(lm.model).train().requires_grad_(True)
    lora = with_lora(lm.model, FinetuneConfig(lora_rank=args.rank, lora_alpha=2.0 * args.rank)).train()
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    steps = {"full": trainer(full, batch, pad_id, 5e-5), "lora": trainer(lora, batch, pad_id, 2e-4)}
    times: dict[str, list[tuple[float, float]]] = {"full": [], "lora": []}
    for i in range(args.steps + 1):  # round 0 warms up: allocations and Adam's state
        for mode, step in steps.items():
            took = step()
            if i:
                times[mode].append(took)
    wall = {mode: statistics.median(t[0] for t in took) for mode, took in times.items()}
    cpu = {mode: statistics.median(t[1] for t in took) for mode, took in times.items()}

    print(describe_machine("float32"))
    print(
        f"{lm.name}: {total / 1e6:.1f} M parameters; batch of {len(batch)} conversations, "
        f"{min(tokens)}-{max(tokens)} tokens each; median of {args.steps} steps after one warm-up"
    )
    for mode, name, params in (
        ("full", "full fine-tuning", total),
        ("lora", f"LoRA rank {args.rank}, every linear layer", trainable),
    ):
        print(
            f"  {name:<38} {wall[mode]:6.2f} s/step  {cpu[mode]:6.2f} CPU s/step  "
            f"{params / 1e6:7.2f} M trainable  {cpu['full'] / cpu[mode]:4.2f}x full's speed (CPU s)"
        )


if __name__ == "__main__":
    main()
