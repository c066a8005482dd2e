"""Fixtures shared by the ternq tests."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops are fastest single-threaded, and a busy 2-core machine makes OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def arch_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private kernel cache for the -march variants (never the user's cache)."""
    return tmp_path_factory.mktemp("kernels")
