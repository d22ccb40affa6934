"""The EPO loop, its settings and its result; see `saelab.explain.dreaming` for the algorithm."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saelab.core.models import HookedLM, special_token_ids
from saelab.errors import DataError
from saelab.explain.dreaming.targets import Target


def log_lambdas(n: int = 8, low: float = 0.1, high: float = 10.0) -> tuple[float, ...]:
    """`n` fluency penalties log-spaced from `low` to `high` (dreamy's 8 from 0.1 to 10)."""
    if n < 1 or not 0 < low <= high < math.inf:
        raise DataError(f"log_lambdas needs n >= 1 and 0 < low <= high, got n={n}, low={low}, high={high}.")
    if n == 1:
        return (float(low),)
    inner = [low * (high / low) ** (i / (n - 1)) for i in range(1, n - 1)]
    return (float(low), *inner, float(high))


@dataclass
class DreamConfig:
    """EPO settings, saved whole with every result.

    dreamy's sizes are 300 iterations of 8 members x 32 children (76,800 prompts a run); `reference()`
    gives them. On a 2-core AVX2 CPU one forward pass of a 13-token prompt through SmolLM2-135M takes
    ~65 ms on one thread, so one such iteration takes ~17-23 s and a latent 1.5-2 hours. The defaults
    keep dreamy's population, penalties, top_k, length and restart cadence and cut the children to 4
    per member and the iterations to 60 (~2 s of CPU an iteration, ~2-3 minutes a latent, ~1,800
    prompts). Children are cut rather than iterations because an iteration changes at most one token of
    a member: 10 iterations of 256 children could not even rewrite a 12-token prompt.
    """

    seq_len: int = 12
    population: int = 8  # one member per λ: must equal len(lambdas)
    iterations: int = 60
    children: int = 4  # per member and iteration
    top_k: int = 512  # gradient candidates per position
    lambdas: tuple[float, ...] = log_lambdas(8)
    restart_every: int = 50  # 0: never restart
    restart_lambda: float = 2.0
    restart_spread: float = 3.0
    seed: int = 0
    batch_size: int = 32  # prompts per forward pass
    retokenize: bool = True
    init: str = "sample"  # "sample": the model's own text; "random": uniform tokens (dreamy)

    @classmethod
    def reference(cls, **changes) -> DreamConfig:
        """dreamy's settings: 300 iterations, 8 members x 32 children."""
        return cls(**{"iterations": 300, "children": 32, **changes})

    def to_dict(self) -> dict:
        return {**asdict(self), "lambdas": list(self.lambdas)}

    @classmethod
    def from_dict(cls, d: dict) -> DreamConfig:
        """The config `to_dict` wrote; unknown keys are ignored."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "lambdas" in known:
            known["lambdas"] = tuple(float(x) for x in known["lambdas"])
        return cls(**known)

    def validate(self) -> None:
        ints = ("seq_len", "population", "iterations", "children", "top_k", "batch_size")
        for name in ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise DataError(
                    f"DreamConfig.{name} must be an integer of at least 1, got {getattr(self, name)!r}."
                )
        if not isinstance(self.restart_every, int) or self.restart_every < 0:
            raise DataError(
                f"DreamConfig.restart_every must be 0 (never) or more, got {self.restart_every!r}."
            )
        if not self.lambdas:
            raise DataError(
                "DreamConfig.lambdas is empty; give at least one fluency penalty, e.g. log_lambdas(8)."
            )
        if any(not math.isfinite(x) or x < 0 for x in self.lambdas):
            raise DataError(f"fluency penalties must be finite and >= 0, got {list(self.lambdas)}.")
        if len(self.lambdas) != self.population:
            raise DataError(
                f"population is {self.population} but {len(self.lambdas)} penalties were given; EPO keeps "
                f"one member per λ: pass lambdas=log_lambdas({self.population}) or "
                f"population={len(self.lambdas)}."
            )
        if self.init not in ("sample", "random"):
            raise DataError(f"DreamConfig.init must be 'sample' or 'random', got {self.init!r}.")
        if not (math.isfinite(self.restart_lambda) and self.restart_lambda >= 0 and self.restart_spread >= 1):
            raise DataError("restart_lambda must be finite and >= 0, and restart_spread at least 1.")


@dataclass
class Dream:
    """One prompt on the front. `lam`: the penalty under which it was first selected as a member (a
    restart's drawn penalty included; None: never selected, on the front only as an evaluated child);
    `iteration`: when it was first evaluated (-1: the initial population)."""

    token_ids: list[int]
    text: str
    activation: float
    cross_entropy: float
    lam: float | None
    iteration: int


@dataclass
class DreamResult:
    """`history` has one entry per iteration: the restart penalty (or None) and each member's values.
    `points` is (activation, cross_entropy) of every evaluated prompt, in evaluation order."""

    front: list[Dream]
    config: dict
    target: dict
    seconds: float
    history: list[dict]
    evaluations: int
    rejected: int  # children discarded because their text does not re-tokenise to the same ids
    initial: list[dict] = field(default_factory=list)  # the starting members: token_ids, activation, CE
    points: list[tuple[float, float]] = field(repr=False, default_factory=list)

    def best(self, max_ce: float | None = None) -> Dream | None:
        """The highest-activation prompt on the front with cross-entropy <= max_ce (None: any)."""
        ok = [d for d in self.front if max_ce is None or d.cross_entropy <= max_ce]
        return max(ok, key=lambda d: d.activation) if ok else None

    def to_dict(self, points: bool = False) -> dict:
        out = {
            "front": [asdict(d) for d in self.front],
            "config": self.config,
            "target": self.target,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "rejected": self.rejected,
            "history": self.history,
            "initial": self.initial,
        }
        if points:
            out["points"] = [list(p) for p in self.points]
        return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (activation, cross_entropy) that no other point matches or beats on both
    (higher activation, lower CE), sorted by cross-entropy; of equal points the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][0] > best:
            front.append(i)
            best = points[i][0]
    return front


class _Evaluator:
    """Runs prompts (BOS prepended) and returns objective, activation, CE; optionally token candidates."""

    def __init__(self, lm: HookedLM, target: Target, allowed: Tensor, batch_size: int):
        self.lm, self.target, self.allowed, self.batch_size = lm, target, allowed, batch_size
        bos = getattr(lm.tokenizer, "bos_token_id", None)
        self.prefix = [bos] if isinstance(bos, int) else []

    def _forward(self, ids: Tensor, embeds: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        full = torch.cat([torch.tensor([self.prefix] * len(ids), dtype=torch.long), ids], 1).to(
            self.lm.device
        )
        seen: dict[str, Tensor] = {}
        hook = self.target.hook_name
        patches = {hook: lambda value: seen.__setitem__("x", value)} if hook else {}
        kwargs = {"input_ids": full} if embeds is None else {"inputs_embeds": embeds}
        with self.lm.patch(patches):
            logits = self.lm.model(**kwargs, use_cache=False).logits
        start = len(self.prefix)
        obj, act = self.target.read((seen["x"] if hook else logits)[:, start:])
        if self.target.position == "last":
            obj, act = obj[:, -1], act[:, -1]
        else:
            obj, act = obj.amax(-1), act.amax(-1)
        losses = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), full[:, 1:].flatten(), reduction="none"
        )
        return obj, act, losses.view(len(ids), -1).mean(-1)

    @torch.no_grad()
    def evaluate(self, ids: Tensor) -> list[tuple[float, float, float]]:
        out = []
        for s in range(0, len(ids), self.batch_size):
            obj, act, ce = self._forward(ids[s : s + self.batch_size])
            out += list(zip(obj.tolist(), act.tolist(), ce.tolist(), strict=True))
        return out

    @torch.no_grad()
    def sample(self, n: int, seq_len: int, rng: torch.Generator) -> list[list[int]]:
        """`n` prompts sampled from the model at temperature 1 after BOS, ordinary tokens only (without
        a BOS the first token is uniform over them)."""
        allowed_ids = self.allowed.nonzero().squeeze(1)
        ids = torch.empty(n, 0, dtype=torch.long)
        if not self.prefix:
            ids = allowed_ids[torch.randint(len(allowed_ids), (n, 1), generator=rng)]
        while ids.shape[1] < seq_len:
            full = torch.cat([torch.tensor([self.prefix] * n, dtype=torch.long), ids], 1)
            logits = self.lm.model(input_ids=full.to(self.lm.device), use_cache=False).logits[:, -1]
            logits = logits[:, : len(self.allowed)].float().cpu().masked_fill(~self.allowed, -math.inf)
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=rng)], 1)
        return ids.tolist()

    def gradients(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """[batch, seq_len, vocab] gradients of the objective and of the CE with respect to one-hot
        tokens, from one forward pass per prompt: a member's candidates combine them with its own λ,
        so members that hold the same prompt share the pass."""
        embedding = self.lm.model.get_input_embeddings()
        weight = embedding.weight.float()
        g_obj, g_ce = [], []
        for s in range(0, len(ids), self.batch_size):
            chunk = ids[s : s + self.batch_size]
            full = torch.cat([torch.tensor([self.prefix] * len(chunk), dtype=torch.long), chunk], 1)
            embeds = embedding(full.to(self.lm.device)).detach().requires_grad_(True)
            with torch.enable_grad():
                obj, _, ce = self._forward(chunk, embeds)
                (d_obj,) = torch.autograd.grad(obj.sum(), embeds, retain_graph=True)
                (d_ce,) = torch.autograd.grad(ce.sum(), embeds)
            start = len(self.prefix)
            g_obj.append((d_obj[:, start:].float() @ weight.T)[..., : len(self.allowed)].cpu())
            g_ce.append((d_ce[:, start:].float() @ weight.T)[..., : len(self.allowed)].cpu())
        return torch.cat(g_obj), torch.cat(g_ce)

    def candidates(self, g_obj: Tensor, g_ce: Tensor, lam: float, top_k: int) -> Tensor:
        """[seq_len, top_k]: the allowed tokens with the largest gradient of objective - λ CE."""
        return (g_obj - lam * g_ce).masked_fill(~self.allowed, -math.inf).topk(top_k, dim=-1).indices


def _allowed_tokens(lm: HookedLM) -> Tensor:
    vocab = min(lm.model.get_input_embeddings().weight.shape[0], lm.unembed.shape[0], len(lm.tokenizer))
    allowed = torch.ones(vocab, dtype=torch.bool)
    tokenizer = lm.tokenizer
    specials = special_token_ids(tokenizer)
    specials |= {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    allowed[[i for i in specials if i < vocab]] = False
    if not bool(allowed.any()):
        raise DataError("the vocabulary has no ordinary tokens to build prompts from.")
    return allowed


def dream(lm: HookedLM, target: Target, cfg: DreamConfig | None = None, progress: bool = True) -> DreamResult:
    """Run EPO for `target` on `lm`; see the module docstring for the algorithm and the definitions."""
    cfg = cfg or DreamConfig()
    cfg.validate()
    target.check(lm)
    allowed = _allowed_tokens(lm)
    evaluator = _Evaluator(lm, target, allowed, cfg.batch_size)
    if not evaluator.prefix and cfg.seq_len < 2:
        raise DataError("without a BOS token the first prompt token has no loss; use seq_len >= 2.")
    start_time = time.perf_counter()
    rng = torch.Generator().manual_seed(cfg.seed)
    tokenizer, top_k = lm.tokenizer, min(cfg.top_k, int(allowed.sum()))
    allowed_ids = allowed.nonzero().squeeze(1)

    def stable(row: list[int]) -> bool:
        return (
            not cfg.retokenize
            or tokenizer(tokenizer.decode(row), add_special_tokens=False)["input_ids"] == row
        )

    # Every evaluated prompt: its index in these lists, values, first iteration, first λ that held it.
    index: dict[tuple[int, ...], int] = {}
    prompts, values, first_seen, first_lam = [], [], [], []

    def run(rows: list[list[int]], iteration: int) -> None:
        fresh = list(dict.fromkeys(tuple(r) for r in rows if tuple(r) not in index))
        if not fresh:
            return
        for key, value in zip(fresh, evaluator.evaluate(torch.tensor(fresh)), strict=True):
            index[key] = len(prompts)
            prompts.append(key)
            values.append(value)
            first_seen.append(iteration)
            first_lam.append(None)

    members: list[list[int]] = []
    for _attempt in range(20 if cfg.init == "sample" else 0):  # model samples, redrawn while unstable
        members += [r for r in evaluator.sample(cfg.population - len(members), cfg.seq_len, rng) if stable(r)]
        if len(members) == cfg.population:
            break
    while len(members) < cfg.population:  # uniform random ordinary tokens (dreamy's start)
        for _attempt in range(100):
            row = allowed_ids[torch.randint(len(allowed_ids), (cfg.seq_len,), generator=rng)].tolist()
            if stable(row):
                break
        else:
            raise DataError(
                "no random prompt of this tokenizer re-tokenises to itself; pass retokenize=False."
            )
        members.append(row)
    run(members, -1)
    members_idx = [index[tuple(m)] for m in members]
    initial = [
        {"token_ids": list(prompts[i]), "activation": values[i][1], "cross_entropy": values[i][2]}
        for i in members_idx
    ]
    grads: dict[tuple[int, int], Tensor] = {}  # (prompt index, member) -> candidates [seq_len, top_k]
    history, rejected = [], 0
    bar = tqdm(range(cfg.iterations), desc="dream", unit="it", disable=not progress, leave=False)
    for it in bar:
        need = [j for j in range(cfg.population) if (members_idx[j], j) not in grads]
        if need:
            unique = list(dict.fromkeys(members_idx[j] for j in need))
            g_obj, g_ce = evaluator.gradients(torch.tensor([prompts[i] for i in unique]))
            for j in need:
                u = unique.index(members_idx[j])
                grads[(members_idx[j], j)] = evaluator.candidates(g_obj[u], g_ce[u], cfg.lambdas[j], top_k)
        grads = {(members_idx[j], j): grads[(members_idx[j], j)] for j in range(cfg.population)}
        n = cfg.population * cfg.children
        parent = torch.arange(n) % cfg.population
        pos = torch.randint(cfg.seq_len, (n,), generator=rng)
        pick = torch.randint(top_k, (n,), generator=rng)
        kids = []
        for c in range(n):
            j, p = int(parent[c]), int(pos[c])
            row = list(prompts[members_idx[j]])
            row[p] = int(grads[(members_idx[j], j)][p, int(pick[c])])
            if tuple(row) in index or stable(row):
                kids.append(row)
            else:
                rejected += 1
        run(kids, it)
        pool = list(dict.fromkeys(members_idx + [index[tuple(r)] for r in kids]))
        obj = torch.tensor([values[i][0] for i in pool], dtype=torch.float64)
        ce = torch.tensor([values[i][2] for i in pool], dtype=torch.float64)
        restart = None
        if cfg.restart_every and it % cfg.restart_every == 0:
            spread = cfg.restart_spread
            u = float(torch.rand((), generator=rng))
            restart = cfg.restart_lambda * (1 / spread + (spread - 1 / spread) * u)
            members_idx = [pool[int(torch.argmax(obj - restart * ce))]] * cfg.population
        else:
            members_idx = [pool[int(torch.argmax(obj - lam * ce))] for lam in cfg.lambdas]
        for j, i in enumerate(members_idx):
            if first_lam[i] is None:
                first_lam[i] = cfg.lambdas[j] if restart is None else restart
        history.append(
            {
                "iteration": it,
                "restart_lambda": restart,
                "objective": [values[i][0] for i in members_idx],
                "activation": [values[i][1] for i in members_idx],
                "cross_entropy": [values[i][2] for i in members_idx],
                "evaluations": len(prompts),
            }
        )
        bar.set_postfix(best=f"{max(history[-1]['activation']):.3g}", evals=len(prompts))
    bar.close()
    points = [(v[1], v[2]) for v in values]
    front = [
        Dream(
            list(prompts[i]), tokenizer.decode(list(prompts[i])), *values[i][1:], first_lam[i], first_seen[i]
        )
        for i in pareto_front(points)
    ]
    seconds = time.perf_counter() - start_time
    return DreamResult(
        front, cfg.to_dict(), target.to_dict(), seconds, history, len(prompts), rejected, initial, points
    )
