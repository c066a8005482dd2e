"""The native one-pass activation fake-quantizer (ternq_act.c, issue 19) against the eager torch form.

The kernel must return the eager form's bits (same IEEE operations in the same order), at any thread count and in
every build, and must not run where the eager form has to (graph recording, autocast, other dtypes or layouts).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from native_builds import ARCHS, native_build

from ternq import TernaryConfig, native
from ternq.qat import quantizers
from ternq.qat.quantizers import fake_quantize_activation, quantize_input, register_activation_kernel

pytestmark = pytest.mark.skipif(not native.available(), reason="no native kernels (no C compiler)")


class Spy:
    """The registered kernel, counting the calls that reached it and the ones it ran."""

    def __init__(self) -> None:
        self.calls = self.ran = 0

    def __call__(self, *args: object) -> bool:
        self.calls += 1
        ran = native.fake_quantize(*args)  # type: ignore[arg-type]
        self.ran += ran
        return ran


@contextlib.contextmanager
def kernel(k: object) -> Iterator[None]:
    """Run with activation kernel `k` (None: the eager form), then the native one again."""
    register_activation_kernel(k)  # type: ignore[arg-type]
    try:
        yield
    finally:
        register_activation_kernel(native.fake_quantize)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (the sign of a zero included), a NaN where the other has one."""
    nan = torch.isnan(a)
    return a.shape == b.shape and torch.equal(nan, torch.isnan(b)) \
        and torch.equal(a.masked_fill(nan, 0).view(torch.int32), b.masked_fill(nan, 0).view(torch.int32))


