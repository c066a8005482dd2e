"""Property tests of the weight and activation quantizers against their definitions.

References are recomputed here from the formulas (loops over groups, plain torch ops), not from ternq's helpers.
"""
from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch.utils._python_dispatch import TorchDispatchMode

import ternq
from ternq import KBitConfig, QuantConfig, TernaryConfig
from ternq.qat.quantizers import (
    activation_scale,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    normalize_input,
    quantize_input,
    quantize_weight,
    weight_scale,
)

PROPS = settings(max_examples=40, deadline=None)


@st.composite
def weights(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """A float32 weight of 1-3 dims (Linear, Conv1d or ConvTranspose1d layout) and its output dimension."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    values = draw(hnp.arrays(np.float32, shape,
                             elements=st.floats(-4, 4, width=32, allow_subnormal=False)))
    magnitude = draw(st.sampled_from([1e-5, 1e-3, 0.02, 1.0, 30.0]))
    out_dim = draw(st.integers(0, min(1, ndim - 1)))
    return torch.from_numpy(values) * magnitude, out_dim


@st.composite
def configs(draw: st.DrawFn, kinds: tuple[str, ...] = ("ternary", "kbit")) -> QuantConfig:
    kind = draw(st.sampled_from(kinds))
    common = dict(granularity=draw(st.sampled_from(["tensor", "channel", "group"])),
                  group_size=draw(st.integers(1, 8)),
                  ste=draw(st.sampled_from(["identity", "clipped"])),
                  act_granularity=draw(st.sampled_from(["token", "tensor"])))
    if kind == "ternary":
        return TernaryConfig(**common)
    return KBitConfig(bits=draw(st.integers(2, 8)), **common)


def ref_groups(w: torch.Tensor, config: QuantConfig, out_dim: int) -> list[list[torch.Tensor]]:
    """w's elements as scale groups: groups[row][g] is a 1-d tensor, straight from the granularity's definition."""
    rows = w.reshape(1, -1) if w.dim() == 1 else w.movedim(out_dim, 0).reshape(w.shape[out_dim], -1)
    if config.granularity == "tensor":
        return [[rows.reshape(-1)]]
    if config.granularity == "channel":
        return [[row] for row in rows]
    g = config.group_size
    return [[row[i:i + g] for i in range(0, row.numel(), g)] for row in rows]


def ref_scale(group: torch.Tensor, config: QuantConfig) -> float:
    if isinstance(config, TernaryConfig):
        return group.double().abs().mean().item() + config.eps  # beta = mean|W| + eps
    return max(group.double().abs().max().item() / config.qmax, config.eps)  # s = max(max|W| / q, eps)


def scale_list(scale: torch.Tensor, config: QuantConfig) -> list[list[float]]:
    """Stored scales in the same nesting as `ref_groups`."""
    if config.granularity == "tensor":
        return [[scale.item()]]
    if config.granularity == "channel":
        return [[s] for s in scale.tolist()]
    return scale.tolist()


# --- scales ----------------------------------------------------------------------------------------------------


@PROPS
@given(weights(), configs())
def test_scale_matches_its_definition(wo: tuple[torch.Tensor, int], config: QuantConfig) -> None:
    w, out_dim = wo
    scale = weight_scale(w, config, out_dim)
    got = scale_list(scale, config)
    for got_row, groups in zip(got, ref_groups(w, config, out_dim), strict=True):
        assert len(got_row) == len(groups)
        for s, group in zip(got_row, groups, strict=True):
            assert s == pytest.approx(ref_scale(group, config), rel=1e-5)


@PROPS
@given(weights(), configs())
def test_granularity_shapes(wo: tuple[torch.Tensor, int], config: QuantConfig) -> None:
    w, out_dim = wo
    codes, scale = quantize_weight(w, config, out_dim)
    rows = 1 if w.dim() == 1 else w.shape[out_dim]
    fan_in = w.numel() // rows
    expected = {"tensor": (1,), "channel": (rows,), "group": (rows, math.ceil(fan_in / config.group_size))}
    assert tuple(scale.shape) == expected[config.granularity]
    assert scale.dtype == torch.float32 and bool((scale > 0).all())
    assert codes.shape == w.shape and codes.dtype == torch.int8


# --- codes and values ------------------------------------------------------------------------------------------


@PROPS
@given(weights(), configs(kinds=("ternary",)))
def test_ternary_values_lie_in_minus_beta_zero_beta_per_group(wo: tuple[torch.Tensor, int],
                                                              config: QuantConfig) -> None:
    w, out_dim = wo
    wq = fake_quantize_weight(w, config, out_dim)
    codes, scale = quantize_weight(w, config, out_dim)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    rows = zip(ref_groups(wq, config, out_dim), ref_groups(w, config, out_dim), scale_list(scale, config),
               strict=True)
    for q_row, w_row, s_row in rows:
        for q_group, w_group, stored in zip(q_row, w_row, s_row, strict=True):
            assert stored == pytest.approx(ref_scale(w_group, config), rel=1e-5)
            beta = torch.tensor(stored, dtype=torch.float32)
            assert bool(((q_group == 0) | (q_group == beta) | (q_group == -beta)).all()), (q_group, beta)
            # the code is round-to-nearest of W / beta, clipped to [-1, 1]
            expected = torch.clamp(torch.round(w_group / beta), -1, 1) * beta
            assert torch.equal(q_group, expected)


@PROPS
@given(weights(), configs(kinds=("kbit",)))
def test_kbit_codes_stay_in_range_and_round_to_nearest(wo: tuple[torch.Tensor, int], config: KBitConfig) -> None:
    w, out_dim = wo
    codes, scale = quantize_weight(w, config, out_dim)
    q = 2 ** (config.bits - 1) - 1
    assert config.qmax == q
    assert int(codes.abs().max()) <= q
    # s >= max|W| / q: nothing is clipped, so every weight is within half a step of its quantized value
    wq = dequantize_weight(codes, scale, config, out_dim)
    for w_row, q_row in zip(ref_groups(w, config, out_dim), ref_groups(wq, config, out_dim), strict=True):
        for w_group, q_group in zip(w_row, q_row, strict=True):
            step = ref_scale(w_group, config)
            assert float((w_group - q_group).abs().max()) <= step / 2 * (1 + 1e-5)
    # the largest weight of a group whose scale is not floored gets the extreme code
    if config.granularity == "tensor" and float(w.abs().max()) / q > config.eps:
        assert int(codes.abs().max()) == q


@PROPS
@given(weights(), configs())
def test_fake_quantize_is_exactly_codes_times_scale(wo: tuple[torch.Tensor, int], config: QuantConfig) -> None:
    w, out_dim = wo
    codes, scale = quantize_weight(w, config, out_dim)
    assert torch.equal(fake_quantize_weight(w, config, out_dim), dequantize_weight(codes, scale, config, out_dim))


@PROPS
@given(weights(), configs(kinds=("ternary",)))
def test_ternary_codes_are_a_fixed_point_and_beta_shrinks_by_the_nonzero_fraction(
        wo: tuple[torch.Tensor, int], config: TernaryConfig) -> None:
    """Re-quantizing W_q = beta * codes keeps the codes, and per group mean|W_q| = f * beta with f the fraction
    of non-zero codes, so beta' = f * beta + eps: the scale shrinks exactly when (1 - f) * beta > eps, i.e.
    for any weight of ordinary magnitude with at least one zero code."""
    w, out_dim = wo
    codes, scale = quantize_weight(w, config, out_dim)
    wq = dequantize_weight(codes, scale, config, out_dim)
    codes2, scale2 = quantize_weight(wq, config, out_dim)
    assert torch.equal(codes2, codes)
    code_groups = ref_groups(codes.float(), config, out_dim)
    for row, s_row, s2_row in zip(code_groups, scale_list(scale, config), scale_list(scale2, config), strict=True):
        for group, beta, beta2 in zip(row, s_row, s2_row, strict=True):
            nonzero_fraction = float((group != 0).float().mean())
            assert beta2 == pytest.approx(nonzero_fraction * beta + config.eps, rel=1e-5)
            margin = (1 - nonzero_fraction) * beta - config.eps
            if abs(margin) > 1e-6 * beta:
                assert (beta2 < beta) == (margin > 0)


@PROPS
@given(weights(), configs(kinds=("kbit",)))
def test_kbit_quantization_is_a_fixed_point(wo: tuple[torch.Tensor, int], config: KBitConfig) -> None:
    """k-bit codes *and* scales are a fixed point: the largest code is q, so max|W_q| / q is the scale again."""
    w, out_dim = wo
    codes, scale = quantize_weight(w, config, out_dim)
    codes2, scale2 = quantize_weight(dequantize_weight(codes, scale, config, out_dim), config, out_dim)
    assert torch.equal(codes2, codes)
    torch.testing.assert_close(scale2, scale, rtol=1e-6, atol=0)


@PROPS
@given(weights(), configs())
def test_out_dim_one_is_out_dim_zero_of_the_transposed_weight(wo: tuple[torch.Tensor, int],
                                                              config: QuantConfig) -> None:
    w, _ = wo
    if w.dim() < 2:
        return
    codes_t, scale_t = quantize_weight(w.transpose(0, 1), config, out_dim=0)
    codes, scale = quantize_weight(w, config, out_dim=1)
    assert torch.equal(codes, codes_t.transpose(0, 1))
    assert torch.equal(scale, scale_t)


def test_all_zero_weight_gives_zero_codes_and_eps_scale() -> None:
    for config in (TernaryConfig(), KBitConfig(bits=4, granularity="channel"), TernaryConfig(granularity="group",
                                                                                             group_size=3)):
        w = torch.zeros(4, 5)
        codes, scale = quantize_weight(w, config)
        assert not codes.any()
        assert torch.allclose(scale, torch.full_like(scale, config.eps))
        assert torch.equal(fake_quantize_weight(w, config), w)


def test_zero_dim_weight_is_rejected() -> None:
    with pytest.raises(ValueError, match="0-d"):
        quantize_weight(torch.tensor(1.0), TernaryConfig())


def test_low_precision_weight_gets_the_packed_codes() -> None:
    """bf16 training must see the same codes as the float32 export, or the packed model differs."""
    torch.manual_seed(0)
    w = (torch.randn(64, 96) * 0.05).bfloat16()
    for config in (TernaryConfig(), KBitConfig(bits=4, granularity="channel")):
        wq = fake_quantize_weight(w, config)
        codes, scale = quantize_weight(w, config)
        assert wq.dtype == torch.bfloat16
        assert torch.equal(wq, dequantize_weight(codes, scale, config).bfloat16())


# --- straight-through estimator --------------------------------------------------------------------------------


@PROPS
@given(weights(), configs(), st.integers(0, 2**31 - 1))
def test_ste_gradient(wo: tuple[torch.Tensor, int], config: QuantConfig, seed: int) -> None:
    """identity: dL/dW = dL/dW_q everywhere; clipped: the same inside |W/s| <= q + 1/2, zero outside."""
    w, out_dim = wo
    w = w.clone().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    (fake_quantize_weight(w, config, out_dim) * upstream).sum().backward()
    assert w.grad is not None
    if config.ste == "identity":
        assert torch.equal(w.grad, upstream)
        return
    scale = dequantize_weight(torch.ones_like(w, dtype=torch.int8), weight_scale(w, config, out_dim), config,
                              out_dim)
    inside = (w.detach() / scale).abs() <= config.qmax + 0.5
    assert torch.equal(w.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    if isinstance(config, KBitConfig):  # s >= max|W| / q: k-bit never clips, so clipped STE is the identity
        assert bool(inside.all())


def test_identity_ste_moves_saturated_weights_clipped_ste_freezes_them() -> None:
    """A weight far outside the clip range: identity STE still updates it, clipped STE does not."""
    w = torch.tensor([[0.1, -0.1, 0.05, 5.0]])
    for ste, expected in (("identity", 1.0), ("clipped", 0.0)):
        latent = w.clone().requires_grad_(True)
        fake_quantize_weight(latent, TernaryConfig(ste=ste)).sum().backward()
        assert latent.grad is not None
        assert latent.grad[0, 3].item() == expected
        assert latent.grad[0, 0].item() == 1.0  # inside the clip range both pass the gradient


# --- activations -----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6),
                  elements=st.floats(-100, 100, width=32, allow_subnormal=False)),
       st.integers(2, 8), st.booleans())
def test_activation_absmax_per_token(x_np: np.ndarray, bits: int, channels_first: bool) -> None:
    x = torch.from_numpy(x_np).requires_grad_(True)
    dim = 1 if channels_first else -1
    q = 2 ** (bits - 1) - 1
    xq = fake_quantize_activation(x, bits, dim)
    s = activation_scale(x, bits, dim)
    expected_s = (x.detach().abs().amax(dim=dim, keepdim=True) / q).clamp(min=1e-5 / q)
    torch.testing.assert_close(s, expected_s)
    codes = xq.detach() / s
    assert float((codes - codes.round()).abs().max()) < 1e-3
    assert float(codes.abs().max()) <= q + 1e-3
    assert float((xq.detach() - x.detach()).abs().max(dim=dim).values.sub(s.squeeze(dim) / 2).max()) <= 1e-6
    upstream = torch.randn_like(x)
    (xq * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)  # identity STE


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dim", [1, -1])
def test_input_norm_matches_torch(kind: str, dim: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7) * 4 + 1
    got = normalize_input(x, kind, dim)
    moved = x.movedim(dim, -1)
    if kind == "layernorm":
        ref = torch.nn.functional.layer_norm(moved, (moved.shape[-1],), eps=1e-5)
    else:
        ref = torch.nn.functional.rms_norm(moved, (moved.shape[-1],), eps=1e-5)
    torch.testing.assert_close(got, ref.movedim(-1, dim))
    assert normalize_input(x, None, dim) is x
    with pytest.raises(ValueError, match="input_norm"):
        normalize_input(x, "batchnorm", dim)


# --- configs ---------------------------------------------------------------------------------------------------


def test_default_config_is_the_paper_recipe() -> None:
    c = TernaryConfig()
    assert (c.granularity, c.act_bits, c.input_norm, c.ste, c.qmax, c.name) == (
        "tensor", 8, "layernorm", "identity", 1, "ternary")
    assert c.bits_per_weight == pytest.approx(1.6)


@PROPS
@given(configs())
def test_config_dict_round_trip(config: QuantConfig) -> None:
    assert QuantConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="row"), "granularity"),
    (dict(granularity="group", group_size=0), "group_size"),
    (dict(act_bits=1), "act_bits"),
    (dict(act_bits=8.5), "act_bits"),
    (dict(act_bits=True), "act_bits"),
    (dict(input_norm="batchnorm"), "input_norm"),
    (dict(ste="soft"), "ste"),
    (dict(eps=0.0), "eps"),
    (dict(act_granularity="sample"), "act_granularity"),
])
def test_bad_config_fields_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TernaryConfig(**kwargs)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        KBitConfig(bits=bits)  # type: ignore[arg-type]


def test_from_dict_rejects_unknown_kind_and_fields() -> None:
    with pytest.raises(ValueError, match="kind"):
        QuantConfig.from_dict({"kind": "binary"})
    with pytest.raises(ValueError, match="gruop_size"):
        QuantConfig.from_dict({"kind": "ternary", "gruop_size": 3})
    assert isinstance(QuantConfig.from_dict(KBitConfig(bits=3).to_dict()), ternq.KBitConfig)


def test_from_dict_of_an_older_file_defaults_act_granularity_to_token() -> None:
    """Files written before act_granularity existed load as trained: per-token activation scales."""
    old = TernaryConfig(granularity="channel").to_dict()
    del old["act_granularity"]
    assert QuantConfig.from_dict(old) == TernaryConfig(granularity="channel")
    assert QuantConfig.from_dict(old).act_granularity == "token"


@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 3, 4, 5), (6, 5), (5,)])
def test_per_sample_activation_quantization(shape: tuple[int, ...]) -> None:
    """act granularity "tensor": one absmax scale per batch item of a 3+-D input, one for a 1-D / 2-D input;
    every sample's largest magnitude maps to code 127 and the identity STE passes the gradient unchanged."""
    torch.manual_seed(0)
    x = (torch.randn(*shape) * torch.linspace(0.5, 4, shape[0]).view(-1, *[1] * (len(shape) - 1))).requires_grad_()
    y = fake_quantize_activation(x, 8, dim=-1, granularity="tensor")
    samples = list(x.detach()) if x.dim() >= 3 else [x.detach()]
    out = list(y.detach()) if x.dim() >= 3 else [y.detach()]
    for xs, ys in zip(samples, out, strict=True):
        s = xs.abs().max() / 127
        codes = ys / s
        torch.testing.assert_close(codes, torch.round(xs / s), rtol=0, atol=1e-4)
        assert float(codes.abs().max()) == pytest.approx(127, abs=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="granularity"):
        fake_quantize_activation(x, 8, dim=-1, granularity="channel")


# --- fused straight-through nodes (issue 19) ---------------------------------------------------------------------


def unfused_weight(w: torch.Tensor, config: QuantConfig, out_dim: int) -> torch.Tensor:
    """The quantizer as a chain of autograd ops: ``codes * scale + (w - sg(w))``, masked for the clipped STE."""
    scale = dequantize_weight(torch.ones_like(w, dtype=torch.int8), weight_scale(w, config, out_dim), config,
                              out_dim, torch.float32)
    ratio = w.detach().float() / scale
    wq = (torch.clamp(torch.round(ratio), -config.qmax, config.qmax) * scale).to(w.dtype)
    if config.ste == "identity":
        return wq + (w - w.detach())
    return wq + (w - w.detach()) * (ratio.abs() <= config.qmax + 0.5)


@PROPS
@given(weights(), configs(), st.sampled_from([torch.float32, torch.bfloat16]), st.integers(0, 2**31 - 1))
def test_fused_weight_quantizer_equals_the_unfused_chain(wo: tuple[torch.Tensor, int], config: QuantConfig,
                                                         dtype: torch.dtype, seed: int) -> None:
    """One autograd node gives the value and the gradient of the op chain it replaces, in float32 and bf16."""
    w, out_dim = wo
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    grads, values = [], []
    for fn in (fake_quantize_weight, unfused_weight):
        latent = w.to(dtype).requires_grad_(True)
        value = fn(latent, config, out_dim)
        (value * upstream).sum().backward()
        values.append(value.detach())
        grads.append(latent.grad)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
                  elements=st.floats(-100, 100, width=32, allow_subnormal=False)),
       st.integers(2, 8), st.sampled_from(["token", "tensor"]), st.booleans())
