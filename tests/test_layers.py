"""QAT layers against hand-computed references, weight reparametrizations, checkpoints and the registry.

Reference: ``out = op(act_quant(norm(x)), codes * scale)`` with every piece written out here from its formula.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

import ternq
import ternq.qat.layers
from ternq import KBitConfig, QuantConfig, TernaryConfig, UnsupportedLayerError
from ternq.qat.layers import (
    QuantConvTranspose1d,
    QuantLinear,
    QuantMixin,
    is_quantized,
    layer_spec,
    to_float_module,
    to_quant_module,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")

CONFIGS = {
    "paper": TernaryConfig(),
    "ternary-channel-rms": TernaryConfig(granularity="channel", input_norm="rmsnorm"),
    "ternary-group-weightonly": TernaryConfig(granularity="group", group_size=5, act_bits=None, input_norm=None),
    "int4-group-weightonly": KBitConfig(bits=4, granularity="group", group_size=4, act_bits=None, input_norm=None),
    "int8-channel": KBitConfig(bits=8, granularity="channel"),
    "int2-tensor-act4": KBitConfig(bits=2, act_bits=4, input_norm=None),
    "paper-per-sample": TernaryConfig(act_granularity="tensor"),
    "int4-channel-per-sample-rms": KBitConfig(bits=4, granularity="channel", input_norm="rmsnorm",
                                              act_granularity="tensor"),
}


# --- hand-written references -----------------------------------------------------------------------------------


def ref_input(x: Tensor, config: QuantConfig, dim: int) -> Tensor:
    """norm(x) then absmax fake-quantization per token along `dim`, or per sample (all but dim 0 of a 3+-D input)."""
    if config.input_norm == "layernorm":
        mean = x.mean(dim, keepdim=True)
        x = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(dim, keepdim=True) + config.eps)
    elif config.input_norm == "rmsnorm":
        x = x / torch.sqrt((x**2).mean(dim, keepdim=True) + config.eps)
    if config.act_bits is not None:
        q = 2 ** (config.act_bits - 1) - 1
        if config.act_granularity == "token":
            amax = x.abs().amax(dim, keepdim=True)
        elif x.dim() >= 3:
            amax = torch.stack([sample.abs().max() for sample in x]).view(-1, *[1] * (x.dim() - 1))
        else:
            amax = x.abs().max()
        s = amax.clamp(min=config.eps) / q
        x = torch.clamp(torch.round(x / s), -q - 1, q) * s
    return x


def ref_weight(w: Tensor, config: QuantConfig, out_dim: int) -> Tensor:
    """codes * scale with the scale of each tensor / output channel / group of input weights."""
    q = config.qmax
    moved = w.detach().movedim(out_dim, 0)
    rows = moved.reshape(moved.shape[0], -1)

    def scale(part: Tensor) -> Tensor:
        if isinstance(config, TernaryConfig):
            return part.abs().mean(-1, keepdim=True) + config.eps
        return (part.abs().amax(-1, keepdim=True) / q).clamp(min=config.eps)

    if config.granularity == "tensor":
        s = scale(rows.reshape(1, -1)).expand_as(rows)
    elif config.granularity == "channel":
        s = scale(rows).expand_as(rows)
    else:
        g = config.group_size
        s = torch.cat([scale(rows[:, i:i + g]).expand(-1, rows[:, i:i + g].shape[1])
                       for i in range(0, rows.shape[1], g)], dim=1)
    wq = torch.clamp(torch.round(rows / s), -q, q) * s
    return wq.reshape(moved.shape).movedim(0, out_dim)


def _conv_t(m: nn.ConvTranspose1d, w: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: F.conv_transpose1d(x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


# (name, float layer factory, input factory, out_dim, feature dim, reference op given the quantized weight)
LAYERS: list[tuple[str, Callable[[], nn.Module], Callable[[], Tensor], int, int | None,
                   Callable[[nn.Module, Tensor], Callable[[Tensor], Tensor]]]] = [
    ("linear", lambda: nn.Linear(6, 5), lambda: torch.randn(2, 3, 6), 0, -1,
     lambda m, w: lambda x: x @ w.t() + m.bias),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1, dilation=1), lambda: torch.randn(2, 4, 9), 0, 1,
     lambda m, w: lambda x: F.conv1d(x, w, m.bias, padding=1)),
    ("conv1d-grouped-dilated", lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2),
     lambda: torch.randn(2, 4, 9), 0, 1, lambda m, w: lambda x: F.conv1d(x, w, m.bias, padding=2, dilation=2,
                                                                        groups=2)),
    ("conv2d-reflect", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
     lambda: torch.randn(2, 3, 7, 6), 0, 1,
     lambda m, w: lambda x: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, m.bias, stride=2)),
    ("convtranspose1d", lambda: nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1), lambda: torch.randn(2, 6, 5), 1,
     1, _conv_t),
    ("embedding", lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (2, 7)), 0, None,
     lambda m, w: lambda x: F.embedding(x, w)),
]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("layer", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_layer_matches_hand_computed_reference(layer: tuple, config_name: str) -> None:
    name, make, make_input, out_dim, feature_dim, op = layer
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    m = make()
    x = make_input()
    q = to_quant_module(m, config)
    assert is_quantized(q) and not is_quantized(m) and q.qconfig is config
    y = q(x)

    wq = ref_weight(m.weight, config, out_dim).requires_grad_(True)
    xr = x if feature_dim is None else ref_input(x, config, feature_dim)
    y_ref = op(m, wq)(xr)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    # identity STE: the latent float weight receives exactly the gradient of the quantized weight
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    assert m.weight.grad is not None and wq.grad is not None
    torch.testing.assert_close(m.weight.grad, wq.grad, rtol=1e-5, atol=1e-5)


def test_convtranspose1d_output_size_argument() -> None:
    torch.manual_seed(0)
    m = nn.ConvTranspose1d(3, 2, 3, stride=2)
    q = to_quant_module(m, TernaryConfig(act_bits=None, input_norm=None))
    x = torch.randn(1, 3, 5)
    y = q(x, output_size=[12])
    assert y.shape == (1, 2, 12)
    ref = F.conv_transpose1d(x, ref_weight(m.weight, q.qconfig, 1), m.bias, stride=2, output_padding=1)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("act_granularity", ["token", "tensor"])
@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv1d(4, 6, 3), (4, 9)), (lambda: nn.Conv2d(4, 6, 3), (4, 5, 6)),
                                        (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (4, 9))])
def test_unbatched_conv_input_is_quantized_as_a_batch_of_one(make: Callable[[], nn.Module], shape: tuple,
                                                             act_granularity: str) -> None:
    """An unbatched (C, ...) input holds its channels on dim 0: normalized and quantized over them, not over
    time / height (torch's conv layers take both forms, and so must their QAT versions)."""
    torch.manual_seed(0)
    layer = to_quant_module(make(), TernaryConfig(act_granularity=act_granularity)).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer(x[None])[0])


