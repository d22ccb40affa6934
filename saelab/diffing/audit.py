"""A blind audit of a fine-tuned model against its base: what did fine-tuning plant, and where does it live?

`run_audit` is told only the two models and the prompts (and, optionally, transcoders). Every step writes
its result into the audit folder before the next starts, so a rerun skips what is done:

1. **behaviour**: both models answer the prompts; the organism's signature words and trigger prompts
   (`saelab.diffing.behaviour`);
2. **conversations**: every answer as a chat conversation (`conversations.jsonl`);
3. **harvest**: both models' activations at the hook on those conversations, on identical tokens;
4. **crosscoder**: a BatchTopK crosscoder trained on them;
5. **diff**: Δnorm tags and Latent Scaling; the organism-only latents ranked by ν (most genuine first);
6. **features**: the crosscoder's feature store over the conversations (top examples, per-model
   activations), where the candidates' explanations go;
7. **causal**: each candidate's organism decoder direction added to the base, and removed from the
   organism, with the behaviour rate and the corpus loss measured (`saelab.diffing.causal`);
8. **graph** (when transcoders are given): the attribution graph of the organism's strongest trigger;
9. **report**: `audit.md` and `audit.json`.

Nothing in this module knows what the organism was trained to do: the behaviour is measured by the words
that set the organism's answers apart, found in step 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from saelab.core.data import DataConfig
from saelab.core.fileio import atomic_write_json, atomic_write_text
from saelab.core.models import HookedLM
from saelab.errors import DiffingError
from saelab.interventions.generation import GenerationConfig

DEFAULT_HOOK = "blocks.15.hook_resid_post"


@dataclass
class AuditConfig:
    """Every setting of an audit; saved as audit_config.json in the audit folder."""

    prompts: str | None = None  # a text file, one prompt per line; None: the prompts that ship with saelab
    hook: str = DEFAULT_HOOK
    samples: int = 2  # answers per prompt and model
    max_new_tokens: int = 64
    width: int = 2048
    k: int = 32
    epochs: float = 8.0  # passes of the crosscoder over the harvested tokens
    batch_size: int = 1024
    lr: float = 1e-3
    min_fires: int = 5  # a candidate must fire on at least this many harvested tokens
    candidates: int = 10
    steer_multiples: tuple[float, ...] = (1.0, 2.0, 3.0)  # x the latent's largest activation seen
    joint: int = 3  # the best candidates ablated together
    test_prompts: int = 16  # trigger prompts the causal tests answer
    test_new_tokens: int = 48
    corpus: str | None = None  # text for the loss checks (its eval split); None: the embedded corpus
    corpus_contexts: int = 32
    explainer: str | None = "local"  # an LM client spec (saelab.explain.clients), or None for none
    transcoders: str | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Step:
    name: str
    seconds: float
    skipped: bool = False


@dataclass
class AuditContext:
    """The loaded models and the folder, shared by the steps."""

    base: HookedLM
    organism: HookedLM
    out: Path
    cfg: AuditConfig
    steps: list[Step] = field(default_factory=list)

    @property
    def hooks(self) -> list[str]:
        from saelab.diffing.paired import member_hook

        return [member_hook(0, self.cfg.hook), member_hook(1, self.cfg.hook)]


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts of a text file (one a line, # comments), or the everyday requests that ship with saelab."""
    if path is None:
        text = (
            resources.files("saelab.diffing").joinpath("data/audit_prompts.txt").read_text(encoding="utf-8")
        )
        where = "saelab's audit prompts"
    else:
        path = Path(path)
        if not path.is_file():
            raise DiffingError(f"{path} does not exist; give a text file with one prompt per line.")
        text, where = path.read_text(encoding="utf-8"), str(path)
    prompts = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(prompts) < 4:
        raise DiffingError(
            f"{where} holds {len(prompts)} prompts; an audit compares the models on at least 4 (dozens are better)."
        )
    return prompts


