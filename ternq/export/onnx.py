"""`export_onnx`: a QAT or packed ternq model as an ONNX file that computes what ternq's runtime computes.

What the graph holds. Every quantized layer of the model becomes an *export layer* (`OnnxLayer`) in a clone of
the model: its weight is kept as ternq's packed codes, the bytes of the packed safetensors file (5 ternary codes
per byte, 2 or 4-bit fields; `ternq.format.encoding`), with its float32 scales, and is decoded in the graph by
the encoding's own integer arithmetic (the trit5 multiply-and-shift, the k-bit field shifts), a reshape, a slice
and the scale multiply. Nothing in that subgraph depends on the model's inputs, so onnxruntime folds it into a
float weight when a session starts (its default graph optimizations, "basic" and up): the file stays the size of
the packed file and the session runs float kernels. The layer's input normalization and activation
quantization (absmax per token, ``round`` half to even as ``torch.round``) are ops of the graph, so the
activation codes are ternq's (the runtime's tolerance, docs/deploying.md).

Why torch.export (``dynamo=True``, torch's default exporter since 2.9): it records data-dependent lengths (a
``repeat_interleave`` by predicted durations, as a TTS acoustic model has) as dynamic dimensions, where the
TorchScript tracer loses the shapes downstream of them; and the TorchScript exporter folds constants at export
time, which would write the decoded float weights into the file. ``dynamo=False`` stays available (constant
folding off) for models torch.export cannot trace.
"""
from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import ExportError
from ..format.atomic import atomic_write
from ..format.encoding import encoding_for, pack_codes
from ..qat.functional import FunctionalQuant, WeightQuant
from ..qat.layers import LayerSpec, QuantMixin, take_input
from ..qat.quantizers import activation_scale, dequantize_weight, normalize_input
from ..qat.surgery import shallow_clone
from ..qat.weight_attr import QUANTIZERS
from ..runtime import PackedLayer, packed_layer

__all__ = ["export_onnx", "export_module", "OnnxLayer", "decode_codes"]

#: the opset torch's exporter writes by default (LayerNormalization needs 17)
DEFAULT_OPSET = 18


