"""Selectors: which layers `ternq.quantize` converts, and with which config.

A selector is one of

* a shell-style glob on the qualified module name, matched against the *whole* name, case-sensitively:
  ``"decoder.*"`` (``*`` also crosses dots), ``"*.conv_post"``, ``"blocks.[0-3].proj"``;
* a regular expression, prefixed ``"re:"``, also matched against the whole name (`re.fullmatch`):
  ``r"re:encoder\\.layers\\.\\d+\\.ffn\\..*"``;
* a layer type, matching its subclasses too: ``nn.Conv1d``. Functional calls match the type they stand for
  (``F.linear`` is an ``nn.Linear``, ``F.conv1d`` an ``nn.Conv1d``);
* a callable ``(name, module) -> bool`` (for a functional call, `module` is the module whose forward makes it);
* a graph-position selector, `output_layers`, read from the fx graphs.

A `Rule` pairs a selector with its own config (e.g. 4-bit for the vocoder). Selectors only ever match
*candidates* (`ternq.find.graph.Candidate`): modules of a registered type (by module name), functional calls and
weight-only sites on a parameter (by the weight's path; a type selector by the type of the module holding it).
Opt-in types (``nn.Embedding``) become candidates only when an include rule names their type.
"""
from __future__ import annotations

import difflib
import fnmatch
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx, nn

from ..config import QuantConfig
from ..errors import SelectorError, UnsupportedLayerError
from ..qat import layers as _layers
from ..qat.layers import layer_spec
from .graph import Analysis, Candidate
from .uses import compute_op, param_of, record_output_layers

__all__ = ["Selector", "Rule", "OutputLayers", "output_layers", "Decision", "decide", "find_output_layers"]


@dataclass(frozen=True)
class OutputLayers:
    """Graph-position selector: see `output_layers`."""

    of: str = ""

    def __str__(self) -> str:
        return f"output_layers(of={self.of!r})" if self.of else "output_layers()"


def output_layers(of: str = "") -> OutputLayers:
    """Select the layers whose output reaches the output of module `of` with no other parameterized layer between.

    Parameter-free operations (activations, ``tanh``, additions, reshapes, dropout...) do not count as "in
    between"; any module holding parameters (a LayerNorm, another layer) does. A residual ``x + f(x)`` thus
    reaches back through both branches. This is how BitTTS keeps the vocoder's final convolution in float:

    ```python
    ternq.quantize(model, exclude=[ternq.output_layers(of="vocoder")])
    ```

    Args:
        of: qualified name of the module whose output counts; ``""`` (the default) is the whole model.

    The answer is read from fx graphs. Where strict fx cannot trace a forward, its submodules are traced on
    their own and the forward itself is traced leniently (one path through its data-dependent control flow,
    see `ternq.find.graph`). Where even that fails, the module is assumed to run its children in registration
    order, so its output comes from its last child holding parameters. When that cannot tell either (the module
    holds its parameters itself), a `SelectorError` asks for a deeper `of`.

    Returns:
        A selector for `include` / `exclude`.
    """
    if not isinstance(of, str):
        raise SelectorError(f"output_layers(of={of!r}): `of` must be a module name (a str), '' for the model")
    return OutputLayers(of)


Selector = str | type[nn.Module] | Callable[[str, nn.Module], bool] | OutputLayers


def _selector_kind(selector: object) -> str:
    if isinstance(selector, OutputLayers):
        return "graph"
    if isinstance(selector, str):
        return "regex" if selector.startswith("re:") else "glob"
    if isinstance(selector, type):
        if not issubclass(selector, nn.Module):
            raise SelectorError(f"selector {selector.__name__} is a type but not an nn.Module subclass: select "
                                "layers by their module type, e.g. nn.Linear")
        return "type"
    if callable(selector):
        return "callable"
    raise SelectorError(
        f"{selector!r} is not a selector: expected a glob string ('decoder.*'), a regex ('re:...'), an "
        "nn.Module type, a callable (name, module) -> bool, ternq.output_layers(...) or ternq.Rule(...)")


@dataclass(frozen=True)
class Rule:
    """A selector with the config its layers get (None: the `config` passed to `ternq.quantize`).

    Example: ternary everywhere, 4-bit for the vocoder, which include lists first because the first
    matching rule decides:

    ```python
    ternq.quantize(model, include=[ternq.Rule("vocoder.*", ternq.KBitConfig(bits=4)), "*"])
    ```
    """

    selector: Selector
    config: QuantConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.selector, Rule):
            raise SelectorError("Rule(Rule(...)): a rule's selector cannot itself be a Rule")
        _selector_kind(self.selector)
        if self.config is not None and not isinstance(self.config, QuantConfig):
            raise SelectorError(f"Rule({self.selector!r}, config={self.config!r}): config must be a "
                                "ternq.TernaryConfig / KBitConfig or None")


