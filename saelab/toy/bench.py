"""The ground-truth benchmark: every dictionary family, a small sweep of its sparsity knob, known features.

Each setting trains all of its dictionaries at once with the one trainer of `saelab.training` on a
stream of synthetic activations, then scores every dictionary on held-out samples against the true
features (MMCS, recovered share, false positives, dead latents, L0, FVU). Output: results.json, a
Markdown table, and per setting a Pareto plot of recovery against L0 and the distribution of each
feature's best cosine. A finished setting is not trained again; an interrupted one resumes.
The families, their knobs, labels and colours come from the registry (saelab.dictionaries.FAMILIES).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from saelab.core.fileio import atomic_write_json, atomic_write_text
from saelab.dictionaries import FAMILIES, DictionaryConfig, family
from saelab.errors import SaelabError
from saelab.toy.recovery import RECOVERY_COSINE, recovery_scores
from saelab.toy.synthetic import SYNTHETIC_HOOK, SyntheticActivations, SyntheticConfig
from saelab.training import DONE, TrainConfig, checkpoint_file, train


@dataclass
class BenchSetting:
    """One synthetic dataset and the dictionaries trained on it."""

    name: str
    title: str
    synthetic: SyntheticConfig
    d_sae: int
    n_samples: int
    # Knob values per family; a registered family missing here runs at its knob's default.
    sweeps: dict[str, list[float]]
    batch_size: int = 1024
    lr: float = 3e-3
    # Per-family DictionaryConfig settings. Gated needs a longer L1 warm-up and a faster rate: with the
    # full penalty early its gates all close before the gate path has learned to reconstruct, and its
    # L0 then falls only about as fast as the gate biases move (about lr per Adam step).
    family_options: dict[str, dict] = field(
        default_factory=lambda: {"gated": {"lr": 1e-2, "l1_warmup_fraction": 0.5}}
    )
    # Families that need more samples than n_samples train in a run of their own on the same stream.
    family_samples: dict[str, int] = field(default_factory=lambda: {"gated": 1500 * 1024})
    resample_every: int = 51_200  # samples between dead-latent resamplings (0: never)
    n_eval: int = 16_384

    def samples_for(self, name: str) -> int:
        return self.family_samples.get(name, self.n_samples)

    def family_sweeps(self) -> dict[str, list[float]]:
        """Every registered family's knob values, in registry order (an empty list skips a family)."""
        for name in self.sweeps:
            family(name)  # an unknown name fails here, with the known ones
        sweeps = {  # the toy data has one hook: cross-layer families (clt) have their own tests
            name: self.sweeps.get(name, [fam.knob_default])
            for name, fam in FAMILIES.items()
            if not fam.cross_layer
        }
        return {name: values for name, values in sweeps.items() if values}

    def dictionary_configs(self, seed: int, n_samples: int | None = None) -> list[DictionaryConfig]:
        """The sweep's dictionaries (only those trained for n_samples, when given)."""
        configs = []
        for name, values in self.family_sweeps().items():
            if n_samples is not None and self.samples_for(name) != n_samples:
                continue
            for value in values:
                settings = family(name).with_knob(value, self.family_options.get(name, {}))
                configs.append(
                    DictionaryConfig(
                        architecture=name,
                        d_in=self.synthetic.d,
                        d_sae=self.d_sae,
                        hook_name=SYNTHETIC_HOOK,
                        seed=seed,
                        **settings,
                    )
                )
        return configs

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["synthetic"] = self.synthetic.to_dict()
        return out


def bench_settings(quick: bool = False, seed: int = 0) -> dict[str, BenchSetting]:
    """The issue's two settings (or small versions of them for tests)."""
    if quick:
        uniform = BenchSetting(
            name="uniform",
            title="64 features in d=32, ~3 active, 128 latents (quick)",
            synthetic=SyntheticConfig(n_features=64, d=32, mean_active=3, seed=seed),
            d_sae=128,
            n_samples=800 * 256,
            batch_size=256,
            resample_every=10_240,
            family_samples={},
            family_options={"gated": {"lr": 1e-2}},
            sweeps={
                "relu": [3.0],
                "gated": [5.0],
                "topk": [3],
                "batchtopk": [3],
                "jumprelu": [3],
                "matryoshka_batchtopk": [3],
            },
            n_eval=4096,
        )
        return {"uniform": uniform}
    uniform = BenchSetting(
        name="uniform",
        title="512 features in d=128, uniform frequency, ~5 active, 1024 latents",
        synthetic=SyntheticConfig(n_features=512, d=128, mean_active=5, seed=seed),
        d_sae=1024,
        n_samples=600 * 1024,
        sweeps={
            "relu": [1.0, 3.0],
            "gated": [4.0, 6.0],  # 8 collapses: the gates close for good
            "topk": [3, 5, 8],
            "batchtopk": [3, 5, 8],
            "jumprelu": [5, 8],
            "matryoshka_batchtopk": [5],
        },
    )
    sharkey = BenchSetting(
        name="sharkey",
        title="Sharkey et al.: 512 features in d=256, frequency ~ 0.99^i, ~5 active, 1024 latents",
        synthetic=SyntheticConfig(
            n_features=512, d=256, mean_active=5, frequency="decay", magnitude="product", seed=seed
        ),
        d_sae=1024,
        n_samples=600 * 1024,
        sweeps={
            "relu": [3.0],
            "gated": [5.0],
            "topk": [5],
            "batchtopk": [5],
            "jumprelu": [5],
            "matryoshka_batchtopk": [5],
        },
    )
    return {"uniform": uniform, "sharkey": sharkey}


