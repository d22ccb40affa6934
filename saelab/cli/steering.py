"""The `saelab steer` and `saelab direction` commands: thin wrappers over saelab.interventions (imported lazily)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from saelab.errors import SaelabError

steer_app = typer.Typer(
    help="Steer generations with features and vectors; decompose vectors into features.", no_args_is_help=True
)
direction_app = typer.Typer(
    help="Find directions from contrastive prompts, select them, probe, and orthogonalize weights.",
    no_args_is_help=True,
)

_MODEL = typer.Option(None, help="Model; default: the embedded SmolLM2-135M-Instruct (or the SAE's model).")
_DEVICE = typer.Option("auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps.")
_DTYPE = typer.Option(
    "auto",
    help="Model dtype: auto (bfloat16 where the CPU or GPU has bf16 matrix units, else float32), "
    "bfloat16, float32 or float16.",
)
_CHAT = typer.Option(True, "--chat/--no-chat", help="Wrap prompts in the chat template as a user turn.")


def _console():
    from saelab.cli import console

    return console


def _lm(model: str | None, device: str, dtype: str):
    from saelab.cli import _dtype, _load_model, resolve_model

    return _load_model(resolve_model(model), device=device, dtype=_dtype(dtype))


def _prompt_list(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts given on the command line and/or in a file (FILE or FILE:KEY for a JSON object)."""
    from saelab.interventions.generation import load_prompts

    out = list(prompts or [])
    if prompts_file:
        path, _, key = (
            prompts_file.partition(":") if not Path(prompts_file).exists() else (prompts_file, "", "")
        )
        out += load_prompts(path, key or None)
    if not out:
        raise SaelabError("no prompts: pass them as arguments or with --prompts FILE.")
    return out


def _vector(path: Path, hook: str | None, position: int):
    """(hook, vector) from a saved DirectionSet folder, or a .safetensors file holding one vector."""
    from saelab.interventions.directions import DirectionSet

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise SaelabError(
                f"{path} holds {len(tensors)} tensors; save exactly one vector, or use a direction folder."
            )
        (vector,) = tensors.values()
        if hook is None:
            raise SaelabError(f"{path} does not say where the vector lives; pass --hook.")
        return hook, vector.float().reshape(-1)
    directions = DirectionSet.load(path)
    hook = hook or directions.provenance.get("best_hook") or directions.hooks[len(directions.hooks) // 2]
    return hook, directions.get(hook, position)


def _interventions(lm, sae, feature, strength, mode, vector, hook, position, alpha, ablate, scope):
    from saelab.dictionaries.io import load_dictionary
    from saelab.interventions.hooks import AddVector, ClampFeature, ablation, add_feature

    out = []
    if feature is not None:
        if sae is None:
            raise SaelabError("--feature needs --sae (the dictionary whose feature to steer with).")
        dictionary = load_dictionary(sae).to(lm.device)
        if mode == "clamp":
            out.append(
                ClampFeature(
                    dictionary.cfg.hook_name,
                    dictionary=dictionary,
                    features=[feature],
                    values=[strength],
                    scope=scope,
                )
            )
        elif mode == "add":
            out.append(add_feature(dictionary, feature, strength, scope=scope))
        else:
            raise SaelabError(f"unknown --mode {mode!r}: use add or clamp.")
    if vector is not None:
        where, v = _vector(vector, hook, position)
        out.append(AddVector(where, vector=v, alpha=alpha, scope=scope))
    if ablate is not None:
        _, d = _vector(ablate, hook, position)
        out += ablation(lm, d, scope=scope)
    if not out:
        raise SaelabError("nothing to steer with: pass --feature (with --sae), --vector or --ablate.")
    return out


@steer_app.command("generate")
def steer_generate(
    prompts: list[str] = typer.Argument(None, help="Prompts to complete."),
    prompts_file: str = typer.Option(
        None, "--prompts", help="More prompts: a .txt (one per line), .json or .jsonl file."
    ),
    sae: Path = typer.Option(None, help="SAE folder whose --feature to steer with."),
    feature: int = typer.Option(None, help="Feature index in --sae."),
    strength: float = typer.Option(8.0, help="add: multiple of the decoder row; clamp: the latent's value."),
    mode: str = typer.Option(
        "add", help="add (strength x decoder row) or clamp (set the latent, keep the SAE error)."
    ),
    vector: Path = typer.Option(
        None, help="A direction folder (saelab direction build) or a one-tensor .safetensors."
    ),
    hook: str = typer.Option(None, help="Hook point of --vector (default: its best or middle hook)."),
    position: int = typer.Option(-1, help="Which token position's direction to use from a direction folder."),
    alpha: float = typer.Option(4.0, help="Multiplier of --vector."),
    ablate: Path = typer.Option(None, help="A direction to ablate from every layer's residual writes."),
    scope: str = typer.Option("all", help="all, prompt or generated tokens."),
    max_new_tokens: int = typer.Option(40, min=1, max=1024),
    temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy."),
    seed: int = typer.Option(0, help="The same seed for steered and unsteered runs."),
    chat: bool = _CHAT,
    model: str = _MODEL,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    out: Path = typer.Option(None, help="Also write the generations as JSON here."),
):
    """Generate steered and unsteered completions side by side, with the same seed."""
    from saelab.interventions.generation import GenerationConfig, compare

    texts = _prompt_list(prompts, prompts_file)
    if model is None and sae is not None:
        from saelab.dictionaries.io import dictionary_metadata

        model = dictionary_metadata(sae).get("model_name")
    lm = _lm(model, device, dtype)
    ivs = _interventions(lm, sae, feature, strength, mode, vector, hook, position, alpha, ablate, scope)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat)
    rows = compare(lm, texts, ivs, cfg)
    table = Table(title=f"steered vs unsteered (seed {seed})", show_lines=True)
    for column in ("prompt", "unsteered", "steered"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["prompt"], row["unsteered"], row["steered"])
    _console().print(table)
    if out:
        from saelab.core.fileio import atomic_write_text

        atomic_write_text(out, json.dumps({"generation": cfg.to_dict(), "rows": rows}, indent=1))


