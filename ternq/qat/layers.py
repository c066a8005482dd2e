"""Quantization-aware (QAT) layers and the registry that maps float layer types to them.

A QAT layer *is* its float layer: `QuantConv1d` subclasses `nn.Conv1d`, keeps the same parameters, buffers and
hooks under the same names, and only changes `forward`: the input is (optionally) normalized and fake-quantized
to 8 bits, the weight is fake-quantized to ternary / k-bit codes times a scale, and the float op runs on them.
Because the parameters are untouched, a float checkpoint loads into a quantized model, state_dicts round-trip,
optimizers keep their references, and weight reparametrizations (``parametrizations.weight_norm``, the legacy
``weight_norm`` pre-hook, ``spectral_norm``) keep working: the quantizer sees the *effective* weight.

Teach ternq a layer type with `register_layer`: a forward ``(module, x, weight, *args, **kwargs) -> y`` that
runs the layer with a given weight, and where its output channels and input features lie.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as _SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _WeightNorm

from ..config import QuantConfig
from ..errors import AlreadyQuantizedError, UnsupportedLayerError
from .quantizers import (
    dequantize_weight,
    fake_quantize_weight,
    quantize_input,
    quantize_weight,
)
from .surgery import drop_legacy_weight, legacy_weight_hook, shallow_clone
from .weight_attr import QuantizedWeight, latent

__all__ = [
    "quantize_layer_input",
    "LayerSpec",
    "QuantMixin",
    "QuantLinear",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantEmbedding",
    "register_layer",
    "layer_spec",
    "is_quantized",
    "to_quant_module",
    "to_float_module",
]

LayerForward = Callable[..., Tensor]


@dataclass(frozen=True)
class LayerSpec:
    """How ternq runs one layer type with a quantized weight.

    Attributes:
        float_type: the float layer class (exact type; subclasses must be registered on their own, since
            they may override forward).
        forward: ``forward(module, x, weight, *args, **kwargs)`` computing the layer with `weight`.
        weight_out_dim: the weight dimension that indexes output channels (0 for Linear/Conv, 1 for
            ConvTranspose and for layers that store a linear weight as (in, out)).
        feature_dim: the input dimension holding features, normalized and quantized per token;
            None for layers whose input is not a float activation (Embedding).
        weight_name: attribute holding the (effective) weight.
        optional: True for types that are only converted when a rule selects them by type (Embedding).
    """

    float_type: type[nn.Module]
    forward: LayerForward
    weight_out_dim: int = 0
    feature_dim: int | None = -1
    weight_name: str = "weight"
    optional: bool = False


def quantize_layer_input(layer: nn.Module, x: Tensor, config: QuantConfig, spec: LayerSpec) -> Tensor:
    """`layer`'s input normalization and activation fake-quantization: what a QAT layer applies and its packed
    form reproduces (one function, so the two cannot drift)."""
    if spec.feature_dim is None:
        return x
    batched = len(layer.kernel_size) + 2 if isinstance(layer, _ConvNd) else None
    return quantize_input(x, config, spec.feature_dim, batched)


class QuantMixin:
    """Forward of every QAT layer; the float class provides parameters and the rest of the behaviour."""

    _ternq_spec: LayerSpec
    qconfig: QuantConfig

    def quantize_input(self, x: Tensor) -> Tensor:
        """Input normalization and activation fake-quantization, as configured."""
        return quantize_layer_input(self, x, self.qconfig, self._ternq_spec)  # type: ignore[arg-type]

    def float_weight(self) -> Tensor:
        """The effective float weight (after weight_norm / spectral_norm, before quantization).

        The legacy ``weight_norm`` / ``spectral_norm`` hooks refresh the weight attribute only before a
        forward, so after ``load_state_dict`` or an optimizer step it is stale: recompute it from g/v (or
        weight_orig/u/v, without a power iteration) so that packing sees the current weight.
        """
        name = self._ternq_spec.weight_name
        hook = legacy_weight_hook(self, name)  # type: ignore[arg-type]
        if isinstance(hook, _WeightNorm):
            return hook.compute_weight(self)
        if isinstance(hook, _SpectralNorm):
            return hook.compute_weight(self, do_power_iteration=False)
        return latent(self, name)  # type: ignore[arg-type]

    def _quantize_latent(self, w: Tensor) -> Tensor:
        """What ``self.weight`` reads give (`LayerWeight`): ``codes * scale`` of the latent `w`, straight-through."""
        return fake_quantize_weight(w, self.qconfig, self._ternq_spec.weight_out_dim)

    def quantized_weight(self) -> Tensor:
        """``codes * scale`` with a straight-through gradient to the latent float weight."""
        return fake_quantize_weight(self.float_weight(), self.qconfig, self._ternq_spec.weight_out_dim)

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """Hard integer codes (int8) and scales of the current weight: what gets packed."""
        return quantize_weight(self.float_weight(), self.qconfig, self._ternq_spec.weight_out_dim)

    def hard_weight(self) -> Tensor:
        """The dequantized weight ``codes * scale`` without gradient (for export and interop)."""
        codes, scale = self.weight_codes()
        w = dequantize_weight(codes, scale, self.qconfig, self._ternq_spec.weight_out_dim)
        return w.to(self.float_weight().dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        spec = self._ternq_spec
        x, args = take_input(spec, args, kwargs)
        # the weight attribute reads as its quantized value (`LayerWeight`), here as anywhere else
        return spec.forward(self, self.quantize_input(x), getattr(self, spec.weight_name), *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        extra = ", act_granularity=tensor" if self.qconfig.act_granularity == "tensor" else ""
        return f"{base}, qconfig={self.qconfig.name}/{self.qconfig.granularity}, act_bits={self.qconfig.act_bits}{extra}"


class LayerWeight(QuantizedWeight):
    """The weight attribute of a QAT layer: every read, in the layer's forward or anywhere else (a parent reading
    ``child.weight``, a decode step, a checkpoint recomputation), gives ``codes * scale`` of the latent weight,
    which stays in ``_parameters`` (`ternq.weight_attr`)."""

    def quantizer(self, obj: nn.Module) -> Callable[[Tensor], Tensor] | None:
        return obj._quantize_latent  # type: ignore[return-value]


def _with_layer_weight(cls: type, name: str, base: type | None = None) -> None:
    """Give QAT class `cls` its `LayerWeight` for weight `name`, wrapping what the float class has there (the
    property of a parametrized weight), unless `cls` already defines one."""
    if isinstance(cls.__dict__.get(name), LayerWeight):
        return
    shadowed = next((k.__dict__[name] for k in (base or cls).__mro__ if name in k.__dict__), None)
    setattr(cls, name, LayerWeight(name, shadowed if not isinstance(shadowed, LayerWeight) else None))


@functools.cache
def _input_name(float_type: type[nn.Module]) -> str | None:
    """The name of the float layer's input argument ("input" for torch's layers), for ``layer(input=x)``."""
    try:
        params = list(inspect.signature(float_type.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    return params[0].name if params and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else None


def take_input(spec: LayerSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    """The input of a layer call and the other positional arguments; the input may come by keyword, as the
    float layer allows (`kwargs`, a call's own dict, loses it)."""
    if args:
        return args[0], args[1:]
    name = _input_name(spec.float_type)
    if name is None or name not in kwargs:
        raise TypeError(f"{spec.float_type.__name__}.forward() missing its input argument {name or ''}".rstrip())
    return kwargs.pop(name), ()


# --- built-in layer forwards -----------------------------------------------------------------------------------


def _linear(m: nn.Linear, x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w, m.bias)


def _conv(m: nn.Conv1d | nn.Conv2d, x: Tensor, w: Tensor) -> Tensor:
    return m._conv_forward(x, w, m.bias)


def _conv_transpose1d(m: nn.ConvTranspose1d, x: Tensor, w: Tensor, output_size: list[int] | None = None) -> Tensor:
    output_padding = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, 1, m.dilation)
    return F.conv_transpose1d(x, w, m.bias, m.stride, m.padding, output_padding, m.groups, m.dilation)


