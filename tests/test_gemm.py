"""The tiled int8 GEMM (ternq/runtime/csrc/ternq_gemm.c, the ``int8_tiled`` Linear kernel): the ``int8_gemm``
kernel's output bit for bit on every loop (AMX, AVX-512 VNNI, portable) and -march build, at any thread count, and
chosen only where it was measured faster (AMX)."""
from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from native_builds import ARCHS, native_build
from torch import nn

from ternq import KBitConfig, TernaryConfig, native
from ternq.qat.layers import layer_spec, to_quant_module
from ternq.runtime import kernels, packed_layer, picker
from ternq.runtime.storage import pack_rows

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


@contextlib.contextmanager
def _loop(isa: str, threads: int) -> Iterator[None]:
    """The tiled GEMM capped at `isa`, on `threads` threads, every kernel splitting even small shapes into chunks;
    all put back after (hypothesis runs many examples in one test, so no fixture)."""
    lib, saved = native.library(), torch.get_num_threads()
    native.gemm_isa(isa)
    lib.tq_set_min_work(1)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        native.gemm_isa(native.GEMM_ISAS[-1])
        lib.tq_set_min_work(1 << 18)  # the library's default
        torch.set_num_threads(saved)


def _loops() -> list[str]:
    """The loops this build and process can run (capping at a loop it lacks runs the next simpler one)."""
    best = native.GEMM_ISAS.index(native.gemm_isa())
    return list(native.GEMM_ISAS[: best + 1])


@needs_native
@settings(deadline=None, max_examples=40)
@example(rows=64, k=1024, n=100, lo=-1, per_channel=False, bias=True, bad=None, granularity="token", seed=0)
@example(rows=1, k=1, n=1, lo=-128, per_channel=True, bias=False, bad=float("nan"), granularity="token", seed=1)
@example(rows=37, k=130, n=33, lo=-128, per_channel=True, bias=True, bad=float("-inf"), granularity="tensor", seed=2)
@given(rows=st.integers(1, 70), k=st.integers(1, 300), n=st.integers(1, 70), lo=st.sampled_from([-1, -8, -128]),
       per_channel=st.booleans(), bias=st.booleans(),
       bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
       granularity=st.sampled_from(["token", "tensor"]), seed=st.integers(0, 2**16))
