"""``layer.weight`` of a packed layer: a tensor that looks like the float weight and holds no float data.

Code written for the float model reads its layers' weights: ViT / CLIP / DINOv2 check
``projection.weight.dtype`` in forward, RWKV and tied-embedding heads call ``F.linear(x, head.weight)``,
utilities print ``weight.shape`` or move models by ``weight.device``. A packed layer keeps only integer codes
and scales, so `PackedWeight` is a wrapper tensor subclass (as optimum-quanto's and torchao's quantized
tensors are): its dtype, shape and device are the float weight's, and any torch op on it runs on
``codes * scale`` dequantized for that op only (``__torch_dispatch__``), so nothing float outlives the call and
the layer's resident weight memory stays that of its codes.

It is made on attribute access and refers to its layer (not the other way around), so it never keeps the layer's
codes in a second layout. Pickled (``torch.save`` of a state_dict), it becomes the plain dequantized tensor.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["PackedWeight"]

_ALIASES = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


class PackedWeight(Tensor):
    """The float weight of `layer` (a `ternq.runtime.PackedLayer`), dequantized on use."""

    layer: Any

    @staticmethod
    def __new__(cls, layer: Any) -> PackedWeight:
        shape = layer._weight_shape
        device = layer.ternq_codes.device
        out = Tensor._make_wrapper_subclass(cls, shape, dtype=layer.float_dtype, device=device,  # type: ignore[attr-defined]
                                            requires_grad=False)
        out.layer = layer
        return out

    def __init__(self, layer: Any) -> None:  # the fields are set in __new__
        pass

    def dequantize(self) -> Tensor:  # type: ignore[override]
        """``codes * scale`` as a plain tensor in the weight's dtype (a fresh tensor: nothing is cached)."""
        return self.layer.dequantized_weight(self.dtype).contiguous()  # the strides this wrapper reports

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"codes={self.layer.qconfig.name}/{self.layer.qconfig.granularity}, storage={self.layer.storage})")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self.dequantize().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _ALIASES:
            return PackedWeight(args[0].layer)  # detach() / .data: the same view, still no float data
        kwargs = kwargs or {}
        plain = tree_map(lambda a: a.dequantize() if isinstance(a, PackedWeight) else a, (args, kwargs))
        return func(*plain[0], **plain[1])

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Defined (not disabled) on purpose: torch's fused fast paths that read a child layer's weight instead
        of calling the layer (nn.TransformerEncoderLayer / nn.MultiheadAttention in eval) check
        ``has_torch_function`` and step aside, so the packed layers run their own quantized forward. The op
        itself runs through `__torch_dispatch__`, and its results are plain tensors."""
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))
