"""ternq's native CPU kernels (``ternq/runtime/csrc/ternq_kernels.c``): built once per machine, loaded with ctypes, optional.

Why C and ctypes rather than a torch C++ extension: the kernels need no torch headers (they work on the raw
memory of contiguous float32 / int8 / int32 tensors), so one C file compiles in about a second instead of the
30-60 s of a ``torch.utils.cpp_extension`` build, does not depend on torch's C++ ABI, and can be built lazily on
first use without a noticeable first-call tax. ``make venv`` builds it ahead of time (`main`).

The shared library is cached under ``$TERNQ_CACHE`` (default ``$XDG_CACHE_HOME/ternq`` or ``~/.cache/ternq``),
named by a hash of the source, the compiler and its flags, and written atomically (compiled to a temporary
name, then renamed), so concurrent processes never load a half-written file. Loading a shared library runs its
code, so the cache trusts nothing it did not check (docs/runtime.md):

* the directory is created 0700 and refused (with a warning naming it and the fix) when it is a symbolic link,
  not owned by the current user, or writable by group or others; the library and its record likewise, opened
  without following symbolic links;
* beside each library, a record of its size and sha256 written at build: a library that does not match it
  (truncated, replaced) is rebuilt instead of loaded (a truncated library crashed the process with SIGBUS);
* the compiler runs with a timeout (``$TERNQ_BUILD_TIMEOUT``, default 60 s) and is killed with its children
  when it passes it; a compiler that "succeeds" without writing a library caches nothing.

Without a C compiler, with a failed or refused build, with ``TERNQ_NATIVE=0`` or off CPU, every caller falls
back to the eager torch code (slower, same results within the documented tolerance): `available()` says
which, `status()` says why. ``$CC`` (or `build`'s ``cc``) picks the compiler.

``TERNQ_NATIVE_ARCH`` sets the ``-march`` of the build (default ``native``); ``haswell`` emulates an AVX2 CPU
without VNNI / AVX-512 (benchmarks/bench_runtime.py --emulate-avx2), ``x86-64`` the portable loops.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..qat.quantizers import register_activation_kernel

__all__ = ["NATIVE_ENV", "ARCH_ENV", "CACHE_ENV", "BUILD_TIMEOUT_ENV", "available", "status", "build", "library",
           "cpu_flags", "vnni", "num_threads", "packed_isa", "PACKED_ISAS", "gemm_isa", "GEMM_ISAS"]

NATIVE_ENV = "TERNQ_NATIVE"
ARCH_ENV = "TERNQ_NATIVE_ARCH"
CACHE_ENV = "TERNQ_CACHE"
BUILD_TIMEOUT_ENV = "TERNQ_BUILD_TIMEOUT"
_DEFAULT_TIMEOUT = 60.0  # seconds; the build takes about 1 s
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_STALE_TEMP_S = 3600  # temporary files of builds killed without cleanup (SIGKILL, power loss) older than this go
_SOURCE = Path(__file__).parent / "csrc" / "ternq_kernels.c"
# one library from these translation units (ternq_packed.c: the kernels on 2-bit rows, storage="packed"; ternq_gemm.c:
# Linear on many tokens), which share ternq_internal.h (tq_parallel_for)
_SOURCES = (_SOURCE, _SOURCE.with_name("ternq_packed.c"), _SOURCE.with_name("ternq_gemm.c"),
            _SOURCE.with_name("ternq_act.c"))  # ternq_act.c: QAT's activation fake-quantizer (`fake_quantize`)
_INTERNAL = _SOURCE.with_name("ternq_internal.h")
_HEADER = _SOURCE.with_suffix(".h")  # the ABI number and the prototypes: `_interface` checks the binding against it
_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")

_state: dict[str, object] = {}  # "lib": the loaded CDLL or None, "why": the reason when None, "key": the env
_LOCK = threading.Lock()
_THREAD = threading.local()  # .seen: this thread has asked torch for its thread count (`library`)
_OPENMP_NAMES = ("libgomp", "libiomp5", "libomp")  # runtimes that export GNU OpenMP's GOMP_parallel

_NORMS = {None: 0, "layernorm": 1, "rmsnorm": 2}
_P = ctypes.c_void_p
_I = ctypes.c_int64
_C = ctypes.c_int
_F = ctypes.c_float
_SIGNATURES: dict[str, tuple[object, ...]] = {
    "tq_quantize_channels": (_P, _I, _I, _I, _C, _F, _C, _C, _P, _I, _P, _I, _I),
    "tq_quantize_rows": (_P, _I, _I, _C, _F, _C, _I, _P, _P),
    "tq_tap_sum": (_P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _P, _P, _I),
    "tq_tap_scatter": (_P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I),
    "tq_linear_epilogue": (_P, _I, _I, _C, _P, _P, _C, _P, _P),
    "tq_gemv_s8": (_P, _P, _P, _I, _I, _I, _P, _P),
    "tq_linear_rows": (_P, _I, _I, _C, _F, _C, _I, _P, _P, _I, _P, _C, _P, _P),
    "tq_row_sums": (_P, _I, _I, _P),
    "tq_linear_2bit": (_P, _I, _I, _C, _F, _C, _I, _P, _I, _P, _C, _P, _P),
    "tq_unpack_2bit": (_P, _I, _I, _I, _P),
    "tq_packed_isa": (),
    "tq_quantize_grouped": (_P, _I, _I, _I, _F, _C, _F, _C, _C, _P, _I, _I, _I, _I, _P),
    "tq_conv1d_grouped": (_P, _I, _I, _P, _P, _C, _I, _I, _I, _I, _I, _P, _P, _I, _P, _P, _I),
    "tq_conv_transpose1d_grouped": (_P, _I, _I, _P, _P, _C, _I, _I, _I, _I, _I, _P, _P, _I, _P, _P, _I),
    "tq_conv1d_direct": (_P, _I, _I, _I, _F, _C, _F, _C, _C, _I, _I, _I, _P, _P, _C, _I, _I, _I, _I, _I, _P, _C, _P,
                         _P),
    "tq_conv_transpose1d_direct": (_P, _I, _I, _I, _F, _C, _F, _C, _C, _I, _I, _I, _P, _P, _C, _I, _I, _I, _I, _I, _P,
                                   _C, _P, _P),
    "tq_gemm_pack": (_P, _I, _I, _P, _P),
    "tq_linear_gemm": (_P, _I, _I, _C, _F, _C, _I, _P, _P, _I, _P, _C, _P, _P),
    "tq_linear_gemm_2bit": (_P, _I, _I, _C, _F, _C, _I, _P, _P, _I, _P, _C, _P, _P),
    "tq_gemm_isa": (_C,),
    "tq_set_openmp": (_P, _P),
    "tq_num_threads": (),
    "tq_set_min_work": (_I,),
    "tq_fake_quantize": (_P, _I, _I, _I, _F, _C, _P),
}
_RETURNS_INT = ("tq_quantize_grouped", "tq_conv_transpose1d_grouped", "tq_linear_rows", "tq_row_sums", "tq_num_threads",
                "tq_linear_2bit", "tq_packed_isa", "tq_linear_gemm", "tq_linear_gemm_2bit", "tq_gemm_isa",
                "tq_conv1d_direct", "tq_conv_transpose1d_direct")
_C_TYPES = {"int64_t": _I, "int": _C, "float": _F}  # and every pointer: _P


class NativeInterfaceError(RuntimeError):
    """The ctypes binding here and the prototypes of ``ternq_kernels.h`` disagree: a developer's mistake that
    would pass wrong values or corrupt memory, so it is raised, never degraded to the eager fallback."""


def _interface(header: str) -> tuple[int, dict[str, tuple[object, ...]]]:
    """The ABI number and each function's ctypes argument types, read from the header's text."""
    abi = re.search(r"^#define TQ_ABI_VERSION (\d+)$", header, re.M)
    if abi is None:
        raise NativeInterfaceError(f"{_HEADER.name} defines no TQ_ABI_VERSION")
    functions: dict[str, tuple[object, ...]] = {}
    for ret, name, params in re.findall(r"^(void|int) (tq_\w+)\(([^)]*)\);", header, re.M):
        types = []
        for param in " ".join(params.split()).split(","):
            param = param.strip()
            if param in ("void", ""):
                continue
            c_type = param.rsplit(" ", 1)[0].removeprefix("const ").strip()
            if "*" in param:
                types.append(_P)
            elif c_type in _C_TYPES:
                types.append(_C_TYPES[c_type])
            else:
                raise NativeInterfaceError(f"{_HEADER.name}: {name} takes {param!r}, a type the binding cannot pass")
        functions[name] = (ret, *types)
    return int(abi.group(1)), functions


def _check_interface(header: str) -> int:
    """The ABI number of `header`, after checking that every function bound here is declared there with the
    argument and return types bound here; raises `NativeInterfaceError` naming the first difference."""
    abi, declared = _interface(header)
    for name, args in _SIGNATURES.items():
        ret = "int" if name in _RETURNS_INT else "void"
        if name not in declared:
            raise NativeInterfaceError(f"native.py binds {name}, which {_HEADER.name} does not declare")
        if declared[name] != (ret, *args):
            raise NativeInterfaceError(f"native.py binds {name} as {ret}({', '.join(_ctype_name(a) for a in args)}), "
                                       f"but {_HEADER.name} declares {declared[name][0]}"
                                       f"({', '.join(_ctype_name(a) for a in declared[name][1:])}): fix one of them")
    if declared.get("tq_abi_version") != ("int",):
        raise NativeInterfaceError(f"{_HEADER.name} must declare int tq_abi_version(void)")
    return abi


def _ctype_name(t: object) -> str:
    return getattr(t, "__name__", str(t))


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the OS reports (empty off Linux), read once per process. The int8 kernels' speed
    depends on them (amx_int8 > avx512_vnni > plain AVX2) far more than fp32 speed does: print them beside
    speed figures."""
    return _cpu_flags()


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


