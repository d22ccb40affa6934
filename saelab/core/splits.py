"""The train/eval split every text source shares: a stable hash of each document's text.

1 document in 50 is eval, decided by its text alone, so the split is the same on every machine, for
every source and in every order, and evaluation never sees training text.
"""

from __future__ import annotations

import hashlib

EVAL_MODULUS = 50  # a document is eval when stable_hash(text) % 50 == 0 (2% held out)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def is_eval_text(text: str) -> bool:
    """True if a document belongs to the held-out eval split (same answer on every machine)."""
    return _stable_hash(text) % EVAL_MODULUS == 0
