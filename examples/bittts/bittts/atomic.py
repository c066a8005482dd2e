"""Atomic file writes: a reader (or a resumed run) never sees a half-written file.

Every writer in BitTTS builds its bytes in memory first and hands them here, so the file's bytes never depend on
a temporary file's name and there is one place that gets the temp-file dance right: the temp file lies beside
the target, is named after it (shortened, so any valid target name works) and after the writing process, and a
temp file of the same target left by a killed writer is removed by the next write.
"""
from __future__ import annotations

import contextlib
import io
import os
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_open", "atomic_write", "atomic_torch_save"]


def _temp_prefix(path: Path) -> str:
    """``.<name, at most 64 characters>.<crc32 of the name>.`` : unique per target, short for any name."""
    name = path.name
    return f".{name[:64]}.{zlib.crc32(os.fsencode(name)) & 0xFFFFFFFF:08x}."


def _remove_stale_temps(directory: Path, prefix: str) -> None:
    """Delete temp files of this target whose writing process no longer exists (killed mid-write)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].partition(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or os.name != "posix":
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive: a concurrent writer's file
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(directory / name)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temp file in the same directory that replaces `path` (fsync +
    os.replace) when the block ends without an error, and is removed otherwise, so a writer that streams (a long
    synthesis) is as atomic as `atomic_write`. An OSError names `path`, never the temp file."""
    path = Path(path)
    prefix = _temp_prefix(path)
    _remove_stale_temps(path.parent, prefix)
    tmp = path.with_name(f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None and os.fspath(e.filename) != os.fspath(tmp):
            raise  # about another file (read by the block), not the one written
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to `path` through a temp file in the same directory and os.replace (permissions follow
    the umask, unlike mkstemp's 0600). An OSError names `path`, never the temp file."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically; the same object always gives the same bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())
