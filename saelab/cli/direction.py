"""`saelab direction ...`: find directions from contrastive prompts, select them, probe, orthogonalize."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm
from saelab.cli.steering_inputs import CHAT_OPTION, MODEL_OPTION, load_vector, prompt_list
from saelab.errors import SaelabError

direction_app = typer.Typer(
    help="Find directions from contrastive prompts, select them, probe, and orthogonalize weights.",
    no_args_is_help=True,
)


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise SaelabError(
            f"{text!r} is not a comma-separated list of integers (e.g. 4,8,12 or -1,-2)."
        ) from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise SaelabError(f"{text!r} is not a comma-separated list of numbers (e.g. -1,0,1).") from None


@direction_app.command("build")
def direction_build(
    positive: str = typer.Option(
        ..., help="Prompts of the positive set: .txt (one per line), .json or .jsonl."
    ),
    negative: str = typer.Option(..., help="Prompts of the negative set."),
    out: Path = typer.Option(..., help="Folder for directions.safetensors + directions.json (provenance)."),
    layers: str = typer.Option(
        None, help="Comma-separated layers (resid_pre of each); default: every layer."
    ),
    positions: str = typer.Option(
        "-1", help="Token positions, counted back from the prompt's end (-1 = last)."
    ),
    method: str = typer.Option(
        "mean", help="mean (difference in means) or pca (paired differences, unit norm)."
    ),
    chat: bool = CHAT_OPTION,
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Difference-in-means (or PCA) directions at every layer from two prompt sets, saved with provenance."""
    from saelab.interventions.directions import mean_difference, pca_direction

    if method not in ("mean", "pca"):
        raise SaelabError(f"unknown --method {method!r}: use mean or pca.")
    pos, neg = prompt_list(None, positive), prompt_list(None, negative)
    lm = load_lm(model, device, dtype)
    hooks = [f"blocks.{i}.hook_resid_pre" for i in _ints(layers)] if layers else None
    build = mean_difference if method == "mean" else pca_direction
    names = (Path(positive).stem, Path(negative).stem)
    directions = build(
        lm, pos, neg, hooks=hooks, positions=_ints(positions), chat=chat, name=out.name, set_names=names
    )
    directions.save(out)
    table = Table(title=f"{method} directions ({len(pos)} vs {len(neg)} prompts)")
    table.add_column("hook")
    for p in directions.positions:
        table.add_column(f"norm @ {p}", justify="right")
    for i, hook in enumerate(directions.hooks):
        table.add_row(
            hook, *[f"{float(directions.vectors[i, j].norm()):.2f}" for j in range(len(directions.positions))]
        )
    console.print(table)
    console.print(f"saved to {out}")


