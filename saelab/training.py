"""One trainer for every dictionary family, many dictionaries on one activation stream.

Reads top to bottom: build the activation source, initialise each dictionary from a first sample,
then loop: one batch -> every dictionary takes an Adam step -> dead-latent bookkeeping -> metrics ->
an atomic checkpoint now and then. `resume=True` restores weights, optimizer, schedule, data position,
RNG and dead-latent counters, so the resumed run is the run that would have happened.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from saelab.core import distributed, sources
from saelab.core.activations import (
    CachedActivations,
    CacheInfo,
    StreamingActivations,
    harvest_to_cache,
    steps_for,
)
from saelab.core.data import DataConfig
from saelab.core.fileio import atomic_folder, atomic_write_json, atomic_write_text
from saelab.core.sources import ActivationSource
from saelab.dictionaries import Dictionary, DictionaryConfig, StepContext, build_dictionary, family
from saelab.dictionaries.io import save_dictionary
from saelab.dictionaries.sets import DictionarySet, split_hook, write_set_index
from saelab.errors import RunFolderError, UnknownHookError

if TYPE_CHECKING:
    from saelab.core.models import HookedLM

DONE = "DONE.json"
CHECKPOINT = "checkpoint"
# What a fresh (not resumed) run clears from its folder: only files this trainer writes.
RUN_ARTIFACTS = ("metrics.jsonl", "saes", DONE, CHECKPOINT, f".{CHECKPOINT}.old")
# Feature density (sparsity.safetensors) is counted per token over the last 10% of steps (at least 16).
DENSITY_FRACTION, DENSITY_MIN_STEPS = 0.1, 16


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.json in the run folder."""

    run_dir: str = "runs/sae"
    model: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    dictionaries: list[DictionaryConfig] = field(default_factory=lambda: [DictionaryConfig()])
    activations: str | None = None  # an existing cache; None: harvest into run_dir/activations
    stream: bool = False  # train straight from the model through a shuffle buffer, no cache
    # Train on another activation source instead of a model: {"kind": name, **settings}, a kind
    # registered in saelab.core.sources (e.g. saelab.toy's SyntheticConfig(...).as_source()).
    source: dict | None = None
    n_tokens: int = 1_000_000
    # Tokens to harvest into the run's cache (None: n_tokens). Fewer than n_tokens trains for more
    # than one epoch over the cache, each epoch in a new order (what the demo does on slow CPUs).
    harvest_tokens: int | None = None
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_fraction: float = 0.02
    decay_fraction: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    dead_after_tokens: int = 25_000
    # Every this many tokens (0: never), point latents dead for dead_after_tokens at the inputs the
    # dictionary explains worst (Anthropic's resampling); stops when the learning rate starts to decay.
    resample_every_tokens: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    # The LM's dtype while harvesting. "auto" (saelab.core.devices): bfloat16 where the hardware has bf16
    # matrix units (~2.8x faster on AMX CPUs; changes the residual stream by ~1%, far below an SAE's
    # reconstruction error), float32 elsewhere. A run stores the dtype it resolved to.
    model_dtype: str = "auto"
    # Read by `saelab train`: evaluate every dictionary once trained (kept by --resume).
    evaluate_after: bool = True
    harvest_batch_contexts: int = 32
    buffer_tokens: int = 131072
    # Streaming: at most this many bytes of shuffle buffer over all hooks (None: buffer_tokens rows).
    # A run over many hooks (one dictionary per layer) shrinks its buffer to stay within it.
    buffer_bytes: int | None = None
    # One dictionary per layer (`saelab train --layers`): names carry the layer, and each sweep point's
    # dictionaries are written as a dictionary set (run_dir/sets/<name>/set.json).
    layered: bool = False

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["data"] = self.data.to_dict()
        out["dictionaries"] = [d.to_dict() for d in self.dictionaries]
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        raw = dict(raw)
        old_synthetic = raw.pop("synthetic", None)  # config.json of runs from before `source`
        if old_synthetic is not None and raw.get("source") is None:
            raw["source"] = {"kind": "synthetic", **old_synthetic}
        raw["data"] = DataConfig.from_dict(raw.get("data", {}))
        raw["dictionaries"] = [DictionaryConfig.from_dict(d) for d in raw.get("dictionaries", [])]
        raw["betas"] = tuple(raw.get("betas", (0.9, 0.999)))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @property
    def hooks(self) -> list[str]:
        names: list[str] = []
        for d in self.dictionaries:
            names += d.input_hooks + (d.output_hooks if d.output_hook_name else [])
        return list(dict.fromkeys(names))


