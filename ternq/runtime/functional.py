"""Packed forms of the quantizers that are not layers: a quantized functional call (``F.linear(x, self.w)``
in an owner's forward) and a weight-only site (a parameter read by other code). They hold int8 codes and
scales; `ternq.format.torch` installs them when it loads a file, as `ternq.qat.functional` installs their QAT
forms when `ternq.quantize` runs."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..qat.functional import FUNCTIONAL_OPS, INPUT_POSITION, WEIGHT_POSITION, FunctionalQuant, WeightQuant
from ..qat.layers import layer_spec
from ..qat.quantizers import dequantize_weight
from .layers import packed_layer, recording_a_graph
from .skeleton import skeleton as meta_skeleton

__all__ = ["PackedFunctional", "PackedWeightOnly"]


# --- functional calls ------------------------------------------------------------------------------------------


class _Codes:
    """The int8 codes and scales a packed quantizer holds (buffers, not in the state_dict) and the float dtype
    of the weight they stand for."""

    def _hold(self, codes: Tensor, scale: Tensor, weight_dtype: torch.dtype) -> None:
        self.register_buffer("codes", codes, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("scale", scale, persistent=False)  # type: ignore[attr-defined]
        self.weight_dtype = weight_dtype


class PackedFunctional(_Codes, FunctionalQuant):
    """Inference form of a quantized functional call: holds int8 codes and scales, no float weight.

    The owner's parameter becomes a zero-stride placeholder of the right shape (no memory; unless other code may
    read it too, a submodule's or a tied parameter, which the file then stores in float as well), so the owner's
    forward runs unchanged; the interception (`ternq.qat.functional`) routes the call here. ``F.linear`` calls run on
    a `ternq.runtime` packed Linear sharing the codes (its int8 kernels, chosen by `ternq.runtime.picker`, within the runtime's
    documented tolerance of the QAT model); convolutions compute the op with ``codes * scale`` on the quantized
    input, exactly as the QAT model does.
    """

    def __init__(self, op: str, param: str, config: QuantConfig, codes: Tensor, scale: Tensor,
                 weight_dtype: torch.dtype, *, storage: str | None = None, kernel: str | None = None) -> None:
        super().__init__(op, param, config)
        self._hold(codes, scale, weight_dtype)
        self.options = {"storage": storage, "kernel": kernel}  # of the packed Linear an ``F.linear`` call runs on

    def _runtime_linear(self) -> nn.Module:
        """A packed Linear on this call's codes (same storage), kept outside ``_modules`` so that packing and
        ``named_modules`` see only this call; rebuilt when the buffers move (``.to(device)``)."""
        key = (self.codes.data_ptr(), self.scale.data_ptr(), self.codes.device)
        cached = self.__dict__.get("_runtime")
        if cached is not None and cached[0] == key:
            return cached[1]
        out_features, in_features = self.codes.shape
        with meta_skeleton():
            skeleton = nn.Linear(in_features, out_features, bias=False)
        layer = packed_layer(skeleton, self.codes, self.scale, self.qconfig, layer_spec(skeleton),
                             **self.__dict__.get("options", {}))
        self.__dict__["_runtime"] = (key, layer)
        return layer

    def quantized(self, weight: Tensor) -> Tensor:
        """``codes * scale``: what reads of the owner's parameter give (its float values are gone)."""
        return dequantize_weight(self.codes, self.scale, self.qconfig, self.out_dim, self.weight_dtype)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any], weight_quantized: bool) -> Tensor:
        values = list(args)
        i, w = INPUT_POSITION[self.op], WEIGHT_POSITION[self.op]
        if self.op == "linear" and values[i].is_floating_point() and self.codes.dim() == 2 \
                and not recording_a_graph():
            bias = values[2] if len(values) > 2 else kwargs.get("bias")
            y = self._runtime_linear()(values[i])
            return y if bias is None else y + bias
        x = values[i]
        values[w] = dequantize_weight(self.codes, self.scale, self.qconfig, self.out_dim,
                                      x.dtype if x.is_floating_point() else self.weight_dtype)
        values[i] = self.quantize_input(x)
        return FUNCTIONAL_OPS[self.op](*values, **kwargs)


class PackedWeightOnly(_Codes, WeightQuant):
    """Inference form of a weight-only site: int8 codes and scales; its readers see ``codes * scale``.

    The holder's parameter becomes a zero-stride placeholder of the right shape (unless other code may read it,
    then the file stores it in float too), so that the readers' forwards run unchanged on the dequantized value.
    """

    def __init__(self, param: str, config: QuantConfig, out_dim: int, codes: Tensor, scale: Tensor,
                 weight_dtype: torch.dtype) -> None:
        super().__init__(param, config, out_dim)
        self._hold(codes, scale, weight_dtype)

    def quantized(self, weight: Tensor) -> Tensor:
        return dequantize_weight(self.codes, self.scale, self.qconfig, self.out_dim, self.weight_dtype)

    def hard_weight(self, weight: Tensor) -> Tensor:
        return self.quantized(weight)
