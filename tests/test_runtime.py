"""Packed runtime layers against the QAT layers in eval mode, for every kernel and storage.

Tolerance (documented in `ternq.runtime`): activation and weight codes are identical, int32 accumulation is
exact, so a kernel may differ from the QAT layer only by float32 rounding of ``s_x * scale * sum(q * c)``:
``|y - y_qat| <= 1e-5 * (|x_q| op |W_q|) + 1e-6`` elementwise. ``weight_only`` runs the QAT arithmetic itself
and must match bit for bit.
"""
from __future__ import annotations

import copy
import gc
import itertools
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from native_builds import ARCHS, native_build
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import ternq
from ternq import (
    ArchitectureMismatchError,
    FormatError,
    KBitConfig,
    QuantConfig,
    TernaryConfig,
    native,
    register_layer,
)
from ternq.native import NATIVE_ENV
from ternq.qat.layers import layer_spec, to_quant_module
from ternq.runtime import (
    KERNEL_ENV,
    STORAGE_ENV,
    PackedConv1d,
    PackedLinear,
    is_packed,
    kernel_choices,
    packed_layer,
    resident_bytes,
)
from ternq.runtime.packed_weight import PackedWeight
from ternq.runtime.storage import pack_rows, unpack_rows

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning",
                                        "ignore:Using padding='same':UserWarning")

STORAGES = ("int8", "packed")


def qat_and_codes(layer: nn.Module, config: QuantConfig) -> tuple[nn.Module, Tensor, Tensor]:
    qat = to_quant_module(layer, config).eval()
    with torch.no_grad():
        codes, scale = qat.weight_codes()
    return qat, codes, scale


def pack(layer: nn.Module, config: QuantConfig, **kwargs) -> nn.Module:
    _, codes, scale = qat_and_codes(layer, config)
    return packed_layer(layer, codes, scale, config, layer_spec(layer), **kwargs)


def magnitude(qat: nn.Module, x: Tensor, xq: Tensor | None = None, **call) -> Tensor:
    """``|x_q| op |W_q| + |bias|``: the size of the terms each output sums (the rounding-error scale)."""
    spec = qat._ternq_spec
    if spec.feature_dim is None:
        return qat(x, **call).abs()
    absolute = copy.copy(qat)
    absolute._parameters = dict(qat._parameters)
    if absolute._parameters.get("bias") is not None:
        absolute._parameters["bias"] = qat.bias.abs()
    xq = qat.quantize_input(x) if xq is None else xq
    return spec.forward(absolute, xq.abs(), qat.hard_weight().abs(), **call)


def packed_activations(packed: nn.Module, qat: nn.Module, x: Tensor) -> Tensor | None:
    """The fake-quantized input an integer kernel of `packed` multiplies (``q * s``), checked against the QAT
    layer's: the same scales (to float32 rounding) and codes, except that a code may differ by one step where the
    native kernels' summation order moves the normalized value across a rounding boundary. None where the
    layer quantizes no activations."""
    dim = packed.spec.feature_dim
    if dim is None or packed.qconfig.act_bits is None or not x.is_floating_point() or x.numel() == 0:
        return None
    if x.dim() == 2 and isinstance(packed, nn.Conv1d | nn.ConvTranspose1d):
        return None  # unbatched conv inputs run weight_only
    q, s = packed._quantize_int8(x, dim)
    xq = q.to(x.dtype) * s.to(x.dtype)
    ref = qat.quantize_input(x)
    step = s.to(x.dtype).expand_as(ref)
    ref_codes = torch.round(ref.float() / step.float())  # the QAT codes (the scales agree to a few ulp)
    differ = q != ref_codes
    rel = 1e-5 if x.dtype == torch.float32 else 1e-2
    assert bool(((q - ref_codes).abs() <= 1).all()), "codes differ by more than one step"
    assert bool(((xq - ref).abs()[~differ] <= rel * ref.abs()[~differ]).all()), "scales differ"
    assert int(differ.sum()) <= max(2, ref.numel() // 1000), f"{int(differ.sum())} of {ref.numel()} codes differ"
    return xq


def assert_matches_qat(layer: nn.Module, config: QuantConfig, x: Tensor, **call) -> None:
    """Every kernel x storage x (native kernels, eager fallback) of the packed layer against the QAT layer:
    weight_only bit for bit, the integer kernels within the float32 rounding bound of the products of the codes
    they used (`packed_activations`)."""
    qat, codes, scale = qat_and_codes(layer, config)
    with torch.no_grad():
        ref = qat(x, **call)
        for storage, mode in itertools.product(STORAGES, ("1", "0")):
            os.environ[NATIVE_ENV] = mode
            try:
                _assert_kernels(layer, qat, codes, scale, config, storage, x, ref, **call)
            finally:
                del os.environ[NATIVE_ENV]


def _assert_kernels(layer: nn.Module, qat: nn.Module, codes: Tensor, scale: Tensor, config: QuantConfig,
                    storage: str, x: Tensor, ref: Tensor, **call) -> None:
    packed = packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)
    assert torch.equal(packed.codes, codes)
    xq = packed_activations(packed, qat, x)
    int_ref = ref if xq is None else qat._ternq_spec.forward(qat, xq, qat.hard_weight(), **call)
    bound = 1e-5 * magnitude(qat, x, xq, **call) + 1e-6
    for kernel in packed._applicable(x):
        packed.kernel = kernel
        y = packed(x, **call)
        assert y.shape == ref.shape and y.dtype == ref.dtype, kernel
        if kernel == "weight_only":
            assert torch.equal(y, ref), (storage, kernel)
        else:
            err = (y - int_ref).abs()
            assert bool((err <= bound).all()), (storage, kernel, float(err.max()), float(bound.min()))


# --- properties over layer types, configs and shapes -----------------------------------------------------------

configs = st.builds(
    lambda kind, gran, group, act, norm, act_gran: (TernaryConfig if kind == "ternary" else KBitConfig)(
        granularity=gran, group_size=group, act_bits=act, input_norm=norm, act_granularity=act_gran),
    st.sampled_from(["ternary", "kbit"]),
    st.sampled_from(["tensor", "channel", "group"]),
    st.integers(1, 9),
    st.sampled_from([8, None, 4]),
    st.sampled_from(["layernorm", "rmsnorm", None]),
    st.sampled_from(["token", "tensor"]),
)


