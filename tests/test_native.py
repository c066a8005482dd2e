"""The native kernels (ternq/_kernels.c via ternq.native): build cache, clean degradation, kernel properties."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ternq import TernaryConfig, native
from ternq.layers import layer_spec, to_quant_module
from ternq.runtime import packed_layer
from ternq.storage import pack_rows

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


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
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary name was renamed away
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
