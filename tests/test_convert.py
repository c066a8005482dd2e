"""quantize / dequantize / report on a zoo of models: traceable and not, weight-normed convs, functional calls.

Numerical checks compare the converted model with a reference written here by hand: every selected layer's
forward replaced by "layer-norm the input, absmax-quantize it to int8 per token, run the float op with
codes * scale weights", with the codes and scales computed from the formulas, not by ternq.
"""
from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import weight_norm as legacy_weight_norm
from torch.nn.utils.parametrizations import weight_norm

import ternq
from ternq.errors import AlreadyQuantizedError, ConversionError

EPS = 1e-5
INT4 = ternq.KBitConfig(bits=4)

# --- the hand-written reference ----------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    centered = x - x.mean(dim=dim, keepdim=True)
    return centered * torch.rsqrt(centered.square().mean(dim=dim, keepdim=True) + EPS)


def int8_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    s = x.abs().amax(dim=dim, keepdim=True).clamp(min=EPS) / 127
    return torch.clamp(torch.round(x / s), -128, 127) * s


def hard_weight(w: torch.Tensor, config: ternq.QuantConfig) -> torch.Tensor:
    """Per-tensor codes * scale: ternary absmean + eps, or k-bit absmax / q floored at eps."""
    w = w.detach().float()
    if isinstance(config, ternq.TernaryConfig):
        scale = w.abs().mean() + EPS
        return torch.clamp(torch.round(w / scale), -1, 1) * scale
    q = 2 ** (config.bits - 1) - 1
    scale = (w.abs().max() / q).clamp(min=EPS)
    return torch.clamp(torch.round(w / scale), -q, q) * scale


def effective_weight(m: nn.Module) -> torch.Tensor:
    if hasattr(m, "weight_g"):  # legacy weight_norm (dim=0): g * v / ||v|| per output row
        v = m.weight_v
        return m.weight_g * v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
    return m.weight  # plain, or parametrizations.weight_norm (torch computes it)


def prepare_input(x: torch.Tensor, config: ternq.QuantConfig, dim: int) -> torch.Tensor:
    if config.input_norm == "layernorm":
        x = layer_norm(x, dim)
    if config.act_bits is not None:
        x = int8_absmax(x, dim)
    return x


def hand_forward(m: nn.Module, config: ternq.QuantConfig):
    w = hard_weight(effective_weight(m), config)
    if isinstance(m, nn.Linear):
        return lambda x: F.linear(prepare_input(x, config, -1), w, m.bias)
    if isinstance(m, nn.Conv1d):
        return lambda x: F.conv1d(prepare_input(x, config, 1), w, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, nn.ConvTranspose1d):
        return lambda x: F.conv_transpose1d(prepare_input(x, config, 1), w, m.bias, m.stride, m.padding,
                                            m.output_padding, m.groups, m.dilation)
    raise AssertionError(type(m))


def hand_reference(ref: nn.Module, decisions: dict[str, ternq.QuantConfig | None]) -> nn.Module:
    """`ref`, a float twin of the model under test, with its selected layers running the hand-written forward.

    (Twins are built from the same seed: modules with legacy weight_norm cannot be deep-copied.)
    """
    for name, config in decisions.items():
        if config is not None:
            layer = ref.get_submodule(name)
            layer.forward = hand_forward(layer, config)
    return ref.eval()


def report_decisions(model: nn.Module) -> dict[str, str]:
    return {r.layer: r.decision for r in ternq.report(model).rows}


def configs_from(model: nn.Module) -> dict[str, ternq.QuantConfig | None]:
    return {name: getattr(m, "qconfig", None) for name, m in model.named_modules() if ternq.is_quantized(m)}


def snapshot(model: nn.Module) -> dict:
    return {"modules": [(n, id(m), type(m)) for n, m in model.named_modules()],
            "dicts": {n: sorted(m.__dict__) for n, m in model.named_modules()},
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def assert_same(a: dict, b: dict) -> None:
    assert a["modules"] == b["modules"]
    assert a["dicts"] == b["dicts"]
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])


