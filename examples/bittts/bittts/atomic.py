"""Atomic writes for every BitTTS writer: ternq's (`ternq/format/atomic.py`, the one home of the rules: temp file +
rename for regular files, mode and owner kept, devices and FIFOs written through, stale temp files removed), and
``torch.save`` through them.

`atomic_open` and `atomic_write` load without torch: importing any ``ternq.*`` module runs the ``ternq`` package,
which imports torch, so while ternq is not loaded yet the file ``ternq/format/atomic.py`` (standard library only)
is loaded on its own. The ONNX voice (`bittts.synthesis.onnx_voice`) writes its WAV files through it.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
from types import ModuleType
from typing import Any

__all__ = ["atomic_open", "atomic_write", "atomic_torch_save"]


def _ternq_atomic() -> ModuleType:
    loaded = sys.modules.get("ternq.format.atomic")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("ternq")  # finds the package without running it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((os.path.join(d, "format", "atomic.py") for d in locations
                 if os.path.isfile(os.path.join(d, "format", "atomic.py"))), None)
    if path is None:
        raise ModuleNotFoundError("bittts needs ternq's ternq/format/atomic.py: install ternq (pip install ternq)")
    file_spec = importlib.util.spec_from_file_location("bittts._ternq_atomic", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


_atomic = _ternq_atomic()
atomic_open = _atomic.atomic_open
atomic_write = _atomic.atomic_write


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically; the same object always gives the same bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())
