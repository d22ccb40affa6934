"""`saelab explain`: label latents and score the labels, each score beside its chance baseline and a
shuffled-label control, or dream prompts that make them fire, into the SAE's feature store.

Methods: ``auto`` (an explainer LM reads each latent's examples), ``self`` (the model describes the
latent's decoder direction injected into its own residual stream), ``human`` (score the human labels
already stored) and ``dream`` (fluent dreaming: EPO's Pareto front of activation against fluency)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console
from saelab.cli.sae_inputs import sae_folders, with_models
from saelab.errors import SaelabError

METHODS = ("auto", "self", "human", "dream")
CLIENT_HELP = (
    "local (the model the SAE was trained on; the embedded one by default), local:<hub id|folder|.gguf>, "
    "or openai:<model>@<base_url> for any OpenAI-compatible endpoint (key from --api-key-env)."
)


def explain(
    path: Path = typer.Argument(..., help="A SAE folder, or a run folder (every SAE in its saes/)."),
    method: str = typer.Option(
        "auto",
        help="auto (an LM reads the examples), self (the model reads the decoder direction), "
        "human (score the stored human labels) or dream (prompts that make the latent fire).",
    ),  # fmt: skip
    features: int = typer.Option(
        None, min=1, help="The N most frequent live latents (default 100; 10 for --method dream)."
    ),
    feature: list[int] = typer.Option(None, help="These latents instead; repeat (two or more to score)."),
    explainer: str = typer.Option("local", help=f"The LM that writes labels (auto): {CLIENT_HELP}"),
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
        None, min=1, help="Labels per latent (default 1 for auto, sampled at 0.7 when > 1; 4 for self)."
    ),
    self_layer: int = typer.Option(None, min=0, help="Self: the injection layer (default: an early one)."),
    self_scale: list[float] = typer.Option(
        None, help="Self: scales to sweep, in units of the typical residual norm; repeat."
    ),
    self_user: str = typer.Option(None, help="Self: the user turn, with X where the direction goes."),
    self_prefill: str = typer.Option(None, help="Self: the start of the reply, e.g. 'X means \"'."),
    dream_iterations: int = typer.Option(None, min=1, help="Dream: EPO iterations (default 60)."),
    dream_children: int = typer.Option(None, min=1, help="Dream: children per member and iteration (4)."),
    dream_length: int = typer.Option(None, min=1, help="Dream: prompt length in tokens (12)."),
    dream_position: str = typer.Option("last", help="Dream: read the latent at the last token, or the max."),
    dream_reference: bool = typer.Option(
        False, help="Dream: dreamy's sizes (300 iterations x 8 members x 32 children; slow on a CPU)."
    ),
    api_key_env: str = typer.Option(
        None, help="Environment variable holding the endpoint's key (OPENAI_API_KEY)."
    ),
    db: Path = typer.Option(None, help="Feature store; default: features.db beside the SAE."),
    redo: bool = typer.Option(False, help="Explain and score again latents this run's settings already did."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    seed: int = typer.Option(0, help="Seed of the example split, the sampling, the bootstrap and EPO."),
):
    """Explain latents and score every label by detection, fuzzing, embedding and surprisal, each beside
    chance and the score of another latent's label; or dream prompts that make them fire. Resumable: a
    latent done with the same settings is not redone."""
    from saelab.explain.pipeline import ExplainConfig

    if method not in METHODS:
        raise SaelabError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}.")
    if dream_position not in ("last", "max"):
        raise SaelabError(f"--dream-position {dream_position!r} is unknown; use one of last, max.")
    n_features = features if features is not None else (10 if method == "dream" else 100)
    chosen = list(feature or []) or None
    cfg = ExplainConfig(
        features=chosen, n_features=n_features, n_explain=n_explain, n_test=n_test, n_random=n_random,
        n_hard=n_hard, show_values=show_values,
        n_explanations=explanations or (4 if method == "self" else 1), scorers=tuple(scorer), seed=seed,
    )  # fmt: skip
    folders = sae_folders(path)
    if db is not None and len(folders) > 1:
        raise SaelabError(f"--db names one store, but {path} holds {len(folders)} SAEs; leave --db out.")
    for folder, dictionary, lm, data in with_models(folders, None, None, "train", device, dtype):
        store = db if db is not None else folder / "features.db"
        if not store.is_file():
            raise SaelabError(
                f"{folder.name} has no feature store at {store}; run `saelab analyze {folder}` first."
            )
        if method == "dream":
            _dream(store, folder, lm, dictionary, cfg, dream_iterations, dream_children, dream_length,
                   dream_position, dream_reference, seed, redo)  # fmt: skip
            continue
        clients = {}

        def client(spec: str):
            """One client per spec; `local` reuses the SAE's own model instead of loading it twice."""
            if spec not in clients:
                from saelab.explain.clients import make_client

                options = {"lm": lm} if spec == "local" else {}
                if spec.startswith("openai"):
                    options["api_key_env"] = api_key_env
                clients[spec] = make_client(spec, **options)
            return clients[spec]

        if method == "human":
            from saelab.explain.pipeline import score_explanations

            summary = score_explanations(
                store, lm, dictionary, client(judge), cfg, kinds=("human",), redo=redo
            )
        else:
            from saelab.explain.pipeline import explain_features

            writer = client(explainer) if method == "auto" else _self_explainer(
                lm, self_layer, self_scale, self_user, self_prefill, seed, data.source
            )  # fmt: skip
            summary = explain_features(store, lm, dictionary, writer, client(judge), cfg, redo=redo)
        _print_summary(folder.name, store, summary)