class _Untrusted(RuntimeError):
    """The cache holds something ternq must not load (not ours, writable by others, a symbolic link)."""


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ternq"


def _compiler(cc: str | None = None) -> str | None:
    if cc is not None:
        return shutil.which(cc)
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _arch() -> str:
    return os.environ.get(ARCH_ENV, "").strip() or "native"


def _enabled() -> bool:
    """$TERNQ_NATIVE read case-insensitively; unset or empty is on, an unknown value is an error (a typo such as
    ``TERNQ_NATIVE=of`` must not silently leave the kernels on)."""
    value = os.environ.get(NATIVE_ENV, "").strip().lower()
    if value in _OFF:
        return False
    if value in ("", *_ON):
        return True
    raise ValueError(f"{NATIVE_ENV}={os.environ[NATIVE_ENV]!r}: expected one of {', '.join(_ON)} (kernels on) or "
                     f"{', '.join(_OFF)} (off), in any case")


def _timeout(timeout: float | None) -> float:
    if timeout is None:
        raw = os.environ.get(BUILD_TIMEOUT_ENV, "").strip()
        try:
            timeout = float(raw) if raw else _DEFAULT_TIMEOUT
        except ValueError:
            timeout = -1.0
        if not 0 < timeout < float("inf"):
            raise ValueError(f"{BUILD_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    if not 0 < timeout < float("inf"):
        raise ValueError(f"build timeout {timeout!r}: expected a number of seconds > 0")
    return timeout


def _library_path(cc: str) -> Path:
    flags = (*_FLAGS, f"-march={_arch()}")
    cpu = ""
    if _arch() == "native":  # -march=native code is only valid on a CPU with the same features
        cpu = " ".join(sorted(cpu_flags()))
    key = hashlib.sha256("\0".join([*(p.read_text() for p in _SOURCES), _HEADER.read_text(), _INTERNAL.read_text(), cc, *flags, platform.machine(), cpu]).encode())
    return _cache_dir() / f"kernels-{key.hexdigest()[:16]}{'.dll' if sys.platform == 'win32' else '.so'}"


def _record_path(library: Path) -> Path:
    """The build record beside a library: its sha256 and size, written after it."""
    return library.with_name(library.name + ".sha256")


def _unsafe(st: os.stat_result) -> str | None:
    """Why a file or directory with this (lstat) status may hold code planted by someone else; None if it may not."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if os.name == "posix" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_dir(path: Path) -> None:
    """Create the cache directory (mode 0700) if missing; raise `_Untrusted` for one that others could write to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        fix = f"set {CACHE_ENV} to the directory it points to, if that is yours"
        problem = "a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem, fix = "not a directory", f"remove it, or set {CACHE_ENV} to a directory of your own"
    else:
        problem = _unsafe(st)
        fix = (f"remove it, or set {CACHE_ENV} to a directory of your own" if problem and "uid" in problem else
               f"run `chmod go-w {path}`, or set {CACHE_ENV} to a directory of your own")
    if problem:
        raise _Untrusted(f"ternq kernel cache {path} is {problem}: ternq loads compiled code only from a directory "
                         f"that only you can write ({fix})")


def _read_private(path: Path) -> bytes | None:
    """The bytes of a regular file of ours that only we can write, opened without following a symbolic link;
    None when it does not exist."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Untrusted(f"{path} is a symbolic link: ternq loads no library through one (remove it)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        problem = "not a regular file" if not stat.S_ISREG(st.st_mode) else _unsafe(st)
        if problem:
            raise _Untrusted(f"{path} is {problem}: ternq loads no library that others could have written "
                             "(remove it)")
        return f.read()


def _verify(library: Path) -> str | None:
    """None when `library` is the file its build recorded (size and sha256), else what differs."""
    data = _read_private(library)
    if data is None:
        return "missing"
    record = _read_private(_record_path(library))
    if record is None:
        return "no build record"
    try:
        digest, size = record.decode("ascii").split()
        expected = int(size)
    except (UnicodeDecodeError, ValueError):
        return "unreadable build record"
    if len(data) != expected:
        return f"{len(data)} bytes, {expected} recorded at build"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its sha256 differs from the one recorded at build"
    return None


def _run(cmd: list[str], timeout: float) -> None:
    """Run the compiler; on a timeout or an interrupt kill it with its children (cc runs cc1, as, ld: killing cc
    alone would leave them running, and holding the pipes open)."""
    posix = os.name == "posix"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=posix)
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        try:
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
            else:
                proc.kill()
        except OSError:
            pass
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"{cmd[0]} did not finish in {timeout:g} s and was killed (a longer limit: "
                               f"${BUILD_TIMEOUT_ENV} seconds)") from None
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {proc.returncode}):\n{err.strip()}")


def _sweep(directory: Path) -> None:
    """Remove temporary files of builds that were killed before they could clean up."""
    now = time.time()
    for p in directory.glob("kernels-*.tmp"):
        try:
            if now - p.lstat().st_mtime > _STALE_TEMP_S:
                p.unlink()
        except OSError:
            pass


def build(force: bool = False, *, cc: str | None = None, timeout: float | None = None) -> Path:
    """Compile the kernels into the cache (unless a verified build is there) and return the library's path.

    Args:
        force: rebuild even if the cache holds a verified library.
        cc: the C compiler (default ``$CC``, else cc, gcc, clang on the PATH).
        timeout: seconds the compiler may run (default ``$TERNQ_BUILD_TIMEOUT``, else 60).

    Raises RuntimeError with the compiler's message when there is no compiler, the build fails or times out, or
    the cache directory is not private to the user (the message names it and the fix)."""
    compiler = _compiler(cc)
    if compiler is None:
        raise RuntimeError(f"C compiler {cc!r} not found" if cc is not None else
                           "no C compiler found (set $CC, or install gcc / clang)")
    limit = _timeout(timeout)
    path = _library_path(compiler)
    _private_dir(path.parent)
    if not force:
        why = _verify(path)
        if why is None:
            return path
        if why not in ("missing", "no build record"):
            warnings.warn(f"ternq: the cached kernel library {path} is not the one that was built ({why}); "
                          "rebuilding it", RuntimeWarning, stacklevel=2)
    _sweep(path.parent)
    record = _record_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + "-", suffix=".tmp")
    os.close(fd)
    tmp_record = tmp + ".sha256.tmp"
    try:
        _run([compiler, *_FLAGS, f"-march={_arch()}", *map(str, _SOURCES), "-o", tmp, "-lm"], limit)
        with open(tmp, "rb") as f:
            data = f.read()
        if not data:
            raise RuntimeError(f"{compiler} exited 0 but wrote no library (an empty {tmp})")
        os.chmod(tmp, 0o755)  # not the umask's: a group-writable library (umask 002) would be refused
        fd = os.open(tmp_record, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.chmod(tmp_record, 0o644)
            f.write(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")
        os.replace(tmp, path)  # atomic: another process sees the old name or the whole new file
        os.replace(tmp_record, record)  # after the library: a reader without a matching record rebuilds
    finally:
        for name in (tmp, tmp_record):
            if os.path.lexists(name):
                os.unlink(name)
    return path


def _load() -> ctypes.CDLL | None:
    if not _enabled():
        _state["why"] = f"disabled by {NATIVE_ENV}={os.environ.get(NATIVE_ENV)}"
        return None
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
        if lib.tq_abi_version() != _check_interface(_HEADER.read_text()):
            raise RuntimeError("stale library")
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int if name in _RETURNS_INT else None
    except _Untrusted as exc:
        warnings.warn(f"{exc}; ternq runs its eager torch kernels instead", RuntimeWarning, stacklevel=4)
        _state["why"] = f"native kernels refused, eager torch fallback: {exc}"
        return None
    except NativeInterfaceError:
        raise
    except (OSError, RuntimeError, AttributeError) as exc:
        _state["why"] = f"native kernels unavailable, eager torch fallback: {exc}"
        return None
    runtime = _openmp_runtime()
    if runtime is None:
        lib.tq_set_openmp(None, None)
        threads = "serial: torch uses no OpenMP runtime that exports GOMP_parallel"
    else:
        where, parallel, max_threads = runtime
        lib.tq_set_openmp(parallel, max_threads)
        threads = f"threads: torch's OpenMP runtime {where}"
    _state["why"] = f"loaded {path} ({threads})"
    return lib


def _openmp_runtime() -> tuple[str, int, int] | None:
    """The OpenMP runtime torch runs its parallel regions on (its path, and the addresses of GOMP_parallel and
    omp_get_max_threads), or None. One runtime means one pool of worker threads for torch and the kernels.

    The symbols are looked up through libtorch_cpu's own handle, which searches the libraries torch links, so a
    second OpenMP runtime another package loaded (llama.cpp's and scikit-learn's bring the system libgomp) is
    never taken for torch's: its thread count is not the one `torch.set_num_threads` sets. Without
    libtorch_cpu in torch/lib, the runtimes the process has loaded and torch/lib's copies are tried in turn."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    paths = [str(p) for p in sorted(lib_dir.glob("libtorch_cpu.*"))]
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if path.startswith("/") and Path(path).name.startswith(_OPENMP_NAMES) and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    paths += [str(p) for name in _OPENMP_NAMES for p in sorted(lib_dir.glob(name + "*")) if str(p) not in paths]
    for path in paths:
        try:
            runtime = ctypes.CDLL(path)
            parallel, max_threads = runtime.GOMP_parallel, runtime.omp_get_max_threads
        except (OSError, AttributeError):
            continue
        address = ctypes.cast(parallel, _P).value
        return _defining_file(address) or path, address, ctypes.cast(max_threads, _P).value  # type: ignore[return-value]
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", _P), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", _P)]


