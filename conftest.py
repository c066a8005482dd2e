"""Fixtures shared by both test trees (tests/ for ternq, examples/bittts/tests/ for BitTTS): pytest loads this
file for every test under the repository root, so each fixture here has exactly one definition."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a test module: tiny ops run fastest single-threaded, and on a busy machine OpenMP
    threads wait on each other. Module-scoped, so module-scoped fixtures (a server, a trained run) can use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