def _self_explainer(lm, layer, scales, user, prefill, seed, norm_source):
    """The self-explainer; scales are in units of the residual norm on the SAE's own training text."""
    from saelab.explain.selfexplain import SelfExplainConfig, SelfExplainer, SelfTemplate

    options: dict = {"seed": seed, "norm_source": norm_source}
    if layer is not None:
        options["layer"] = layer
    if scales:
        options["scales"] = tuple(scales)
    if user is not None or prefill is not None:
        default = SelfTemplate()
        options["template"] = SelfTemplate(
            user=default.user if user is None else user,
            prefill=default.prefill if prefill is None else prefill,
        )
    return SelfExplainer(lm, SelfExplainConfig(**options))


def _dream(store, folder, lm, dictionary, cfg, iterations, children, length, position, reference, seed, redo):
    from saelab.explain.dream_latents import dream_latents
    from saelab.explain.dreaming import DreamConfig

    changes = {k: v for k, v in (("iterations", iterations), ("children", children), ("seq_len", length))
               if v is not None}  # fmt: skip
    dream_cfg = (
        DreamConfig.reference(seed=seed, **changes) if reference else DreamConfig(seed=seed, **changes)
    )
    summary = dream_latents(store, lm, dictionary, dream_cfg, cfg.features, cfg.n_features, position, redo)
    table = Table(
        title=f"{folder.name}: {len(summary['features'])} latents dreamed ({len(summary['dreamed'])} now)"
    )
    for column in ("latent", "best activation", "dataset max", "of max", "front", "seconds"):
        table.add_column(column)
    for idx, front in summary["fronts"].items():
        share = (
            front["best"] / front["dataset_max"]
            if front["best"] is not None and front["dataset_max"]
            else None
        )
        table.add_row(
            str(idx), f"{front['best']:.3f}" if front["best"] is not None else "-", f"{front['dataset_max']:.3f}",
            "-" if share is None else f"{100 * share:.0f}%", str(front["points"]), f"{front['seconds']:.0f}",
        )  # fmt: skip
    console.print(table)
    for failure in summary["failures"]:
        console.print(f"latent {failure['feature']} ({failure['stage']}): {failure['error']}")
    console.print(f"dreamed prompts in {store} (the feature pages show them)")


def _print_summary(name: str, store: Path, summary: dict, brief: bool = False) -> None:
    """Every label's scores beside their controls; `brief`: the means per scorer and a few labels."""
    from saelab.explain.pipeline import score_means

    title = f"{name}: {len(summary['features'])} latents ({len(summary['explained'])} explained now)"
    means = Table(title=f"{title}: mean over labels")
    for column in ("scorer", "labels", "mean score", "chance", "shuffled label", "beat both controls"):
        means.add_column(column)
    for scorer, m in score_means(summary).items():
        means.add_row(scorer, str(m["n"]), f"{m['score']:.3f}", f"{m['chance']:.2f}", f"{m['shuffled']:.3f}",
                      f"{100 * m['beat_controls']:.0f}%")  # fmt: skip
    if brief:
        console.print(means)
        shown = [(idx, rows[0]["text"]) for idx, rows in summary["scores"].items() if rows][:5]
        for idx, text in shown:
            console.print(f"  latent {idx}: {text}")
        console.print(f"explanations and scores in {store}")
        failures = summary["failures"]
        if failures:
            stages = Counter(str(f.get("stage")) for f in failures)
            first = failures[0]
            console.print(
                f"{len(failures)} failures ({', '.join(f'{n} in {stage}' for stage, n in stages.items())}), "
                f"e.g. latent {first.get('feature')}: {first.get('error')}"
            )
        return
    rows = [(idx, e) for idx, labels in summary["scores"].items() for e in labels]
    table = Table(title=title)
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
    if rows:
        console.print(means)
    for failure in summary["failures"]:
        console.print(f"latent {failure.get('feature')} ({failure.get('stage')}): {failure.get('error')}")
    console.print(f"explanations and scores in {store}")
