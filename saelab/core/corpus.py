"""The embedded corpus: English prose that ships with Python and its installed packages.

Help topics, then the docstrings of the standard library, then those of site-packages, read with
`ast` (nothing is imported or executed), deduplicated and capped. Built once without network and
cached as JSONL (one ``{"text": ...}`` object a line) under `saelab.core.paths.cache_dir`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from saelab.core.paths import cache_dir
from saelab.core.splits import is_eval_text

_CORPUS_FORMAT = 1  # bump when the extraction below changes, so old caches are not reused
_MIN_DOC_CHARS = 100  # shorter docstrings are mostly "Return x." boilerplate
# Deterministic cap (sorted order: help topics, stdlib, then packages a..z): 30 M characters is
# ~7 M SmolLM2 tokens and bounds the one-time build to about a minute on 2 cores.
_MAX_CORPUS_CHARS = 30_000_000
_MAX_FILE_BYTES = 1_000_000  # bigger .py files are generated tables, slow to parse, no prose
# Files whose triple-quoted strings are under 15% of their bytes are mostly code: skipping them
# keeps ~90% of the prose for ~55% of the parse time (measured on this project's environment).
_MIN_QUOTED_FRACTION = 0.15
_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages"}
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def embedded_corpus_path() -> Path:
    """Cache file of the embedded corpus; its name changes when Python or any package changes."""
    listing = sorted(
        name for d in _site_dirs() if os.path.isdir(d) for name in os.listdir(d) if name.endswith("-info")
    )
    key = hashlib.sha1(
        json.dumps([_CORPUS_FORMAT, _MAX_CORPUS_CHARS, _MIN_QUOTED_FRACTION, sys.version, listing]).encode()
    ).hexdigest()[:12]
    version = ".".join(map(str, sys.version_info[:3]))
    return cache_dir() / "corpus" / f"embedded-{version}-{key}.jsonl"


def _python_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def _quoted_fraction(src: bytes) -> float:
    quoted = 0
    for quote in (b'"""', b"'''"):
        parts = src.split(quote)
        quoted += sum(len(p) for p in parts[1::2])  # odd parts lie between an opening and a closing
    return quoted / max(len(src), 1)


def _docstrings(node: ast.AST) -> Iterator[str]:
    doc = ast.get_docstring(node)
    if doc:
        yield doc
    for child in node.body:
        if isinstance(child, _DEFS):
            yield from _docstrings(child)


def _file_docstrings(path: str) -> list[str]:
    """Docstrings of one file, parsed with `ast` (nothing is imported or executed)."""
    try:
        if os.path.getsize(path) > _MAX_FILE_BYTES:
            return []
        with open(path, "rb") as f:
            src = f.read()
        if _quoted_fraction(src) < _MIN_QUOTED_FRACTION:
            return []
        with warnings.catch_warnings():  # invalid escapes in third-party code warn while parsing
            warnings.simplefilter("ignore")
            tree = ast.parse(src.decode("utf-8"))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return [d for d in _docstrings(tree) if len(d) >= _MIN_DOC_CHARS]


def _embedded_documents() -> Iterator[str]:
    """Help topics, then stdlib docstrings, then site-packages docstrings; deduplicated, capped."""
    from pydoc_data.topics import topics

    from tqdm.auto import tqdm

    files = _python_files(sysconfig.get_paths()["stdlib"])
    for d in _site_dirs():
        files += _python_files(d)
    candidates = (topics[k] for k in sorted(topics))
    seen: set[bytes] = set()
    total = 0
    bar = tqdm(files, desc="saelab: building the embedded corpus (once)", unit="file")

    def docs() -> Iterator[str]:
        yield from candidates
        for path in bar:
            yield from _file_docstrings(path)

    for doc in docs():
        doc = doc.strip()
        digest = hashlib.sha1(doc.encode("utf-8")).digest()
        if len(doc) < _MIN_DOC_CHARS or digest in seen:
            continue
        seen.add(digest)
        yield doc
        total += len(doc)
        if total >= _MAX_CORPUS_CHARS:
            break
    bar.close()


def build_embedded_corpus(force: bool = False) -> Path:
    """Build the embedded corpus cache if missing (tens of seconds, once) and return its path."""
    path = embedded_corpus_path()
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for doc in _embedded_documents():
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)  # atomic: readers never see a half-written corpus
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _cached_documents(path: Path) -> Iterator[str]:
    """The documents of a cache file written by `build_embedded_corpus` (one JSON object a line)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def embedded_corpus_stats() -> dict:
    """Documents and characters of the embedded corpus, in total and per split."""
    path = build_embedded_corpus()
    stats = {"path": str(path), "bytes": path.stat().st_size, "documents": 0, "characters": 0}
    stats.update(eval_documents=0, eval_characters=0)
    for text in _cached_documents(path):
        stats["documents"] += 1
        stats["characters"] += len(text)
        if is_eval_text(text):
            stats["eval_documents"] += 1
            stats["eval_characters"] += len(text)
    return stats
