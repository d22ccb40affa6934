"""Circuit tasks: prompt pairs or single prompts with a target token, encoded for a model, and their metrics.

A pairs row (the feature-circuits format) is `{clean_prefix, patch_prefix, clean_answer, patch_answer,
case}`: the two prefixes differ in one detail (a subject's number, a country) and each answer is the
next token that the matching prefix calls for. Its metric is logit(clean answer) - logit(patch answer)
at the last position. A prompts row is `{prompt, target, case}`; its metric is the log-probability of
the target there (and whether it is the top-1 token). `case` is an optional free label.

Shipped tasks live in `saelab/circuits/data/<name>.jsonl`; `list_tasks()` names them. Every answer must
be one token for the model's tokenizer, and the two prefixes of a pair must have the same number of
tokens, so that the last positions line up when activations are patched from one into the other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.core.prompts import pad_rows, pad_token_id, prompt_token_ids
from saelab.errors import TaskError

DATA_DIR = Path(__file__).parent / "data"
PAIRS, PROMPTS = "pairs", "prompts"


@dataclass(frozen=True)
class PromptPair:
    """Two prefixes that differ in one detail, each with the answer it calls for."""

    clean_prefix: str
    patch_prefix: str
    clean_answer: str
    patch_answer: str
    case: str = ""


@dataclass(frozen=True)
class TargetPrompt:
    """One prompt and the single token that should come next."""

    prompt: str
    target: str
    case: str = ""


Row = PromptPair | TargetPrompt
_ROW_CLASS = {PAIRS: PromptPair, PROMPTS: TargetPrompt}


def _required(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.name != "case"]


@dataclass
class TaskBatch:
    """A task as tensors: token ids padded into one batch, plus each row's answer ids.

    Pairs fill every field; prompts leave the patch fields None and keep the target in `clean_answer`.
    `last` is the column of each row's last real token (the same for clean and patch by construction).
    """

    kind: str
    clean_ids: Tensor
    clean_mask: Tensor
    clean_answer: Tensor
    last: Tensor
    patch_ids: Tensor | None = None
    patch_mask: Tensor | None = None
    patch_answer: Tensor | None = None

    def __len__(self) -> int:
        return int(self.clean_ids.shape[0])

    def select(self, rows: slice | Tensor | Sequence[int]) -> TaskBatch:
        """The batch restricted to some rows (a slice, indices or a boolean mask), e.g. a chunk to run."""
        kept = {
            name: None if value is None else value[rows]
            for name, value in vars(self).items()
            if isinstance(value, Tensor) or value is None
        }
        return TaskBatch(kind=self.kind, **kept)

    def to(self, device) -> TaskBatch:
        moved = {name: v.to(device) if isinstance(v, Tensor) else v for name, v in vars(self).items()}
        return TaskBatch(**moved)


@dataclass
class Task:
    """A named list of rows, all pairs or all single prompts."""

    name: str
    rows: list[Row]
    kind: str = PAIRS

    def __post_init__(self):
        if self.kind not in _ROW_CLASS:
            raise TaskError(f"task {self.name!r}: kind must be {PAIRS!r} or {PROMPTS!r}, got {self.kind!r}.")
        if not self.rows:
            raise TaskError(f"task {self.name!r} has no rows; give at least one.")
        wrong = [i for i, row in enumerate(self.rows) if not isinstance(row, _ROW_CLASS[self.kind])]
        if wrong:
            raise TaskError(
                f"task {self.name!r} is a {self.kind} task but row {wrong[0]} is a "
                f"{type(self.rows[wrong[0]]).__name__}; a task holds one kind of row only."
            )

    def __len__(self) -> int:
        return len(self.rows)

    def encode(self, tokenizer, left: bool = True) -> TaskBatch:
        """Tokenize every row (no chat template: these are plain completions) and pad into one batch.

        Left padding (the default, as everywhere in saelab) puts every last token in the last column.
        Raises TaskError naming the row if an answer is not one token or a pair's prefixes differ in length.
        """
        if self.kind == PROMPTS:
            clean = [self._prefix_ids(tokenizer, i, r.prompt) for i, r in enumerate(self.rows)]
            answers = [self._answer_id(tokenizer, i, "target", r.target) for i, r in enumerate(self.rows)]
            ids, mask = pad_rows(clean, pad_token_id(tokenizer), left)
            return TaskBatch(PROMPTS, ids, mask, torch.tensor(answers), _last_columns(mask))
        clean, patch = [], []
        for i, row in enumerate(self.rows):
            clean.append(self._prefix_ids(tokenizer, i, row.clean_prefix))
            patch.append(self._prefix_ids(tokenizer, i, row.patch_prefix))
            if len(clean[-1]) != len(patch[-1]):
                raise TaskError(
                    f"task {self.name!r} row {i}: clean_prefix {row.clean_prefix!r} has {len(clean[-1])} "
                    f"tokens but patch_prefix {row.patch_prefix!r} has {len(patch[-1])}; a pair's prefixes "
                    "must have the same length for this tokenizer. Reword one or drop the row."
                )
        pad = pad_token_id(tokenizer)
        clean_ids, clean_mask = pad_rows(clean, pad, left)
        patch_ids, patch_mask = pad_rows(patch, pad, left)
        clean_answer = [
            self._answer_id(tokenizer, i, "clean_answer", r.clean_answer) for i, r in enumerate(self.rows)
        ]
        patch_answer = [
            self._answer_id(tokenizer, i, "patch_answer", r.patch_answer) for i, r in enumerate(self.rows)
        ]
        return TaskBatch(
            PAIRS,
            clean_ids,
            clean_mask,
            torch.tensor(clean_answer),
            _last_columns(clean_mask),
            patch_ids,
            patch_mask,
            torch.tensor(patch_answer),
        )

    def _prefix_ids(self, tokenizer, index: int, text: str) -> list[int]:
        ids = prompt_token_ids(tokenizer, text)
        if not ids:
            raise TaskError(
                f"task {self.name!r} row {index}: the prefix {text!r} has no tokens; give it text."
            )
        return ids

    def _answer_id(self, tokenizer, index: int, field: str, answer: str) -> int:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [tokenizer.decode([t]) for t in ids]
            raise TaskError(
                f"task {self.name!r} row {index}: the {field} {answer!r} is {len(ids)} tokens for this "
                f"tokenizer, {pieces} (ids {ids}); the metric reads one token. Use an answer that is a "
                "single token (most need their leading space, e.g. ' is') or drop the row."
            )
        return int(ids[0])


def _last_columns(mask: Tensor) -> Tensor:
    """Column of each row's last real token, for left or right padding."""
    width = mask.shape[1]
    return width - 1 - mask.flip(1).long().argmax(1)