def _timed(ctx: AuditContext, name: str, done: Path, work):
    """Run one step unless its result exists (`done`); record and print its time."""
    started = time.perf_counter()
    if done.exists():
        ctx.steps.append(Step(name, 0.0, skipped=True))
        print(f"[audit] {name}: done before, kept ({done.relative_to(ctx.out)})", flush=True)
        return
    work()
    seconds = time.perf_counter() - started
    ctx.steps.append(Step(name, round(seconds, 1)))
    record = ctx.out / "steps.json"  # each step's time when it ran, for reports written after a resume
    times = json.loads(record.read_text()) if record.exists() else {}
    atomic_write_json(record, times | {name: round(seconds, 1)})
    print(f"[audit] {name}: {seconds:.0f} s", flush=True)


# ---- steps ----------------------------------------------------------------------------------------
def _behaviour(ctx: AuditContext) -> None:
    from saelab.diffing.behaviour import behaviour_diff

    cfg = ctx.cfg
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.7, batch_size=32, seed=cfg.seed)
    result = behaviour_diff(ctx.base, ctx.organism, read_prompts(cfg.prompts), cfg.samples, gen)
    atomic_write_json(ctx.out / "behaviour.json", result.to_dict())


def _conversations(ctx: AuditContext) -> None:
    behaviour = _load_behaviour(ctx)
    lines = []
    for i, prompt in enumerate(behaviour.prompts):
        answers = [("base", a) for a in behaviour.base_answers[i]]
        answers += [("organism", a) for a in behaviour.organism_answers[i]]
        for model, answer in answers:
            if answer.strip():
                messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                record = {"messages": messages, "model": model, "signature": behaviour.rate([answer]) > 0}
                lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(ctx.out / "conversations.jsonl", "\n".join(lines) + "\n")


def chat_data(out: Path) -> DataConfig:
    """The audit's conversations as chat data: every role, every conversation (no split)."""
    return DataConfig(source=str(out / "conversations.jsonl"), chat=True, split="all")


def _count_tokens(data: DataConfig, tokenizer) -> int:
    return sum(int(keep.sum()) for _, keep in data.masked_batches(tokenizer, 64))


def _harvest(ctx: AuditContext) -> None:
    from saelab.core.activations import harvest_to_cache
    from saelab.diffing.paired import PairedModels

    data = chat_data(ctx.out)
    n_tokens = _count_tokens(data, ctx.base.tokenizer)
    paired = PairedModels([ctx.base, ctx.organism])
    harvest_to_cache(paired, data, ctx.hooks, n_tokens, ctx.out / "activations", seed=ctx.cfg.seed)
    atomic_write_text(ctx.out / "activations" / "complete", f"{n_tokens}\n")  # the step's marker


def crosscoder_dir(out: Path) -> Path:
    """The audit's crosscoder folder (the trainer names it by its settings), or where it will be."""
    saved = sorted((out / "crosscoder" / "saes").glob("*/cfg.json"))
    return saved[0].parent if saved else out / "crosscoder" / "saes" / "crosscoder"


def _train(ctx: AuditContext) -> None:
    from saelab.core.activations import CacheInfo
    from saelab.dictionaries import DictionaryConfig
    from saelab.training import TrainConfig, train

    cfg = ctx.cfg
    n_cached = CacheInfo.read(ctx.out / "activations").n_tokens
    dictionary = DictionaryConfig(
        architecture="crosscoder_batchtopk",
        hook_name=f"model{{i}}/{cfg.hook}",
        layers=[0, 1],
        d_in=ctx.base.d_model,
        d_sae=cfg.width,
        k=cfg.k,
    )
    train_cfg = TrainConfig(
        run_dir=str(ctx.out / "crosscoder"),
        activations=str(ctx.out / "activations"),
        dictionaries=[dictionary],
        n_tokens=int(cfg.epochs * n_cached),
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        evaluate_after=False,
        dead_after_tokens=min(25_000, n_cached),
    )
    train(train_cfg, overwrite=True)