def _defining_file(address: int | None) -> str | None:
    """The file a loaded symbol's code lives in (glibc's dladdr), for the status line; None where unknown."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    info = _DlInfo()
    dladdr.argtypes = [_P, ctypes.POINTER(_DlInfo)]
    if not address or not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the callers' eager fallback runs); built on the first call if needed.

    Raises ValueError for a value of ``$TERNQ_NATIVE`` that is neither on nor off."""
    key = (os.environ.get(NATIVE_ENV), os.environ.get(ARCH_ENV))
    if _state.get("key", ()) != key:  # (re)decide when $TERNQ_NATIVE or $TERNQ_NATIVE_ARCH change
        with _LOCK:
            if _state.get("key", ()) != key:
                _state["lib"] = _load()
                _state["key"] = key
    if not getattr(_THREAD, "seen", False):
        # torch gives a new thread its set_num_threads count on the thread's first parallel region; asking torch
        # for it does that too, so the kernels' first call in this thread already uses it
        torch.get_num_threads()
        _THREAD.seen = True
    return _state["lib"]  # type: ignore[return-value]


def num_threads() -> int:
    """The threads a native kernel may use in this thread: ``torch.get_num_threads()`` where the kernels share
    torch's OpenMP runtime, else 1 (print it beside speed figures)."""
    lib = library()
    return 1 if lib is None else int(lib.tq_num_threads())


