"""Finding weights by use: which parameters reach a matmul- or conv-like op, and which module's forward does it.

A weight is worth quantizing when its value reaches an op that multiplies it with an activation: ``F.linear``,
convolutions of any dimension, ``matmul`` / ``mm`` / ``bmm`` / ``addmm`` / ``einsum`` / ``@``, ``bilinear``,
``multi_head_attention_forward``, the recurrent ops, ``embedding``. It may get there directly or through a view,
an index (``self.experts[idx]``), a transpose or a dtype cast. Three sources find such *uses*, each naming the
*reader* (the module whose forward makes the call) and the parameter's path relative to it:

* `graph_uses`: the fx graph of a module's own forward (see `ternq.find.graph`), walked back from every compute op
  through view-like nodes to a ``get_attr`` of a parameter;
* `native_uses`: torch.nn modules whose forward runs a native kernel fx cannot see into (``nn.LSTM`` reads its
  ``_flat_weights``, ``nn.MultiheadAttention`` its ``in_proj_weight`` and ``out_proj.weight``), and the fast
  paths that read a child layer's weight instead of calling it (``nn.TransformerEncoderLayer``);
* `record_uses`: a float forward on example inputs, recorded with a `TorchFunctionMode` that follows each
  parameter through derived tensors: it sees what fx cannot (untraceable forwards, helper functions).
"""
from __future__ import annotations

import contextlib
import io
import operator
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from ..qat.functional import WEIGHT_POSITION
from ..qat.weight_attr import latent_parameter
from .sites import join as _join
from .sites import relative, sites_of

__all__ = ["Use", "COMPUTE_OPS", "GROUPED_OPS", "FAST_PATHS", "graph_uses", "native_uses", "record_uses", "float_uses", "record_output_layers", "param_of",
           "compute_op",
           "iter_tensors"]

#: ops that multiply a weight with an activation, by function / method name
COMPUTE_OPS = frozenset({
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "convolution", "_convolution", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm",
    "addbmm", "addmv", "mv", "einsum", "tensordot", "multi_head_attention_forward", "_native_multi_head_attention",
    "embedding", "embedding_bag", "lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
    "rnn_relu_cell", "_transformer_encoder_layer_fwd", "_grouped_mm", "grouped_mm", "_scaled_grouped_mm",
    "linalg_multi_dot", "multi_dot", "chain_matmul", "inner", "scaled_dot_product_attention", "linalg_vecdot",
    "vecdot", "dot", "vdot",
})

#: argument positions that are added to a product, not multiplied: ``addmm(bias, x, W)``'s bias is no weight
_ADDENDS = {"addmm": 0, "baddbmm": 0, "addbmm": 0, "addmv": 0}

#: elementwise ops that keep a weight a weight when the other operand is a number (``w * 0.25``, ``-w``),
#: and reorderings of its entries (``w.flip(-1)``, ``w.repeat(2, 1)``)
_SCALE_OPS = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__", "neg", "__neg__", "flip", "repeat",
                        "tile", "repeat_interleave", "roll", "fliplr", "flipud", "rot90", "to_dense"})

#: ops computing one matmul per group along dim 0 of a 3-D weight (transformers' mixture-of-experts kernels)
GROUPED_OPS = frozenset({"_grouped_mm", "grouped_mm", "_scaled_grouped_mm"})

#: fused kernels a torch.nn module runs instead of calling its layers (eval + no_grad); any interception turns
#: them off (torch checks ``has_torch_function``), so the layers run as themselves
FAST_PATHS = frozenset({"_transformer_encoder_layer_fwd"})

#: ops whose result is (a part of) their first input, so that a weight reaches a compute op through them
_DERIVE_OPS = frozenset({
    "getitem", "__getitem__", "t", "transpose", "permute", "view", "reshape", "to", "float", "half", "bfloat16",
    "double", "type", "type_as", "contiguous", "chunk", "split", "unbind", "squeeze", "unsqueeze", "flatten",
    "narrow", "select", "index_select", "expand", "expand_as", "movedim", "swapaxes", "view_as", "reshape_as",
    "clone",
})

#: ops where a weight entering at a position >= 1 is the right operand of ``x @ W``: outputs on its last dim
_RIGHT_OPERAND = frozenset({"matmul", "__matmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm"})