def test_input_passed_by_keyword() -> None:
    """``layer(input=x)`` works on torch's layers, so it must on their QAT versions."""
    torch.manual_seed(0)
    for layer, x in [(nn.Linear(4, 3), torch.randn(2, 4)), (nn.Conv1d(4, 3, 3), torch.randn(2, 4, 6)),
                     (nn.Embedding(5, 3), torch.tensor([1, 4]))]:
        qat = to_quant_module(layer, TernaryConfig()).eval()
        with torch.no_grad():
            assert torch.equal(qat(input=x), qat(x))
    up = to_quant_module(nn.ConvTranspose1d(4, 3, 4, stride=2, padding=1), TernaryConfig())
    x = torch.randn(2, 4, 5)
    assert torch.equal(up(input=x, output_size=[11]), up(x, [11]))


def test_conversion_shares_parameters_and_leaves_the_float_layer_alone() -> None:
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    before = m(x)
    q = to_quant_module(m, TernaryConfig())
    assert q._parameters["weight"] is m.weight and q.bias is m.bias  # shared latent; reads of q.weight quantize it
    assert torch.equal(q.weight, q.quantized_weight()) and q.weight.unique().numel() <= 3
    assert type(m) is nn.Linear and isinstance(q, nn.Linear) and type(q) is QuantLinear
    q.register_forward_hook(lambda *args: None)
    assert not m._forward_hooks
    torch.testing.assert_close(m(x), before)
    assert not torch.allclose(q(x), before)
    assert "qconfig=ternary/tensor" in repr(q)


