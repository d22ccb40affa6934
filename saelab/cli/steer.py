"""`saelab steer ...`: steered generations side by side, and vectors decomposed into SAE features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm
from saelab.cli.steering_inputs import CHAT_OPTION, MODEL_OPTION, load_vector, prompt_list
from saelab.errors import SaelabError

if TYPE_CHECKING:
    from saelab.core.models import HookedLM
    from saelab.interventions.hooks import Intervention

steer_app = typer.Typer(
    help="Steer generations with features and vectors; decompose vectors into features.", no_args_is_help=True
)


def _interventions(
    lm: HookedLM,
    sae: Path | None,
    feature: int | None,
    strength: float,
    mode: str,
    vector: Path | None,
    hook: str | None,
    position: int,
    alpha: float,
    ablate: Path | None,
    scope: str,
) -> list[Intervention]:
    """The edits that --feature/--sae, --vector and --ablate ask for, in that order."""
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
        where, v = load_vector(vector, hook, position)
        out.append(AddVector(where, vector=v, alpha=alpha, scope=scope))
    if ablate is not None:
        _, d = load_vector(ablate, hook, position)
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
    chat: bool = CHAT_OPTION,
    model: str = MODEL_OPTION,
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    out: Path = typer.Option(None, help="Also write the generations as JSON here."),
):
    """Generate steered and unsteered completions side by side, with the same seed."""
    from saelab.interventions.generation import GenerationConfig, compare

    texts = prompt_list(prompts, prompts_file)
    if model is None and sae is not None:
        from saelab.dictionaries.io import dictionary_metadata

        model = dictionary_metadata(sae).get("model_name")
    lm = load_lm(model, device, dtype)
    ivs = _interventions(lm, sae, feature, strength, mode, vector, hook, position, alpha, ablate, scope)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat)
    rows = compare(lm, texts, ivs, cfg)
    table = Table(title=f"steered vs unsteered (seed {seed})", show_lines=True)
    for column in ("prompt", "unsteered", "steered"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["prompt"], row["unsteered"], row["steered"])
    console.print(table)
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
    where, v = load_vector(vector, hook or dictionary.cfg.hook_name, position)
    if where != dictionary.cfg.hook_name:
        console.print(
            f"[yellow]note:[/] the vector is from {where}, the SAE reads {dictionary.cfg.hook_name}."
        )
    result = decompose(
        dictionary,
        v,
        n_features=n_features,
        method=method,
        feature_url=f"{url}/feature/{{index}}" if url else None,
    )
    console.print(result.table())
