"""`quantize` and `dequantize`: turning a float model into a QAT model and back.

Conversion never rebuilds the model. Every selected layer module is replaced, in each parent that holds it, by
its QAT clone (`ternq.qat.layers.to_quant_module`: same class family, same parameters, hooks and reparametrizations);
functional ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` calls on a parameter are intercepted (`ternq.qat.functional`).
So the model keeps its class and methods (``model.infer(...)``, ``model.generate(...)``), its state_dict keys,
and works the same whether or not fx could trace it: fx graphs (`ternq.find.graph`) only *find* functional calls and
answer graph-position selectors.

Conversion is atomic: the whole plan (which layer, which config, which rule) is computed first, without
touching the model; while applying it, every change is logged, and if anything fails the log is undone, so the
model is exactly as it was (same module objects, same forwards) and a `ConversionError` says what failed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .config import QuantConfig, TernaryConfig
from .errors import AlreadyQuantizedError, ConversionError, UnsupportedLayerError
from .find.graph import Analysis, Candidate, analyze, walk_modules
from .find.selectors import Decision, decide
from .find.sites import SITES, Kind, Site, join, relative
from .find.uses import FAST_PATHS
from .qat.functional import (
    READS,
    FunctionalQuant,
    WeightQuant,
    functional_quants,
    install,
    install_reads,
    install_weights,
    quantize_reads,
    uninstall,
    weight_quants,
)
from .qat.layers import is_quantized, layer_spec, to_float_module, to_quant_module
from .qat.weight_attr import QUANTIZERS, is_quantized_attr, latent_parameter
from .runtime import PackedFunctional, PackedWeightOnly, is_packed

__all__ = ["quantize", "dequantize", "plan"]

M = TypeVar("M", bound=nn.Module)

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
        if is_quantized(module) or isinstance(module, (FunctionalQuant, WeightQuant)) or SITES in module.__dict__:
            found.append(name)
    return found


def plan(model: nn.Module, include: object = None, exclude: object = None,
         config: QuantConfig | None = None, example_inputs: Any = None) -> tuple[Analysis, dict[str, Decision]]:
    """What `quantize` would do, without doing it: the model analysis and one decision per candidate weight."""
    config = _check_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() takes an nn.Module, got {type(model).__name__}")
    done = quantized_parts(model)
    if done:
        packed = any(is_packed(m) for m in model.modules())
        raise AlreadyQuantizedError(
            f"the model is already quantized ({done[0] or 'the model'!r} is a ternq part): quantize() converts a "
            "float model once. Start again from the float model, or "
            + ("load the packed file with ternq.load_packed(path, skeleton, dequantize=True) for float layers"
               if packed else "call ternq.dequantize(model) first"))
    lazy = next((n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)), None)
    if lazy is not None:
        raise ConversionError(f"quantize(): parameter {lazy!r} is not initialized yet (a lazy module, e.g. "
                              "nn.LazyLinear): run the model once on an input so that it gets its shape, then quantize")
    analysis = analyze(model, example_inputs)
    decisions = decide(analysis, include, exclude, config)
    return analysis, {name: _adapt(analysis.candidate(name), d) for name, d in decisions.items()}  # type: ignore[arg-type]


def _input_features(cand: Candidate) -> int | None:
    """How many values the input norm of a quantized layer / call would normalize over, where known."""
    if cand.kind == Kind.FUNCTIONAL:
        return {"linear": cand.weight.shape[1], "addmm": cand.weight.shape[0], "matmul": cand.weight.shape[0]}.get(
            cand.op)  # type: ignore[arg-type]
    if cand.kind == Kind.LAYER:
        for attr in ("in_features", "in_channels"):
            n = getattr(cand.module, attr, None)
            if isinstance(n, int):
                return n
    return None


def _adapt(cand: Candidate, decision: Decision) -> Decision:
    """The decision as applied to this weight: kind-specific settings and the reason a user should know."""
    config = decision.config
    if cand.kind == Kind.UNKNOWN:
        return Decision(None, decision.rule, "use not found: no traced op reads it; pass example_inputs= to "
                                             "quantize() / report() to record what the model computes with it")
    tied = f"tied to {', '.join(cand.tied)}: the same tensor, decided there for its own uses" if cand.tied else ""
    if config is None:
        also = "; ".join(filter(None, [tied, f"read by {_readers(cand)} too, float there as well"
                                       if cand.readers and cand.kind == Kind.LAYER else ""]))
        return Decision(None, decision.rule, also) if also else decision
    notes = [tied] if tied else []
    if cand.idle:
        notes.append("not called in the example run (converted by its type)")
    if cand.kind == Kind.WEIGHT:
        notes.append(f"weights only: {', '.join(sorted(set(cand.readers.values())))} takes no quantized input")
        if cand.experts:
            config = dataclasses.replace(config, granularity="channel")
            notes.append(f"{cand.weight.shape[0]} experts, a scale each")
    elif config.input_norm is not None and _input_features(cand) == 1:
        config = dataclasses.replace(config, input_norm=None)
        notes.append("no input norm: 1 input feature (normalizing it would erase the input)")
    elif config.input_norm is not None and cand.normed_by:
        config = dataclasses.replace(config, input_norm=None)
        notes.append(f"no input norm: its input is {cand.normed_by}'s output, normalized already")
    if cand.kind == Kind.LAYER and cand.readers:
        fast = [r for r, op in cand.readers.items() if op in FAST_PATHS]
        reads = {r: op for r, op in cand.readers.items() if r not in fast}
        if fast:
            notes.append(f"fast path of {', '.join(r or 'the model' for r in fast)} off (it would read the "
                         "float weight)")
        if reads:
            notes.append(f"weights only where {_readers(cand, reads)} reads it")
    return Decision(config, decision.rule, "; ".join(notes))


def _readers(cand: Candidate, readers: dict[str, str] | None = None) -> str:
    return ", ".join(f"{r or 'the model'} ({op})" for r, op in (cand.readers if readers is None else readers).items())


def quantize(model: M, include: Any = None, exclude: Any = None, config: QuantConfig | None = None, *,
             example_inputs: Any = None, strict: bool = False) -> M:
    """Convert the selected weights of `model` to quantization-aware (QAT) weights, in place.

    Args:
        model: any float nn.Module; it keeps its class, methods and state_dict keys.
        include: which weights to convert: None (every candidate: weights that reach a matmul / conv-like op,
            as layers of registered types, functional calls or weight-only sites; embeddings are opt-in), or a
            list of selectors and `ternq.Rule` objects. The first matching rule decides a layer's config; plain
            selectors use `config`. See `ternq.find.selectors` for the selector kinds.
        exclude: selectors of layers to keep in float; exclude always wins over include.
        config: the default quantization config (`ternq.TernaryConfig()` when None).
        example_inputs: inputs to run the float model on once (a tensor, a tuple of positional arguments or a
            dict of keyword arguments), recording which parameters reach a matmul / conv-like op and in which
            module's forward: finds weights fx cannot see (untraceable forwards, helper functions). Without them,
            weights found by no source are reported as "float: use not found".
        strict: raise instead of keeping a weight float that no rule chose to keep float (a weight whose use
            was not found).

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
    analysis, decisions = plan(model, include, exclude, config, example_inputs)
    if include is None and not any(not c.optional and c.kind != Kind.UNKNOWN for c in analysis.candidates):
        raise _nothing_to_quantize(analysis)
    if strict:
        unsure = [c.key for c in analysis.candidates if c.kind == Kind.UNKNOWN]
        if unsure:
            raise ConversionError(
                f"quantize(strict=True): {len(unsure)} weight(s) would stay float without a rule saying so, because "
                f"no traced op was seen using them: {', '.join(unsure[:5])}{' ...' if len(unsure) > 5 else ''}. "
                "Pass example_inputs=... so that ternq records what the model computes with them, or exclude them")
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
        weights: dict[str, list[WeightQuant]] = {}
        reads: dict[str, list[str]] = {}
        sites: list[Site] = []
        quantized: list[tuple[Tensor | None, Callable[[Tensor], Tensor]]] = []  # (latent, what reads give)
        for cand in analysis.candidates:
            current = cand.name
            decision = decisions[cand.name]
            sites.append(site_record(cand, decision))
            if decision.config is None:
                continue
            if cand.kind == Kind.FUNCTIONAL:
                fq = FunctionalQuant(cand.op, cand.param, decision.config)  # type: ignore[arg-type]
                functional.setdefault(cand.owner_name, []).append(fq)  # type: ignore[arg-type]
                if "." not in cand.param:  # type: ignore[operator]
                    quantized.append((cand.module._parameters.get(cand.param), fq.read_value))  # type: ignore[arg-type]
            elif cand.kind == Kind.WEIGHT:
                wq = WeightQuant(cand.param, decision.config, cand.out_dim)  # type: ignore[arg-type]
                weights.setdefault(cand.owner_name, []).append(wq)  # type: ignore[arg-type]
                quantized.append((cand.module._parameters.get(cand.param), wq.quantized))  # type: ignore[arg-type]
            else:
                qmodule = to_quant_module(cand.module, decision.config)
                quantized.append((qmodule._parameters.get(qmodule._ternq_spec.weight_name),  # type: ignore[union-attr]
                                  qmodule._quantize_latent))  # type: ignore[union-attr]
                if cand.name == "":
                    root = qmodule
                for parent, attr in analysis.references.get(id(cand.module), []):
                    undo.append(_restorer(parent, attr, parent._modules[attr]))
                    parent._modules[attr] = qmodule
            for reader, op in cand.readers.items():  # every other reader reads the quantized attribute
                if op in FAST_PATHS:
                    reads.setdefault(reader, []).append(relative(cand.key, reader))
        for owner_name in {*functional, *weights, *reads}:
            current = owner_name
            owner = analysis.modules[owner_name]
            modules_before, forward_before = dict(owner._modules), owner.__dict__.get("forward", _MISSING)
            reads_before = owner.__dict__.get(READS, _MISSING)
            before = (type(owner), owner.__dict__.get(QUANTIZERS, _MISSING))
            undo.append(lambda o=owner, m=modules_before, f=forward_before, r=reads_before, b=before:
                        _restore_owner(o, m, f, r, b))
            install(owner, functional.get(owner_name, []))
            for fq in functional.get(owner_name, []):
                if "." not in fq.param:  # the owner's own parameter: quantized wherever it is read
                    quantize_reads(owner, fq.param, fq.read_value)
            install_weights(owner, weights.get(owner_name, []))
            if owner_name in reads:
                install_reads(owner, reads[owner_name])
        current = ""
        _quantize_ties(root, {c.key for c in analysis.candidates if decisions[c.name].config is None}, quantized, undo)
        previous = root.__dict__.get(SITES, _MISSING)
        undo.append(lambda r=root, p=previous: _restore_attr(r, SITES, p))
        root.__dict__[SITES] = sites
    except BaseException as e:  # KeyboardInterrupt too: never leave a half-converted model
        for step in reversed(undo):
            step()
        if not isinstance(e, Exception):
            raise
        where = f" while converting {current!r}" if current else ""
        raise ConversionError(f"quantize() failed{where}: {type(e).__name__}: {e}. The model was left unchanged") \
            from e
    return root  # type: ignore[return-value]


