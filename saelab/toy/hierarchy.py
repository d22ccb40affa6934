"""Hierarchical toy data (parents with mutually exclusive children) and absorption/splitting from the tree.

The generative model (after Nabeshima's Matryoshka toy tree and SAELens's SynthSAEBench hierarchy):
- P parents, each with C children: G = P (1 + C) features with unit directions, mutually orthogonal when
  d >= G (else independent random unit vectors). Feature i < P is parent i; feature P + i*C + j is
  child j of parent i.
- Each parent fires independently with probability `parent_probability`, with magnitude a ~ M.
- When parent i fires, exactly one of its children fires with probability `child_probability` (which
  one uniformly: siblings are mutually exclusive), with its own magnitude b ~ M; a child never fires
  without its parent.
- x = sum over firing parents of a_i p_i + sum over firing children of b_ij c_ij (+ N(0, noise_std²)).
  So a sample where child j of parent i fires holds the parent's direction plus the child's own.
M is `magnitude` of saelab.toy.synthetic (uniform U[0,1], product, exponential or constant 1),
shifted by `magnitude_offset` (a ~ offset + M) so a firing feature is never near zero.

Metrics of a dictionary against the tree (`hierarchy_scores`), with d_l its decoder row, f_l(s) its
activation on sample s, and m_l(g, S) = sum_{s in S} f_l(s) max(0, d_l . g) latent l's share of
feature g's direction over the samples S (every latent's contribution to the reconstruction along g):
- parent cosine: the best cosine of any decoder row to each parent direction. The *parent latent*
  L_i is that best row.
- absorption of parent i: over the samples S_i where one of its children fires, the share of the
  reconstruction along p_i that latents other than L_i carry: 1 - m_{L_i}(p_i, S_i) / sum_l m_l(p_i, S_i).
  0: the parent latent carries the parent whenever a child fires; 1: child latents carry it all (as
  SAEBench's absorption fraction, with the known direction in place of a probe).
- parent-latent misses: the share of S_i where L_i does not fire at all (SAEBench's full absorption).
- splitting of feature g: how many latents carry at least 10% of sum_l m_l(g, S_g) over the samples
  where g fires (1: one latent; C: a parent spread over child-specific latents).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from saelab.core.fileio import atomic_write_json, atomic_write_text
from saelab.core.sources import SourceKind, register_source
from saelab.errors import DataError, SaelabError
from saelab.toy.synthetic import MAGNITUDES, SYNTHETIC_HOOK, _generator, random_directions

if TYPE_CHECKING:
    from saelab.core.models import HookedLM
    from saelab.dictionaries import Dictionary

HIERARCHY_KIND = "hierarchy"  # TrainConfig.source["kind"]
SPLIT_SHARE = 0.1  # a latent counts towards a feature's splitting when it carries this share of it
PARENT_RECOVERED, PARENT_ABSORBED = 0.95, 0.8  # the acceptance cosines


@dataclass
class HierarchyConfig:
    """The tree, its firing probabilities and magnitudes; serialised with every run trained on it."""

    n_parents: int = 16
    n_children: int = 4  # per parent, mutually exclusive
    d: int = 96
    parent_probability: float = 0.1
    child_probability: float = 1.0  # P(one child fires | the parent fires); 1: the parent never fires alone
    magnitude: str = "uniform"
    magnitude_offset: float = 0.5
    noise_std: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.n_parents >= 1, "n_parents must be at least 1"),
            (self.n_children >= 2, "n_children must be at least 2 (mutually exclusive siblings)"),
            (self.d >= 1, "d must be positive"),
            (0 < self.parent_probability <= 1, "parent_probability must be in (0, 1]"),
            (0 <= self.child_probability <= 1, "child_probability must be in [0, 1]"),
            (self.magnitude in MAGNITUDES, f"magnitude must be one of {', '.join(MAGNITUDES)}"),
            (
                self.magnitude_offset >= 0 and self.noise_std >= 0,
                "magnitude_offset and noise_std must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(f"bad hierarchy setting: {message}.")

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.n_children)

    @property
    def mean_active(self) -> float:
        """Expected firing features per sample (the true L0)."""
        return self.n_parents * self.parent_probability * (1 + self.child_probability)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> HierarchyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def as_source(self) -> dict:
        return {"kind": HIERARCHY_KIND, **self.to_dict()}


class HierarchyTruth:
    """The tree's directions [G, d] (parents first), each child's parent, and the sampler."""

    def __init__(self, cfg: HierarchyConfig):
        self.cfg = cfg
        generator = _generator("hierarchy-features", cfg.seed)
        G = cfg.n_features
        if cfg.d >= G:  # orthogonal: a latent's projection on a feature then comes from that feature alone
            q, _ = torch.linalg.qr(torch.randn(cfg.d, G, generator=generator, dtype=torch.float64))
            self.features = q.t().float().contiguous()
        else:
            self.features = random_directions(G, cfg.d, generator)
        P, C = cfg.n_parents, cfg.n_children
        self.parent_of = torch.arange(P).repeat_interleave(C)  # [P*C]: child index -> its parent

    @property
    def parents(self) -> torch.Tensor:
        return self.features[: self.cfg.n_parents]

    @property
    def children(self) -> torch.Tensor:
        return self.features[self.cfg.n_parents :]

    def _magnitudes(self, shape, generator) -> torch.Tensor:
        kind = self.cfg.magnitude
        if kind == "uniform":
            m = torch.rand(shape, generator=generator)
        elif kind == "product":
            m = torch.rand(shape, generator=generator) * torch.rand(shape, generator=generator)
        elif kind == "exponential":
            m = torch.empty(shape).exponential_(1.0, generator=generator)
        else:
            m = torch.ones(shape)
        return m + self.cfg.magnitude_offset

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples [n, d] and their true coefficients [n, G] (zero where a feature is off)."""
        P, C = self.cfg.n_parents, self.cfg.n_children
        parent_on = torch.rand(n, P, generator=generator) < self.cfg.parent_probability
        child_on = parent_on & (torch.rand(n, P, generator=generator) < self.cfg.child_probability)
        which = torch.randint(C, (n, P), generator=generator)
        children = F.one_hot(which, C).bool() & child_on[..., None]  # [n, P, C], one child at most
        active = torch.cat([parent_on, children.reshape(n, P * C)], dim=1)
        coefficients = active * self._magnitudes((n, self.cfg.n_features), generator)
        x = coefficients @ self.features
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn(x.shape, generator=generator)
        return x, coefficients