@dataclass(frozen=True)
class Use:
    """One parameter reaching one compute op.

    Attributes:
        reader: qualified name of the module whose forward makes the call.
        param: the parameter's path relative to the reader ("in_proj_weight", "out_proj.weight").
        op: the compute op's name ("linear", "matmul", "lstm", ...).
        direct: the parameter itself is the op's weight argument (``F.linear(x, self.w)``), no view between.
        indexed: it went through an index first (``self.experts[idx]``: one weight per expert along dim 0).
        out_dim: the weight dimension holding output channels for this op (the right operand of ``x @ W``: last).
        source: "fx", "native" or "recorded".
    """

    reader: str
    param: str
    op: str
    direct: bool = False
    indexed: bool = False
    out_dim: int = 0
    source: str = "fx"


def _name(target: object) -> str:
    if isinstance(target, str):
        return "matmul" if target == "__matmul__" else target
    if target is operator.getitem:
        return "getitem"
    if target is operator.matmul:
        return "matmul"
    name = getattr(target, "__name__", "")
    return "matmul" if name == "__matmul__" else name


def compute_op(target: object) -> str | None:
    """The compute op `target` (a function, method name or fx target) stands for, or None."""
    name = _name(target)
    return name if name in COMPUTE_OPS else None


def _derives(node: fx.Node) -> bool:
    """Whether `node` is (a view, part, reordering or scalar multiple of) one tensor input."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return False
    name = _name(node.target)
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if name in _DERIVE_OPS:
        return isinstance(node.args[0], fx.Node)
    return name in _SCALE_OPS and len(tensors) == 1


def _derived_from(node: fx.Node) -> fx.Node:
    return next(a for a in node.args if isinstance(a, fx.Node))


def _selects(op: str, index: Any) -> bool:
    """Whether a derive op picks whole entries of dim 0 (``experts[idx]``, ``select``), not a slice of them."""
    if op in ("select", "index_select"):
        return True
    if op not in ("getitem", "__getitem__") or not index:
        return False
    first = index[0]
    if isinstance(first, tuple):
        first = first[0] if first else None
    return first is not None and not isinstance(first, (slice, type(Ellipsis)))


def _out_dim(op: str, position: int, weight: Tensor) -> int:
    if op in _RIGHT_OPERAND and position >= (2 if op.startswith("add") or op.startswith("badd") else 1):
        return max(weight.dim() - 1, 0)
    return 0


_TRANSPOSE_ATTRS = frozenset({"T", "mT", "H", "mH"})


def _walk(node: fx.Node) -> tuple[str, bool, bool] | None:
    """Follow `node` back through view-like ops (``.T``, indexing, reshapes, scalar multiples) to a ``get_attr``:
    (its path, whether no op was between, whether an index picked entries of dim 0), or None."""
    direct, indexed = True, False
    while True:
        if node.op == "get_attr":
            return str(node.target), direct, indexed
        if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
                and node.args[1] in _TRANSPOSE_ATTRS and isinstance(node.args[0], fx.Node):  # self.weight.T
            node = node.args[0]
        elif _derives(node):
            indexed = indexed or _selects(_name(node.target), node.args[1:2])
            node = _derived_from(node)
        else:
            return None
        direct = False


def param_of(node: fx.Node) -> str | None:
    """The path of the parameter (or buffer) `node` reads, through view-like ops, or None."""
    found = _walk(node)
    return None if found is None else found[0]


def _node_inputs(node: fx.Node) -> Iterator[tuple[int, fx.Node]]:
    for i, arg in enumerate([*node.args, *node.kwargs.values()]):
        if isinstance(arg, fx.Node):
            yield i, arg
        elif isinstance(arg, (list, tuple)):
            for a in arg:
                if isinstance(a, fx.Node):
                    yield i, a


def graph_uses(reader: str, module: nn.Module, graph: fx.Graph) -> list[Use]:
    """The uses of `module`'s parameters (its own and its descendants') in the graph of its own forward."""
    params = dict(module.named_parameters())
    uses: list[Use] = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        op = compute_op(node.target)
        if op is None:
            continue
        for position, arg in _node_inputs(node):
            if _ADDENDS.get(op) == position:
                continue
            found = _walk(arg)
            if found is None or found[0] not in params:
                continue
            path, direct, indexed = found
            weight = params[path]
            if weight.dim() < 2 and op != "embedding":
                continue  # a bias (addmm's first operand), not a weight
            uses.append(Use(reader, path, op, direct and position == WEIGHT_POSITION.get(op, 1), indexed,
                            _out_dim(op, position, weight), "fx"))
    return uses


def native_uses(reader: str, module: nn.Module) -> list[Use]:
    """Uses made by torch.nn modules inside native kernels (invisible to fx), and fast paths that read a child
    layer's weight instead of calling the layer."""
    if isinstance(module, nn.RNNBase):
        op = {"LSTM": "lstm", "GRU": "gru"}.get(module.mode, "rnn_tanh")
        return [Use(reader, n, op, source="native") for n in module._flat_weights_names
                if getattr(module, n, None) is not None and getattr(module, n).dim() >= 2]
    if isinstance(module, nn.RNNCellBase):  # torch.lstm_cell / gru_cell / rnn_*_cell on its own weights
        op = {nn.LSTMCell: "lstm_cell", nn.GRUCell: "gru_cell"}.get(type(module), "rnn_tanh_cell")
        return [Use(reader, n, op, source="native") for n in ("weight_ih", "weight_hh")]
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight",
                                                                       "v_proj_weight"]
        return [Use(reader, n, "multi_head_attention_forward", source="native")
                for n in [*names, "out_proj.weight"] if _has_param(module, n)]
    if isinstance(module, nn.EmbeddingBag):
        return [Use(reader, "weight", "embedding_bag", source="native")]
    if isinstance(module, nn.Bilinear):
        return [Use(reader, "weight", "bilinear", source="native")]
    if isinstance(module, nn.TransformerEncoderLayer):  # the eval fast path reads these weights itself
        return [Use(reader, n, "_transformer_encoder_layer_fwd", source="native")
                for n in ("linear1.weight", "linear2.weight") if _has_param(module, n)]
    return []


