"""The zoo: architectures ternq's other tests never built (torch.nn built-ins, custom weight uses, transformers
models from tiny configs; see tests/zoo_models.py), each put through the same five checks:

1. coverage: every parameter (dim >= 2) that reaches a matmul / conv-like op in a float forward -- found here by
   an independent recorder, not ternq's -- is quantized, or a float report row saying why;
2. no bypass: no float (latent) value of a weight report() calls quantized reaches a compute op (train and eval);
3. weight-only QAT eval == the dequantized model's eval;
4. packed (save_packed / load_packed into a fresh skeleton) eval == QAT eval;
5. six AdamW steps on a fixed batch lower the loss.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

import ternq
from ternq.uses import float_uses
from ternq.weight_attr import QUANTIZERS

sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import ZOO, Arch, call, randn  # noqa: E402

WEIGHT_ONLY = ternq.TernaryConfig(act_bits=None, input_norm=None)
ARCHS = [pytest.param(a, id=a.name) for a in ZOO]
BY_NAME = {a.name: a for a in ZOO}


def build(arch: Arch, seed: int = 0) -> tuple[nn.Module, Any]:
    if arch.needs_transformers:
        pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return arch.make(), arch.inputs()


def run(model: nn.Module, arch: Arch, inputs: Any) -> Tensor:
    return arch.out(model, inputs).float()


# --- an independent oracle: which parameters reach a compute op ------------------------------------------------

_COMPUTE = {"linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
            "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm",
            "einsum", "tensordot", "multi_head_attention_forward", "embedding", "embedding_bag", "lstm", "gru",
            "rnn_tanh", "rnn_relu", "mv", "addmv",
            # transformers' fused experts (the default experts implementation "grouped_mm")
            "grouped_mm", "_grouped_mm", "grouped_mm_fallback", "_scaled_grouped_mm", "scaled_grouped_mm"}
# a weight reaches an op through views, indexing, transposes, dtype casts and weight parametrizations
_PASS = {"__getitem__", "__get__", "t", "transpose", "permute", "view", "reshape", "to", "float", "half",
         "bfloat16", "type", "type_as", "contiguous", "clone", "chunk", "split", "unbind", "squeeze", "unsqueeze",
         "flatten", "narrow", "select", "index_select", "expand", "expand_as", "movedim", "swapaxes", "view_as",
         "reshape_as", "_weight_norm", "detach", "mT"}


_ADDED_FIRST = {"addmm", "baddbmm", "addbmm", "addmv"}


class _Reach(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.derived: dict[int, set[str]] = {}
        self.keep: list[Tensor] = []
        self.reached: set[str] = set()

    def _keys(self, t: Tensor) -> set[str]:
        if id(t) in self.names:
            return {self.names[id(t)]}
        return self.derived.get(id(t), set())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        operands = [*args, *kwargs.values()]
        if name in _ADDED_FIRST:  # addmm(bias, x, W): the first operand is added, not multiplied (no weight)
            operands = [*args[1:], *(v for k, v in kwargs.items() if k != "input")]
        tensors = [t for a in operands for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, Tensor)]
        keys = set().union(*(self._keys(t) for t in tensors)) if tensors else set()
        if name in _COMPUTE or name.split(".")[0] in _COMPUTE:
            self.reached |= keys
        elif keys and name in _PASS:
            outs = out if isinstance(out, (list, tuple)) else [out]
            for t in outs:
                if isinstance(t, Tensor):
                    self.derived[id(t)] = keys
                    self.keep.append(t)
        return out


def reaching_weights(model: nn.Module, inputs: Any, grad: bool = False) -> set[str]:
    """Names of the parameters with dim >= 2 that reach a compute op when `model` runs `inputs`."""
    oracle = _Reach(model)
    with torch.set_grad_enabled(grad), oracle:
        call(model, inputs)
    return {k for k in oracle.reached if model.get_parameter(k).dim() >= 2}


def row_name(key: str) -> str:
    """The report's name of a parameter: weight_norm's g / v and parametrization originals name their weight."""
    if ".parametrizations." in key:
        prefix, _, rest = key.partition(".parametrizations.")
        return f"{prefix}.{rest.split('.')[0]}"
    for suffix in ("_g", "_v", "_orig"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


# --- 1. coverage -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_coverage(arch: Arch):
    model, inputs = build(arch)
    reached = reaching_weights(model, inputs)
    aliases = {n: [k for k, q in model.named_parameters(remove_duplicate=False) if q is p]
               for n, p in model.named_parameters()}
    model = ternq.quantize(model, example_inputs=inputs)
    report = ternq.report(model)
    rows = {r.name: r for r in report.rows}
    assert reached, "the oracle saw no weight reach a compute op"
    missing, silent = [], []
    for key in sorted(reached):
        row = next((rows[row_name(k)] for k in aliases.get(key, [key]) if row_name(k) in rows), None)
        if row is None:
            missing.append(key)
        elif row.decision == "float" and not (row.rule or row.reason):
            silent.append(key)
    assert not missing, f"weights reaching a compute op without a report row: {missing}\n{report}"
    assert not silent, f"float rows without rule or reason: {silent}\n{report}"
    unknown = [r.name for r in report.rows if r.reason.startswith("use not found")]
    assert not unknown, f"'use not found' despite example_inputs: {unknown}\n{report}"
    quantized = [r for r in report.rows if r.decision != "float"]
    assert quantized, str(report)
    print(f"{arch.name}: {len(quantized)} quantized, {len(report.rows) - len(quantized)} float of "
          f"{len(report.rows)} rows; {report.params_quantized:,} params quantized")


# --- 2. no bypass ----------------------------------------------------------------------------------------------


def latent_uses(model: nn.Module, inputs: Any, grad: bool) -> list[str]:
    """The independent recorder's view of a bypass: weights report() calls quantized whose own (latent float)
    value reaches a compute op of the converted model."""
    rows = ternq.report(model).rows
    quantized = {r.name for r in rows if r.decision != "float"}
    kept = {r.name for r in rows if r.decision == "float"}
    names = {n: [k for k, q in model.named_parameters(remove_duplicate=False) if q is p]
             for n, p in model.named_parameters()}
    # a tied tensor with a float row under another name (GPT-2's wte / lm_head) may be read in float there
    return sorted(key for key in reaching_weights(model, inputs, grad)
                  if any(row_name(k) in quantized for k in names.get(key, [key]))
                  and not any(row_name(k) in kept for k in names.get(key, [key])))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_bypass(arch: Arch):
    model, inputs = build(arch)
    model = ternq.quantize(model, example_inputs=inputs)
    model.eval()
    with torch.no_grad():
        assert float_uses(model, inputs) == []
    assert latent_uses(model, inputs, grad=False) == []  # eval + no_grad: torch's fast paths
    model.train()
    assert float_uses(model, inputs) == []
    assert latent_uses(model, inputs, grad=True) == []


def test_the_bypass_check_can_fail():
    model, inputs = build(BY_NAME["multihead_attention"])
    model = ternq.quantize(model, example_inputs=inputs).eval()
    assert float_uses(model, inputs) == []
    for module in model.modules():  # what makes reads of the weights give their quantized values
        module.__dict__.pop(QUANTIZERS, None)
    found = {u.param for u in float_uses(model, inputs)}
    assert "in_proj_weight" in found, found


def test_transformer_encoder_fast_path_computes_with_quantized_weights(monkeypatch):
    # eval + no_grad takes torch's fused encoder kernel, which reads linear1 / linear2 weights itself
    arch = BY_NAME["transformer_encoder"]
    model, inputs = build(arch)
    calls = []
    kernel = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with torch.no_grad():
        model.eval()(inputs)
    assert calls, "the float model does not take the fast path: this test would prove nothing"
    model = ternq.quantize(model, config=WEIGHT_ONLY, example_inputs=inputs)
    slow = run(model, arch, inputs).detach()  # grad enabled: no fast path
    with torch.no_grad():
        fast = run(model, arch, inputs)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        model = ternq.dequantize(model)
        torch.testing.assert_close(run(model, arch, inputs), fast, atol=1e-4, rtol=1e-4)


def test_grayscale_cnn_keeps_its_input():
    arch = BY_NAME["grayscale_cnn"]
    model, inputs = build(arch)
    model = ternq.quantize(model, example_inputs=inputs).eval()
    rows = {r.layer: r for r in ternq.report(model).rows}
    assert rows["features.0"].decision != "float"
    assert rows["features.0"].reason.startswith("no input norm"), rows["features.0"]
    with torch.no_grad():
        a, b = model(inputs), model(randn(*inputs.shape, seed=9))
    assert not torch.allclose(a, b, atol=1e-3), "the output does not depend on the input"
    assert (a - b).abs().max() > 1e-2


# --- 3. QAT (weight only) == dequantized --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_qat_equals_dequantized(arch: Arch):
    model, inputs = build(arch)
    model = ternq.quantize(model.eval(), config=WEIGHT_ONLY, example_inputs=inputs)
    with torch.no_grad():
        qat = run(model, arch, inputs)
        model = ternq.dequantize(model)
        assert not any(ternq.is_quantized(m) for m in model.modules())
        torch.testing.assert_close(run(model, arch, inputs), qat, atol=1e-4, rtol=1e-4)


# --- 4. packed == QAT --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_qat(arch: Arch, tmp_path):
    model, inputs = build(arch)
    model = ternq.quantize(model.eval(), example_inputs=inputs)
    path = tmp_path / "model.safetensors"
    ternq.save_packed(model, path)
    skeleton, _ = build(arch)
    loaded = ternq.load_packed(path, skeleton.eval()).eval()
    with torch.no_grad():
        qat = run(model, arch, inputs)
        out = run(loaded, arch, inputs)
    # the runtime computes the QAT forward from the same integer codes; float rounding differs, and the native
    # quantizer may put an activation one step over where a value lies on a rounding boundary (ternq.runtime,
    # "Tolerance"): nearly every element within 1e-4, none off by more than a small fraction of the output
    close = (out - qat).abs() <= 1e-4 + 1e-4 * qat.abs()
    assert close.float().mean() >= 0.99, f"{(~close).sum()} of {close.numel()} elements differ"
    assert (out - qat).abs().max() <= 0.01 * qat.abs().max()


# --- 5. training lowers the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss(arch: Arch):
    model, inputs = build(arch)
    model = ternq.quantize(model.train(), example_inputs=inputs)
    with torch.no_grad():
        target = randn(*run(model, arch, inputs).shape, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(run(model, arch, inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
