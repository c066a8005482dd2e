"""Quantizing functional calls: ``F.linear(x, self.weight)`` / ``F.conv1d`` / ``F.conv2d`` on a parameter.

Such a layer has no module object to swap. fx finds the call (see `ternq.graph`); at run time ternq must change
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
"""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .config import QuantConfig
from .quantizers import (
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    normalize_input,
    quantize_weight,
)

__all__ = ["FunctionalQuant", "InterceptedForward", "install", "uninstall", "functional_quants"]

_OPS = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d}
_BATCHED_DIMS = {"conv1d": 3, "conv2d": 4}
_FUNC_TO_OP = {fn: op for op, fn in _OPS.items()}


class FunctionalQuant(nn.Module):
    """QAT version of one functional call ``F.<op>(x, <owner>.<param>, ...)``; holds settings, no tensors.

    Computes the op on the normalized, fake-quantized input and the fake-quantized weight, exactly as the QAT
    layers do (`ternq.layers.QuantMixin`).
    """

    def __init__(self, op: str, param: str, config: QuantConfig) -> None:
        super().__init__()
        if op not in _OPS:
            raise ValueError(f"op={op!r}: expected one of {sorted(_OPS)}")
        self.op = op
        self.param = param
        self.qconfig = config
        self.ternq_rule = ""
        self.ternq_path = "fx"

    def quantize_input(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            return x
        if self.op != "linear" and x.dim() == _BATCHED_DIMS[self.op] - 1:
            # an unbatched (C, ...) input: quantized exactly as the batch of one it stands for
            return self.quantize_input(x.unsqueeze(0)).squeeze(0)
        dim = -1 if self.op == "linear" else 1
        x = normalize_input(x, self.qconfig.input_norm, dim, self.qconfig.eps)
        if self.qconfig.act_bits is not None:
            x = fake_quantize_activation(x, self.qconfig.act_bits, dim, self.qconfig.eps,
                                         self.qconfig.act_granularity)
        return x

    def forward(self, input: Tensor, weight: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _OPS[self.op](self.quantize_input(input), fake_quantize_weight(weight, self.qconfig, 0),
                             *args, **kwargs)

    def hard_weight(self, weight: Tensor) -> Tensor:
        """``codes * scale`` of `weight`, no gradient: what `ternq.dequantize` writes back."""
        codes, scale = quantize_weight(weight, self.qconfig, 0)
        return dequantize_weight(codes, scale, self.qconfig, 0).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"F.{self.op}(weight={self.param}), qconfig={self.qconfig.name}/{self.qconfig.granularity}, " \
               f"act_bits={self.qconfig.act_bits}"


class _Intercept(TorchFunctionMode):
    """Routes ``F.<op>(x, w, ...)`` to the FunctionalQuant registered for parameter `w`."""

    def __init__(self, sites: dict[tuple[str, int], FunctionalQuant]) -> None:
        super().__init__()
        self.sites = sites

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _FUNC_TO_OP.get(func)
        if op is not None:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            fq = self.sites.get((op, id(weight)))
            if fq is not None:
                return fq(*args, **kwargs)
        return func(*args, **kwargs)


def functional_quants(owner: nn.Module) -> list[FunctionalQuant]:
    """The FunctionalQuant modules registered directly on `owner`."""
    return [m for m in owner._modules.values() if isinstance(m, FunctionalQuant)]


class InterceptedForward:
    """Instance-level ``forward`` of a module with quantized functional calls (see the module docstring).

    Holds the owner and the instance-level forward it replaced, if any, so that `uninstall` restores it.
    """

    def __init__(self, owner: nn.Module, replaced: Any = None) -> None:
        self.owner = owner
        self.replaced = replaced

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.owner
        sites = {(fq.op, id(owner.get_parameter(fq.param))): fq for fq in functional_quants(owner)}
        forward = self.replaced if self.replaced is not None else type(owner).forward.__get__(owner)
        with _Intercept(sites):
            return forward(*args, **kwargs)


def install(owner: nn.Module, fqs: list[FunctionalQuant]) -> None:
    """Register `fqs` on `owner` as ``ternq_fq_<n>`` (the first free names) and intercept its forward."""
    n = 0
    for fq in fqs:
        while f"ternq_fq_{n}" in owner._modules or hasattr(owner, f"ternq_fq_{n}"):
            n += 1
        owner._modules[f"ternq_fq_{n}"] = fq
    if not isinstance(owner.__dict__.get("forward"), InterceptedForward):
        owner.__dict__["forward"] = InterceptedForward(owner, owner.__dict__.get("forward"))


def uninstall(owner: nn.Module) -> None:
    """Remove every FunctionalQuant from `owner` and restore the forward it had before `install`."""
    for name in [k for k, m in owner._modules.items() if isinstance(m, FunctionalQuant)]:
        del owner._modules[name]
    intercepted = owner.__dict__.get("forward")
    if isinstance(intercepted, InterceptedForward):
        if intercepted.replaced is None:
            del owner.__dict__["forward"]
        else:
            owner.__dict__["forward"] = intercepted.replaced