def diff_dir(out: Path) -> Path:
    return crosscoder_dir(out) / "diff"


def _cache_batches(ctx: AuditContext, crosscoder):
    from saelab.core.activations import CachedActivations, CacheInfo

    n = CacheInfo.read(ctx.out / "activations").n_tokens
    cache = CachedActivations(
        ctx.out / "activations", crosscoder.cfg.input_hooks, batch_size=min(4096, n), n_tokens=n
    )
    while (batch := cache.next_batch()) is not None:
        yield batch


def _diff(ctx: AuditContext) -> None:
    from saelab.diffing.latents import diff_latents
    from saelab.diffing.plots import plot_delta_norm, plot_nu_scatter

    crosscoder = _load_crosscoder(ctx)
    result = diff_latents(crosscoder, _cache_batches(ctx, crosscoder))
    folder = diff_dir(ctx.out)  # where `saelab diff` writes, so `saelab analyze` finds it too
    result.save_json(folder / "diff.json")
    plot_delta_norm(result, folder / "delta_norm.png")
    plot_nu_scatter(result, folder / "nu_scatter.png")
    association = behaviour_association(ctx, crosscoder)
    candidates = rank_candidates(result.rows(), ctx.cfg, association)
    atomic_write_json(ctx.out / "candidates.json", {"candidates": candidates})


@torch.no_grad()
def behaviour_association(ctx: AuditContext, crosscoder, batch_size: int = 16) -> torch.Tensor | None:
    """Per latent: its mean activation on the assistant tokens of the organism's answers that carry the
    signature, minus its mean on the base's answers to the same prompts, over its largest activation there
    ([F]); None without a signature. Against the same prompts, what the answers are about cancels and what
    the organism adds stands out; read off the data, never off the behaviour."""
    from saelab.core.chat import render
    from saelab.core.prompts import pad_rows, pad_token_id
    from saelab.diffing.paired import PairedModels

    records = [json.loads(line) for line in (ctx.out / "conversations.jsonl").read_text().splitlines()]
    shown = {_prompt(r) for r in records if r["signature"] and r["model"] == "organism"}
    if not shown:
        return None
    # The organism's answers with the signature (group True) against the base's to the same prompts.
    records = [r for r in records if _prompt(r) in shown and (r["model"] == "base" or r["signature"])]
    paired = PairedModels([ctx.base, ctx.organism])
    tokenizer = ctx.base.tokenizer
    start = next((v for v in (tokenizer.bos_token_id, tokenizer.eos_token_id) if v is not None), None)
    n = crosscoder.cfg.d_sae
    sums = {True: torch.zeros(n, dtype=torch.float64), False: torch.zeros(n, dtype=torch.float64)}
    counts = {True: 0, False: 0}
    peak = torch.zeros(n)
    for lo in range(0, len(records), batch_size):
        chunk = records[lo : lo + batch_size]
        rendered = [render(tokenizer, r["messages"], max_length=256) for r in chunk]
        head = [] if start is None else [start]
        ids, mask = pad_rows([head + c.input_ids for c in rendered], pad_token_id(tokenizer), left=False)
        x = crosscoder.capture_inputs(
            paired.capture(ids.to(ctx.base.device), crosscoder.cfg.input_hooks, mask)
        )
        acts = crosscoder.encode(x).float().cpu()
        for row, (record, chat) in enumerate(zip(chunk, rendered, strict=True)):
            keep = torch.tensor([False] * len(head) + chat.assistant)
            values = acts[row, : len(keep)][keep]
            group = record["model"] == "organism"
            sums[group] += values.double().sum(0)
            counts[group] += len(values)
            peak = torch.maximum(peak, values.amax(0) if len(values) else peak)
    mean = {g: sums[g] / max(counts[g], 1) for g in sums}
    return ((mean[True] - mean[False]) / peak.double().clamp_min(1e-6)).float()


def _prompt(record: dict) -> str:
    return record["messages"][0]["content"]