def vnni() -> bool:
    """Whether the kernels are built for this CPU's VNNI instructions (vpdpbusd): ``-march=native`` on a CPU
    that has them. The kernel picker's thresholds depend on it."""
    return _vnni(os.environ.get(ARCH_ENV))


@functools.cache
def _vnni(arch: str | None) -> bool:
    return _arch() == "native" and bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


PACKED_ISAS = ("portable", "avx2", "avx_vnni", "avx512_vnni")


def packed_isa() -> str | None:
    """The inner loop of the kernels on 2-bit rows in this build (one of `PACKED_ISAS`), None without the native
    kernels: what the default storage is chosen by (`ternq.runtime.picker.choose_storage`)."""
    lib = library()
    if lib is None:
        return None
    isa = _state.get("packed_isa")
    if isa is None or _state.get("packed_isa_lib") is not lib:
        isa = _state["packed_isa"] = PACKED_ISAS[lib.tq_packed_isa()]
        _state["packed_isa_lib"] = lib
    return isa  # type: ignore[return-value]


GEMM_ISAS = ("portable", "avx512_vnni", "amx")


def gemm_isa(cap: str | None = None) -> str | None:
    """The inner loop of the tiled GEMM (``int8_tiled``, csrc/ternq_gemm.c) in this build and process, one of
    `GEMM_ISAS` (AMX needs the OS's grant, asked once); None without the native kernels. `cap` limits it to that
    loop or a simpler one from now on, for every caller in the process (tests run each loop the build has)."""
    lib = library()
    if lib is None:
        return None
    if cap is not None and cap not in GEMM_ISAS:
        raise ValueError(f"gemm_isa(cap={cap!r}): expected one of {GEMM_ISAS}")
    return GEMM_ISAS[lib.tq_gemm_isa(-1 if cap is None else GEMM_ISAS.index(cap))]


def available() -> bool:
    """Whether the native kernels are in use in this process."""
    return library() is not None


def status() -> str:
    """One line: which kernels run, and why (print it beside speed figures)."""
    library()
    return str(_state.get("why"))


# --- tensor wrappers: CPU tensors of the stated dtypes; the outputs they write into (q, s, y, full) must be
# laid out as stated (the callers allocate them), the inputs are made contiguous where a kernel needs it -------


