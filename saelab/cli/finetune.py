"""`saelab finetune`: a model fine-tuned on chat examples, saved as a plain Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import DEVICE_OPTION, console, load_lm, removed_on_error
from saelab.errors import SaelabError


def finetune_command(
    data: Path = typer.Argument(
        ..., help='A .jsonl of conversations: {"messages": [{"role", "content"}, ...]}.'
    ),
    out: Path = typer.Option(
        ..., help="The folder to write the fine-tuned model to (a Hugging Face folder)."
    ),
    model: str = typer.Option(
        None, help="The model to fine-tune; default: the embedded SmolLM2-135M-Instruct."
    ),
    epochs: float = typer.Option(2.0, min=0.01, help="Passes over the training examples."),
    lr: float = typer.Option(
        None,
        help="AdamW learning rate (linear warm-up, then linear decay to zero); default: 5e-5 for full "
        "fine-tuning, 2e-4 for LoRA.",
    ),
    batch_size: int = typer.Option(8, min=1, help="Conversations per step."),
    max_length: int = typer.Option(256, min=8, help="Tokens per conversation (longer ones are cut)."),
    heldout: float = typer.Option(
        0.1, min=0.0, max=0.5, help="Share of examples held out to measure the loss."
    ),
    seed: int = typer.Option(0, help="Seed for shuffling and the held-out split."),
    lora_rank: int = typer.Option(
        0,
        help="0: fine-tune every weight. > 0: train LoRA adapters of this rank (through peft) and merge them "
        "into the weights at save; 8-64 is typical.",
    ),
    lora_alpha: float = typer.Option(
        None, help="LoRA scale: the adapters' output is multiplied by alpha / rank; default: 2 * rank."
    ),
    lora_dropout: float = typer.Option(0.05, help="Dropout on the adapters' input while training."),
    lora_targets: str = typer.Option(
        "all-linear",
        help="Comma-separated names (or name suffixes) of the linear layers to adapt, e.g. q_proj,v_proj; "
        "default: every linear layer but the unembedding.",
    ),
    device: str = DEVICE_OPTION,
):
    """Fine-tune a model on the assistant turns of chat examples (on CPU for small models), every weight or
    LoRA adapters merged at save, and save it as a Hugging Face folder that saelab and transformers load:
    a model organism to diff."""
    from saelab.diffing.finetune import FinetuneConfig, finetune

    if lr is not None and not lr > 0:
        raise SaelabError(
            f"--lr must be a positive learning rate, got {lr}; 5e-5 is typical for full fine-tuning, "
            "2e-4 for LoRA."
        )
    targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    lm = load_lm(
        model, device=device, dtype="float32"
    )  # weights train in float32 (see saelab.diffing.finetune)
    cfg = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        heldout_fraction=heldout,
        seed=seed,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_targets=targets,
    )
    with removed_on_error(out):
        record = finetune(lm, data, out, cfg)
    before, after = record["heldout_loss_before"], record["heldout_loss_after"]
    mode = "every weight" if record["mode"] == "full" else f"LoRA rank {lora_rank}, merged"
    console.print(
        f"fine-tuned {record['base_model']} ({mode}; {record['trainable_parameters']:,} trainable parameters) "
        f"for {record['steps']} steps on {record['examples']['train']} conversations in {record['seconds']:.0f} s; held-out assistant loss "
        + (f"{before:.3f} -> {after:.3f}" if before is not None else "not measured")
        + f"; wrote {out}"
    )