def run_setting(setting: BenchSetting, out_dir: Path, seed: int = 0, progress: bool = True) -> list[dict]:
    """Train (or reuse) every dictionary of one setting and score each against the ground truth."""
    from saelab.dictionaries.io import load_dictionary

    trained: list[tuple[DictionaryConfig, str, Path, float]] = []
    budgets = sorted({setting.samples_for(name) for name in setting.family_sweeps()})
    for n_samples in budgets:
        run_dir = out_dir / (
            setting.name if n_samples == setting.n_samples else f"{setting.name}-{n_samples}"
        )
        started = time.perf_counter()
        configs, folders = _train_group(setting, run_dir, n_samples, seed, progress)
        seconds = time.perf_counter() - started
        trained += [
            (dcfg, name, folder, seconds)
            for dcfg, (name, folder) in zip(configs, folders.items(), strict=True)
        ]

    evaluation = SyntheticActivations(setting.synthetic, setting.n_eval, split="eval")
    x_eval = evaluation.next_batch()[SYNTHETIC_HOOK]
    truth = evaluation.truth
    rows = []
    for dcfg, name, folder, seconds in trained:
        fam = family(dcfg.architecture)
        scores = recovery_scores(load_dictionary(folder), truth.features, truth.probabilities, x_eval)
        rows.append(
            {
                "setting": setting.name,
                "dictionary": name,
                "family": dcfg.architecture,
                "knob": fam.knob,
                "value": fam.knob_value(dcfg),
                "samples": setting.samples_for(dcfg.architecture),
                "folder": str(folder),
                "train_seconds_group": round(seconds, 1),
                **scores,
            }
        )
    order = {name: i for i, name in enumerate(FAMILIES)}
    return sorted(rows, key=lambda row: (order[row["family"]], row["value"]))


def _train_group(setting: BenchSetting, run_dir: Path, n_samples: int, seed: int, progress: bool):
    """One training run: every dictionary of the setting with this sample budget, on one stream."""
    cfg = TrainConfig(
        run_dir=str(run_dir),
        model=None,
        source=setting.synthetic.as_source(),
        dictionaries=setting.dictionary_configs(seed, n_samples),
        n_tokens=n_samples,
        batch_size=setting.batch_size,
        lr=setting.lr,
        resample_every_tokens=setting.resample_every,
        checkpoint_every=250,
        log_every=25,
        seed=seed,
    )
    if (run_dir / DONE).is_file() and _same_run(run_dir, cfg):
        done = json.loads((run_dir / DONE).read_text())["dictionaries"]
        return cfg.dictionaries, {k: Path(v) for k, v in done.items()}
    resume = checkpoint_file(run_dir) is not None and _same_run(run_dir, cfg)
    return cfg.dictionaries, train(cfg, resume=resume, overwrite=not resume, progress=progress)