# --- weight reparametrizations ---------------------------------------------------------------------------------


def _pnorm(v: Tensor, dim: int) -> Tensor:
    """||v|| over every dimension but `dim`, shaped to broadcast against v (torch's weight_norm)."""
    dims = [d for d in range(v.dim()) if d != dim]
    return v.pow(2).sum(dims, keepdim=True).sqrt()


def _sn(w: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
    mat = w.movedim(dim, 0).reshape(w.shape[dim], -1)
    return w / torch.dot(u, mat @ v)


# wrapper name -> (apply to a float layer, effective weight recomputed by hand from the stored tensors)
def _wn_param(m: nn.Module) -> nn.Module:
    return parametrizations.weight_norm(m)


def _wn_param_eff(m: nn.Module) -> Tensor:
    p = m.parametrizations.weight
    return p.original0 * p.original1 / _pnorm(p.original1, 0)


def _wn_legacy(m: nn.Module) -> nn.Module:
    return torch.nn.utils.weight_norm(m)


def _wn_legacy_eff(m: nn.Module) -> Tensor:
    return m.weight_g * m.weight_v / _pnorm(m.weight_v, 0)


def _sn_param(m: nn.Module) -> nn.Module:
    return parametrizations.spectral_norm(m, dim=1 if isinstance(m, nn.ConvTranspose1d) else 0)


def _sn_param_eff(m: nn.Module) -> Tensor:
    p = m.parametrizations.weight
    return _sn(p.original, p[0]._u, p[0]._v, p[0].dim)


def _sn_legacy(m: nn.Module) -> nn.Module:
    return torch.nn.utils.spectral_norm(m, dim=1 if isinstance(m, nn.ConvTranspose1d) else 0)


def _sn_legacy_eff(m: nn.Module) -> Tensor:
    hook = next(h for h in m._forward_pre_hooks.values() if getattr(h, "name", None) == "weight")
    return _sn(m.weight_orig, m.weight_u, m.weight_v, hook.dim)


WRAPPERS = {
    "weight_norm": (_wn_param, _wn_param_eff, ("parametrizations.weight.original0",
                                               "parametrizations.weight.original1")),
    "legacy_weight_norm": (_wn_legacy, _wn_legacy_eff, ("weight_g", "weight_v")),
    "spectral_norm": (_sn_param, _sn_param_eff, ("parametrizations.weight.original",)),
    "legacy_spectral_norm": (_sn_legacy, _sn_legacy_eff, ("weight_orig",)),
}
WRAPPED = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 8), 0,
               lambda m, w: lambda x: F.conv1d(x, w, m.bias, padding=1)),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1), lambda: torch.randn(2, 6, 5), 1,
                        _conv_t),
    "linear": (lambda: nn.Linear(5, 3), lambda: torch.randn(4, 5), 0, lambda m, w: lambda x: x @ w.t() + m.bias),
}


@pytest.mark.parametrize("layer_name", list(WRAPPED))
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_reparametrized_weight_is_quantized_from_the_effective_weight(wrapper: str, layer_name: str) -> None:
    wrap, effective, latent_names = WRAPPERS[wrapper]
    make, make_input, out_dim, op = WRAPPED[layer_name]
    config = TernaryConfig(granularity="channel")
    torch.manual_seed(0)
    m = wrap(make())
    with torch.no_grad():  # make g differ from ||v|| so the effective weight is not the stored one
        for name, p in m.named_parameters():
            if name.endswith(("original0", "weight_g")):
                p.mul_(torch.rand_like(p) * 3 + 0.1)
    q = to_quant_module(m, config)
    assert layer_spec(q) is layer_spec(m)
    q.train()
    q(make_input())  # training-mode forward works (spectral norm runs its power iteration)
    q.eval()
    x = make_input()
    w_eff = effective(q)
    torch.testing.assert_close(q.float_weight(), w_eff, rtol=1e-5, atol=1e-6)
    codes, scale = q.weight_codes()
    ref_codes = torch.round(w_eff.movedim(out_dim, 0).reshape(scale.shape[0], -1)
                            / (w_eff.abs().movedim(out_dim, 0).reshape(scale.shape[0], -1).mean(1, keepdim=True)
                               + config.eps)).clamp(-1, 1)
    assert torch.equal(codes.movedim(out_dim, 0).reshape(scale.shape[0], -1).float(), ref_codes)

    y = q(x)
    y_ref = op(q, ref_weight(w_eff, config, out_dim))(ref_input(x, config, 1 if layer_name != "linear" else -1))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    params = dict(q.named_parameters())
    for name in latent_names:
        grad = params[name].grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0), name


