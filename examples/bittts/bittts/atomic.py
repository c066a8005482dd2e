"""``torch.save`` through `ternq.atomic`, the one home of atomic writes (temp file + rename for regular files,
mode and owner kept, devices and FIFOs written through, stale temp files removed), which every BitTTS writer uses.
"""
from __future__ import annotations

import io
import os
from typing import Any

import torch

from ternq.atomic import atomic_write

__all__ = ["atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically; the same object always gives the same bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())
