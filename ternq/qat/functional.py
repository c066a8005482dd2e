"""Quantizing functional calls: ``F.linear(x, self.weight)`` / ``F.conv1d`` / ``F.conv2d`` on a parameter.

Such a layer has no module object to swap. fx finds the call (see `ternq.find.graph`); at run time ternq must change
what it computes while keeping the model's class, methods and state_dict. Two designs were possible:

1. rewrite the owner's forward from the fx graph (replace the call node, recompile, rebind ``forward``);
2. keep the owner's forward as written and *intercept* the call while it runs.

ternq uses 2. A forward regenerated from an fx graph is specialized to the trace: ``if self.training`` and
``if mask is not None`` are frozen to their value at conversion time and data-dependent control flow is lost, so
the converted model could silently compute something else in another mode or with other arguments. Intercepting
runs the original Python code unchanged: the owner gets an instance-level ``forward`` (`InterceptedForward`)
that calls the class's forward under a `torch.overrides.TorchFunctionMode`; the mode replaces exactly the calls
of ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` whose weight *is* (by identity) one of the selected parameters,
and passes every other call through. The quantization settings live in `FunctionalQuant` submodules registered
on the owner as ``ternq_fq_<n>``: they hold no parameters or buffers, so state_dict keys do not change, and they
show in ``print(model)``. Cost: every torch call made while the owner's forward runs goes through one Python
check, microseconds each.

The *weight* is not the interception's business: a parameter of the owner reads as its quantized value
everywhere (`quantize_reads`, `ternq.weight_attr`), so the interception only adds the input quantization a
layer would have. Weight-only parameters (`WeightQuant`) need no interception at all.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..config import QuantConfig
from ..errors import ConversionError
from .quantizers import (
    dequantize_weight,
    fake_quantize_weight,
    quantize_input,
    quantize_weight,
)
from .weight_attr import QUANTIZERS, float_class, holder_class, is_quantized_attr, set_quantizer

__all__ = ["FUNCTIONAL_OPS", "FunctionalQuant", "WeightQuant", "InterceptedForward", "install", "install_weights",
           "install_reads", "quantize_reads", "uninstall", "functional_quants", "weight_quants"]

#: the functional calls ternq intercepts with quantized inputs, by op name
FUNCTIONAL_OPS = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "addmm": torch.addmm,
                  "matmul": torch.matmul}
_BATCHED_DIMS = {"conv1d": 3, "conv2d": 4}
_FUNC_TO_OP = {fn: op for op, fn in FUNCTIONAL_OPS.items()} | {torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul"}
#: where each op takes its input and its weight: ``addmm(bias, x, W)``, ``matmul(x, W)``, ``linear(x, W)``...
INPUT_POSITION = {"linear": 0, "conv1d": 0, "conv2d": 0, "addmm": 1, "matmul": 0}
WEIGHT_POSITION = {"linear": 1, "conv1d": 1, "conv2d": 1, "addmm": 2, "matmul": 1}
#: the keyword of each op's weight argument
_WEIGHT_KWARG = {"linear": "weight", "conv1d": "weight", "conv2d": "weight", "addmm": "mat2", "matmul": "other"}
#: the weight dim of output channels: ``x @ W`` keeps W as (in, out)
WEIGHT_OUT_DIM = {"linear": 0, "conv1d": 0, "conv2d": 0, "addmm": 1, "matmul": 1}


class FunctionalQuant(nn.Module):
    """QAT version of one functional call ``F.<op>(x, <owner>.<param>, ...)`` (also ``torch.addmm(b, x, W)`` and
    ``torch.matmul(x, W)``, as transformers' GPT-2 ``Conv1D`` computes); holds settings, no tensors.

    Computes the op on the normalized, fake-quantized input and the fake-quantized weight, exactly as the QAT
    layers do (`ternq.qat.layers.QuantMixin`). A parameter of the owner itself reads as its quantized value
    everywhere (`quantized`, installed by `quantize_reads`): the call then only quantizes its input.
    """

    def __init__(self, op: str, param: str, config: QuantConfig) -> None:
        super().__init__()
        if op not in FUNCTIONAL_OPS:
            raise ValueError(f"op={op!r}: expected one of {sorted(FUNCTIONAL_OPS)}")
        self.op = op
        self.param = param
        self.qconfig = config
        _ = self.operand_type  # made now: a compiled forward then only reads it

    def quantize_input(self, x: Tensor) -> Tensor:
        conv = self.op in _BATCHED_DIMS
        return quantize_input(x, self.qconfig, 1 if conv else -1, _BATCHED_DIMS.get(self.op))

    @property
    def out_dim(self) -> int:
        return WEIGHT_OUT_DIM[self.op]

    def quantized(self, weight: Tensor) -> Tensor:
        """``codes * scale`` of the latent `weight`, straight-through."""
        return fake_quantize_weight(weight, self.qconfig, self.out_dim)

    def read_value(self, weight: Tensor) -> Tensor:
        """What reads of the owner's parameter give: its quantized value as a `QuantizedOperand` of this call, so
        that wherever it is the weight of this op, the op quantizes its input too."""
        if torch.compiler.is_exporting():
            # torch.export traces with fake tensors, which cannot become a subclass: refuse rather than export a
            # graph whose call would compute on an unquantized input
            raise ConversionError(
                f"torch.export cannot trace the quantized functional call F.{self.op}(x, {self.param}) of this "
                "model: its input quantization rides on the weight's tensor subclass, which export's fake tensors "
                "cannot become. Quantize the float model again with that module's type registered "
                "(ternq.register_layer, so that it becomes a QAT layer) or with that weight weights-only (a config "
                "with act_bits=None, input_norm=None), then export it or its packed file; torch.jit.trace and "
                "torch.compile take the model as it is")
        return self.quantized(weight).as_subclass(self.operand_type)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_operand_type", None)  # a generated class: made again on use (`operand_type`)
        return state

    @property
    def operand_type(self) -> type[QuantizedOperand]:
        """The `QuantizedOperand` subclass that names this call (made once per call object, copies included)."""
        cls = self.__dict__.get("_operand_type")
        if cls is None or cls.site is not self:
            cls = type("QuantizedOperand", (QuantizedOperand,), {"site": self, "__module__": __name__})
            self.__dict__["_operand_type"] = cls
        return cls

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.run(args, kwargs, weight_quantized=False)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], weight_quantized: bool) -> Tensor:
        """The op on the quantized input; the weight is quantized here unless it already is."""
        values = list(args)
        i, w = INPUT_POSITION[self.op], WEIGHT_POSITION[self.op]
        values[i] = self.quantize_input(values[i])
        if not weight_quantized:
            values[w] = self.quantized(values[w])
        return FUNCTIONAL_OPS[self.op](*values, **kwargs)

    def hard_weight(self, weight: Tensor) -> Tensor:
        """``codes * scale`` of `weight`, no gradient: what `ternq.dequantize` writes back."""
        codes, scale = quantize_weight(weight, self.qconfig, self.out_dim)
        return dequantize_weight(codes, scale, self.qconfig, self.out_dim).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"F.{self.op}(weight={self.param}), qconfig={self.qconfig.name}/{self.qconfig.granularity}, " \
               f"act_bits={self.qconfig.act_bits}"


def _weight_argument(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...],
                                                                                   dict[str, Any], Any]:
    """(args, kwargs, the weight) of a call of `op`, the weight made positional where it came by keyword (the
    quantizers take it by position)."""
    pos, name = WEIGHT_POSITION[op], _WEIGHT_KWARG[op]
    if len(args) == pos and name in kwargs:
        kwargs = dict(kwargs)
        args = (*args, kwargs.pop(name))
    return args, kwargs, args[pos] if len(args) > pos else None


def _plain(value: Any) -> Any:
    return value.as_subclass(Tensor) if isinstance(value, QuantizedOperand) else value


class QuantizedOperand(Tensor):
    """The quantized weight of a functional call as its owner's attribute reads it (``self.w`` in
    ``F.linear(x, self.w)``): wherever it is the weight of that op, in any forward, decode step or checkpoint
    recomputation, the op quantizes its input too (`FunctionalQuant.run`); every other op sees a plain tensor.
    Made with ``as_subclass``, so it stays on the autograd graph of the latent weight. Each call's subclass
    names the call (`site`)."""

    site: FunctionalQuant

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.as_subclass(Tensor).__reduce_ex__(protocol)  # saved, it is the plain quantized tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _FUNC_TO_OP.get(func)
        if op is not None:
            args, kwargs, weight = _weight_argument(op, args, kwargs)
            if isinstance(weight, QuantizedOperand) and type(weight).site.op == op:
                with torch._C.DisableTorchFunctionSubclass():
                    return type(weight).site.run(tuple(_plain(a) for a in args),
                                                 {k: _plain(v) for k, v in kwargs.items()}, weight_quantized=True)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


class WeightQuant(nn.Module):
    """Weight-only quantization of parameter `param` of the module it is registered on (its holder).

    For weights no ternq layer computes: MultiheadAttention's ``in_proj_weight``, RNN weights, a mixture of
    experts' fused 3-D ``gate_up_proj``, a parameter used through ``torch.matmul`` / ``einsum``. Every read of the
    parameter (``holder.<param>`` in any forward or method, an RNN's ``_flat_weights``) gives ``codes * scale``
    (`quantize_reads`). The input is not quantized (those ops have no place for it): the report says "weights
    only". A stack of experts (``(n_experts, out, in)``, indexed before use) gets one scale per expert:
    ``granularity="channel"`` on dim 0.
    """

    def __init__(self, param: str, config: QuantConfig, out_dim: int = 0) -> None:
        super().__init__()
        self.param = param
        self.qconfig = config
        self.out_dim = out_dim

    def quantized(self, weight: Tensor) -> Tensor:
        """``codes * scale`` of `weight` with the straight-through gradient."""
        return fake_quantize_weight(weight, self.qconfig, self.out_dim)

    def hard_weight(self, weight: Tensor) -> Tensor:
        """``codes * scale`` without gradient: what `ternq.dequantize` writes back."""
        codes, scale = quantize_weight(weight.detach(), self.qconfig, self.out_dim)
        return dequantize_weight(codes, scale, self.qconfig, self.out_dim).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"weight={self.param}, out_dim={self.out_dim}, qconfig={self.qconfig.name}/" \
               f"{self.qconfig.granularity}, weights only"


class _Intercept(TorchFunctionMode):
    """Routes ``F.<op>(x, w, ...)`` to the FunctionalQuant registered for the latent parameter `w` of a submodule
    that reads it as float itself (by identity), and passes every other call through."""

    def __init__(self, sites: dict[tuple[str, int], FunctionalQuant]) -> None:
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _FUNC_TO_OP.get(func)
        if op is not None and self.sites:
            args, kwargs, weight = _weight_argument(op, args, kwargs)
            site = self.sites.get((op, id(weight)))
            if site is not None:
                return site.run(args, kwargs, weight_quantized=False)
        return func(*args, **kwargs)


def functional_quants(owner: nn.Module) -> list[FunctionalQuant]:
    """The FunctionalQuant modules registered directly on `owner`."""
    return [m for m in owner._modules.values() if isinstance(m, FunctionalQuant)]


def weight_quants(holder: nn.Module) -> list[WeightQuant]:
    """The WeightQuant modules registered directly on `holder`."""
    return [m for m in holder._modules.values() if isinstance(m, WeightQuant)]


class InterceptedForward:
    """Instance-level ``forward`` of a module with quantized functional calls, or whose torch fast path must stay
    off (see the module docstring).

    Holds the owner and the instance-level forward it replaced, if any, so that `uninstall` restores it.
    """

    def __init__(self, owner: nn.Module, replaced: Any = None) -> None:
        self.owner = owner
        self.replaced = replaced

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        forward = self.replaced if self.replaced is not None else type(owner).forward.__get__(owner)
        sites = {}
        for fq in functional_quants(owner):
            holder_path, _, attr = fq.param.rpartition(".")
            holder = owner.get_submodule(holder_path) if holder_path else owner
            if not is_quantized_attr(holder, attr):  # a submodule's parameter it reads as float itself
                sites[(fq.op, id(holder._parameters[attr]))] = fq
        with _Intercept(sites):
            return forward(*args, **kwargs)


#: plain attribute of a module whose torch fast path is kept off: the paths (relative to it) of the quantized
#: weights that fast path would read around their layers' forwards
READS = "_ternq_reads"


def _register(owner: nn.Module, prefix: str, modules: list[nn.Module]) -> None:
    n = 0
    for m in modules:
        while f"{prefix}{n}" in owner._modules or hasattr(owner, f"{prefix}{n}"):
            n += 1
        owner._modules[f"{prefix}{n}"] = m


def intercept(owner: nn.Module) -> None:
    """Give `owner` the intercepting instance-level forward (once)."""
    if not isinstance(owner.__dict__.get("forward"), InterceptedForward):
        owner.__dict__["forward"] = InterceptedForward(owner, owner.__dict__.get("forward"))


def install(owner: nn.Module, fqs: list[FunctionalQuant]) -> None:
    """Register `fqs` on `owner` as ``ternq_fq_<n>`` (the first free names). The owner's own parameters read as
    their calls' `QuantizedOperand` (`quantize_reads`); a submodule's parameter, which that submodule reads as
    float itself, is routed by intercepting the owner's forward."""
    if fqs:
        _register(owner, "ternq_fq_", fqs)
    if any("." in fq.param for fq in fqs):
        intercept(owner)


def install_weights(holder: nn.Module, wqs: list[WeightQuant]) -> None:
    """Register weight-only quantizers on the module holding their parameters (``ternq_wq_<n>``); every read of
    those parameters gives their quantized value from now on."""
    _register(holder, "ternq_wq_", wqs)
    for wq in wqs:
        quantize_reads(holder, wq.param, wq.quantized)


def quantize_reads(holder: nn.Module, name: str, quantize: Callable[[Tensor], Tensor]) -> None:
    """Every read of ``holder.<name>`` gives ``quantize(latent)`` (`ternq.weight_attr`): the holder's class
    becomes a same-named subclass with a quantized attribute for `name`."""
    cls = holder_class(type(holder), {name})
    if type(holder) is not cls:
        holder.__class__ = cls
    set_quantizer(holder, name, quantize)


def install_reads(reader: nn.Module, paths: list[str]) -> None:
    """Keep `reader`'s fused fast path off (it would read the weights at `paths`, relative to it, around their
    layers' forwards, skipping their input quantization): an intercepted forward makes torch see a function mode
    and take the module's Python path."""
    known = reader.__dict__.setdefault(READS, [])
    known.extend(p for p in paths if p not in known)
    intercept(reader)


def uninstall(owner: nn.Module) -> None:
    """Remove every FunctionalQuant / WeightQuant, quantized read and intercepted forward from `owner`: it is the
    module it was before."""
    for name in [k for k, m in owner._modules.items() if isinstance(m, (FunctionalQuant, WeightQuant))]:
        del owner._modules[name]
    owner.__dict__.pop(READS, None)
    owner.__dict__.pop(QUANTIZERS, None)
    if float_class(type(owner)) is not type(owner):
        owner.__class__ = float_class(type(owner))
    intercepted = owner.__dict__.get("forward")
    if isinstance(intercepted, InterceptedForward):
        if intercepted.replaced is None:
            del owner.__dict__["forward"]
        else:
            owner.__dict__["forward"] = intercepted.replaced