def _quantize_ties(root: nn.Module, kept_float: set[str], quantized: list[tuple[Tensor | None, Callable[[Tensor],
                   Tensor]]], undo: list[Callable[[], None]]) -> None:
    """A quantized Parameter that other modules hold too (``b.w = a.w``) reads quantized through them as well,
    unless that name is a weight of its own decided float (GPT-2's ``wte``, tied to a quantized ``lm_head``):
    one latent, one value for every read that has no row saying otherwise."""
    quantizer_of_param = {id(p): q for p, q in quantized if p is not None}
    if not quantizer_of_param:
        return
    for name, module in root.named_modules(remove_duplicate=False):
        for attr, param in list(module._parameters.items()):
            quantize = quantizer_of_param.get(id(param)) if param is not None else None
            if quantize is None or join(name, attr) in kept_float or is_quantized_attr(module, attr):
                continue
            before = (type(module), module.__dict__.get(QUANTIZERS, _MISSING))
            undo.append(lambda m=module, b=before: _restore_class(m, b))
            quantize_reads(module, attr, quantize)


def _restore_class(module: nn.Module, before: tuple[type, object]) -> None:
    module.__class__, quantizers = before
    _restore_attr(module, QUANTIZERS, quantizers)


def site_record(cand: Candidate, decision: Decision) -> Site:
    """The `Site` record of a candidate and its decision."""
    return Site(cand.name, cand.key, cand.kind, cand.type_name, cand.n_params, decision.config, decision.rule,
                cand.path, decision.reason, cand.out_dim if cand.kind != Kind.LAYER else _layer_out_dim(cand))


