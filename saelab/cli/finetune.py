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
    lr: float = typer.Option(5e-5, help="AdamW learning rate (linear warm-up, then linear decay to zero)."),
    batch_size: int = typer.Option(8, min=1, help="Conversations per step."),
    max_length: int = typer.Option(256, min=8, help="Tokens per conversation (longer ones are cut)."),
    heldout: float = typer.Option(
        0.1, min=0.0, max=0.5, help="Share of examples held out to measure the loss."
    ),
    seed: int = typer.Option(0, help="Seed for shuffling and the held-out split."),
    device: str = DEVICE_OPTION,
):
    """Fine-tune every weight of a model on the assistant turns of chat examples (on CPU for small models),
    and save it as a Hugging Face folder that saelab and transformers load: a model organism to diff."""
    from saelab.diffing.finetune import FinetuneConfig, finetune

    if not lr > 0:
        raise SaelabError(
            f"--lr must be a positive learning rate, got {lr}; 5e-5 is typical for full fine-tuning."
        )
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
    )
    with removed_on_error(out):
        record = finetune(lm, data, out, cfg)
    before, after = record["heldout_loss_before"], record["heldout_loss_after"]
    console.print(
        f"fine-tuned {record['base_model']} for {record['steps']} steps on {record['examples']['train']} "
        f"conversations in {record['seconds']:.0f} s; held-out assistant loss "
        + (f"{before:.3f} -> {after:.3f}" if before is not None else "not measured")
        + f"; wrote {out}"
    )
