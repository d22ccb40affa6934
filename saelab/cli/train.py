"""`saelab train`: one dictionary or a sweep of them on one activation stream."""

from __future__ import annotations

import itertools
import json
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
    model_dtype_name,
    model_file_error,
    removed_on_error,
    resolve_model,
    resolved_device,
)
from saelab.cli.evaluate import evaluate_folders, print_results
from saelab.errors import SaelabError


def parse_layers(spec: str | None, hook: str, output_hook: str | None) -> list[int]:
    """`--layers 0-29` / `0,4,8` / `3` -> [layers]; checks that the hooks say where the layer goes."""
    templated = "{i}" in hook or (output_hook is not None and "{i}" in output_hook)
    if spec is None:
        if templated:
            raise SaelabError(
                f"--hook {hook!r} has {{i}} but no --layers says which layers; add e.g. --layers 0-29."
            )
        return []
    layers: list[int] = []
    try:
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            layers += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise SaelabError(f"--layers {spec!r} is not a layer list; write e.g. 0-29, 0,4,8 or 5.") from None
    if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
        raise SaelabError(f"--layers {spec!r} must list each layer (0 or more) once, e.g. 0-29.")
    if "{i}" not in hook or (output_hook is not None and "{i}" not in output_hook):
        raise SaelabError(
            "--layers trains one dictionary per layer, so --hook (and --output-hook) must say where the layer "
            "goes with {i}, e.g. --hook blocks.{i}.ln2.hook_normalized --output-hook blocks.{i}.hook_mlp_out."
        )
    return sorted(layers)