@pytest.mark.parametrize("wrapper", ["legacy_weight_norm", "legacy_spectral_norm"])
def test_legacy_hooks_packing_sees_the_current_weight_without_a_forward(wrapper: str) -> None:
    """The legacy hooks refresh `weight` only before a forward; codes must follow an update made without one."""
    wrap, effective, latent_names = WRAPPERS[wrapper]
    torch.manual_seed(0)
    q = to_quant_module(wrap(nn.Conv1d(3, 4, 3)), TernaryConfig())
    q.eval()
    with torch.no_grad():
        getattr(q, latent_names[0]).mul_(torch.randn_like(getattr(q, latent_names[0])))
    codes, scale = q.weight_codes()
    ref = ref_weight(effective(q), q.qconfig, 0)
    torch.testing.assert_close(q.hard_weight(), ref)
    assert scale.item() == pytest.approx(effective(q).abs().mean().item() + 1e-5, rel=1e-5)


# --- checkpoints -----------------------------------------------------------------------------------------------


class Net(nn.Module):
    """Every built-in layer type, with each kind of weight reparametrization."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.conv = parametrizations.weight_norm(nn.Conv1d(4, 6, 3, padding=1))
        self.legacy = torch.nn.utils.weight_norm(nn.Conv1d(6, 6, 3, padding=1))
        self.sn = parametrizations.spectral_norm(nn.Conv1d(6, 6, 1))
        self.legacy_sn = torch.nn.utils.spectral_norm(nn.Conv1d(6, 6, 1))
        self.up = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1)
        self.conv2d = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens).transpose(1, 2)
        x = torch.relu(self.conv(x))
        x = self.legacy_sn(self.sn(torch.relu(self.legacy(x))))
        x = self.up(x)
        x = self.conv2d(x.unsqueeze(1)).squeeze(1)
        return self.head(x.transpose(1, 2))


def convert(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace every registered layer with its QAT version, in place."""
    for name, child in model.named_children():
        if layer_spec(child) is not None:
            setattr(model, name, to_quant_module(child, config))
        else:
            convert(child, config)
    return model


def _net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def test_float_checkpoint_loads_strictly_into_the_qat_model() -> None:
    source = _net(0)
    sd = source.state_dict()
    q = convert(_net(1), TernaryConfig())
    assert all(is_quantized(m) for m in (q.emb, q.conv, q.legacy, q.sn, q.legacy_sn, q.up, q.conv2d, q.head))
    result = q.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    q_sd = q.state_dict()
    assert list(q_sd) == list(sd)
    for key in sd:
        assert torch.equal(q_sd[key], sd[key]), key
    tokens = torch.randint(0, 11, (2, 5))
    reference = convert(source, TernaryConfig())
    q.eval()
    reference.eval()
    torch.testing.assert_close(q(tokens), reference(tokens))


def test_qat_state_dict_round_trips_and_loads_back_into_float() -> None:
    config = TernaryConfig(granularity="group", group_size=4)
    trained = convert(_net(0), config)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    tokens = torch.randint(0, 11, (2, 5))
    trained(tokens).square().mean().backward()
    opt.step()
    trained.eval()
    sd = trained.state_dict()
    restored = convert(_net(1), config)
    restored.load_state_dict(sd, strict=True)
    restored.eval()
    torch.testing.assert_close(restored(tokens), trained(tokens))
    for (name, a), b in zip(trained.named_modules(), restored.modules(), strict=True):
        if is_quantized(a):
            assert all(torch.equal(u, v) for u, v in zip(a.weight_codes(), b.weight_codes(), strict=True)), name
    plain = _net(2)
    plain.load_state_dict(sd, strict=True)  # QAT fine-tuned weights go back into the float architecture


