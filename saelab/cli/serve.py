"""`saelab serve` and `saelab export`: an analysed dictionary's feature store, live or as static files."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm, resolve_model
from saelab.errors import SaelabError


def _store_path(path: Path) -> Path:
    """A features.db file given itself or the SAE folder it sits in; refuse one that does not exist."""
    from saelab.errors import DataError

    store_path = path / "features.db" if path.is_dir() else path
    if not store_path.is_file():
        raise DataError(f"no feature store at {store_path}. Run `saelab analyze {path}` first.")
    return store_path


def serve(
    path: Path = typer.Argument(..., help="A features.db file, or the SAE folder it sits in."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port."),
    live: bool = typer.Option(True, help="Load the model and SAE for 'test your own text' and text search."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Browse, search and test every feature of an analysed dictionary in a local web app."""
    from saelab.analysis.store import FeatureStore
    from saelab.server.app import serve as run_server

    store_path = _store_path(path)
    lm = dictionary = None
    if live:
        from saelab.dictionaries.io import load_dictionary

        with FeatureStore(store_path, create=False) as store:
            meta = store.meta()
        folder = Path(meta.get("dictionary_folder") or store_path.parent)
        dictionary = load_dictionary(folder)
        name = resolve_model(dictionary.cfg.metadata.get("model_name"))
        lm = load_lm(name, device=device, dtype=dtype)
    console.print(f"serving {store_path} at http://{host}:{port}/ (Ctrl-C stops)")
    run_server(store_path, lm, dictionary, host=host, port=port)


def export_command(
    path: Path = typer.Argument(..., help="A features.db file, or the SAE folder it sits in."),
    feature: list[int] = typer.Option(
        None,
        help="Features to export (repeat); default: the HTML takes the "
        "20 densest, the JSON every latent that fires.",
    ),
    html: Path = typer.Option(None, help="Write a self-contained HTML dashboard (works from file://)."),
    neuronpedia: Path = typer.Option(
        None, help="Write Neuronpedia-style JSON, one <index>.json per feature."
    ),
):
    """Export features as a static HTML dashboard and/or Neuronpedia-style JSON."""
    from saelab.analysis.store import FeatureStore
    from saelab.export import export_html, export_neuronpedia

    store_path = _store_path(path)
    if html is None and neuronpedia is None:
        raise SaelabError("nothing to export: pass --html FILE and/or --neuronpedia FOLDER.")
    chosen = list(feature) if feature else None
    if html is not None:
        if chosen is None:
            with FeatureStore(store_path, create=False) as store:
                densest = [row["idx"] for row in store.list_features("density", True, 0, 20)]
        export_html(store_path, html, chosen if chosen is not None else densest)
        console.print(f"wrote {html}")
    if neuronpedia is not None:
        written = export_neuronpedia(store_path, neuronpedia, chosen)
        console.print(f"wrote {len(written)} feature files into {neuronpedia}")