@st.composite
def activations(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, str]:
    """(x, dim, bits, granularity): 1-4 dims of odd and unit sizes, lines of zeros, exact ties (every line's max
    is qmax, so its scale is 1 and the half-integers are ties), NaN / Inf planted."""
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 37), min_size=ndim, max_size=ndim))
    if ndim >= 2 and draw(st.booleans()):
        shape[-1] = draw(st.sampled_from([16, 32, 300]))  # whole vectors, and a block past 256 columns
    bits = draw(st.integers(2, 8))
    qmax = 2 ** (bits - 1) - 1
    granularity = draw(st.sampled_from(["token", "tensor"]))
    dim = draw(st.sampled_from([-1, 1] if ndim >= 2 else [-1]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([1e-7, 1e-3, 1.0, 1e4]))
    if draw(st.booleans()):  # ties
        x = (x * 4 * qmax).round().div(2).clamp(-qmax, qmax)
        x.select(dim, 0).fill_(qmax)
    if ndim >= 2 and draw(st.booleans()):
        x.select(dim if granularity == "token" and dim == 1 else 0, 0).zero_()  # a line (or sample) of zeros
    special = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if special is not None:
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    return x, dim, bits, granularity


@settings(max_examples=120, deadline=None)
@given(activations(), st.sampled_from([1, 2, 3]))
def test_the_kernel_is_the_eager_form_bit_for_bit(case: tuple[torch.Tensor, int, int, str], threads: int) -> None:
    x, dim, bits, granularity = case
    spy, before = Spy(), torch.get_num_threads()
    native.library().tq_set_min_work(1)  # small shapes split into chunks too
    torch.set_num_threads(threads)
    try:
        with kernel(spy):
            fast = fake_quantize_activation(x, bits, dim, 1e-5, granularity)
    finally:
        native.library().tq_set_min_work(1 << 18)
        torch.set_num_threads(before)
    with kernel(None):
        eager = fake_quantize_activation(x, bits, dim, 1e-5, granularity)
    assert spy.ran == 1
    assert same_bits(fast, eager), (fast, eager)


@settings(max_examples=30, deadline=None)
@given(case=activations(), arch=st.sampled_from(ARCHS))
def test_every_build_gives_the_eager_bits(case: tuple[torch.Tensor, int, int, str], arch: str, arch_cache) -> None:
    """The AVX-512 loops (native), and the portable ones the compiler vectorizes (haswell, x86-64)."""
    x, dim, bits, granularity = case
    with kernel(None):
        eager = fake_quantize_activation(x, bits, dim, 1e-5, granularity)
    spy = Spy()
    with native_build("1", arch, arch_cache), kernel(spy):
        fast = fake_quantize_activation(x, bits, dim, 1e-5, granularity)
    assert spy.ran == 1
    assert same_bits(fast, eager)


@settings(max_examples=40, deadline=None)
@given(activations(), st.sampled_from([None, "layernorm", "rmsnorm"]), st.integers(0, 2**31 - 1))
def test_training_values_and_gradients_are_the_eager_ones(case: tuple[torch.Tensor, int, int, str],
                                                          norm: str | None, seed: int) -> None:
    """Through a layer's input quantization (input norm and quantizer in one node, or the quantizer alone):
    the same forward bits and the same gradient, in place on the norm's output included."""
    x, dim, bits, granularity = case
    config = TernaryConfig(act_bits=bits, act_granularity=granularity, input_norm=norm)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    results = []
    for k in (Spy(), None):
        leaf = x.clone().requires_grad_(True)
        with kernel(k):
            y = quantize_input(leaf, config, dim)
        y.backward(upstream)
        results.append((y.detach(), leaf.grad))
        if k is not None:
            assert k.ran == 1
    (fast, fast_grad), (eager, eager_grad) = results
    assert same_bits(fast, eager)
    assert same_bits(fast_grad, eager_grad)


def test_non_contiguous_and_other_dtypes_take_the_eager_form() -> None:
    """A transposed or sliced input, and bfloat16 / float64 ones, never reach the kernel (it reads float32 rows
    as they lie in memory); their values are the eager form's."""
    x = torch.randn(6, 10, 12)
    spy = Spy()
    for t in (x.transpose(1, 2), x[:, ::2], x.to(torch.bfloat16), x.double()):
        with kernel(spy):
            fast = fake_quantize_activation(t, 8, -1)
        with kernel(None):
            eager = fake_quantize_activation(t, 8, -1)
        assert torch.equal(fast, eager)
    assert spy.calls == 0
    with kernel(spy):  # dims that are not one run of consecutive dims, and 1 bit (no code but 0): eager
        quantizers._fake_quantize(x, 8, (0, 2), 1e-5, inplace=False)
        quantizers._fake_quantize(x, 1, (2,), 1e-5, inplace=False)
    assert spy.calls == 0


def test_recorded_graphs_and_autocast_take_the_eager_form() -> None:
    """torch.jit.trace records torch ops only, and autocast may change their dtypes: the kernel stays out."""
    x = torch.randn(4, 8)
    spy = Spy()
    with kernel(spy):
        traced = torch.jit.trace(lambda t: fake_quantize_activation(t, 8, -1), (x,), check_trace=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = fake_quantize_activation(x, 8, -1)
    assert spy.calls == 0
    with kernel(None):
        assert torch.equal(traced(x * 3), fake_quantize_activation(x * 3, 8, -1))  # the graph computes
        assert torch.equal(under_autocast, fake_quantize_activation(x, 8, -1))


def test_without_the_native_kernels_the_eager_form_runs(tmp_path) -> None:
    """TERNQ_NATIVE=0: the registered kernel declines and the eager form gives the value."""
    x = torch.randn(5, 33)
    spy = Spy()
    with native_build("0", "native", tmp_path), kernel(spy):
        y = fake_quantize_activation(x, 8, -1)
    assert spy.calls == 1 and spy.ran == 0
    with kernel(None):
        assert torch.equal(y, fake_quantize_activation(x, 8, -1))


def test_the_runtime_registers_the_kernel() -> None:
    """``import ternq`` loads ternq.runtime.native, which installs its kernel in the QAT quantizers."""
    spy = Spy()
    with kernel(spy):
        fake_quantize_activation(torch.randn(3, 4), 8, -1)
    assert spy.ran == 1
    assert quantizers._ACTIVATION_KERNEL[0] is native.fake_quantize


def test_torch_compile_records_the_torch_form() -> None:
    """Under torch.compile the quantizer is traced as torch ops (a ctypes call cannot be in a graph): the kernel
    is not called, and the compiled function gives the same values and gradient."""
    x = torch.randn(4, 8, requires_grad=True)
    spy = Spy()
    with kernel(spy):
        compiled = torch.compile(lambda t: fake_quantize_activation(t, 8, -1), backend="eager", fullgraph=True)
        y = compiled(x)
    assert spy.calls == 0
    y.backward(torch.ones_like(y))
    assert torch.equal(y, fake_quantize_activation(x, 8, -1)) and torch.equal(x.grad, torch.ones_like(x))


def test_a_torch_dispatch_mode_sees_the_torch_form() -> None:
    """A TorchDispatchMode (make_fx's real-tensor tracing, FlopCounterMode, selective checkpointing) sees each torch
    op; a ctypes call passes it by. make_fx recorded only the output's ``empty_like``: replayed, the graph
    returned uninitialized memory. Under a mode the kernel stays out and the graph computes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(4, 32)
    spy = Spy()
    with kernel(spy):
        graph = make_fx(lambda t: fake_quantize_activation(t, 8, -1), tracing_mode="real")(x)
    assert spy.calls == 0
    with kernel(None):
        other = torch.randn(4, 32) * 5
        assert torch.equal(graph(other), fake_quantize_activation(other, 8, -1))