@steer_app.command("decompose")
def steer_decompose(
    vector: Path = typer.Argument(..., help="A direction folder or a one-tensor .safetensors file."),
    sae: Path = typer.Option(..., help="The SAE folder whose decoder rows to use."),
    hook: str = typer.Option(None, help="Which hook's direction (default: the SAE's hook)."),
    position: int = typer.Option(-1, help="Which token position's direction."),
    n_features: int = typer.Option(10, min=1, help="Features in the sparse combination."),
    method: str = typer.Option(
        "pursuit", help="pursuit (gradient pursuit) or encoder (encoder, then refine)."
    ),
    url: str = typer.Option(
        "http://127.0.0.1:8000", help="Web app address for the feature links ('' for none)."
    ),
):
    """Express a vector as a sparse non-negative combination of SAE decoder rows."""
    from saelab.dictionaries.io import load_dictionary
    from saelab.interventions.decompose import decompose

    dictionary = load_dictionary(sae)
    where, v = _vector(vector, hook or dictionary.cfg.hook_name, position)
    if where != dictionary.cfg.hook_name:
        _console().print(
            f"[yellow]note:[/] the vector is from {where}, the SAE reads {dictionary.cfg.hook_name}."
        )
    result = decompose(
        dictionary,
        v,
        n_features=n_features,
        method=method,
        feature_url=f"{url}/feature/{{index}}" if url else None,
    )
    _console().print(result.table())


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
    chat: bool = _CHAT,
    model: str = _MODEL,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Difference-in-means (or PCA) directions at every layer from two prompt sets, saved with provenance."""
    from saelab.interventions.directions import mean_difference, pca_direction

    if method not in ("mean", "pca"):
        raise SaelabError(f"unknown --method {method!r}: use mean or pca.")
    pos, neg = _prompt_list(None, positive), _prompt_list(None, negative)
    lm = _lm(model, device, dtype)
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
    _console().print(table)
    _console().print(f"saved to {out}")


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
    model: str = _MODEL,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Arditi et al. direction selection: score (layer, post-instruction position) candidates and pick one."""
    from saelab.interventions.selection import (
        BehaviourMetric,
        SelectionConfig,
        load_prompt_sets,
        select_direction,
    )

    prompt_sets = load_prompt_sets(sets)
    lm = _lm(model, device, dtype)
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
    _console().print(result.table(), highlight=False)
    best = result.best
    if best is None:
        _console().print(
            "[yellow]every candidate was filtered out[/]; the reasons are in the table and selection.json."
        )
    else:
        _console().print(f"selected layer {best.layer}, position {best.position}; results in {out}")


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
    model: str = _MODEL,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Contrastive activation addition: vectors from A/B items, p(matching letter) on held-out items."""
    from saelab.core.fileio import atomic_write_json
    from saelab.interventions.caa import CAAConfig, load_items, run_caa

    behaviour, ab_items = load_items(items)
    lm = _lm(model, device, dtype)
    cfg = CAAConfig(layers=_ints(layers), multipliers=_floats(multipliers))
    vectors, result = run_caa(lm, ab_items, cfg, behaviour)
    vectors.save(out)
    atomic_write_json(out / "result.json", result.to_dict())
    result.plot(out / "caa.png")
    _console().print(result.table(), highlight=False)
    _console().print(f"best layer {result.best_layer()}; results in {out}")


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
    chat: bool = _CHAT,
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
    model: str = _MODEL,
    device: str = _DEVICE,
    dtype: str = _DTYPE,
):
    """Train a logistic-regression probe, then check what ablating directions does to it."""
    from saelab.interventions.probes import ablation_check

    pos, neg = _prompt_list(None, positive), _prompt_list(None, negative)
    lm = _lm(model, device, dtype)
    extra = {}
    if ablate is not None:
        where, vector = _vector(ablate, ablate_hook, -1)
        extra[f"{ablate.name} ({where})"] = vector
    check = ablation_check(lm, pos, neg, hook, extra or None, chat=chat, seed=seed)
    _console().print(check.table(), highlight=False)
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
    model: str = _MODEL,
    device: str = _DEVICE,
):
    """Write a model whose residual-stream writers are orthogonal to a direction (= ablating it everywhere)."""
    from saelab.interventions.orthogonalize import write_orthogonalized

    where, vector = _vector(direction, hook, position)
    lm = _lm(model, device, "float32")
    provenance = {"direction": str(direction), "hook": where, "position": position}
    folder = write_orthogonalized(lm, vector, out, provenance=provenance, overwrite=overwrite)
    _console().print(
        f"wrote {folder}; load it with saelab's --model {folder} or transformers' from_pretrained."
    )
