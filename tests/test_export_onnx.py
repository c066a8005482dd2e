"""`ternq.export_onnx`: the ONNX graph computes what ternq's runtime computes, from the packed codes.

onnxruntime's output is compared with the packed ternq model's (`ternq.load_packed`, or `packed_layer`) within
the runtime's tolerance (`ternq.runtime`): the weight codes and scales are the file's, so a layer differs from the
runtime only by float32 rounding of its sums, ``1e-5 * (|x_q| @ |W_q|) + 1e-6`` elementwise, as long as its
activation codes are the same. They are wherever the graph computes the layer's input exactly as ternq does: the
first layer of a model without an input norm. Elsewhere an activation code may differ by one step where a value
lies within float32 rounding of a rounding boundary (onnxruntime sums a norm's statistics, and a previous layer's
outputs, in its own order, as the native kernels do): a model's output is then compared by its error energy
(at least 40 dB below the output's) and its largest error (at most 5% of the largest output).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import ternq
from ternq import ExportError, KBitConfig, QuantConfig, TernaryConfig
from ternq.export.onnx import decode_codes, export_module
from ternq.format.encoding import pack_codes
from ternq.qat.functional import FunctionalQuant, install
from ternq.qat.layers import layer_spec, to_quant_module
from ternq.runtime import packed_layer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

sys.path.insert(0, str(Path(__file__).parent))
import zoo_models  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore:.*dynamic_axes.*:UserWarning")


def session(path: Path, optimized: Path | None = None) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, *inputs: Tensor) -> Tensor:
    s = session(path)
    feeds = {i.name: x.numpy() for i, x in zip(s.get_inputs(), inputs)}
    return torch.from_numpy(s.run(None, feeds)[0])


def assert_close_to_runtime(y: Tensor, ref: Tensor) -> None:
    """A model's output against the runtime's, where activation codes may differ by one step (module doc)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.numel() == 0:
        return
    err = (y - ref).double()
    assert float(err.abs().max()) <= 0.05 * float(ref.abs().max()) + 1e-6, float(err.abs().max())
    noise = float(err.square().sum())
    assert noise <= 1e-4 * float(ref.double().square().sum()) + 1e-12, "error energy above -40 dB"


