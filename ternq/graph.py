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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .layers import is_quantized, layer_spec

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
    """One quantizable layer: a registered module, or a functional call on a parameter weight.

    Attributes:
        name: qualified module name; for a functional call, the owner's name + "." + the weight's attribute path.
        module: the layer itself, or for a functional call the module whose forward makes it (the owner).
        layer_type: the module type a type selector compares against (nn.Linear for ``F.linear``).
        type_name: what the report shows, e.g. "Conv1d[weight_norm]" or "F.conv1d".
        path: "fx" when fx-traced code calls it, "swap" when found only by walking the module tree, "fx-lenient"
            for a functional call found by lenient tracing of an untraceable forward.
        optional: True for opt-in types (Embedding): only candidates when a rule selects their type.
        op / param / owner_name: functional calls only: "linear" | "conv1d" | "conv2d", the weight's path inside
            the owner, the owner's qualified name.
    """

    name: str
    module: nn.Module
    layer_type: type[nn.Module]
    type_name: str
    path: str
    optional: bool = False
    op: str | None = None
    param: str | None = None
    owner_name: str | None = None

    @property
    def functional(self) -> bool:
        return self.op is not None

    @property
    def n_params(self) -> int:
        """Parameters the layer holds (weight_norm's g and v, bias included); weight only for functional calls."""
        if self.functional:
            return self.module.get_parameter(self.param).numel()
        return sum(p.numel() for p in self.module.parameters())


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


def _functional_sites(scope_name: str, scope: nn.Module, graph: fx.Graph, path: str) -> list[Candidate]:
    sites: dict[str, Candidate] = {}
    params = dict(scope.named_parameters())
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in FUNCTIONAL_OPS:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or weight.target not in params:
            continue
        if params[weight.target].dim() < 2:
            continue
        op, layer_type = FUNCTIONAL_OPS[node.target]
        name = f"{scope_name}.{weight.target}" if scope_name else weight.target
        sites.setdefault(name, Candidate(name=name, module=scope, layer_type=layer_type, type_name=f"F.{op}",
                                         path=path, op=op, param=weight.target, owner_name=scope_name))
    return list(sites.values())


def _trace_all(analysis: Analysis, called: set[int], functional: dict[str, list[Candidate]]) -> None:
    for name, module in analysis.modules.items():
        if not _traceable(module):
            continue
        try:
            graph = _trace(module)
        except Exception as e:
            analysis.untraced[name] = _reason(e)
            # functional calls are looked for on the module's own parameters (F.linear(x, self.w)): only
            # modules holding some are traced leniently now, the others on demand (output_layers)
            lenient = analysis.lenient_graph(name) if module._parameters else None
            if lenient is not None:
                functional[name] = _functional_sites(name, module, lenient, "fx-lenient")
            continue
        analysis.graphs[name] = graph
        for node in graph.nodes:
            if node.op == "call_module":
                try:
                    called.add(id(module.get_submodule(node.target)))
                except AttributeError:
                    pass
        functional[name] = _functional_sites(name, module, graph, "fx")


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


def analyze(root: nn.Module) -> Analysis:
    """Walk and shallow-trace `root`; list its candidate layers (module order, functional calls after their owner)."""
    modules, names, refs = walk_modules(root)
    analysis = Analysis(root=root, modules=modules, names=names, references=dict(refs))
    called: set[int] = set()
    functional: dict[str, list[Candidate]] = {}
    with _rng_preserved():
        _trace_all(analysis, called, functional)
    for name, module in modules.items():
        spec = layer_spec(module)
        if spec is not None:
            analysis.candidates.append(Candidate(
                name=name, module=module, layer_type=spec.float_type, type_name=describe_type(module),
                path="fx" if id(module) in called else "swap", optional=spec.optional))
        analysis.candidates.extend(functional.get(name, []))
    analysis._by_name = {c.name: c for c in analysis.candidates}
    return analysis
