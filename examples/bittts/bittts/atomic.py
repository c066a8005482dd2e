"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Every writer in BitTTS builds its bytes in memory first and hands them here, so the file's bytes never depend on
a temporary file's name and there is one place that gets the temp-file dance right.
"""
from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write", "atomic_torch_save"]


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` through a temp file in the same directory and os.replace (permissions follow
    the umask, unlike mkstemp's 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically; the same object always gives the same bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())