def test_tiled_gemm_gives_the_int8_gemm_result_bit_for_bit(arch_cache, rows: int, k: int, n: int, lo: int,
                                                           per_channel: bool, bias: bool, bad: float | None,
                                                           granularity: str, seed: int) -> None:
    """``int8_tiled`` == ``int8_gemm`` (native quantizer, torch._int_mm, native epilogue), bit for bit, on each loop
    of each -march build at 1, 2 and 3 threads: rows, K and N not multiples of the tiles (1 row, 1 code, partial
    16 x 64 tiles and 32-channel blocks), full-range int8 codes (the signed x signed and the +128 unsigned paths),
    per-token and per-sample scales; a NaN / Inf in a row gives a non-finite output row, as the reference."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 3
    if bad is not None:
        x[rows // 2, k // 3] = bad
    w = torch.randint(lo, -lo if lo > -128 else 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n if per_channel else 1, generator=g) + 0.5
    b = torch.randn(n, generator=g) if bias else None
    cfg = TernaryConfig(granularity="channel" if per_channel else "tensor", act_granularity=granularity)
    x3 = x.view(1, rows, k)  # per sample: one scale for all rows of x3[0]
    for arch in ARCHS:
        with native_build("1", arch, arch_cache):
            assert native.available(), native.status()
            ref = kernels.linear_int8(x3, w, scale, b, cfg, weight_first=False)
            if bad is not None:
                assert not bool(torch.isfinite(ref[0, rows // 2]).any())
            for isa in _loops():
                for threads in (1, 2, 3):
                    with _loop(isa, threads):
                        y = kernels.linear_tiled_bound(w, scale, b, cfg)(x3)
                    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True,
                                               msg=lambda m, where=f"{arch} {isa} {threads} threads": f"{where}: {m}")


@needs_native
@settings(deadline=None, max_examples=40)
@example(rows=64, k=1024, n=100, per_channel=False, bias=True, bad=None, granularity="token", seed=0)
@example(rows=1, k=1, n=1, per_channel=True, bias=False, bad=float("nan"), granularity="token", seed=1)
@example(rows=37, k=130, n=33, per_channel=True, bias=True, bad=float("-inf"), granularity="tensor", seed=2)
@example(rows=17, k=259, n=47, per_channel=True, bias=True, bad=float("inf"), granularity="token", seed=3)
@given(rows=st.integers(1, 70), k=st.integers(1, 300), n=st.integers(1, 70), per_channel=st.booleans(),
       bias=st.booleans(), bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]),
       granularity=st.sampled_from(["token", "tensor"]), seed=st.integers(0, 2**16))
def test_tiled_gemm_on_2bit_rows_gives_the_int8_gemm_result_bit_for_bit(arch_cache, rows: int, k: int, n: int,
                                                                        per_channel: bool, bias: bool,
                                                                        bad: float | None, granularity: str,
                                                                        seed: int) -> None:
    """``int8_tiled`` on 2-bit rows read as stored (storage="packed": decoded per thread in the native call, the
    activations multiplied in the rows' planar k order) == ``int8_gemm`` on the int8 codes == ``int8_tiled`` on
    int8 storage, bit for bit, on each loop of each -march build at 1, 2 and 3 threads: K not a multiple of 4
    (padded fields), 16 (the decoder's 16 bytes) or 64 (a tile), every 2-bit code (-2..1), 1 row to several
    tiles of rows, N past 16-channel blocks; a NaN / Inf in a row gives a non-finite output row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 3
    if bad is not None:
        x[rows // 2, k // 3] = bad
    w = torch.randint(-2, 2, (n, k), generator=g, dtype=torch.int8)
    w2 = pack_rows(w, 2)
    scale = torch.rand(n if per_channel else 1, generator=g) + 0.5
    b = torch.randn(n, generator=g) if bias else None
    cfg = TernaryConfig(granularity="channel" if per_channel else "tensor", act_granularity=granularity)
    x3 = x.view(1, rows, k)
    for arch in ARCHS:
        with native_build("1", arch, arch_cache):
            assert native.available(), native.status()
            ref = kernels.linear_int8(x3, w, scale, b, cfg, weight_first=False)
            if bad is not None:
                assert not bool(torch.isfinite(ref[0, rows // 2]).any())
            for isa in _loops():
                for threads in (1, 2, 3):
                    with _loop(isa, threads):
                        y = kernels.linear_tiled_bound(w2, scale, b, cfg)(x3)
                        y8 = kernels.linear_tiled_bound(w, scale, b, cfg)(x3)
                    for out in (y, y8):
                        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True,
                                                   msg=lambda m, where=f"{arch} {isa} {threads} threads": f"{where}: {m}")


def test_picker_chooses_tiled_only_where_measured_faster() -> None:
    """AMX and AVX-512 VNNI: ``int8_tiled`` from `TILED_MIN_ROWS` rows (the GEMV below). The portable loop (an
    AVX2-only build), no native kernels, or a layer without the kernel (2-bit storage): the rules before it."""
    linear = ("int8_gemm", "int8_gemm_t", "int8_gemv", "int8_tiled", "weight_only")
    assert picker.TILED_MIN_ROWS == {"amx": 4, "avx512_vnni": 5}
    for isa, least in picker.TILED_MIN_ROWS.items():
        assert picker.choose(linear, 1, True, isa) == "int8_gemv"
        assert picker.choose(linear, least - 1, True, isa) == "int8_gemv"
        for rows in (least, 64, 10_000):
            assert picker.choose(linear, rows, True, isa) == "int8_tiled"
        assert picker.choose(linear[:3] + linear[4:], 64, True, isa) == "int8_gemm_t"
    for isa in ("portable", None):
        for vnni in (True, False):
            assert picker.choose(linear, 64, vnni, isa) == "int8_gemm_t"
            assert picker.choose(linear, picker.GEMM_T_ROWS + 1, vnni, isa) == "int8_gemm"
            assert picker.choose(linear, 64, vnni, isa, two_bit=True) == "int8_gemm_t"
    # 2-bit rows: decoded on every call, so the GEMV on the rows as stored up to its rows, the tiled GEMM past them
    for isa in picker.TILED_MIN_ROWS:
        for vnni in (True, False):
            least = picker.gemv_rows(vnni) + 1
            assert picker.choose(linear, least - 1, vnni, isa, two_bit=True) == "int8_gemv"
            for rows in (max(least, picker.TILED_MIN_ROWS[isa]), 16, 64, 10_000):
                assert picker.choose(linear, rows, vnni, isa, two_bit=True) == "int8_tiled"


def test_avx2_build_never_picks_the_portable_loop(arch_cache) -> None:
    """An AVX2-only (haswell) or portable build has no fast loop for the tiled GEMM: its Linear runs the kernels
    measured there (never slower than fp32 on AVX2, docs/benchmarks.md), not ``int8_tiled``."""
    layer = _packed(nn.Linear(64, 48), "int8")
    x = torch.randn(64, 64)
    for arch in ("haswell", "x86-64"):
        with native_build("1", arch, arch_cache), torch.no_grad():
            assert native.gemm_isa() == "portable"
            layer.kernel = "auto"
            layer(x)
            assert layer.kernel == "int8_gemm_t", arch


def _packed(layer: nn.Linear, storage: str, config=None) -> nn.Module:
    config = config or TernaryConfig(granularity="channel")
    qat = to_quant_module(layer, config).eval()
    with torch.no_grad():
        codes, scale = qat.weight_codes()
    return packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)


@needs_native
def test_packed_linear_tiled_kernel() -> None:
    """The layer's ``int8_tiled``: ``int8_gemm``'s output on a 3-D input, 8-bit codes too; its tiled copy is made
    once, rebound when the codes change, never copied or pickled with the layer; on 2-bit storage (the default
    of a large Linear) it reads the rows as stored, holding only their row sums (4 bytes per output channel: the
    layer stays under 2.1 bits per weight); not offered for 4-bit storage (whose memory is its point)."""
    torch.manual_seed(0)
    for config in (TernaryConfig(), KBitConfig(bits=8, granularity="channel")):
        layer = _packed(nn.Linear(100, 40), "int8", config)
        x = torch.randn(2, 9, 100)
        with torch.no_grad():
            layer.kernel = "int8_gemm"
            ref = layer(x)
            layer.kernel = "int8_tiled"
            assert torch.equal(layer(x), ref)
            bound = layer.__dict__["_tiled"]
            layer(x)
            assert layer.__dict__["_tiled"] is bound  # packed once
            clone = copy.deepcopy(layer)
            assert "_tiled" not in clone.__dict__ and torch.equal(clone(x), ref)
            layer.load_state_dict({**layer.state_dict(), "weight": torch.zeros(40, 100)}, strict=False)
            assert torch.equal(layer(x), layer.bias.expand(2, 9, 40))  # rebound on the new codes
    four_bit = _packed(nn.Linear(100, 40), "packed", KBitConfig(bits=4, granularity="channel"))
    assert four_bit._bits == 4 and "int8_tiled" not in four_bit._applicable(torch.randn(64, 100))
    linear = nn.Linear(1024, 1024)
    two_bit = _packed(linear, "auto")
    assert two_bit._bits == 2 and "int8_tiled" in two_bit._applicable(torch.randn(64, 1024))
    x = torch.randn(2, 32, 1024)
    with torch.no_grad():
        two_bit.kernel = "auto"
        y = two_bit(x)
        assert two_bit.kernel == ("int8_tiled" if native.gemm_isa() in picker.TILED_MIN_ROWS else "int8_gemm_t")
        two_bit.kernel = "int8_tiled"
        assert torch.equal(two_bit(x), y)
        two_bit.kernel = "int8_gemm"
        assert torch.equal(two_bit(x), y)
        run = two_bit.__dict__["_tiled"][3]
        held = sum(t.numel() * t.element_size() for t in run.keep if t is not None
                   and t.data_ptr() not in (two_bit.ternq_codes.data_ptr(), two_bit.scale.data_ptr(),
                                            two_bit.bias.data_ptr()))
        assert held == 4 * 1024  # the row sums; the 2-bit rows are the layer's own
        bits = 8 * (two_bit.ternq_codes.numel() + held) / linear.weight.numel()
        assert bits <= 2.1, bits


@needs_native
@settings(deadline=None, max_examples=30)
@given(c=st.integers(1, 300), magnitude=st.integers(-3, 3), ulps=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_quantizer_rounds_like_the_division_at_half_integers(c: int, magnitude: int, ulps: int, seed: int) -> None:
    """The native quantizer multiplies by 1 / scale and divides only the lanes near a half-integer of the scale
    (csrc/ternq_kernels.c, round_row_avx512): its codes equal the eager ``x / scale`` rounding bit for bit on
    inputs within a few ulps of those boundaries, where the product alone rounds the other way."""
    g = torch.Generator().manual_seed(seed)
    rows = 8
    amax = torch.rand(rows, 1, generator=g).add_(0.5) * 10.0 ** magnitude
    scale = amax / 127
    k = torch.randint(-127, 127, (rows, c), generator=g).float() + 0.5
    x = k * scale
    x = x + torch.randint(-ulps, ulps + 1, (rows, c), generator=g).float() * torch.finfo(torch.float32).eps * x.abs()
    x = torch.where(x.abs() > amax, amax, x)
    x[:, 0] = amax[:, 0]  # the row's absmax, so that its scale is `scale`
    cfg = TernaryConfig(input_norm=None)
    q, s = torch.empty(rows, c, dtype=torch.int8), torch.empty(rows)
    native.quantize_rows(x, None, cfg.eps, 8, 1, q, s)
    ref_q, ref_s = kernels.quantize_eager(x, cfg, -1)
    assert torch.equal(s, ref_s.view(-1)) and torch.equal(q, ref_q)


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory from /proc")
def test_a_threads_scratch_is_freed_when_it_exits() -> None:
    """The native calls keep their buffers per thread between calls (csrc/ternq_gemm.c, tq_scratch): a thread's
    are freed when it exits, so a server's short-lived request threads leave nothing behind (40 threads of 4 MiB
    of buffers each: 160 MiB leaked without the exit hook)."""
    script = textwrap.dedent("""
        import os, threading, torch
        from torch import nn
        from ternq import TernaryConfig
        from ternq.qat.layers import layer_spec, to_quant_module
        from ternq.runtime import packed_layer
        torch.set_num_threads(1)
        linear, config = nn.Linear(1024, 16), TernaryConfig()
        with torch.no_grad():
            codes, scale = to_quant_module(linear, config).weight_codes()
        layer = packed_layer(linear, codes, scale, config, layer_spec(linear), storage="int8", kernel="int8_tiled")
        x = torch.randn(2048, 1024)  # 2 MiB of codes and 2 MiB of tiles per call
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with torch.inference_mode():
            layer(x)
            start = rss()
            for _ in range(40):
                thread = threading.Thread(target=layer, args=(x,))
                thread.start()
                thread.join()
            assert layer.kernel == "int8_tiled"
        print(rss() - start)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 48 << 20, out.stdout
