"""`quantize` and `dequantize`: turning a float model into a QAT model and back.

Conversion never rebuilds the model. Every selected layer module is replaced, in each parent that holds it, by
its QAT clone (`ternq.layers.to_quant_module`: same class family, same parameters, hooks and reparametrizations);
functional ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` calls on a parameter are intercepted (`ternq.functional`).
So the model keeps its class and methods (``model.infer(...)``, ``model.generate(...)``), its state_dict keys,
and works the same whether or not fx could trace it: fx graphs (`ternq.graph`) only *find* functional calls and
answer graph-position selectors.

Conversion is atomic: the whole plan (which layer, which config, which rule) is computed first, without
touching the model; while applying it, every change is logged, and if anything fails the log is undone, so the
model is exactly as it was (same module objects, same forwards) and a `ConversionError` says what failed.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from .config import QuantConfig, TernaryConfig
from .errors import AlreadyQuantizedError, ConversionError, UnsupportedLayerError
from .functional import FunctionalQuant, functional_quants, install, uninstall
from .graph import Analysis, analyze, walk_modules
from .layers import is_quantized, to_float_module, to_quant_module
from .selectors import Decision, decide

__all__ = ["quantize", "dequantize", "plan"]

M = TypeVar("M", bound=nn.Module)

#: plain attribute on the converted module: its kept-float candidate layers, for `ternq.report`
KEPT_FLOAT = "_ternq_kept_float"


def _check_config(config: object) -> QuantConfig:
    if config is None:
        return TernaryConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config={config!r}: expected a ternq.TernaryConfig() or ternq.KBitConfig(bits=...)")
    return config


def quantized_parts(model: nn.Module) -> list[str]:
    """Names of the ternq parts in `model`: QAT layers, functional quantizers, converted (sub)models."""
    found = []
    for name, module in model.named_modules():
        if is_quantized(module) or isinstance(module, FunctionalQuant) or KEPT_FLOAT in module.__dict__:
            found.append(name)
    return found


def plan(model: nn.Module, include: object = None, exclude: object = None,
         config: QuantConfig | None = None) -> tuple[Analysis, dict[str, Decision]]:
    """What `quantize` would do, without doing it: the model analysis and one decision per candidate layer."""
    config = _check_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() takes an nn.Module, got {type(model).__name__}")
    done = quantized_parts(model)
    if done:
        raise AlreadyQuantizedError(
            f"the model is already quantized ({done[0] or 'the model'!r} is a ternq part): quantize() converts a "
            "float model once. Start again from the float model, or call ternq.dequantize(model) first")
    analysis = analyze(model)
    return analysis, decide(analysis, include, exclude, config)


def quantize(model: M, include: Any = None, exclude: Any = None, config: QuantConfig | None = None) -> M:
    """Convert the selected layers of `model` to quantization-aware (QAT) layers, in place.

    Args:
        model: any float nn.Module; it keeps its class, methods and state_dict keys.
        include: which layers to convert: None (every Linear, Conv1d, Conv2d, ConvTranspose1d and other
            registered non-optional type, plus functional ``F.linear/conv1d/conv2d`` calls on parameters), or a
            list of selectors and `ternq.Rule` objects. The first matching rule decides a layer's config; plain
            selectors use `config`. See `ternq.selectors` for the selector kinds.
        exclude: selectors of layers to keep in float; exclude always wins over include.
        config: the default quantization config (`ternq.TernaryConfig()` when None).

    Returns:
        `model` itself, converted (a new object only when `model` is itself a single layer, e.g. ``nn.Linear``).

    Raises:
        SelectorError: a malformed selector, or an include / exclude entry that matches no candidate layer
            (the message names it and the closest layer names).
        UnsupportedLayerError: an include entry selects only layers of a type ternq does not know, or (with
            the default include) the model has no layer of a known type at all.
        AlreadyQuantizedError: `model` already holds ternq layers; quantize a float model once (use
            `ternq.dequantize` to get plain float layers back).
        ConversionError: applying the plan failed; the model is left exactly as it was.

    Example:
        ```python
        model = ternq.quantize(
            model,
            include=[ternq.Rule("vocoder.*", ternq.KBitConfig(bits=4)), "*"],
            exclude=[ternq.output_layers(of="vocoder")],
        )
        print(ternq.report(model))
        ```
    """
    analysis, decisions = plan(model, include, exclude, config)
    if include is None and not any(not c.optional for c in analysis.candidates):
        raise _nothing_to_quantize(analysis)
    return _apply(model, analysis, decisions)


def _nothing_to_quantize(analysis: Analysis) -> Exception:
    """quantize(model) on a model without a single supported layer: name the types it has instead."""
    counts: dict[str, int] = {}
    for module in analysis.modules.values():
        if module._parameters and not is_quantized(module):
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return ConversionError("quantize(): the model holds no parameters, so there is nothing to quantize")
    found = ", ".join(f"{n} ({k})" for n, k in sorted(counts.items(), key=lambda kv: -kv[1]))
    first = max(counts, key=lambda n: counts[n])
    return UnsupportedLayerError(
        f"quantize(): no layer of this model is of a type ternq knows; its modules with parameters are: {found}. "
        f"Teach ternq a layer type with ternq.register_layer({first}, forward=...), or opt embeddings in with "
        "include=[nn.Embedding]")


def _apply(model: M, analysis: Analysis, decisions: dict[str, Decision]) -> M:
    undo: list[Callable[[], None]] = []
    root: nn.Module = model
    current = ""
    try:
        functional: dict[str, list[FunctionalQuant]] = {}
        kept: dict[str, dict[str, Any]] = {}
        for cand in analysis.candidates:
            current = cand.name
            decision = decisions[cand.name]
            if decision.config is None:
                kept[cand.name] = {"type": cand.type_name, "params": cand.n_params, "rule": decision.rule,
                                   "path": cand.path, "anchor": cand.owner_name if cand.functional else cand.name}
            elif cand.functional:
                fq = FunctionalQuant(cand.op, cand.param, decision.config)  # type: ignore[arg-type]
                fq.ternq_rule, fq.ternq_path = decision.rule, cand.path
                functional.setdefault(cand.owner_name, []).append(fq)  # type: ignore[arg-type]
            else:
                qmodule = to_quant_module(cand.module, decision.config)
                qmodule.ternq_rule, qmodule.ternq_path = decision.rule, cand.path
                if cand.name == "":
                    root = qmodule
                for parent, attr in analysis.references.get(id(cand.module), []):
                    undo.append(_restorer(parent, attr, parent._modules[attr]))
                    parent._modules[attr] = qmodule
        for owner_name, fqs in functional.items():
            current = owner_name
            owner = analysis.modules[owner_name]
            modules_before, forward_before = dict(owner._modules), owner.__dict__.get("forward", _MISSING)
            undo.append(lambda o=owner, m=modules_before, f=forward_before: _restore_owner(o, m, f))
            install(owner, fqs)
        current = ""
        previous = root.__dict__.get(KEPT_FLOAT, _MISSING)
        undo.append(lambda r=root, p=previous: _restore_attr(r, KEPT_FLOAT, p))
        root.__dict__[KEPT_FLOAT] = kept
    except Exception as e:
        for step in reversed(undo):
            step()
        where = f" while converting {current!r}" if current else ""
        raise ConversionError(f"quantize() failed{where}: {type(e).__name__}: {e}. The model was left unchanged") \
            from e
    return root  # type: ignore[return-value]


_MISSING = object()


def _restorer(parent: nn.Module, attr: str, module: nn.Module) -> Callable[[], None]:
    def restore() -> None:
        parent._modules[attr] = module
    return restore


def _restore_owner(owner: nn.Module, modules: dict[str, nn.Module], forward: object) -> None:
    owner._modules.clear()
    owner._modules.update(modules)
    _restore_attr(owner, "forward", forward)


def _restore_attr(module: nn.Module, name: str, value: object) -> None:
    if value is _MISSING:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = value


def dequantize(model: M) -> M:
    """Replace every ternq QAT layer of `model` by a plain float layer holding the hard-quantized weight, in place.

    The result runs without ternq: ``nn.Linear`` / ``nn.Conv1d`` ... whose weights are ``codes * scale``
    (weight reparametrizations such as weight_norm are folded into a plain ``weight``), and functional calls
    read parameters overwritten with their ``codes * scale``. Activation quantization and input normalization
    are QAT-time operations and are *not* kept: the dequantized model is the weight-quantized float model, for
    export and interop (ONNX, other runtimes). A float model passes through unchanged.

    Returns:
        `model` itself (a new object only when `model` is itself a single QAT layer).

    Raises:
        ConversionError: `model` holds packed inference layers (from `ternq.load_packed`), which have no float
            weight; use ``load_packed(..., dequantize=True)`` instead.
    """
    from .fileformat import _PackedFunctional  # (fileformat imports this module)
    from .runtime import is_packed

    modules, _, refs = walk_modules(model)
    for name, module in modules.items():
        if is_packed(module) or isinstance(module, _PackedFunctional):
            raise ConversionError(
                f"dequantize(): {name or 'the model'!r} is a packed inference layer (from load_packed), which holds "
                "codes, not a float weight. Load the file with ternq.load_packed(path, float_skeleton, "
                "dequantize=True) for plain float layers")
    # compute everything first, then mutate: a failure leaves the model as it was
    floats: dict[int, tuple[nn.Module, nn.Module]] = {}
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    owners: list[nn.Module] = []
    tied: dict[int, nn.Parameter] = {}  # id(shared float weight) -> the first layer's new hard weight
    for module in modules.values():
        if is_quantized(module) and id(module) not in floats:
            fmodule = to_float_module(module)
            for attr in ("ternq_rule", "ternq_path"):
                fmodule.__dict__.pop(attr, None)
            floats[id(module)] = (module, fmodule)
            name = module._ternq_spec.weight_name
            weight, hard = module._parameters.get(name), fmodule._parameters[name]
            if weight is not None:  # a plain weight Parameter, possibly tied to other layers: keep the tie
                first = tied.setdefault(id(weight), hard)
                if first is not hard and torch.equal(first, hard):
                    fmodule._parameters[name] = first
        fqs = functional_quants(module)
        if fqs:
            owners.append(module)
            for fq in fqs:
                param = module.get_parameter(fq.param)
                with torch.no_grad():
                    writes.append((param, fq.hard_weight(param.detach())))
    root: nn.Module = model
    for mid, (module, fmodule) in floats.items():
        if module is model:
            root = fmodule
        for parent, attr in refs.get(mid, []):
            parent._modules[attr] = fmodule
    with torch.no_grad():
        for param, value in writes:
            param.copy_(value)
    for owner in owners:
        uninstall(owner)
    for module in [model, *modules.values()]:
        module.__dict__.pop(KEPT_FLOAT, None)
    return root  # type: ignore[return-value]
