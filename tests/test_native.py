"""The native kernels (ternq/runtime/csrc/ternq_kernels.c via ternq.native): build cache, clean degradation, kernel properties."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from native_builds import ARCHS, native_build
from torch import nn

from ternq import TernaryConfig, native
from ternq.qat.layers import layer_spec, to_quant_module
from ternq.runtime import packed_layer
from ternq.runtime.storage import pack_rows

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")
needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions, process groups and shell scripts")


def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A process state as if ternq had just been imported, with an empty build cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))


def test_without_a_compiler_the_layers_run_eager(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert not native.available() and "no C compiler" in native.status()
    torch.manual_seed(0)
    config = TernaryConfig()
    for layer, x in [(nn.Linear(16, 8), torch.randn(2, 16)), (nn.Conv1d(8, 8, 3, padding=1), torch.randn(1, 8, 20))]:
        qat = to_quant_module(layer, config).eval()
        codes, scale = qat.weight_codes()
        packed = packed_layer(layer, codes, scale, config, layer_spec(layer))
        assert "int8_gemv" not in packed._applicable(x) and "int8_direct" not in packed._applicable(x)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), qat(x), rtol=1e-5, atol=1e-5)
        assert packed.kernel != "weight_only"


def test_a_failing_compiler_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "false")
    assert not native.available() and "failed" in native.status()
    assert not list(tmp_path.iterdir())  # no half-written library is left for the next process


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.available() and native.NATIVE_ENV in native.status()


@needs_native
def test_build_is_cached_by_content(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh(monkeypatch, tmp_path)
    path = native.build()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp  # built once
    # the temporary names were renamed away; the build record beside the library
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".sha256"]
    monkeypatch.setenv(native.ARCH_ENV, "x86-64")  # another -march: another library
    assert native.build() != path


@needs_native
@settings(deadline=None, max_examples=40)
@given(c_in=st.integers(1, 20), out=st.integers(1, 20), k=st.integers(1, 6), dilation=st.integers(1, 3),
       stride=st.integers(1, 3), t=st.integers(1, 70), per_sample=st.booleans(), wmax=st.sampled_from([1, 7, 127]),
       seed=st.integers(0, 2**16))
def test_direct_conv_is_the_scaled_integer_convolution(c_in: int, out: int, k: int, dilation: int, stride: int,
                                                       t: int, per_sample: bool, wmax: int, seed: int) -> None:
    """conv1d_grouped == sum over taps of s[p] * (codes @ activation codes), computed in float64 from the codes
    quantize_grouped wrote; the codes decode to q in [-128, 127] with the padding at code 0."""
    torch.manual_seed(seed)
    left, right = k // 2, dilation
    x = torch.randn(1, c_in, t) * 3
    xg, s = native.quantize_grouped(x, "layernorm", 1e-5, 8, per_sample, c_in, left, right)
    c4, tp = xg.shape[2], xg.shape[3]
    q = (xg[0, 0].to(torch.int32) - 128).permute(0, 2, 1).reshape(c4 * 4, tp)[:c_in]  # (C, Tp)
    assert bool((q[:, :left] == 0).all()) and bool((q[:, left + t:] == 0).all())
    assert bool((s[0, :left] == 0).all()) and bool((s[0, left + t:] == 0).all())
    if per_sample:
        assert bool((s[0, left:left + t] == s[0, left]).all())
    w = torch.randint(-wmax, wmax + 1, (k, out, c_in), dtype=torch.int8)
    span = dilation * (k - 1)
    t_out = (tp - span - 1) // stride + 1
    if t_out < 1:
        return
    y = torch.full((out, t_out + 3), float("nan"))
    wscale = torch.rand(out) + 0.5
    bias = torch.randn(out)
    native.conv1d_grouped(xg[0, 0], w, k, dilation, stride, t_out, s[0], wscale, True, bias, y)
    assert bool(torch.isnan(y[:, t_out:]).all())  # nothing written past the output
    scaled = q.double() * s[0].double()  # (C, Tp): the dequantized activations
    ref = F.conv1d(scaled[None], w.permute(1, 2, 0).double(), stride=stride, dilation=dilation)[0]
    ref = ref * wscale.double()[:, None] + bias.double()[:, None]
    magnitude = F.conv1d(scaled.abs()[None], w.permute(1, 2, 0).double().abs(), stride=stride, dilation=dilation)[0]
    bound = 1e-5 * (magnitude * wscale.double()[:, None] + bias.double().abs()[:, None]) + 1e-6
    assert bool(((y[:, :t_out].double() - ref).abs() <= bound).all())


@needs_native
@settings(deadline=None, max_examples=60)
@given(c_in=st.integers(1, 20), out=st.integers(1, 20), k=st.sampled_from([1, 2, 3, 4, 5, 7, 11, 16]),
       up=st.sampled_from([1, 2, 3, 5, 8]), padding=st.integers(0, 8), extra=st.integers(0, 7),
       t=st.sampled_from([1, 2, 3, 17, 70, 300]), per_sample=st.booleans(), wmax=st.sampled_from([1, 7, 127]),
       per_channel=st.booleans(), arch=st.sampled_from(ARCHS), seed=st.integers(0, 2**16))
def test_direct_conv_transpose_is_the_scaled_integer_transposed_convolution(
        arch_cache, c_in: int, out: int, k: int, up: int, padding: int, extra: int, t: int, per_sample: bool,
        wmax: int, per_channel: bool, arch: str, seed: int) -> None:
    """conv_transpose1d_grouped (the upsampling as `up` interleaved stride-1 convolutions) == the transposed
    convolution of the dequantized codes, in float64, in every -march build (VNNI, AVX2 with |w| <= 64 and
    beyond, portable): every output step of every phase written once, the steps no tap reaches (output padding)
    only the bias, nothing past the output."""
    with native_build("1", arch, arch_cache):
        _check_direct_conv_transpose(c_in, out, k, up, padding, extra, t, per_sample, wmax, per_channel, seed)


def _check_direct_conv_transpose(c_in: int, out: int, k: int, up: int, padding: int, extra: int, t: int,
                                 per_sample: bool, wmax: int, per_channel: bool, seed: int) -> None:
    torch.manual_seed(seed)
    output_padding = extra % up
    t_out = (t - 1) * up - 2 * padding + k + output_padding
    if t_out < 1:
        return
    x = torch.randn(1, c_in, t) * 3
    left, right = native.conv_transpose_padding(k, up, padding, t, t_out)
    xg, s = native.quantize_grouped(x, "layernorm", 1e-5, 8, per_sample, c_in, left, right)
    c4, tp = xg.shape[2], xg.shape[3]
    q = (xg[0, 0].to(torch.int32) - 128).permute(0, 2, 1).reshape(c4 * 4, tp)[:c_in, left:left + t]
    scaled = q.double() * s[0, left:left + t].double()  # (C, T): the dequantized activations
    w = torch.randint(-wmax, wmax + 1, (k, out, c_in), dtype=torch.int8)
    weights = native.conv_weights(w[native.transpose_phases(k, up)])
    wscale = torch.rand(out if per_channel else 1) + 0.5
    bias = torch.randn(out)
    y = torch.full((out, t_out + 3), float("nan"))
    native.conv_transpose1d_grouped(xg[0, 0], weights, up, padding, t_out, s[0], wscale, per_channel, bias, y)
    assert bool(torch.isnan(y[:, t_out:]).all())  # nothing written past the output
    w_t = w.permute(2, 1, 0).double()  # (in, out, k): ConvTranspose1d's weight
    kw = dict(stride=up, padding=padding, output_padding=output_padding)
    ws = wscale.double()[:, None] if per_channel else wscale.double()
    ref = F.conv_transpose1d(scaled[None], w_t, **kw)[0] * ws + bias.double()[:, None]
    magnitude = F.conv_transpose1d(scaled.abs()[None], w_t.abs(), **kw)[0] * ws + bias.double().abs()[:, None]
    assert bool(((y[:, :t_out].double() - ref).abs() <= 1e-5 * magnitude + 1e-6).all())


@needs_native
def test_direct_conv_transpose_refuses_an_input_too_short_for_its_phases() -> None:
    """The C kernel checks the padded length it is given against what its phases read: a wrapper that forgot
    conv_transpose_padding gets an error naming the fix, not a read past the buffer."""
    w = native.conv_weights(torch.ones(16, 8, 8, dtype=torch.int8))
    xg, s = native.quantize_grouped(torch.randn(1, 8, 10), None, 1e-5, 8, False, 8, 0, 0)
    with pytest.raises(ValueError, match="conv_transpose_padding"):
        native.conv_transpose1d_grouped(xg[0, 0], w, 8, 4, 80, s[0], None, False, None, torch.empty(8, 80))


@needs_native
@settings(deadline=None, max_examples=40)
@given(batch=st.integers(1, 3), groups=st.integers(1, 3), in_g=st.integers(1, 9), out_g=st.integers(1, 19),
       k=st.integers(1, 6), a=st.integers(1, 3), b=st.integers(0, 3), transposed=st.booleans(),
       t=st.sampled_from([1, 2, 9, 70, 300]), per_sample=st.booleans(), per_channel=st.booleans(),
       has_bias=st.booleans(), slope=st.sampled_from([None, 0.1]),
       spoil=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]), arch=st.sampled_from(ARCHS),
       seed=st.integers(0, 2**16))
def test_a_direct_conv_layer_call_is_its_per_group_calls_bit_for_bit(
        arch_cache, batch: int, groups: int, in_g: int, out_g: int, k: int, a: int, b: int, transposed: bool, t: int,
        per_sample: bool, per_channel: bool, has_bias: bool, slope: float | None, spoil: float | None, arch: str,
        seed: int) -> None:
    """`native.conv_direct_bound` (one native call: quantize, then every sample and group in one parallel region)
    == quantize_grouped + conv1d_grouped / conv_transpose1d_grouped per sample and group, bit for bit, at 1, 2 and
    3 threads and in every -march build: batches, groups, dilation / stride / padding off every block, per-channel
    scales of each group (Conv1d) or shared by the groups (ConvTranspose1d), no bias, a leaky ReLU, per-sample
    scales; a NaN / Inf step makes exactly the outputs that read it non-finite."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, groups * in_g, t, generator=g) * 2
    if spoil is not None:
        x[batch - 1, in_g // 2, t // 2] = spoil
    w = torch.randint(-1 if seed % 2 else -127, 2 if seed % 2 else 128, (groups, k, out_g, in_g), dtype=torch.int8,
                      generator=g)
    if transposed:
        up, pad, extra = a, min(b, k - 1), b % a
        t_out = (t - 1) * up - 2 * pad + k + extra
        if t_out < 1:
            return
        left, right = native.conv_transpose_padding(k, up, pad, t, t_out)
        w = w[:, native.transpose_phases(k, up)]
    else:
        dilation, stride, left, right = a, 1 + b % 2, b, (seed >> 3) % 3
        t_out = (left + t + right - dilation * (k - 1) - 1) // stride + 1
        if t_out < 1:
            return
    weights = [native.conv_weights(wg) for wg in w]
    n_scales = (out_g if transposed else groups * out_g) if per_channel else 1
    wscale = torch.rand(n_scales, generator=g) + 0.5
    bias = torch.randn(groups * out_g, generator=g) if has_bias else None
    with native_build("1", arch, arch_cache):
        lib, threads = native.library(), torch.get_num_threads()
        xg, s = native.quantize_grouped(x, "layernorm", 1e-5, 8, per_sample, in_g, left, right, slope=slope)
        ref = torch.empty(batch, groups * out_g, t_out)
        for i in range(batch):
            for j in range(groups):
                rows = slice(j * out_g, (j + 1) * out_g)
                ws = wscale[rows] if per_channel and not transposed else wscale
                bj = None if bias is None else bias[rows]
                if transposed:
                    native.conv_transpose1d_grouped(xg[i, j], weights[j], up, pad, t_out, s[i], ws, per_channel,
                                                    bj, ref[i, rows])
                else:
                    native.conv1d_grouped(xg[i, j], weights[j], k, dilation, stride, t_out, s[i], ws, per_channel,
                                          bj, ref[i, rows])
        call = native.conv_direct_bound(weights, transposed, "layernorm", 1e-5, 8, per_sample,
                                        up if transposed else dilation, pad if transposed else stride, wscale,
                                        per_channel, bias)
        lib.tq_set_min_work(1)  # split even these small shapes between the threads
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                y = call(x, left, right, t_out, slope)
                assert torch.equal(_bits(y), _bits(ref)), (n, arch)
        finally:
            lib.tq_set_min_work(1 << 18)
            torch.set_num_threads(threads)
    # the outputs that read the spoiled step (per sample: any step of the sample) through any tap
    hit = torch.ones(1, 1, t, dtype=torch.float64) if per_sample else torch.zeros(1, 1, t, dtype=torch.float64)
    hit[0, 0, t // 2] = 1
    taps = torch.ones(1, 1, k, dtype=torch.float64)
    if transposed:
        reached = F.conv_transpose1d(hit, taps, stride=up, padding=pad, output_padding=extra)[0, 0] > 0
    else:
        reached = F.conv1d(F.pad(hit, (left, right)), taps, stride=stride, dilation=dilation)[0, 0] > 0
    finite = torch.ones_like(y, dtype=torch.bool)
    if spoil is not None:
        finite[batch - 1] = ~reached
    assert torch.equal(torch.isfinite(y), finite)


@needs_native
def test_a_direct_conv_layer_call_refuses_what_does_not_fit() -> None:
    """The binding checks the scales and bias against the groups and outputs, the bound call the input's channels
    and dtype (a message naming them), the C call the padded length it is given against the output length (not a
    read past the buffer)."""
    weights = [native.conv_weights(torch.ones(3, 8, 4, dtype=torch.int8))]
    call = native.conv_direct_bound(weights, False, None, 1e-5, 8, False, 1, 1, torch.ones(1), False, None)
    assert call(torch.randn(2, 4, 10), 1, 1, 10).shape == (2, 8, 10)
    with pytest.raises(ValueError, match="4 float32 input channels"):
        call(torch.randn(2, 5, 10), 1, 1, 10)
    with pytest.raises(ValueError, match="4 float32 input channels"):
        call(torch.randn(2, 4, 10, dtype=torch.float64), 1, 1, 10)
    with pytest.raises(ValueError, match="do not cover"):
        call(torch.randn(2, 4, 10), 0, 0, 10)
    transposed = native.conv_direct_bound(weights, True, None, 1e-5, 8, False, 8, 2, torch.ones(1), False, None)
    with pytest.raises(ValueError, match="do not cover"):
        transposed(torch.randn(1, 4, 10), 0, 0, 80)
    with pytest.raises(ValueError, match="8 scales"):  # per channel: one per output
        native.conv_direct_bound(weights, False, None, 1e-5, 8, False, 1, 1, torch.ones(1), True, None)
    with pytest.raises(ValueError, match="a float32 bias of 8"):
        native.conv_direct_bound(weights, False, None, 1e-5, 8, False, 1, 1, torch.ones(1), False, torch.ones(4))


@needs_native
@settings(deadline=None, max_examples=40)
@given(c=st.integers(1, 20), t=st.sampled_from([1, 5, 255, 256, 257, 600]), slope=st.sampled_from([0.1, 0.01, 0.2, -0.5, 0.0]),
       norm=st.sampled_from([None, "layernorm", "rmsnorm"]), per_sample=st.booleans(), groups=st.sampled_from([1, 2]),
       spoil=st.sampled_from([None, float("nan"), float("inf"), -float("inf"), -0.0]), seed=st.integers(0, 2**16))
def test_quantize_grouped_with_a_slope_is_the_codes_of_leaky_relu(c: int, t: int, slope: float, norm: str | None,
                                                                 per_sample: bool, groups: int, spoil: float | None,
                                                                 seed: int) -> None:
    """The leaky ReLU inside the input quantization gives the codes and scales of torch's F.leaky_relu(x) bit for
    bit (NaN, Inf and -0.0 included), at 1, 2 and 3 threads."""
    torch.manual_seed(seed)
    x = torch.randn(2, c * groups, t) * 2
    if spoil is not None:
        x[1, c // 2, t // 2] = spoil
    ref = native.quantize_grouped(F.leaky_relu(x, slope), norm, 1e-5, 8, per_sample, c, 2, 3)
    with _split_small_shapes():
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = native.quantize_grouped(x, norm, 1e-5, 8, per_sample, c, 2, 3, slope=slope)
            assert torch.equal(got[0], ref[0]) and torch.equal(_bits(got[1]), _bits(ref[1])), threads


@needs_native
@settings(deadline=None, max_examples=40)
@given(rows=st.integers(1, 6), k=st.integers(1, 200), n=st.integers(1, 40), norm=st.sampled_from([None, "layernorm",
       "rmsnorm"]), wmax=st.sampled_from([1, 63, 127]), seed=st.integers(0, 2**16))
def test_linear_rows_is_quantize_then_integer_matmul(rows: int, k: int, n: int, norm: str | None, wmax: int,
                                                     seed: int) -> None:
    """The one-call Linear == quantize_rows' codes @ codes^T (exact int32), rescaled: the GEMV is exact, with and
    without the VNNI / AVX2 unsigned-byte path (|w| <= 64 and beyond)."""
    torch.manual_seed(seed)
    x = torch.randn(rows, k) * 2
    w = torch.randint(-wmax, wmax + 1, (n, k), dtype=torch.int8)
    wscale = torch.rand(1) + 0.5
    q = torch.empty(rows, k, dtype=torch.int8)
    s = torch.empty(rows)
    native.quantize_rows(x, norm, 1e-5, 8, 1, q, s)
    acc = q.long() @ w.long().t()
    wsum = w.sum(1, dtype=torch.int32) if native.vnni() or wmax <= 64 else None  # as PackedLinear passes it
    assert torch.equal(native.gemv(q, w, wsum).long(), acc)
    assert torch.equal(native.gemv(q, w, None).long(), acc)
    y = native.linear_rows(x, norm, 1e-5, 8, 1, w, wsum, wscale, False, None)
    if wmax == 1:  # ternary codes stored at 2 bits (storage="packed"): the GEMV decodes them itself, same result
        two_bit = pack_rows(w, 2)
        assert torch.equal(native.linear_rows(x, norm, 1e-5, 8, 1, two_bit, wsum, wscale, False, None), y)
        assert torch.equal(native.linear_rows(x, norm, 1e-5, 8, 1, two_bit, None, wscale, False, None), y)
    ref = acc.double() * s.double()[:, None] * float(wscale)
    bound = 1e-5 * (q.double().abs() @ w.double().abs().t()) * s.double()[:, None] * float(wscale) + 1e-6
    assert bool(((y.double() - ref).abs() <= bound).all())


@needs_native
def test_status_names_the_library() -> None:
    assert os.path.basename(str(native.build())) in native.status()


# --- the cache trusts nothing it did not check (issue 17: S8, S9, S10) ---------------------------------------


def _status_in_subprocess(cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`native.status()` in a fresh process with `cache` as its cache (a crash or a hang there cannot take pytest
    down: the time limit only stops a hang, it measures nothing)."""
    return subprocess.run([sys.executable, "-c", "from ternq import native; print(native.status())"],
                          env={**os.environ, native.CACHE_ENV: str(cache), **env}, capture_output=True, text=True,
                          timeout=180)


@needs_compiler
def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path) -> None:
    """S8: the next process used to dlopen a truncated library and die of SIGBUS (exit 135), without a message."""
    first = _status_in_subprocess(tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("loaded"), first
    (library,) = tmp_path.glob("kernels-*.so")
    size = library.stat().st_size
    os.truncate(library, 1000)
    second = _status_in_subprocess(tmp_path)
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])
    assert second.stdout.startswith("loaded") and "not the one that was built" in second.stderr
    assert library.stat().st_size == size  # rebuilt


@needs_compiler
def test_a_library_without_its_build_record_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh(monkeypatch, tmp_path)
    path = native.build()
    native._record_path(path).write_text("0" * 64 + " 1\n")  # another build's record: size and hash differ
    with pytest.warns(RuntimeWarning, match="not the one that was built"):
        assert native.build() == path
    assert native._verify(path) is None


def _plant(tmp_path: Path, cache: Path) -> tuple[Path, Path]:
    """A library that runs code when loaded (it creates a marker file), under the name ternq looks for in
    `cache`, with a matching build record: only the cache's permissions can tell it apart."""
    marker = tmp_path / "constructor-ran"
    source = tmp_path / "evil.c"
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void ran(void) '
                      f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\nint tq_abi_version(void) '
                      '{ return -1; }\n')
    cc = native._compiler()
    target = native._library_path(cc)
    assert target.parent == cache
    built = tmp_path / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", str(source), "-o", str(built)], check=True)
    return built, marker


def _record(library: Path) -> None:
    data = library.read_bytes()
    library.with_name(library.name + ".sha256").write_text(f"{hashlib.sha256(data).hexdigest()} {len(data)}\n")


@needs_compiler
@posix_only
@pytest.mark.parametrize("attack", ["world-writable directory", "writable library", "symlinked library",
                                    "foreign directory", "symlinked directory"])
def test_a_library_others_could_have_planted_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path, attack) -> None:
    """S9: the library name is a public hash; a library planted in a cache directory that others can write (or
    reached through a symbolic link) was loaded, and its constructor ran."""
    cache = tmp_path / "cache"
    _fresh(monkeypatch, cache)
    cache.mkdir(mode=0o700)
    built, marker = _plant(tmp_path, cache)
    target = native._library_path(native._compiler())
    if attack == "symlinked library":
        target.symlink_to(built)
    else:
        target.write_bytes(built.read_bytes())
    _record(target)
    refused = cache
    if attack == "world-writable directory":
        cache.chmod(0o777)
    elif attack == "writable library":
        target.chmod(0o666)
        refused = target
    elif attack == "symlinked library":
        refused = target
    elif attack == "foreign directory":
        real_uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # as if another user had made the directory
    elif attack == "symlinked directory":
        link = tmp_path / "link"
        link.symlink_to(cache)
        monkeypatch.setenv(native.CACHE_ENV, str(link))
        refused = link
    with pytest.raises(RuntimeError, match=re.escape(str(refused))):
        native.build()
    with pytest.warns(RuntimeWarning, match=re.escape(str(refused))) as record:
        assert not native.available()
    message = str(record[0].message)
    assert "eager" in message and ("chmod go-w" in message or "remove it" in message or native.CACHE_ENV in message)
    assert str(refused) in native.status()
    assert not marker.exists()  # nothing of the planted library ran


@needs_compiler
@posix_only
def test_the_cache_is_private_under_a_permissive_umask(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The directory is created 0700, and under umask 002 (group-writable files by default) ternq does not
    refuse its own library."""
    cache = tmp_path / "a" / "cache"
    _fresh(monkeypatch, cache)
    old = os.umask(0o002)
    try:
        path = native.build()
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for p in (path, native._record_path(path)):
        assert not p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert native._verify(path) is None and native.available()


def _fake_compiler(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (a SIGKILL is delivered asynchronously: wait for it, up to 30 s)."""
    for _ in range(300):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # killed, not reaped yet
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@posix_only
def test_a_compiler_that_never_returns_is_killed(tmp_path) -> None:
    """S10: a hanging compiler hung `native.status()` (and every packed model's first call) forever, and left a
    0-byte temporary file in the cache. The compiler's own children (cc runs cc1, as, ld) are killed too."""
    pids = tmp_path / "pids"
    cc = _fake_compiler(tmp_path, f"""\
        sleep 600 &
        echo $$ $! > {pids}
        wait
        """)
    cache = tmp_path / "cache"
    try:
        done = _status_in_subprocess(cache, CC=str(cc), TERNQ_BUILD_TIMEOUT="2")
        assert done.returncode == 0 and "did not finish in 2 s" in done.stdout, done
        assert "TERNQ_BUILD_TIMEOUT" in done.stdout
        assert list(cache.iterdir()) == []  # no temporary file left
        if Path("/proc").is_dir():
            assert all(_gone(int(pid)) for pid in pids.read_text().split())
    finally:
        for pid in pids.read_text().split() if pids.exists() else ():
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass


@posix_only
def test_a_compiler_that_writes_nothing_caches_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """S10: `exit 0` without output used to cache a 0-byte library (and every later process failed to load it)."""
    cache = tmp_path / "cache"
    _fresh(monkeypatch, cache)
    monkeypatch.setenv("CC", str(_fake_compiler(tmp_path, "exit 0\n")))
    with pytest.raises(RuntimeError, match="wrote no library"):
        native.build()
    assert list(cache.iterdir()) == []
    assert not native.available() and "wrote no library" in native.status()


def test_build_timeout_argument_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv(native.BUILD_TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=native.BUILD_TIMEOUT_ENV):
        native.build(cc=sys.executable)
    with pytest.raises(ValueError, match="seconds > 0"):
        native.build(cc=sys.executable, timeout=0)
    with pytest.raises(RuntimeError, match="not found"):
        native.build(cc=str(tmp_path / "no-such-cc"))


def test_native_env_is_read_case_insensitively(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """`TERNQ_NATIVE=OFF` / `False` used to leave the kernels on (only lower-case spellings were read), and a typo
    too; now the usual on / off spellings in any case count, and anything else is an error naming the variable."""
    monkeypatch.setenv("CC", "false")  # on: a build is attempted (and fails), in an empty cache
    for value in ("OFF", "False", "no", " 0 ", "Off", "ON", "True", "yes", "1", ""):
        _fresh(monkeypatch, tmp_path)
        monkeypatch.setenv(native.NATIVE_ENV, value)
        assert not native.available()
        off = value.strip().lower() in ("off", "false", "no", "0")
        assert (native.NATIVE_ENV in native.status()) == off and ("failed" in native.status()) != off, value
    for value in ("of", "enabled", "2"):
        monkeypatch.setenv(native.NATIVE_ENV, value)
        with pytest.raises(ValueError, match=f"{native.NATIVE_ENV}='{value}'.*off"):
            native.available()


@needs_compiler
def test_the_binding_is_checked_against_the_header(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ternq_kernels.h is the one statement of the ABI number and the prototypes: the library reports the header's
    number, and a ctypes signature that differs from a prototype raises at load (a mismatched signature would
    pass wrong values, or corrupt memory, instead of failing), naming the function."""
    header = native._HEADER.read_text()
    abi = native._check_interface(header)
    if native.library() is not None:
        assert native.library().tq_abi_version() == abi
    proto = "int tq_row_sums(const int8_t *w, int64_t N, int64_t K, int32_t *sums);"
    assert proto in header
    for bad, match in ((header.replace(proto, proto.replace("int64_t N", "int N")), "tq_row_sums as int"),
                       (header.replace(proto, proto.replace("int tq_", "void tq_")), "tq_row_sums as int"),
                       (header.replace(proto, ""), "does not declare"),
                       (header.replace("#define TQ_ABI_VERSION", "#define TQ_ABI"), "TQ_ABI_VERSION")):
        with pytest.raises(native.NativeInterfaceError, match=match):
            native._check_interface(bad)
    planted = tmp_path / "ternq_kernels.h"
    planted.write_text(header.replace(proto, proto.replace("int64_t N", "int N")))
    monkeypatch.setattr(native, "_HEADER", planted)
    _fresh(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv(native.NATIVE_ENV, "1")
    with pytest.raises(native.NativeInterfaceError, match="tq_row_sums"):
        native.library()  # raised, not degraded to the eager fallback


# --- threads: torch's OpenMP pool, torch's thread count, the same bits at any count (issue 18) -----------------


@contextlib.contextmanager
def _split_small_shapes() -> Iterator[None]:
    """Every kernel splits even the small shapes of a property test into chunks (1 unit of work each), and the
    thread count comes back as it was."""
    lib, threads = native.library(), torch.get_num_threads()
    lib.tq_set_min_work(1)
    try:
        yield
    finally:
        lib.tq_set_min_work(1 << 18)  # the library's default
        torch.set_num_threads(threads)


def _every_kernel(seed: int, rows: int, k: int, n: int, c_in: int, t: int, taps: int, spoil: float | None,
                  per_sample: bool) -> dict[str, torch.Tensor]:
    """The outputs of every native kernel on one random case (`spoil`: a NaN / Inf planted in each input)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    x = torch.randn(rows, k, generator=g) * 2
    xc = torch.randn(2, c_in, t, generator=g)
    if spoil is not None:
        x[rows // 2, k // 3] = spoil
        xc[1, c_in // 2, t // 2] = spoil
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    wscale, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    q, s = torch.empty(rows, k, dtype=torch.int8), torch.empty(rows)
    native.quantize_rows(x, "layernorm", 1e-5, 8, 1 if not per_sample else rows, q, s)
    out["quantize_rows"], out["row_scales"] = q, s
    out["row_sums"], wmax = native.row_sums(w)
    out["gemv"] = native.gemv(q, w, out["row_sums"])
    out["gemv_signed"] = native.gemv(q, w, None)
    out["linear_rows"] = native.linear_rows(x, "rmsnorm", 1e-5, 8, 1, w, out["row_sums"], wscale, True, bias)
    out["linear_rows_2bit"] = native.linear_rows(x, None, 1e-5, 8, 1, pack_rows(w, 2), out["row_sums"], wscale[:1],
                                                 False, None)
    acc = torch.randint(-5000, 5000, (n, rows), dtype=torch.int32, generator=g)
    for per_channel, b in ((True, bias), (False, None)):
        w_s = wscale if per_channel else wscale[:1]
        out[f"epilogue_t_{per_channel}"] = native.linear_epilogue(acc, True, s, w_s, per_channel, b)
        out[f"epilogue_{per_channel}"] = native.linear_epilogue(acc.t().contiguous(), False, s, w_s, per_channel, b)
    qc, sc = torch.zeros(2, c_in, t + 3, dtype=torch.int8), torch.zeros(2, t + 3)
    native.quantize_channels(xc, "layernorm", 1e-5, 8, per_sample, qc, sc, 1)
    out["quantize_channels"], out["channel_scales"] = qc, sc
    xg, sg = native.quantize_grouped(xc, "layernorm", 1e-5, 8, per_sample, c_in, 1, taps)
    out["quantize_grouped"], out["grouped_scales"] = xg, sg
    wc = torch.randint(-1, 2, (taps, n, c_in), dtype=torch.int8, generator=g)
    t_out = t + 2  # the 1 + t + taps padded steps, less the window's reach taps - 1
    y = torch.empty(n, t_out)
    native.conv1d_grouped(xg[1, 0], wc, taps, 1, 1, t_out, sg[1], wscale, True, bias, y)
    out["conv1d"] = y
    out["quantize_grouped_leaky"] = native.quantize_grouped(xc, "layernorm", 1e-5, 8, per_sample, c_in, 1, taps,
                                                            slope=0.1)[0]
    up = 1 + seed % 8  # the vocoder's factors (8, 2) among others; k = 2 * up: its kernels
    tt_out = (t - 1) * up - 2 * (up // 2) + 2 * up  # ConvTranspose1d(k=2 * up, stride=up, padding=up // 2)
    left_t, right_t = native.conv_transpose_padding(2 * up, up, up // 2, t, tt_out)
    xt, st_ = native.quantize_grouped(xc, "layernorm", 1e-5, 8, per_sample, c_in, left_t, right_t)
    wt = torch.randint(-1, 2, (2 * up, n, c_in), dtype=torch.int8, generator=g)
    yt = torch.empty(n, tt_out)
    native.conv_transpose1d_grouped(xt[1, 0], native.conv_weights(wt[native.transpose_phases(2 * up, up)]), up,
                                    up // 2, tt_out, st_[1], wscale, True, bias, yt)
    out["conv_transpose1d"] = yt
    width = t + taps  # t output steps of a taps-wide window: the tap planes' columns
    acc3 = torch.randint(-3000, 3000, (taps * n, width), dtype=torch.int32, generator=g)
    steps = torch.rand(width, generator=g)  # per-step scales
    ys = torch.empty(n, t)
    native.tap_sum(acc3, taps, steps, t, 1, 1, wscale, True, bias, ys)
    out["tap_sum"] = ys
    full = torch.zeros(n, width + taps + 1)
    native.tap_scatter(acc3, taps, steps, width, 1, 1, full, 1)
    out["tap_scatter"] = full
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: NaN payloads and signed zeros included."""
    return t.contiguous().view(torch.uint8)


@needs_native
@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**16), rows=st.sampled_from([1, 2, 5, 16, 33]), k=st.integers(1, 150),
       n=st.integers(1, 45), c_in=st.integers(1, 13), t=st.sampled_from([1, 7, 255, 257, 600]),
       taps=st.integers(1, 5), spoil=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
       per_sample=st.booleans())
def test_every_kernel_gives_the_same_bits_at_any_thread_count(seed: int, rows: int, k: int, n: int, c_in: int,
                                                              t: int, taps: int, spoil: float | None,
                                                              per_sample: bool) -> None:
    """Each kernel splits its output rows between torch's threads: 1, 2 and 3 threads give the same bytes (shapes
    off every block size, one row and many, non-finite inputs), and NaN / Inf in gives NaN / Inf out."""
    results = {}
    with _split_small_shapes():
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert native.num_threads() == threads  # torch's count is the kernels' count
            results[threads] = _every_kernel(seed, rows, k, n, c_in, t, taps, spoil, per_sample)
    for threads in (2, 3):
        for name, value in results[1].items():
            assert torch.equal(_bits(results[threads][name]), _bits(value)), (name, threads)
    for per_channel in (True, False):  # the transposed epilogue (16 x 16 tiles) is the plain one, bit for bit
        assert torch.equal(_bits(results[1][f"epilogue_t_{per_channel}"]), _bits(results[1][f"epilogue_{per_channel}"]))
    y = results[1]["linear_rows"]
    if spoil is not None:  # the spoiled row's outputs, and only they, are not finite
        assert not bool(torch.isfinite(y[rows // 2]).any())
        assert bool(torch.isfinite(torch.cat([y[: rows // 2], y[rows // 2 + 1:]])).all())
    else:
        assert bool(torch.isfinite(y).all())


@needs_native
def test_the_kernels_take_torchs_thread_count_in_every_thread() -> None:
    """torch.set_num_threads is honoured, also in a thread that has not run a torch op yet (torch gives a thread
    its count lazily), and the kernels share torch's OpenMP runtime (one pool of worker threads)."""
    import threading

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert native.num_threads() == 3
        seen: list[int] = []
        worker = threading.Thread(target=lambda: seen.append(native.num_threads()))
        worker.start()
        worker.join()
        assert seen == [3]
        torch.set_num_threads(1)
        assert native.num_threads() == 1
    finally:
        torch.set_num_threads(before)
    if "OpenMP" in torch.__config__.parallel_info():
        assert "threads: torch's OpenMP runtime" in native.status()


# --- no per-call work that could be done once (issue 18) -------------------------------------------------------


@needs_native
@pytest.mark.parametrize("storage", ["int8", "packed"])
def test_a_one_token_linear_does_its_lookups_once(monkeypatch: pytest.MonkeyPatch, storage: str) -> None:
    """After the first call, a packed Linear's one-token calls go straight to the native call: no CPU flags read
    (2-bit storage read them in every call), no row sums, no kernel choice made again."""
    torch.manual_seed(0)
    config = TernaryConfig()
    layer = nn.Linear(64, 32)
    codes, scale = to_quant_module(layer, config).weight_codes()
    packed = packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)
    x = torch.randn(1, 64)
    with torch.no_grad():
        first = packed(x)
        calls: list[str] = []
        for name in ("cpu_flags", "vnni", "row_sums", "available", "library"):
            original = getattr(native, name)
            monkeypatch.setattr(native, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
        for _ in range(3):
            assert torch.equal(packed(x), first)
        assert packed.kernel == "int8_gemv" and calls == []
        # what it binds holds pointers into its own tensors: a copy and a pickled layer bind their own
        monkeypatch.undo()
        clone = copy.deepcopy(packed)
        buffer = io.BytesIO()
        torch.save(packed, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), first)
        clone.ternq_codes.zero_()
        assert torch.equal(packed(x), first) and not torch.equal(clone(x), first)


@needs_native
def test_a_packed_linear_built_under_inference_mode_runs() -> None:
    """Its codes are inference tensors, which have no version counter: the row sums' cache read one and raised."""
    torch.manual_seed(0)
    config = TernaryConfig()
    layer = nn.Linear(64, 32)
    codes, scale = to_quant_module(layer, config).weight_codes()
    with torch.inference_mode():
        packed = packed_layer(layer, codes.detach().clone(), scale.detach().clone(), config, layer_spec(layer))
        y = packed(torch.randn(1, 64))
    assert packed.kernel == "int8_gemv" and bool(torch.isfinite(y).all())


def _foreign_openmp_runtimes() -> list[str]:
    """OpenMP runtimes on this machine that are not torch's: the system libgomp, scikit-learn's bundled copy."""
    import glob

    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    found = glob.glob("/usr/lib/*/libgomp.so.1.*") + glob.glob("/usr/lib*/libgomp.so.1.*")
    found += glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "*.libs", "libgomp*"))
    return sorted({os.path.realpath(p) for p in found if not os.path.realpath(p).startswith(torch_lib)})


@needs_native
@pytest.mark.parametrize("foreign", _foreign_openmp_runtimes() or [None])
def test_a_second_openmp_runtime_is_not_taken_for_torchs(foreign: str | None) -> None:
    """Another package's OpenMP runtime loaded after torch (scikit-learn's bundled libgomp did, in the full suite)
    must not become the kernels' pool: its thread count ignores torch.set_num_threads."""
    if foreign is None:
        pytest.skip("no second OpenMP runtime on this machine")
    code = textwrap.dedent(f"""
        import ctypes, torch
        ctypes.CDLL({foreign!r})
        from ternq.runtime import native
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert native.num_threads() == n, (n, native.num_threads(), native.status())
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@needs_native
@pytest.mark.parametrize("make, shape", [(lambda: nn.Conv1d(16, 24, 5, padding=2), (1, 16, 40)),
                                         (lambda: nn.Linear(64, 32), (1, 64)), (lambda: nn.Linear(64, 32), (9, 64))])
def test_native_turned_off_after_a_call_reaches_the_next_call(monkeypatch: pytest.MonkeyPatch, make, shape) -> None:
    """A layer remembers its kernel per input shape; `TERNQ_NATIVE=0` set after a call must still take effect
    (bench_bittts's eager pass raised `assert lib is not None` from a remembered native kernel)."""
    torch.manual_seed(0)
    config, float_layer = TernaryConfig(), make()
    codes, scale = to_quant_module(float_layer, config).eval().weight_codes()
    layer = packed_layer(float_layer, codes, scale, config, layer_spec(float_layer))
    x = torch.randn(*shape)
    with torch.inference_mode():
        native_out = layer(x)
        assert layer.kernel.startswith("int8")
        monkeypatch.setenv(native.NATIVE_ENV, "0")
        eager_out = layer(x)
    monkeypatch.delenv(native.NATIVE_ENV)
    torch.testing.assert_close(eager_out, native_out, rtol=0.05, atol=0.05 * native_out.abs().max().item())


def _change_memory(layer: nn.Module, how: str) -> None:
    """Give a packed layer's tensors other memory (or other values) while they stay the same objects."""
    with torch.no_grad():
        if how == "share_memory":  # moves every storage into shared memory (the old memory is freed)
            layer.share_memory()
            layer.scale.mul_(2)
            layer.bias.add_(1)
        elif how == "bias.data":
            layer.bias.data = torch.randn_like(layer.bias)
        elif how == "scale.data":
            layer.scale.data = layer.scale * 3
        else:  # codes.data: other codes, of the same storage and shape
            layer.ternq_codes.data = layer.ternq_codes.roll(1, -1)


@needs_native
@pytest.mark.parametrize("how", ["share_memory", "bias.data", "scale.data", "codes.data"])
@pytest.mark.parametrize("make, shape, kernel", [
    (lambda: nn.Linear(64, 32), (1, 64), None),  # one token: int8_gemv and `forward`'s fast path
    (lambda: nn.Linear(64, 32), (9, 64), "int8_tiled"),
    (lambda: nn.Conv1d(16, 24, 5, padding=2), (2, 16, 40), "int8_direct"),
    (lambda: nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1), (2, 16, 20), "int8_direct"),
])
def test_a_bound_native_call_follows_its_tensors_to_new_memory(make, shape, kernel: str | None, how: str) -> None:
    """The bound calls (`_gemv`, `_fast`, `_tiled`, `_direct`) hold raw addresses: a tensor that keeps its object
    but moves (``share_memory()``, ``.data =``) must rebind them, not read freed or stale memory."""
    torch.manual_seed(0)
    config, float_layer = TernaryConfig(), make()
    codes, scale = to_quant_module(float_layer, config).eval().weight_codes()
    layer = packed_layer(float_layer, codes, scale, config, layer_spec(float_layer))
    if kernel is not None:
        layer.kernel = kernel
    x = torch.randn(*shape)
    with torch.no_grad():
        layer(x)
        layer(x)
        assert layer.kernel == (kernel or "int8_gemv")
        _change_memory(layer, how)
        fresh = copy.deepcopy(layer)  # binds its own calls, to the tensors as they are now
        assert torch.equal(layer(x), fresh(x)) and torch.equal(layer(x), fresh(x))


@needs_native
@pytest.mark.parametrize("make, shape", [(lambda: nn.Linear(64, 32), (1, 64)), (lambda: nn.Linear(64, 32), (9, 64)),
                                         (lambda: nn.Conv1d(16, 24, 5, padding=2), (2, 16, 40))])
def test_a_torch_dispatch_mode_records_the_reference_path(make, shape) -> None:
    """make_fx's real-tensor tracing (a TorchDispatchMode) records torch ops only: a native kernel's ctypes call
    left the output's allocation alone in the graph, whose replay returned uninitialized memory."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    config, float_layer = TernaryConfig(), make()
    codes, scale = to_quant_module(float_layer, config).eval().weight_codes()
    layer = packed_layer(float_layer, codes, scale, config, layer_spec(float_layer))
    x = torch.randn(*shape)
    with torch.no_grad():
        layer(x)
        layer(x)  # the one-token fast path is armed
        graph = make_fx(layer, tracing_mode="real")(x)
        other = torch.randn(*shape) * 3
        layer.kernel = "weight_only"
        assert torch.equal(graph(other), layer(other))