def buffer_rows(cfg: TrainConfig, dims: dict[str, int]) -> int:
    """Rows of the streaming shuffle buffer: buffer_tokens, fewer if buffer_bytes (float32) says so."""
    if cfg.buffer_bytes is None:
        return cfg.buffer_tokens
    per_row = 4 * sum(dims.values())
    return min(cfg.buffer_tokens, max(4 * cfg.batch_size, cfg.buffer_bytes // per_row))


def dictionary_name(cfg: DictionaryConfig, index: int, names: set[str], layered: bool = False) -> str:
    """A readable, unique folder name: topk-k32-w4608, relu-l1_5-w4608, ... (the family's tag); with
    `layered` (one dictionary per layer) prefixed by the layer: L3-transcoder-jumprelu-l0_32-w1024."""
    name = f"{cfg.architecture}-{family(cfg.architecture).tag(cfg)}-w{cfg.d_sae}"
    if cfg.is_transcoder:
        name = "transcoder-" + name
    if layered and not cfg.layers:  # a cross-layer dictionary reads every layer: no layer in its name
        name = f"L{split_hook(cfg.hook_name)[0]}-{name}"
    return name if name not in names else f"{name}-{index}"


def lr_factor(step: int, total: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last decay_fraction of steps."""
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    decay_start = int((1 - decay_fraction) * total)
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


class _Member:
    """One dictionary being trained, with its optimizer and dead-latent counters."""

    def __init__(self, name: str, dictionary: Dictionary, cfg: TrainConfig, total_steps: int):
        self.name, self.dictionary = name, dictionary
        lr = dictionary.cfg.lr if dictionary.cfg.lr is not None else cfg.lr
        self.optimizer = torch.optim.Adam(dictionary.parameters(), lr=lr, betas=cfg.betas, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_fraction, cfg.decay_fraction)
        )
        d_sae = dictionary.cfg.d_sae
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
        # Feature density at save: tokens on which each latent fires, over the last steps of training.
        self.density_start = total_steps - min(
            total_steps, max(DENSITY_MIN_STEPS, math.ceil(DENSITY_FRACTION * total_steps))
        )
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.density_tokens = 0
        self.count_tokens = 0
        self.resampled = 0  # dead latents resampled so far
        self.window: list[dict[str, float]] = []  # step terms since the last log line (checkpointed)
        self.window_summary: dict[str, float] | None = None

    def state_dict(self) -> dict:
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "tokens_since_fired": self.tokens_since_fired,
            "fire_counts": self.fire_counts,
            "density_tokens": self.density_tokens,
            "count_tokens": self.count_tokens,
            "resampled": self.resampled,
            "window": [dict(terms) for terms in self.window],
        }

    def load_state_dict(self, state: dict) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.fire_counts = state["fire_counts"].clone()
        self.density_tokens = int(state["density_tokens"])
        self.count_tokens = int(state["count_tokens"])
        self.resampled = int(state.get("resampled", 0))
        self.window = [dict(terms) for terms in state["window"]]


def checkpoint_file(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: checkpoint/state.pt, or the previous one if a crash hit the
    instant between the two renames of `atomic_folder` (the old folder is then `.checkpoint.old`)."""
    for folder in (CHECKPOINT, f".{CHECKPOINT}.old"):
        if (run_dir / folder / "state.pt").is_file():
            return run_dir / folder / "state.pt"
    return None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run by accident (reads only); say which flag does what the user meant."""
    if resume:
        if checkpoint_file(run_dir) is None or not (run_dir / "config.json").is_file():
            raise RunFolderError(
                f"cannot resume: {run_dir} holds no checkpoint ({CHECKPOINT}/state.pt and config.json). "
                "Start a new run without --resume, or point --run-dir at the folder of the run you want "
                "to continue."
            )
        return
    if (run_dir / DONE).exists() and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a finished run. Pass --overwrite to replace it, or choose another "
            "--run-dir."
        )
    if checkpoint_file(run_dir) is not None and not overwrite:
        raise RunFolderError(
            f"{run_dir} holds an unfinished run. Pass --resume to continue it, --overwrite to start over, "
            "or choose another --run-dir."
        )


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """check_run_dir, then make the folder ready: a fresh run starts without stale metrics or SAEs."""
    check_run_dir(run_dir, resume, overwrite)
    if resume:
        return
    if run_dir.exists():
        for child in run_dir.iterdir():
            if child.name == "activations":
                continue  # a cache is still valid for the same settings (and resumable if partial)
            if overwrite or child.name in RUN_ARTIFACTS:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _load_lm(cfg: TrainConfig) -> HookedLM:
    from saelab.core.models import load_model

    return load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)


def resolve_auto(cfg: TrainConfig) -> TrainConfig:
    """Replace every "auto" dtype by what this hardware runs fast, so config.json says what ran."""
    from saelab.core.devices import encoder_dtype, resolve_dtype_name

    if cfg.source is not None:
        needs_model = sources.resolve_source(cfg.source)[0].needs_model
    else:
        needs_model = cfg.stream or cfg.activations is None
    if cfg.model_dtype == "auto" and needs_model:
        cfg.model_dtype = resolve_dtype_name("auto", cfg.device)
    for dcfg in cfg.dictionaries:
        dcfg.encoder_dtype = encoder_dtype(dcfg.encoder_dtype, cfg.device)
    return cfg


def build_source(
    cfg: TrainConfig, rank: int, world_size: int, progress: bool, lm: HookedLM | None = None
) -> ActivationSource:
    """The activation stream: the config's source kind, or the model's (a cache, or the live model).

    `lm` is the already loaded model, if any (it is loaded here when needed and not given).
    """
    if cfg.source is not None:
        if lm is None and sources.resolve_source(cfg.source)[0].needs_model:
            lm = _load_lm(cfg)
        return sources.build_source(cfg.source, cfg.batch_size, rank=rank, world_size=world_size, lm=lm)
    if cfg.stream:
        lm = lm if lm is not None else _load_lm(cfg)
        return StreamingActivations(
            lm,
            cfg.data,
            cfg.hooks,
            cfg.batch_size,
            n_tokens=None,
            buffer_tokens=buffer_rows(cfg, {hook: lm.hook_dim(hook) for hook in cfg.hooks}),
            batch_contexts=cfg.harvest_batch_contexts,
            seed=cfg.seed,
            progress=progress,
            rank=rank,
            world_size=world_size,
        )
    path = Path(cfg.activations) if cfg.activations else Path(cfg.run_dir) / "activations"
    if cfg.activations is None:
        error = None
        if rank == 0:
            try:
                lm = lm if lm is not None else _load_lm(cfg)
                harvest_to_cache(
                    lm,
                    cfg.data,
                    cfg.hooks,
                    cfg.harvest_tokens or cfg.n_tokens,
                    path,
                    batch_contexts=cfg.harvest_batch_contexts,
                    seed=cfg.seed,
                    progress=progress,
                )
            except Exception as err:
                error = err
            del lm
        distributed.raise_if_any_failed(error)  # also the barrier: the cache is complete after it
    return CachedActivations(
        path,
        cfg.hooks,
        cfg.batch_size,
        seed=cfg.seed,
        n_tokens=cfg.n_tokens,
        rank=rank,
        world_size=world_size,
    )


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Path]:
    """Train every dictionary in cfg on one activation stream; return {name: saved SAE folder}.

    `stop_after_steps` ends the process early as if interrupted (after a checkpoint), for tests.
    """
    run_dir = Path(cfg.run_dir)
    rank, world_size = distributed.setup(cfg.device)
    main = rank == 0
    lm, error = None, None
    try:  # every refusal comes before anything is written (and on every rank: no one hangs)
        check_run_dir(run_dir, resume, overwrite)
        if resume:
            cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        cfg = resolve_auto(cfg)
        lm = _check_hooks(cfg, main)
        if main:
            prepare_run_dir(run_dir, resume, overwrite)
            if not resume:
                atomic_write_json(run_dir / "config.json", cfg.to_dict())
    except Exception as err:
        error = err
    distributed.raise_if_any_failed(error)
    torch.manual_seed(cfg.seed)
    source = build_source(cfg, rank, world_size, progress and main, lm=lm)
    del lm
    total_steps = steps_for(cfg.n_tokens, cfg.batch_size)

    dims = source.dims()
    for dcfg in cfg.dictionaries:  # d_in = 0 means "as wide as the hook point"
        if dcfg.d_in <= 0:
            dcfg.d_in = dims[dcfg.input_hooks[0]]
            dcfg.d_out = dims[dcfg.output_hooks[0]] if dcfg.output_hook_name else None
    names: set[str] = set()
    members: list[_Member] = []
    init_rows = None
    layered = cfg.layered
    for index, dcfg in enumerate(cfg.dictionaries):
        dictionary = build_dictionary(dcfg).to(cfg.device)
        if not resume:
            if init_rows is None:
                init_rows = source.peek(min(cfg.batch_size * 4, 16384))
            x, y = dictionary.training_inputs(init_rows)
            dictionary.init_from_data(x.to(cfg.device), y.to(cfg.device))
        name = dictionary_name(dcfg, index, names, layered)
        names.add(name)
        members.append(_Member(name, dictionary, cfg, total_steps))

    step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        state = torch.load(checkpoint_file(run_dir), map_location="cpu", weights_only=True)
        step = int(state["step"])
        # One data position per rank (streaming ranks read their own contexts); a checkpoint from
        # before per-rank positions, or a rank-independent source on more ranks, uses rank 0's.
        sources = state.get("sources") or [state["source"]]
        source.load_state_dict(sources[rank] if rank < len(sources) else sources[0])
        torch.set_rng_state(state["rng"])
        for member, member_state in zip(members, state["members"], strict=True):
            member.load_state_dict(member_state)
        if main:  # drop metrics logged after the checkpoint: they will be logged again
            lines = metrics_path.read_text().splitlines(keepends=True) if metrics_path.exists() else []
            atomic_write_text(metrics_path, "".join(lines[: int(state["metrics_lines"])]))

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main))
    started = time.perf_counter()
    while step < total_steps:
        batch = source.next_batch()
        if batch is None:
            break
        for member in members:
            _train_step(member, batch, cfg, step, total_steps)
            if _resample_due(cfg, step, total_steps):
                _resample_dead(member, batch, cfg, main)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            _log(metrics_path, members, step, cfg, time.perf_counter() - started, write=main)
            first = members[0].window_summary
            if main and first:
                bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}")
        if step % cfg.checkpoint_every == 0 and step < total_steps:
            _checkpoint(run_dir, members, source, step, metrics_path, main)
        if stop_after_steps is not None and step >= stop_after_steps:
            _checkpoint(run_dir, members, source, step, metrics_path, main)
            bar.close()
            return {}
    bar.close()
    if any(member.window for member in members):  # the data ran out between two log steps
        _log(metrics_path, members, step, cfg, time.perf_counter() - started, write=main)

    saved: dict[str, Path] = {}
    error = None
    sources = distributed.gather_object(source.state_dict())  # collective: outside rank 0's block
    if main:
        try:
            source, paired_models = _data_metadata(cfg)
            for member in members:
                saved[member.name] = _save_member(member, cfg, run_dir, source, paired_models)
            if layered:
                _write_sets(run_dir, members, saved)
            _write_checkpoint(run_dir, members, sources, step, metrics_path)
            atomic_write_json(
                run_dir / DONE,
                {
                    "steps": step,
                    "tokens": step * cfg.batch_size,
                    "dictionaries": {k: str(v) for k, v in saved.items()},
                },
            )
        except Exception as err:
            error = err
    distributed.raise_if_any_failed(error)  # also the final barrier
    return saved


def _check_hooks(cfg: TrainConfig, main: bool) -> HookedLM | None:
    """Fail on unknown hook points (or a cache without them) before anything is written.

    Returns the loaded model when this rank will need it (streaming, rank 0 harvesting a cache, or a
    source kind that reads the model).
    """
    if cfg.source is not None:
        kind, settings = sources.resolve_source(cfg.source)
        provided = kind.hooks(settings)
        for hook in cfg.hooks:
            if hook not in provided:
                raise UnknownHookError(_foreign_hook_message(kind.description, provided, hook))
        return _load_lm(cfg) if kind.needs_model else None
    if cfg.stream or (cfg.activations is None and main):
        lm = _load_lm(cfg)
        for hook in cfg.hooks:
            lm.hook_dim(hook)  # UnknownHookError with the valid names and a suggestion
        return lm
    if cfg.activations is not None:
        CachedActivations(cfg.activations, cfg.hooks, cfg.batch_size)  # missing hooks / incomplete cache
    return None


def _foreign_hook_message(description: str, provided: tuple[str, ...], hook: str) -> str:
    if len(provided) == 1:
        return (
            f"dictionaries trained on {description} read the hook {provided[0]!r}, not {hook!r}. "
            f"Set hook_name={provided[0]!r} (and no output_hook_name)."
        )
    return (
        f"dictionaries trained on {description} read the hooks {', '.join(map(repr, provided))}, not "
        f"{hook!r}. Set hook_name (and output_hook_name) to those."
    )


def _train_step(member: _Member, batch: dict[str, torch.Tensor], cfg: TrainConfig, step: int, total: int):
    dictionary = member.dictionary
    x, y = (tensor.to(cfg.device, non_blocking=True) for tensor in dictionary.training_inputs(batch))
    dead = member.tokens_since_fired >= cfg.dead_after_tokens
    ctx = StepContext(
        dead_mask=dead.to(cfg.device) if bool(dead.any()) else None, progress=step / total, step=step
    )
    out = dictionary.training_loss(x, y, ctx)
    member.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    distributed.average_gradients(dictionary.parameters())
    dictionary.remove_parallel_decoder_grad()
    member.optimizer.step()
    member.scheduler.step()
    dictionary.after_optimizer_step()
    buffers = dict(dictionary.named_buffers())
    if "threshold" in buffers:  # BatchTopK's running threshold: keep ranks in agreement
        distributed.average_tensor_(buffers["threshold"])
    # Reduced on the device (NCCL cannot reduce CPU tensors), then brought back.
    fired = distributed.sum_tensor_(out.fired.to(torch.long)).cpu()
    tokens = x.shape[0] * distributed.world()[1]
    member.tokens_since_fired += tokens
    member.tokens_since_fired[fired > 0] = 0
    member.count_tokens += tokens
    if step >= member.density_start:  # per-token firing counts of the (nearly) final dictionary
        member.fire_counts += fired
        member.density_tokens += tokens
    terms = dict(out.terms)
    terms["lr"] = member.scheduler.get_last_lr()[0]
    member.window.append(terms)


def _resample_due(cfg: TrainConfig, step: int, total: int) -> bool:
    if cfg.resample_every_tokens <= 0 or step == 0:
        return False
    every = max(1, cfg.resample_every_tokens // cfg.batch_size)
    return (step + 1) % every == 0 and step < int((1 - cfg.decay_fraction) * total)


def _resample_dead(member: _Member, batch: dict[str, torch.Tensor], cfg: TrainConfig, main: bool) -> None:
    """Resample the member's dead latents on this batch, and forget their optimizer history."""
    dead = (member.tokens_since_fired >= cfg.dead_after_tokens).to(torch.long)
    distributed.broadcast_(dead)  # rank 0 decides (a no-op in one process); the others copy it
    latents = dead.bool().nonzero().squeeze(1)
    if latents.numel() == 0:
        return
    dictionary = member.dictionary
    if main:
        x, y = (tensor.to(cfg.device) for tensor in dictionary.training_inputs(batch))
        dictionary.resample(latents.to(cfg.device), x, y)
    params = dict(dictionary.named_parameters())
    for name, dim in dictionary.latent_parameters().items():
        param = params[name]
        distributed.broadcast_(param.data)
        for moment in ("exp_avg", "exp_avg_sq"):
            state = member.optimizer.state.get(param, {})
            if moment in state:
                state[moment].index_fill_(dim, latents.to(state[moment].device), 0.0)
    member.tokens_since_fired[latents] = 0
    member.resampled += int(latents.numel())


def _log(
    path: Path, members: list[_Member], step: int, cfg: TrainConfig, elapsed: float, write: bool = True
) -> None:
    """Average each member's window into one metrics line; every rank empties its windows."""
    lines = []
    for member in members:
        if not member.window:
            continue
        summary = {key: sum(w[key] for w in member.window) / len(member.window) for key in member.window[0]}
        member.window_summary = summary
        member.window = []
        dead = float((member.tokens_since_fired >= cfg.dead_after_tokens).float().mean())
        record = {
            "step": step,
            "tokens": step * cfg.batch_size,
            "dictionary": member.name,
            "dead_fraction": dead,
            "resampled": member.resampled,
            "elapsed_s": round(elapsed, 2),
            **summary,
        }
        lines.append(json.dumps(record))
    if write and lines:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


def _checkpoint(run_dir, members, source, step, metrics_path, main) -> None:
    """Collective: rank 0 gathers every rank's data position and writes the checkpoint.

    Every rank's, because streaming ranks each harvest their own contexts into their own buffer.
    """
    sources = distributed.gather_object(source.state_dict())
    if main:
        _write_checkpoint(run_dir, members, sources, step, metrics_path)


def _write_checkpoint(run_dir, members, sources, step, metrics_path) -> None:
    """Write the whole training state into a temp folder and rename it over the old checkpoint."""
    metrics_lines = len(metrics_path.read_text().splitlines()) if metrics_path.exists() else 0
    state = {
        "step": step,
        "metrics_lines": metrics_lines,
        "source": sources[0],
        "sources": sources,
        "rng": torch.get_rng_state(),
        "members": [member.state_dict() for member in members],
    }
    with atomic_folder(run_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp / "state.pt")


def _data_metadata(cfg: TrainConfig) -> tuple[dict, list[str]]:
    """What every dictionary of the run records of its data, and the models of a paired cache (else [])."""
    if cfg.source is not None:
        kind, settings = sources.resolve_source(cfg.source)
        return kind.metadata(settings), []
    cached = CacheInfo.read(cfg.activations).source if cfg.activations and cfg.model is None else {}
    data = cfg.data
    if cached.get("data", {}).get("chat"):  # a cache of chat tokens: its roles are what was trained on
        data = DataConfig.from_dict(cached["data"])
    chat = {"chat": True, "roles": data.roles} if data.chat else {}  # read back by evaluate and analyze
    return {
        "model_name": cfg.model or cached.get("model") or "HuggingFaceTB/SmolLM2-135M-Instruct",
        "context_size": data.context_size,
        "prepend_bos": data.prepend_bos,
        "dataset_path": data.source or "saelab:embedded",
        "exclude_special_tokens": data.exclude_special,
        "exclude_bos": data.exclude_bos,
        **chat,
    }, cached.get("models") or []


def _save_member(
    member: _Member, cfg: TrainConfig, run_dir: Path, source: dict, paired_models: list[str]
) -> Path:
    sparsity = None
    if member.density_tokens > 0:  # none if the data ran out before the density window
        density = member.fire_counts.double() / member.density_tokens
        sparsity = density.clamp_min(1e-10).log10().float()
    dcfg = member.dictionary.cfg
    source = dict(source)
    if paired_models and dcfg.layers and dcfg.hook_name.startswith("model{i}/"):
        source["member_models"] = [paired_models[i] for i in dcfg.layers]  # a crosscoder across models
    dcfg.metadata.update({**source, "hook_name": dcfg.hook_name, "training_tokens": member.count_tokens})
    return save_dictionary(
        member.dictionary, run_dir / "saes" / member.name, sparsity=sparsity, training_config=cfg.to_dict()
    )


def _write_sets(run_dir: Path, members: list[_Member], saved: dict[str, Path]) -> None:
    """One dictionary set per sweep point (the same settings at every layer): run_dir/sets/<name>/."""
    groups: dict[str, dict[int, _Member]] = {}
    for member in members:
        if member.dictionary.cfg.layers:
            continue  # a cross-layer dictionary is one file already
        layer, _ = split_hook(member.dictionary.cfg.hook_name)
        groups.setdefault(member.name.split("-", 1)[1], {})[layer] = member
    for name, by_layer in groups.items():
        dset = DictionarySet({layer: m.dictionary for layer, m in by_layer.items()})  # checks the layers
        write_set_index(
            run_dir / "sets" / name, {layer: saved[m.name] for layer, m in by_layer.items()}, dset
        )