class HierarchyActivations:
    """An endless, exactly resumable stream of hierarchical batches (as SyntheticActivations)."""

    def __init__(
        self, cfg: HierarchyConfig, batch_size: int, split: str = "train", rank: int = 0, world_size: int = 1
    ):
        self.cfg, self.batch_size, self.split = cfg, batch_size, split
        self.rank, self.world_size = rank, world_size
        self.truth = HierarchyTruth(cfg)
        self.index = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        index = self.index * self.world_size + self.rank
        x, _ = self.truth.sample(
            self.batch_size, _generator("hierarchy-batch", self.cfg.seed, self.split, index)
        )
        self.index += 1
        return {SYNTHETIC_HOOK: x}

    def dims(self) -> dict[str, int]:
        return {SYNTHETIC_HOOK: self.cfg.d}

    def peek(self, n_rows: int) -> dict[str, torch.Tensor]:
        x, _ = self.truth.sample(n_rows, _generator("hierarchy-peek", self.cfg.seed, self.split))
        return {SYNTHETIC_HOOK: x}

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _build_source(settings: dict, *, batch_size: int, rank: int, world_size: int, lm: HookedLM | None = None):
    return HierarchyActivations(
        HierarchyConfig.from_dict(settings), batch_size, rank=rank, world_size=world_size
    )