@dataclass(frozen=True)
class Decision:
    """What happens to one candidate weight: quantized with `config`, or kept float (config None); `rule` says
    which rule decided, `reason` anything else the report should say (weights only, no input norm, ...)."""

    config: QuantConfig | None
    rule: str
    reason: str = ""


def _type_label(t: type) -> str:
    return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__


def _label(selector: Selector) -> str:
    kind = _selector_kind(selector)
    if kind in ("glob", "regex"):
        return f'"{selector}"'
    if kind == "type":
        return _type_label(selector)  # type: ignore[arg-type]
    if kind == "callable":
        return f"callable {getattr(selector, '__qualname__', None) or type(selector).__name__}"
    return str(selector)


class _Matcher:
    """A selector compiled against one model analysis."""

    def __init__(self, rule: Rule, where: str, analysis: Analysis) -> None:
        self.rule = rule
        self.where = where
        self.kind = _selector_kind(rule.selector)
        self.label = f"{where} {_label(rule.selector)}"
        self.selector = rule.selector
        if self.kind == "regex":
            try:
                self.regex = re.compile(self.selector[3:])  # type: ignore[index]
            except re.error as e:
                raise SelectorError(f"{self.label}: invalid regular expression: {e}") from e
        self.graph_names: frozenset[str] = frozenset()
        if self.kind == "graph":
            self.graph_names = find_output_layers(analysis, self.selector.of)  # type: ignore[union-attr]

    def match_name(self, name: str) -> bool:
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.selector)  # type: ignore[arg-type]
        return self.regex.fullmatch(name) is not None

    def __call__(self, cand: Candidate) -> bool:
        if self.kind in ("glob", "regex"):
            return self.match_name(cand.name)
        if self.kind == "type":  # a weight's stand-in layer type, or the type of the module computing with it
            return issubclass(cand.layer_type, self.selector) or (  # type: ignore[arg-type]
                cand.kind != "layer" and isinstance(cand.module, self.selector))  # type: ignore[arg-type]
        if self.kind == "graph":
            return cand.name in self.graph_names
        try:
            return bool(self.selector(cand.name, cand.module))  # type: ignore[operator]
        except Exception as e:
            raise SelectorError(f"{self.label} raised {type(e).__name__}: {e} on layer {cand.name!r}") from e


def _as_rules(items: object, what: str) -> list[Rule]:
    if items is None:
        return []
    if isinstance(items, (str, type, Rule, OutputLayers)) or (callable(items) and not isinstance(items, Sequence)):
        items = [items]
    if not isinstance(items, Sequence):
        raise SelectorError(f"{what}={items!r}: expected a list of selectors / ternq.Rule, or None")
    rules = []
    for i, item in enumerate(items):
        try:
            rules.append(item if isinstance(item, Rule) else Rule(item))
        except SelectorError as e:  # say which entry is wrong
            raise SelectorError(f"{what}[{i}]: {e}") from None
    if what == "exclude":
        for i, rule in enumerate(rules):
            if rule.config is not None:
                raise SelectorError(f"exclude[{i}] {_label(rule.selector)}: exclude rules cannot carry a config")
    return rules


def _closest(text: str, names: list[str], n: int = 5) -> list[str]:
    if not names:
        return []
    close = difflib.get_close_matches(text, names, n=n, cutoff=0.5)
    if not close:
        ranked = sorted(names, key=lambda s: -difflib.SequenceMatcher(None, text, s).ratio())
        close = ranked[:n]
    return close


