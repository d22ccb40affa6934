"""saelab.training on a tiny random Llama: sweeps, exact resume, run folders, checkpoints, data parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.core.activations import CachedActivations, harvest_to_cache
from saelab.core.data import DataConfig
from saelab.core.models import load_model
from saelab.dictionaries import DictionaryConfig
from saelab.dictionaries.io import load_dictionary
from saelab.errors import ActivationError, RunFolderError, UnknownHookError
from saelab.training import TrainConfig, train
from tests.helpers import save_model, write_corpus

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
LN2, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return save_model(root / "model", n_layers=2, hidden=32), write_corpus(root / "corpus.txt", n_docs=200)


def d(architecture="topk", **kwargs) -> DictionaryConfig:
    kwargs.setdefault("hook_name", HOOK)
    return DictionaryConfig(architecture=architecture, d_in=0, d_sae=64, **kwargs)


def config(run_dir, assets, dictionaries=None, **kwargs) -> TrainConfig:
    model, corpus = assets
    values = dict(
        run_dir=str(run_dir),
        model=str(model),
        data=DataConfig(source=str(corpus), context_size=16),
        dictionaries=dictionaries or [d("topk", k=4), d("jumprelu", target_l0=4), d("batchtopk", k=4)],
        n_tokens=2048,
        batch_size=64,
        lr=3e-3,
        log_every=4,
        checkpoint_every=8,
        dead_after_tokens=256,
        model_dtype="float32",
        harvest_batch_contexts=8,
        buffer_tokens=256,
    )
    values.update(kwargs)
    return TrainConfig(**values)


def metrics(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("elapsed_s")
    return lines


def weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    saes = Path(run_dir) / "saes"
    return {p.name: load_file(p / "sae_weights.safetensors") for p in sorted(saes.iterdir())}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=atol, msg=f"{name}.{key}")


# ---- folder names and the trainer's own imports -----------------------------------------------


def test_dictionary_folder_names_use_each_familys_tag():
    from saelab.training import dictionary_name

    def name(arch, d_sae, names=(), index=0, **settings):
        return dictionary_name(
            DictionaryConfig(architecture=arch, d_sae=d_sae, **settings), index, set(names)
        )

    assert name("topk", 512, k=16) == "topk-k16-w512"
    assert name("batchtopk", 128, k=3) == "batchtopk-k3-w128"
    assert name("relu", 512, l1_coefficient=1.0) == "relu-l1_1-w512"
    assert name("gated", 128, l1_coefficient=0.5) == "gated-l1_0.5-w128"
    assert name("jumprelu", 128, target_l0=3) == "jumprelu-l0_3-w128"
    transcoder = dict(
        d_in=8, hook_name="blocks.0.ln2.hook_normalized", output_hook_name="blocks.0.hook_mlp_out"
    )
    assert name("topk", 64, k=4, **transcoder) == "transcoder-topk-k4-w64"
    assert name("topk", 512, names={"topk-k16-w512"}, index=3, k=16) == "topk-k16-w512-3"


def test_the_trainer_does_not_import_the_toy_layer():
    code = "import sys, saelab.training; sys.exit(any(m.startswith('saelab.toy') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=120).returncode == 0


# ---- one sweep ----------------------------------------------------------------------------------


def test_sweep_trains_every_family_and_transcoder_on_one_harvest(assets, tmp_path):
    dictionaries = [
        d("topk", k=4),
        d("topk", k=8),
        d("relu", l1_coefficient=0.5),
        d("batchtopk", k=4),
        d("jumprelu", target_l0=4),
        d("gated", l1_coefficient=0.5),
        d("topk", k=4, hook_name=LN2, output_hook_name=MLP_OUT),
    ]
    cfg = config(tmp_path / "run", assets, dictionaries, n_tokens=4096)
    saved = train(cfg, progress=False)
    run = tmp_path / "run"
    names = sorted(p.name for p in (run / "saes").iterdir())
    assert sorted(saved) == names and len(names) == 7
    assert "transcoder-topk-k4-w64" in names and "topk-k8-w64" in names
    # One harvest: a single cache holding the three hook points.
    manifest = json.loads((run / "activations" / "manifest.json").read_text())
    assert sorted(manifest["hooks"]) == sorted([HOOK, LN2, MLP_OUT]) and manifest["complete"]

    lines = metrics(run)
    steps = 4096 // 64
    assert len(lines) == 7 * (steps // 4)
    assert {line["dictionary"] for line in lines} == set(names)
    for step in range(4, steps + 1, 4):
        assert sorted(line["dictionary"] for line in lines if line["step"] == step) == names
    for name in names:
        fvu = [line["fvu"] for line in lines if line["dictionary"] == name]
        assert fvu[-1] < 0.8 * fvu[0], (name, fvu)
        loss = [line["loss"] for line in lines if line["dictionary"] == name]
        assert all(map(torch.isfinite, torch.tensor(loss)))

    saved_cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert saved_cfg.n_tokens == 4096 and len(saved_cfg.dictionaries) == 7
    done = json.loads((run / "DONE.json").read_text())
    assert done["steps"] == steps and sorted(done["dictionaries"]) == names
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == steps and len(state["members"]) == 7

    rows = CachedActivations(run / "activations", [HOOK, LN2, MLP_OUT], 64).peek(4096)
    for name in names:
        sae = load_dictionary(run / "saes" / name)
        assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
        meta = sae.cfg.metadata
        assert meta["model_name"] == cfg.model and meta["context_size"] == 16
        if name.startswith("transcoder"):
            assert sae.cfg.hook_name == LN2 and sae.cfg.output_hook_name == MLP_OUT
            x, y = rows[LN2], rows[MLP_OUT]
        else:
            x = y = rows[HOOK]
        with torch.no_grad():
            fvu = float((sae(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        # The saved SAE works on raw activations about as well as the training log says.
        last = [line["fvu"] for line in lines if line["dictionary"] == name][-1]
        assert fvu < last + 0.1, (name, fvu, last)
        density = 10 ** load_file(run / "saes" / name / "sparsity.safetensors")["sparsity"].double()
        l0 = (sae.encode(x) > 0).float().sum(-1).mean()
        if sae.cfg.architecture == "topk":
            # Per-token feature density: the densities sum to the mean L0 (k).
            assert abs(float(density.sum()) - sae.cfg.k) < 0.5, (name, float(density.sum()))
        assert float(density.sum()) > 0.3 * float(l0), (name, float(density.sum()), float(l0))


# ---- exact resume -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_runs(assets, tmp_path_factory):
    """Uninterrupted runs, one from a harvested cache and one streaming, to compare resumed runs with."""
    root = tmp_path_factory.mktemp("reference")
    for stream in (False, True):
        train(config(root / f"stream{stream}", assets, stream=stream), progress=False)
    return root


@pytest.mark.parametrize("stream", [False, True], ids=["cache", "stream"])
def test_resume_is_exact(assets, tmp_path, reference_runs, stream):
    run = tmp_path / "run"
    cfg = config(run, assets, stream=stream)
    # Interrupted twice, neither at a log step nor at a checkpoint step.
    assert train(cfg, progress=False, stop_after_steps=11) == {}
    assert not (run / "DONE.json").exists()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 11
    assert train(config(run, assets, stream=stream), resume=True, progress=False, stop_after_steps=21) == {}
    train(cfg, resume=True, progress=False)
    reference = reference_runs / f"stream{stream}"
    assert metrics(run) == metrics(reference)
    assert_same_weights(weights(run), weights(reference))
    for name in weights(run):
        assert torch.equal(
            load_file(run / "saes" / name / "sparsity.safetensors")["sparsity"],
            load_file(reference / "saes" / name / "sparsity.safetensors")["sparsity"],
        )
    assert json.loads((run / "DONE.json").read_text())["steps"] == 32


def test_crash_while_checkpointing_keeps_the_previous_checkpoint(
    assets, tmp_path, reference_runs, monkeypatch
):
    run = tmp_path / "run"
    cfg = config(run, assets)
    train(cfg, progress=False, stop_after_steps=8)
    before = (run / "checkpoint" / "state.pt").read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, resume=True, progress=False)  # the next checkpoint is at step 16
    monkeypatch.setattr(torch, "save", real_save)
    assert (run / "checkpoint" / "state.pt").read_bytes() == before
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"] == 8
    assert sorted(p.name for p in run.iterdir()) == [
        "activations",
        "checkpoint",
        "config.json",
        "metrics.jsonl",
    ]
    assert len(metrics(run)) > 3 * 2  # lines logged after the checkpoint, dropped on resume
    train(cfg, resume=True, progress=False)
    assert metrics(run) == metrics(reference_runs / "streamFalse")
    assert_same_weights(weights(run), weights(reference_runs / "streamFalse"))


# ---- run folders --------------------------------------------------------------------------------


def test_run_folder_errors_and_overwrite(assets, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, assets, dictionaries=[d("topk", k=4)], n_tokens=512)
    with pytest.raises(RunFolderError, match="--resume"):
        train(cfg, resume=True, progress=False)
    run.mkdir()
    with pytest.raises(RunFolderError, match="--resume"):
        train(cfg, resume=True, progress=False)
    train(cfg, progress=False, stop_after_steps=3)
    with pytest.raises(RunFolderError, match="unfinished") as err:
        train(cfg, progress=False)
    assert "--resume" in str(err.value) and "--overwrite" in str(err.value)
    train(cfg, resume=True, progress=False)
    with pytest.raises(RunFolderError, match="--overwrite"):
        train(cfg, progress=False)
    first = metrics(run)
    assert len(first) == 2
    (run / "notes.txt").write_text("mine")
    train(cfg, overwrite=True, progress=False)
    assert metrics(run) == first  # replaced, not appended
    assert not (run / "notes.txt").exists() and (run / "DONE.json").exists()


def test_fresh_start_after_a_crash_before_the_first_checkpoint(assets, tmp_path):
    """No checkpoint yet: the run starts over, without the stale metrics lines of the crashed one."""
    run = tmp_path / "run"
    cfg = config(run, assets, dictionaries=[d("topk", k=4)], n_tokens=512, checkpoint_every=100)
    train(cfg, progress=False, stop_after_steps=5)
    (run / "checkpoint").rename(run / "lost")  # as if the process died before checkpointing
    (run / "lost").rename(tmp_path / "lost")
    assert len(metrics(run)) == 1
    train(cfg, progress=False)
    assert [line["step"] for line in metrics(run)] == [4, 8]


def test_unknown_hook_fails_before_anything_is_written(assets, tmp_path):
    for stream in (False, True):
        run = tmp_path / f"run{stream}"
        cfg = config(
            run, assets, dictionaries=[d("topk", k=4, hook_name="blocks.5.hook_resid_post")], stream=stream
        )
        with pytest.raises(UnknownHookError, match="blocks.1.hook_resid_post"):
            train(cfg, progress=False)
        assert not run.exists()
    # A finished run is not destroyed by an --overwrite with a typo in the hook name.
    run = tmp_path / "done"
    train(config(run, assets, dictionaries=[d("topk", k=4)], n_tokens=256), progress=False)
    bad = config(run, assets, dictionaries=[d("topk", k=4, hook_name="blocks.0.hook_resid_psot")])
    with pytest.raises(UnknownHookError, match="Did you mean 'blocks.0.hook_resid_post'"):
        train(bad, overwrite=True, progress=False)
    assert (run / "DONE.json").exists()


def test_cache_without_the_hook_fails_before_anything_is_written(assets, tmp_path):
    model, corpus = assets
    lm = load_model(str(model), device="cpu")
    data = DataConfig(source=str(corpus), context_size=16)
    harvest_to_cache(lm, data, [HOOK], 256, tmp_path / "cache", progress=False)
    run = tmp_path / "run"
    cfg = config(
        run, assets, dictionaries=[d("topk", k=4, hook_name=LN2)], activations=str(tmp_path / "cache")
    )
    with pytest.raises(ActivationError, match="has no"):
        train(cfg, progress=False)
    assert not run.exists()


# ---- data parallel ------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
import saelab.toy.synthetic  # registers the "synthetic" source kind, as saelab's CLI does
from saelab import training
from saelab.core import distributed

cfg = training.TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
out = Path(sys.argv[2])
rank = distributed.world()[0]
members = {}
real_step = training._train_step


def step(member, *args, **kwargs):
    members[member.name] = member
    return real_step(member, *args, **kwargs)


def refuse(*args, **kwargs):
    raise AssertionError(f"rank {rank} wrote a file")


training._train_step = step
if rank != 0:  # only rank 0 may write into the run folder
    for name in ("atomic_write_json", "atomic_write_text", "atomic_folder", "save_dictionary"):
        setattr(training, name, refuse)
try:
    saved = training.train(cfg, progress=False)
    assert bool(saved) == (rank == 0), saved
    torch.save({n: m.dictionary.state_dict() for n, m in members.items()}, out / f"rank{rank}.pt")
finally:
    distributed.cleanup()
"""