def _conv_transpose(m: nn.ConvTranspose2d | nn.ConvTranspose3d, x: Tensor, w: Tensor,
                    output_size: list[int] | None = None) -> Tensor:
    nd = len(m.kernel_size)
    output_padding = m._output_padding(x, output_size, m.stride, m.padding, m.kernel_size, nd, m.dilation)
    fn = F.conv_transpose2d if nd == 2 else F.conv_transpose3d
    return fn(x, w, m.bias, m.stride, m.padding, output_padding, m.groups, m.dilation)


def _embedding(m: nn.Embedding, x: Tensor, w: Tensor) -> Tensor:
    return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


class QuantLinear(QuantMixin, nn.Linear):
    """QAT nn.Linear: BitLinear when configured as the paper (ternary weights, layer-normed int8 inputs)."""

    _ternq_spec = LayerSpec(nn.Linear, _linear, weight_out_dim=0, feature_dim=-1)


class QuantConv1d(QuantMixin, nn.Conv1d):
    """QAT nn.Conv1d; activations are normalized and quantized per time step over channels."""

    _ternq_spec = LayerSpec(nn.Conv1d, _conv, weight_out_dim=0, feature_dim=1)


class QuantConv2d(QuantMixin, nn.Conv2d):
    """QAT nn.Conv2d; activations are normalized and quantized per pixel over channels."""

    _ternq_spec = LayerSpec(nn.Conv2d, _conv, weight_out_dim=0, feature_dim=1)


