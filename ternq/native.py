"""ternq's native CPU kernels (``ternq/_kernels.c``): built once per machine, loaded with ctypes, optional.

Why C and ctypes rather than a torch C++ extension: the kernels need no torch headers (they work on the raw
memory of contiguous float32 / int8 / int32 tensors), so one C file compiles in about a second instead of the
30-60 s of a ``torch.utils.cpp_extension`` build, does not depend on torch's C++ ABI, and can be built lazily on
first use without a noticeable first-call tax. ``make venv`` builds it ahead of time (`main`).

The shared library is cached under ``$TERNQ_CACHE`` (default ``$XDG_CACHE_HOME/ternq`` or ``~/.cache/ternq``),
named by a hash of the source, the compiler and its flags, and written atomically (compiled to a temporary
name, then renamed), so concurrent processes never load a half-written file. Without a C compiler, with a
failed build, with ``TERNQ_NATIVE=0`` or off CPU, every caller falls back to the eager torch code (slower,
same results within the documented tolerance): `available()` says which, `status()` says why.

``TERNQ_NATIVE_ARCH`` sets the ``-march`` of the build (default ``native``); ``haswell`` emulates an AVX2 CPU
without VNNI / AVX-512 (benchmarks/bench_runtime.py --emulate-avx2).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["NATIVE_ENV", "ARCH_ENV", "CACHE_ENV", "available", "status", "build", "library", "cpu_flags", "vnni"]

NATIVE_ENV = "TERNQ_NATIVE"
ARCH_ENV = "TERNQ_NATIVE_ARCH"
CACHE_ENV = "TERNQ_CACHE"
_SOURCE = Path(__file__).with_name("_kernels.c")
_ABI = 4
_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")

_state: dict[str, object] = {}  # "lib": the loaded CDLL or None, "why": the reason when None

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
    "tq_linear_rows": (_P, _I, _I, _C, _F, _C, _I, _P, _C, _P, _I, _P, _C, _P, _P),
    "tq_row_sums": (_P, _I, _I, _P),
    "tq_quantize_grouped": (_P, _I, _I, _I, _C, _F, _C, _C, _P, _I, _I, _I, _I, _P),
    "tq_conv1d_grouped": (_P, _I, _I, _P, _I, _I, _I, _I, _I, _I, _P, _P, _I, _P, _P, _I),
}


def cpu_flags() -> set[str]:
    """The CPU feature flags the OS reports (empty off Linux). The int8 kernels' speed depends on them
    (amx_int8 > avx512_vnni > plain AVX2) far more than fp32 speed does: print them beside speed figures."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ternq"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _arch() -> str:
    return os.environ.get(ARCH_ENV, "").strip() or "native"


def _library_path(cc: str) -> Path:
    flags = (*_FLAGS, f"-march={_arch()}")
    cpu = ""
    if _arch() == "native":  # -march=native code is only valid on a CPU with the same features
        cpu = " ".join(sorted(cpu_flags()))
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), cc, *flags, platform.machine(), cpu]).encode())
    return _cache_dir() / f"kernels-{key.hexdigest()[:16]}{'.dll' if sys.platform == 'win32' else '.so'}"


def build(force: bool = False) -> Path:
    """Compile the kernels into the cache (if not there yet) and return the library's path.

    Raises RuntimeError with the compiler's message when there is no compiler or the build fails."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc / clang)")
    path = _library_path(cc)
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cc, *_FLAGS, f"-march={_arch()}", str(_SOURCE), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, path)  # atomic: another process sees the old name or the whole new file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> ctypes.CDLL | None:
    if os.environ.get(NATIVE_ENV, "1").strip() in ("0", "false", "no", "off"):
        _state["why"] = f"disabled by {NATIVE_ENV}=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        if lib.tq_abi_version() != _ABI:
            raise RuntimeError("stale library")
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int if name in ("tq_conv1d_grouped", "tq_linear_rows", "tq_row_sums") else None
    except (OSError, RuntimeError, AttributeError) as exc:
        _state["why"] = f"native kernels unavailable, eager torch fallback: {exc}"
        return None
    _state["why"] = f"loaded {build()}"
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the callers' eager fallback runs); built on the first call if needed."""
    env = os.environ.get(NATIVE_ENV)
    if _state.get("env", ()) != env:  # (re)decide when $TERNQ_NATIVE changes
        _state["env"] = env
        _state["lib"] = _load()
    return _state["lib"]  # type: ignore[return-value]


def vnni() -> bool:
    """Whether the kernels are built for this CPU's VNNI instructions (vpdpbusd): ``-march=native`` on a CPU
    that has them. The kernel picker's thresholds depend on it."""
    return _arch() == "native" and bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def available() -> bool:
    """Whether the native kernels are in use in this process."""
    return library() is not None