def _no_match(m: _Matcher, analysis: Analysis, active: list[Candidate], include: bool) -> Exception:
    """The error for a rule that matches no candidate: unsupported layer, or a typo with suggestions."""
    layer_names = [c.name for c in active]
    if m.kind == "type":
        t = m.selector
        if include and not any(issubclass(ft, t) for ft in _layers._REGISTRY):  # type: ignore[arg-type]
            return UnsupportedLayerError(
                f"{m.label}: {t.__name__} is not a layer type ternq can quantize; teach it with "  # type: ignore[union-attr]
                f"ternq.register_layer({t.__name__}, forward=...)")  # type: ignore[union-attr]
        unregistered = [n for n, mod in analysis.modules.items()
                        if isinstance(mod, t) and layer_spec(mod) is None]  # type: ignore[arg-type]
        if include and unregistered:
            cls = type(analysis.modules[unregistered[0]]).__name__
            return UnsupportedLayerError(
                f"{m.label} matches only {cls} modules ({', '.join(unregistered[:3])}), which ternq cannot "
                f"quantize: registered types match exactly; teach it with ternq.register_layer({cls}, forward=...)")
        present = sorted({_type_label(c.layer_type) for c in active})
        return SelectorError(f"{m.label} matches no layer of this model; its layer types are: "
                             f"{', '.join(present) or 'none'}")
    if m.kind in ("glob", "regex"):
        named = [n for n in analysis.modules if n and m.match_name(n)]
        unsupported = [n for n in named if layer_spec(analysis.modules[n]) is None
                       and analysis.modules[n]._parameters and not analysis.modules[n]._modules]
        if include and unsupported:
            cls = type(analysis.modules[unsupported[0]]).__name__
            return UnsupportedLayerError(
                f"{m.label} selects {unsupported[0]!r}, a {cls}, which ternq cannot quantize; teach it with "
                f"ternq.register_layer({cls}, forward=...) or select other layers")
        optional = [c.name for c in analysis.candidates if c.optional and m.match_name(c.name)]
        if optional:
            cls = _type_label(analysis.candidate(optional[0]).layer_type)  # type: ignore[union-attr]
            return SelectorError(f"{m.label} matches only {optional[0]!r}, a {cls}: that type is opt-in, "
                                 f"add {cls} (the type) to include to make it a candidate")
        containers = [n for n in named if any(c.name.startswith(n + ".") for c in active)]
        if containers:
            return SelectorError(f"{m.label} names module(s) {', '.join(containers[:3])}, not layers; select "
                                 f"the layers inside with \"{containers[0]}.*\"")
        text = m.selector[3:] if m.kind == "regex" else m.selector  # type: ignore[index]
        close = _closest(text, layer_names)  # type: ignore[arg-type]
        return SelectorError(f"{m.label} matches no quantizable layer. Closest layer names: {', '.join(close)}")
    return SelectorError(f"{m.label} matches no quantizable layer (the model's {len(layer_names)} candidate "
                         f"layers include: {', '.join(layer_names[:5])})")


def decide(analysis: Analysis, include: object, exclude: object, config: QuantConfig) -> dict[str, Decision]:
    """The decision for every candidate layer of `analysis`, in candidate order.

    Raises:
        SelectorError: a malformed selector, or one that matches no candidate layer.
        UnsupportedLayerError: an include rule that selects only layers of an unregistered type.
    """
    include_rules = _as_rules(include, "include")
    exclude_rules = _as_rules(exclude, "exclude")
    if include is not None and not include_rules:
        raise SelectorError("include=[] selects nothing: pass include=None to quantize every supported layer")
    opted_in = {r.selector for r in include_rules if isinstance(r.selector, type)}
    active = [c for c in analysis.candidates if c.kind != "unknown" and (
        not c.optional or any(issubclass(c.layer_type, t) for t in opted_in))]
    inc = [_Matcher(r, f"include[{i}]", analysis) for i, r in enumerate(include_rules)]
    exc = [_Matcher(r, f"exclude[{i}]", analysis) for i, r in enumerate(exclude_rules)]
    for m in inc:
        if not any(m(c) for c in active):
            raise _no_match(m, analysis, active, include=True)
    for m in exc:
        if not any(m(c) for c in analysis.candidates):
            raise _no_match(m, analysis, active, include=False)
    decisions: dict[str, Decision] = {}
    active_names = {c.name for c in active}
    for c in analysis.candidates:
        if c.kind == "unknown":
            decisions[c.name] = Decision(None, "-")
            continue
        if c.name not in active_names:
            decisions[c.name] = Decision(None, f"opt-in type (include {_type_label(c.layer_type)})")
            continue
        excluded = next((m for m in exc if m(c)), None)
        if excluded is not None:
            decisions[c.name] = Decision(None, excluded.label)
            continue
        if not include_rules:
            decisions[c.name] = Decision(config, "default")
            continue
        chosen = next((m for m in inc if m(c)), None)
        if chosen is None:
            decisions[c.name] = Decision(None, "not included")
        else:
            decisions[c.name] = Decision(chosen.rule.config or config, chosen.label)
    return decisions


# --- graph position --------------------------------------------------------------------------------------------