def _same_run(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether the folder holds this very configuration (a changed bench retrains from scratch)."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return False
    try:  # from_dict also reads the config.json of runs from before TrainConfig.source
        old = TrainConfig.from_dict(json.loads(saved.read_text())).to_dict()
    except (SaelabError, ValueError, TypeError):
        return False
    new = cfg.to_dict()
    keys = ("source", "n_tokens", "batch_size", "lr", "resample_every_tokens", "seed")
    knobs = [fam.knob for fam in FAMILIES.values() if fam.knob not in fam.options]
    fields = ("architecture", "d_sae", *dict.fromkeys(knobs), "options", "lr", "l1_warmup_fraction")
    same_dicts = [{k: d.get(k) for k in fields} for d in old.get("dictionaries", [])] == [
        {k: d.get(k) for k in fields} for d in new["dictionaries"]
    ]
    return same_dicts and all(old.get(k) == new.get(k) for k in keys)


def best_per_family(rows: list[dict]) -> dict[str, dict]:
    """Each family's best sweep point: most features recovered, then the higher MMCS."""
    best: dict[str, dict] = {}
    for row in rows:
        key = (row["recovered"], row["mmcs"])
        current = best.get(row["family"])
        if current is None or key > (current["recovered"], current["mmcs"]):
            best[row["family"]] = row
    return best


def markdown_table(setting: BenchSetting, rows: list[dict]) -> str:
    """One line per dictionary; the best point of each family in bold."""
    best = {id(row) for row in best_per_family(rows).values()}
    frequent = (
        rows[0].get("mmcs_frequent") is not None and rows[0]["n_frequent"] < setting.synthetic.n_features
    )
    header = ["family", "knob", "MMCS"]
    if frequent:
        header.append(f"MMCS p>=1e-3 ({rows[0]['n_frequent']})")
    header += [f"recovered (cos>{RECOVERY_COSINE})", "false-positive latents", "dead latents", "L0", "FVU"]
    lines = [f"### {setting.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [family(row["family"]).label, f"{row['knob']} = {row['value']:g}", f"{row['mmcs']:.3f}"]
        if frequent:
            cells.append(f"{row['mmcs_frequent']:.3f}")
        cells += [
            f"{row['recovered']:.1%}",
            str(row["false_positive_latents"]),
            str(row["dead_latents"]),
            f"{row['l0']:.2f}",
            f"{row['fvu']:.3f}",
        ]
        if id(row) in best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_setting(setting: BenchSetting, rows: list[dict], out_dir: Path) -> list[Path]:
    """Recovery against L0 (the Pareto view) and each family's distribution of best cosines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {name: fam.colour or f"C{i % 10}" for i, (name, fam) in enumerate(FAMILIES.items())}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, fam in FAMILIES.items():
        points = sorted((r for r in rows if r["family"] == name), key=lambda r: r["l0"])
        if not points:
            continue
        l0 = [r["l0"] for r in points]
        axes[0].plot(l0, [r["recovered"] for r in points], "o-", color=colours[name], label=fam.label)
        axes[1].plot(l0, [r["mmcs"] for r in points], "o-", color=colours[name], label=fam.label)
    mean_active = setting.synthetic.mean_active
    for ax, label in zip(axes, (f"features recovered (cos > {RECOVERY_COSINE})", "MMCS"), strict=True):
        ax.axvline(mean_active, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("L0 (active latents per sample, held out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(setting.title, fontsize=10)
    fig.tight_layout()
    pareto = out_dir / f"pareto_{setting.name}.png"
    fig.savefig(pareto, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, row in best_per_family(rows).items():
        values = sorted(row["max_cosine_per_feature"])
        share = [i / len(values) for i in range(len(values))]
        ax.plot(
            values,
            share,
            color=colours[name],
            label=f"{family(name).label} ({row['knob']}={row['value']:g})",
        )
    ax.axvline(RECOVERY_COSINE, color="grey", ls=":", lw=1)
    ax.set_xlabel("best cosine of a ground-truth feature to any decoder row")
    ax.set_ylabel("share of features with a lower best cosine")
    ax.set_title(f"Best setting per family: {setting.name}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    cosines = out_dir / f"cosines_{setting.name}.png"
    fig.savefig(cosines, dpi=110)
    plt.close(fig)
    return [pareto, cosines]


def run_bench(
    out_dir: str | Path = "runs/toy/bench",
    quick: bool = False,
    seed: int = 0,
    settings: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run the benchmark; write results.json, results.md and the plots into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    available = bench_settings(quick, seed)
    chosen = settings or list(available)
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise SaelabError(f"unknown benchmark setting(s) {unknown}; choose from {', '.join(available)}.")
    started = time.perf_counter()
    report = ["# Ground-truth benchmark", ""]
    results: dict = {"quick": quick, "seed": seed, "settings": {}}
    for name in chosen:
        setting = available[name]
        rows = run_setting(setting, out_dir, seed=seed, progress=progress)
        plots = plot_setting(setting, rows, out_dir)
        best = best_per_family(rows)
        results["settings"][name] = {
            "setting": setting.to_dict(),
            "rows": rows,
            "best": {family: row["dictionary"] for family, row in best.items()},
            "plots": [p.name for p in plots],
        }
        report += [markdown_table(setting, rows), *(f"![{p.stem}]({p.name})" for p in plots), ""]
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", "\n".join(report))
    return results