def status() -> str:
    """One line: which kernels run, and why (print it beside speed figures)."""
    library()
    return str(_state.get("why"))


# --- tensor wrappers: CPU tensors of the stated dtypes; the outputs they write into (q, s, y, full) must be
# laid out as stated (the callers allocate them), the inputs are made contiguous where a kernel needs it -------


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
    """float32 (R, N): a packed Linear on the rows x (R, K) float32 in one call (quantize, GEMV, rescale, bias);
    w (N, K) int8 codes, or (N, ceil(K / 4)) uint8 2-bit rows of `ternq.storage.pack_rows` (decoded in
    registers); wsum the codes' row sums (int32; None: the plain signed-byte loop)."""
    lib = _state["lib"]
    two_bit = w.dtype == torch.uint8
    assert w.is_contiguous() and w.shape[1] == (-(-x.shape[1] // 4) if two_bit else x.shape[1])
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    if lib.tq_linear_rows(x.data_ptr(), x.shape[0], x.shape[1], _NORMS[norm], eps, bits,  # type: ignore[union-attr]
                          rows_per_sample, w.data_ptr(), 2 if two_bit else 8, _ptr(wsum), w.shape[0],
                          wscale.data_ptr(),
                          int(per_channel), _ptr(bias), y.data_ptr()) != 0:
        raise MemoryError("tq_linear_rows: out of memory")
    return y


def row_sums(w: Tensor) -> tuple[Tensor, int]:
    """Row sums (int32) of int8 codes w (N, K) and their largest magnitude, without temporaries."""
    lib = library()
    assert lib is not None
    w = w.contiguous()
    sums = torch.empty(w.shape[0], dtype=torch.int32)
    wmax = lib.tq_row_sums(w.data_ptr(), w.shape[0], w.shape[1], sums.data_ptr())
    return sums, int(wmax)


def quantize_grouped(x: Tensor, norm: str | None, eps: float, bits: int, per_sample: bool, in_g: int,
                     left: int, right: int) -> tuple[Tensor, Tensor]:
    """x (B, C, T) float32 -> codes + 128 in the grouped layout (B, groups, C4, Tp, 4) uint8 (C4 = in_g / 4
    rounded up, Tp = left + T + right, padding = code 0) and per-step scales (B, Tp) float32 (0 in the padding;
    per sample, the sample's scale in every step)."""
    lib = library()
    assert lib is not None
    x = x.contiguous()
    b, c, t = x.shape
    c4, tp = -(-in_g // 4), left + t + right
    xg = torch.empty(b, c // in_g, c4, tp, 4, dtype=torch.uint8)
    s = torch.empty(b, tp, dtype=torch.float32)
    lib.tq_quantize_grouped(x.data_ptr(), b, c, t, _NORMS[norm], eps, bits, int(per_sample), xg.data_ptr(), in_g,
                            c4, tp, left, s.data_ptr())
    return xg, s


def conv1d_grouped(xg: Tensor, w: Tensor, k: int, dilation: int, stride: int, t_out: int, s: Tensor,
                   wscale: Tensor | None, per_channel: bool, bias: Tensor | None, y: Tensor) -> None:
    """y (out, t_out), rows y.stride(0) apart, = the int8 convolution of grouped codes xg (C4, Tp, 4) with the
    weight codes w (k, out, in) int8, each tap's products scaled by the per-step scales s (Tp,) of the steps they
    read, then by wscale (per channel / tensor) plus bias."""
    lib = library()
    assert lib is not None
    w = w.contiguous()
    assert xg.is_contiguous() and s.is_contiguous() and y.stride(-1) == 1
    c4, tp = xg.shape[-3], xg.shape[-2]
    _, out, n_in = w.shape
    assert -(-n_in // 4) == c4
    if lib.tq_conv1d_grouped(xg.data_ptr(), c4, tp, w.data_ptr(), out, n_in, k, dilation, stride, t_out,
                             s.data_ptr(), _ptr(wscale), int(per_channel), _ptr(bias), y.data_ptr(),
                             y.stride(0)) != 0:
        raise MemoryError("tq_conv1d_grouped: out of memory")


def main(argv: list[str] | None = None) -> int:
    """Build the kernels now and print where (what ``make venv`` runs: ``python -c "from ternq import native;
    native.main([])"``); never fails: without a build the eager kernels run."""
    try:
        path = build(force="--force" in (argv or sys.argv[1:]))
        print(f"ternq native kernels: {path}")
    except (OSError, RuntimeError) as exc:  # never fails the install: the eager kernels work everywhere
        print(f"ternq native kernels not built ({exc}); ternq runs its eager torch kernels instead")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