def rank_candidates(
    rows: list[dict], cfg: AuditConfig, association: torch.Tensor | None = None
) -> list[dict]:
    """The candidates: organism-only latents (member B) that fire, most genuine by Latent Scaling first (low
    max ν); then, to fill `cfg.candidates`, the latents most associated with the organism's signature
    answers (`behaviour_association`). Each row says which ranking chose it (`source`)."""
    chosen = [r | {"source": "latent scaling"} for r in _by_latent_scaling(rows, cfg)]
    if association is not None:
        taken = {r["latent"] for r in chosen}
        by_latent = {r["latent"]: r for r in rows}
        order = torch.argsort(association, descending=True).tolist()
        for latent in order:
            if len(chosen) >= cfg.candidates or association[latent] <= 0:
                break
            if latent not in taken and (by_latent[latent].get("fired") or 0) >= cfg.min_fires:
                chosen.append(by_latent[latent] | {"source": "behaviour association"})
    for r in chosen:
        if association is not None:
            r["association"] = float(association[r["latent"]])
    return chosen[: cfg.candidates]


def _by_latent_scaling(rows: list[dict], cfg: AuditConfig) -> list[dict]:
    pool = [
        r
        for r in rows
        if r["tag"] == "b_only"
        and (r.get("fired") or 0) >= cfg.min_fires
        and r.get("nu_eps") is not None
        and r.get("nu_r") is not None
        and math.isfinite(r["nu_eps"])
        and math.isfinite(r["nu_r"])
    ]
    pool.sort(key=lambda r: max(r["nu_eps"], r["nu_r"]))
    return pool[: cfg.candidates]


def _features(ctx: AuditContext) -> None:
    from saelab.analysis.features import AnalysisConfig, analyze
    from saelab.core.activations import CacheInfo
    from saelab.diffing.paired import PairedModels

    crosscoder = _load_crosscoder(ctx)
    data = chat_data(ctx.out)
    n_tokens = CacheInfo.read(ctx.out / "activations").n_tokens  # every token of the conversations
    analyze(
        PairedModels([ctx.base, ctx.organism]),
        crosscoder,
        data,
        AnalysisConfig(n_tokens=n_tokens + data.context_size),
        store_path=crosscoder_dir(ctx.out) / "features.db",
        progress=True,
        extra_meta={"latent_diff": {"diff_json": str(diff_dir(ctx.out) / "diff.json")}},
        latent_diff=json.loads((diff_dir(ctx.out) / "diff.json").read_text())["latents"],
    )
    candidates = [c["latent"] for c in _load_candidates(ctx)]
    summary = None
    if ctx.cfg.explainer and len(candidates) >= 2:
        summary = _explain(ctx, crosscoder, candidates)
    record = {"store": str(crosscoder_dir(ctx.out) / "features.db")}
    if summary is not None:
        record["explain"] = {k: summary.get(k) for k in ("explained", "scored", "failures")}
    atomic_write_json(ctx.out / "features.json", record)


def _explain(ctx: AuditContext, crosscoder, latents: list[int]) -> dict:
    from saelab.diffing.paired import PairedModels
    from saelab.explain.clients import make_client
    from saelab.explain.pipeline import ExplainConfig, explain_features

    client = make_client(ctx.cfg.explainer)
    return explain_features(
        crosscoder_dir(ctx.out) / "features.db",
        PairedModels([ctx.base, ctx.organism]),
        crosscoder,
        client,
        client,
        # One label per latent, scored by detection on small example sets: an honest score in minutes.
        ExplainConfig(
            features=latents,
            n_explain=20,
            n_test=20,
            n_random=20,
            n_hard=0,
            scorers=("detection",),
            n_bootstrap=200,
        ),  # fmt: skip
    )