class QuantConv3d(QuantMixin, nn.Conv3d):
    """QAT nn.Conv3d; activations are normalized and quantized per voxel over channels."""

    _ternq_spec = LayerSpec(nn.Conv3d, _conv, weight_out_dim=0, feature_dim=1)


class QuantConvTranspose2d(QuantMixin, nn.ConvTranspose2d):
    """QAT nn.ConvTranspose2d; weight is (in, out/groups, kh, kw): outputs on dim 1."""

    _ternq_spec = LayerSpec(nn.ConvTranspose2d, _conv_transpose, weight_out_dim=1, feature_dim=1)


class QuantConvTranspose3d(QuantMixin, nn.ConvTranspose3d):
    """QAT nn.ConvTranspose3d; weight is (in, out/groups, kd, kh, kw): outputs on dim 1."""

    _ternq_spec = LayerSpec(nn.ConvTranspose3d, _conv_transpose, weight_out_dim=1, feature_dim=1)


class QuantConvTranspose1d(QuantMixin, nn.ConvTranspose1d):
    """QAT nn.ConvTranspose1d (HiFi-GAN's upsamplers); weight is (in, out/groups, k), so outputs lie on dim 1."""

    _ternq_spec = LayerSpec(nn.ConvTranspose1d, _conv_transpose1d, weight_out_dim=1, feature_dim=1)


class QuantEmbedding(QuantMixin, nn.Embedding):
    """QAT nn.Embedding (opt-in: only converted when a rule selects nn.Embedding by type); one row per token."""

    _ternq_spec = LayerSpec(nn.Embedding, _embedding, weight_out_dim=0, feature_dim=None, optional=True)


# --- registry --------------------------------------------------------------------------------------------------

_REGISTRY: dict[type[nn.Module], type[QuantMixin]] = {}
_DERIVED: dict[type[nn.Module], type[QuantMixin] | None] = {}  # subclasses running a registered type's forward


def register_layer(
    float_type: type[nn.Module],
    forward: LayerForward | None = None,
    *,
    weight_out_dim: int = 0,
    feature_dim: int | None = -1,
    weight_name: str = "weight",
    optional: bool = False,
    quant_type: type[QuantMixin] | None = None,
) -> type[QuantMixin]:
    """Teach ternq a layer type; returns its QAT class.

    Either pass `forward` (ternq builds ``Quant<Name>(QuantMixin, float_type)``) or a ready `quant_type`.
    Example, a linear layer that stores its weight transposed (transformers' GPT-2 ``Conv1D``)::

        ternq.register_layer(Conv1D, lambda m, x, w: torch.addmm(m.bias, x.flatten(0, -2), w)
                             .view(*x.shape[:-1], -1), weight_out_dim=1)
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise TypeError(f"register_layer: {float_type!r} is not an nn.Module subclass")
    if issubclass(float_type, QuantMixin):
        raise TypeError(f"register_layer: {float_type.__name__} is already a ternq QAT class")
    if quant_type is None:
        if forward is None:
            raise TypeError(f"register_layer({float_type.__name__}): pass forward=... or quant_type=...")
        spec = LayerSpec(float_type, forward, weight_out_dim, feature_dim, weight_name, optional)
        quant_type = type(f"Quant{float_type.__name__}", (QuantMixin, float_type),
                          {"_ternq_spec": spec, "__module__": float_type.__module__})
    elif not issubclass(quant_type, QuantMixin) or quant_type._ternq_spec.float_type is not float_type:
        raise TypeError(f"register_layer: quant_type must be a QuantMixin subclass whose spec names {float_type}")
    _with_layer_weight(quant_type, quant_type._ternq_spec.weight_name, float_type)
    _REGISTRY[float_type] = quant_type
    _DERIVED.clear()  # a subclass derived from an earlier registration may now have its own
    return quant_type


for _cls in (QuantLinear, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d,
             QuantConvTranspose3d, QuantEmbedding):
    register_layer(_cls._ternq_spec.float_type, quant_type=_cls)


def _base_type(module: nn.Module) -> type[nn.Module]:
    """The user-visible class: parametrized modules live in a generated subclass of it."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__bases__[0]
    return cls


