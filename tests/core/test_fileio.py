"""Atomic writes keep the usual file permissions (mkstemp's temp files are private)."""

from __future__ import annotations

import os

import torch

from saelab.core.fileio import atomic_save_tensors, atomic_write_json


def test_atomic_files_get_the_mode_a_plain_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_tensors({"t": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    for name in ("a.json", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