def _causal(ctx: AuditContext) -> None:
    from saelab.diffing.causal import FLUENT_MARGIN, ablated_loss, ablated_rate, fluency, steer_rates
    from saelab.interventions.evaluation import corpus_loss
    from saelab.interventions.generation import generate

    cfg = ctx.cfg
    behaviour = _load_behaviour(ctx)
    crosscoder = _load_crosscoder(ctx)
    candidates = _load_candidates(ctx)
    triggers = behaviour.triggers()[: cfg.test_prompts]
    result: dict = {"triggers": [behaviour.prompts[i] for i in triggers], "candidates": []}
    if not behaviour.words or not triggers or not candidates:
        result["skipped"] = (
            "no signature words set the organism's answers apart"
            if not behaviour.words
            else "no trigger prompts"
            if not triggers
            else "no organism-only latent passed Latent Scaling"
        )
        atomic_write_json(ctx.out / "causal.json", result)
        return
    prompts = result["triggers"]
    gen = GenerationConfig(
        max_new_tokens=cfg.test_new_tokens, temperature=0.7, batch_size=16, seed=cfg.seed + 7
    )
    rate = behaviour.rate
    plain = generate(ctx.base, prompts, (), gen)
    result["base_rate"] = rate(plain)
    result["base_fluency"] = fluency(ctx.base, prompts, plain, gen)
    result["fluent_below"] = result["base_fluency"] + FLUENT_MARGIN
    result["organism_rate"] = rate(generate(ctx.organism, prompts, (), gen))
    corpus = DataConfig(source=cfg.corpus, split="eval")
    result["base_loss"] = corpus_loss(ctx.base, corpus, cfg.corpus_contexts)
    result["organism_loss"] = corpus_loss(ctx.organism, corpus, cfg.corpus_contexts)
    decoder = crosscoder.decoder(1).detach().float().cpu()  # the organism's decoders, activation units
    peaks = _peak_activations(ctx, [c["latent"] for c in candidates])
    for c in candidates:
        latent = c["latent"]
        peak = peaks[latent]
        alphas = [m * peak for m in cfg.steer_multiples]
        row = {
            "latent": latent,
            "peak_activation": peak,
            "steer_base": steer_rates(ctx.base, cfg.hook, decoder[latent], alphas, prompts, rate, gen),
            "ablate_organism": ablated_rate(
                ctx.organism, cfg.hook, decoder[latent : latent + 1], prompts, rate, gen
            ),
        }
        fluent = [s["rate"] for s in row["steer_base"] if s["loss"] <= result["fluent_below"]]
        row["best_steer_rate"] = max(fluent, default=0.0)  # fluent answers only
        result["candidates"].append(row)
        print(
            f"[audit]   latent {latent}: base steered {row['best_steer_rate']:.0%}, "
            f"organism ablated {row['ablate_organism']['rate']:.0%}",
            flush=True,
        )
    # The few latents the report names: those whose removal cut the rate most, ablated together.
    ranked = sorted(result["candidates"], key=lambda r: r["ablate_organism"]["rate"])
    named = [r["latent"] for r in ranked[: cfg.joint]]
    directions = decoder[named]
    result["joint"] = {
        "latents": named,
        **ablated_rate(ctx.organism, cfg.hook, directions, prompts, rate, gen),
        "organism_loss": ablated_loss(ctx.organism, cfg.hook, directions, corpus, cfg.corpus_contexts),
    }
    for row in result["candidates"]:
        row["ablate_organism"]["organism_loss"] = ablated_loss(
            ctx.organism, cfg.hook, decoder[row["latent"] : row["latent"] + 1], corpus, cfg.corpus_contexts
        )
    atomic_write_json(ctx.out / "causal.json", result)


def _peak_activations(ctx: AuditContext, latents: list[int]) -> dict[int, float]:
    """Each latent's largest activation on the conversations (the unit steering strengths count in), as the
    feature pass stored it."""
    from saelab.analysis.store import FeatureStore

    with FeatureStore(crosscoder_dir(ctx.out) / "features.db", create=False) as store:
        return {latent: store.feature(latent)["max_act"] for latent in latents}