def test_fused_activation_quantizer_equals_the_unfused_chain(x_np: np.ndarray, bits: int, granularity: str,
                                                             channels_first: bool) -> None:
    x = torch.from_numpy(x_np)
    dim = 1 if channels_first and x.dim() > 1 else -1
    q = 2 ** (bits - 1) - 1
    upstream = torch.randn_like(x)
    latent = x.clone().requires_grad_(True)
    s = activation_scale(latent, bits, dim, 1e-5, granularity)
    chain = torch.clamp(torch.round(latent.detach() / s), -q - 1, q) * s + (latent - latent.detach())
    (chain * upstream).sum().backward()
    fused_latent = x.clone().requires_grad_(True)
    fused = fake_quantize_activation(fused_latent, bits, dim, 1e-5, granularity)
    (fused * upstream).sum().backward()
    torch.testing.assert_close(fused.detach(), chain.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fused_latent.grad, latent.grad, rtol=0, atol=0)


@pytest.mark.parametrize("ste", ["identity", "clipped"])
def test_each_quantizer_is_one_autograd_node(ste: str) -> None:
    """The weight and the activation quantizer each add one node between their input and their output (issue
    19: the chain ``wq + (w - sg(w))`` cost three more nodes and two more passes per call)."""
    w = torch.randn(4, 6, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)
    for out, leaf in ((fake_quantize_weight(w, TernaryConfig(ste=ste)), w), (fake_quantize_activation(x, 8, -1), x)):
        (inner, _), *_ = out.grad_fn.next_functions
        assert inner is not None and inner.variable is leaf, out.grad_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_fused_activation_quantizer_on_a_large_input(dtype: torch.dtype, granularity: str) -> None:
    """Past 32K values the scale comes from amax and amin (no |x| tensor), and float32 codes skip the clip:
    still the chain's value, bit for bit."""
    x = (torch.randn(4, 65, 129, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    s = activation_scale(x, 8, -1, 1e-5, granularity)
    chain = torch.clamp(torch.round(x / s), -128, 127) * s
    fused = fake_quantize_activation(x, 8, -1, 1e-5, granularity)
    torch.testing.assert_close(fused, chain, rtol=0, atol=0)
    if granularity == "token" and dtype == torch.float32:  # the clip skipped: codes still within +-127
        assert torch.equal((fused / s).round().abs().amax(-1), torch.full((4, 65), 127.0, dtype=dtype))


# --- input norm and activation quantization in one node (issue 19) ---------------------------------------------


def one_node(out: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether `out` is one autograd node away from `leaf`."""
    (inner, _), *rest = out.grad_fn.next_functions
    return getattr(inner, "variable", None) is leaf and all(f is None for f, _ in rest)


@st.composite
def layer_inputs(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """A float32 layer input (2-4 dims, sides 1-9: one row, odd sizes) and its feature dim (-1 or 1)."""
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=9))
    values = draw(hnp.arrays(np.float32, shape, elements=st.floats(-50, 50, width=32, allow_subnormal=False)))
    offset = draw(st.sampled_from([0.0, 3.0, -1000.0]))  # a large mean: the backward must not cancel
    return torch.from_numpy(values) + offset, draw(st.sampled_from([-1, 1]))


def reference_input(x: torch.Tensor, config: QuantConfig, dim: int) -> torch.Tensor:
    """The input quantization as plain autograd ops: the norm's graph, then the straight-through quantizer."""
    y = normalize_input(x, config.input_norm, dim, config.eps)
    if config.act_bits is None:
        return y
    return fake_quantize_activation(y, config.act_bits, dim, config.eps, config.act_granularity)


@settings(max_examples=60, deadline=None)
@given(layer_inputs(), st.sampled_from(["layernorm", "rmsnorm"]), st.sampled_from([8, 4, None]),
       st.sampled_from(["token", "tensor"]), st.sampled_from([torch.float32, torch.bfloat16]),
       st.integers(0, 2**31 - 1))
def test_fused_input_quantizer_equals_the_op_chain(xd: tuple[torch.Tensor, int], norm: str, bits: int | None,
                                                   granularity: str, dtype: torch.dtype, seed: int) -> None:
    """Under autograd the norm and the activation quantizer are one node (`_NormQuantize`): its value is the op
    chain's bit for bit (and the no-grad path's, which the packed runtime shares), its gradient the chain's to
    float rounding."""
    x, dim = xd
    x = x.to(dtype)
    config = TernaryConfig(input_norm=norm, act_bits=bits, act_granularity=granularity)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    fused_leaf, chain_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = quantize_input(fused_leaf, config, dim)
    chain = reference_input(chain_leaf, config, dim)
    assert one_node(fused, fused_leaf), fused.grad_fn
    with torch.no_grad():
        plain = quantize_input(x, config, dim)
    torch.testing.assert_close(fused.detach(), chain.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fused.detach(), plain, rtol=0, atol=0)
    (fused * upstream).sum().backward()
    (chain * upstream).sum().backward()
    scale = chain_leaf.grad.abs().amax().item() + 1.0
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: 8 mantissa bits, either way of summing
    torch.testing.assert_close(fused_leaf.grad, chain_leaf.grad, rtol=10 * tol, atol=tol * scale)


@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_fused_input_quantizer_passes_nan_and_inf(norm: str, dim: int) -> None:
    """A NaN or an Inf in a token makes that token's value NaN, as the op chain; the other tokens are untouched."""
    x = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    x[0, 2, 1], x[2, 4, 3] = float("nan"), float("inf")
    config = TernaryConfig(input_norm=norm)
    leaf = x.clone().requires_grad_(True)
    fused = quantize_input(leaf, config, dim)
    assert one_node(fused, leaf)
    torch.testing.assert_close(fused.detach(), reference_input(x, config, dim), rtol=0, atol=0, equal_nan=True)
    assert fused.isnan().any() and fused.isfinite().any()
    fused.sum().backward()
    assert leaf.grad.shape == x.shape


@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_fused_input_quantizer_second_derivative(norm: str, dim: int) -> None:
    """With create_graph the fused node's gradient is itself differentiable, and equals the op chain's (a gradient
    penalty through a QAT layer stays right)."""
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    config = TernaryConfig(input_norm=norm)
    grads = []
    for fn in (quantize_input, reference_input):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf, config, dim)
        assert one_node(out, leaf) == (fn is quantize_input)
        (g,) = torch.autograd.grad((out * out.detach()).sum(), leaf, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), leaf)
        grads.append((g.detach(), gg))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_transposed_conv_weight_reads_contiguous(granularity: str) -> None:
    """A ConvTranspose weight (outputs on dim 1) quantized per tensor or per channel is computed in its own layout:
    contiguous, so that the convolution does not copy it back from the row layout (forward and backward), and the
    same values as the hard quantization."""
    layer = ternq.quantize(torch.nn.Sequential(torch.nn.ConvTranspose1d(6, 4, 5)),
                           config=TernaryConfig(granularity=granularity))[0]
    w, hard = layer.weight, layer.hard_weight()
    assert w.is_contiguous() and hard.is_contiguous()  # the packed runtime's weight_only computes with the latter
    torch.testing.assert_close(w.detach(), hard, rtol=0, atol=0)


class _Ops(TorchDispatchMode):
    """Records the aten ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=2, max_size=4), st.sampled_from([TernaryConfig(), KBitConfig(bits=4)]),
       st.booleans())
def test_per_tensor_scale_is_reduced_in_the_weight_layout(shape: list[int], config: QuantConfig,
                                                          transposed: bool) -> None:
    """A per-tensor scale is one reduction over the weight as it lies in memory, for any output dim: no copy of a
    ConvTranspose weight into rows (issue 19: that copy was half of such a layer's weight-quantizer cost), and the
    same bits in training (`_WeightSTE`) as in packing (`weight_scale`)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 0.3
    out_dim = 1 if transposed else 0
    for fn in (lambda: weight_scale(w, config, out_dim), lambda: fake_quantize_weight(w, config, out_dim)):
        with _Ops() as rec:
            fn()
        assert not {"clone", "copy_", "contiguous"} & set(rec.ops), rec.ops
    scale = weight_scale(w, config, out_dim)
    assert torch.equal(scale, config.scale_of(w.abs(), tuple(range(w.dim()))).reshape(1))
    codes = torch.clamp(torch.round(w / scale), -config.qmax, config.qmax)
    assert torch.equal(fake_quantize_weight(w.requires_grad_(), config, out_dim).detach(), codes * scale)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.data())
def test_absmax_checks_sizes_only_for_an_empty_input(shape: list[int], data: st.DataObject) -> None:
    """`absmax` (every small activation's scale) asks for the reduced sizes, a Python loop with a symbolic-size
    guard per dim, only where the input is empty; a non-empty eager input goes straight to the reduction (issue 19:
    that loop was a per-call cost of every layer). The value is ``|x|.amax`` either way, zeros for an empty one."""
    import ternq.qat.quantizers as quantizers

    dims = tuple(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    calls = []

    def counting(cond):  # noqa: ANN001, ANN202
        calls.append(cond)
        return guard(cond)

    guard, quantizers.guard_or_false = quantizers.guard_or_false, counting
    try:
        got = quantizers.absmax(x, dims)
    finally:
        quantizers.guard_or_false = guard
    assert (calls != []) == (x.numel() == 0)
    if x.numel():
        assert torch.equal(got, x.abs().amax(dim=dims, keepdim=True))
    else:
        reduced = {d % len(shape) for d in dims}
        expected = [1 if d in reduced else n for d, n in enumerate(shape)]
        assert list(got.shape) == expected and not got.any()
