"""`saelab diff`: which latents of a crosscoder two models share and which one of them alone has.

Reads the crosscoder and a paired activation cache (`saelab harvest --model A --model B`), and writes
`diff.json` (every latent's Δnorm, tag, decoder cosine, ν^ε and ν^r), the Δnorm histogram and the ν
scatter of B-only latents, then prints the tag counts and the B-only latents Latent Scaling keeps.
When the crosscoder has a feature store (`saelab analyze`'s features.db beside it), the tags and ν go
there too, for the app's tag filter and feature pages.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from saelab.cli.common import console


def diff_command(
    crosscoder: Path = typer.Argument(..., help="A crosscoder folder (crosscoder or crosscoder_batchtopk)."),
    activations: Path = typer.Option(
        None, help="A paired cache with the crosscoder's hooks, for Latent Scaling; without it, Δnorm only."
    ),
    tokens: int = typer.Option(65536, min=1, help="Tokens of the cache Latent Scaling reads."),
    out: Path = typer.Option(None, help="Output folder; default: <crosscoder>/diff."),
    top: int = typer.Option(20, min=1, help="Rows of the printed table of model-specific latents."),
):
    """Tag every crosscoder latent shared / A-only / B-only / other by relative decoder norm, and test the
    model-specific ones with Latent Scaling (Minder et al. 2025)."""
    from saelab.core.activations import CachedActivations
    from saelab.dictionaries.io import load_dictionary
    from saelab.diffing.latents import GENUINE_NU, check_crosscoder, diff_latents
    from saelab.diffing.plots import plot_delta_norm, plot_nu_scatter

    model = check_crosscoder(load_dictionary(crosscoder))
    out = out or Path(crosscoder) / "diff"
    data = None
    if activations is not None:
        from saelab.core.activations import CacheInfo

        size = min(tokens, CacheInfo.read(activations).n_tokens)
        cache = CachedActivations(
            activations, model.cfg.input_hooks, batch_size=min(1024, size), n_tokens=size
        )

        def batches():
            while (batch := cache.next_batch()) is not None:
                yield batch

        data = batches()
    result = diff_latents(model, data)
    result.save_json(out / "diff.json")
    from saelab.cli.analyze import write_latent_diff  # tags and ν into the crosscoder's feature store

    source = {"diff_json": str(out / "diff.json"), "activations": activations and str(activations)}
    stored = write_latent_diff(Path(crosscoder) / "features.db", result.rows(), source)
    plot_delta_norm(result, out / "delta_norm.png")
    if activations is not None:
        plot_nu_scatter(result, out / "nu_scatter.png")
    counts = result.counts()
    console.print(
        f"{result.members[0]} (A) against {result.members[1]} (B): "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
    )
    rows = [r for r in result.rows() if r["tag"] in ("b_only", "a_only")]
    rows.sort(key=lambda r: (r["nu_eps"] is None, max(r["nu_eps"] or 0, r["nu_r"] or 0)))
    table = Table(title=f"model-specific latents (genuine: ν^ε and ν^r < {GENUINE_NU})")
    for column in ("latent", "tag", "Δnorm", "cosine", "ν^ε", "ν^r", "genuine"):
        table.add_column(column, justify="right")
    for r in rows[:top]:
        nus = (r["nu_eps"], r["nu_r"])
        genuine = "-" if None in nus else ("yes" if max(nus) < GENUINE_NU else "no")
        table.add_row(
            str(r["latent"]),
            r["tag"],
            *map(_number, (r["delta_norm"], r["cosine"], *nus)),
            genuine,
        )
    console.print(table)
    console.print(
        f"wrote {out / 'diff.json'} and the plots in {out}" + (f"; tagged {stored}" if stored else "")
    )


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
