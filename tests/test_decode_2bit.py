"""Linear layers on 2-bit rows read as stored (ternq/runtime/csrc/ternq_packed.c, storage="packed"): exactly the
int8 kernels' results on every -march variant, never the int8 codes of a whole layer in memory, and the default
storage chosen once at load from the CPU and the layer's shape."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from native_builds import ARCHS, native_build
from torch import nn

from ternq import KBitConfig, TernaryConfig, native
from ternq.qat.layers import layer_spec, to_quant_module
from ternq.runtime import STORAGE_ENV, packed_layer, picker, resident_bytes
from ternq.runtime import kernels as runtime_kernels
from ternq.runtime import layers as runtime_layers
from ternq.runtime.storage import pack_rows

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _rows_case(rows: int, k: int, n: int, lo: int, per_channel: bool, bias: bool, bad: float | None,
               seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Activations (rows, k) with `bad` planted in one row, codes (n, k) in [lo, 1], scales, bias, the 2-bit rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * 3
    if bad is not None:
        x[rows // 2, k // 3] = bad
    w = torch.randint(lo, 2, (n, k), generator=g, dtype=torch.int8)
    wscale = torch.rand(n if per_channel else 1, generator=g) + 0.5
    b = torch.randn(n, generator=g) if bias else None
    return x, w, wscale, b, pack_rows(w, 2)


@needs_native
@settings(deadline=None, max_examples=60)
@example(rows=1, k=2048, n=9, lo=-1, per_channel=True, bias=True, bad=None, seed=0)  # 8 full AVX-512 chunks
@example(rows=3, k=257, n=5, lo=-2, per_channel=False, bias=False, bad=float("nan"), seed=1)
@given(rows=st.integers(1, 6), k=st.integers(1, 600), n=st.integers(1, 13), lo=st.sampled_from([-1, -2]),
       per_channel=st.booleans(), bias=st.booleans(),
       bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), seed=st.integers(0, 2**16))
def test_2bit_rows_give_the_int8_result_bit_for_bit(arch_cache, rows: int, k: int, n: int, lo: int,
                                                    per_channel: bool, bias: bool, bad: float | None,
                                                    seed: int) -> None:
    """The one-call Linear on 2-bit rows == the one on int8 codes, bit for bit, on every loop (AVX-512 VNNI,
    AVX2, portable): K not a multiple of 4, 32 or 64 (masked tails, the last plane's padding fields), ternary
    and int2 codes ([-2, 1]), 1 to 6 rows; a NaN / Inf in a row gives a non-finite output row, as the int8 path.
    `unpack_2bit` (the GEMM's tiles) gives the codes back."""
    x, w, wscale, b, two_bit = _rows_case(rows, k, n, lo, per_channel, bias, bad, seed)
    for arch in ARCHS:
        with native_build("1", arch, arch_cache):
            assert native.available(), native.status()
            ref = native.linear_rows(x, "rmsnorm", 1e-5, 8, 1, w, None, wscale, per_channel, b)
            y = native.linear_rows(x, "rmsnorm", 1e-5, 8, 1, two_bit, None, wscale, per_channel, b)
            torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)  # bit for bit
            if bad is not None:
                assert not bool(torch.isfinite(y[rows // 2]).any()), arch
            tile = torch.full((n, k), 99, dtype=torch.int8)
            r0 = n // 3
            native.unpack_2bit(two_bit, k, r0, n, tile[: n - r0])
            assert torch.equal(tile[: n - r0], w[r0:]), arch


@needs_native
@settings(deadline=None, max_examples=40)
@example(lead=(1, 1), k=2048, n=7, two_bit=True, per_sample=False, strided=False, seed=0)  # a decode step's input
@example(lead=(0, 4), k=5, n=3, two_bit=False, per_sample=True, strided=False, seed=0)  # an empty batch, per sample
@given(lead=st.sampled_from([(), (1,), (3,), (1, 1), (2, 3), (2, 1, 3), (0, 4)]), k=st.integers(1, 300),
       n=st.integers(1, 13), two_bit=st.booleans(), per_sample=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bound_gemv_takes_any_rank(lead: tuple[int, ...], k: int, n: int, two_bit: bool, per_sample: bool,
                                   strided: bool, seed: int) -> None:
    """The bound GEMV a packed Linear calls per token (`kernels.linear_gemv_bound`, `native.linear_rows_bound`)
    takes x (..., K) of any rank, contiguous or not, and returns (..., N): the 2-D call's result on
    x.reshape(-1, K), bit for bit (per token, and per sample with its rows per scale; an empty batch per sample
    divided by zero in a direct call before)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) * 3
    if strided and x.dim() >= 2:  # same values, another memory order
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    wscale, bias = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    stored = pack_rows(w, 2) if two_bit else w
    wsum = None if two_bit else w.sum(-1, dtype=torch.int32)
    cfg = TernaryConfig(granularity="channel", act_granularity="tensor" if per_sample else "token")
    rows = x.reshape(-1, k).contiguous()
    per = runtime_kernels._rows_per_scale(x, cfg)
    ref = native.linear_rows(rows, cfg.input_norm, cfg.eps, 8, per, stored, wsum, wscale, True, bias)
    got = runtime_kernels.linear_gemv_bound(stored, wsum, wscale, bias, cfg)(x)
    assert got.shape == (*lead, n)
    torch.testing.assert_close(got.reshape(-1, n), ref, rtol=0, atol=0, equal_nan=True)
    if not per_sample:
        direct = native.linear_rows_bound(cfg.input_norm, cfg.eps, 8, stored, wsum, wscale, True, bias)(x)
        torch.testing.assert_close(direct, got, rtol=0, atol=0)


def _fresh_packed(layer: nn.Linear, storage: str):
    config = TernaryConfig(granularity="channel")
    qat = to_quant_module(layer, config).eval()
    with torch.no_grad():
        codes, scale = qat.weight_codes()
    return qat, packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)


@needs_native
@settings(deadline=None, max_examples=12)
@example(tokens=64, k=1000, n=1100, threads=1, seed=0)  # several 512 KiB tiles, the last one partial
@example(tokens=64, k=77, n=7, threads=1, seed=32557)  # activation codes one apart from the float reference's
@given(tokens=st.sampled_from([1, 2, 5, 64, 100]), k=st.integers(2, 300), n=st.integers(1, 40),
       threads=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_packed_linear_every_kernel_equals_int8_storage(tokens: int, k: int, n: int, threads: int,
                                                        seed: int) -> None:
    """storage="packed" gives storage="int8"'s output bit for bit on every integer kernel (the GEMV, and the GEMMs
    on decoded tiles), at 1 and an odd number of threads, without unpacking the layer's codes (what every GEMM
    call did before: the int8 codes of the whole layer, made and dropped per call)."""
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    qat, packed = _fresh_packed(layer, "packed")
    _, int8 = _fresh_packed(layer, "int8")
    x = torch.randn(tokens, k)

    def refuse(*args, **kwargs):
        raise AssertionError("the 2-bit rows were unpacked whole")

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    mp = pytest.MonkeyPatch()  # not the fixture: hypothesis runs many examples in one test
    mp.setattr(runtime_kernels, "unpack_rows", refuse)
    mp.setattr(runtime_layers, "unpack_rows", refuse)
    try:
        with torch.no_grad():
            for kernel in packed._applicable(x):
                if kernel == "weight_only":
                    continue
                packed.kernel = int8.kernel = kernel
                assert torch.equal(packed(x), int8(x)), kernel
            ref = qat(x)
    finally:
        mp.undo()
        torch.set_num_threads(saved)
    packed.kernel = "auto"
    with torch.no_grad():
        got = packed(x)
        # The float reference rounds its activations in float, the kernels after their own (native) norm: at a
        # rounding tie the two may pick neighbouring codes, which moves an output by one activation step times the
        # channel's weight scale (seed 32557, 64 x 77 -> 7: 3 of 448 outputs by 1.1e-3). Allow two such steps.
        _, wscale = qat.weight_codes()
        normed = torch.nn.functional.layer_norm(x, (k,), eps=qat.qconfig.eps)
        step = normed.abs().amax(dim=1, keepdim=True) / 127 * wscale.reshape(1, -1)
        assert bool(((got - ref).abs() <= 2 * step + 1e-4).all()), (got - ref).abs().max()


def test_choose_storage_rules() -> None:
    """2-bit rows for large Linear layers of 2-bit codes on a SIMD build; int8 everywhere else."""
    big = picker.PACKED_MIN_WEIGHTS
    for isa in ("avx2", "avx_vnni", "avx512_vnni"):
        assert picker.choose_storage(True, 2, big, isa) == "packed"
    assert picker.choose_storage(True, 2, big - 1, "avx512_vnni") == "int8"  # in cache: int8 is as fast
    assert picker.choose_storage(True, 2, big, "portable") == "int8"
    assert picker.choose_storage(True, 2, big, None) == "int8"  # no native kernels
    assert picker.choose_storage(True, 4, big, "avx2") == "int8"
    assert picker.choose_storage(False, 2, big, "avx2") == "int8"  # not a Linear the 2-bit kernels run


def test_default_storage_is_chosen_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without storage= (or with "auto"), a large ternary Linear keeps 2-bit rows where the native build has a SIMD
    loop on them: at most 2.1 bits per weight resident; small layers and 4-bit codes keep int8."""
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    torch.manual_seed(0)
    big = nn.Linear(1024, 1024, bias=False)
    _, packed = _fresh_packed(big, None)  # type: ignore[arg-type]
    expected = "packed" if native.packed_isa() not in (None, "portable") else "int8"
    assert packed.storage == expected
    if expected == "packed":
        assert resident_bytes(packed) * 8 / big.weight.numel() <= 2.1
        assert packed.ternq_codes.dtype == torch.uint8
    _, small = _fresh_packed(nn.Linear(256, 256), "auto")
    assert small.storage == "int8"
    config = KBitConfig(bits=4, granularity="channel")
    qat = to_quant_module(nn.Linear(1024, 1024), config).eval()
    codes, scale = qat.weight_codes()
    assert packed_layer(qat, codes, scale, config, layer_spec(qat)).storage == "int8"
    with pytest.raises(ValueError, match="auto"):
        _fresh_packed(big, "int2")


def _eager_linear(x: torch.Tensor, w: torch.Tensor, wscale: torch.Tensor, per_channel: bool,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """The one-token Linear in eager torch on the native quantizer's codes: int64 dot products, then the epilogue's
    float32 operations in its order (``acc * wscale[n] * s`` per channel, ``acc * (s * wscale)`` per tensor)."""
    q = torch.empty(x.shape, dtype=torch.int8)
    s = torch.empty(x.shape[0], dtype=torch.float32)
    native.quantize_rows(x, None, 1e-5, 8, 1, q, s)
    acc = (q.long() @ w.long().t()).to(torch.int32).to(torch.float32)
    y = acc * wscale.view(1, -1) * s.view(-1, 1) if per_channel else acc * (s.view(-1, 1) * wscale)
    return y if bias is None else y + bias


@needs_native
@settings(deadline=None, max_examples=25)
@example(rows=1, k=1031, n=9, lo=-1, per_channel=True, bias=True, bad=None, seed=0)  # 4 full 64-byte columns + tail
@example(rows=1, k=2048, n=1, lo=-2, per_channel=False, bias=False, bad=float("inf"), seed=3)  # one output row
@given(rows=st.integers(1, 3), k=st.integers(1, 1100), n=st.integers(1, 13), lo=st.sampled_from([-1, -2]),
       per_channel=st.booleans(), bias=st.booleans(),
       bad=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), seed=st.integers(0, 2**16))
def test_2bit_gemv_equals_the_eager_integer_reference(arch_cache, rows: int, k: int, n: int, lo: int,
                                                      per_channel: bool, bias: bool, bad: float | None,
                                                      seed: int) -> None:
    """The GEMV on 2-bit rows (each plane's fields taken in place, the odd planes in their own accumulator) equals
    eager int64 dot products of the same activation codes, bit for bit, on every loop the build has (AVX-512 VNNI,
    AVX2, portable) and split between 1, 2 and 3 threads (chunks of any size): K off every block (64-byte columns,
    masked tails), one output row, ternary and int2 codes; a NaN / Inf in a token gives a non-finite output row."""
    x, w, wscale, b, two_bit = _rows_case(rows, k, n, lo, per_channel, bias, bad, seed)
    saved = torch.get_num_threads()
    for arch in ARCHS:
        with native_build("1", arch, arch_cache):
            assert native.available(), native.status()
            ref = _eager_linear(x, w, wscale, per_channel, b)
            native.library().tq_set_min_work(1)  # split even these small shapes
            got = {}
            try:
                for threads in (1, 2, 3):
                    torch.set_num_threads(threads)
                    got[threads] = native.linear_rows(x, None, 1e-5, 8, 1, two_bit, None, wscale, per_channel, b)
            finally:
                native.library().tq_set_min_work(1 << 18)
                torch.set_num_threads(saved)
            torch.testing.assert_close(got[1], ref, rtol=0, atol=0, equal_nan=True, msg=arch)
            for threads in (2, 3):  # the same bytes, NaN payloads included
                assert torch.equal(got[threads].view(torch.int32), got[1].view(torch.int32)), (arch, threads)
            if bad is not None:
                assert not bool(torch.isfinite(got[1][rows // 2]).any()), arch


_EVENTS = ("call", "call", "call", "prompt", "float64", "strided", "grad", "env_weight_only", "env_unset", "threads",
           "reset", "force", "auto", "bias", "load", "hook")


@needs_native
@settings(deadline=None, max_examples=30)
@example(events=["force", "grad", "auto", "call", "call", "env_weight_only", "call"], storage="packed", seed=0)
@given(events=st.lists(st.sampled_from(_EVENTS), min_size=1, max_size=14), storage=st.sampled_from(["packed", "int8"]),
       seed=st.integers(0, 2**16))
def test_one_token_calls_skip_the_picker_until_what_it_read_changes(events: list[str], storage: str,
                                                                   seed: int) -> None:
    """A packed Linear's repeated one-token call runs the bound GEMV without asking the picker again (a decode step
    makes one per matrix), and every change the choice or the binding depends on reaches the next call: the
    environment's override, the thread count, `reset_kernel_choices`, a forced kernel, a gradient, another dtype or
    shape, new bias or codes, a pre-hook changing the input; a strided input of the same shape takes the same path. Each call returns what the kernel the picker chooses
    for it returns (the layer's `kernel` says which)."""
    torch.manual_seed(seed)
    layer = nn.Linear(300, 20)
    _, packed = _fresh_packed(layer, storage)
    x = torch.randn(1, 1, 300)
    picks = []
    original = runtime_layers.PackedLayer._pick

    def counting(self, *args, **kwargs):
        picks.append(1)
        return original(self, *args, **kwargs)

    mp = pytest.MonkeyPatch()  # not the fixture: hypothesis runs many examples in one test
    mp.setattr(runtime_layers.PackedLayer, "_pick", counting)
    mp.delenv(runtime_layers.KERNEL_ENV, raising=False)
    saved = torch.get_num_threads()
    hooks = []
    steady = False  # the last call ran int8_gemv automatically on x, and nothing changed since
    try:
        for event in events:
            inp = x
            if event == "prompt":
                inp = torch.randn(1, 5, 300)
            elif event == "float64" and os.environ.get(runtime_layers.KERNEL_ENV) != "weight_only":
                inp = x.double()  # (weight_only adds the float32 bias to it: an error, as in the float layer)
            elif event == "strided":
                inp = torch.randn(1, 1, 600)[..., ::2]
            elif event == "grad":
                inp = x.clone().requires_grad_()
            elif event == "env_weight_only":
                mp.setenv(runtime_layers.KERNEL_ENV, "weight_only")
            elif event == "env_unset":
                mp.delenv(runtime_layers.KERNEL_ENV, raising=False)
            elif event == "threads":
                torch.set_num_threads(1 + (torch.get_num_threads() % 3))
            elif event == "reset":
                runtime_layers.reset_kernel_choices()
            elif event == "force":
                packed.kernel = "int8_gemm"
            elif event == "auto":
                packed.kernel = "auto"
            elif event == "bias":
                packed.bias = nn.Parameter(torch.randn(20))
            elif event == "load":
                packed.load_state_dict({"weight": torch.randn(20, 300), "bias": torch.randn(20)})
            elif event == "hook":
                hooks.append(packed.register_forward_pre_hook(lambda module, args: (args[0] * 2,)))
            if event != "call":
                steady = False
            if event == "grad" and packed._forced is not None:
                with pytest.raises(RuntimeError, match="inference-only"):  # a forced integer kernel: no gradient
                    packed(inp)
                continue
            before = len(picks)
            with torch.no_grad() if event != "grad" else contextlib.nullcontext():
                y = packed(inp)
            hooked = inp * 2 ** len(hooks)
            name = packed.kernel
            if steady:
                assert len(picks) == before, "a repeated one-token call asked the picker again"
            else:
                expected = runtime_layers.PackedLayer._pick_uncached(packed, hooked, (), {})
                assert name == expected, (event, name, expected)
            with torch.no_grad() if event != "grad" else contextlib.nullcontext():
                ref = packed.kernel_impls[name](packed, hooked)
            assert torch.equal(y, ref), (event, name)
            steady = (name == "int8_gemv" and inp is x and packed._forced is None)
    finally:
        for h in hooks:
            h.remove()
        mp.undo()
        torch.set_num_threads(saved)
