"""`saelab audit BASE ORGANISM`: a blind audit of what fine-tuning planted in ORGANISM (saelab.diffing.audit)."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import DEVICE_OPTION, DTYPE_OPTION, console, load_lm


def audit_command(
    base: str = typer.Argument(..., help="The base model: a folder, .gguf, hub id, or 'embedded'."),
    organism: str = typer.Argument(..., help="The fine-tuned model to audit (same tokenizer and width)."),
    out: Path = typer.Option(Path("runs/audit"), help="The audit folder (a rerun skips finished steps)."),
    prompts: Path = typer.Option(
        None, help="Prompts to compare the models on, one a line; default: saelab's everyday requests."
    ),
    hook: str = typer.Option("blocks.15.hook_resid_post", help="The hook point the crosscoder reads."),
    samples: int = typer.Option(2, min=1, help="Answers per prompt and model."),
    max_new_tokens: int = typer.Option(64, min=4, help="Tokens per answer."),
    corpus: str = typer.Option(
        None, help="Text for the corpus-loss checks (its eval split); default: the embedded corpus."
    ),
    width: int = typer.Option(2048, min=16, help="Crosscoder latents."),
    k: int = typer.Option(32, min=1, help="Crosscoder BatchTopK k."),
    epochs: float = typer.Option(8.0, min=0.1, help="Crosscoder passes over the harvested tokens."),
    candidates: int = typer.Option(10, min=1, help="Organism-only latents to explain and test."),
    explainer: str = typer.Option(
        "local", help="LM client that explains the candidates (see saelab explain), or 'none'."
    ),
    transcoders: Path = typer.Option(
        None, help="Transcoders of the organism's model family: adds the attribution graph of a trigger."
    ),
    seed: int = typer.Option(0, help="Seed of sampling and training."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
):
    """Audit ORGANISM against BASE blind: find what its answers do differently, train a crosscoder on both
    models' activations, rank organism-only latents by Latent Scaling, explain them and test each one
    causally; writes audit.md and audit.json into --out."""
    from saelab.diffing.audit import AuditConfig, run_audit

    cfg = AuditConfig(
        prompts=None if prompts is None else str(prompts),
        hook=hook,
        samples=samples,
        max_new_tokens=max_new_tokens,
        corpus=corpus,
        width=width,
        k=k,
        epochs=epochs,
        candidates=candidates,
        explainer=None if explainer.lower() == "none" else explainer,
        transcoders=None if transcoders is None else str(transcoders),
        seed=seed,
    )
    base_lm = load_lm(base, device=device, dtype=dtype)
    organism_lm = load_lm(organism, device=device, dtype=dtype)
    data = run_audit(base_lm, organism_lm, out, cfg)
    pages = _candidate_pages(data, out)
    causal = data["causal"]
    console.print(
        f"audit of {organism} against {base}: {data['seconds']:.0f} s, peak memory {data['peak_memory_gib']:.2f} GiB"
    )
    if "organism_rate" in causal:
        console.print(
            f"signature {', '.join(r['word'] for r in data['behaviour']['signature'])}: trigger rate base "
            f"{causal['base_rate']:.0%}, organism {causal['organism_rate']:.0%}"
        )
    for c in data["candidates"][:5]:
        console.print(f"  latent {c['latent']}: {c.get('verdict', '-')}; {c.get('explanation') or ''}")
    console.print(f"wrote {out / 'audit.md'}" + (f" and {pages}" if pages else ""))


def _candidate_pages(data: dict, out: Path) -> Path | None:
    """The candidates' feature pages as one HTML file that opens from file:// (the app's own templates)."""
    from saelab.export import export_html

    store = Path(data["crosscoder"]) / "features.db"
    latents = [c["latent"] for c in data["candidates"]]
    if not latents or not store.is_file():
        return None
    return export_html(store, out / "candidates.html", latents)
