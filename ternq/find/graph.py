"""Finding the layers ternq can quantize, and where they sit in the data flow.

Two sources, combined:

* **the module tree**: every module whose type is registered (`ternq.register_layer`) is a candidate layer,
  wherever it is. This always works, whatever the forward code does.
* **fx graphs**: each module's *own* forward is traced with `torch.fx`, its submodules kept as opaque calls
  ("shallow" tracing). A forward that fx cannot trace (data-dependent ``if``, ``int(tensor)`` loops, ...) only
  loses its own graph: its parent and children are traced on their own, so the traceable part of the model is
  as large as it can be, and each forward is traced once. The graphs tell
  - which candidate layers are called from traced code (report path "fx"; the others are "swap"),
  - functional ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` calls whose weight is a parameter (extra candidates,
    named after that parameter, e.g. ``"mixer.proj_weight"``),
  - which layers feed a module's output (`ternq.output_layers`).

A forward that strict fx rejects is traced once more *leniently* (`_LenientTracer`): data-dependent conditions
get a fixed answer, data-dependent counts are 1. The result is one plausible path through the code, not a
faithful program: it is used only to find functional calls on the module's own parameters (report path
"fx-lenient"; interception is by weight identity at run time, so calls on other paths are converted too) and,
traced on demand, to answer `output_layers` where strict tracing failed.

Tracing runs the forward's Python code on proxies, so it could in principle write attributes on the module;
every module's ``__dict__`` and registries are restored after its trace, and warnings and prints are silenced.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import operator
import random
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import ConversionError
from ..qat.layers import is_quantized, layer_spec
from .sites import Kind
from .sites import join as _join
from .uses import GROUPED_OPS, Use, graph_uses, native_uses, record_uses

__all__ = ["Candidate", "Analysis", "analyze", "walk_modules", "describe_type", "FUNCTIONAL_OPS"]

#: functional ops whose parameter weight can be quantized, and the module type they stand for
FUNCTIONAL_OPS: dict[object, tuple[str, type[nn.Module]]] = {
    F.linear: ("linear", nn.Linear),
    F.conv1d: ("conv1d", nn.Conv1d),
    F.conv2d: ("conv2d", nn.Conv2d),
}

_NONE_OR_FLAG = (type(None), bool, int, float, str)


@dataclass
class Candidate:
    """One quantizable weight, and how ternq reaches it.

    Attributes:
        name: what selectors match: the layer's qualified module name for a layer; for a functional call or a
            weight-only site, the weight's path (owner name + "." + attribute path, e.g. "mixer.proj_weight").
        module: the layer itself; for a functional call the module whose forward makes it (the owner); for a
            weight-only site the module holding the parameter.
        layer_type: the module type a type selector compares against (nn.Linear for ``F.linear``; the holder's
            type for a weight-only site, e.g. nn.LSTM).
        type_name: what the report shows, e.g. "Conv1d[weight_norm]", "F.linear", "LSTM[lstm]".
        path: "fx" when fx-traced code calls it, "swap" when found only by walking the module tree, "fx-lenient"
            for a call found by lenient tracing of an untraceable forward, "native" for a torch.nn module whose
            kernel reads it, "recorded" for a use seen while running example inputs.
        kind: "layer" (a module of a registered type: QAT layer, inputs quantized too), "functional" (an
            ``F.linear/conv1d/conv2d`` call on a parameter, intercepted, inputs quantized too), "weight" (a
            parameter other ops compute with: quantized wherever read, weights only), "unknown" (a weight no
            source saw used: kept float, reported).
        key: the weight's state_dict key.
        optional: True for opt-in types (Embedding): only candidates when a rule selects their type.
        op / param / owner_name: functional calls and weight sites: the op ("linear", "lstm", ...), the weight's
            path inside `module`, and the name of `module`.
        readers: other modules whose forward reads this weight itself (a parent reading a layer's ``.weight``,
            the modules computing with a weight-only site's parameter), each with the op.
        out_dim / experts: weight-only sites: the dim of output channels; True when the parameter stacks one
            weight per expert along dim 0 (indexed before use), which then get a scale each.
        normed_by: a layer whose input, at every call the graphs show, is the output of a norm over the same
            features (``self.qkv(self.ln1(x))``): that norm's name (see `_normed_inputs`), else "".
    """

    name: str
    module: nn.Module
    layer_type: type[nn.Module]
    type_name: str
    path: str
    kind: Kind = Kind.LAYER
    key: str = ""
    optional: bool = False
    op: str | None = None
    param: str | None = None
    owner_name: str | None = None
    readers: dict[str, str] = field(default_factory=dict)
    out_dim: int = 0
    experts: bool = False
    tied: list[str] = field(default_factory=list)  # other state_dict keys of the same weight tensor
    idle: bool = False  # a layer the example run never called (found by its type only)
    normed_by: str = ""  # the norm layer whose output is this layer's input at every call, if any

    @property
    def functional(self) -> bool:
        return self.kind == Kind.FUNCTIONAL

    @property
    def weight(self) -> torch.Tensor:
        """The weight as its layer or owner holds it (weight_norm's effective weight for a layer)."""
        if self.kind == Kind.LAYER:
            return getattr(self.module, layer_spec(self.module).weight_name)  # type: ignore[union-attr]
        return self.module.get_parameter(self.param)  # type: ignore[arg-type]

    @property
    def n_params(self) -> int:
        """Parameters the layer holds (weight_norm's g and v, bias included); the weight alone for the others."""
        if self.kind == Kind.LAYER:
            return sum(p.numel() for p in self.module.parameters())
        return self.weight.numel()


@dataclass
class Analysis:
    """What `analyze` learned about a model; read by selectors, quantize() and report()."""

    root: nn.Module
    modules: dict[str, nn.Module]  # canonical qualified name -> module (registered layers' insides excluded)
    names: dict[int, str]  # id(module) -> canonical name
    references: dict[int, list[tuple[nn.Module, str]]]  # id(module) -> every (parent, attribute) holding it
    graphs: dict[str, fx.Graph] = field(default_factory=dict)  # module name -> graph of its own forward
    untraced: dict[str, str] = field(default_factory=dict)  # module name -> why fx could not trace it
    lenient: dict[str, fx.Graph | None] = field(default_factory=dict)  # untraced module -> lenient graph (cache)
    candidates: list[Candidate] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # id of every parameter some graph reads
    example_inputs: Any = None  # what the float model was run on, if anything (`output_layers` may rerun it)

    def candidate(self, name: str) -> Candidate | None:
        return self._by_name.get(name)

    def __post_init__(self) -> None:
        self._by_name: dict[str, Candidate] = {}

    def lenient_graph(self, name: str) -> fx.Graph | None:
        """The lenient graph of untraceable module `name` (traced on first use), or None if even that fails."""
        if name not in self.untraced:
            return None
        if name not in self.lenient:
            with _rng_preserved():
                try:
                    self.lenient[name] = _trace(self.modules[name], lenient=True)
                except Exception:
                    self.lenient[name] = None
        return self.lenient[name]

    def has_params(self, module: nn.Module) -> bool:
        return next(iter(module.parameters()), None) is not None

    def submodule_name(self, scope: str, target: str) -> str:
        """Canonical name of `target` (a path relative to module `scope`, as in a graph's call_module node)."""
        return self.names[id(self.modules[scope].get_submodule(target))]


def walk_modules(root: nn.Module) -> tuple[dict[str, nn.Module], dict[int, str], dict[int, list[tuple[nn.Module, str]]]]:
    """Canonical names (first path in pre-order, as ``named_modules``) and every parent reference.

    Registered layers are not entered: their insides (``parametrizations.weight.original0``...) are not layers.
    """
    modules: dict[str, nn.Module] = {}
    names: dict[int, str] = {}
    refs: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    stack: list[tuple[str, nn.Module, nn.Module | None, str]] = [("", root, None, "")]
    while stack:
        name, module, parent, attr = stack.pop()
        if parent is not None:
            refs[id(module)].append((parent, attr))
        if id(module) in names:
            continue
        names[id(module)] = name
        modules[name] = module
        if layer_spec(module) is not None:
            continue
        children = [(f"{name}.{a}" if name else a, c, module, a) for a, c in module._modules.items() if c is not None]
        stack.extend(reversed(children))
    return modules, names, refs


class _ShallowTracer(fx.Tracer):
    """Traces one module's own forward: every other module it calls is kept as an opaque call_module node."""

    def __init__(self, scope: nn.Module) -> None:
        super().__init__()
        self._scope = scope

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._scope


class _LenientProxy(fx.Proxy):
    """A proxy that answers the questions strict fx refuses: its length / int value is 1, item writes are nodes."""

    def __len__(self) -> int:
        return 1

    def __index__(self) -> int:
        return 1

    def __int__(self) -> int:
        return 1

    def __float__(self) -> float:
        return 1.0

    def __setitem__(self, key: object, value: object) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, name: str) -> fx.proxy.Attribute:
        return _LenientAttribute(self, name)


class _LenientAttribute(fx.proxy.Attribute, _LenientProxy):
    """``x.shape`` and friends, lenient too (``len(x.shape)``)."""


class _LenientTracer(_ShallowTracer):
    """Traces *one* path through a forward with data-dependent control flow.

    Each data-dependent condition answers `first` the first time its line runs and ``not first`` afterwards
    (so ``while`` loops end), data-dependent counts are 1, iterating a tensor yields its first item. The graph
    is one plausible execution, good enough to see which functional calls exist and where outputs come from.
    """

    def __init__(self, scope: nn.Module, first: bool) -> None:
        super().__init__(scope)
        self._first = first
        self._seen: set[tuple[object, int]] = set()

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _LenientProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        key = (caller.f_code, caller.f_lasti) if caller is not None else (None, len(self._seen))
        if len(self._seen) > 10_000:
            raise RuntimeError("lenient tracing gave up: too many data-dependent conditions")
        answer = self._first if key not in self._seen else not self._first
        self._seen.add(key)
        return answer

    def iter(self, obj: fx.Proxy) -> Iterator[fx.Proxy]:
        return iter([obj[0]])

    def create_arg(self, a: object) -> fx.node.Argument:
        if isinstance(a, np.generic):  # numpy scalars (e.g. from config arithmetic) are plain constants
            a = a.item()
        return super().create_arg(a)


def _concrete_args(module: nn.Module, none_defaults: str) -> dict[str, object] | None:
    """Arguments with a flag-like default (False, 0, "mean", and per `none_defaults` None), traced as constants.

    Forwards like ``forward(x, mask=None, return_dict=False)`` branch on such arguments; tracing the default
    call path keeps them traceable. `none_defaults`: "keep" (None-default arguments stay inputs), "all-but-first"
    (the first argument stays an input: Hugging Face forwards default every argument to None), "all".
    """
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    concrete = {}
    for i, p in enumerate(params):
        if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or p.default is inspect.Parameter.empty:
            continue
        if not isinstance(p.default, _NONE_OR_FLAG):
            continue
        if p.default is None and (none_defaults == "keep" or (none_defaults == "all-but-first" and i == 0)):
            continue
        concrete[p.name] = p.default
    return concrete or None


def _trace(module: nn.Module, lenient: bool = False) -> fx.Graph:
    """Shallow fx trace of `module` (strict, or `_LenientTracer`); tries several sets of constant arguments.

    The module is restored afterwards (``__dict__`` and registries), and warnings and prints are silenced.
    """
    saved = dict(module.__dict__)
    registries = {k: dict(saved[k]) for k in ("_parameters", "_buffers", "_modules") if k in saved}
    variants: list[dict[str, object] | None] = []
    for none_defaults in ("keep", "all-but-first", "all"):
        concrete = _concrete_args(module, none_defaults)
        if concrete not in variants:
            variants.append(concrete)
    tracers = [lambda: _LenientTracer(module, False), lambda: _LenientTracer(module, True)] if lenient \
        else [lambda: _ShallowTracer(module)]
    error: Exception | None = None
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for make in tracers:
                for concrete in variants:
                    try:
                        return make().trace(module, concrete_args=concrete)
                    except Exception as e:  # any failure of user code under tracing means "untraceable"
                        error = e if error is None else error
    finally:
        module.__dict__.clear()
        module.__dict__.update(saved)
        for key, content in registries.items():
            module.__dict__[key].clear()
            module.__dict__[key].update(content)
    assert error is not None
    raise error


#: wrappers whose forward must not run on proxies (collectives, compilation); their insides are traced
_WRAPPERS = ("DataParallel", "DistributedDataParallel", "FullyShardedDataParallel", "OptimizedModule")


def _traceable(module: nn.Module) -> bool:
    """Worth tracing: has its own forward, is not a layer, a wrapper, or a childless torch.nn built-in."""
    if layer_spec(module) is not None or is_quantized(module):
        return False
    if type(module).__name__ in _WRAPPERS:
        return False
    if type(module).forward is nn.Module.forward:  # ModuleList, ModuleDict, ParameterList...
        return False
    builtin = type(module).__module__.startswith(("torch.nn.", "torch.ao.nn."))
    return not (builtin and not module._modules)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 120:
        first = first[:117] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


_REPARAMETRIZATIONS = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}