def onnx_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the file's initializers, bytes of its float initializers), without the decode's code tables
    (one 256-row int8 table per encoding the model uses, 1.3 kB at most)."""
    model = onnx.load(str(path))
    sizes = [(onnx.numpy_helper.to_array(t).nbytes, t.data_type) for t in model.graph.initializer
             if not (t.data_type == onnx.TensorProto.INT8 and tuple(t.dims[:1]) == (256,))]
    return sum(n for n, _ in sizes), sum(n for n, t in sizes if t == onnx.TensorProto.FLOAT)


def assert_tidy(model: Any, inputs: list[str]) -> None:
    """A valid graph that keeps the input names, whose other values have short ids, and that holds no tensor
    twice (the decode's code table, looked up by every layer of an encoding, is written once)."""
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == inputs
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    assert max(len(n) for n in names - {o.name for o in model.graph.output}) <= 3
    tensors = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    assert len({(a.dtype.str, a.shape, a.tobytes()) for a in tensors}) == len(tensors)


# --- the decode ------------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=30)
@given(encoding=st.sampled_from(["trit5", "int2", "int4", "int8"]), count=st.integers(0, 300), seed=st.integers(0, 99))
def test_decode_codes_reads_the_format(encoding: str, count: int, seed: int) -> None:
    """The graph's decode (integer arithmetic in float ops) gives back the codes `pack_codes` wrote, tail
    padding excluded, for every encoding and length."""
    lo, hi = {"trit5": (-1, 1), "int2": (-2, 1), "int4": (-8, 7), "int8": (-128, 127)}[encoding]
    codes = torch.randint(lo, hi + 1, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    decoded = decode_codes(pack_codes(codes, encoding), encoding, count)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, codes.float())


# --- layers and stacks against the runtime ---------------------------------------------------------------------

configs = st.builds(
    lambda kind, bits, gran, group, act, norm, act_gran: (
        TernaryConfig(granularity=gran, group_size=group, act_bits=act, input_norm=norm, act_granularity=act_gran)
        if kind == "ternary" else
        KBitConfig(bits=bits, granularity=gran, group_size=group, act_bits=act, input_norm=norm,
                   act_granularity=act_gran)),
    st.sampled_from(["ternary", "kbit"]),
    st.sampled_from([2, 4, 8]),
    st.sampled_from(["tensor", "channel", "group"]),
    st.integers(1, 9),
    st.sampled_from([8, None]),
    st.sampled_from(["layernorm", "rmsnorm", None]),
    st.sampled_from(["token", "tensor"]),
)


def make_layer(kind: str, c_in: int, c_out: int, k: int, stride: int, groups: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(c_in, c_out)
    if kind == "conv1d":
        return nn.Conv1d(c_in * groups, c_out * groups, k, stride=stride, padding=k // 2, groups=groups)
    return nn.ConvTranspose1d(c_in * groups, c_out * groups, k, stride=stride, padding=(k - 1) // 2,
                              groups=groups)


def example(kind: str, c_in: int, groups: int, batch: int, length: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, length, c_in) if kind == "linear" else (batch, c_in * groups, length)
    return torch.randn(*shape, generator=g) * 3


@settings(deadline=None, max_examples=12)
@given(kind=st.sampled_from(["linear", "conv1d", "conv_transpose1d"]), config=configs, c_in=st.integers(1, 12),
       c_out=st.integers(1, 12), k=st.integers(1, 5), stride=st.integers(1, 3), groups=st.integers(1, 3),
       length=st.integers(4, 20), seed=st.integers(0, 2**16), dynamo=st.booleans())
def test_first_layer_matches_the_runtime_elementwise(kind: str, config: QuantConfig, c_in: int, c_out: int, k: int,
                                                      stride: int, groups: int, length: int, seed: int,
                                                      dynamo: bool, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A layer whose input the graph quantizes exactly as ternq (no input norm): onnxruntime's output is within
    the runtime's float32 rounding bound of the packed layer's, elementwise, on another batch and length than the
    example's (dynamic axes), whatever the encoding, granularity and activation config."""
    config = dataclasses.replace(config, input_norm=None)
    if kind == "linear":
        groups = 1
    torch.manual_seed(seed)
    layer = make_layer(kind, c_in, c_out, k, stride, groups)
    qat = to_quant_module(layer, config).eval()
    with torch.no_grad():
        codes, scale = qat.weight_codes()
    packed = packed_layer(layer, codes, scale, config, layer_spec(layer))
    path = tmp_path_factory.mktemp("layer") / "layer.onnx"
    axes = {0: "batch", 1: "length"} if kind == "linear" else {0: "batch", 2: "length"}
    ternq.export_onnx(packed, example(kind, c_in, groups, 2, length, seed), path, input_names=["x"],
                      dynamic_axes={"x": axes}, dynamo=dynamo)
    x = example(kind, c_in, groups, 3, length + 3, seed + 1)
    with torch.no_grad():
        ref = packed(x)
        absolute = to_quant_module(layer, config).eval()
        absolute.bias = None if layer.bias is None else nn.Parameter(layer.bias.abs())
        magnitude = layer_spec(layer).forward(absolute, qat.quantize_input(x).abs(), qat.hard_weight().abs())
    y = run_onnx(path, x)
    assert y.shape == ref.shape
    err = (y - ref).abs()
    assert bool((err <= 1e-5 * magnitude + 1e-6).all()), float((err - 1e-5 * magnitude).max())


class Stack(nn.Module):
    """Linear / Conv1d / ConvTranspose1d layers in a row, channels first between convolutions."""

    def __init__(self, kinds: list[str], width: int) -> None:
        super().__init__()
        self.kinds = kinds
        self.layers = nn.ModuleList(make_layer(kind, width, width, 3, 2, 1) for kind in kinds)

    def forward(self, x: Tensor) -> Tensor:
        for kind, layer in zip(self.kinds, self.layers):
            x = layer(x.transpose(1, 2)).transpose(1, 2) if kind == "linear" else layer(x)
            x = torch.relu(x)
        return x


@settings(deadline=None, max_examples=8)
@given(kinds=st.lists(st.sampled_from(["linear", "conv1d", "conv_transpose1d"]), min_size=1, max_size=4),
       layer_configs=st.lists(configs, min_size=4, max_size=4), width=st.integers(2, 16),
       length=st.integers(4, 24), seed=st.integers(0, 2**16), dynamo=st.booleans())
def test_random_stacks_match_the_packed_model(kinds: list[str], layer_configs: list[QuantConfig], width: int,
                                              length: int, seed: int, dynamo: bool,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Random stacks, each layer with its own config (ternary / k-bit, granularity, activation bits and
    granularity, input norm): the QAT model and the packed model loaded from its file export to graphs whose
    onnxruntime output matches the packed model (module doc: codes may differ by one step past the first layer),
    on another batch and length than the example's."""
    tmp = tmp_path_factory.mktemp("stack")
    torch.manual_seed(seed)
    model = Stack(kinds, width)
    rules = [ternq.Rule(f"layers.{i}", config=c) for i, c in enumerate(layer_configs[:len(kinds)])]
    qat = ternq.quantize(model, include=rules)
    ternq.save_packed(qat, tmp / "m.safetensors")
    torch.manual_seed(seed)
    packed = ternq.load_packed(tmp / "m.safetensors", Stack(kinds, width))
    g = torch.Generator().manual_seed(seed)
    x, x2 = torch.randn(2, width, length, generator=g), torch.randn(3, width, length + 5, generator=g)
    with torch.no_grad():
        ref = packed(x2)
    for name, source in (("qat", qat), ("packed", packed)):
        path = ternq.export_onnx(source, x, tmp / f"{name}.onnx", input_names=["x"],
                                 dynamic_axes={"x": {0: "batch", 2: "length"}}, dynamo=dynamo)
        assert_close_to_runtime(run_onnx(path, x2), ref)
        total, floats = onnx_bytes(path)  # codes as the file's bytes: no more than the packed file holds
        assert total <= (tmp / "m.safetensors").stat().st_size
        assert_tidy(onnx.load(str(path)), ["x"])


# --- whole models ----------------------------------------------------------------------------------------------


def conv_stack() -> nn.Module:
    """A vocoder's layers: weight-normed convolutions (parametrized and legacy) and a transposed upsampler."""
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 32, 5, padding=2)), nn.ReLU(),
                         nn.utils.weight_norm(nn.ConvTranspose1d(32, 24, 4, stride=2, padding=1)), nn.ReLU(),
                         nn.Conv1d(24, 20, 3, groups=4))


class LinearHead(nn.Module):
    """A conv stack followed by a Linear over the channels: the three layer kinds of a vocoder."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = conv_stack()
        self.proj = nn.Linear(20, 12)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x).transpose(1, 2))


def test_qat_and_packed_export_match_the_runtime_with_dynamic_axes(tmp_path: Path) -> None:
    """A QAT model and its packed form export; onnxruntime runs other batch sizes and lengths than the example's
    and matches the packed ternq model; the user's model is unchanged (parameters, mode, layers); the file holds
    the packed codes, not float weights, and onnxruntime folds their decode when the session starts (no decode
    op is left to run per inference)."""
    qat = ternq.quantize(LinearHead(), include=["*"])
    ternq.save_packed(qat, tmp_path / "m.safetensors")
    packed = ternq.load_packed(tmp_path / "m.safetensors", LinearHead())
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    x = torch.randn(2, 16, 30)
    for name, model in (("qat", qat), ("packed", packed)):
        path = ternq.export_onnx(model, (x,), tmp_path / f"{name}.onnx", input_names=["x"],
                                 dynamic_shapes=({0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC},))
        for shape in ((2, 16, 30), (3, 16, 47), (1, 16, 8)):
            x2 = torch.randn(*shape)
            with torch.no_grad():
                ref = packed(x2)
            assert_close_to_runtime(run_onnx(path, x2), ref)
        total, floats = onnx_bytes(path)
        assert total < (tmp_path / "m.safetensors").stat().st_size
        assert floats < 1024  # scales and biases; 2,624 float32 weights would be 10 kB
        session(path, optimized=tmp_path / f"{name}.opt.onnx")
        ops = {n.op_type for n in onnx.load(str(tmp_path / f"{name}.opt.onnx")).graph.node}
        assert "Gather" in {n.op_type for n in onnx.load(str(path)).graph.node} and "Gather" not in ops, ops
        assert_tidy(onnx.load(str(path)), ["x"])
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())
    assert qat.training and sum(ternq.is_quantized(m) for m in qat.modules()) == 4
    assert sum(ternq.runtime.is_packed(m) for m in packed.modules()) == 4


@pytest.mark.parametrize("config", [TernaryConfig(granularity="channel"), KBitConfig(bits=2, granularity="group",
                                    group_size=8), KBitConfig(bits=4), KBitConfig(bits=8)], ids=lambda c: c.name)
def test_onnxruntime_folds_every_decode(config: QuantConfig, tmp_path: Path) -> None:
    """For every encoding, the decode subgraph (its table lookup) is in the file and folded away by onnxruntime's
    session: inference runs no decode."""
    qat = ternq.quantize(nn.Sequential(nn.Linear(32, 64)), include=["*"], config=config)
    path = ternq.export_onnx(qat, torch.randn(2, 32), tmp_path / "m.onnx")
    session(path, optimized=tmp_path / "opt.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"Gather", "Cast", "Reshape", "Expand"}, ops
    assert onnx_bytes(path)[0] <= len(ternq.pack(qat).to_bytes())  # the packed codes, not float weights


def _lm(arch: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                               eos_token_id=0)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return tf.LlamaForCausalLM(config).eval()


class Logits(nn.Module):
    """A causal LM as a function of token ids (no cache: the graph is one full forward)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_lms_export(arch: str, tmp_path: Path) -> None:
    """GPT-2 (its Conv1D layers are quantized addmm calls, its lm_head tied to the embedding) and Llama from
    transformers configs: packed, exported with dynamic batch and sequence, onnxruntime's logits match."""
    qat = ternq.quantize(_lm(arch))
    ternq.save_packed(qat, tmp_path / "m.safetensors")
    packed = ternq.load_packed(tmp_path / "m.safetensors", _lm(arch))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    path = ternq.export_onnx(Logits(packed), (ids,), tmp_path / "m.onnx", input_names=["ids"],
                             dynamic_shapes=({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=16)},))
    ids2 = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = packed(input_ids=ids2, use_cache=False).logits
    assert_close_to_runtime(run_onnx(path, ids2), ref)
    assert onnx_bytes(path)[0] <= (tmp_path / "m.safetensors").stat().st_size


@pytest.mark.parametrize("name", [pytest.param("lstm_2layer_bidirectional", marks=pytest.mark.slow),
                                  "matmul_einsum_params", "bilinear", "multihead_attention"])
def test_zoo_weight_only_and_functional_sites_export(name: str, tmp_path: Path) -> None:
    """Models whose quantized weights no layer computes (RNN weights, a matmul / einsum parameter, Bilinear,
    MultiheadAttention's in_proj) export from their codes, QAT and packed, and match the packed model."""
    arch = next(a for a in zoo_models.TORCH_ZOO if a.name == name)
    torch.manual_seed(0)
    qat = ternq.quantize(arch.make().eval())
    ternq.save_packed(qat, tmp_path / "m.safetensors")
    torch.manual_seed(0)
    packed = ternq.load_packed(tmp_path / "m.safetensors", arch.make().eval())
    inputs = arch.inputs()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        ref = arch.out(packed, inputs if len(inputs) > 1 else inputs[0])
    for source in (qat, packed):
        path = ternq.export_onnx(source, inputs, tmp_path / "m.onnx")
        s = session(path)
        y = torch.from_numpy(s.run(None, {i.name: x.numpy() for i, x in zip(s.get_inputs(), inputs)})[0])
        assert_close_to_runtime(y, ref)
        assert onnx_bytes(path)[0] <= (tmp_path / "m.safetensors").stat().st_size


# --- errors ----------------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        if float(y.sum()) > 0:  # a Python branch on a value: torch.export cannot record it
            return y
        return -y


def test_a_model_that_cannot_export_raises_and_is_left_unchanged(tmp_path: Path) -> None:
    """torch's exporter failing on the model's own code is an ExportError naming the model and what to do; the
    model and the target path are untouched."""
    qat = ternq.quantize(DataDependent(), include=["*"])
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(ExportError, match=r"(?s)DataDependent.*float\(y\.sum\(\)\).*traceable"):
        ternq.export_onnx(qat, torch.randn(2, 8), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"old"
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in before.items())
    assert ternq.is_quantized(qat.proj) and qat.training


class Regulated(nn.Module):
    """A TTS acoustic model's shape: features repeated by durations the model predicts (a length that is data),
    then quantized layers on those frames, per token and per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.duration = nn.Linear(8, 1)
        self.proj = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # x (T, 8)
        durations = torch.sigmoid(self.duration(x)).mul(3).round().long().clamp(min=1).reshape(-1)
        frames = self.proj(x.repeat_interleave(durations, dim=0))
        return self.conv(frames.t().unsqueeze(0))


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_a_data_dependent_length_exports_with_torch_export(granularity: str, tmp_path: Path) -> None:
    """torch.export records a length that is data (an unbacked size) through the activation quantizers: they
    branch on no size the trace cannot know, and the graph matches the packed model on other inputs."""
    torch.manual_seed(0)
    config = TernaryConfig(act_granularity=granularity)
    ternq.save_packed(ternq.quantize(Regulated(), include=["*"], config=config), tmp_path / "m.safetensors")
    packed = ternq.load_packed(tmp_path / "m.safetensors", Regulated())
    path = ternq.export_onnx(packed, torch.randn(5, 8), tmp_path / "m.onnx", input_names=["x"],
                             dynamic_shapes=({0: torch.export.Dim("text", min=1, max=64)},))
    for length in (5, 9, 2):
        x = torch.randn(length, 8)
        with torch.no_grad():
            assert_close_to_runtime(run_onnx(path, x), packed(x))


class SubmoduleCall(nn.Module):
    """A forward that calls F.linear on a child's parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.inner.weight)


def test_unexportable_sites_and_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized call on a submodule's parameter (routed by intercepting its owner's forward; files of older
    ternq versions load so) is refused naming it; so is a missing onnxscript, naming the extra to install."""
    model = SubmoduleCall()
    install(model, [FunctionalQuant("linear", "inner.weight", TernaryConfig())])
    with pytest.raises(ExportError, match=r"F\.linear.*'inner\.weight'.*register_layer"):
        export_module(model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ExportError, match=r"onnxscript.*ternq\[onnx\]"):
        ternq.export_onnx(ternq.quantize(nn.Linear(4, 4)), torch.randn(1, 4), "unused.onnx")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0])
def test_a_scale_the_format_refuses_is_refused(bad: float, tmp_path: Path) -> None:
    """A packed layer or weight-only site whose scale `ternq.pack` would refuse (NaN, infinite, not positive):
    before, the graph held it and computed NaN or flipped signs; now `ExportError` names the weight, nothing is
    written."""
    torch.manual_seed(0)
    model = ternq.quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), config=TernaryConfig())
    with ternq.skeleton():
        skeleton = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    packed = ternq.load_packed(ternq.pack(model).to_bytes(), skeleton)
    packed[2].scale.fill_(bad)
    with pytest.raises(ExportError, match=r"export_onnx: 2: scales must be finite, positive.*ternq.pack refuses"):
        ternq.export_onnx(packed, torch.randn(2, 16), tmp_path / "bad.onnx")
    site = PackedWeightSite()
    install(site, [FunctionalQuant("linear", "w", TernaryConfig())])
    site = ternq.load_packed(ternq.pack(site).to_bytes(), PackedWeightSite())
    next(m for m in site.modules() if hasattr(m, "scale") and m is not site).scale.fill_(bad)
    with pytest.raises(ExportError, match=r"export_onnx: w: scales must be finite"):
        ternq.export_onnx(site, torch.randn(2, 16), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


class PackedWeightSite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 16))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.w)


def test_deduplication_holds_no_copy_of_the_weights() -> None:
    """`_dedupe` keys initializers by their SHA-256: before, by their bytes, so the keys held a second copy of every
    weight of the model at once (a 2 GB model needed 2 GB more to export). Equal tensors are still found."""
    import tracemalloc

    import numpy as np
    from onnx import helper, numpy_helper

    from ternq.export.onnx import _dedupe

    rng = np.random.default_rng(0)
    weights = [rng.integers(0, 255, 4 << 20, dtype=np.uint8) for _ in range(8)]  # 8 x 4 MiB, all different
    initializers = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    initializers.append(numpy_helper.from_array(weights[3].copy(), "again"))
    graph = helper.make_graph([], "g", [], [], initializer=initializers)
    tracemalloc.start()
    try:
        same = _dedupe(graph)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert same == {"again": "w3"} and [t.name for t in graph.initializer] == [f"w{i}" for i in range(8)]
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB traced while deduplicating 32 MiB of weights"
