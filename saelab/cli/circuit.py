"""`saelab circuit`: the sparse feature circuit of a task over dictionary sets (Marks et al.): node
effects, edges, and the faithfulness curve, written as JSON with a plot."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm
from saelab.errors import SaelabError


def circuit(
    task: str = typer.Argument(
        ..., help="A shipped task (agreement_simple, capitals, ...) or a .jsonl task file."
    ),
    dictionaries: list[Path] = typer.Option(
        ...,
        "--dictionaries",
        help="A dictionary set folder of SAEs (one per layer at one hook); repeat for more hooks.",
    ),
    model: str = typer.Option(None, help="Model (default: the embedded SmolLM2-135M-Instruct)."),
    method: str = typer.Option(
        "ig", help="Node effects: ig (integrated gradients), atp or exact (slow reference)."
    ),
    steps: int = typer.Option(10, min=1, help="Integrated-gradient points."),
    ablation: str = typer.Option("patch", help="patch (pairs), mean or zero: what a node is moved to."),
    threshold: float = typer.Option(
        0.1, min=0.0, help="Node threshold: |effect| above it is in the circuit."
    ),
    edge_threshold: float = typer.Option(0.01, min=0.0, help="Edge threshold: |weight| above it is kept."),
    curve: list[float] = typer.Option(
        [], help="Faithfulness-curve thresholds (default: 12 log-spaced); repeat."
    ),
    keep_errors: bool = typer.Option(False, help="Never ablate error nodes in the faithfulness curve."),
    max_rows: int = typer.Option(64, min=1, help="Task rows used (those of the most common length)."),
    edges: bool = typer.Option(
        True, help="Compute the edges between circuit nodes (--no-edges: nodes only)."
    ),
    out: Path = typer.Option(None, help="Output folder (default: runs/circuits/<task>)."),
    dtype: str = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
):
    """Find the sparse feature circuit of TASK over the dictionary sets: circuit.json and faithfulness.png."""
    from saelab.circuits.attribution import ABLATIONS, METHODS
    from saelab.circuits.sparse_circuit import CircuitConfig, find_circuit, submodules_of
    from saelab.circuits.tasks import load_task
    from saelab.core.fileio import atomic_write_json
    from saelab.dictionaries.io import load_dictionary
    from saelab.dictionaries.sets import SET_INDEX, TRANSCODER_SET_INDEX, load_dictionary_set

    if method not in METHODS:
        raise SaelabError(f"unknown --method {method!r}; choose from {', '.join(METHODS)}.")
    if ablation not in ABLATIONS:
        raise SaelabError(f"unknown --ablation {ablation!r}; choose from {', '.join(ABLATIONS)}.")
    loaded = load_task(task)
    sets = [
        load_dictionary_set(folder)
        if (folder / SET_INDEX).is_file() or (folder / TRANSCODER_SET_INDEX).is_file()
        else load_dictionary(folder)
        for folder in dictionaries
    ]
    lm = load_lm(model, device, dtype)
    subs = submodules_of(sets)
    for s in subs:
        s.dictionary.to(lm.device)
    cfg = CircuitConfig(
        method=method, steps=steps, ablation=ablation, node_threshold=threshold, edge_threshold=edge_threshold,
        thresholds=list(curve), keep_errors=keep_errors, max_rows=max_rows, edges=edges,
    )  # fmt: skip
    result = find_circuit(lm, subs, loaded, cfg)
    folder = out or Path("runs") / "circuits" / loaded.name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "circuit.json", result)
    plot_curve(result, folder / "faithfulness.png")
    needed = result["nodes_for_f08"]
    console.print(
        f"{loaded.name}: {result['rows']} rows ({result['rows_same_length']} of {result['rows_in_task']} have the "
        f"most common length), metric {result['metric']:.3f}; {len(result['nodes'])} nodes above {threshold:g}, "
        f"{len(result['edges'])} edges; F >= 0.8 with "
        f"{'no circuit on the curve' if needed is None else f'{needed} nodes'}; {result['seconds']:.0f} s"
        + (f", peak memory {result['peak_rss_mib']:,.0f} MiB" if result["peak_rss_mib"] else "")
    )
    console.print(f"circuit in {folder / 'circuit.json'}, curve in {folder / 'faithfulness.png'}")


def plot_curve(result: dict, path: Path) -> None:
    """Faithfulness and completeness against circuit size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result["curve"], key=lambda p: p["n_nodes"])
    sizes = [max(p["n_nodes"], 1) for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(sizes, [p["faithfulness"] for p in points], marker="o", label="faithfulness F(C)")
    ax.plot(sizes, [p["completeness"] for p in points], marker="s", label="completeness F(M \\ C)")
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("nodes in the circuit")
    ax.set_ylabel("share of the metric")
    ax.set_title(f"{result['task']} ({result['config']['method']}, {result['ablation']} ablation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