# --- to_float_module -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", ["paper", "int4-group-weightonly"])
@pytest.mark.parametrize("layer", LAYERS, ids=[entry[0] for entry in LAYERS])
def test_to_float_module_is_equivalent(layer: tuple, config_name: str) -> None:
    _, make, make_input, out_dim, feature_dim, _ = layer
    config = CONFIGS[config_name]
    torch.manual_seed(0)
    q = to_quant_module(make(), config)
    x = make_input()
    f = to_float_module(q)
    assert type(f) is layer_spec(q).float_type and not is_quantized(f)
    assert set(dict(f.named_parameters())) == set(dict(q.named_parameters()))
    torch.testing.assert_close(f.weight, ref_weight(q.float_weight(), config, out_dim))
    torch.testing.assert_close(f.weight, q.weight)  # the QAT layer's weight reads as what the float layer holds
    assert f.weight is not q.float_weight()
    xq = x if feature_dim is None else q.quantize_input(x)
    torch.testing.assert_close(f(xq), q(x), rtol=1e-6, atol=1e-6)
    if config.act_bits is None and config.input_norm is None:
        torch.testing.assert_close(f(x), q(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="not a ternq QAT layer"):
        to_float_module(f)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_to_float_module_folds_reparametrizations(wrapper: str) -> None:
    wrap, effective, _ = WRAPPERS[wrapper]
    torch.manual_seed(0)
    q = to_quant_module(wrap(nn.Conv1d(3, 4, 3)), TernaryConfig(act_bits=None, input_norm=None)).eval()
    original_keys = set(q.state_dict())
    f = to_float_module(q)
    assert type(f) is nn.Conv1d
    assert set(f.state_dict()) == {"weight", "bias"} and not f._forward_pre_hooks
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(f.weight, ref_weight(effective(q), q.qconfig, 0))
    torch.testing.assert_close(f(x), q(x), rtol=1e-6, atol=1e-6)
    # the QAT layer is untouched and still reparametrized
    assert set(q.state_dict()) == original_keys
    torch.testing.assert_close(q.float_weight(), effective(q), rtol=1e-5, atol=1e-6)


# --- registry --------------------------------------------------------------------------------------------------


class TransposedLinear(nn.Module):
    """A linear layer storing its weight as (in_features, out_features), like transformers' GPT-2 ``Conv1D``."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.flatten(0, -2), self.weight).view(*x.shape[:-1], -1)


def _transposed_forward(m: TransposedLinear, x: Tensor, w: Tensor) -> Tensor:
    return torch.addmm(m.bias, x.flatten(0, -2), w).view(*x.shape[:-1], -1)


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are dropped after it."""
    monkeypatch.setattr(ternq.qat.layers, "_REGISTRY", dict(ternq.qat.layers._REGISTRY))


def test_registered_transposed_layer_is_quantized_per_output_channel(registry: None) -> None:
    quant_type = ternq.register_layer(TransposedLinear, _transposed_forward, weight_out_dim=1)
    assert issubclass(quant_type, QuantMixin) and issubclass(quant_type, TransposedLinear)
    torch.manual_seed(0)
    m = TransposedLinear(6, 4)
    with torch.no_grad():
        m.weight.mul_(torch.tensor([0.1, 1.0, 10.0, 100.0]))  # very different output channels
    config = TernaryConfig(granularity="channel")
    q = to_quant_module(m, config)
    assert type(q) is quant_type
    codes, scale = q.weight_codes()
    assert scale.shape == (4,)
    torch.testing.assert_close(scale, m.weight.detach().abs().mean(0) + config.eps)  # one beta per column
    assert codes.shape == (6, 4) and set(codes.unique().tolist()) <= {-1, 0, 1}
    x = torch.randn(2, 3, 6)
    wq = m.weight.detach().div(scale).round().clamp(-1, 1) * scale
    torch.testing.assert_close(q(x), ref_input(x, config, -1) @ wq + m.bias)
    # same numbers as the built-in QuantLinear holding the transposed weight
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.weight.copy_(m.weight.t())
        linear.bias.copy_(m.bias)
    torch.testing.assert_close(q(x), to_quant_module(linear, config)(x))
    f = to_float_module(q)
    assert type(f) is TransposedLinear
    torch.testing.assert_close(f.weight, wq)


def test_register_a_ready_quant_type(registry: None) -> None:
    class QuantTransposedLinear(QuantMixin, TransposedLinear):
        _ternq_spec = ternq.qat.layers.LayerSpec(TransposedLinear, _transposed_forward, weight_out_dim=1)

    assert ternq.register_layer(TransposedLinear, quant_type=QuantTransposedLinear) is QuantTransposedLinear
    assert type(to_quant_module(TransposedLinear(3, 2), TernaryConfig())) is QuantTransposedLinear
    with pytest.raises(TypeError, match="quant_type"):
        ternq.register_layer(nn.GRU, quant_type=QuantTransposedLinear)


def test_unregistered_types_are_refused_with_the_fix() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"TransposedLinear.*register_layer"):
        to_quant_module(TransposedLinear(3, 2), TernaryConfig())
    assert layer_spec(TransposedLinear(3, 2)) is None

    class MyLinear(nn.Linear):  # a subclass overriding forward computes something else: it needs its own registration
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.raises(UnsupportedLayerError, match="MyLinear"):
        to_quant_module(MyLinear(2, 2), TernaryConfig())