def parse_numbers(spec: str | None, flag: str, kind=float) -> list:
    """`128,512,2048` -> [128, 512, 2048] (None -> [])."""
    if spec is None:
        return []
    try:
        return [kind(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise SaelabError(
            f"{flag} {spec!r} is not a comma-separated list of numbers, e.g. 128,512,2048."
        ) from None


def at_layer(hook: str | None, layer: int | None) -> str | None:
    return hook if hook is None or layer is None else hook.replace("{i}", str(layer))


def sweep_configs(
    architecture,
    width,
    k,
    l1,
    target_l0,
    hook,
    output_hook,
    d_in,
    seed,
    encoder_dtype="auto",
    layers=None,
    family_options=None,
):
    """The cartesian product of the sweep options: each family's knob takes the values of its flag.

    `layers`: the layers cross-layer families read (each gets `width` latents per layer).
    `family_options`: family option -> value, given to the families that have that option."""
    from saelab.dictionaries import FAMILIES, DictionaryConfig

    unknown = [arch for arch in architecture if arch not in FAMILIES]
    if unknown:
        raise SaelabError(f"unknown --architecture {unknown[0]!r}; choose from {', '.join(FAMILIES)}.")
    if any(FAMILIES[arch].knob == "k" for arch in architecture) and max(k) > min(width):
        raise SaelabError(
            f"--k {max(k)} is larger than --width {min(width)}: k must be at most the number of latents."
        )
    if encoder_dtype not in ("auto", "float32", "bfloat16"):
        raise SaelabError(f"unknown --encoder-dtype {encoder_dtype!r}; use auto, float32 or bfloat16.")
    # The knob each flag sweeps; a family whose knob has no flag trains at the knob's default.
    flags = {"k": k, "l1_coefficient": l1, "target_l0": target_l0}
    configs = []
    for arch, d_sae in itertools.product(architecture, width):
        fam = FAMILIES[arch]
        own = {name: value for name, value in (family_options or {}).items() if name in fam.options}
        for value in flags.get(fam.knob, [fam.knob_default]):
            configs.append(
                DictionaryConfig(
                    architecture=arch,
                    d_in=d_in,
                    d_sae=d_sae * len(layers) if per_layer(fam) else d_sae,
                    layers=list(layers) if fam.cross_layer else None,
                    hook_name=hook,
                    output_hook_name=output_hook,
                    seed=seed,
                    encoder_dtype=encoder_dtype,
                    **fam.with_knob(value, {"options": own} if own else None),
                )
            )
    return configs


def per_layer(fam) -> bool:
    """Whether --width counts a family's latents per layer (a CLT) rather than in all (a crosscoder)."""
    return fam.cross_layer and getattr(fam.cls, "latents_per_layer", True)


def layer_configs(
    architecture, width, k, l1, target_l0, hook, output_hook, layers, seed, encoder_dtype, family_options=None
):
    """The sweep's configs: per-layer families once per layer, cross-layer families (clt) once over all
    the layers, with --width latents at each layer."""
    from saelab.dictionaries import FAMILIES

    cross = [arch for arch in architecture if arch in FAMILIES and FAMILIES[arch].cross_layer]
    single = [arch for arch in architecture if arch not in cross]
    if cross and not layers:
        raise SaelabError(
            f"--architecture {cross[0]} is a cross-layer transcoder: it reads every layer at once. Give "
            "--layers (e.g. 0-29) with --hook blocks.{i}.ln2.hook_normalized --output-hook blocks.{i}.hook_mlp_out."
        )
    configs = []
    for layer in (layers or [None]) if single else []:
        configs += sweep_configs(
            single, width, k, l1, target_l0, at_layer(hook, layer), at_layer(output_hook, layer), 0, seed,
            encoder_dtype, family_options=family_options,
        )  # fmt: skip
    if cross:
        configs += sweep_configs(
            cross, width, k, l1, target_l0, hook, output_hook, 0, seed, encoder_dtype, layers, family_options
        )
    return configs


def train(
    run_dir: Path = typer.Option(
        Path("runs/sae"), help="Run folder: config, checkpoints, metrics.jsonl, saes/."
    ),
    model: str = typer.Option(
        None, help="HF hub id, local folder or .gguf; default: embedded SmolLM2-135M-Instruct."
    ),
    hook: str = typer.Option(DEFAULT_HOOK, help="Input hook point; with --layers, {i} stands for the layer."),
    output_hook: str = typer.Option(
        None, help="Train transcoders: predict this hook from --hook (e.g. blocks.15.hook_mlp_out)."
    ),
    layers: str = typer.Option(
        None,
        help="One dictionary per layer from one pass over the data, e.g. 0-29 or 0,4,8 with "
        "--hook blocks.{i}.ln2.hook_normalized --output-hook blocks.{i}.hook_mlp_out; streams the "
        "activations (no cache) unless --activations is given, and writes a dictionary set per sweep "
        "point to run-dir/sets/.",
    ),
    buffer_gib: float = typer.Option(
        2.0, min=0.0001, help="With --layers: the streaming shuffle buffer's memory over all hooks, GiB."
    ),
    architecture: list[str] = typer.Option(
        ["topk"],
        help="relu, gated, topk, batchtopk, jumprelu, clt, clt_batchtopk (cross-layer transcoders: one "
        "dictionary over all --layers) or a family added in saelab/dictionaries/families/; repeat to sweep.",
    ),
    width: list[int] = typer.Option(
        [4608], min=1, help="Latents (d_sae; for a cross-layer transcoder, per layer); repeat to sweep."
    ),
    k: list[int] = typer.Option(
        [32],
        min=1,
        help="topk/batchtopk/clt_batchtopk: active latents per token (per layer); repeat to sweep.",
    ),
    l1: list[float] = typer.Option(
        [5.0], help="relu/gated: L1 coefficient, clt: tanh penalty λ; repeat to sweep."
    ),
    target_l0: list[float] = typer.Option([32.0], help="jumprelu: target L0; repeat to sweep."),
    matryoshka_widths: str = typer.Option(
        None,
        help="matryoshka_batchtopk: nested prefix widths ending at --width, e.g. 128,512,2048 "
        "(default: width/16, width/4, width).",
    ),
    matryoshka_fractions: str = typer.Option(
        None,
        help="matryoshka_batchtopk: each group's share of --width instead of widths, summing to 1, e.g. "
        "0.0625,0.1875,0.75 (for width sweeps).",
    ),
    matryoshka_weights: str = typer.Option(
        None, help="matryoshka_batchtopk: one loss weight per prefix (default: the mean over prefixes)."
    ),
    encoder_dtype: str = typer.Option(
        "auto",
        help="topk: encoder matmul dtype while training; auto = bfloat16 where the model's auto dtype is "
        "bfloat16 (~1.4x faster on AMX CPUs / GPUs), else float32.",
    ),
    data: str = typer.Option(
        None, help="Text source (file, folder or HF dataset); default: embedded corpus."
    ),
    text_field: str = typer.Option("text", help="Field holding the text."),
    chat: bool = typer.Option(False, help=CHAT_HELP),
    roles: str = typer.Option(None, help=ROLES_HELP),
    context_size: int = typer.Option(128, min=2, help="Tokens per context."),
    activations: Path = typer.Option(
        None, help="Train from this `saelab harvest` cache instead of harvesting."
    ),
    stream: bool = typer.Option(
        False, help="Train straight from the model through a shuffle buffer (no disk)."
    ),
    tokens: int = typer.Option(1_000_000, min=1, help="Training tokens."),
    harvest_tokens: int = typer.Option(
        None, min=1, help="Tokens to harvest into the run's cache (default: --tokens); fewer trains epochs."
    ),
    batch_size: int = typer.Option(1024, min=1, help="Activation vectors per step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (linear warm-up, decay over the last 20%)."),
    dead_after_tokens: int = typer.Option(
        25_000, min=1, help="A latent silent this long is dead (AuxK revives it)."
    ),
    resample_every: int = typer.Option(
        0,
        min=0,
        help="Every this many tokens, point dead latents at the worst-reconstructed inputs (0: never).",
    ),
    checkpoint_every: int = typer.Option(200, min=1, help="Steps between atomic checkpoints."),
    exclude_bos: bool = typer.Option(True, help="Exclude position 0 (attention sink) from training."),
    exclude_special: bool = typer.Option(True, help="Exclude special tokens from training."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Seed for initialisation and shuffling."),
    resume: bool = typer.Option(False, help="Continue the run in --run-dir from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace a finished or unfinished run in --run-dir."),
    evaluate_after: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate every trained dictionary."),
):
    """Train one or many dictionaries (a sweep) on one activation stream. Runs under torchrun too."""
    from safetensors import SafetensorError

    import saelab.toy.hierarchy  # noqa: F401 (registers the "hierarchy" source: --resume of a toy run)
    import saelab.toy.synthetic  # noqa: F401 (registers the "synthetic" source, likewise)
    from saelab.core import distributed
    from saelab.training import CHECKPOINT, TrainConfig
    from saelab.training import train as run_training

    if not lr > 0:
        raise SaelabError(f"--lr must be a positive learning rate, got {lr}; 1e-3 is typical.")
    if tokens < batch_size:
        raise SaelabError(
            f"--tokens {tokens:,} is fewer than one batch (--batch-size {batch_size:,}), so no step would run. "
            "Ask for more tokens or a smaller batch size."
        )
    layer_list = parse_layers(layers, hook, output_hook)
    family_options = {
        "matryoshka_widths": parse_numbers(matryoshka_widths, "--matryoshka-widths", int),
        "group_fractions": parse_numbers(matryoshka_fractions, "--matryoshka-fractions", float),
        "group_weights": parse_numbers(matryoshka_weights, "--matryoshka-weights", float),
    }
    dictionaries = layer_configs(
        architecture, width, k, l1, target_l0, hook, output_hook, layer_list, seed, encoder_dtype,
        {name: value for name, value in family_options.items() if value},
    )  # fmt: skip
    layered = len(layer_list) > 1
    if layered and not activations and not stream:
        stream = True  # a cache of every layer's hooks would be n_layers times one hook's
        console.print(f"--layers: streaming {len(layer_list)} layers' activations (no cache) through a "
                      f"{buffer_gib:g} GiB shuffle buffer")  # fmt: skip
    cfg = TrainConfig(
        run_dir=str(run_dir),
        model=resolve_model(model),
        data=data_config(
            data, "train", text_field, context_size, exclude_bos, exclude_special, chat=chat, roles=roles
        ),
        dictionaries=dictionaries,
        activations=str(activations) if activations else None,
        stream=stream,
        buffer_bytes=int(buffer_gib * 2**30) if layered else None,
        layered=layered,
        n_tokens=tokens,
        harvest_tokens=harvest_tokens,
        batch_size=batch_size,
        lr=lr,
        dead_after_tokens=dead_after_tokens,
        resample_every_tokens=resample_every,
        checkpoint_every=checkpoint_every,
        seed=seed,
        device=resolved_device(device),
        model_dtype=model_dtype_name(dtype),
        evaluate_after=evaluate_after,
    )

    def has_checkpoint(folder: Path) -> bool:  # worth keeping for --resume
        return (folder / CHECKPOINT).exists() or not distributed.is_main()

    with removed_on_error(run_dir, keep_if=has_checkpoint):
        try:
            saved = run_training(cfg, resume=resume, overwrite=overwrite)
        except SafetensorError as err:  # only the model's weights are safetensors on this path
            raise model_file_error(cfg.model, err) from None
    if saved and distributed.is_main():
        console.print(f"trained {len(saved)} dictionar{'y' if len(saved) == 1 else 'ies'} in {run_dir}")
        # The run's own options (a resumed run keeps those it started with, not this call's defaults).
        ran = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        if ran.evaluate_after:
            results = evaluate_folders(
                list(saved.values()),
                ran.model,
                ran.data.source,
                65536,
                128,
                ran.device,
                dtype=ran.model_dtype,
                chat=ran.data.chat or None,
                roles=ran.data.roles,
            )
            print_results(results)
    distributed.cleanup()
