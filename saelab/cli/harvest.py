"""`saelab harvest`: activations into a disk cache that training can read many times."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from saelab.cli.common import (
    CHAT_HELP,
    DEFAULT_HOOK,
    DEVICE_OPTION,
    DTYPE_OPTION,
    ROLES_HELP,
    console,
    data_config,
    load_lm,
    removed_on_error,
)


def harvest(
    out: Path = typer.Option(Path("runs/activations"), help="Folder for the activation cache."),
    model: list[str] = typer.Option(
        None,
        help="HF hub id, local HF folder or .gguf file; default: embedded SmolLM2-135M-Instruct. Repeat it "
        "for paired activations of models that share a tokenizer (a base and its fine-tune): one data pass, "
        "hooks stored as model0/<hook>, model1/<hook>, ... for a crosscoder.",
    ),
    hook: list[str] = typer.Option(
        [DEFAULT_HOOK], help="Hook point(s) to capture, TransformerLens names; repeat for several."
    ),
    data: str = typer.Option(
        None,
        help="Text: a .txt/.jsonl/.parquet file or folder, or a HF dataset name; default: embedded corpus.",
    ),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet/HF datasets."),
    chat: bool = typer.Option(False, help=CHAT_HELP),
    roles: str = typer.Option(None, help=ROLES_HELP),
    split: str = typer.Option("train", help="Dataset split ('train'/'eval' for the embedded corpus)."),
    context_size: int = typer.Option(128, min=2, help="Tokens per context (BOS included)."),
    tokens: int = typer.Option(
        1_000_000, min=1, help="Activation vectors to store (excluded positions not counted)."
    ),
    batch_contexts: int = typer.Option(32, min=1, help="Contexts per forward pass."),
    exclude_bos: bool = typer.Option(
        True, help="Drop position 0 (BOS / attention sink, norm ~100x the median)."
    ),
    exclude_special: bool = typer.Option(True, help="Drop special tokens."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Shuffling seed."),
):
    """Harvest activations into a memory-mapped, resumable disk cache that training can read many times."""
    from saelab.core.activations import harvest_to_cache

    cfg = data_config(
        data, split, text_field, context_size, exclude_bos, exclude_special, chat=chat, roles=roles
    )
    models = list(model or [None])
    lms = [load_lm(name, device=device, dtype=dtype) for name in models]
    if len(lms) > 1:
        from saelab.diffing.paired import PairedModels, member_hook

        lm = PairedModels(lms)
        hook = [member_hook(i, h) for i in range(len(lms)) for h in hook]
    else:
        lm = lms[0]
    start = time.perf_counter()
    with removed_on_error(out):
        info = harvest_to_cache(lm, cfg, hook, tokens, out, batch_contexts=batch_contexts, seed=seed)
    seconds = time.perf_counter() - start
    console.print(
        f"harvested {info.n_tokens:,} tokens x {len(info.hooks)} hook(s) into {out} "
        f"in {seconds:.0f} s ({info.n_tokens / max(seconds, 1e-9):,.0f} tok/s)"
    )