def test_a_subclass_running_its_base_forward_converts_as_its_base() -> None:
    """torch's NonDynamicallyQuantizableLinear (MultiheadAttention.out_proj) is an nn.Linear by another name."""
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    torch.manual_seed(0)
    m = NonDynamicallyQuantizableLinear(4, 3)
    q = to_quant_module(m, TernaryConfig())
    assert isinstance(q, NonDynamicallyQuantizableLinear) and ternq.is_quantized(q)
    x = torch.randn(2, 4)
    assert torch.equal(q(x), to_quant_module(_as_linear(m), TernaryConfig())(x))
    assert type(to_float_module(q)) is NonDynamicallyQuantizableLinear


def _as_linear(m: nn.Linear) -> nn.Linear:
    plain = nn.Linear(m.in_features, m.out_features)
    plain.load_state_dict(m.state_dict())
    return plain
    with pytest.raises(TypeError):  # UnsupportedLayerError is also a TypeError
        to_quant_module(nn.GRU(2, 2), TernaryConfig())


@pytest.mark.parametrize("bad", [int, "Linear", nn.Linear(2, 2), QuantConvTranspose1d])
def test_registering_a_non_module_type_is_refused(bad: object, registry: None) -> None:
    with pytest.raises(TypeError, match="register_layer"):
        ternq.register_layer(bad, _transposed_forward)  # type: ignore[arg-type]


def test_register_needs_a_forward(registry: None) -> None:
    with pytest.raises(TypeError, match="forward"):
        ternq.register_layer(TransposedLinear)


def test_quantizing_twice_is_refused() -> None:
    q = to_quant_module(nn.Linear(2, 2), TernaryConfig())
    with pytest.raises(ternq.AlreadyQuantizedError, match="already quantized"):
        to_quant_module(q, TernaryConfig())


def test_deepcopy_of_a_parametrized_qat_layer() -> None:
    torch.manual_seed(0)
    q = to_quant_module(parametrizations.weight_norm(nn.Conv1d(2, 3, 3)), TernaryConfig())
    clone = copy.deepcopy(q)
    x = torch.randn(1, 2, 6)
    torch.testing.assert_close(clone(x), q(x))
    assert clone.parametrizations.weight.original1 is not q.parametrizations.weight.original1


def test_torch_remove_parametrizations_leaves_a_plain_qat_layer() -> None:
    """torch's own weight-norm removal works on a converted layer: it bakes what ``layer.weight`` reads, the
    quantized weight, so the codes stay and the outputs keep their sign pattern; the scale becomes that of the
    baked weight (ternary absmean is not idempotent), as docs/conversion.md says."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    q = to_quant_module(weight_norm(nn.Conv1d(4, 4, 3)), TernaryConfig())
    codes = q.weight_codes()[0]
    baked = q.weight.detach().clone()
    parametrize.remove_parametrizations(q, "weight")
    assert type(q) is ternq.qat.layers.QuantConv1d
    assert isinstance(q._parameters["weight"], nn.Parameter)
    torch.testing.assert_close(q.float_weight(), baked)
    assert torch.equal(q.weight_codes()[0], codes)