register_source(
    SourceKind(
        name=HIERARCHY_KIND,
        description="hierarchical synthetic data",
        build=_build_source,
        hooks=lambda settings: (SYNTHETIC_HOOK,),
        metadata=lambda settings: {
            "model_name": "saelab:hierarchy",
            "dataset_path": "saelab:hierarchy",
            "hierarchy": settings,
        },
    )
)


# ---- metrics ------------------------------------------------------------------------------------
@torch.no_grad()
def hierarchy_scores(
    dictionary: Dictionary, truth: HierarchyTruth, x: torch.Tensor, coefficients: torch.Tensor
) -> dict:
    """Parent/child recovery, absorption and splitting of one dictionary on held-out samples (module doc)."""
    if x.shape[-1] != truth.cfg.d or coefficients.shape[-1] != truth.cfg.n_features:
        raise DataError(
            f"hierarchy_scores needs samples [n, {truth.cfg.d}] and coefficients [n, {truth.cfg.n_features}] of "
            f"this tree; got {tuple(x.shape)} and {tuple(coefficients.shape)}."
        )
    dictionary = dictionary.eval()
    P, C = truth.cfg.n_parents, truth.cfg.n_children
    latents = torch.cat([dictionary.encode(chunk) for chunk in x.split(4096)]).double()  # [n, L]
    recon = torch.cat([dictionary.decode(chunk.float()) for chunk in latents.split(4096)]).double()
    decoder = (dictionary.W_dec / dictionary.output_scale).detach().double()  # [L, d], in input units
    features = truth.features.double()  # unit rows
    cos = F.normalize(features, dim=1) @ F.normalize(decoder, dim=1).T  # [G, L]
    along = (decoder @ features.T).clamp_min(0)  # [L, G]: what one unit of latent l adds along g, if > 0
    active = coefficients > 0  # [n, G]

    best_cos, best_latent = cos.max(dim=1)  # [G]
    # Splitting: m_l(g, S_g) for every latent and feature, then the latents with >= SPLIT_SHARE of it.
    mass = (active.double().T @ latents) * along.T  # [G, L]
    share = mass / mass.sum(1, keepdim=True).clamp_min(1e-12)
    splitting = (share >= SPLIT_SHARE).sum(1)

    absorption, misses, alone_hits = [], [], []
    child_active = active[:, P:].reshape(-1, P, C).any(-1)  # [n, P]: some child of parent i fires
    for i in range(P):
        rows, parent_latent = child_active[:, i], int(best_latent[i])
        if not bool(rows.any()):
            absorption.append(None)
            misses.append(None)
        else:
            m = latents[rows].sum(0) * along[:, i]  # [L]
            absorption.append(float(1 - m[parent_latent] / m.sum().clamp_min(1e-12)))
            misses.append(float((latents[rows, parent_latent] <= 0).double().mean()))
        alone = active[:, i] & ~child_active[:, i]
        alone_hits.append(
            float((latents[alone, parent_latent] > 0).double().mean()) if bool(alone.any()) else None
        )

    def mean(values):
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else None

    fired = (latents > 0).sum(0)
    variance = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {
        "parent_cosine_mean": float(best_cos[:P].mean()),
        "parent_cosine_min": float(best_cos[:P].min()),
        "parents_recovered": int((best_cos[:P] >= PARENT_RECOVERED).sum()),
        "child_cosine_mean": float(best_cos[P:].mean()),
        "absorption_mean": mean(absorption),
        "parent_latent_miss_rate": mean(misses),
        "parent_alone_recall": mean(alone_hits),
        "splitting_parents": float(splitting[:P].double().mean()),
        "splitting_children": float(splitting[P:].double().mean()),
        "l0": float((latents > 0).sum(1).double().mean()),
        "fvu": float((recon - x.double()).pow(2).sum()) / max(variance, 1e-12),
        "dead_latents": int((fired == 0).sum()),
        "parent_cosine": [round(float(v), 4) for v in best_cos[:P]],
        "child_cosine": [round(float(v), 4) for v in best_cos[P:]],
        "absorption": [None if v is None else round(v, 4) for v in absorption],
        "parent_latent": [int(v) for v in best_latent[:P]],
    }


