"""Atomic output files: a reader (or a resumed run) never sees a half-written file, and writing never replaces
what the path names with something of another kind.

Every file ternq and BitTTS write goes through `atomic_open` (`atomic_write` for bytes already in memory), so the
rules live in one place:

* **A regular file, or a new one**: written to a temporary file beside it, fsync'ed, then renamed over it
  (``os.replace``), so the old content stays whole until the new one is. The temporary file is named after the
  target and the writing process (``.<name, at most 64 characters>.<crc32 of the name>.<pid>.<random>.tmp``);
  one left behind by a killed writer is removed by the next write to the same path.
* **An existing file keeps its permissions and owner**: the new file gets the old one's mode (less setuid /
  setgid, which the kernel also clears when a file is written) and, where the process may (as root), its owner
  and group; otherwise its group where the process is a member. A new file gets ``0o666`` less the umask.
* **A character device or a named pipe (FIFO)** is written through, as a shell's ``>`` would: ``-o /dev/null``
  discards, ``-o /dev/stdout`` prints, a FIFO feeds its reader, and the device node is never replaced. Such a
  write is not atomic (its reader sees the bytes as they come).
* **A directory, a block device or a socket** is refused with an OSError naming the path: writing a model or a
  WAV file onto a disk or into a socket is never what an output path means.
* **A symbolic link** is followed: the file it points to is written (atomically, by the rules above, in the
  directory of the link's target) and the link stays a link. A link to a missing file creates that file.

Errors are OSErrors naming the path given, never the temporary file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
import zlib
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_write"]

_REFUSED = ((stat.S_ISDIR, errno.EISDIR, "is a directory"),
            (stat.S_ISBLK, errno.EINVAL, "is a block device: writing over a disk is refused; give a file name"),
            (stat.S_ISSOCK, errno.EINVAL, "is a socket, which cannot be opened as a file; give a file name"))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write `path` through, by the rules of this module.

    For a regular (or new) file: a temporary file in the same directory that replaces `path` when the block ends
    without an error and is removed otherwise, so a writer that streams (a long synthesis, a large model) is as
    atomic as one that writes bytes at once. For a character device or a FIFO: the device itself.
    """
    name = os.fspath(path)
    try:  # follows symlinks, the kernel's /proc ones too (/dev/stdout when it is a pipe)
        st: os.stat_result | None = os.stat(name)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _naming(e, name) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        for test, code, reason in _REFUSED:
            if test(st.st_mode):
                raise (IsADirectoryError if code == errno.EISDIR else OSError)(code, reason, name)
        device = _open_device(name)
        if device is not None:
            with device:
                yield device
            return
    target = os.path.realpath(name)  # a symlink's target is replaced; the link stays
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _naming(e, name) from None
    if not stat.S_ISREG(st.st_mode if st is not None else stat.S_IFREG):
        raise OSError(errno.EINVAL, "changed into something other than a file while being written", name)
    with _replacing(target, name, st) as f:
        yield f


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` by the rules of this module (`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def _open_device(name: str) -> BinaryIO | None:
    """The character device or FIFO at `name` opened for writing, or None if a regular file is there now (the
    check is made on the open descriptor, so a file swapped in after the stat is never written in place)."""
    try:
        fd = os.open(name, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise _naming(e, name) from None
    mode = os.fstat(fd).st_mode
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return os.fdopen(fd, "wb")
    os.close(fd)
    if stat.S_ISREG(mode):
        return None
    raise OSError(errno.EINVAL, "is not a regular file, a character device or a FIFO", name)


@contextlib.contextmanager
def _replacing(target: str, name: str, old: os.stat_result | None) -> Iterator[BinaryIO]:
    """A temporary file beside `target` that replaces it, with `old`'s mode and owner, when the block succeeds."""
    directory, base = os.path.split(target)
    prefix = _temp_prefix(base)
    _remove_stale_temps(directory, prefix)
    tmp = os.path.join(directory, f"{prefix}{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # replacing a file: owner-only until its own mode is set, so its new content is never more readable than
    # its old one; a new file: the umask's mode from the start (reading the umask is not thread-safe)
    create_mode = 0o600 if old is not None else 0o666
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(tmp, flags, create_mode), "wb") as f:
            yield f
            f.flush()
            if old is not None:
                _keep_owner_and_mode(f.fileno(), old)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        _unlink(tmp)
        if e.filename is not None and os.fspath(e.filename) not in (tmp, target):
            raise  # about another file (one the block read), not the one written
        raise _naming(e, name) from None
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_directory(directory)


def _keep_owner_and_mode(fd: int, old: os.stat_result) -> None:
    if hasattr(os, "fchown"):
        here = os.fstat(fd)
        if (here.st_uid, here.st_gid) != (old.st_uid, old.st_gid):
            try:
                os.fchown(fd, old.st_uid, old.st_gid)  # root (or CAP_CHOWN): the old owner and group
            except PermissionError:
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, -1, old.st_gid)  # anyone: the old group, if a member of it
    if os.chmod in os.supports_fd:  # after chown, which may clear setuid / setgid
        os.chmod(fd, stat.S_IMODE(old.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


def _naming(e: OSError, name: str) -> OSError:
    """`e` as raised by the same call on `name` (never the temporary file's or the resolved target's name)."""
    if e.errno is None:  # not from a system call (no file name to replace): as it is
        return e
    return type(e)(e.errno, e.strerror, name)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (power loss); a best effort where directories cannot be opened."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    """``.<name, at most 64 characters>.<crc32 of the name>.``: unique per target, short for any valid name."""
    return f".{name[:64]}.{zlib.crc32(os.fsencode(name)) & 0xFFFFFFFF:08x}."


def _remove_stale_temps(directory: str, prefix: str) -> None:
    """Delete the temporary files of `prefix` whose writing process no longer exists (killed mid-write)."""
    try:
        names = [n for n in os.listdir(directory or ".") if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for entry in names:
        pid = entry[len(prefix):].partition(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_exists(int(pid)):
            continue
        with contextlib.suppress(OSError):  # removed by someone else meanwhile, or not ours to remove
            os.unlink(os.path.join(directory, entry))


def _process_exists(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or an odd number): leave its file alone
    return True