def _graph(ctx: AuditContext) -> None:
    """The organism's attribution graph of its strongest trigger, up to the first signature word it wrote."""
    from saelab.circuits.graph import attribute, prune
    from saelab.circuits.graph_json import graph_json
    from saelab.circuits.transcoders import Transcoders
    from saelab.dictionaries.transcoders import load_transcoders
    from saelab.interventions.evaluation import keyword_pattern

    behaviour = _load_behaviour(ctx)
    pattern = keyword_pattern(behaviour.words) if behaviour.words else None
    found = [
        (i, answer, match.start())
        for i in behaviour.triggers()
        for answer in behaviour.organism_answers[i]
        if pattern is not None and (match := pattern.search(answer))
    ]
    if not found:
        atomic_write_json(ctx.out / "graph.json", {"skipped": "no trigger prompt to trace"})
        return
    index, answer, cut = found[0]
    tokenizer = ctx.organism.tokenizer
    text = (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": behaviour.prompts[index]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        + answer[:cut].rstrip()
    )
    start = next(v for v in (tokenizer.bos_token_id, tokenizer.eos_token_id) if v is not None)
    ids = [start, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    transcoders = Transcoders(load_transcoders(ctx.cfg.transcoders))
    transcoders.to(ctx.organism.device)
    graph = attribute(ctx.organism, transcoders, ids, max_feature_nodes=4096, zero_bos=True)
    document = graph_json(prune(graph), ctx.organism, slug="audit-trigger")
    document["metadata"]["audit"] = {"prompt": behaviour.prompts[index], "answer_prefix": answer[:cut]}
    atomic_write_json(ctx.out / "graph.json", document)


def _load_behaviour(ctx: AuditContext):
    from saelab.diffing.behaviour import BehaviourDiff

    return BehaviourDiff.from_dict(json.loads((ctx.out / "behaviour.json").read_text()))


def _load_crosscoder(ctx: AuditContext):
    from saelab.dictionaries.io import load_dictionary

    return load_dictionary(crosscoder_dir(ctx.out)).eval()


def _load_candidates(ctx: AuditContext) -> list[dict]:
    return json.loads((ctx.out / "candidates.json").read_text())["candidates"]


# ---- the chain --------------------------------------------------------------------------------------
def run_audit(base: HookedLM, organism: HookedLM, out: str | Path, cfg: AuditConfig | None = None) -> dict:
    """Run every step not done yet into `out` and write the report; returns the report's data."""
    from saelab.diffing.paired import PairedModels
    from saelab.diffing.report import write_report

    cfg = cfg or AuditConfig()
    PairedModels([base, organism])  # refuses different tokenizers or widths before any work
    base.hook_dim(cfg.hook)  # an unknown hook fails here, with the valid names
    read_prompts(cfg.prompts)  # as do too few prompts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "audit_config.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise DiffingError(
            f"{out} holds an audit with other settings ({saved}); choose a new --out folder or delete it."
        )
    atomic_write_json(saved, cfg.to_dict())
    ctx = AuditContext(base, organism, out, cfg)
    started = time.perf_counter()
    _timed(ctx, "behaviour", out / "behaviour.json", lambda: _behaviour(ctx))
    _timed(ctx, "conversations", out / "conversations.jsonl", lambda: _conversations(ctx))
    _timed(ctx, "harvest", out / "activations" / "complete", lambda: _harvest(ctx))
    _timed(ctx, "crosscoder", crosscoder_dir(out) / "cfg.json", lambda: _train(ctx))
    _timed(ctx, "diff", out / "candidates.json", lambda: _diff(ctx))
    _timed(ctx, "features", out / "features.json", lambda: _features(ctx))
    _timed(ctx, "causal", out / "causal.json", lambda: _causal(ctx))
    if cfg.transcoders:
        _timed(ctx, "graph", out / "graph.json", lambda: _graph(ctx))
    return write_report(ctx, time.perf_counter() - started)