def describe_type(module: nn.Module) -> str:
    """Layer type for reports: the user-visible class plus its weight reparametrization, if any."""
    spec = layer_spec(module)
    base = spec.float_type if spec is not None else type(module)
    extras = []
    if parametrize.is_parametrized(module):
        for plist in module.parametrizations.values():
            for p in plist:
                kind = type(p).__name__.lstrip("_")
                extras.append(_REPARAMETRIZATIONS.get(kind, kind))
    for hook in module._forward_pre_hooks.values():  # the legacy weight_norm / spectral_norm hooks
        kind = type(hook).__name__
        if kind in _REPARAMETRIZATIONS:
            extras.append(_REPARAMETRIZATIONS[kind])
    return f"{base.__name__}[{','.join(extras)}]" if extras else base.__name__


def _seen(analysis: Analysis, module: nn.Module, graph: fx.Graph) -> None:
    """Note the parameters a graph reads (whatever it does with them): their use is known."""
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                analysis.seen.add(id(module.get_parameter(str(node.target))))
            except AttributeError:
                pass


def _trace_all(analysis: Analysis, called: set[int]) -> list[Use]:
    """Trace every module's own forward; return the uses of parameters its graph shows."""
    uses: list[Use] = []
    for name, module in analysis.modules.items():
        if not _traceable(module):
            continue
        try:
            graph = _trace(module)
        except Exception as e:
            analysis.untraced[name] = _reason(e)
            # uses are looked for on the module's own parameters (F.linear(x, self.w)): only modules holding
            # some are traced leniently now, the others on demand (output_layers)
            lenient = analysis.lenient_graph(name) if module._parameters else None
            if lenient is not None:
                _seen(analysis, module, lenient)
                uses.extend(replace(u, source="fx-lenient") for u in graph_uses(name, module, lenient))
            continue
        analysis.graphs[name] = graph
        _seen(analysis, module, graph)
        for node in graph.nodes:
            if node.op == "call_module":
                try:
                    called.add(id(module.get_submodule(node.target)))
                except AttributeError:
                    pass
        uses.extend(graph_uses(name, module, graph))
    return uses


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Forwards run under tracing may draw random numbers (``torch.randn(4)``): conversion must not shift seeds."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def analyze(root: nn.Module, example_inputs: Any = None) -> Analysis:
    """Walk and shallow-trace `root` (and run it on `example_inputs`, if given, recording what it computes with
    each parameter); list its candidate weights (module order, functional calls and weight-only sites after the
    module whose forward makes them)."""
    modules, names, refs = walk_modules(root)
    analysis = Analysis(root=root, modules=modules, names=names, references=dict(refs),
                        example_inputs=example_inputs)
    called: set[int] = set()
    with _rng_preserved():
        uses = _trace_all(analysis, called)
        for name, module in modules.items():
            uses.extend(native_uses(name, module))
        ran: set[str] = set()
        if example_inputs is not None:
            try:
                uses.extend(record_uses(root, example_inputs, ran))
            except Exception as e:  # the user's inputs do not run the model: say so, do not guess
                raise ConversionError(f"example_inputs: running the float model on them failed: "
                                      f"{type(e).__name__}: {e}. Pass what model(...) accepts: a tensor, a tuple "
                                      "of positional arguments or a dict of keyword arguments") from e
    layers: dict[str, Candidate] = {}
    for name, module in modules.items():
        spec = layer_spec(module)
        if spec is not None:
            layers[name] = Candidate(
                name=name, module=module, layer_type=spec.float_type, type_name=describe_type(module),
                path="fx" if id(module) in called else "swap", optional=spec.optional,
                key=f"{name}.{spec.weight_name}" if name else spec.weight_name)
    for name, norm in _normed_inputs(analysis, layers).items():
        layers[name].normed_by = norm
    if example_inputs is not None:
        read = {f"{u.reader}.{u.param}".rpartition(".")[0] for u in uses if u.source == "recorded"}
        for name, cand in layers.items():
            cand.idle = name not in ran and name not in read
    extra = _sites_from_uses(analysis, uses, layers)
    for name in modules:
        if name in layers:
            analysis.candidates.append(layers[name])
        analysis.candidates.extend(extra.get(name, []))
    if example_inputs is None:
        analysis.candidates.extend(_unknown_weights(analysis))
    names: dict[int, list[str]] = {}
    for key, param in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(key)
    module_names: dict[int, set[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        module_names.setdefault(id(module), set()).add(name)
    for cand in analysis.candidates:
        param = cand.module._parameters.get(layer_spec(cand.module).weight_name) if cand.kind == Kind.LAYER \
            else cand.module.get_parameter(cand.param)  # type: ignore[union-attr, arg-type]
        if param is not None:  # other modules holding the same tensor (not this module under another name)
            same = module_names.get(id(cand.module), set())
            cand.tied = [n for n in names.get(id(param), []) if n != cand.key and n.rpartition(".")[0] not in same]
    analysis._by_name = {c.name: c for c in analysis.candidates}
    return analysis


#: norm layers whose output is normalized over the last dims, as their own forward computes it (a subclass with
#: another forward, e.g. a LayerNorm over the channels of (B, C, T), is no such norm)
_LAST_DIM_NORMS = (nn.LayerNorm.forward, nn.RMSNorm.forward)


def _normed_inputs(analysis: Analysis, layers: dict[str, Candidate]) -> dict[str, str]:
    """Layers over the last dim (Linear-like) whose every call in the traced graphs takes the output of a
    LayerNorm / RMSNorm over exactly their input features, and which no untraced forward calls: name -> the
    (first) norm's name.

    A pre-norm transformer's ``self.qkv(self.ln1(x))``: the input is normalized already, so a quantizer's own
    input norm would only normalize it again (issue 19 measured it costing loss). Anything the graphs cannot
    show (a call from an untraced forward, a norm over other dims, a norm computed inline) keeps the norm.
    """
    feeds: dict[int, list[tuple[str, tuple[int, ...]] | None]] = {}  # id(layer) -> per call: (norm, its shape)
    for scope, graph in analysis.graphs.items():
        owner = analysis.modules[scope]
        for node in graph.nodes:
            if node.op != "call_module" or not node.args:
                continue
            layer, producer = owner.get_submodule(str(node.target)), node.args[0]
            norm = None
            if isinstance(producer, fx.Node) and producer.op == "call_module":
                module = owner.get_submodule(str(producer.target))
                if type(module).forward in _LAST_DIM_NORMS:
                    norm = (analysis.names.get(id(module), str(producer.target)), tuple(module.normalized_shape))
            feeds.setdefault(id(layer), []).append(norm)
    found = {}
    for name, cand in layers.items():
        spec, module = layer_spec(cand.module), cand.module
        calls = feeds.get(id(module), [])
        weight = getattr(module, spec.weight_name, None) if spec is not None else None
        if spec is None or spec.feature_dim != -1 or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        features = (weight.shape[1 - spec.weight_out_dim],)
        parents = [analysis.names.get(id(p)) for p, _ in analysis.references.get(id(module), [])]
        if calls and all(c is not None and c[1] == features for c in calls) \
                and all(p in analysis.graphs for p in parents):  # an untraced parent may call it on anything
            found[name] = calls[0][0]  # type: ignore[index]
    return found


#: table lookups: opt-in like nn.Embedding (a lookup is no matmul with an activation)
_LOOKUPS = ("embedding", "embedding_bag")

_FUNCTIONAL_KINDS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "addmm": nn.Linear,
                     "matmul": nn.Linear}


def _sites_from_uses(analysis: Analysis, uses: list[Use], layers: dict[str, Candidate]) -> dict[str, list[Candidate]]:
    """Functional and weight-only candidates, grouped by the module they follow in the candidate list; reads of
    a layer's weight by another module are added to the layer's candidate."""
    keys = {id(p): k for k, p in analysis.root.named_parameters()}
    by_key: dict[str, Candidate] = {}
    out: dict[str, list[Candidate]] = {}
    for use in uses:
        reader = analysis.modules.get(use.reader)
        if reader is None:
            continue
        weight = reader.get_parameter(use.param)
        key = keys.get(id(weight))
        if key is None:
            continue
        holder_path, _, attr = use.param.rpartition(".")
        holder = reader.get_submodule(holder_path)
        holder_name = analysis.names.get(id(holder))
        spec = layer_spec(holder)
        if spec is not None and holder_name in layers and _is_layer_weight(spec, attr):
            if holder is not reader:  # another module reads the layer's weight itself
                layers[holder_name].readers.setdefault(use.reader, use.op)
            continue
        if holder_name is None or _inside_layer(holder_name, layers):
            continue  # a layer's own internals (weight_norm's g / v): the layer is the candidate
        if use.direct and use.op in _FUNCTIONAL_KINDS and holder is reader and key not in by_key \
                and weight.dim() == (2 if use.op in ("linear", "addmm", "matmul") else weight.dim()):
            prefix = "F." if use.op in ("linear", "conv1d", "conv2d") else "torch."
            cand = Candidate(name=_join(use.reader, attr), module=reader, layer_type=_FUNCTIONAL_KINDS[use.op],
                             type_name=f"{prefix}{use.op}", path=use.source, kind=Kind.FUNCTIONAL, key=key, op=use.op,
                             param=attr, owner_name=use.reader, out_dim=use.out_dim)
            by_key[key] = cand
            out.setdefault(use.reader, []).append(cand)
            continue
        cand = by_key.get(key)
        if cand is not None and cand.kind == Kind.FUNCTIONAL and use.direct and use.op == cand.op \
                and use.reader == cand.owner_name:
            continue  # the same call, seen by another source
        if cand is None or cand.kind == Kind.FUNCTIONAL:
            if cand is not None:  # used as F.linear's weight *and* otherwise: quantized wherever read instead
                out[cand.owner_name].remove(cand)  # type: ignore[index]
            cand = Candidate(name=key, module=holder, layer_type=type(holder), type_name=type(holder).__name__,
                             path=use.source, kind=Kind.WEIGHT, key=key, op=use.op, param=attr,
                             owner_name=holder_name, out_dim=use.out_dim, optional=use.op in _LOOKUPS)
            by_key[key] = cand
            out.setdefault(holder_name, []).append(cand)
        cand.readers.setdefault(use.reader, use.op)
        cand.experts = cand.experts or ((use.indexed or use.op in GROUPED_OPS) and weight.dim() >= 3)
        cand.optional = cand.optional and use.op in _LOOKUPS
    for cand in by_key.values():
        if cand.kind == Kind.WEIGHT:
            ops = sorted(set(cand.readers.values()))
            cand.type_name = f"{type(cand.module).__name__}[{', '.join(ops)}{', experts' if cand.experts else ''}]"
    return out


def _is_layer_weight(spec: Any, attr: str) -> bool:
    """Whether attribute `attr` of a layer holds its weight (plain, weight_norm's g / v, a parametrization)."""
    return attr == spec.weight_name or attr.startswith(spec.weight_name + "_") or attr.startswith("parametrizations.")


def _inside_layer(name: str, layers: dict[str, Candidate]) -> bool:
    return any(name.startswith(n + ".") for n in layers if n)


def _unknown_weights(analysis: Analysis) -> list[Candidate]:
    """Parameters of 2+ dims no graph reads and no other source saw used (no example inputs were run): reported,
    kept float."""
    covered = {c.key for c in analysis.candidates}
    layer_names = [c.name for c in analysis.candidates if c.kind == Kind.LAYER]
    found = []
    for key, param in analysis.root.named_parameters():
        if param.dim() < 2 or key in covered or id(param) in analysis.seen:
            continue
        holder_name = key.rpartition(".")[0]
        if holder_name in layer_names or any(key.startswith(n + ".") for n in layer_names if n) or \
                (not holder_name and "" in layer_names):
            continue
        holder = analysis.root.get_submodule(holder_name)
        found.append(Candidate(name=key, module=holder, layer_type=type(holder), type_name=type(holder).__name__,
                               path="-", kind=Kind.UNKNOWN, key=key, param=key.rpartition(".")[2],
                               owner_name=holder_name))
    return found
