"""Streamed data parallel on a tiny random Llama: each rank harvests its own contexts, once, exactly.

Runs 2 gloo processes under torchrun (standalone, and as two 1-process "nodes" on localhost). The
reference for the weights is one process reading the same two per-rank streams: its batch is the
union of the ranks' batches, and for a loss that is a mean over tokens (ReLU SAE) the average of
the ranks' gradients is its gradient, so the weights agree to float tolerance.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab import training
from saelab.core.activations import StreamingActivations
from saelab.core.data import DataConfig, token_batches
from saelab.core.models import HookedLM, load_model
from saelab.dictionaries import DictionaryConfig
from saelab.errors import ActivationError, DataError
from saelab.training import TrainConfig, train
from tests.helpers import save_model, write_corpus

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.1.hook_resid_post"
# 100 documents hold about 3400 kept tokens: 53 batches of 64 for one process, fewer than the 64
# steps asked for, so every run here ends when the data does.
CTX, BATCH_CONTEXTS, STEPS, N_DOCS = 16, 8, 64, 100
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_ranks")
    return save_model(root / "model", n_layers=2, hidden=32), write_corpus(root / "corpus.txt", n_docs=N_DOCS)


def config(run_dir, assets, **kwargs) -> TrainConfig:
    model, corpus = assets
    values = dict(
        run_dir=str(run_dir),
        model=str(model),
        data=DataConfig(source=str(corpus), context_size=CTX),
        dictionaries=[
            DictionaryConfig(architecture="relu", d_in=0, d_sae=64, hook_name=HOOK, l1_coefficient=0.5),
            DictionaryConfig(architecture="topk", d_in=0, d_sae=64, hook_name=HOOK, k=4),
        ],
        stream=True,
        n_tokens=STEPS * 64,
        batch_size=64,
        lr=3e-3,
        log_every=4,
        checkpoint_every=8,
        dead_after_tokens=256,
        model_dtype="float32",
        harvest_batch_contexts=BATCH_CONTEXTS,
        buffer_tokens=256,
    )
    values.update(kwargs)
    return TrainConfig(**values)


def context_hash(row: torch.Tensor) -> str:
    return hashlib.sha1(row.to(torch.long).numpy().tobytes()).hexdigest()


def stream_hashes(assets) -> list[str]:
    """Every context of the deterministic stream, in order, as hashes of its token ids."""
    model, corpus = assets
    tokenizer = load_model(str(model), device="cpu", dtype=torch.float32).tokenizer
    return [context_hash(row) for ids in token_batches(str(corpus), tokenizer, CTX, 64) for row in ids]


def saved_weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    saes = Path(run_dir) / "saes"
    return {p.name: load_file(p / "sae_weights.safetensors") for p in sorted(saes.iterdir())}


def metrics(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("elapsed_s")
    return lines


# ---- launching torchrun -------------------------------------------------------------------------

# Trains one config on this rank and saves what it saw: the contexts of every lm.capture call (one
# call = one forward pass) and the final weights of every dictionary.
SCRIPT = """
import hashlib, json, sys
from pathlib import Path

import torch

from saelab import training
from saelab.core import distributed
from saelab.core.models import HookedLM
from saelab.training import TrainConfig

cfg_path, out, tag, stop, mode = sys.argv[1:6]
cfg = TrainConfig.from_dict(json.loads(Path(cfg_path).read_text()))
rank, world_size = distributed.world()
captures, members = [], {}
real_capture, real_step = HookedLM.capture, training._train_step


def capture(self, input_ids, *args, **kwargs):
    ids = torch.as_tensor(input_ids).to(torch.long).cpu()
    captures.append([hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in ids])
    return real_capture(self, input_ids, *args, **kwargs)


def step(member, *args, **kwargs):
    members[member.name] = member
    return real_step(member, *args, **kwargs)


HookedLM.capture, training._train_step = capture, step
try:
    training.train(
        cfg, resume=mode == "resume", progress=False, stop_after_steps=None if stop == "none" else int(stop)
    )
    weights = {name: m.dictionary.state_dict() for name, m in members.items()}
    record = {"rank": rank, "world_size": world_size, "captures": captures, "weights": weights}
    torch.save(record, Path(out) / f"{tag}-rank{rank}.pt")