# --- the zoo -----------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU())
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.body(x))

    def infer(self, x):
        return self(x).softmax(-1)


class Acoustic(nn.Module):
    """Not fx-traceable: a data-dependent branch and a Python loop over int(tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.enc = nn.Linear(8, 8)
        self.dur = nn.Linear(8, 1)
        self.refine = nn.Linear(8, 8)

    def forward(self, tokens, repeats):
        h = self.enc(self.emb(tokens))
        if h.sum() > 0:
            h = -h
        for _ in range(int(repeats.max())):
            h = h + torch.tanh(self.refine(h))
        return h + 0 * self.dur(h)


class ArgsKwargs(nn.Module):
    """A *args/**kwargs forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, *args, **kwargs):
        x = self.a(args[0])
        if kwargs.get("twice"):
            x = self.a(x)
        return self.b(x) * kwargs.get("scale", 1.0)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([weight_norm(nn.Conv1d(c, c, 3, padding=d, dilation=d)) for d in (1, 3)])

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, 0.1))
        return x


class Vocoder(nn.Module):
    """HiFi-GAN-like: weight-normed Conv1d / ConvTranspose1d (parametrizations) and a legacy weight_norm conv."""

    def __init__(self, mels: int = 8) -> None:
        super().__init__()
        self.conv_pre = weight_norm(nn.Conv1d(mels, 16, 7, padding=3))
        self.ups = nn.ModuleList([weight_norm(nn.ConvTranspose1d(16, 8, 4, 2, padding=1)),
                                  weight_norm(nn.ConvTranspose1d(8, 4, 4, 2, padding=1))])
        self.blocks = nn.ModuleList([ResBlock(8), ResBlock(4)])
        with pytest.warns(FutureWarning):
            self.conv_post = legacy_weight_norm(nn.Conv1d(4, 1, 7, padding=3))

    def forward(self, mel):
        x = self.conv_pre(mel)
        for up, block in zip(self.ups, self.blocks):
            x = block(up(F.leaky_relu(x, 0.1)))
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


class TTS(nn.Module):
    """Acoustic model (untraceable) + vocoder (traceable); the root is untraceable too."""

    def __init__(self) -> None:
        super().__init__()
        self.acoustic = Acoustic()
        self.vocoder = Vocoder()

    def forward(self, tokens, repeats):
        h = self.acoustic(tokens, repeats)
        if h.abs().max() > 1e6:
            raise ValueError("diverged")
        return self.vocoder(h.transpose(1, 2))

    def infer(self, tokens):
        return self(tokens, torch.tensor([2]))


class Mixer(nn.Module):
    """Functional calls on parameters, with a training-only branch and an optional argument."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.b = nn.Parameter(torch.randn(6) / 10)
        self.k = nn.Parameter(torch.randn(6, 6, 3) / 5)
        self.gain = nn.Parameter(torch.ones(6))

    def forward(self, x, shift=None):
        h = F.linear(x, self.w, self.b) * self.gain
        if self.training:
            h = h * 0.5
        if shift is not None:
            h = h + shift
        return F.conv1d(h.transpose(1, 2), self.k, padding=1).transpose(1, 2)


def tts_inputs():
    torch.manual_seed(1)
    return torch.randint(0, 12, (2, 5)), torch.tensor([2, 1])


# --- tests -------------------------------------------------------------------------------------------------------


def test_traceable_mlp_matches_hand_reference_and_keeps_class():
    torch.manual_seed(0)
    model = MLP().eval()
    reference = hand_reference(copy.deepcopy(model), {"body.0": ternq.TernaryConfig(), "body.2": ternq.TernaryConfig(),
                                       "out": ternq.TernaryConfig()})
    keys = list(model.state_dict())
    assert ternq.quantize(model) is model
    assert type(model) is MLP and list(model.state_dict()) == keys
    assert {r.layer: r.path for r in ternq.report(model).rows} == {"body.0": "fx", "body.2": "fx", "out": "fx"}
    x = torch.randn(4, 6)
    torch.testing.assert_close(model.infer(x), reference.infer(x), atol=1e-5, rtol=1e-4)


def test_done_when_untraceable_model_with_weight_normed_convs_follows_include_exclude():
    torch.manual_seed(0)
    model = TTS().eval()
    torch.manual_seed(0)
    float_model = TTS()
    keys = list(model.state_dict())
    ternq.quantize(model, include=[ternq.Rule("vocoder.*", INT4), "*"],
                   exclude=[ternq.output_layers(of="vocoder"), "acoustic.dur"])
    got = {r.layer: (r.decision, r.rule, r.path) for r in ternq.report(model).rows}
    assert got == {
        "acoustic.emb": ("float", "opt-in type (include nn.Embedding)", "swap"),
        "acoustic.enc": ("ternary", 'include[1] "*"', "swap"),
        "acoustic.dur": ("float", 'exclude[1] "acoustic.dur"', "swap"),
        "acoustic.refine": ("ternary", 'include[1] "*"', "swap"),
        "vocoder.conv_pre": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.ups.0": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.ups.1": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.blocks.0.convs.0": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.blocks.0.convs.1": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.blocks.1.convs.0": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.blocks.1.convs.1": ("int4", 'include[0] "vocoder.*"', "fx"),
        "vocoder.conv_post": ("float", "exclude[0] output_layers(of='vocoder')", "fx"),
    }
    assert type(model) is TTS and list(model.state_dict()) == keys
    assert type(model.vocoder.conv_post) is nn.Conv1d  # kept float, legacy weight_norm hook intact
    assert ternq.report(model).rows[4].type == "Conv1d[weight_norm]"
    reference = hand_reference(float_model, configs_from(model))
    tokens, repeats = tts_inputs()
    torch.testing.assert_close(model(tokens, repeats), reference(tokens, repeats), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.infer(tokens), reference.infer(tokens), atol=1e-5, rtol=1e-4)


def test_whole_model_output_layers_on_an_untraceable_root():
    model = TTS()
    ternq.quantize(model, exclude=[ternq.output_layers()])
    assert [r.layer for r in ternq.report(model).rows if r.decision == "float"] == ["acoustic.emb", "vocoder.conv_post"]


def test_args_kwargs_forward():
    torch.manual_seed(0)
    model = ArgsKwargs().eval()
    reference = hand_reference(copy.deepcopy(model), {"a": ternq.TernaryConfig(), "b": INT4})
    ternq.quantize(model, include=[ternq.Rule("b", INT4), "a"])
    x = torch.randn(3, 4)
    for kwargs in ({}, {"twice": True, "scale": 2.0}):
        torch.testing.assert_close(model(x, **kwargs), reference(x, **kwargs), atol=1e-5, rtol=1e-4)


def test_functional_calls_are_quantized_and_the_forward_stays_dynamic():
    torch.manual_seed(0)
    model = Mixer()
    keys = list(model.state_dict())
    ternq.quantize(model, config=INT4)
    rows = {r.layer: (r.type, r.decision, r.path) for r in ternq.report(model).rows}
    assert rows == {"w": ("F.linear", "int4", "fx"), "k": ("F.conv1d", "int4", "fx")}
    assert list(model.state_dict()) == keys  # the inserted quantizers hold no tensors
    # the model reads its own parameters as quantized values: a same-named subclass holds those attributes
    assert "ternq_fq_0" in str(model) and isinstance(model, Mixer) and type(model).__name__ == "Mixer"
    latent_w, latent_k = model._parameters["w"], model._parameters["k"]
    w, k = hard_weight(latent_w, INT4), hard_weight(latent_k, INT4)
    torch.testing.assert_close(model.w, w) and torch.testing.assert_close(model.k, k)

    def reference(x, shift=None, training=False):
        h = F.linear(prepare_input(x, INT4, -1), w, model.b) * model.gain
        if training:
            h = h * 0.5
        if shift is not None:
            h = h + shift
        h = prepare_input(h.transpose(1, 2), INT4, 1)
        return F.conv1d(h, k, padding=1).transpose(1, 2)

    x, shift = torch.randn(2, 5, 6), torch.randn(6)
    for training in (True, False):  # self.training and `shift is not None` are evaluated at run time
        model.train(training)
        for s in (None, shift):
            torch.testing.assert_close(model(x, s), reference(x, s, training), atol=1e-5, rtol=1e-4)
    model.train()
    model(x).sum().backward()
    assert latent_w.grad is not None and latent_k.grad is not None and model.gain.grad is not None

    twin = copy.deepcopy(model)  # the interception belongs to each copy
    with torch.no_grad():
        twin._parameters["w"].mul_(-1)
    assert not torch.allclose(twin(x), model(x))
    assert type(ternq.dequantize(model)) is Mixer


def test_atomic_rollback_when_a_layer_fails(monkeypatch):
    model = TTS()
    tokens, repeats = tts_inputs()
    model.eval()
    before, out = snapshot(model), model(tokens, repeats)
    calls = {"n": 0}
    real = ternq.convert.to_quant_module

    def flaky(module, config):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return real(module, config)

    monkeypatch.setattr(ternq.convert, "to_quant_module", flaky)
    with pytest.raises(ConversionError, match="injected failure.*unchanged"):
        ternq.quantize(model)
    assert_same(before, snapshot(model))
    torch.testing.assert_close(model(tokens, repeats), out)


def test_functional_conv2d_on_an_unbatched_input_is_quantized_as_a_batch_of_one():
    torch.manual_seed(0)

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(x, self.w)

    model = ternq.quantize(Conv(), config=ternq.TernaryConfig(act_granularity="tensor"))
    x = torch.randn(3, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x[None])[0])


def test_atomic_rollback_when_functional_install_fails(monkeypatch):
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 6)
            self.mixer = Mixer()

        def forward(self, x):
            return self.mixer(self.lin(x))

    model = Both()
    before = snapshot(model)
    real = ternq.convert.install

    def broken(owner, fqs):
        real(owner, fqs)
        raise RuntimeError("install failed")

    monkeypatch.setattr(ternq.convert, "install", broken)
    with pytest.raises(ConversionError, match="install failed"):
        ternq.quantize(model)
    assert_same(before, snapshot(model))
    assert "forward" not in model.mixer.__dict__ and not ternq.convert.quantized_parts(model)


def test_already_quantized_is_an_error_and_submodels_can_be_converted_separately():
    model = TTS()
    ternq.quantize(model.acoustic)
    ternq.quantize(model.vocoder, config=INT4)
    with pytest.raises(AlreadyQuantizedError, match="already quantized"):
        ternq.quantize(model)
    with pytest.raises(AlreadyQuantizedError):
        ternq.quantize(model.vocoder)
    decisions = report_decisions(model)  # the report of the whole model gathers both conversions
    assert decisions["acoustic.enc"] == "ternary" and decisions["vocoder.conv_pre"] == "int4"
    assert decisions["acoustic.emb"] == "float" and len(decisions) == 12
    with pytest.raises(AlreadyQuantizedError, match="report"):
        ternq.report(model, include=["*"])


def test_dequantize_gives_plain_float_layers_with_hard_weights():
    torch.manual_seed(0)
    weight_only = ternq.TernaryConfig(act_bits=None, input_norm=None)
    model = nn.Sequential(Vocoder(), nn.Flatten(), nn.Linear(16, 4))

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model
            self.mixer = Mixer()

        def forward(self, mel):
            return self.mixer(self.net(mel).unsqueeze(1).expand(-1, 2, -1).repeat(1, 1, 2)[..., :6])

    wrap = Wrap().eval()
    mel = torch.randn(2, 8, 4)
    ternq.quantize(wrap, config=weight_only)
    qat = wrap(mel)
    assert ternq.dequantize(wrap) is wrap
    assert not ternq.convert.quantized_parts(wrap) and "forward" not in wrap.mixer.__dict__
    assert type(wrap.net[0].conv_post) is nn.Conv1d and type(wrap.net[0].ups[0]) is nn.ConvTranspose1d
    assert not hasattr(wrap.net[0].conv_pre, "parametrizations")  # weight_norm folded away
    torch.testing.assert_close(wrap(mel), qat, atol=1e-5, rtol=1e-4)
    for w in (wrap.net[2].weight, wrap.net[0].conv_post.weight, wrap.mixer.w):
        assert len(torch.unique(w.detach().abs())) <= 2  # {0, beta}: ternary values
    ternq.quantize(wrap)  # a dequantized model is a float model again


class TiedPair(nn.Module):
    """Two Linears sharing one weight Parameter (weight tying, as in embedding / output-layer pairs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_dequantize_keeps_tied_weights_tied():
    torch.manual_seed(0)
    model = ternq.dequantize(ternq.quantize(TiedPair()))
    assert model.a.weight is model.b.weight  # training the result must keep updating one weight
    assert len(list(model.parameters())) == 3
    untied = ternq.quantize(TiedPair(), include=[ternq.Rule("a", ternq.KBitConfig(bits=4)), "b"])
    untied = ternq.dequantize(untied)  # two configs give two different hard weights: they cannot stay tied
    assert not torch.equal(untied.a.weight, untied.b.weight)


def test_dequantize_refuses_a_loaded_packed_model():
    """A packed model has no float weight to dequantize in place: name the way that works."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(F.linear(x, self.w))

    model = ternq.quantize(Head())
    for include in (None, ["lin"], ["w"]):  # packed layers, and a packed functional call
        loaded = ternq.load_packed(ternq.pack(ternq.quantize(Head(), include=include)), Head())
        with pytest.raises(ConversionError, match=r"load_packed\(.*dequantize=True\)"):
            ternq.dequantize(loaded)
    assert ternq.dequantize(model) is model


def test_float_checkpoints_load_both_ways():
    float_model = TTS()
    quantized = ternq.quantize(TTS())
    assert list(quantized.state_dict()) == list(float_model.state_dict())
    fresh = TTS()
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    quantized.load_state_dict(float_model.state_dict(), strict=True)


def test_a_single_layer_and_shared_modules():
    layer = nn.Linear(4, 4)
    qlayer = ternq.quantize(layer)
    assert type(layer) is nn.Linear and ternq.is_quantized(qlayer) and qlayer._parameters["weight"] is layer.weight

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    model = ternq.quantize(Shared())
    assert model.a is model.b and ternq.is_quantized(model.a)
    assert [r.layer for r in ternq.report(model).rows] == ["a"]


def test_backward_through_weight_norm_and_functional():
    model = TTS().train()
    ternq.quantize(model, include=[nn.Embedding, "*"])
    tokens, repeats = tts_inputs()
    model(tokens, repeats).square().mean().backward()
    pre = model.vocoder.conv_pre.parametrizations.weight
    assert pre.original0.grad is not None and pre.original1.grad is not None
    assert model.acoustic.emb._parameters["weight"].grad is not None  # the latent weight
    assert model.vocoder.conv_post.weight_v.grad is not None


def test_report_table_and_size_estimate():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Linear(100, 50, bias=False)
            self.small = nn.Linear(10, 10)
            self.register_buffer("table", torch.zeros(7, dtype=torch.float16))

        def forward(self, x):
            return self.small(self.big(x)[:, :10])

    model = Two()
    plan = ternq.report(model, exclude=["small"])
    assert not plan.applied and "dry run" in str(plan)
    ternq.quantize(model, exclude=["small"])
    rep = ternq.report(model)
    assert rep.applied and [r.layer for r in rep.rows] == ["big", "small"]
    before = 100 * 50 * 4 + (10 * 10 + 10) * 4 + 7 * 2
    packed_big = math.ceil(5000 / 5) + 4  # 5 trits per byte + one float32 scale
    assert (rep.bytes_before, rep.bytes_after) == (before, before - 5000 * 4 + packed_big)
    assert (plan.bytes_before, plan.bytes_after) == (rep.bytes_before, rep.bytes_after)
    assert rep.rows[0].bytes_after == packed_big and rep.rows[1].bytes_after == rep.rows[1].bytes_before == 400
    text = str(rep).splitlines()
    assert text[1].split() == ["weight", "type", "params", "decision", "rule", "path", "reason"]
    widths = {len(line) for line in text[2:5]}
    assert text[3].index("Linear") == text[4].index("Linear")  # aligned columns
    assert "1 ternary, 1 float" in str(rep) and "5,000 of 5,110" in str(rep) and widths
    d = rep.to_dict()
    assert d["totals"]["counts"] == {"ternary": 1, "float": 1} and d["rows"][1]["rule"] == 'exclude[0] "small"'


def test_tracing_neither_draws_random_numbers_nor_prints(capsys):
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            print("forward ran")
            if x.sum() > 0:  # untraceable: traced leniently too
                x = x + 1
            noise = random.random() + float(np.random.rand())  # drawn for real while tracing
            return self.lin(x) + torch.randn(3) * noise  # drawn for real by the example run

    model = Noisy()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        if not states:
            ternq.quantize(model, example_inputs=torch.randn(2, 3))  # traces, and runs the float model once
        else:
            torch.randn(2, 3)  # the same draw as the example input, nothing else
        states.append((torch.rand(3), random.random(), np.random.rand()))
    assert torch.equal(states[0][0], states[1][0]) and states[0][1:] == states[1][1:]
    assert capsys.readouterr().out == ""


def test_functional_call_in_an_untraceable_forward_is_found_leniently():
    class LoopMixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4) / 2)

        def forward(self, x, steps):
            for _ in range(int(steps.max())):  # strict fx cannot trace this
                x = torch.tanh(F.linear(x, self.w))
            return x

    torch.manual_seed(0)
    model = ternq.quantize(LoopMixer())
    assert [(r.layer, r.type, r.decision, r.path) for r in ternq.report(model).rows] == \
        [("w", "F.linear", "ternary", "fx-lenient")]
    x, w = torch.randn(3, 4), hard_weight(model._parameters["w"], ternq.TernaryConfig())  # the latent weight
    expected = x
    for _ in range(3):  # the interception converts every call, whatever path the lenient trace took
        expected = torch.tanh(F.linear(prepare_input(expected, ternq.TernaryConfig(), -1), w))
    torch.testing.assert_close(model(x, torch.tensor([3])), expected, atol=1e-5, rtol=1e-4)


def test_an_interrupted_quantize_leaves_the_model_unchanged(monkeypatch):
    """Ctrl-C (KeyboardInterrupt, any BaseException) while converting: rolled back, then quantize() works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LSTM(8, 8))
    children = list(model.children())
    calls = {"n": 0}
    real = ternq.convert.install_weights

    def interrupted(*args, **kwargs):  # the LSTM's weights are installed after the Linear was swapped
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(ternq.convert, "install_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ternq.quantize(model)
    assert calls["n"] == 1 and list(model.children()) == children
    assert not ternq.convert.quantized_parts(model) and "forward" not in model[2].__dict__
    monkeypatch.setattr(ternq.convert, "install_weights", real)
    ternq.quantize(model)  # not AlreadyQuantizedError: nothing was left behind
    assert ternq.is_quantized(model[0]) and ternq.report(model).counts == {"ternary": 3}


def test_uses_recorded_from_example_inputs_settle_what_fx_cannot_see():
    """A forward no tracing gets through, computing with its own parameter through a helper and a view: fx
    cannot tell its use, so the report says "use not found" and strict=True refuses; example inputs
    record it (weights only: einsum takes no quantized input), and a layer the run never calls is marked."""

    def helper(x, w):
        return torch.einsum("bi,oi->bo", x, w[:, : x.shape[1]])

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 8) * 0.3)
            self.used = nn.Linear(6, 4)
            self.spare = nn.Linear(4, 4)  # never called

        def forward(self, x):
            x = torch.from_numpy(x.detach().numpy().copy())  # not even lenient tracing gets past this
            return self.used(helper(x, self.w))

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    rows = {r.name: r for r in ternq.report(Odd()).rows}
    assert rows["w"].decision == "float" and rows["w"].reason.startswith("use not found")
    with pytest.raises(ternq.ConversionError, match="strict=True.*w"):
        ternq.quantize(Odd(), strict=True)
    model = ternq.quantize(Odd(), example_inputs=x, strict=True)
    rows = {r.name: r for r in ternq.report(model).rows}
    assert rows["w"].decision == "ternary" and rows["w"].path == "recorded"
    assert rows["w"].reason.startswith("weights only: einsum")
    assert rows["spare.weight"].reason == "not called in the example run (converted by its type)"
    assert rows["used.weight"].reason == ""
    assert ternq.uses.float_uses(model, x) == []


# --- a layer right after a norm takes no input norm (issue 19) ---------------------------------------------------


class _ChannelNorm(nn.LayerNorm):
    """A LayerNorm over the channels of (B, C, T): its own forward, so not a norm of a Linear's features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class _PreNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.rms, self.wide, self.chan = nn.LayerNorm(8), nn.RMSNorm(8), nn.LayerNorm((8, 8)), _ChannelNorm(8)
        self.after_ln, self.after_rms, self.mixed, self.plain = (nn.Linear(8, 8) for _ in range(4))
        self.after_wide, self.after_chan = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 8, 8)
        h = self.after_ln(self.ln(x))
        h = h + self.after_rms(self.rms(h))
        h = self.mixed(self.ln(h)) + self.mixed(h)  # once after a norm, once not
        h = self.plain(F.gelu(h))
        h = self.after_wide(self.wide(h))  # normalized over (8, 8), not over the layer's 8 features
        return self.after_chan(self.chan(h))  # normalized over dim 1, not over the features


class _Untraced(nn.Module):
    """Calls its layer after a norm, but fx cannot trace it: another path may feed it anything."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x)) if float(x.sum()) > -1e9 else self.fc(x)


def test_a_linear_fed_by_a_norm_over_its_features_takes_no_input_norm() -> None:
    """Only where every call the graphs show takes a LayerNorm's / RMSNorm's output over exactly the layer's
    input features; the report says why, the QAT model computes it so, and the packed model the same."""
    torch.manual_seed(0)
    model = _PreNorm()
    x = torch.randn(2, 8, 8)
    plan = ternq.report(model)
    rows = {r.name: r for r in plan.rows}
    for name, norm in (("after_ln", "ln"), ("after_rms", "rms")):
        assert f"its input is {norm}'s output" in rows[f"{name}.weight"].reason
    for name in ("mixed", "plain", "after_wide", "after_chan"):
        assert "input norm" not in rows[f"{name}.weight"].reason, name
    q = ternq.quantize(copy.deepcopy(model))
    norms = {name: m.qconfig.input_norm for name, m in q.named_children() if ternq.is_quantized(m)}
    assert norms == {"after_ln": None, "after_rms": None, "mixed": "layernorm", "plain": "layernorm",
                     "after_wide": "layernorm", "after_chan": "layernorm"}
    explicit = ternq.quantize(copy.deepcopy(model), include=[
        ternq.Rule("re:after_(ln|rms)", ternq.TernaryConfig(input_norm=None)), "*"])
    with torch.no_grad():
        torch.testing.assert_close(q(x), explicit(x), rtol=0, atol=0)
        loaded = ternq.load_packed(ternq.pack(q), _PreNorm())
        torch.testing.assert_close(loaded(x), q(x), rtol=1e-4, atol=1e-4)
    untraced = ternq.quantize(_Untraced())
    assert untraced.fc.qconfig.input_norm == "layernorm"