# -- loading --------------------------------------------------------------------------------------
def list_tasks() -> list[str]:
    """Names of the shipped tasks (each a `saelab/circuits/data/<name>.jsonl`)."""
    return sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))


def load_task(name_or_path: str | Path) -> Task:
    """A shipped task by name (see `list_tasks()`) or a .jsonl file with one row object per line."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = DATA_DIR / f"{name_or_path}.jsonl"
        if not shipped.is_file():
            raise TaskError(
                f"no task file or shipped task {str(name_or_path)!r}: pass a .jsonl file (one JSON object "
                f"per line) or one of the shipped tasks {list_tasks()}."
            )
        path = shipped
    return parse_task(path.read_text(encoding="utf-8"), name=path.stem, source=str(path))


def parse_task(text: str, name: str, source: str = "<text>") -> Task:
    """A task from jsonl text; errors name the source, the line and the field to fix."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(
                f"{source} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                "write one JSON object per line."
            ) from None
        if not isinstance(record, dict):
            raise TaskError(
                f"{source} line {number} is a {type(record).__name__}, not a JSON object; {_FORMS}."
            )
        records.append((number, record))
    if not records:
        raise TaskError(f"{source} holds no rows (it is empty); {_FORMS}.")
    kind = PROMPTS if "prompt" in records[0][1] and "clean_prefix" not in records[0][1] else PAIRS
    rows = [_row(kind, record, number, source) for number, record in records]
    return Task(name=name, rows=rows, kind=kind)


_FORMS = (
    "each line must be a pairs row {clean_prefix, patch_prefix, clean_answer, patch_answer, case} "
    "or a prompts row {prompt, target, case} (case is optional), one kind per file"
)