# ---- the benchmark: BatchTopK against Matryoshka BatchTopK at the same L0 ---------------------
@dataclass
class HierarchyBench:
    """One tree and the dictionaries trained on it (every family with a k at the same k)."""

    hierarchy: HierarchyConfig = dataclasses.field(default_factory=HierarchyConfig)
    families: tuple[str, ...] = ("batchtopk", "matryoshka_batchtopk")
    d_sae: int = 128
    k: int | None = None  # None: the true L0, rounded up
    matryoshka_widths: tuple[int, ...] | None = None  # None: (n_parents, d_sae)
    n_samples: int = 3000 * 1024
    batch_size: int = 1024
    lr: float = 3e-3
    n_eval: int = 16_384
    seed: int = 0

    def resolved_k(self) -> int:
        import math

        return self.k if self.k is not None else max(1, math.ceil(self.hierarchy.mean_active))

    def dictionary_configs(self):
        from saelab.dictionaries import DictionaryConfig, family

        widths = list(self.matryoshka_widths or (self.hierarchy.n_parents, self.d_sae))
        configs = []
        for name in self.families:
            fam = family(name)
            if fam.cross_layer:
                raise SaelabError(f"{name} reads several layers; the hierarchy toy has one hook.")
            settings = fam.with_knob(self.resolved_k()) if fam.knob == "k" else {}
            if "matryoshka_widths" in fam.options:
                settings["options"] = {**settings.get("options", {}), "matryoshka_widths": widths}
            configs.append(
                DictionaryConfig(
                    architecture=name,
                    d_in=self.hierarchy.d,
                    d_sae=self.d_sae,
                    hook_name=SYNTHETIC_HOOK,
                    seed=self.seed,
                    **settings,
                )
            )
        return configs

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["k"] = self.resolved_k()
        return out


def quick_bench(seed: int = 0) -> HierarchyBench:
    """A small version for tests (seconds)."""
    return HierarchyBench(
        hierarchy=HierarchyConfig(n_parents=4, n_children=3, d=24, parent_probability=0.25, seed=seed),
        d_sae=32,
        n_samples=300 * 256,
        batch_size=256,
        n_eval=4096,
        seed=seed,
    )