def _has_param(module: nn.Module, path: str) -> bool:
    try:
        latent_parameter(module, path)
    except AttributeError:
        return False
    return True


def iter_tensors(value: Any) -> Iterator[tuple[int, Tensor]]:
    """(position, tensor) for every tensor in a call's arguments, one level into lists and tuples."""
    for i, v in enumerate(value):
        if isinstance(v, Tensor):
            yield i, v
        elif isinstance(v, (list, tuple)):
            for item in v:
                if isinstance(item, Tensor):
                    yield i, item


class _Recorder(TorchFunctionMode):
    """Follows each parameter through derived tensors and notes which compute ops it reaches, and in which
    module's forward (the innermost running one that holds it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.aliases: dict[int, list[str]] = {}  # id(module) -> its names (a module may be registered twice)
        for n, m in model.named_modules(remove_duplicate=False):
            self.aliases.setdefault(id(m), []).append(n)
        self.names = {i: names[-1] for i, names in self.aliases.items()}
        self.params: dict[int, list[str]] = {}  # a tied parameter has several names
        for n, p in model.named_parameters(remove_duplicate=False):
            self.params.setdefault(id(p), []).append(n)
        self.derived: dict[int, tuple[str, bool]] = {}  # id(tensor) -> (param key, indexed)
        self.keep: list[Tensor] = []  # derived tensors stay alive, so their ids stay theirs
        self.stack: list[nn.Module] = []
        self.uses: list[tuple[nn.Module | None, str, str, bool, bool, int, Tensor]] = []

    def _origin(self, t: Tensor) -> tuple[str, bool, bool] | None:
        if id(t) in self.params:
            return self._key(t), True, False
        if id(t) in self.derived:
            key, indexed = self.derived[id(t)]
            return key, False, indexed
        return None

    def _key(self, param: Tensor) -> str:
        """The parameter's name under the running module, if it has one there (tied weights)."""
        names = self.params[id(param)]
        scope = self.names.get(id(self.stack[-1]), "") if self.stack else ""
        return next((n for n in names if scope and n.startswith(scope + ".")), names[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name == "__get__" and getattr(getattr(func, "__self__", None), "__name__", None) in _TRANSPOSE_ATTRS:
            name = "t"  # weight.T and friends
        tensors = list(iter_tensors([*args, *kwargs.values()]))
        scaled = name in _SCALE_OPS and len(tensors) == 1 and not any(
            isinstance(a, Tensor) and a.dim() > 0 and id(a) != id(tensors[0][1]) for a in args)
        if (name in _DERIVE_OPS or scaled) and tensors:
            origin = self._origin(tensors[0][1])
            if origin is not None:
                indexed = origin[2] or _selects(name, list(args[1:2]) + list(kwargs.values())[:1])
                for _, t in iter_tensors([out] if isinstance(out, Tensor) else [out]):
                    self.derived[id(t)] = (origin[0], indexed)
                    self.keep.append(t)
        elif name in COMPUTE_OPS:
            for position, t in tensors:
                if _ADDENDS.get(name) == position:
                    continue
                origin = self._origin(t)
                if origin is not None:
                    reader = self.stack[-1] if self.stack else None
                    direct = origin[1] and position == WEIGHT_POSITION.get(name, 1)
                    self.uses.append((reader, origin[0], name, direct, origin[2], position, t))
        return out


def record_uses(model: nn.Module, example_inputs: Any, ran: set[str] | None = None) -> list[Use]:
    """Run `model` once on `example_inputs` (a tuple of positional arguments, a dict of keyword arguments, or one
    tensor) without gradients, and return every use of its parameters the run made; `ran`, if given, receives
    the names (all of them, for a module registered twice) of every module whose forward ran."""
    recorder = _Recorder(model)

    def enter(module: nn.Module, args: Any) -> None:
        recorder.stack.append(module)
        if ran is not None:
            ran.update(recorder.aliases.get(id(module), ()))

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays as it is
        recorder.stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    try:  # ternq's own run of the model: what its forward prints or warns is not for the user
        with torch.no_grad(), recorder, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            _call(model, example_inputs)
    finally:
        pre.remove()
        post.remove()
    uses: dict[tuple[str, str, str], Use] = {}
    for reader, key, op, direct, indexed, position, t in recorder.uses:
        weight = latent_parameter(model, key)
        if weight.dim() < 2 and op != "embedding":
            continue
        reader_name = _holding_reader(recorder, reader, key)
        rel = relative(key, reader_name)
        use = Use(reader_name, rel, op, direct, indexed, _out_dim(op, position, t), "recorded")
        uses.setdefault((reader_name, rel, op), use)
    return list(uses.values())


def float_uses(model: nn.Module, example_inputs: Any) -> list[Use]:
    """The uses, while `model` runs on `example_inputs`, of a float (latent) weight that `quantize` quantized
    (``ternq.report(model)`` calls it quantized): each is a path where the model computes with a float value the report says is quantized.
    Empty for a correctly converted model; a test for "nothing reported quantized computes in float"."""
    quantized = {_join(prefix, site.key) for prefix, site in sites_of(model) if site.config is not None}
    # a tied weight is judged under the name its reader uses: float under a kept-float module's name is no bypass
    return [u for u in record_uses(model, example_inputs) if _join(u.reader, u.param) in quantized]


class _OutputTracer(TorchFunctionMode):
    """Tags every tensor with the candidate weights whose op produced it, through parameter-free ops."""

    def __init__(self, sites: dict[int, str]) -> None:
        super().__init__()
        self.sites = sites  # id(parameter) -> candidate name, for weights computed with by a functional op
        self.tags: dict[int, frozenset[str]] = {}
        self.keep: list[Tensor] = []

    def tag(self, value: Any, tags: frozenset[str]) -> None:
        for t in _flatten(value):
            self.tags[id(t)] = tags
            self.keep.append(t)

    def tags_of(self, value: Any) -> frozenset[str]:
        return frozenset().union(*(self.tags.get(id(t), frozenset()) for t in _flatten(value)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [*args, *kwargs.values()]
        found = frozenset(self.sites[id(t)] for _, t in iter_tensors(inputs) if id(t) in self.sites)
        self.tag(out, found if found and _name(func) in COMPUTE_OPS else self.tags_of(inputs))
        return out


def _flatten(value: Any) -> Iterator[Tensor]:
    """The tensors in a (nested) output: tuples, lists, dicts and transformers' ModelOutput."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)


def record_output_layers(model: nn.Module, example_inputs: Any, scope: nn.Module, layers: dict[int, str],
                         sites: dict[int, str]) -> frozenset[str]:
    """The candidates whose output reaches `scope`'s output with no other parameterized module between, seen
    while `model` runs on `example_inputs`: `layers` maps id(layer module) -> name, `sites` id(parameter) -> name
    for the other candidates. A leaf module holding parameters that is no candidate (a LayerNorm) is a barrier."""
    tracer = _OutputTracer(sites)
    reached: set[str] = set()

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in layers:
            tracer.tag(output, frozenset({layers[id(module)]}))
        elif module._parameters and not module._modules and not any(id(p) in sites for p in
                                                                    module._parameters.values()):
            tracer.tag(output, frozenset())
        if module is scope:
            reached.update(tracer.tags_of(output))

    post = nn.modules.module.register_module_forward_hook(leave)
    try:
        with torch.no_grad(), tracer, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            _call(model, example_inputs)
    finally:
        post.remove()
    return frozenset(reached)


def _call(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    return model(example_inputs)


def _holding_reader(recorder: _Recorder, reader: nn.Module | None, key: str) -> str:
    """The reader's name, or its nearest ancestor's whose subtree holds parameter `key` (a module may compute
    with a parameter it was handed, not its own)."""
    name = recorder.names.get(id(reader), "") if reader is not None else ""
    while name and not key.startswith(name + "."):
        name = name.rpartition(".")[0]
    return name