@settings(deadline=None, max_examples=40)
@given(config=configs, n_in=st.integers(1, 40), n_out=st.integers(1, 24),
       lead=st.lists(st.integers(1, 5), min_size=0, max_size=2), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_qat(config: QuantConfig, n_in: int, n_out: int, lead: list[int], bias: bool,
                            seed: int) -> None:
    torch.manual_seed(seed)
    assert_matches_qat(nn.Linear(n_in, n_out, bias=bias), config, torch.randn(*lead, n_in) * 3)


@settings(deadline=None, max_examples=40)
@given(config=configs, groups=st.sampled_from([1, 2, 3]), per_in=st.integers(1, 6), per_out=st.integers(1, 5),
       k=st.integers(1, 5), stride=st.integers(1, 3), dilation=st.integers(1, 3), padding=st.integers(0, 4),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), length=st.integers(0, 20),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_conv1d_matches_qat(config: QuantConfig, groups: int, per_in: int, per_out: int, k: int, stride: int,
                            dilation: int, padding: int, mode: str, length: int, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv1d(groups * per_in, groups * per_out, k, stride=stride, dilation=dilation, padding=padding,
                     groups=groups, padding_mode=mode)
    length += dilation * (k - 1) + 1 + (padding if mode != "zeros" else 0)  # long enough for the kernel and pad
    assert_matches_qat(conv, config, torch.randn(batch, groups * per_in, length))


@settings(deadline=None, max_examples=25)
@given(config=configs, groups=st.sampled_from([1, 2]), per_in=st.integers(1, 6), per_out=st.integers(1, 5),
       k=st.integers(1, 6), stride=st.integers(1, 4), dilation=st.integers(1, 2), padding=st.integers(0, 3),
       extra=st.integers(0, 3), length=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_conv_transpose1d_matches_qat(config: QuantConfig, groups: int, per_in: int, per_out: int, k: int,
                                      stride: int, dilation: int, padding: int, extra: int, length: int,
                                      seed: int) -> None:
    torch.manual_seed(seed)
    output_padding = extra % max(stride, dilation)
    conv = nn.ConvTranspose1d(groups * per_in, groups * per_out, k, stride=stride, padding=padding,
                              output_padding=output_padding, groups=groups, dilation=dilation)
    x = torch.randn(2, groups * per_in, length)
    if (length - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1 < 1:
        return  # torch rejects this shape as well
    assert_matches_qat(conv, config, x)


@settings(deadline=None, max_examples=15)
@given(config=configs, k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_conv2d_matches_qat(config: QuantConfig, k: int, stride: int, padding: int, seed: int) -> None:
    torch.manual_seed(seed)
    assert_matches_qat(nn.Conv2d(3, 4, k, stride=stride, padding=padding), config, torch.randn(2, 3, 6, 5))


@settings(deadline=None, max_examples=15)
@given(config=configs, num=st.integers(1, 30), dim=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_embedding_matches_qat(config: QuantConfig, num: int, dim: int, seed: int) -> None:
    torch.manual_seed(seed)
    assert_matches_qat(nn.Embedding(num, dim), config, torch.randint(0, num, (3, 4)))


# the vocoder's convolutions (HiFi-GAN): resblock kernels 3 / 7 / 11 with dilations 1 / 3 / 5, upsampling by 8 and 2
VOCODER_CONVS = [
    *[(nn.Conv1d, dict(kernel_size=k, dilation=d, padding=(k * d - d) // 2)) for k in (1, 3, 5, 7, 11) for d in (1, 3, 5)],
    (nn.ConvTranspose1d, dict(kernel_size=16, stride=8, padding=4)),
    (nn.ConvTranspose1d, dict(kernel_size=4, stride=2, padding=1)),
    (nn.ConvTranspose1d, dict(kernel_size=11, stride=5, padding=3, output_padding=2)),
    (nn.ConvTranspose1d, dict(kernel_size=3, stride=8, padding=0)),  # stride > k: phases without taps
]


@pytest.mark.skipif(not native.available(), reason="native kernels")
@settings(deadline=None, max_examples=30)
@given(conv=st.sampled_from(VOCODER_CONVS), c_in=st.sampled_from([1, 5, 8, 13, 32]),
       c_out=st.sampled_from([1, 3, 8, 16, 33]), length=st.sampled_from([1, 2, 37, 255, 300]),
       slope=st.sampled_from([None, 0.1]), spoil=st.sampled_from([None, float("nan"), float("inf")]),
       seed=st.integers(0, 2**16))
def test_vocoder_convolutions_direct_at_any_thread_count(conv, c_in: int, c_out: int, length: int,
                                                         slope: float | None, spoil: float | None,
                                                         seed: int) -> None:
    """Conv1d / ConvTranspose1d of the vocoder's shapes run ``int8_direct`` (channels and lengths off every block,
    one frame): within the documented bound of the QAT layer, the same bits at 1, 2 and 3 threads (split over
    channels and time), `leaky_relu_then` bit for bit the layer on ``F.leaky_relu(x)``, and a NaN / Inf step
    makes exactly the outputs that read it non-finite."""
    cls, kwargs = conv
    torch.manual_seed(seed)
    layer = cls(c_in, c_out, **kwargs)
    config = TernaryConfig()
    reach = kwargs.get("dilation", 1) * (kwargs["kernel_size"] - 1) if cls is nn.Conv1d else 0
    x = torch.randn(1, c_in, length + reach)
    if spoil is not None:
        x[0, c_in // 2, x.shape[-1] // 2] = spoil
    qat, codes, scale = qat_and_codes(layer, config)
    packed = packed_layer(layer, codes, scale, config, layer_spec(layer))
    lib, before = native.library(), torch.get_num_threads()
    outputs = []
    lib.tq_set_min_work(1)  # split even these small shapes between the threads
    try:
        with torch.no_grad():
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                if slope is None:
                    outputs.append(packed(x))
                else:
                    outputs.append(ternq.runtime.leaky_relu_then(packed, x, slope))
                assert packed.kernel == "int8_direct"
            plain = packed(F.leaky_relu(x, slope)) if slope is not None else outputs[0]
    finally:
        lib.tq_set_min_work(1 << 18)
        torch.set_num_threads(before)
    for y in outputs[1:]:
        assert torch.equal(y.view(torch.int32), outputs[0].view(torch.int32))
    assert torch.equal(plain.view(torch.int32), outputs[0].view(torch.int32))
    x_in = x if slope is None else F.leaky_relu(x, slope)
    if spoil is None:
        assert bool(torch.isfinite(outputs[0]).all())
        xq = packed_activations(packed, qat, x_in)
        with torch.no_grad():
            ref = qat._ternq_spec.forward(qat, xq, qat.hard_weight())
            bound = 1e-5 * magnitude(qat, x_in, xq) + 1e-6
        assert bool(((outputs[0] - ref).abs() <= bound).all())
    else:  # the outputs that read the spoiled step through any tap (zero weights too), as in the QAT layer
        with torch.no_grad():
            ref = qat(x_in)
        assert torch.equal(torch.isfinite(outputs[0]), torch.isfinite(ref))


@pytest.mark.skipif(not native.available(), reason="native kernels")
def test_leaky_relu_then_is_the_plain_call_where_nothing_is_fused() -> None:
    """Float and QAT modules, weight_only, hooks and unbatched inputs: ``module(F.leaky_relu(x))`` exactly (a hook
    sees the activated input)."""
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 20)
    qat, codes, scale = qat_and_codes(conv, TernaryConfig())
    packed = packed_layer(conv, codes, scale, TernaryConfig(), layer_spec(conv))
    with torch.no_grad():
        for module in (conv, qat):
            assert torch.equal(ternq.runtime.leaky_relu_then(module, x, 0.1), module(F.leaky_relu(x, 0.1)))
        seen = []
        handle = packed.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        ternq.runtime.leaky_relu_then(packed, x, 0.1)
        handle.remove()
        assert torch.equal(seen[0], F.leaky_relu(x, 0.1))
        packed.kernel = "weight_only"
        assert torch.equal(ternq.runtime.leaky_relu_then(packed, x, 0.1), packed(F.leaky_relu(x, 0.1)))
        assert packed.kernel == "weight_only"
        packed.kernel = "auto"
        assert torch.equal(ternq.runtime.leaky_relu_then(packed, x[0], 0.1), packed(F.leaky_relu(x[0], 0.1)))


@pytest.mark.skipif(not native.available(), reason="native kernels")
@pytest.mark.parametrize("cls", [nn.Conv1d, nn.ConvTranspose1d])
def test_direct_conv_packs_its_weights_once(monkeypatch: pytest.MonkeyPatch, cls: type[nn.Module]) -> None:
    """int8_direct packs the codes for its loops (padding, row sums, phase order) at the first call and keeps
    them while the codes are the same tensor; new codes (load_state_dict) are packed again."""
    torch.manual_seed(0)
    layer = cls(8, 16, 4, stride=2, padding=1)
    config = TernaryConfig()
    _, codes, scale = qat_and_codes(layer, config)
    packed = packed_layer(layer, codes, scale, config, layer_spec(layer))
    calls = []
    real = native.conv_weights
    monkeypatch.setattr(native, "conv_weights", lambda w: calls.append(1) or real(w))
    x = torch.randn(1, 8, 30)
    with torch.no_grad():
        first = packed(x)
        assert packed.kernel == "int8_direct" and len(calls) == 1
        assert torch.equal(packed(x), first) and len(calls) == 1
        packed.load_state_dict({"weight": -layer.weight.detach(), "bias": layer.bias.detach()})
        assert not torch.equal(packed(x), first) and len(calls) == 2


def test_conv_padding_same_unbatched_and_output_size() -> None:
    torch.manual_seed(0)
    config = TernaryConfig(granularity="channel")
    assert_matches_qat(nn.Conv1d(4, 6, 4, padding="same", dilation=2), config, torch.randn(2, 4, 11))
    assert_matches_qat(nn.Conv1d(4, 6, 3, padding=1), config, torch.randn(4, 11))  # unbatched: weight_only
    up = nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1)
    assert_matches_qat(up, config, torch.randn(2, 4, 7), output_size=[15])
    assert_matches_qat(nn.Embedding(10, 6, max_norm=0.5), config, torch.randint(0, 10, (5,)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["gather", "weight_only"])
def test_embedding_of_half_model_returns_its_dtype(dtype: torch.dtype, kernel: str) -> None:
    """The QAT Embedding of a float16 / bfloat16 model returns that dtype: so must the packed one (a float32
    output would reach the model's next float16 layer)."""
    torch.manual_seed(0)
    layer = nn.Embedding(10, 6).to(dtype)
    qat, _, _ = qat_and_codes(layer, TernaryConfig())
    packed = pack(layer, TernaryConfig(), kernel=kernel)
    ids = torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        expected = qat(ids)
        got = packed(ids)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        assert packed.float()(ids).dtype == torch.float32  # casting the model casts the output, as for QAT


@pytest.mark.parametrize("act_granularity", ["token", "tensor"])
def test_empty_inputs(act_granularity: str) -> None:
    """An empty batch (a MoE expert that got no token) gives an empty output, QAT and packed alike."""
    config = TernaryConfig(act_granularity=act_granularity)
    assert_matches_qat(nn.Linear(8, 4), config, torch.randn(0, 8))
    assert_matches_qat(nn.Linear(8, 4), config, torch.randn(2, 0, 8))
    assert_matches_qat(nn.Conv1d(8, 4, 3, padding=1), config, torch.randn(0, 8, 5))


def test_packed_input_passed_by_keyword() -> None:
    torch.manual_seed(0)
    for layer, x in [(nn.Linear(4, 3), torch.randn(2, 4)), (nn.Conv1d(4, 3, 3), torch.randn(2, 4, 6)),
                     (nn.Embedding(5, 3), torch.tensor([1, 4]))]:
        packed = pack(layer, TernaryConfig())
        with torch.no_grad():
            assert torch.equal(packed(input=x), packed(x))
    packed = pack(nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1), TernaryConfig())
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        assert torch.equal(packed(input=x, output_size=[11]), packed(x, [11]))


def test_bitts_shaped_stack_close_to_qat() -> None:
    """A BitTTS-like Conv1d stack (paper config) and a 4-layer MLP: int8 kernels stay within the tolerance."""
    torch.manual_seed(0)
    config = TernaryConfig()
    assert_matches_qat(nn.Conv1d(32, 32, 5, padding=2), config, torch.randn(1, 32, 200))
    assert_matches_qat(nn.Linear(128, 64), config, torch.randn(64, 128))
    mlp = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    qat = copy.deepcopy(mlp)
    for i, layer in enumerate(mlp):
        qat[i] = to_quant_module(layer, config)
    packed = nn.Sequential(*[pack(layer, config, kernel="weight_only") for layer in mlp])
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(packed(x), qat.eval()(x))  # weight_only: the QAT arithmetic itself
        for layer in packed:
            layer.kernel = "int8_gemm"
        torch.testing.assert_close(packed(x), qat(x), rtol=1e-5, atol=1e-5)


# --- storage -----------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(bits=st.sampled_from([2, 4]), rows=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       n=st.integers(1, 37), seed=st.integers(0, 2**16))
def test_pack_rows_roundtrip(bits: int, rows: list[int], n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = 2 ** (bits - 1)
    codes = torch.randint(-q, q, (*rows, n), generator=g, dtype=torch.int8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-n // (8 // bits))
    assert torch.equal(unpack_rows(packed, bits, n), codes)


@pytest.mark.parametrize("config", [TernaryConfig(), KBitConfig(bits=4, granularity="group", group_size=16),
                                    KBitConfig(bits=8, granularity="channel")])
@pytest.mark.parametrize("storage", STORAGES)
def test_no_float_weight_is_held(config: QuantConfig, storage: str) -> None:
    layers = [nn.Linear(64, 32), nn.Conv1d(16, 24, 5), nn.ConvTranspose1d(16, 8, 4, stride=2), nn.Conv2d(4, 8, 3),
              nn.Embedding(50, 16)]
    for layer in layers:
        n_weight = layer.weight.numel()
        packed = pack(layer, config, storage=storage)
        tensors = [*packed.parameters(), *packed.buffers(),
                   *(v for v in vars(packed).values() if isinstance(v, Tensor))]
        for t in tensors:
            assert not (t.is_floating_point() and t.numel() >= n_weight), (type(layer).__name__, t.shape, t.dtype)
        assert packed.ternq_codes.dtype in (torch.int8, torch.uint8)
        bits = 8 if storage == "int8" else {1: 2, 7: 4}.get(config.qmax, 8)
        assert packed.ternq_codes.numel() <= n_weight * bits // 8 + packed.ternq_codes.shape[0] * 8  # + row padding
        assert isinstance(packed.weight, PackedWeight)  # made on access, dequantized on use: not stored
        assert set(packed.state_dict()) == set(layer.state_dict())
        assert set(dict(packed.named_parameters())) <= {"bias"}


def test_storage_env_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = nn.Linear(256, 128)
    fp32 = resident_bytes(layer)
    monkeypatch.setenv(STORAGE_ENV, "packed")
    packed = pack(layer, TernaryConfig())
    assert packed.storage == "packed"
    assert resident_bytes(packed) - 128 * 4 <= (fp32 - 128 * 4) / 16 + 64
    assert resident_bytes(pack(layer, TernaryConfig(), storage="int8")) - 128 * 4 <= (fp32 - 128 * 4) / 4 + 64
    monkeypatch.setenv(STORAGE_ENV, "fp16")
    with pytest.raises(ValueError, match="storage"):
        pack(layer, TernaryConfig())


def test_float_weight_is_released() -> None:
    """The skeleton's weight is not referenced by the packed layer: freeing the skeleton frees it."""
    factories = [lambda: parametrizations.weight_norm(nn.Conv1d(8, 8, 3)),
                 lambda: torch.nn.utils.weight_norm(nn.Linear(8, 8)), lambda: nn.Linear(8, 8)]
    for factory in factories:
        module = factory()
        # the QAT reference runs on a plain copy: ternq.qat.layers caches the QAT class of a parametrized module,
        # and torch's parametrized class closes over its instance (which would keep the weight alive)
        plain = (nn.Conv1d(8, 8, 3) if isinstance(module, nn.Conv1d) else nn.Linear(8, 8))
        with torch.no_grad():
            plain.weight.copy_(module.weight)
            plain.bias.copy_(module.bias)
        qat, codes, scale = qat_and_codes(plain, TernaryConfig())
        x = torch.randn(2, 8, 5) if isinstance(module, nn.Conv1d) else torch.randn(2, 8)
        with torch.no_grad():
            ref = qat(x)
        packed = packed_layer(module, codes, scale, TernaryConfig(), layer_spec(module))
        refs = [weakref.ref(t) for t in module.parameters() if t.numel() >= codes.numel()]
        del module, qat
        gc.collect()
        assert all(r() is None for r in refs)
        assert not hasattr(packed, "parametrizations") and not packed._forward_pre_hooks
        packed.kernel = "weight_only"
        with torch.no_grad():
            assert torch.equal(packed(x), ref)


# --- kernel selection --------------------------------------------------------------------------------------


def ran(layer: nn.Module, x: Tensor, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kernels that computed ``layer(x)``, seen by wrapping the class's kernel registry (not read back from
    `layer.kernel`, which reports a forced kernel whether or not it ran)."""
    calls: list[str] = []
    with monkeypatch.context() as m:
        for name, impl in list(type(layer).kernel_impls.items()):
            m.setitem(type(layer).kernel_impls, name,
                      lambda *a, _k=impl, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
        with torch.no_grad():
            layer(x)
    return calls


def test_kernel_selection_env_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    layer = pack(nn.Linear(32, 16), TernaryConfig())
    x = torch.randn(4, 32)
    assert layer.kernel == "auto"
    first = ran(layer, x, monkeypatch)
    assert len(first) == 1 and first[0] in PackedLinear.kernels and layer.kernel == first[0]
    assert any(key[0][0] == "PackedLinear" for key in kernel_choices())
    monkeypatch.setenv(KERNEL_ENV, "weight_only")
    assert ran(layer, x, monkeypatch) == ["weight_only"] and layer.kernel == "weight_only"
    monkeypatch.setenv(KERNEL_ENV, "int8")
    assert ran(layer, x, monkeypatch) == ["int8_gemm"]  # the layer's first integer kernel
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match=KERNEL_ENV):
        layer(x)
    monkeypatch.delenv(KERNEL_ENV)
    layer.kernel = "weight_only"  # a forced kernel wins over the environment
    monkeypatch.setenv(KERNEL_ENV, "int8")
    assert ran(layer, x, monkeypatch) == ["weight_only"]
    layer.kernel = "int8_gemv"
    assert ran(layer, x, monkeypatch) == ["int8_gemv"]
    layer.kernel = "auto"  # back to the environment's choice
    assert ran(layer, x, monkeypatch) == ["int8_gemm"]
    with pytest.raises(ValueError, match="does not exist"):
        layer.kernel = "int8_taps"
    with pytest.raises(ValueError, match="act_bits=None"):
        pack(nn.Conv1d(4, 4, 3), TernaryConfig(act_bits=None), kernel="int8_taps")
    with pytest.raises(ValueError, match="per-group"):
        pack(nn.Conv1d(4, 4, 3), TernaryConfig(granularity="group"), kernel="int8_taps")
    forced = pack(nn.Conv1d(4, 4, 3), TernaryConfig(), kernel="int8_taps")
    with pytest.raises(ValueError, match="cannot compute this input"):
        forced(torch.randn(4, 9))  # unbatched input: weight_only only


def test_memoized_choice_follows_env_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-layer memo of automatic choices never outlives what it depends on, and keeps more than one shape
    (a prompt's and the decode step's alternate)."""
    import ternq.runtime
    import ternq.runtime.picker

    torch.manual_seed(0)
    layer = pack(nn.Linear(32, 16), TernaryConfig())
    asked = []
    original = ternq.runtime.picker.choose

    def spy(*args, **kwargs):
        asked.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(ternq.runtime.picker, "choose", spy)
    ternq.runtime.reset_kernel_choices()
    x = torch.randn(4, 32)
    with torch.no_grad():
        layer(x)
        first = layer.kernel
        layer(x)
        assert len(asked) == 1 and layer.kernel == first
        monkeypatch.setenv(KERNEL_ENV, "weight_only")
        layer(x)
        assert layer.kernel == "weight_only"
        monkeypatch.delenv(KERNEL_ENV)
        layer(x)
        assert layer.kernel == first and len(asked) == 1  # remembered beside the weight_only call's key
        layer(torch.randn(1, 32))
        layer(x)
        assert len(asked) == 2  # one new shape, the old one still known
        ternq.runtime.reset_kernel_choices()
        layer(x)
        assert len(asked) == 3
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.kernel == "weight_only" and x.grad is not None


def test_first_call_times_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel is picked from the CPU's features and the call's geometry: the first call of a shape runs
    exactly one kernel, once (no autotuning), and runs the kernel a warm call runs (a warm call of the GEMV's
    shapes runs the bound native call directly, `PackedLinear.forward`: the layer's `kernel` says which ran)."""
    torch.manual_seed(0)
    layers = [pack(nn.Linear(32, 16), TernaryConfig()), pack(nn.Conv1d(8, 8, 5, padding=2), TernaryConfig()),
              pack(nn.ConvTranspose1d(8, 4, 4, stride=2), TernaryConfig())]
    inputs = [torch.randn(3, 32), torch.randn(1, 8, 50), torch.randn(1, 8, 30)]
    for layer, x in zip(layers, inputs):
        calls = []
        for name in layer._applicable(x):
            kernel = layer.kernel_impls[name]
            monkeypatch.setitem(layer.kernel_impls, name,
                                lambda *a, _k=kernel, _n=name, _c=calls, **kw: _c.append(_n) or _k(*a, **kw))
        with torch.no_grad():
            layer(x)
            assert len(calls) == 1 and calls[0] != "weight_only", calls
            layer(x)
        assert layer.kernel == calls[0] and calls in ([calls[0]], [calls[0]] * 2), calls


@pytest.mark.parametrize("vnni", [True, False])
def test_picker_rules(vnni: bool) -> None:
    from ternq.runtime import picker

    linear = ("int8_gemm", "int8_gemm_t", "int8_gemv", "weight_only")
    assert picker.choose(linear, 1, vnni) == "int8_gemv"
    assert picker.choose(linear, 4, vnni) == ("int8_gemv" if vnni else "int8_gemm_t")
    assert picker.choose(linear, picker.GEMM_T_ROWS, vnni) == "int8_gemm_t"
    assert picker.choose(linear, picker.GEMM_T_ROWS + 1, vnni) == "int8_gemm"
    assert picker.choose(("int8_gemm", "int8_gemm_t", "weight_only"), 1, vnni) == "int8_gemm_t"  # no native
    assert picker.choose(("int8_taps", "weight_only"), 10_000, vnni) == "int8_taps"
    assert picker.choose(("weight_only",), 1, vnni) == "weight_only"


def test_gradient_to_input_uses_weight_only() -> None:
    torch.manual_seed(0)
    layer = pack(nn.Linear(16, 8), TernaryConfig())
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.kernel == "weight_only" and x.grad is not None and layer.bias.grad is not None
    layer.kernel = "int8_gemm"
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(x)
    with torch.no_grad():
        layer(x)


# --- construction ------------------------------------------------------------------------------------------


def test_bad_inputs_are_rejected() -> None:
    layer = nn.Linear(8, 4)
    config = TernaryConfig()
    _, codes, scale = qat_and_codes(layer, config)
    spec = layer_spec(layer)
    with pytest.raises(ArchitectureMismatchError, match=r"do not fit Linear.weight of shape \(5, 8\)"):
        packed_layer(nn.Linear(8, 5), codes, scale, config, spec)
    with pytest.raises(FormatError, match="exceed"):
        packed_layer(layer, codes * 2, scale, config, spec)
    with pytest.raises(FormatError, match="integer tensor"):
        packed_layer(layer, codes.float(), scale, config, spec)
    with pytest.raises(FormatError, match="expected \\(4,\\)"):
        packed_layer(layer, codes, scale, TernaryConfig(granularity="channel"), spec)
    with pytest.raises(FormatError, match="non-finite"):
        packed_layer(layer, codes, scale * float("nan"), config, spec)
    with pytest.raises(ValueError, match="storage"):
        packed_layer(layer, codes, scale, config, spec, storage="int3")


def test_qat_skeleton_repack_and_generic_layer() -> None:
    torch.manual_seed(0)
    config = TernaryConfig(granularity="channel")
    layer = nn.Conv1d(6, 4, 3, padding=1)
    qat, codes, scale = qat_and_codes(layer, config)
    packed = packed_layer(qat, codes, scale, config, layer_spec(qat))  # a QAT skeleton works too
    assert isinstance(packed, PackedConv1d) and is_packed(packed) and not is_packed(layer)
    again = packed_layer(packed, packed.codes, packed.scale, packed.qconfig, packed.spec, storage="packed")
    x = torch.randn(2, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(again(x), qat(x), rtol=1e-5, atol=1e-6)
    assert "storage=packed" in repr(again) and "kernel=" in repr(again)

    class Scaled(nn.Module):  # a registered custom type runs weight_only through its registered forward
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7))
            self.gain = 2.0

    register_layer(Scaled, lambda m, x, w: F.linear(x, w) * m.gain)
    custom = Scaled()
    qat, codes, scale = qat_and_codes(custom, config)
    packed = packed_layer(custom, codes, scale, config, layer_spec(custom))
    x = torch.randn(3, 7)
    with torch.no_grad():
        assert torch.equal(packed(x), qat(x))
    assert packed.kernel == "weight_only" and type(packed).__name__ == "PackedScaled"


def test_long_inputs_run_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time is cut into GEMM chunks of >= 64 steps; chunk borders must not show in the output."""
    import ternq.runtime.kernels

    monkeypatch.setattr(ternq.runtime.kernels, "_CHUNK_BYTES", 1)  # the smallest chunks: 64 steps
    torch.manual_seed(0)
    config = TernaryConfig(granularity="channel")
    assert_matches_qat(nn.Conv1d(6, 8, 5, padding=2), config, torch.randn(2, 6, 300))
    assert_matches_qat(nn.Conv1d(6, 8, 3, stride=2, dilation=3, padding=1), config, torch.randn(1, 6, 301))
    assert_matches_qat(nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2), config, torch.randn(2, 6, 150))
    monkeypatch.setattr(ternq.runtime.kernels, "_IM2COL_BYTES", 1)  # int8_im2col: chunks of 64 steps too
    per_sample = TernaryConfig(granularity="channel", act_granularity="tensor")
    assert_matches_qat(nn.Conv1d(6, 8, 5, padding=2), per_sample, torch.randn(2, 6, 300))
    assert_matches_qat(nn.Conv1d(6, 8, 3, stride=2, dilation=3, padding=1, padding_mode="reflect"), per_sample,
                       torch.randn(1, 6, 301))


@pytest.mark.parametrize("weight_granularity", ["tensor", "channel"])
def test_per_sample_activations_make_conv1d_one_gemm(weight_granularity: str) -> None:
    """act_granularity="tensor": Conv1d runs int8_im2col (or the native int8_direct; int8_taps is refused), stores
    the codes in the weight's own order, and matches the QAT layer on a BitTTS-shaped batch of two samples."""
    torch.manual_seed(0)
    config = TernaryConfig(granularity=weight_granularity, act_granularity="tensor")
    conv = nn.Conv1d(32, 24, 5, padding=2)
    x = torch.randn(2, 32, 200) * torch.tensor([0.1, 10.0]).view(2, 1, 1)  # very different sample scales
    assert_matches_qat(conv, config, x)
    packed = pack(conv, config)
    native_first = ("int8_direct",) if native.available() else ()
    assert packed._applicable(x) == (*native_first, "int8_im2col", "weight_only")
    assert packed.ternq_codes.shape == (1, 24, 32 * 5)
    with pytest.raises(ValueError, match="int8_taps"):
        packed.kernel = "int8_taps"
    packed.kernel = "int8_im2col"
    with torch.no_grad():  # each sample is quantized on its own: a batch equals its samples run one by one
        torch.testing.assert_close(packed(x), torch.cat([packed(x[:1]), packed(x[1:])]), rtol=0, atol=0)
    assert_matches_qat(nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1), config, torch.randn(2, 8, 30))
    assert_matches_qat(nn.Linear(16, 12), config, torch.randn(3, 5, 16))


@settings(deadline=None, max_examples=30)
@given(act_bits=st.integers(2, 8), norm=st.sampled_from(["layernorm", "rmsnorm", None]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), conv=st.booleans(), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**16))
def test_integer_activation_codes_are_the_qat_codes(act_bits: int, norm: str | None, dtype: torch.dtype,
                                                    conv: bool, scale: float, seed: int) -> None:
    """The int8 kernels start from exactly the activations the QAT layer computes: q * s == x_q bit for bit."""
    torch.manual_seed(seed)
    config = TernaryConfig(act_bits=act_bits, input_norm=norm)
    layer = nn.Conv1d(12, 4, 3) if conv else nn.Linear(12, 4)
    x = (torch.randn(3, 12, 9) if conv else torch.randn(3, 5, 12)) * scale
    x[0, 0] = 0.0  # an all-zero token (Linear) or channel (Conv1d)
    x = x.to(dtype)
    qat, codes, scale_ = qat_and_codes(layer, config)
    packed = packed_layer(layer, codes, scale_, config, layer_spec(layer))
    q, s = packed._quantize_eager(x, 1 if conv else -1)
    assert q.dtype == torch.int8
    assert torch.equal((q.to(dtype) * s.to(dtype)), qat.quantize_input(x))
    q, s = packed._quantize_int8(x, 1 if conv else -1)  # native where available: one step off at most
    assert q.dtype == torch.int8
    packed_activations(packed, qat, x)


def test_inference_mode_then_no_grad() -> None:
    """Reused scratch buffers made under inference_mode stay usable in plain no_grad calls, and vice versa."""
    import ternq.runtime.kernels

    ternq.runtime.kernels._SCRATCH.__dict__.pop("pool", None)  # the buffers are made in the first call below
    torch.manual_seed(0)
    config = TernaryConfig()
    conv = pack(nn.Conv1d(4, 4, 3, padding=1), config, kernel="int8_taps")
    linear = pack(nn.Linear(4, 4), config, kernel="int8_gemm")
    x = torch.randn(1, 4, 20)
    with torch.inference_mode():
        a = linear(conv(x).transpose(1, 2))
    with torch.no_grad():
        b = linear(conv(x).transpose(1, 2))
    with torch.inference_mode():
        c = linear(conv(x).transpose(1, 2))
    assert torch.equal(a, b) and torch.equal(b, c)


# --- the float layer's surface: .weight, hooks, state_dict ---------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("make", [lambda: nn.Linear(24, 16), lambda: nn.Conv1d(8, 12, 3, padding=1),
                                  lambda: nn.ConvTranspose1d(8, 4, 4, stride=2), lambda: nn.Embedding(10, 6)])
def test_packed_weight_answers_like_the_float_weight(make, storage: str) -> None:
    """``.weight`` has the float weight's dtype / shape / device and computes as ``codes * scale``, but the layer
    keeps no float copy: its resident bytes stay those of the codes (<= 1/4 of fp32 plus scales and bias)."""
    torch.manual_seed(0)
    layer = make()
    packed = pack(layer, TernaryConfig(), storage=storage)
    before = resident_bytes(packed)
    w = packed.weight
    assert (w.dtype, w.shape, w.device) == (layer.weight.dtype, layer.weight.shape, layer.weight.device)
    expected = packed.dequantized_weight()
    assert torch.equal(w * 1, expected) and torch.equal(w.detach() + 0, expected)
    ones = torch.ones(2, w[0].numel())
    assert torch.equal(F.linear(ones, w.reshape(w.shape[0], -1)), F.linear(ones, expected.reshape(w.shape[0], -1)))
    assert resident_bytes(packed) == before  # nothing cached by the accesses above
    codes_bytes = packed.ternq_codes.numel() * packed.ternq_codes.element_size()
    assert codes_bytes <= layer.weight.numel()  # int8 or less per weight: <= 1/4 of fp32
    half = make().half()
    assert pack(half, TernaryConfig()).weight.dtype == torch.float16


def test_hooks_and_state_dict_keys() -> None:
    """Forward hooks register and fire on packed layers; state_dict has the float model's keys; a packed
    state_dict and a float one both load back (the float weight is quantized with the layer's config)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    keys = list(model.state_dict())
    config = TernaryConfig()
    packed = nn.Sequential(*[pack(m, config) if isinstance(m, nn.Linear) else m for m in model])
    seen = []
    handle = packed[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    pre = packed[2].register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = packed(x)
    assert seen == [torch.Size([3, 16]), "pre"]
    handle.remove()
    pre.remove()
    assert list(packed.state_dict()) == keys
    other = nn.Sequential(*[pack(nn.Linear(m.in_features, m.out_features), config)
                            if isinstance(m, nn.Linear) else m for m in model])
    other.load_state_dict(packed.state_dict())  # packed -> packed: codes and scales travel
    with torch.no_grad():
        assert torch.equal(other(x), y)
        assert torch.equal(other[0].codes, packed[0].codes)
    floats = nn.Sequential(*[pack(nn.Linear(m.in_features, m.out_features), config)
                             if isinstance(m, nn.Linear) else m for m in model])
    floats.load_state_dict(model.state_dict())  # float -> packed: quantized on load
    with torch.no_grad():
        assert torch.equal(floats(x), y)
    with pytest.raises(RuntimeError, match="size mismatch"):
        floats.load_state_dict({**model.state_dict(), "0.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match="Missing key"):
        floats.load_state_dict({k: v for k, v in model.state_dict().items() if k != "0.weight"})


def test_packed_weight_pickles_as_the_dequantized_tensor(tmp_path) -> None:
    torch.manual_seed(0)
    packed = pack(nn.Linear(8, 4), TernaryConfig())
    torch.save(packed.state_dict(), tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt")
    assert type(loaded["weight"]) is Tensor and torch.equal(loaded["weight"], packed.dequantized_weight())


def test_fused_fast_paths_step_aside_for_packed_layers() -> None:
    """nn.TransformerEncoderLayer's eval fast path reads linear1.weight / linear2.weight itself instead of calling
    the layers; a PackedWeight has a torch function, so the fast path steps aside and the packed layers run their
    quantized forward (as with the fast path disabled), instead of a float op on the dequantized weight."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    layer.linear1 = pack(layer.linear1, TernaryConfig())
    layer.linear2 = pack(layer.linear2, TernaryConfig())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = layer(x)
        assert layer.linear1.kernel != "auto" and layer.linear2.kernel != "auto"  # the packed forwards ran
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            reference = layer(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


# --- hostile numerics (issue 17: S11, S12) --------------------------------------------------------------------

def layer_of(kind: str, groups: int, per_in: int, per_out: int, k: int, stride: int, dilation: int,
             padding: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(groups * per_in, per_out)
    if kind == "conv1d":
        return nn.Conv1d(groups * per_in, groups * per_out, k, stride=stride, dilation=dilation, padding=padding,
                         groups=groups)
    if kind == "conv_transpose1d":
        return nn.ConvTranspose1d(groups * per_in, groups * per_out, k, stride=stride, dilation=dilation,
                                  padding=min(padding, dilation * (k - 1)), groups=groups)
    return nn.Embedding(groups * per_in + 1, per_out)


layer_kinds = st.sampled_from(["linear", "conv1d", "conv_transpose1d"])
layer_shapes = dict(groups=st.sampled_from([1, 2]), per_in=st.integers(1, 6), per_out=st.integers(1, 5),
                    k=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
                    padding=st.integers(0, 3))


@settings(deadline=None, max_examples=30)
@example(kind="conv1d", config=TernaryConfig(), groups=1, per_in=4, per_out=3, k=3, stride=1, dilation=1,
         padding=1, length=6, positions=[5], value=float("nan"), seed=0)
@given(kind=layer_kinds, config=configs, **layer_shapes, length=st.integers(1, 12),
       positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]), seed=st.integers(0, 2**16))
def test_non_finite_inputs_give_non_finite_outputs(arch_cache, kind: str, config: QuantConfig, groups: int,
                                                   per_in: int, per_out: int, k: int, stride: int, dilation: int,
                                                   padding: int, length: int, positions: list[int], value: float,
                                                   seed: int) -> None:
    """NaN / Inf in, non-finite out, where the QAT layer gives NaN / Inf: on every kernel the picker can choose,
    both storages, the native kernels of every -march variant and the eager torch ones. The native quantizer
    used to read a NaN as 0 (C's max ignores NaN, a NaN cast to int8 is 0): the packed model returned finite
    numbers where the QAT model and the eager runtime returned NaN."""
    torch.manual_seed(seed)
    layer = layer_of(kind, groups, per_in, per_out, k, stride, dilation, padding)
    x = torch.randn(2, length, groups * per_in) * 3 if kind == "linear" else torch.randn(2, groups * per_in,
                                                                                          length + k * dilation)
    for position in positions:
        x.view(-1)[position % x.numel()] = value
    qat, codes, scale = qat_and_codes(layer, config)
    with torch.no_grad():
        ref = qat(x)
    bad_ref = ~torch.isfinite(ref)
    runs = [("0", "native")] + [("1", arch) for arch in ARCHS]
    for (mode, arch), storage in itertools.product(runs, STORAGES):
        with native_build(mode, arch, arch_cache), torch.no_grad():
            packed = packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)
            for kernel in packed._applicable(x):
                packed.kernel = kernel
                bad = ~torch.isfinite(packed(x))
                where = (kind, mode, arch, storage, kernel, native.status())
                assert bool((bad | ~bad_ref).all()), where  # non-finite wherever the QAT layer is
                if kernel != "int8_im2col":
                    assert torch.equal(bad, bad_ref), where  # and finite where it is
                else:  # one scale per sample: a window wholly in the zero padding of a sample with a NaN gives
                    #    0 * NaN here, the bias in the QAT layer
                    assert torch.equal(bad.flatten(1).any(1), bad_ref.flatten(1).any(1)), where


@settings(deadline=None, max_examples=40)
@example(kind="conv1d", config=TernaryConfig(granularity="channel"), empty="batch", groups=1, per_in=4, per_out=3,
         k=3, stride=1, dilation=1, padding=1, length=5)
@example(kind="conv_transpose1d", config=TernaryConfig(granularity="channel"), empty="batch", groups=2, per_in=2,
         per_out=3, k=4, stride=2, dilation=1, padding=1, length=5)
@example(kind="conv_transpose1d", config=TernaryConfig(), empty="time", groups=1, per_in=2, per_out=3, k=4,
         stride=2, dilation=1, padding=1, length=5)
@example(kind="conv_transpose1d", config=TernaryConfig(), empty="batch", groups=1, per_in=1, per_out=1, k=2,
         stride=1, dilation=1, padding=1, length=1)  # output length 0: torch gives an empty output
@example(kind="conv_transpose1d", config=TernaryConfig(), empty="both", groups=1, per_in=1, per_out=1, k=1,
         stride=2, dilation=1, padding=0, length=1)  # output length -1: torch refuses it even for an empty batch
@example(kind="conv1d", config=TernaryConfig(), empty="time", groups=1, per_in=1, per_out=1, k=1, stride=1,
         dilation=1, padding=1, length=1)  # K == 1 (the hand-made int8 product): length 0 is refused too
@given(kind=st.sampled_from(["linear", "conv1d", "conv_transpose1d", "embedding"]), config=configs,
       empty=st.sampled_from(["batch", "time", "both"]), **layer_shapes, length=st.integers(1, 12))
def test_empty_batch_and_zero_length_like_qat(arch_cache, kind: str, config: QuantConfig, empty: str, groups: int, per_in: int,
                                              per_out: int, k: int, stride: int, dilation: int, padding: int,
                                              length: int) -> None:
    """An empty batch (a MoE expert that got no token) or a zero-length input: the packed layer returns what the
    QAT layer returns (an empty output of the same shape) or refuses what it refuses, on every kernel, storage
    and with or without the native kernels. Per-channel scales used to fail on (0, C, T) Conv1d /
    ConvTranspose1d inputs ("cannot reshape tensor of 0 elements"), and a packed ConvTranspose1d returned
    numbers for a length-0 input that torch refuses."""
    torch.manual_seed(0)
    layer = layer_of(kind, groups, per_in, per_out, k, stride, dilation, padding)
    batch = 0 if empty in ("batch", "both") else 2
    steps = 0 if empty in ("time", "both") else length
    if kind == "linear":
        x = torch.randn(batch, steps, groups * per_in)
    elif kind == "embedding":
        x = torch.randint(0, groups * per_in + 1, (batch, steps))
    else:
        x = torch.randn(batch, groups * per_in, steps)
    qat, codes, scale = qat_and_codes(layer, config)
    with torch.no_grad():
        try:
            ref = qat(x)
        except RuntimeError:
            ref = None
    for mode, storage in itertools.product(("1", "0"), STORAGES):
        with native_build(mode, "native", arch_cache), torch.no_grad():
            packed = packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)
            for kernel in packed._applicable(x):
                packed.kernel = kernel
                if ref is None:
                    with pytest.raises(RuntimeError):
                        packed(x)
                    continue
                y = packed(x)
                assert y.shape == ref.shape and y.dtype == ref.dtype, (mode, storage, kernel)
                if y.numel():
                    assert bool(torch.isfinite(y).all())


class _FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(32, 16)
        self.w = nn.Parameter(torch.randn(8, 16) / 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.relu(self.body(x)), self.w)


def test_load_packed_takes_storage_and_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_packed(storage=, kernel=)``: the arguments decide; $TERNQ_STORAGE is the default storage and
    $TERNQ_KERNEL overrides only "auto"; a bad value is refused before the skeleton is touched."""
    torch.manual_seed(0)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    packed = ternq.pack(ternq.quantize(_FunctionalHead()))
    x = torch.randn(3, 32)
    default = ternq.load_packed(packed, _FunctionalHead())
    small = ternq.load_packed(packed, _FunctionalHead(), storage="packed")
    assert default.body.storage == "int8" and small.body.storage == "packed"
    with torch.no_grad():
        torch.testing.assert_close(small(x), default(x))
    assert resident_bytes(small.body) < resident_bytes(default.body)
    head = [m for m in small.modules() if type(m).__name__ == "PackedFunctional"]
    assert len(head) == 1 and head[0]._runtime_linear().storage == "packed"  # the F.linear call's layer too
    monkeypatch.setenv(STORAGE_ENV, "packed")
    assert ternq.load_packed(packed, _FunctionalHead()).body.storage == "packed"
    assert ternq.load_packed(packed, _FunctionalHead(), storage="int8").body.storage == "int8"
    monkeypatch.delenv(STORAGE_ENV)

    monkeypatch.setenv(KERNEL_ENV, "weight_only")
    assert ran(ternq.load_packed(packed, _FunctionalHead(), kernel="int8").body, x, monkeypatch) == ["int8_gemm"]
    monkeypatch.setenv(KERNEL_ENV, "int8")
    assert ran(ternq.load_packed(packed, _FunctionalHead(), kernel="weight_only").body, x, monkeypatch) == \
        ["weight_only"]
    assert ran(ternq.load_packed(packed, _FunctionalHead(), kernel="auto").body, x, monkeypatch) == ["int8_gemm"]

    skeleton = _FunctionalHead()
    for bad, match in ((dict(storage="int4"), "storage='int4'"), (dict(kernel="fastest"), "kernel='fastest'"),
                       (dict(kernel="int8_gemv"), "kernel='int8_gemv'")):
        with pytest.raises(ValueError, match=match):
            ternq.load_packed(packed, skeleton, **bad)
    assert type(skeleton.body) is nn.Linear and not any(is_packed(m) for m in skeleton.modules())