def _row(kind: str, record: dict, number: int, source: str) -> Row:
    cls = _ROW_CLASS[kind]
    missing = [f for f in _required(cls) if f not in record]
    if missing:
        raise TaskError(
            f"{source} line {number}: missing field {', '.join(repr(m) for m in missing)} "
            f"(this is a {kind} file, from its first row); {_FORMS}."
        )
    known = {f.name for f in fields(cls)}
    extra = sorted(set(record) - known)
    if extra:
        raise TaskError(
            f"{source} line {number}: unknown field {', '.join(repr(e) for e in extra)} in a {kind} file; "
            f"{_FORMS}."
        )
    for key in known & set(record):
        value = record[key]
        if not isinstance(value, str) or (key != "case" and not value.strip()):
            raise TaskError(
                f"{source} line {number}: field {key!r} must be a non-empty string, got {value!r}."
            )
    row = cls(**record)
    if isinstance(row, PromptPair) and row.clean_answer == row.patch_answer:
        raise TaskError(
            f"{source} line {number}: clean_answer and patch_answer are both {row.clean_answer!r}, so "
            "the metric is always 0; give the patch prefix its own answer."
        )
    return row


# -- running and metrics --------------------------------------------------------------------------
@torch.no_grad()
def last_logits(lm: HookedLM, ids: Tensor, mask: Tensor, last: Tensor, batch_size: int = 32) -> Tensor:
    """Logits [n, vocab] (float32, CPU) at each row's last real token, run `batch_size` rows at a time.

    For attribution, run `lm.forward` yourself (gradients flow) and pass its logits to the metrics.
    """
    out = []
    for start in range(0, ids.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        logits = lm.forward(ids[chunk], mask[chunk])
        rows = torch.arange(logits.shape[0], device=logits.device)
        out.append(logits[rows, last[chunk].to(logits.device)].float().cpu())
    return torch.cat(out)


def _at_last(logits: Tensor, batch: TaskBatch) -> Tensor:
    """[n, vocab] logits at the last position, from [n, vocab] or full [n, seq, vocab] logits."""
    if logits.shape[0] != len(batch):
        raise TaskError(
            f"logits have {logits.shape[0]} rows but the batch has {len(batch)}; pass matching ones."
        )
    if logits.ndim == 3:
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, batch.last.to(logits.device)]
    if logits.ndim != 2:
        raise TaskError(f"logits must be [n, vocab] or [n, seq, vocab], got shape {tuple(logits.shape)}.")
    return logits


def _pick(logits: Tensor, ids: Tensor) -> Tensor:
    return logits.gather(1, ids.to(logits.device)[:, None])[:, 0]


def logit_diff(logits: Tensor, batch: TaskBatch, mean: bool = False) -> Tensor:
    """logit(clean answer) - logit(patch answer) at the last position: per row [n], or their mean.

    Pass the logits of the clean prompts; on the patch prompts a solved row gives a negative value.
    Differentiable, so it can be the metric that attribution takes gradients of.
    """
    if batch.kind != PAIRS:
        raise TaskError("logit_diff needs a pairs task; for single prompts use target_logprob or top1.")
    at = _at_last(logits, batch)
    diff = _pick(at, batch.clean_answer) - _pick(at, batch.patch_answer)
    return diff.mean() if mean else diff


def target_logprob(logits: Tensor, batch: TaskBatch, mean: bool = False) -> Tensor:
    """Log-probability of each row's target at the last position: per row [n], or their mean."""
    at = _at_last(logits, batch)
    value = _pick(torch.log_softmax(at.float(), dim=-1), batch.clean_answer)
    return value.mean() if mean else value


def top1(logits: Tensor, batch: TaskBatch) -> Tensor:
    """Per row: whether the target (or clean answer) is the most likely next token."""
    return _at_last(logits, batch).argmax(-1).cpu() == batch.clean_answer.cpu()


def metric(logits: Tensor, batch: TaskBatch, mean: bool = True) -> Tensor:
    """The task's metric: logit_diff for pairs, target_logprob for single prompts."""
    return logit_diff(logits, batch, mean) if batch.kind == PAIRS else target_logprob(logits, batch, mean)


def accuracy(logits: Tensor, batch: TaskBatch) -> float:
    """Share of rows solved: the clean answer outranks the patch answer (pairs), or the target is top-1."""
    solved = logit_diff(logits, batch) > 0 if batch.kind == PAIRS else top1(logits, batch)
    return float(solved.float().mean())