def _rows_call(x: Tensor, k: int, n: int, two_bit: bool, w: Tensor, name: str) -> tuple[Tensor, Tensor, int, int]:
    """A bound Linear call's input checked (float32, K features; 2-bit rows: the last plane's padding allowed) and
    made contiguous, its output (..., n) allocated in final shape, and its row count and K."""
    shape = x.shape
    kx = shape[-1] if shape else -1
    if not (k - 4 < kx <= k if two_bit else kx == k) or x.dtype != torch.float32:
        raise ValueError(f"{name}: x {tuple(shape)} {x.dtype} does not fit the weight {tuple(w.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    if not _THREAD.__dict__.get("seen"):
        library()  # this thread's first call: its thread count (`library`)
    y = torch.empty((*shape[:-1], n), dtype=torch.float32)
    return x, y, (y.numel() // n if n else x.numel() // max(kx, 1)), kx


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantize_channels(x: Tensor, norm: str | None, eps: float, bits: int, per_sample: bool, q: Tensor,
                      s: Tensor, offset: int) -> None:
    """x (B, C, T) float32 -> codes q[:, :, offset:offset+T] (q: (B, C, ldq) int8) and scales
    s[:, offset:offset+T] (s: (B, lds) float32; per sample: s[:, 0])."""
    lib = library()
    assert lib is not None
    x = x.contiguous()
    assert q.is_contiguous() and s.is_contiguous()
    b, c, t = x.shape
    lib.tq_quantize_channels(x.data_ptr(), b, c, t, _NORMS[norm], eps, bits, int(per_sample), q.data_ptr(),
                             q.shape[-1], s.data_ptr(), s.shape[-1], offset)


def quantize_rows(x: Tensor, norm: str | None, eps: float, bits: int, rows_per_sample: int, q: Tensor,
                  s: Tensor) -> None:
    """x (R, C) float32 -> codes q (R, C) int8 and per-row scales s (R,) float32 (equal within a sample)."""
    lib = library()
    assert lib is not None
    x = x.contiguous()
    assert q.is_contiguous() and s.is_contiguous()
    r, c = x.shape
    lib.tq_quantize_rows(x.data_ptr(), r, c, _NORMS[norm], eps, bits, max(rows_per_sample, 1), q.data_ptr(),
                         s.data_ptr())


def tap_sum(acc: Tensor, k: int, s: Tensor, n: int, stride: int, dilation: int, wscale: Tensor | None,
            per_channel: bool, bias: Tensor | None, y: Tensor) -> None:
    """y (out, >= n, row stride y.stride(0)) = per-step-scaled sum of the k tap planes of acc (k * out, W)."""
    lib = library()
    assert lib is not None
    assert acc.is_contiguous() and s.stride(-1) == 1 and y.stride(-1) == 1
    out = acc.shape[0] // k
    lib.tq_tap_sum(acc.data_ptr(), k, out, acc.shape[1], s.data_ptr(), n, stride, dilation, _ptr(wscale),
                   int(per_channel), _ptr(bias), y.data_ptr(), y.stride(0))


def tap_scatter(acc: Tensor, k: int, s: Tensor, n: int, stride: int, dilation: int, full: Tensor,
                start: int) -> None:
    """Overlap-add the k tap planes of acc (k * out, W), scaled per input step, into full (out, L) at start."""
    lib = library()
    assert lib is not None
    assert acc.is_contiguous() and s.stride(-1) == 1 and full.is_contiguous()
    lib.tq_tap_scatter(acc.data_ptr(), k, acc.shape[0] // k, acc.shape[1], s.data_ptr(), n, stride, dilation,
                       full.data_ptr(), full.shape[1], start)


def linear_epilogue(acc: Tensor, transposed: bool, s: Tensor, wscale: Tensor, per_channel: bool,
                    bias: Tensor | None) -> Tensor:
    """float32 (M, N) = acc * s[m] * wscale + bias, from acc (M, N) int32 or its transpose (N, M)."""
    lib = library()
    assert lib is not None
    acc, s, wscale = acc.contiguous(), s.contiguous(), wscale.contiguous()
    m, n = (acc.shape[1], acc.shape[0]) if transposed else acc.shape
    y = torch.empty(m, n, dtype=torch.float32)
    lib.tq_linear_epilogue(acc.data_ptr(), m, n, int(transposed), s.data_ptr(), wscale.data_ptr(),
                           int(per_channel), _ptr(bias), y.data_ptr())
    return y


def gemv(x: Tensor, w: Tensor, wsum: Tensor | None) -> Tensor:
    """int32 (M, N) = x (M, K) int8 @ w (N, K) int8 ^T, for a few rows M; `wsum` = w.sum(1) as int32 selects
    the unsigned x signed byte products (vpdpbusd; without VNNI vpmaddubsw, exact only for |w| <= 64)."""
    lib = library()
    assert lib is not None
    x, w = x.contiguous(), w.contiguous()
    m, k = x.shape
    acc = torch.empty(m, w.shape[0], dtype=torch.int32)
    xu = torch.empty(m * k, dtype=torch.uint8) if wsum is not None else None
    lib.tq_gemv_s8(x.data_ptr(), w.data_ptr(), _ptr(wsum), m, w.shape[0], k, _ptr(xu), acc.data_ptr())
    return acc


def linear_rows(x: Tensor, norm: str | None, eps: float, bits: int, rows_per_sample: int, w: Tensor,
                wsum: Tensor | None, wscale: Tensor, per_channel: bool, bias: Tensor | None) -> Tensor:
    """float32 (..., N): a packed Linear on the rows x (..., K) float32 in one call (quantize, GEMV, rescale, bias);
    w (N, K) int8 codes with wsum their row sums (int32; None: the plain signed-byte loop), or (N, ceil(K / 4))
    uint8 2-bit rows of `ternq.runtime.storage.pack_rows`, read as stored (``tq_linear_2bit``: decoded in
    registers, never unpacked to memory; wsum unused): equal bit for bit."""
    return linear_rows_bound(norm, eps, bits, w, wsum, wscale, per_channel, bias)(x, rows_per_sample)


def linear_rows_bound(norm: str | None, eps: float, bits: int, w: Tensor, wsum: Tensor | None, wscale: Tensor,
                      per_channel: bool, bias: Tensor | None) -> Callable[[Tensor, int], Tensor]:
    """`linear_rows` with a layer's constant arguments bound once: ``call(x, rows_per_sample=1)`` on x (..., K) of
    any rank, the output (..., N) allocated in its final shape. A one-token layer's call then costs the ctypes
    call and the output's allocation only (no reshape, view or wrapper per call: a decode step makes one call per
    matrix). The returned function keeps the tensors it was given alive (their memory is what it passes): bind
    again when the layer's tensors change."""
    lib = library()
    assert lib is not None
    two_bit = w.dtype == torch.uint8
    fn = lib.tq_linear_2bit if two_bit else lib.tq_linear_rows
    for name, t in (("w", w), ("wsum", wsum), ("wscale", wscale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"linear_rows_bound: {name} must be contiguous")
    n, stored = w.shape
    k = stored * 4 if two_bit else stored  # the 2-bit rows hold up to 3 codes of padding
    norm_id, w_ptr, sum_ptr = _NORMS[norm], w.data_ptr(), _ptr(wsum)
    scale_ptr, channel, bias_ptr = wscale.data_ptr(), int(per_channel), _ptr(bias)
    keep = (w, wsum, wscale, bias)  # the memory the pointers above point into

    def call(x: Tensor, rows_per_sample: int = 1) -> Tensor:
        x, y, r, kx = _rows_call(x, k, n, two_bit, w, "linear_rows")
        if two_bit:
            status = fn(x.data_ptr(), r, kx, norm_id, eps, bits, rows_per_sample, w_ptr, n, scale_ptr, channel,
                        bias_ptr, y.data_ptr())
        else:
            status = fn(x.data_ptr(), r, kx, norm_id, eps, bits, rows_per_sample, w_ptr, sum_ptr, n, scale_ptr,
                        channel, bias_ptr, y.data_ptr())
        if status != 0:
            raise MemoryError("native linear_rows: out of memory")
        return y

    call.keep = keep  # type: ignore[attr-defined]
    return call


def gemm_pack(w: Tensor) -> tuple[Tensor, Tensor]:
    """The codes w (N, K) int8 packed for `linear_gemm_bound` (csrc/ternq_gemm.c: blocks of 16 output channels,
    K padded to 64; about N x K bytes) and their row sums (int32, N padded to 16)."""
    lib = library()
    assert lib is not None
    w = w.contiguous()
    n, k = w.shape
    np_, kp = -(-n // 16) * 16, -(-k // 64) * 64
    wp = torch.empty(np_ * kp, dtype=torch.int8)
    wsum = torch.empty(np_, dtype=torch.int32)
    lib.tq_gemm_pack(w.data_ptr(), n, k, wp.data_ptr(), wsum.data_ptr())
    return wp, wsum


def linear_gemm_bound(norm: str | None, eps: float, bits: int, w: Tensor, wscale: Tensor, per_channel: bool,
                      bias: Tensor | None) -> Callable[..., Tensor]:
    """A Linear on many rows in one native call: ``call(x, rows_per_sample=1)`` quantizes x (..., K) float32 of any
    rank (the output (..., N) allocated in its final shape, as `linear_rows_bound`'s), multiplies and rescales
    (+ bias); the output equals `linear_rows`' (and the ``int8_gemm`` kernel's) bit for bit. w is
    either the codes (N, K) int8, packed once here (`gemm_pack`: a copy of about N x K bytes), or their 2-bit rows
    (N, ceil(K / 4)) uint8 (`ternq.runtime.storage.pack_rows`), read as stored (``tq_linear_gemm_2bit`` decodes
    them per thread into a cache-sized panel): only their row sums are added (4 bytes per output channel). The
    returned function holds what it passes the addresses of: bind again when the layer's tensors change."""
    lib = library()
    assert lib is not None
    for name, t in (("w", w), ("wscale", wscale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"linear_gemm_bound: {name} must be contiguous")
    two_bit = w.dtype == torch.uint8
    n, stored = w.shape
    if two_bit:
        wp, wsum = w, _row_sums_2bit(w)
        fn = lib.tq_linear_gemm_2bit
    else:
        wp, wsum = gemm_pack(w)
        fn = lib.tq_linear_gemm
    k = stored * 4 if two_bit else stored  # the 2-bit rows hold up to 3 codes of padding
    norm_id, wp_ptr, sum_ptr = _NORMS[norm], wp.data_ptr(), wsum.data_ptr()
    scale_ptr, channel, bias_ptr = wscale.data_ptr(), int(per_channel), _ptr(bias)

    def call(x: Tensor, rows_per_sample: int = 1) -> Tensor:
        x, y, r, kx = _rows_call(x, k, n, two_bit, w, "linear_gemm")
        if fn(x.data_ptr(), r, kx, norm_id, eps, bits, rows_per_sample, wp_ptr, sum_ptr, n, scale_ptr, channel,
              bias_ptr, y.data_ptr()) != 0:
            raise MemoryError("native linear_gemm: out of memory")
        return y

    call.keep = (wp, wsum, wscale, bias)  # type: ignore[attr-defined]
    return call


def _row_sums_2bit(w2: Tensor, rows: int = 256) -> Tensor:
    """Row sums (int32, N rounded up to 16 entries, 0 past N) of 2-bit rows w2 (N, W) uint8, decoded `rows` rows
    at a time (a transient of rows x 4W bytes: the layer never holds its int8 codes)."""
    n, width = w2.shape
    sums = torch.zeros(-(-n // 16) * 16, dtype=torch.int32)
    tile = torch.empty(min(rows, n), width * 4, dtype=torch.int8)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        unpack_2bit(w2, width * 4, r0, r1, tile[: r1 - r0])
        sums[r0:r1] = row_sums(tile[: r1 - r0])[0]
    return sums


def unpack_2bit(w2: Tensor, k: int, r0: int, r1: int, out: Tensor) -> None:
    """Rows [r0, r1) of 2-bit rows w2 (N, ceil(K / 4)) uint8 as int8 codes into out (r1 - r0, K), contiguous: a
    tile of the weight for the int8 GEMM, decoded where it is read."""
    lib = library()
    assert w2.dtype == torch.uint8 and w2.is_contiguous() and out.is_contiguous() and out.shape == (r1 - r0, k)
    assert out.dtype == torch.int8 and 0 <= r0 <= r1 <= w2.shape[0] and w2.shape[1] == -(-k // 4)
    lib.tq_unpack_2bit(w2.data_ptr(), k, r0, r1, out.data_ptr())  # type: ignore[union-attr]


def row_sums(w: Tensor) -> tuple[Tensor, int]:
    """Row sums (int32) of int8 codes w (N, K) and their largest magnitude, without temporaries."""
    lib = library()
    assert lib is not None
    w = w.contiguous()
    sums = torch.empty(w.shape[0], dtype=torch.int32)
    wmax = lib.tq_row_sums(w.data_ptr(), w.shape[0], w.shape[1], sums.data_ptr())
    return sums, int(wmax)


def quantize_grouped(x: Tensor, norm: str | None, eps: float, bits: int, per_sample: bool, in_g: int,
                     left: int, right: int, slope: float | None = None) -> tuple[Tensor, Tensor]:
    """x (B, C, T) float32 -> codes + 128 in the grouped layout (B, groups, C4, Tp, 4) uint8 (C4 = in_g / 4
    rounded up, Tp = left + T + right, padding = code 0) and per-step scales (B, Tp) float32 (0 in the padding;
    per sample, the sample's scale in every step). `slope`: the codes of ``F.leaky_relu(x, slope)``, bit for
    bit, without that tensor."""
    lib = library()
    assert lib is not None
    x = x.contiguous()
    b, c, t = x.shape
    c4, tp = -(-in_g // 4), left + t + right
    xg = torch.empty(b, c // in_g, c4, tp, 4, dtype=torch.uint8)
    s = torch.empty(b, tp, dtype=torch.float32)
    if lib.tq_quantize_grouped(x.data_ptr(), b, c, t, 1.0 if slope is None else slope, _NORMS[norm], eps, bits,
                               int(per_sample), xg.data_ptr(), in_g, c4, tp, left, s.data_ptr()) != 0:
        raise MemoryError("tq_quantize_grouped: out of memory for the leaky ReLU's block buffers")
    return xg, s


class ConvWeights(NamedTuple):
    """A convolution's codes as the direct kernels read them, made once per layer (`conv_weights`)."""

    wg: Tensor  # (k, out rounded up to 8, in rounded up to 4) int8, zero padded
    wsum: Tensor  # (k * rows,) int32: each row's sum, for the +128 of the unsigned activation bytes
    wmax: int  # the largest |code|: the AVX2 loop (int16 pair sums) is exact up to 64
    out: int
    n_in: int


def conv_weights(w: Tensor) -> ConvWeights:
    """`ConvWeights` of codes w (k, out, in) int8: w itself where out is a multiple of 8 and in of 4 (no copy),
    else a zero-padded copy."""
    k, out, n_in = w.shape
    rows, cols = -(-out // 8) * 8, -(-n_in // 4) * 4
    if (rows, cols) == (out, n_in):
        wg = w.contiguous()
    else:
        wg = torch.zeros(k, rows, cols, dtype=torch.int8)
        wg[:, :out, :n_in] = w
    wmax = int(w.to(torch.int16).abs().max()) if w.numel() else 0
    return ConvWeights(wg, wg.sum(-1, dtype=torch.int32).reshape(-1), wmax, out, n_in)


def transpose_phases(k: int, up: int) -> list[int]:
    """The taps of a transposed convolution (k taps, upsampling `up`, dilation 1) in the order its direct kernel
    reads them: phase r = 0 .. up - 1 (the output steps t with t + padding = r mod up), each phase's taps
    r + (L_r - 1 - l) * up for l = 0 .. L_r - 1."""
    order = []
    for r in range(min(up, k)):
        taps = -(-(k - r) // up)
        order.extend(r + (taps - 1 - i) * up for i in range(taps))
    return order


def conv_transpose_padding(k: int, up: int, padding: int, t_in: int, t_out: int) -> tuple[int, int]:
    """The zero steps (left, right) around a transposed convolution's input that its direct kernel reads: the
    taps of phase 0 less one on the left, enough on the right for the last output step of every phase."""
    lmax = -(-k // up)
    last = max((t_out + padding - r + up - 1) // up for r in range(up))  # one past the last input block
    return lmax - 1, max(0, last - t_in)


def _conv_args(xg: Tensor, weights: ConvWeights, s: Tensor, wscale: Tensor | None, per_channel: bool,
               bias: Tensor | None, y: Tensor) -> tuple[int, int]:
    assert xg.is_contiguous() and s.is_contiguous() and y.stride(-1) == 1 and weights.wg.is_contiguous()
    assert weights.wg.shape[-1] == xg.shape[-3] * 4 and s.shape[-1] == xg.shape[-2]
    assert wscale is None or wscale.is_contiguous() and wscale.numel() >= (weights.out if per_channel else 1)
    assert bias is None or bias.is_contiguous() and bias.numel() >= weights.out
    assert y.dtype == torch.float32 and y.shape[0] >= weights.out
    return xg.shape[-3], xg.shape[-2]


def conv1d_grouped(xg: Tensor, weights: ConvWeights | Tensor, k: int, dilation: int, stride: int, t_out: int,
                   s: Tensor, wscale: Tensor | None, per_channel: bool, bias: Tensor | None, y: Tensor) -> None:
    """y (out, t_out), rows y.stride(0) apart, = the int8 convolution of grouped codes xg (C4, Tp, 4) with the
    weight codes (`ConvWeights`, or codes (k, out, in) int8 packed for this call), each tap's products scaled by
    the per-step scales s (Tp,) of the steps they read, then by wscale (per channel / tensor) plus bias."""
    lib = library()
    assert lib is not None
    if isinstance(weights, Tensor):
        weights = conv_weights(weights)
    c4, tp = _conv_args(xg, weights, s, wscale, per_channel, bias, y)
    assert weights.wg.shape[0] == k and (t_out - 1) * stride + dilation * (k - 1) < tp
    lib.tq_conv1d_grouped(xg.data_ptr(), c4, tp, weights.wg.data_ptr(), weights.wsum.data_ptr(), weights.wmax,
                          weights.out, k, dilation, stride, t_out, s.data_ptr(), _ptr(wscale), int(per_channel),
                          _ptr(bias), y.data_ptr(), y.stride(0))


def conv_transpose1d_grouped(xg: Tensor, weights: ConvWeights, up: int, padding: int, t_out: int, s: Tensor,
                             wscale: Tensor | None, per_channel: bool, bias: Tensor | None, y: Tensor) -> None:
    """y (out, t_out) = the transposed convolution (stride `up`, `padding`, dilation 1) of grouped codes xg
    (C4, Tp, 4) padded as `conv_transpose_padding` says, with the codes in `transpose_phases` order
    (`ConvWeights` of (k, out, in)), per-step scales s (Tp,), then wscale and bias: `up` interleaved stride-1
    convolutions, no tap planes."""
    lib = library()
    assert lib is not None
    c4, tp = _conv_args(xg, weights, s, wscale, per_channel, bias, y)
    if lib.tq_conv_transpose1d_grouped(xg.data_ptr(), c4, tp, weights.wg.data_ptr(), weights.wsum.data_ptr(),
                                       weights.wmax, weights.out, weights.wg.shape[0], up, padding, t_out,
                                       s.data_ptr(), _ptr(wscale), int(per_channel), _ptr(bias), y.data_ptr(),
                                       y.stride(0)) != 0:
        raise ValueError(f"tq_conv_transpose1d_grouped: {tp} input steps do not cover {t_out} output steps of "
                         f"stride {up} (pad the input as conv_transpose_padding says), or stride {up} > 64")


def fake_quantize(x: Tensor, out: Tensor, outer: int, c: int, inner: int, bits: int, eps: float) -> bool:
    """QAT's activation fake-quantizer in one pass: out = round(x / s) * s with s = max(max|x|, eps) / qmax over
    each line of the c elements of x (outer, c, inner) float32 contiguous (out the same; it may be x), bit for bit
    the eager torch form. False without the native kernels (the caller runs that form). Registered with
    `ternq.qat.quantizers.register_activation_kernel` when this module loads."""
    lib = library()
    if lib is None:
        return False
    lib.tq_fake_quantize(x.data_ptr(), outer, c, inner, eps, bits, out.data_ptr())
    return True


register_activation_kernel(fake_quantize)


def conv_direct_bound(weights: list[ConvWeights], transposed: bool, norm: str | None, eps: float, bits: int,
                      per_sample: bool, a: int, b: int, wscale: Tensor, per_channel: bool,
                      bias: Tensor | None) -> Callable[[Tensor, int, int, int, float | None], Tensor]:
    """A Conv1d (`a`, `b` = dilation, stride) or ConvTranspose1d (`a`, `b` = stride, padding; `weights` in
    `transpose_phases` order) ``int8_direct`` layer in one native call, with its constant arguments bound once:
    ``call(x, left, right, t_out, slope)`` quantizes x (B, C, T) float32 with `left` / `right` zero steps (the
    leaky ReLU of `slope` first, unless None) and convolves every sample and group into y (B, groups * out, t_out).
    `weights`: one `ConvWeights` per group, copied into one (groups, ...) tensor unless there is one group. The
    caller computes t_out and the padding (`ternq.runtime.kernels`); the C call checks that they fit. The returned
    function holds what it passes the addresses of."""
    lib = library()
    assert lib is not None
    groups, out_g, k = len(weights), weights[0].out, weights[0].wg.shape[0]
    wg = weights[0].wg.unsqueeze(0) if groups == 1 else torch.stack([w.wg for w in weights])
    wsum = weights[0].wsum.unsqueeze(0) if groups == 1 else torch.stack([w.wsum for w in weights])
    wmax = max(w.wmax for w in weights)
    scale = wscale.to(torch.float32).contiguous()
    bias = None if bias is None else bias.contiguous()
    scales = (out_g if transposed else groups * out_g) if per_channel else 1
    if scale.numel() < scales or (bias is not None and (bias.dtype != torch.float32 or bias.numel() < groups * out_g)):
        raise ValueError(f"conv_direct_bound: {scale.numel()} scales and a bias of {None if bias is None else bias.numel()} "
                         f"do not fit {groups} groups of {out_g} outputs ({scales} scales, a float32 bias of "
                         f"{groups * out_g} or None)")
    fn = lib.tq_conv_transpose1d_direct if transposed else lib.tq_conv1d_direct
    n_in = weights[0].n_in * groups
    norm_id, wg_ptr, ws_ptr, scale_ptr, bias_ptr = _NORMS[norm], wg.data_ptr(), wsum.data_ptr(), scale.data_ptr(), _ptr(bias)
    channel, sample, f32 = int(per_channel), int(per_sample), torch.float32

    def call(x: Tensor, left: int, right: int, t_out: int, slope: float | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[1] != n_in or x.dtype != f32:
            raise ValueError(f"conv_direct: x {tuple(x.shape)} {x.dtype} does not fit the layer's {n_in} float32 "
                             "input channels")
        if not x.is_contiguous():
            x = x.contiguous()
        if not _THREAD.__dict__.get("seen"):
            library()  # this thread's first call: its thread count (`library`)
        batch, c, t = x.shape
        y = torch.empty(batch, groups * out_g, t_out, dtype=f32)
        status = fn(x.data_ptr(), batch, c, t, 1.0 if slope is None else slope, norm_id, eps, bits, sample, groups,
                    left, right, wg_ptr, ws_ptr, wmax, out_g, k, a, b, t_out, scale_ptr, channel, bias_ptr,
                    y.data_ptr())
        if status == -1:
            raise MemoryError("native int8_direct convolution: out of memory")
        if status != 0:
            raise ValueError(f"native int8_direct convolution: {left} + {t} + {right} input steps do not cover "
                             f"{t_out} output steps (a={a}, b={b}, {k} taps)")
        return y

    call.keep = (wg, wsum, scale, bias)  # type: ignore[attr-defined]
    return call


def main(argv: list[str] | None = None) -> int:
    """Build the kernels now and print where (what ``make venv`` runs: ``python -c "from ternq import native;
    native.main([])"``); never fails: without a build the eager kernels run."""
    try:
        path = build(force="--force" in (argv or sys.argv[1:]))
        print(f"ternq native kernels: {path}")
    except (OSError, RuntimeError, ValueError) as exc:  # never fails the install: the eager kernels work everywhere
        print(f"ternq native kernels not built ({exc}); ternq runs its eager torch kernels instead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