def _registered_quant_type(cls: type[nn.Module]) -> type[QuantMixin] | None:
    """The QAT class for layer type `cls`: registered, or derived for a subclass of a registered type that runs
    its base's forward (torch's ``NonDynamicallyQuantizableLinear`` is an ``nn.Linear`` with another name). A
    subclass overriding ``forward`` computes something ternq cannot know: it must be registered on its own."""
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    if cls not in _DERIVED:
        base = next((b for b in cls.__mro__[1:] if b in _REGISTRY), None)
        if base is None or cls.forward is not base.forward or issubclass(cls, QuantMixin):
            _DERIVED[cls] = None
        else:
            spec = dataclasses.replace(_REGISTRY[base]._ternq_spec, float_type=cls)
            _DERIVED[cls] = type(f"Quant{cls.__name__}", (_REGISTRY[base], cls),
                                 {"_ternq_spec": spec, "__module__": cls.__module__})
    return _DERIVED[cls]


def layer_spec(module: nn.Module) -> LayerSpec | None:
    """The spec ternq would use for `module`, or None when its type is not registered."""
    if isinstance(module, QuantMixin):
        return module._ternq_spec
    quant_type = _registered_quant_type(_base_type(module))
    return None if quant_type is None else quant_type._ternq_spec


def is_quantized(module: nn.Module) -> bool:
    """True for a ternq QAT layer."""
    return isinstance(module, QuantMixin)


def _quant_class_for(module: nn.Module) -> type[QuantMixin]:
    base = _base_type(module)
    quant_type = _registered_quant_type(base)
    if quant_type is None:
        known = ", ".join(sorted(t.__name__ for t in _REGISTRY))
        raise UnsupportedLayerError(f"ternq cannot quantize {base.__name__}: not a registered layer type "
                                    f"({known}); teach it with ternq.register_layer(...)")
    name = quant_type._ternq_spec.weight_name
    if isinstance(next((k.__dict__[name] for k in base.__mro__ if name in k.__dict__), None), property):
        # its weight reads another attribute: quantizing both would quantize twice, one of them alone would
        # leave the other a float way to the same weight
        raise UnsupportedLayerError(
            f"ternq cannot quantize {base.__name__}: its {name!r} is a property computed from other attributes. "
            f"Register it with weight_name= the Parameter that property reads (ternq.register_layer({base.__name__}, "
            "forward, weight_name=...)), so that every read of that Parameter gives the quantized weight")
    if type(module) is base:
        return quant_type
    # parametrized: torch replaced the module's class by a generated subclass holding the parametrized
    # properties (and its pickling hooks). Build the same thing on top of the QAT class, so that torch's
    # remove_parametrizations, which deletes the properties and falls back to `__bases__[0]`, leaves a plain
    # QAT layer. Not cached: the generated class is per module.
    skip = {"__module__", "__dict__", "__weakref__", "__doc__", "__qualname__"}
    namespace = {k: v for k, v in vars(type(module)).items() if k not in skip}
    name = quant_type._ternq_spec.weight_name
    if name in namespace:  # the parametrized weight: its reads are quantized too
        namespace[name] = LayerWeight(name, namespace[name])
    return type(f"{quant_type.__name__}Parametrized", (quant_type,), namespace)


def to_quant_module(module: nn.Module, config: QuantConfig) -> nn.Module:
    """The QAT version of `module` (shares its parameters; `module` itself is left unchanged)."""
    if isinstance(module, QuantMixin):
        raise AlreadyQuantizedError(f"{type(module).__name__} is already quantized (a ternq QAT layer)")
    qmodule = shallow_clone(module, _quant_class_for(module))
    qmodule.qconfig = config
    return qmodule


def to_float_module(module: nn.Module) -> nn.Module:
    """A plain float layer whose weight holds the hard-quantized values ``codes * scale``.

    Weight reparametrizations are folded away: the result has an ordinary ``weight`` parameter.
    """
    if not isinstance(module, QuantMixin):
        raise TypeError(f"{type(module).__name__} is not a ternq QAT layer")
    spec = module._ternq_spec
    with torch.no_grad():
        hard = module.hard_weight().detach().clone()
    clone = shallow_clone(module, spec.float_type)
    clone.__dict__.pop("qconfig", None)
    if parametrize.is_parametrized(module):
        # fold every parametrized tensor into a plain parameter (torch's remove_parametrizations would edit
        # the generated class, which the original module shares)
        folded = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
        del clone._modules["parametrizations"]
        for name, value in folded.items():
            clone.register_parameter(name, nn.Parameter(value, requires_grad=False))
    # legacy weight_norm / spectral_norm recompute the weight before every forward: drop them
    drop_legacy_weight(clone, module, spec.weight_name)
    clone.__dict__.pop(spec.weight_name, None)  # the legacy hooks' last computed weight
    clone._parameters.pop(spec.weight_name, None)
    clone.register_parameter(spec.weight_name, nn.Parameter(hard, requires_grad=module.float_weight().requires_grad))
    return clone