def _run_two_ranks(tmp_path) -> None:
    """Run DDP_SCRIPT on tmp_path/cfg.json under torchrun with 2 CPU processes (gloo)."""
    (tmp_path / "script.py").write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(tmp_path / "script.py"), str(tmp_path / "cfg.json"), str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_data_parallel_matches_single_process(assets, tmp_path):
    model, corpus = assets
    lm = load_model(str(model), device="cpu")
    data = DataConfig(source=str(corpus), context_size=16)
    cache = tmp_path / "cache"
    harvest_to_cache(lm, data, [HOOK], 2048, cache, shard_tokens=512, progress=False)
    assert CachedActivations(cache, [HOOK], 64).info.complete
    dictionaries = [d("relu", l1_coefficient=0.5), d("topk", k=4), d("batchtopk", k=4)]
    single = config(tmp_path / "single", assets, dictionaries, activations=str(cache))
    train(single, progress=False)

    ddp = config(tmp_path / "ddp", assets, dictionaries, activations=str(cache))
    (tmp_path / "cfg.json").write_text(json.dumps(ddp.to_dict()))
    _run_two_ranks(tmp_path)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 3
    for name in ranks[0]:
        for key in ranks[0][name]:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
    run = tmp_path / "ddp"
    assert (run / "DONE.json").exists()
    assert sorted(p.name for p in run.iterdir()) == [
        "DONE.json",
        "checkpoint",
        "config.json",
        "metrics.jsonl",
        "saes",
    ]
    lines, reference = metrics(run), metrics(tmp_path / "single")
    assert [(m["step"], m["dictionary"]) for m in lines] == [(m["step"], m["dictionary"]) for m in reference]
    # Same global batches: the ReLU SAE's loss is a mean over tokens, so averaging the two halves'
    # gradients is the single-process gradient; TopK's FVU is normalised per rank (approximate).
    single_w, ddp_w = weights(tmp_path / "single"), weights(run)
    for name in single_w:
        for key in single_w[name]:
            a, b = single_w[name][key], ddp_w[name][key]
            tol = 1e-5 if name.startswith("relu") else 0.1
            assert (a - b).norm() <= tol * a.norm() + 1e-6, (name, key, float((a - b).norm() / a.norm()))
    for m, r in zip(lines, reference, strict=True):
        assert m["fvu"] == pytest.approx(r["fvu"], rel=0.15, abs=0.03), (m, r)


def test_data_parallel_resampling_keeps_ranks_identical(tmp_path):
    """Rank 0 resamples dead latents and broadcasts them: both ranks end with the same weights."""
    from saelab.toy.synthetic import SYNTHETIC_HOOK, SyntheticConfig

    dictionaries = [
        DictionaryConfig(
            architecture=arch, d_in=0, d_sae=48, hook_name=SYNTHETIC_HOOK, target_l0=2, l1_coefficient=2
        )
        for arch in ("jumprelu", "relu")
    ]
    cfg = TrainConfig(
        run_dir=str(tmp_path / "run"),
        source=SyntheticConfig(n_features=16, d=8, mean_active=2).as_source(),
        dictionaries=dictionaries,
        n_tokens=40 * 64,
        batch_size=64,
        dead_after_tokens=128,
        resample_every_tokens=256,
        log_every=5,
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    _run_two_ranks(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ranks[0]:
        for key in ranks[0][name]:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), (name, key)
    assert max(line["resampled"] for line in metrics(tmp_path / "run")) > 0