def _layer_out_dim(cand: Candidate) -> int:
    spec = layer_spec(cand.module)
    return spec.weight_out_dim if spec is not None else 0


_MISSING = object()


def _restorer(parent: nn.Module, attr: str, module: nn.Module) -> Callable[[], None]:
    def restore() -> None:
        parent._modules[attr] = module
    return restore


def _restore_owner(owner: nn.Module, modules: dict[str, nn.Module], forward: object, reads: object,
                   before: tuple[type, object]) -> None:
    owner._modules.clear()
    owner._modules.update(modules)
    _restore_attr(owner, "forward", forward)
    _restore_attr(owner, READS, reads)
    _restore_class(owner, before)


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
    modules, _, refs = walk_modules(model)
    for name, module in modules.items():
        if is_packed(module) or isinstance(module, (PackedFunctional, PackedWeightOnly)):
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
            floats[id(module)] = (module, fmodule)
            name = module._ternq_spec.weight_name
            weight, hard = module._parameters.get(name), fmodule._parameters[name]
            if weight is not None:  # a plain weight Parameter, possibly tied to other layers: keep the tie
                first = tied.setdefault(id(weight), hard)
                if first is not hard and torch.equal(first, hard):
                    fmodule._parameters[name] = first
        fqs: list[FunctionalQuant | WeightQuant] = [*functional_quants(module), *weight_quants(module)]
        if fqs or READS in module.__dict__ or QUANTIZERS in module.__dict__:  # the last: a tie's other holder
            owners.append(module)
            for fq in fqs:
                param = latent_parameter(module, fq.param)
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
        for attr, param in list(owner._parameters.items()):  # a tie to a layer's weight: its new hard weight
            if param is not None and id(param) in tied and is_quantized_attr(owner, attr):
                owner._parameters[attr] = tied[id(param)]
        uninstall(owner)
    for module in [model, *modules.values()]:
        module.__dict__.pop(SITES, None)
    return root  # type: ignore[return-value]
