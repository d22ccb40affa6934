"""Where saelab keeps things it can rebuild (dequantized weights, the embedded corpus)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: $SAELAB_CACHE, else $XDG_CACHE_HOME/saelab, else ~/.cache/saelab."""
    root = os.environ.get("SAELAB_CACHE")
    if root:
        path = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "saelab"
    path.mkdir(parents=True, exist_ok=True)
    return path