def run_hierarchy(bench: HierarchyBench, out_dir: str | Path, progress: bool = True) -> dict:
    """Train every family of the bench on one stream, score each against the tree, write table and plot."""
    from saelab.dictionaries import family
    from saelab.dictionaries.io import load_dictionary
    from saelab.training import DONE, TrainConfig, checkpoint_file, train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "run"
    cfg = TrainConfig(
        run_dir=str(run_dir),
        model=None,
        source=bench.hierarchy.as_source(),
        dictionaries=bench.dictionary_configs(),
        n_tokens=bench.n_samples,
        batch_size=bench.batch_size,
        lr=bench.lr,
        checkpoint_every=250,
        log_every=25,
        seed=bench.seed,
    )
    started = time.perf_counter()
    same = _same_run(run_dir, cfg)
    if same and (run_dir / DONE).is_file():
        folders = {k: Path(v) for k, v in json.loads((run_dir / DONE).read_text())["dictionaries"].items()}
    else:
        resume = same and checkpoint_file(run_dir) is not None
        folders = train(cfg, resume=resume, overwrite=not resume, progress=progress)
    train_seconds = time.perf_counter() - started

    truth = HierarchyTruth(bench.hierarchy)
    x, coefficients = truth.sample(bench.n_eval, _generator("hierarchy-eval", bench.hierarchy.seed))
    rows = []
    for dcfg, (name, folder) in zip(cfg.dictionaries, folders.items(), strict=True):
        scores = hierarchy_scores(load_dictionary(folder), truth, x, coefficients)
        rows.append({"dictionary": name, "family": dcfg.architecture, "label": family(dcfg.architecture).label,
                     "k": dcfg.k, "options": dcfg.options, "folder": str(folder), **scores})  # fmt: skip
    results = {
        "bench": bench.to_dict(),
        "true_l0": bench.hierarchy.mean_active,
        "rows": rows,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    plot = plot_hierarchy(bench, rows, out_dir)
    results["plot"] = plot.name
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", markdown_table(bench, rows) + f"\n![hierarchy]({plot.name})\n")
    return results


def _same_run(run_dir: Path, cfg) -> bool:
    """Whether the folder holds this very run (a changed bench retrains from scratch)."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return False
    old, new = json.loads(saved.read_text()), cfg.to_dict()
    fields = ("architecture", "d_sae", "k", "options", "seed")
    same_dicts = [{k: d.get(k) for k in fields} for d in old.get("dictionaries", [])] == [
        {k: d.get(k) for k in fields} for d in new["dictionaries"]
    ]
    return same_dicts and all(
        old.get(k) == new.get(k) for k in ("source", "n_tokens", "batch_size", "lr", "seed")
    )


def markdown_table(bench: HierarchyBench, rows: list[dict]) -> str:
    """One line per dictionary: the acceptance figures first."""
    h = bench.hierarchy
    title = (
        f"### {h.n_parents} parents x {h.n_children} exclusive children in d={h.d}, P(parent)={h.parent_probability:g}, "
        f"P(child | parent)={h.child_probability:g}, true L0 {h.mean_active:.2f}; {bench.d_sae} latents, k={bench.resolved_k()}"
    )
    header = ["family", "parent cos mean", "parent cos min", f"parents >= {PARENT_RECOVERED}", "child cos mean",
              "absorption", "parent-latent misses", "splitting (parents)", "splitting (children)", "L0", "FVU", "dead"]  # fmt: skip
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    for r in rows:
        cells = [r["label"], fmt(r["parent_cosine_mean"]), fmt(r["parent_cosine_min"]),
                 f"{r['parents_recovered']}/{h.n_parents}", fmt(r["child_cosine_mean"]), fmt(r["absorption_mean"]),
                 fmt(r["parent_latent_miss_rate"]), fmt(r["splitting_parents"], ".2f"),
                 fmt(r["splitting_children"], ".2f"), fmt(r["l0"], ".2f"), fmt(r["fvu"]), str(r["dead_latents"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_hierarchy(bench: HierarchyBench, rows: list[dict], out_dir: Path) -> Path:
    """Per parent: the best decoder cosine, and the absorption, for every family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saelab.dictionaries import FAMILIES

    colours = {name: fam.colour or f"C{i % 10}" for i, (name, fam) in enumerate(FAMILIES.items())}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    parents = list(range(bench.hierarchy.n_parents))
    width = 0.8 / max(1, len(rows))
    for j, r in enumerate(rows):
        offset = [p + (j - (len(rows) - 1) / 2) * width for p in parents]
        axes[0].bar(offset, r["parent_cosine"], width, color=colours[r["family"]], label=r["label"])
        axes[1].bar(
            offset, [v or 0 for v in r["absorption"]], width, color=colours[r["family"]], label=r["label"]
        )
    axes[0].axhline(PARENT_RECOVERED, color="grey", ls="--", lw=1)
    axes[0].axhline(PARENT_ABSORBED, color="grey", ls=":", lw=1)
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("best decoder cosine to the parent direction")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_ylabel("absorption (share of the parent carried by other latents)")
    for ax in axes:
        ax.set_xlabel("parent")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8, loc="lower left")
    h = bench.hierarchy
    fig.suptitle(
        f"{h.n_parents} parents x {h.n_children} exclusive children, P(child | parent) = {h.child_probability:g}, "
        f"k = {bench.resolved_k()}",
        fontsize=10,
    )
    fig.tight_layout()
    path = out_dir / "hierarchy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