finally:
    distributed.cleanup()
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp, cfg: TrainConfig, tag: str, stop: int | None = None, resume=False, nodes=False) -> list[dict]:
    """Run SCRIPT on 2 ranks: one `torchrun --standalone` with 2 processes, or (nodes) two torchruns
    of 1 process each that meet over c10d rendezvous on localhost, as two machines would."""
    tmp = Path(tmp)
    (tmp / "script.py").write_text(textwrap.dedent(SCRIPT))
    (tmp / f"{tag}.json").write_text(json.dumps(cfg.to_dict()))
    args = [str(tmp / "script.py"), str(tmp / f"{tag}.json"), str(tmp), tag, str(stop or "none")]
    args.append("resume" if resume else "fresh")
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes:
        port = _free_port()
        commands = [
            run + ["--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--rdzv-backend=c10d"]
            + [f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1"] + args
            for node in range(2)
        ]  # fmt: skip
    else:
        commands = [run + ["--standalone", "--nproc-per-node=2"] + args]
    logs = [tmp / f"{tag}-{index}.log" for index in range(len(commands))]
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with open(log, "w") as out:  # a file, not a pipe: a hung worker cannot block the reading
            procs.append(subprocess.Popen(command, cwd=tmp, env=_env(), stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # torchrun stops its workers on SIGTERM (not on SIGKILL)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail("torchrun failed or timed out:\n" + "\n".join(log.read_text()[-6000:] for log in logs))
    return [torch.load(tmp / f"{tag}-rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp(assets, tmp_path_factory):
    """One uninterrupted 2-rank streamed run (torchrun --standalone): its folder and rank records."""
    tmp = tmp_path_factory.mktemp("ddp")
    run = tmp / "run"
    return run, launch(tmp, config(run, assets), "full")


class UnionStream:
    """One process reading every rank's stream: its batch is the ranks' batches, in rank order."""

    def __init__(self, parts: list[StreamingActivations]):
        self.parts = parts

    def next_batch(self):
        batches = [part.next_batch() for part in self.parts]
        if any(batch is None for batch in batches):
            return None
        return {hook: torch.cat([batch[hook] for batch in batches]) for hook in batches[0]}

    def peek(self, n_rows):
        peeks = [part.peek(n_rows) for part in self.parts]
        return {hook: torch.cat([peek[hook] for peek in peeks]) for hook in peeks[0]}

    def dims(self):
        return self.parts[0].dims()

    def state_dict(self):
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state):
        for part, part_state in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(part_state)


def rank_streams(cfg: TrainConfig, lm, world_size: int) -> list[StreamingActivations]:
    """The streams of every rank of a world_size-process run of cfg, in one process."""
    return [
        StreamingActivations(
            lm,
            cfg.data,
            cfg.hooks,
            cfg.batch_size,
            buffer_tokens=cfg.buffer_tokens,
            batch_contexts=cfg.harvest_batch_contexts,
            seed=cfg.seed,
            progress=False,
            rank=rank,
            world_size=world_size,
        )
        for rank in range(world_size)
    ]


def union_source(world_size: int):
    """A build_source for one process that reads a world_size-rank run's streams together."""

    def build(cfg, rank, world, progress, lm=None):
        assert (rank, world) == (0, 1)
        return UnionStream(rank_streams(cfg, lm if lm is not None else training._load_lm(cfg), world_size))

    return build


def record_captures(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real_capture = HookedLM.capture

    def capture(self, input_ids, *args, **kwargs):
        calls.append([context_hash(row) for row in torch.as_tensor(input_ids).cpu()])
        return real_capture(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(HookedLM, "capture", capture)
    return calls


def assert_ranks_agree(ranks: list[dict]) -> None:
    """Data parallel keeps one model: both ranks end with bit-identical dictionaries."""
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys() and len(ranks[0]["weights"]) == 2
    for name, state in ranks[0]["weights"].items():
        for key, value in state.items():
            assert torch.equal(value, ranks[1]["weights"][name][key]), (name, key)


# ---- the tests ----------------------------------------------------------------------------------


def test_each_rank_harvests_its_own_half_of_the_contexts(assets, ddp, tmp_path, monkeypatch):
    """Each rank runs half the forward passes of one process, on contexts no other rank reads."""
    run, ranks = ddp
    assert_ranks_agree(ranks)
    calls = record_captures(monkeypatch)
    train(config(tmp_path / "single", assets), progress=False)
    everything = stream_hashes(assets)
    assert len(set(everything)) == len(everything) > 200
    assert [h for call in calls for h in call] == everything  # one process reads the whole stream
    seen = [[h for call in r["captures"] for h in call] for r in ranks]
    for rank, contexts in enumerate(seen):
        # Rank r reads contexts r, r + 2, r + 4, ... of the one deterministic stream, in order, once.
        assert contexts == everything[rank::2], rank
        passes = len(ranks[rank]["captures"])
        assert passes == math.ceil(len(contexts) / BATCH_CONTEXTS) and abs(passes - len(calls) / 2) <= 1
    assert not set(seen[0]) & set(seen[1])

    # Rank 1's share has fewer kept tokens and ends a batch sooner: both ranks stop there together
    # (a rank that stopped alone would leave the other waiting in the gradient all-reduce).
    lm = load_model(str(assets[0]), device="cpu", dtype=torch.float32)
    alone = []
    for stream in rank_streams(config(run, assets), lm, 2):
        count = 0
        while stream.next_batch() is not None:
            count += 1
        alone.append(count)
    assert alone[0] != alone[1]
    assert json.loads((run / "DONE.json").read_text())["steps"] == min(alone) < STEPS


def test_weights_match_one_process_reading_the_same_streams(assets, ddp, tmp_path, monkeypatch):
    """DDP averages the ranks' gradients; one process on the union of their batches gets the same."""
    run, ranks = ddp
    calls = record_captures(monkeypatch)
    monkeypatch.setattr(training, "build_source", union_source(2))
    train(config(tmp_path / "union", assets), progress=False)
    union_contexts = sorted(h for call in calls for h in call)
    assert union_contexts == sorted(h for r in ranks for call in r["captures"] for h in call)

    single, parallel = saved_weights(tmp_path / "union"), saved_weights(run)
    assert single.keys() == parallel.keys()
    for name in single:
        for key, a in single[name].items():
            b = parallel[name][key]
            # ReLU's loss is a mean over tokens: float tolerance. TopK normalises its FVU-based terms
            # per rank, so its gradient is the union's only approximately.
            tol = 1e-5 if name.startswith("relu") else 0.1
            assert (a - b).norm() <= tol * a.norm() + 1e-6, (name, key, float((a - b).norm() / a.norm()))
    # Not a vacuous match: one process streaming alone (its own shuffle of the same text) differs.
    monkeypatch.undo()
    train(config(tmp_path / "alone", assets), progress=False)
    relu = next(name for name in single if name.startswith("relu"))
    a, b = saved_weights(tmp_path / "alone")[relu]["W_enc"], parallel[relu]["W_enc"]
    assert (a - b).norm() > 1e-3 * a.norm()


def test_resume_is_exact_on_every_rank(assets, ddp, tmp_path):
    """Stopped off the checkpoint and log steps, then resumed: the same run, on both ranks."""
    run, reference = ddp
    resumed = tmp_path / "run"
    first = launch(tmp_path, config(resumed, assets), "first", stop=13)
    state = torch.load(resumed / "checkpoint" / "state.pt", weights_only=True)
    assert "sources" in state, "the checkpoint holds rank 0's data position only"
    assert state["step"] == 13 and [s["rank"] for s in state["sources"]] == [0, 1]
    assert state["sources"][0]["contexts_used"] > 0 and state["sources"][1]["contexts_used"] > 0
    last = launch(tmp_path, config(resumed, assets), "last", resume=True)
    assert_ranks_agree(last)
    assert metrics(resumed) == metrics(run)
    want, got = saved_weights(run), saved_weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)
    # The two launches' forward passes are exactly the uninterrupted run's: a resumed rank continues
    # its own stream, from its own buffer, and never re-reads a context.
    for rank in range(2):
        assert first[rank]["captures"] + last[rank]["captures"] == reference[rank]["captures"], rank


def test_two_nodes_on_localhost_match_standalone(assets, ddp, tmp_path):
    """Two torchruns of one process each (--nnodes 2, c10d rendezvous) run the standalone run exactly."""
    run, reference = ddp
    nodes = tmp_path / "run"
    ranks = launch(tmp_path, config(nodes, assets), "nodes", nodes=True)
    assert_ranks_agree(ranks)
    for rank in range(2):
        assert ranks[rank]["captures"] == reference[rank]["captures"], rank
    want, got = saved_weights(run), saved_weights(nodes)
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)


# ---- in one process -----------------------------------------------------------------------------


def test_rank_shares_partition_the_context_stream(assets):
    model, corpus = assets
    tokenizer = load_model(str(model), device="cpu", dtype=torch.float32).tokenizer
    whole = torch.cat(list(token_batches(str(corpus), tokenizer, CTX, 8)))
    shares = [
        torch.cat(list(token_batches(str(corpus), tokenizer, CTX, 8, rank=r, world_size=3))) for r in range(3)
    ]
    for rank, share in enumerate(shares):
        assert torch.equal(share, whole[rank::3])
    # Resuming a share skips this rank's own contexts; max_contexts counts them too.
    resumed = torch.cat(
        list(token_batches(str(corpus), tokenizer, CTX, 8, skip_contexts=5, rank=1, world_size=3))
    )
    assert torch.equal(resumed, whole[1::3][5:])
    capped = list(
        token_batches(str(corpus), tokenizer, CTX, 4, max_contexts=6, skip_contexts=2, rank=2, world_size=3)
    )
    assert torch.equal(torch.cat(capped), whole[2::3][2:8])
    with pytest.raises(DataError, match="rank 3"):
        next(token_batches(str(corpus), tokenizer, CTX, 8, rank=3, world_size=3))


def _rank_stream(lm, data, rank, world_size=2, **kwargs):
    args = dict(batch_size=64, buffer_tokens=300, batch_contexts=4, seed=5, progress=False)
    args.update(kwargs)
    return StreamingActivations(lm, data, [HOOK], rank=rank, world_size=world_size, **args)


def test_rank_stream_serves_its_share_and_resumes_exactly(assets, tmp_path):
    model, corpus = assets
    lm = load_model(str(model), device="cpu", dtype=torch.float32)
    data = DataConfig(source=str(corpus), context_size=CTX)
    a = _rank_stream(lm, data, rank=1)
    assert a.peek(40)[HOOK].shape == (20, 32)  # its half of the initialisation rows
    for _ in range(5):
        assert a.next_batch()[HOOK].shape == (32, 32)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.next_batch() for _ in range(10)]
    b = _rank_stream(lm, data, rank=1)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for want in expected:
        assert torch.equal(b.next_batch()[HOOK], want[HOOK])
    # A rank's position is its own: another rank, or another world size, refuses it.
    for other in (_rank_stream(lm, data, rank=0), _rank_stream(lm, data, rank=1, world_size=4)):
        with pytest.raises(ActivationError, match="rank 1 of 2 processes"):
            other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))


def test_rank_stream_errors(assets):
    model, corpus = assets
    lm = load_model(str(model), device="cpu", dtype=torch.float32)
    data = DataConfig(source=str(corpus), context_size=CTX)
    with pytest.raises(ActivationError, match="batch_size 63 does not split evenly over 2 processes"):
        _rank_stream(lm, data, rank=0, batch_size=63)
    with pytest.raises(ActivationError, match="such as 96 or 99"):
        _rank_stream(lm, data, rank=0, world_size=3, batch_size=97)
    with pytest.raises(ActivationError, match="rank 2 is not a rank"):
        _rank_stream(lm, data, rank=2)