def find_output_layers(analysis: Analysis, of: str = "") -> frozenset[str]:
    """Names of the candidate layers selected by ``output_layers(of)`` (see there for the semantics)."""
    if of not in analysis.modules:
        close = _closest(of, [n for n in analysis.modules if n])
        raise SelectorError(f"output_layers(of={of!r}): the model has no module {of!r}. "
                            f"Closest module names: {', '.join(close)}")
    try:
        return _OutputSearch(analysis, of).outputs(of)[0]
    except _Untraceable as e:
        if analysis.example_inputs is None:
            raise SelectorError(
                f"output_layers(of={of!r}): cannot tell which layers produce the output of {e.name or 'the model'!r} "
                f"({type(analysis.modules[e.name]).__name__}): fx cannot trace its forward ({e.reason}), so several "
                "of its children may feed its outputs. Pass example_inputs=... to quantize() / report() (ternq "
                f"then records which layers feed it), or name a deeper scope whose forward fx can trace{e.hint}") \
                from None
    layers = {id(c.module): c.name for c in analysis.candidates if c.kind == "layer"}
    sites = {id(c.weight): c.name for c in analysis.candidates if c.kind in ("functional", "weight")}
    return record_output_layers(analysis.root, analysis.example_inputs, analysis.modules[of], layers, sites)


class _Untraceable(Exception):
    """`output_layers` reached a module whose output no graph explains."""

    def __init__(self, name: str, reason: str, hint: str) -> None:
        super().__init__(name)
        self.name, self.reason, self.hint = name, reason, hint


class _OutputSearch:
    def __init__(self, analysis: Analysis, of: str) -> None:
        self.a = analysis
        self.of = of
        self.memo: dict[str, tuple[frozenset[str], bool]] = {}
        self.active: set[str] = set()

    def outputs(self, name: str) -> tuple[frozenset[str], bool]:
        """(layers reaching module `name`'s output, whether its input reaches its output unchanged by a layer)."""
        if name in self.memo:
            return self.memo[name]
        if name in self.active:  # a module calling itself through an alias: nothing more to learn
            return frozenset(), False
        self.active.add(name)
        module = self.a.modules[name]
        cand = self.a.candidate(name)
        read = self._read_by(name)
        if cand is not None and cand.kind == "layer":
            result: tuple[frozenset[str], bool] = (frozenset({name}), False)
        elif read:  # a torch.nn module computing with weights in a native kernel (LSTM, MultiheadAttention)
            result = (read, False)
        elif name in self.a.graphs or self.a.lenient_graph(name) is not None:
            result = self._from_graph(name, self.a.graphs.get(name) or self.a.lenient_graph(name))
        elif not self.a.has_params(module):
            result = (frozenset(), True)  # parameter-free (an activation): transparent
        elif not any(self.a.has_params(c) for c in module.children()) and not (
                name == self.of and name in self.a.untraced):
            result = (frozenset(), False)  # a parameterized layer ternq does not quantize (LayerNorm): a barrier
        else:
            children = [self.a.names[id(c)] for c in module.children() if self.a.has_params(c)]
            raise _Untraceable(name, self.a.untraced.get(name, "not traceable"),
                               f", e.g. of={children[0]!r}" if children else "")
        self.active.discard(name)
        self.memo[name] = result
        return result

    def _read_by(self, name: str) -> frozenset[str]:
        """Candidates module `name` computes with natively, not by calling them: its output comes from them
        (MultiheadAttention: its out_proj, the layer it reads; an LSTM: its weights)."""
        if name in self.a.graphs:
            return frozenset()
        read = [c for c in self.a.candidates if name in c.readers and c.path == "native" or
                (c.kind == "layer" and c.readers.get(name) == "multi_head_attention_forward")]
        layers = [c.name for c in read if c.kind == "layer"]
        return frozenset(layers or [c.name for c in read])

    def _from_graph(self, name: str, graph: fx.Graph) -> tuple[frozenset[str], bool]:
        found: set[str] = set()
        through = False
        prefix = f"{name}." if name else ""
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        seen: set[fx.Node] = set()
        stack = [output]
        while stack:
            node = stack.pop()
            # an in-place item write (x[i] = y, from lenient graphs) feeds y into x
            writes = [w for u in node.users if u.op == "call_function" and u.target is operator.setitem
                      for w in u.all_input_nodes if w is not node]
            for inp in [*node.all_input_nodes, *writes]:
                if inp in seen:
                    continue
                seen.add(inp)
                if inp.op == "placeholder":
                    through = True
                elif inp.op == "call_module":
                    layers, passes = self.outputs(self.a.submodule_name(name, inp.target))  # type: ignore[arg-type]
                    found |= layers
                    if passes:
                        stack.append(inp)
                elif inp.op in ("call_function", "call_method") and compute_op(inp.target) is not None:
                    params = [p for p in (param_of(a) for a in inp.all_input_nodes) if p is not None]
                    sites = [c for c in (self.a.candidate(prefix + p) for p in params)
                             if c is not None and c.kind in ("functional", "weight")]
                    found.update(c.name for c in sites)
                    if not params:  # a weight computed in the forward: not a layer, look further back
                        stack.append(inp)
                elif inp.op != "get_attr":
                    stack.append(inp)
        return frozenset(found), through
