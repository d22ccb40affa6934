"""`saelab explain`: label latents with an explainer LM and score the labels with a judge LM, each score
beside its chance baseline and a shuffled-label control, into the SAE's feature store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console
from saelab.cli.sae_inputs import sae_folders, with_models
from saelab.errors import SaelabError

CLIENT_HELP = (
    "local (the model the SAE was trained on; the embedded one by default), local:<hub id|folder|.gguf>, "
    "or openai:<model>@<base_url> for any OpenAI-compatible endpoint (key from --api-key-env)."
)


def explain(
    path: Path = typer.Argument(..., help="A SAE folder, or a run folder (every SAE in its saes/)."),
    features: int = typer.Option(100, min=2, help="Explain the N most frequent live latents."),
    feature: list[int] = typer.Option(None, help="Explain these latents instead; repeat (at least two)."),
    explainer: str = typer.Option("local", help=f"The LM that writes labels: {CLIENT_HELP}"),
    judge: str = typer.Option("local", help=f"The LM that scores them: {CLIENT_HELP}"),
    scorer: list[str] = typer.Option(
        ["detection", "fuzzing", "embedding", "surprisal"], help="Scorers to run; repeat."
    ),
    n_explain: int = typer.Option(40, min=1, help="Activating examples shown to the explainer."),
    n_test: int = typer.Option(50, min=1, help="Held-out activating examples each scorer tests on."),
    n_random: int = typer.Option(50, min=0, help="Random non-activating examples."),
    n_hard: int = typer.Option(
        50, min=0, help="Hard non-activating examples (co-firing and neighbour latents)."
    ),
    show_values: bool = typer.Option(False, help="Show activation values to the explainer."),
    explanations: int = typer.Option(
        1, min=1, help="Labels per latent (sampled at temperature 0.7 when > 1)."
    ),
    api_key_env: str = typer.Option(
        None, help="Environment variable holding the endpoint's key (OPENAI_API_KEY)."
    ),
    db: Path = typer.Option(None, help="Feature store; default: features.db beside the SAE."),
    redo: bool = typer.Option(False, help="Explain and score again latents this run's settings already did."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Seed of the example split, the sampling and the bootstrap."),
):
    """Auto-interp: an explainer LM labels each latent from its top and quantile examples; a judge LM
    scores every label by detection, fuzzing, embedding and surprisal, each beside chance and the score
    of another latent's label. Resumable: a latent done with the same settings is not redone."""
    from saelab.explain.clients import make_client
    from saelab.explain.pipeline import ExplainConfig, explain_features

    cfg = ExplainConfig(
        features=list(feature or []) or None, n_features=features, n_explain=n_explain, n_test=n_test,
        n_random=n_random, n_hard=n_hard, show_values=show_values, n_explanations=explanations,
        scorers=tuple(scorer), seed=seed,
    )  # fmt: skip
    folders = sae_folders(path)
    if db is not None and len(folders) > 1:
        raise SaelabError(f"--db names one store, but {path} holds {len(folders)} SAEs; leave --db out.")
    for folder, dictionary, lm, _data in with_models(folders, None, None, "train", device, dtype):
        store = db if db is not None else folder / "features.db"
        if not store.is_file():
            raise SaelabError(
                f"{folder.name} has no feature store at {store}; run `saelab analyze {folder}` first."
            )
        clients = {}

        def client(spec: str):
            """One client per spec; `local` reuses the SAE's own model instead of loading it twice."""
            if spec not in clients:
                options = {"lm": lm} if spec == "local" else {}
                if spec.startswith("openai"):
                    options["api_key_env"] = api_key_env
                clients[spec] = make_client(spec, **options)
            return clients[spec]

        summary = explain_features(store, lm, dictionary, client(explainer), client(judge), cfg, redo=redo)
        _print_summary(folder.name, store, summary)


def _print_summary(name: str, store: Path, summary: dict) -> None:
    rows = [(idx, e) for idx, labels in summary["scores"].items() for e in labels]
    table = Table(
        title=f"{name}: {len(summary['features'])} latents ({len(summary['explained'])} explained now)"
    )
    for column in ("latent", "label", "scorer", "score", "chance", "shuffled", "flag"):
        table.add_column(column)
    for idx, entry in rows:
        for scorer, s in entry.items():
            if scorer in ("id", "text"):
                continue
            table.add_row(
                str(idx), entry["text"][:48], scorer, f"{s['score']:.3f}", f"{s['chance']:.2f}",
                f"{s['shuffled']:.3f}", "no better than shuffled" if s["flagged"] else "",
            )  # fmt: skip
    console.print(table)
    for failure in summary["failures"]:
        console.print(f"latent {failure.get('feature')} ({failure.get('stage')}): {failure.get('error')}")
    console.print(f"explanations and scores in {store}")
