"""Fixtures shared by the BitTTS tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny shapes run fastest on one thread, and do not stall when the CI machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