@direction_app.command("select")
def direction_select(
    sets: str = typer.Argument("code", help="A prompt-set JSON file, or a shipped set by name (code)."),
    out: Path = typer.Option(
        Path("runs/steering/selection"), help="Folder for directions, selection.json, PNG."
    ),
    layers: str = typer.Option(None, help="Comma-separated candidate layers; default: every layer."),
    kl_threshold: float = typer.Option(
        0.1, help="Drop candidates whose ablation KL on neutral prompts is above."
    ),
    min_addition_score: float = typer.Option(
        0.0, help="Drop candidates whose addition leaves the metric below."
    ),
    max_layer_fraction: float = typer.Option(
        0.8, help="Drop layers >= this fraction of the depth (last 20%)."
    ),
    metric: str = typer.Option(
        None, help="Comma-separated first tokens of the behaviour (default: the set's)."
    ),
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Arditi et al. direction selection: score (layer, post-instruction position) candidates and pick one."""
    from saelab.interventions.selection import (
        BehaviourMetric,
        SelectionConfig,
        load_prompt_sets,
        select_direction,
    )

    prompt_sets = load_prompt_sets(sets)
    lm = load_lm(model, device, dtype)
    strings = metric.split(",") if metric else prompt_sets.metric_strings
    behaviour = BehaviourMetric.from_strings(lm.tokenizer, strings, name=prompt_sets.behaviour)
    cfg = SelectionConfig(
        layers=_ints(layers),
        kl_threshold=kl_threshold,
        min_addition_score=min_addition_score,
        max_layer_fraction=max_layer_fraction,
        progress=True,
    )
    result = select_direction(
        lm,
        prompt_sets.positive,
        prompt_sets.negative,
        prompt_sets.positive_val,
        prompt_sets.negative_val,
        behaviour,
        cfg=cfg,
        name=prompt_sets.behaviour,
        set_names=prompt_sets.names,
    )
    result.save(out)
    result.plot(out / "selection.png")
    console.print(result.table(), highlight=False)
    best = result.best
    if best is None:
        console.print(
            "[yellow]every candidate was filtered out[/]; the reasons are in the table and selection.json."
        )
    else:
        console.print(f"selected layer {best.layer}, position {best.position}; results in {out}")


@direction_app.command("caa")
def direction_caa(
    items: str = typer.Argument(
        "optimism", help="An A/B item JSON file, or a shipped set by name (optimism)."
    ),
    out: Path = typer.Option(
        Path("runs/steering/caa"), help="Folder for the vectors, result.json and caa.png."
    ),
    layers: str = typer.Option(None, help="Comma-separated layers; default: every layer."),
    multipliers: str = typer.Option("-1,0,1", help="Comma-separated multipliers of the vector."),
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Contrastive activation addition: vectors from A/B items, p(matching letter) on held-out items."""
    from saelab.core.fileio import atomic_write_json
    from saelab.interventions.caa import CAAConfig, load_items, run_caa

    behaviour, ab_items = load_items(items)
    lm = load_lm(model, device, dtype)
    cfg = CAAConfig(layers=_ints(layers), multipliers=_floats(multipliers))
    vectors, result = run_caa(lm, ab_items, cfg, behaviour)
    vectors.save(out)
    atomic_write_json(out / "result.json", result.to_dict())
    result.plot(out / "caa.png")
    console.print(result.table(), highlight=False)
    console.print(f"best layer {result.best_layer()}; results in {out}")


@direction_app.command("probe")
def direction_probe(
    positive: str = typer.Option(..., help="Prompts of class 1."),
    negative: str = typer.Option(..., help="Prompts of class 0."),
    hook: str = typer.Option(
        "blocks.20.hook_resid_post", help="Hook point the probe reads (last prompt token)."
    ),
    ablate: Path = typer.Option(
        None, help="Also ablate this direction folder's direction (see --ablate-hook)."
    ),
    ablate_hook: str = typer.Option(
        None, help="Which hook's direction in --ablate (default: its middle one)."
    ),
    chat: bool = CHAT_OPTION,
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Train a logistic-regression probe, then check what ablating directions does to it."""
    from saelab.interventions.probes import ablation_check

    pos, neg = prompt_list(None, positive), prompt_list(None, negative)
    lm = load_lm(model, device, dtype)
    extra = {}
    if ablate is not None:
        where, vector = load_vector(ablate, ablate_hook, -1)
        extra[f"{ablate.name} ({where})"] = vector
    check = ablation_check(lm, pos, neg, hook, extra or None, chat=chat, seed=seed)
    console.print(check.table(), highlight=False)
    if out:
        from saelab.core.fileio import atomic_write_json

        atomic_write_json(out, check.to_dict())


@direction_app.command("orthogonalize")
def direction_orthogonalize(
    direction: Path = typer.Argument(..., help="A direction folder or a one-tensor .safetensors file."),
    out: Path = typer.Option(..., help="New Hugging Face model folder."),
    hook: str = typer.Option(None, help="Which hook's direction (default: the folder's best or middle one)."),
    position: int = typer.Option(-1, help="Which token position's direction."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
):
    """Write a model whose residual-stream writers are orthogonal to a direction (= ablating it everywhere)."""
    from saelab.interventions.orthogonalize import write_orthogonalized

    where, vector = load_vector(direction, hook, position)
    lm = load_lm(model, device, "float32")
    provenance = {"direction": str(direction), "hook": where, "position": position}
    folder = write_orthogonalized(lm, vector, out, provenance=provenance, overwrite=overwrite)
    console.print(f"wrote {folder}; load it with saelab's --model {folder} or transformers' from_pretrained.")
