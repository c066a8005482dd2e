"""`export_onnx`: a QAT or packed ternq model as an ONNX file that computes what ternq's runtime computes.

What the graph holds. Every quantized layer of the model becomes an *export layer* (`OnnxLayer`) in a clone of
the model: its weight is kept as ternq's packed codes, the bytes of the packed safetensors file (5 ternary codes
per byte, 2 or 4-bit fields; `ternq.format.encoding`), with its float32 scales, and is decoded in the graph by
a lookup of each byte's codes in a 256-row int8 table (one ``Gather``), a reshape, a slice and the scale
multiply. A lookup rather than the encoding's arithmetic in float ops: onnxruntime folds each op of the decode
into a full-size intermediate, so one op instead of six cuts the session's start by a third and the memory
it adds by half. torch's exporters write the table once per layer; the export keeps one of equal tensors
(`_dedupe`), so the graph holds it once. Nothing in that subgraph depends on the model's inputs, so onnxruntime folds it into a
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

import functools
import hashlib
import importlib.util
import io
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode

from ..config import QuantConfig
from ..errors import ExportError, FormatError
from ..format.atomic import atomic_write
from ..format.encoding import encoding_for, pack_codes
from ..format.reader import check_scale
from ..qat.functional import (
    FUNCTIONAL_OPS,
    INPUT_POSITION,
    WEIGHT_POSITION,
    FunctionalQuant,
    InterceptedForward,
    WeightQuant,
)
from ..qat.layers import LayerSpec, QuantMixin, take_input
from ..qat.quantizers import activation_scale, dequantize_weight, normalize_input, quantize_weight
from ..qat.surgery import shallow_clone
from ..qat.weight_attr import QUANTIZERS, latent
from ..runtime import PackedFunctional, PackedLayer, PackedWeightOnly, packed_layer

__all__ = ["export_onnx", "export_module", "OnnxLayer", "OnnxWeight", "decode_codes"]

#: the opset written unless asked otherwise (torch's exporter's default)
DEFAULT_OPSET = 18


def _code_table(encoding: str) -> Tensor:
    """(256, codes per byte) int8: the codes of every byte value, by the arithmetic of docs/format.md.
    trit5: ``c_k = ((((b * 3**k) mod 256) * 3) >> 8) - 1``; int2 / int4: field ``j`` of byte ``b`` is
    ``(b >> (bits * j)) & mask`` minus the bias."""
    b = torch.arange(256, dtype=torch.int64).unsqueeze(-1)
    if encoding == "trit5":
        powers = torch.tensor([1, 3, 9, 27, 81])
        codes = (((b * powers) % 256) * 3 >> 8) - 1
    elif encoding in ("int2", "int4"):
        bits = 2 if encoding == "int2" else 4
        shifts = torch.arange(0, 8, bits)
        codes = ((b >> shifts) & ((1 << bits) - 1)) - (1 << (bits - 1))
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    return codes.to(torch.int8)


#: built at import, never while an exporter traces (it would record the table's arithmetic, or cache a traced tensor)
_CODE_TABLES = {encoding: _code_table(encoding) for encoding in ("trit5", "int2", "int4")}


def decode_codes(payload: Tensor, encoding: str, count: int) -> Tensor:
    """The first `count` codes of a `ternq.format.encoding.pack_codes` payload, as float32, in ops an exporter
    records: a lookup of each byte's codes in a 256-row table (`_code_table`), a reshape and a slice; int8: the
    bytes themselves. The table is one tensor for every layer: the export writes it once (`_dedupe`)."""
    if encoding == "int8":
        return payload[:count].to(torch.float32)
    if encoding not in _CODE_TABLES:
        raise ValueError(f"unknown encoding {encoding!r}")
    table = _CODE_TABLES[encoding].to(payload.device)
    return torch.index_select(table, 0, payload.long()).reshape(-1)[:count].to(torch.float32)


def _normalize(x: Tensor, kind: str | None, dim: int, eps: float) -> Tensor:
    """`ternq.qat.quantizers.normalize_input` in the ops it uses for a channels-first input, for every `dim`: its
    fused ``F.layer_norm`` over the innermost dim takes the normalized shape as a list of sizes, which the
    TorchScript tracer cannot export for a dynamic axis (the two differ by float32 rounding only)."""
    if kind == "layernorm":
        centered = x - x.mean(dim=dim, keepdim=True)
        return centered * torch.rsqrt(centered.square().mean(dim=dim, keepdim=True) + eps)
    return normalize_input(x, kind, dim, eps)


def quantize_activations(x: Tensor, config: QuantConfig, dim: int, batched_dims: int | None = None) -> Tensor:
    """`ternq.qat.quantizers.quantize_input` without the straight-through term (the exported graph only runs
    forward): the input normalized and fake-quantized to ``act_bits`` with the same scale and rounding."""
    if not x.is_floating_point():
        return x
    if batched_dims is not None and x.dim() == batched_dims - 1:
        return quantize_activations(x.unsqueeze(0), config, dim, batched_dims).squeeze(0)
    x = _normalize(x, config.input_norm, dim, config.eps)
    if config.act_bits is not None:
        bits = config.act_bits
        s = activation_scale(x, bits, dim, config.eps, config.act_granularity)
        x = torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    return x


def _hold(module: nn.Module, codes: Tensor, scale: Tensor, config: QuantConfig, dtype: torch.dtype) -> None:
    """Give `module` the packed payload and scales of `codes` / `scale` as buffers, and what decoding needs."""
    encoding = encoding_for(config)
    # persistent: the TorchScript tracer makes initializers of the state_dict only (other tensors are constants,
    # folded into float weights)
    module.register_buffer("ternq_payload", pack_codes(codes, encoding).to(scale.device))
    module.register_buffer("ternq_scale", scale.detach().to(torch.float32).clone())
    module.__dict__.update(qconfig=config, encoding=encoding, weight_shape=tuple(codes.shape), float_dtype=dtype)


def _decode(module: Any, out_dim: int, dtype: torch.dtype | None) -> Tensor:
    n = 1
    for d in module.weight_shape:
        n *= d
    codes = decode_codes(module.ternq_payload, module.encoding, n).reshape(module.weight_shape)
    return dequantize_weight(codes, module.ternq_scale, module.qconfig, out_dim, dtype or module.float_dtype)


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
        return _decode(self, self.spec.weight_out_dim, dtype)

    def quantize_input(self, x: Tensor) -> Tensor:
        spec = self.spec
        if spec.feature_dim is None:
            return x
        batched = len(self.kernel_size) + 2 if isinstance(self, _ConvNd) else None
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


def _onnx_layer(module: nn.Module) -> nn.Module:
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
    _hold(layer, codes, scale, config, dtype)
    layer.__dict__["spec"] = spec
    for name in ("_memo", "_last", "_geometry_key", "_conv_geom", "_wsum_cache"):
        layer.__dict__.pop(name, None)
    return layer


class OnnxWeight(nn.Module):
    """Export form of a quantized weight no layer computes: a functional call's (``F.linear(x, self.w)``,
    ``torch.addmm``, ``matmul``) or a weight-only site's (an RNN's, an expert stack's). It holds the packed
    payload and scales; the holder's attribute reads the decoded weight (`read`). For a call, the decoded tensor
    is remembered for the forward being recorded, so that the op taking it as its weight quantizes its input
    (`_Operands`), as the QAT model's `ternq.qat.functional.QuantizedOperand` does."""

    def __init__(self, site: FunctionalQuant | WeightQuant, codes: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.param = site.param
        self.op = site.op if isinstance(site, FunctionalQuant) else None
        self.out_dim = site.out_dim
        _hold(self, codes, scale, site.qconfig, dtype)

    def read(self, latent: Tensor | None = None) -> Tensor:
        """``codes * scale`` decoded in the graph (the latent, a placeholder or the float weight, is not read)."""
        w = _decode(self, self.out_dim, None)
        if self.op is not None:
            _Operands.live[id(w)] = (self, w)
        return w

    def run(self, func: Callable[..., Tensor], args: list[Any], kwargs: dict[str, Any]) -> Tensor:
        """The call on the quantized input (the weight is already the decoded one)."""
        i = INPUT_POSITION[self.op]  # type: ignore[index]
        x = args[i]
        if x.is_floating_point():
            conv = self.op in ("conv1d", "conv2d")
            batched = {"conv1d": 3, "conv2d": 4}.get(self.op)  # type: ignore[arg-type]
            args[i] = quantize_activations(x, self.qconfig, 1 if conv else -1, batched)
        return func(*args, **kwargs)

    def extra_repr(self) -> str:
        what = f"F.{self.op}" if self.op else "weight only"
        return f"{what}({self.param}), {self.qconfig.name}/{self.qconfig.granularity}, {self.encoding}"


_OPS = {fn: op for op, fn in FUNCTIONAL_OPS.items()} | {Tensor.matmul: "matmul", Tensor.__matmul__: "matmul"}
_WEIGHT_KWARG = {"linear": "weight", "conv1d": "weight", "conv2d": "weight", "addmm": "mat2", "matmul": "other"}


class _Operands(TorchFunctionMode):
    """Active while the export records the model: a call of a functional op whose weight is a decoded weight of
    a quantized call (`OnnxWeight.read`, by identity) runs on the quantized input; every other call passes."""

    live: dict[int, tuple[OnnxWeight, Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _OPS.get(func)
        if op is not None and self.live:
            values, pos = list(args), WEIGHT_POSITION[op]
            weight = values[pos] if len(values) > pos else kwargs.get(_WEIGHT_KWARG[op])
            hit = self.live.get(id(weight))
            if hit is not None and hit[1] is weight and hit[0].op == op:
                return hit[0].run(func, values, kwargs)
        return func(*args, **kwargs)


def _onnx_weight(holder: nn.Module, site: nn.Module) -> OnnxWeight:
    """The `OnnxWeight` of a QAT or packed site registered on `holder` (the parameter's module)."""
    if isinstance(site, (PackedFunctional, PackedWeightOnly)):
        return OnnxWeight(site, site.codes, site.scale, site.weight_dtype)
    assert isinstance(site, (FunctionalQuant, WeightQuant))
    attr = site.param.rpartition(".")[2]
    with torch.no_grad():
        weight = latent(holder, attr)
        codes, scale = quantize_weight(weight, site.qconfig, site.out_dim)
    return OnnxWeight(site, codes, scale, weight.dtype)


def _check_scales(module: Any, where: str) -> None:
    """The packed file's rule for scales (`ternq.format.reader.check_scale`: finite, positive, ``qmax * scale`` a
    finite float32): the graph holds what `ternq.pack` would store, and `pack` refuses the rest."""
    try:
        check_scale(module.ternq_scale.cpu().numpy(), where, module.qconfig.qmax)
    except FormatError as e:
        raise ExportError(f"export_onnx: {e}; a packed file cannot hold it either (ternq.pack refuses it): fix or "
                          "exclude that weight") from None


def _reader(fn: Any, memo: dict[int, nn.Module], where: str) -> Callable[[Tensor], Tensor]:
    """The export form of a quantized attribute's read function: the same site's decode in the clone."""
    source = getattr(fn, "__self__", None)
    clone = memo.get(id(source)) if source is not None else None
    if isinstance(clone, OnnxLayer):
        return lambda latent, layer=clone: layer.decoded_weight()
    if isinstance(clone, OnnxWeight):
        return clone.read
    raise ExportError(f"{where}: a quantized weight read through {getattr(fn, '__qualname__', fn)!r}, which "
                      "export_onnx does not know how to decode; export the model's packed file "
                      "(ternq.load_packed) instead, or untie the weight before quantizing")


def export_module(model: nn.Module) -> nn.Module:
    """The module `export_onnx` records: a clone of `model` in eval mode (every module a shallow clone, sharing
    its tensors) whose quantized layers are export layers (`OnnxLayer`) and whose other quantized weights are
    `OnnxWeight`s. `model` is not changed.

    Raises:
        ExportError: a quantized weight the exporter cannot express, naming it and what to do.
    """
    memo: dict[int, nn.Module] = {}
    holders: list[tuple[nn.Module, str]] = []

    def visit(module: nn.Module, path: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if isinstance(module, (QuantMixin, PackedLayer)):
            clone = memo[id(module)] = _onnx_layer(module)
            _check_scales(clone, path or "the model")
            return clone
        clone = memo[id(module)] = shallow_clone(module, type(module))
        for name, child in module._modules.items():
            if isinstance(child, (FunctionalQuant, WeightQuant)):
                if isinstance(child, FunctionalQuant) and "." in child.param:
                    raise ExportError(
                        f"{path or 'the model'} ({type(module).__name__}): its quantized call F.{child.op} takes "
                        f"the parameter {child.param!r} of a submodule, which export_onnx cannot route yet; "
                        "register the submodule's type with ternq.register_layer, or exclude that weight")
                site = memo[id(child)] = _onnx_weight(module, child)
                _check_scales(site, f"{path}.{child.param}" if path else child.param)
                clone._modules[name] = site
            elif child is not None:
                clone._modules[name] = visit(child, f"{path}.{name}" if path else name)
        forward = clone.__dict__.get("forward")
        if isinstance(forward, InterceptedForward):  # it ran the original module: the clone runs its class's
            if forward.replaced is None:
                del clone.__dict__["forward"]
            else:
                clone.__dict__["forward"] = forward.replaced
        if QUANTIZERS in module.__dict__:
            holders.append((clone, path))
        return clone

    root = visit(model, "")
    for clone, path in holders:  # after the visit: a tie may read a site of a module visited later
        where = f"{path or 'the model'} ({type(clone).__name__})"
        clone.__dict__[QUANTIZERS] = {name: _reader(fn, memo, where)
                                      for name, fn in clone.__dict__[QUANTIZERS].items()}
    for module in memo.values():
        module.training = False  # the clones only; `model` keeps its mode
    return root


def _recording(root: nn.Module) -> nn.Module:
    """`root` with an instance-level forward that torch.export records: the same call, with the signature of the
    forward the user sees (torch.export matches dynamic_shapes to its parameters; an export layer's own forward
    takes ``*args``, its float layer's names the input), run under `_Operands` where the model has quantized
    functional calls."""
    signature = root.spec.float_type.forward.__get__(root) if isinstance(root, OnnxLayer) else root.forward
    forward = root.forward
    operands = any(isinstance(m, OnnxWeight) and m.op is not None for m in root.modules())

    @functools.wraps(signature)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if not operands:
            return forward(*args, **kwargs)
        _Operands.live.clear()
        try:
            with _Operands():
                return forward(*args, **kwargs)
        finally:
            _Operands.live.clear()

    root.__dict__["forward"] = recorded
    return root


#: onnxscript's constant folding may fold a node whose constant inputs hold at most this many elements into outputs
#: of at most this many: shapes and small constants fold, a weight's decode (its payload, its float output) never
_FOLD_INPUT_LIMIT, _FOLD_OUTPUT_LIMIT = 64, 16


def _simplify(proto: Any) -> Any:
    """`proto` through onnxscript's optimizer (a third of the nodes go: casts, identities, shape arithmetic), with
    folding limits that keep every weight's decode subgraph for onnxruntime to fold at load time."""
    from onnxscript import optimizer

    return optimizer.optimize(proto, input_size_limit=_FOLD_INPUT_LIMIT, output_size_limit=_FOLD_OUTPUT_LIMIT)


def _tidy(proto: Any) -> Any:
    """`proto` without the exporter's per-node debugging records (the Python stack trace and fx node of every
    op: 90% of a small model's file, and paths of the exporting machine), intermediate shapes (onnxruntime infers
    them) and initializers no node reads (the float latents and placeholders of weights that are decoded)."""
    used: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            node.ClearField("metadata_props")
            node.ClearField("doc_string")
            used.update(node.input)
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    used.update(o.name for o in proto.graph.output)
    proto.graph.ClearField("value_info")
    dropped = {t.name for t in proto.graph.initializer if t.name not in used}
    if dropped:
        keep = [t for t in proto.graph.initializer if t.name not in dropped]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
        inputs = [i for i in proto.graph.input if i.name not in dropped]  # initializers listed as inputs
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
    _shorten(proto.graph, _dedupe(proto.graph))
    return proto


def _dedupe(graph: Any) -> dict[str, str]:
    """Drop initializers equal to an earlier one (type, shape and bytes: torch's exporters write a constant once
    per module that makes it, as the decode's code table), after making the main graph's Constant nodes
    initializers; returns each dropped name's replacement."""
    from onnx.numpy_helper import to_array

    def constant(node: Any) -> bool:
        return node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]

    constants = [n for n in graph.node if constant(n)]
    for node in constants:  # the TorchScript exporter's constants: initializers, to be deduplicated with the rest
        tensor = graph.initializer.add()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
    if constants:
        nodes = [n for n in graph.node if not constant(n)]
        del graph.node[:]
        graph.node.extend(nodes)
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    same: dict[str, str] = {}
    for t in graph.initializer:
        # the values, not the proto: equal tensors may hold them in raw_data or in a typed field; by their
        # SHA-256, so that the keys do not hold a second copy of every weight of the model
        key = (t.data_type, tuple(t.dims), hashlib.sha256(to_array(t).tobytes()).digest())
        same[t.name] = first.setdefault(key, t.name)
    same = {a: b for a, b in same.items() if a != b}
    if same:
        keep = [t for t in graph.initializer if t.name not in same]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        inputs = [i for i in graph.input if i.name not in same]
        del graph.input[:]
        graph.input.extend(inputs)
    return same


def _base36(i: int) -> str:
    digits = ""
    while True:
        i, r = divmod(i, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if not i:
            return digits


def _shorten(graph: Any, renamed: dict[str, str]) -> None:
    """Name every value of `graph` and its subgraphs but the graph's inputs and outputs by a short id, and drop
    node names: the exporters' names spell each value's module path and op (a third of a small model's file), and
    onnxruntime reads none of them. `renamed` maps a value to the one it stands for (`_dedupe`)."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {n: n for n in keep}
    fresh = (n for n in map(_base36, itertools.count()) if n not in keep)

    def short(name: str) -> str:
        if not name:  # an omitted optional input
            return name
        name = renamed.get(name, name)
        if name not in names:
            names[name] = next(fresh)
        return names[name]

    def walk(g: Any) -> None:
        for value in (*g.input, *g.output, *g.value_info, *g.initializer):
            value.name = short(value.name)
        for node in g.node:
            node.ClearField("name")
            node.input[:] = [short(n) for n in node.input]
            node.output[:] = [short(n) for n in node.output]
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(graph)


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
        opset_version: the ONNX opset.
        dynamo: True (default): torch.export's exporter; False: the TorchScript tracer, without constant
            folding (so the codes stay packed), for models torch.export cannot trace.

    Returns:
        the path written.

    Raises:
        ExportError: onnx / onnxscript missing, a quantized site that cannot be exported, or torch's exporter
            failing (its message, which names the op, is included).
    """
    _require("onnx", *(["onnxscript"] if dynamo else []))
    graph = _recording(export_module(model))
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    common = dict(kwargs=example_kwargs, input_names=list(input_names) if input_names else None,
                  output_names=list(output_names) if output_names else None, opset_version=opset_version,
                  dynamic_axes=dynamic_axes)
    try:
        with torch.no_grad():
            if dynamo:
                # optimize=False: torch runs onnxscript's optimizer with limits that fold decode subgraphs of
                # up to 256k weights into float weights; `_simplify` runs it with limits that fold none
                program = torch.onnx.export(graph, args, None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                            optimize=False, external_data=False, verbose=False, **common)
                proto = _simplify(program.model_proto)
            else:
                if dynamic_shapes is not None:
                    raise ExportError("export_onnx(dynamo=False) takes dynamic_axes, not dynamic_shapes")
                buffer = io.BytesIO()
                torch.onnx.export(graph, args, buffer, dynamo=False, do_constant_folding=False, **common)
                import onnx

                proto = onnx.load_from_string(buffer.getvalue())
    except ExportError:
        raise
    except Exception as e:  # torch's exporters raise many types; the message names the op or module
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its headings for a terminal
        raise ExportError(
            f"torch.onnx.export could not export {type(model).__name__}: {type(e).__name__}: {message}\n"
            "The quantized layers export; this is an op of the model itself. Make that code traceable "
            "(torch.export: data-dependent branches as torch.cond, dynamic sizes declared in dynamic_shapes), or "
            "try export_onnx(..., dynamo=False)") from e
    atomic_write(path, _tidy(proto).SerializeToString())
    return Path(path)
