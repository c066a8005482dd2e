"""What the tests that run each -march build of the native kernels share."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from ternq import native

# the native kernels as built for this CPU (VNNI where it has it), for AVX2 without VNNI, and the portable loops;
# on a CPU with AVX-512 VNNI and VBMI also for Cascade Lake (AVX-512 VNNI without VBMI: the GEMM's other 2-bit
# decode), which the native build would never run here
_CASCADELAKE = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni"}
ARCHS = ("native", "haswell", "x86-64") + (
    ("cascadelake",) if _CASCADELAKE <= native.cpu_flags() and "avx512vbmi" in native.cpu_flags() else ())


@contextlib.contextmanager
def native_build(mode: str, arch: str, cache) -> Iterator[None]:
    """Run with the native kernels on ("1", built for `arch` into `cache`) or off ("0"); the environment is put
    back after (hypothesis runs many examples in one test, so no monkeypatch)."""
    names = (native.NATIVE_ENV, native.ARCH_ENV, native.CACHE_ENV)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({native.NATIVE_ENV: mode, native.ARCH_ENV: arch, native.CACHE_ENV: str(cache)})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
