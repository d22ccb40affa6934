"""Fixtures every test module shares. Plain helpers (tiny models, corpora, the CLI runner, stores)
live in tests/helpers.py and tests/stores.py and are imported as `from tests.helpers import ...`."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """(lm, sae, features.db path): the tiny analysed store the server, export and browser tests read."""
    from tests.stores import analysed_store

    return analysed_store(tmp_path_factory.mktemp("server"))