def decode_codes(payload: Tensor, encoding: str, count: int) -> Tensor:
    """The first `count` codes of a `ternq.format.encoding.pack_codes` payload, as float32, in torch ops an
    exporter records: the integer arithmetic of docs/format.md (no table, so no per-layer constant beside the
    payload). trit5: ``c_k = ((((b * 3**k) mod 256) * 3) >> 8) - 1``; int2 / int4: field ``j`` of byte ``b``
    is ``(b >> (bits * j)) & mask`` minus the bias; int8: the byte itself."""
    if encoding == "int8":
        return payload[:count].to(torch.float32)
    # in float32, where every value here is an exact integer (< 2**24) and dividing by a power of two is exact:
    # integer division exports as ops onnxruntime cannot fold (CastLike)
    b = payload.to(torch.float32).unsqueeze(-1)
    if encoding == "trit5":
        powers = torch.tensor([1.0, 3.0, 9.0, 27.0, 81.0])
        codes = torch.floor(torch.remainder(b * powers, 256.0) * (3.0 / 256.0)) - 1.0
    elif encoding in ("int2", "int4"):
        bits = 2 if encoding == "int2" else 4
        shifts = torch.tensor([1.0 / (1 << (bits * j)) for j in range(8 // bits)])
        codes = torch.remainder(torch.floor(b * shifts), float(1 << bits)) - float(1 << (bits - 1))
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return codes.reshape(-1)[:count]


def quantize_activations(x: Tensor, config: QuantConfig, dim: int, batched_dims: int | None = None) -> Tensor:
    """`ternq.qat.quantizers.quantize_input` without the straight-through term (the exported graph only runs
    forward): the input normalized and fake-quantized to ``act_bits`` with the same scale and rounding."""
    if not x.is_floating_point():
        return x
    if batched_dims is not None and x.dim() == batched_dims - 1:
        return quantize_activations(x.unsqueeze(0), config, dim, batched_dims).squeeze(0)
    x = normalize_input(x, config.input_norm, dim, config.eps)
    if config.act_bits is not None:
        bits = config.act_bits
        s = activation_scale(x, bits, dim, config.eps, config.act_granularity)
        x = torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    return x


class OnnxLayer:
    """Forward of an export layer: the float layer's op on the quantized input and the weight decoded from the
    packed codes. Its class is ``Onnx<Float>(OnnxLayer, <Float>)``, a shallow clone of the packed layer (bias,
    hyperparameters, hooks); its weight attribute reads the decoded weight, so that a parent reading
    ``layer.weight`` records the same decode."""

    spec: LayerSpec
    qconfig: QuantConfig
    encoding: str
    weight_shape: tuple[int, ...]
    float_dtype: torch.dtype
    ternq_payload: Tensor
    ternq_scale: Tensor

    def decoded_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``codes * scale`` in the weight's shape, computed from the payload by graph ops."""
        n = 1
        for d in self.weight_shape:
            n *= d
        codes = decode_codes(self.ternq_payload, self.encoding, n).reshape(self.weight_shape)
        return dequantize_weight(codes, self.ternq_scale, self.qconfig, self.spec.weight_out_dim,
                                 dtype or self.float_dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        spec = self.spec
        if spec.feature_dim is None:
            return x
        kernel_size = getattr(self, "kernel_size", None)
        batched = len(kernel_size) + 2 if isinstance(self, nn.modules.conv._ConvNd) and kernel_size else None
        return quantize_activations(x, self.qconfig, spec.feature_dim, batched)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x, args = take_input(self.spec, args, kwargs)
        w = self.decoded_weight(x.dtype if x.is_floating_point() else self.float_dtype)
        return self.spec.forward(self, self.quantize_input(x), w, *args, **kwargs)


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _onnx_class(spec: LayerSpec) -> type[nn.Module]:
    cls = _CLASSES.get(spec.float_type)
    if cls is None:
        weight = property(lambda self: self.decoded_weight(), doc="``codes * scale`` decoded in the graph")
        cls = _CLASSES[spec.float_type] = type(f"Onnx{spec.float_type.__name__}", (OnnxLayer, spec.float_type),
                                               {spec.weight_name: weight, "__module__": __name__})
    return cls


def _onnx_layer(module: nn.Module, path: str) -> nn.Module:
    """The export layer of a QAT or packed layer (a new module; `module` is unchanged)."""
    if isinstance(module, QuantMixin):
        spec, config = module._ternq_spec, module.qconfig
        with torch.no_grad():
            codes, scale = module.weight_codes()
            dtype = module.float_weight().dtype
        module = packed_layer(module, codes, scale, config, spec, kernel="weight_only", storage="int8")
    else:
        assert isinstance(module, PackedLayer)
        spec, config, dtype = module.spec, module.qconfig, module.float_dtype
        codes, scale = module.codes, module.scale
    layer = shallow_clone(module, _onnx_class(spec))
    for name in ("ternq_codes", "scale"):
        layer._buffers.pop(name, None)
    encoding = encoding_for(config)
    # persistent: the TorchScript tracer makes initializers of the state_dict only (other tensors are constants,
    # folded into float weights)
    layer.register_buffer("ternq_payload", pack_codes(codes, encoding))
    layer.register_buffer("ternq_scale", scale.detach().to(torch.float32).clone())
    layer.__dict__.update(spec=spec, qconfig=config, encoding=encoding, weight_shape=tuple(codes.shape),
                          float_dtype=dtype)
    for name in ("_memo", "_last", "_geometry_key", "_conv_geom", "_wsum_cache"):
        layer.__dict__.pop(name, None)
    return layer


def _refuse_unsupported(module: nn.Module, path: str) -> None:
    where = f"{path or 'the model'} ({type(module).__name__})"
    for name, child in module._modules.items():
        if isinstance(child, (FunctionalQuant, WeightQuant)):
            kind = f"functional call F.{child.op}" if isinstance(child, FunctionalQuant) else "weight-only site"
            raise ExportError(
                f"{where}: its quantized {kind} on {child.param!r} ({name}) cannot be exported yet; only "
                "quantized layers can. Register the module's type with ternq.register_layer so that ternq "
                "quantizes it as a layer, or exclude that weight from quantization")
    if QUANTIZERS in module.__dict__ and not isinstance(module, (QuantMixin, PackedLayer)):
        raise ExportError(f"{where}: it reads a quantized weight of another module (a tied weight: "
                          f"{sorted(module.__dict__[QUANTIZERS])}), which cannot be exported yet; untie it "
                          "before quantizing")


def export_module(model: nn.Module) -> nn.Module:
    """The module `export_onnx` records: a clone of `model` in eval mode (every module a shallow clone, sharing
    its tensors) whose quantized layers are export layers (`OnnxLayer`). `model` is not changed.

    Raises:
        ExportError: a quantized site other than a layer, naming it and what to do.
    """
    memo: dict[int, nn.Module] = {}

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if isinstance(module, (QuantMixin, PackedLayer)):
            clone = _onnx_layer(module, path)
        else:
            _refuse_unsupported(module, path)
            clone = shallow_clone(module, type(module))
            for name, child in module._modules.items():
                if child is not None:
                    clone._modules[name] = visit(child, f"{path}.{name}" if path else name)
        memo[id(module)] = clone
        return clone

    root = visit(model, "")
    for module in memo.values():
        module.training = False  # the clones only; `model` keeps its mode
    return root


def _without_trace_metadata(proto: Any) -> Any:
    """`proto` without the exporter's per-node debugging records (the Python stack trace and fx node of every
    op: 90% of a small model's file, and paths of the exporting machine)."""
    for node in proto.graph.node:
        node.ClearField("metadata_props")
        node.ClearField("doc_string")
    proto.graph.ClearField("value_info")  # intermediate shapes: onnxruntime infers them
    return proto


def _require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"export_onnx needs {', '.join(missing)}: pip install 'ternq[onnx]'")


def export_onnx(model: nn.Module, example_inputs: Tensor | tuple[Any, ...], path: str | os.PathLike[str], *,
                example_kwargs: dict[str, Any] | None = None, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, dynamic_shapes: Any = None,
                dynamic_axes: Mapping[str, Any] | None = None, opset_version: int = DEFAULT_OPSET,
                dynamo: bool = True) -> Path:
    """Export a QAT model (after `ternq.quantize`) or a packed one (`ternq.load_packed`) to an ONNX file.

    The graph computes what ternq's runtime computes: each quantized layer's input normalization and
    activation quantization, and its weight as ``codes * scale``, stored as the packed file's codes and decoded
    by a subgraph onnxruntime folds when a session starts (docs/deploying.md). The model is exported in eval
    mode from a clone; `model` itself is never changed, also when the export fails.

    Args:
        model: the QAT or packed model.
        example_inputs: the positional inputs of one forward (a tensor or a tuple).
        path: the ``.onnx`` file to write (atomically: a failed export leaves no partial file).
        example_kwargs: keyword inputs of that forward.
        input_names, output_names: names of the graph's inputs and outputs.
        dynamic_shapes: torch.export's dynamic shapes of the inputs (``torch.export.Dim``), passed through.
        dynamic_axes: the older form, ``{"input name": {axis: "name"}}``, passed through.
        opset_version: the ONNX opset (at least 17, for LayerNormalization).
        dynamo: True (default): torch.export's exporter; False: the TorchScript tracer, without constant
            folding (so the codes stay packed), for models torch.export cannot trace.

    Returns:
        the path written.

    Raises:
        ExportError: onnx / onnxscript missing, a quantized site that cannot be exported, or torch's exporter
            failing (its message, which names the op, is included).
    """
    _require("onnx", *(["onnxscript"] if dynamo else []))
    graph = export_module(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    common = dict(kwargs=example_kwargs, input_names=list(input_names) if input_names else None,
                  output_names=list(output_names) if output_names else None, opset_version=opset_version,
                  dynamic_axes=dynamic_axes)
    try:
        with torch.no_grad():
            if dynamo:
                # optimize=False: onnxscript's optimizer would fold small decode subgraphs into float weights
                program = torch.onnx.export(graph, args, None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                            optimize=False, external_data=False, verbose=False, **common)
                data = _without_trace_metadata(program.model_proto).SerializeToString()
            else:
                if dynamic_shapes is not None:
                    raise ExportError("export_onnx(dynamo=False) takes dynamic_axes, not dynamic_shapes")
                buffer = io.BytesIO()
                torch.onnx.export(graph, args, buffer, dynamo=False, do_constant_folding=False, **common)
                data = buffer.getvalue()
    except ExportError:
        raise
    except Exception as e:  # torch's exporters raise many types; the message names the op or module
        raise ExportError(
            f"torch.onnx.export could not export {type(model).__name__}: {type(e).__name__}: {e}\n"
            "The quantized layers export; this is an op of the model itself. Make that code traceable "
            "(torch.export: data-dependent branches as torch.cond, dynamic sizes declared in dynamic_shapes), or "
            "try export_onnx(..., dynamo=False)") from e
    atomic_write(path, data)
    return Path(path)
