"""Text sources -> fixed-length token contexts -> batches.

Sources (`iter_texts`):
  * ``None`` / ``"embedded"``: English prose that ships with Python and its installed packages
    (help topics + docstrings), built once without network and cached as JSONL (`saelab.core.corpus`).
  * a local ``.txt``/``.md``, ``.jsonl`` or ``.parquet`` file, or a folder of them (recursive, sorted).
  * any other string: a Hugging Face dataset, streamed with ``datasets.load_dataset``.

Splits: ``"train"`` and ``"eval"`` partition every source by a stable hash of each document's
text (1 in 50 documents is eval, see `saelab.core.splits`), so evaluation never sees training
text; ``"all"`` keeps every document. For a Hugging Face dataset another split name
("validation", "test", ...) is passed through to the dataset unchanged.

Chat data (``DataConfig(chat=True, roles=...)``): a local ``.jsonl`` of conversations
(`saelab.core.chat`), rendered with the tokenizer's chat template and packed like documents; every
token carries its role, and positions whose role is not chosen are excluded like special tokens
(`chat_batches`, `DataConfig.masked_batches`). The split hashes each conversation.

Everything streams: no text source is read whole into memory (a chat file is read and checked whole
first, so a malformed line is refused before any work), and the same arguments always give the
same contexts in the same order (which is what makes ``skip_contexts`` resumption exact).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import torch

from saelab.core.chat import ROLES, conversation_key, load_conversations, render
from saelab.core.corpus import build_embedded_corpus
from saelab.core.splits import is_eval_text
from saelab.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
DATA_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}
SOURCES_HELP = (
    "Accepted sources: nothing or 'embedded' (the built-in corpus), a local .txt/.md, .jsonl or "
    ".parquet file or a folder of them, or the name of a Hugging Face dataset (needs network or a "
    "local copy in the HF cache)."
)

# --- local files ---------------------------------------------------------------------------------


def _read_txt(path: Path, target: int = 4096, hard: int = 65536) -> Iterator[str]:
    """A text file in documents of ~4 KB: cut at the first blank line after 4 KB, hard cut at 64 KB.

    A small file is one document; a big one streams in bounded pieces that still end at
    paragraph boundaries where the file has them.
    """
    buf = ""
    with open(path, encoding="utf-8") as f:
        while True:
            block = f.read(hard)
            buf += block
            while len(buf) > target:
                cut = buf.find("\n\n", target, hard)
                if cut < 0:
                    if len(buf) <= hard:
                        break  # read more (or, at the end, the rest is one document)
                    cut = buf.rfind("\n", target, hard)
                    cut = cut if cut > 0 else hard
                yield buf[:cut]
                buf = buf[cut:]
            if not block:
                break
    if buf:
        yield buf


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"Line {lineno} of {path} is not valid JSON ({e.msg}). A .jsonl file needs one JSON "
                    f'object per line, such as {{"{text_field}": "some text"}}; fix or remove that line.'
                ) from None
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"Line {lineno} of {path} has no field '{text_field}' (it has {keys}). Pass the "
                    f"field that holds the text with text_field (--text-field)."
                )
            if isinstance(row[text_field], str):
                yield row[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"The parquet file {path} has no column '{text_field}' (it has {pf.schema_arrow.names}). "
            f"Pass the column that holds the text with text_field (--text-field)."
        )
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    try:
        if suffix in TEXT_SUFFIXES:
            yield from _read_txt(path)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
        elif suffix == ".parquet":
            yield from _read_parquet(path, text_field)
        else:
            raise DataError(f"Unknown file type '{suffix}' for {path}. {SOURCES_HELP}")
    except UnicodeDecodeError:
        raise DataError(
            f"{path} is not UTF-8 text. Convert it (for example `iconv -t utf-8`) or leave it out."
        ) from None


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


# --- Hugging Face datasets -----------------------------------------------------------------------


def _read_hf(name: str, hf_split: str, text_field: str, dataset_config: str | None) -> Iterator[str]:
    import datasets

    def fail(e: Exception) -> DataError:
        return DataError(
            f"Could not stream the dataset '{name}' (config {dataset_config!r}, split '{hf_split}') "
            f"with datasets.load_dataset: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Check the name and your network (or HF_HUB_OFFLINE), or use a local file. {SOURCES_HELP}"
        )

    try:
        ds = datasets.load_dataset(name, dataset_config, split=hf_split, streaming=True)
    except Exception as e:
        raise fail(e) from e
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # streaming fetches lazily, so network errors surface here
            raise fail(e) from e
        if text_field not in row:
            raise DataError(
                f"The dataset '{name}' has no field '{text_field}' (it has {sorted(row)}). Pass the "
                f"field that holds the text with text_field (--text-field)."
            )
        if isinstance(row[text_field], str):
            yield row[text_field]


# --- one entry point for text --------------------------------------------------------------------


def iter_texts(
    source: str | os.PathLike | None = None,
    split: str = "train",
    text_field: str = "text",
    dataset_config: str | None = None,
) -> Iterator[str]:
    """Documents of a source, streamed in a fixed order (see the module docstring for sources/splits).

    A local folder with no .txt/.md/.jsonl/.parquet file is handed to `datasets.load_dataset`,
    which reads folders of csv/json/arrow files and saved dataset repos.
    """
    name = "embedded" if source is None else os.fspath(source)
    hashed = split in ("train", "eval")
    path = Path(name).expanduser()
    if (
        name != "embedded"
        and not path.exists()
        and (path.suffix.lower() in DATA_SUFFIXES or name[:1] in "./~")
    ):
        raise DataError(f"No such file or folder: {name}. Check the path. {SOURCES_HELP}")
    if name == "embedded" or (path.exists() and (path.is_file() or _data_files(path))):
        if split not in ("train", "eval", "all"):
            raise DataError(f"Unknown split '{split}' for '{name}'. Use 'train', 'eval' or 'all'.")
        if name == "embedded":
            texts: Iterable[str] = _read_jsonl(build_embedded_corpus(), "text")
        elif path.is_file():
            texts = _read_file(path, text_field)
        else:
            texts = (t for p in _data_files(path) for t in _read_file(p, text_field))
    else:
        hf_split = "train" if split in ("train", "eval", "all") else split
        texts = _read_hf(name, hf_split, text_field, dataset_config)
    for text in texts:
        if text.strip() and (not hashed or is_eval_text(text) == (split == "eval")):
            yield text


# --- tokens --------------------------------------------------------------------------------------


def _special_id(tokenizer, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def iter_contexts(
    texts: Iterable[str],
    tokenizer,
    context_size: int,
    prepend_bos: bool = True,
    tokenizer_batch: int = 64,
    source_name: str = "the dataset",
) -> Iterator[torch.Tensor]:
    """Pack documents into LongTensor[context_size] contexts.

    Documents are tokenized without special tokens and concatenated as ``doc EOS doc EOS ...``
    (BOS as the separator if the tokenizer has no EOS), then cut into consecutive pieces. With
    ``prepend_bos`` every context is ``BOS + context_size-1 tokens``, so every context looks like a
    sequence start to the model (position 0 is then an attention sink: see `exclusion_mask`).
    Leftover tokens shorter than a context are dropped. Raises DataError if no context comes out.
    """
    bos = _special_id(tokenizer, "bos_token_id", "eos_token_id")
    sep = _special_id(tokenizer, "eos_token_id", "bos_token_id")
    if sep is None or (prepend_bos and bos is None):
        raise DataError(
            "The tokenizer has neither a BOS nor an EOS token, so documents cannot be separated "
            "(or contexts started). Use a tokenizer that defines bos_token or eos_token."
        )
    n = context_size - 1 if prepend_bos else context_size
    if n < 1:
        raise DataError(f"context_size={context_size} is too small; use at least 2 (128 is typical).")
    head = torch.tensor([bos] if prepend_bos else [], dtype=torch.long)
    buf: list[int] = []
    seen_tokens = produced = 0
    texts = iter(texts)
    while batch := list(islice(texts, tokenizer_batch)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            buf.extend(ids)
            buf.append(sep)
            seen_tokens += len(ids) + 1
        k = len(buf) // n
        if k:
            rows = torch.tensor(buf[: k * n], dtype=torch.long).view(k, n)
            del buf[: k * n]
            for row in rows:
                produced += 1
                yield torch.cat([head, row])
    if not produced:
        raise DataError(
            f"{source_name} gave {seen_tokens} tokens; it needs at least {n} (one context of "
            f"context_size={context_size}{' with BOS' if prepend_bos else ''}). Check the path, the "
            f"split and text_field, or use a smaller context_size."
        )


def token_batches(
    source: str | os.PathLike | None,
    tokenizer,
    context_size: int = 128,
    batch_size: int = 32,
    prepend_bos: bool = True,
    split: str = "train",
    text_field: str = "text",
    dataset_config: str | None = None,
    max_contexts: int | None = None,
    skip_contexts: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """LongTensor[B, context_size] batches: one deterministic pass over the source.

    ``skip_contexts`` drops the first contexts of the stream (resume: the rest is exactly what an
    uninterrupted run would have produced; skipped text is still tokenized). ``max_contexts``
    caps how many contexts this call yields after the skip. The last batch may be smaller.

    With ``world_size > 1`` the stream is this rank's share: contexts rank, rank + world_size, ...
    of the whole stream, so ranks never read the same context and together read all of them.
    ``skip_contexts`` and ``max_contexts`` then count this rank's contexts. Every rank tokenizes
    the whole text (cheap next to the model's forward passes) and keeps only its own contexts.
    """
    name = "the embedded corpus" if source is None else f"dataset {os.fspath(source)!r} (split {split!r})"
    texts = iter_texts(source, split=split, text_field=text_field, dataset_config=dataset_config)
    contexts = iter_contexts(texts, tokenizer, context_size, prepend_bos, source_name=name)
    for batch in _shard(contexts, batch_size, max_contexts, skip_contexts, rank, world_size):
        yield torch.stack(batch)


def _shard(contexts: Iterator, batch_size, max_contexts, skip_contexts, rank, world_size) -> Iterator[list]:
    """This rank's contexts after the skip, capped, in lists of batch_size (see `token_batches`)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not a rank of a world of {world_size} processes.")
    start = rank + skip_contexts * world_size
    stop = None if max_contexts is None else rank + (skip_contexts + max_contexts) * world_size
    contexts = islice(contexts, start, stop, world_size)
    while batch := list(islice(contexts, batch_size)):
        yield batch


# --- chat ----------------------------------------------------------------------------------------


def role_codes(roles: Iterable[str]) -> list[int]:
    """Roles as the small ints a chat batch carries per token: 0 is no role (a prepended BOS)."""
    return [ROLES.index(role) + 1 for role in roles]


def check_roles(roles: Iterable[str] | None) -> list[str] | None:
    """The chosen roles in canonical order (None: every role), or a DataError naming the valid ones."""
    if roles is None:
        return None
    roles = [roles] if isinstance(roles, str) else list(roles)
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise DataError(
            f"unknown role {unknown[0]!r}; choose from {', '.join(ROLES)} (a comma list, e.g. assistant "
            "or user,assistant)."
        )
    if not roles:
        raise DataError(f"no role chosen; choose from {', '.join(ROLES)}.")
    return [r for r in ROLES if r in roles]


def split_conversations(source: str | os.PathLike | None, split: str = "train") -> list[list[dict]]:
    """The conversations of a chat .jsonl in file order, checked whole (line-numbered DataError), of one split.

    ``train``/``eval`` split by the stable hash of each conversation (`saelab.core.splits`); ``all`` keeps all.
    """
    if source is None or not Path(source).expanduser().is_file() or Path(source).suffix.lower() != ".jsonl":
        raise DataError(
            f'chat data must be a local .jsonl file of conversations, one {{"messages": [...]}} a line; '
            f"got {source!r}."
        )
    if split not in ("train", "eval", "all"):
        raise DataError(f"Unknown split '{split}' for '{source}'. Use 'train', 'eval' or 'all'.")
    conversations = load_conversations(Path(source).expanduser())
    if split == "all":
        return conversations
    return [c for c in conversations if is_eval_text(conversation_key(c)) == (split == "eval")]


def iter_chat_contexts(
    conversations: Iterable[list[dict]],
    tokenizer,
    context_size: int,
    prepend_bos: bool = True,
    source_name: str = "the chat data",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(LongTensor[context_size] ids, ByteTensor[context_size] role codes): conversations packed like documents.

    Rendered conversations are concatenated and cut into contexts exactly as `iter_contexts` cuts
    documents (BOS first with ``prepend_bos``, role 0; the leftover dropped). Packing, not one padded
    conversation per row: every forward is full, no pad positions, and a long conversation is read
    whole across contexts. No separator is added: the template's own turn tokens (and BOS, where the
    template writes one) already mark where a conversation starts.
    """
    bos = _special_id(tokenizer, "bos_token_id", "eos_token_id")
    if prepend_bos and bos is None:
        raise DataError(
            "The tokenizer has no BOS or EOS token to start contexts with; use prepend_bos=False."
        )
    n = context_size - 1 if prepend_bos else context_size
    if n < 1:
        raise DataError(f"context_size={context_size} is too small; use at least 2 (128 is typical).")
    head_ids = torch.tensor([bos] if prepend_bos else [], dtype=torch.long)
    head_roles = torch.zeros(len(head_ids), dtype=torch.uint8)
    ids: list[int] = []
    roles: list[int] = []
    seen_tokens = produced = 0
    for messages in conversations:
        chat = render(tokenizer, messages)
        ids.extend(chat.input_ids)
        roles.extend(role_codes(chat.roles))
        seen_tokens += len(chat.input_ids)
        k = len(ids) // n
        if k:
            rows = torch.tensor(ids[: k * n], dtype=torch.long).view(k, n)
            row_roles = torch.tensor(roles[: k * n], dtype=torch.uint8).view(k, n)
            del ids[: k * n], roles[: k * n]
            for row, row_role in zip(rows, row_roles, strict=True):
                produced += 1
                yield torch.cat([head_ids, row]), torch.cat([head_roles, row_role])
    if not produced:
        raise DataError(
            f"{source_name} gave {seen_tokens} tokens; it needs at least {n} (one context of "
            f"context_size={context_size}{' with BOS' if prepend_bos else ''}). Add conversations, check "
            "the split, or use a smaller context_size."
        )


def chat_batches(
    source: str | os.PathLike,
    tokenizer,
    context_size: int = 128,
    batch_size: int = 32,
    prepend_bos: bool = True,
    split: str = "train",
    max_contexts: int | None = None,
    skip_contexts: int = 0,
    rank: int = 0,
    world_size: int = 1,
    roles: Iterable[str] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(LongTensor[B, context_size] ids, ByteTensor[B, context_size] role codes) of a chat .jsonl.

    Deterministic, resumable and sharded exactly like `token_batches` (the same skip_contexts,
    max_contexts, rank and world_size rules). The file is read and checked before the first batch,
    and refused when no token of the chosen `roles` (None: any) is in this split.
    """
    roles = check_roles(roles)
    name = f"chat data {os.fspath(source)!r} (split {split!r})"
    conversations = split_conversations(source, split)
    if not conversations:
        raise DataError(f"{name} holds no conversation; use split 'all' or add conversations.")
    if roles is not None:
        _check_role_tokens(conversations, tokenizer, roles, name)
    contexts = iter_chat_contexts(conversations, tokenizer, context_size, prepend_bos, source_name=name)
    for batch in _shard(contexts, batch_size, max_contexts, skip_contexts, rank, world_size):
        yield torch.stack([ids for ids, _ in batch]), torch.stack([codes for _, codes in batch])


def _check_role_tokens(conversations: list[list[dict]], tokenizer, roles: list[str], name: str) -> None:
    """Refuse chat data whose chosen roles have no token (rendering stops at the first that has one)."""
    found: set[str] = set()
    for messages in conversations:
        found |= set(render(tokenizer, messages).roles)
        if found & set(roles):
            return
    raise DataError(
        f"{name} has no {'/'.join(roles)} token to keep (its tokens are {', '.join(sorted(found))}); "
        "choose other roles with --roles, or give conversations with those turns."
    )


def check_enough_tokens(source, tokenizer, context_size: int = 128, **kwargs) -> None:
    """Raise DataError now (not mid-run) if the source cannot fill one context."""
    next(token_batches(source, tokenizer, context_size=context_size, batch_size=1, **kwargs))


def exclusion_mask(
    input_ids: torch.Tensor, tokenizer, exclude_bos=True, exclude_special=True
) -> torch.Tensor:
    """BoolTensor like input_ids: True where a token must be left out of training and metrics.

    * ``exclude_bos``: position 0 of every context, whatever its token. It is the attention sink;
      its residual norm is ~100x the rest (~25,000 vs ~175 in SmolLM2), so it would dominate MSE.
    * ``exclude_special``: every special token (BOS, EOS, PAD, ``all_special_ids``) anywhere,
      e.g. the EOS separators between packed documents.
    """
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    if exclude_bos:
        mask[..., 0] = True
    if exclude_special:
        ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        ids |= {_special_id(tokenizer, n) for n in ("bos_token_id", "eos_token_id", "pad_token_id")}
        ids.discard(None)
        if ids:
            mask |= torch.isin(input_ids, torch.tensor(sorted(ids), device=input_ids.device))
    return mask


@dataclass
class DataConfig:
    """Where the tokens come from, how they are packed and which positions count; saved beside every artifact.

    ``chat=True`` reads ``source`` as a chat .jsonl; ``roles`` (None: every role) keeps only the tokens of
    those roles. Plain-text configs serialise without the two chat keys, as before they existed.
    """

    source: str | None = None
    split: str = "train"
    text_field: str = "text"
    dataset_config: str | None = None
    context_size: int = 128
    prepend_bos: bool = True
    exclude_bos: bool = True
    exclude_special: bool = True
    chat: bool = False
    roles: list[str] | None = None

    def __post_init__(self):
        self.roles = check_roles(self.roles)
        if self.roles is not None and not self.chat:
            raise DataError(
                "roles only apply to chat data; pass chat=True (--chat) with a conversations .jsonl."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.chat:
            del d["chat"], d["roles"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """Unknown keys are ignored, so configs from newer versions still load."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def batches(self, tokenizer, batch_size: int = 32, **kwargs) -> Iterator[torch.Tensor]:
        """Token batches only (for timing and forward passes that keep every position)."""
        if self.chat:
            return (ids for ids, _ in self._chat(tokenizer, batch_size, **kwargs))
        return token_batches(
            self.source, tokenizer, self.context_size, batch_size, self.prepend_bos, self.split,
            self.text_field, self.dataset_config, **kwargs,
        )  # fmt: skip

    def masked_batches(
        self, tokenizer, batch_size: int = 32, **kwargs
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, keep) batches: keep is False at excluded positions (the BOS sink, special tokens, and
        for chat data tokens of roles not chosen). Every consumer that drops positions reads this.

        kwargs: max_contexts, skip_contexts, rank, world_size, as for `token_batches`.
        """
        if not self.chat:
            for input_ids in self.batches(tokenizer, batch_size, **kwargs):
                yield input_ids, ~self.mask(input_ids, tokenizer)
            return
        chosen = None if self.roles is None else torch.tensor(role_codes(self.roles), dtype=torch.uint8)
        for input_ids, codes in self._chat(tokenizer, batch_size, **kwargs):
            keep = ~self.mask(input_ids, tokenizer)
            if chosen is not None:
                keep &= torch.isin(codes, chosen)
            yield input_ids, keep

    def _chat(self, tokenizer, batch_size: int, **kwargs):
        return chat_batches(
            self.source, tokenizer, self.context_size, batch_size, self.prepend_bos, self.split,
            roles=self.roles, **kwargs,
        )  # fmt: skip

    def mask(self, input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
        """Excluded positions that the token ids alone tell (BOS sink, special tokens); roles need
        `masked_batches`."""
        return exclusion_mask(input_ids, tokenizer, self.exclude_bos, self.exclude_special)
