"""The attribute that holds a quantized weight: every read of it returns the quantized value.

A quantized weight must compute as ``codes * scale`` wherever the model reads it: in its layer's forward, in a
parent that reads ``child.weight`` itself, in a decode step or a train-only branch that no recorded run took, in
a checkpointed block recomputed during backward, in a traced or compiled graph. Intercepting chosen calls can
only cover the paths someone saw. So ternq quantizes the *attribute*: the module holding the weight gets a class
attribute (`QuantizedWeight`, a data descriptor, as ``torch.nn.utils.parametrize`` installs its properties) that
shadows ``_parameters[name]`` and returns ``quantize(latent)`` on every read. The latent float Parameter stays
where it was, under the same name, so ``state_dict`` keys, ``load_state_dict``, optimizers made before
`ternq.quantize` and ``named_parameters`` are untouched; only reads of ``module.<name>`` change, and there is
no other way to read the weight as a float value than asking for the latent one (`latent`).

Why not ``torch.nn.utils.parametrize``: it moves the Parameter to ``parametrizations.<name>.original``, which
changes ``state_dict`` keys and ``named_parameters`` (checkpoints, peft's and optimizers' name-based configs);
the descriptor keeps them, and composes with a parametrization that is already there (weight_norm), which it
wraps.

Each read computes the quantized value afresh (a few small ops), so that gradient checkpointing recomputes it and
an optimizer step is seen at once. Within one forward of a holder (its class wraps ``forward`` in `cached`), a
weight read many times (a stack of experts indexed once per expert) is computed once, and reused only for the
same latent tensor, unchanged, read in the same grad mode.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["QuantizedWeight", "QUANTIZERS", "set_quantizer", "latent", "latent_parameter",
           "is_quantized_attr", "holder_class", "float_class", "cached"]

#: instance attribute of a holder: weight name -> the function computing its quantized value from the latent one
QUANTIZERS = "_ternq_quantizers"

_local = threading.local()


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Within the block, each quantized attribute is computed once per holder and the same tensor is returned to
    every read (nested blocks share the outermost one's values)."""
    if torch.compiler.is_compiling():  # a compiled graph computes each value once anyway (common subexpressions)
        yield
        return
    outer = getattr(_local, "cache", None)
    if outer is None:
        _local.cache = {}
    try:
        yield
    finally:
        if outer is None:
            _local.cache = None


class QuantizedWeight:
    """Class attribute standing for weight `name` of a module: reads give its quantized value.

    `base` is the class attribute it shadows, if any (the property of a ``parametrize``d weight, e.g.
    weight_norm's); the latent value is then what `base` computes. Without `base`, the latent value is
    ``_parameters[name]``, or, for a weight that a legacy ``weight_norm`` / ``spectral_norm`` hook recomputes
    before each forward, the plain attribute that hook set (kept in the instance ``__dict__``).
    """

    def __init__(self, name: str, base: Any = None) -> None:
        self.name = name
        self.base = base

    def latent(self, obj: nn.Module) -> Tensor:
        if self.base is not None:
            return self.base.__get__(obj, type(obj))
        params = obj.__dict__["_parameters"]
        if self.name in params:
            return params[self.name]
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{self.name}'") from None

    def __get__(self, obj: nn.Module | None, cls: type | None = None) -> Any:
        if obj is None:
            return self
        value = self.latent(obj)
        quantize = self.quantizer(obj)
        if quantize is None or value is None or _is_sharded(value):
            return value
        if torch.compiler.is_compiling():
            return quantize(value)
        cache = getattr(_local, "cache", None)
        if cache is None:
            return quantize(value)
        # a cached value stands only for the same latent, unchanged, read in the same grad mode (a read under
        # no_grad for a statistic must not hand the next read a value without a graph; functional_call swaps the
        # latent). The entry keeps the holder and the latent alive while their ids are in use.
        key = (id(obj), self.name)
        stamp = (id(value), value._version, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        hit = cache.get(key)
        if hit is None or hit[1] != stamp:
            hit = cache[key] = ((obj, value), stamp, quantize(value))
        return hit[2]

    def quantizer(self, obj: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """The function computing the read value from the latent one (None: reads give the latent value)."""
        return obj.__dict__.get(QUANTIZERS, {}).get(self.name)

    def __set__(self, obj: nn.Module, value: Any) -> None:
        # nn.Module.__setattr__ handles Parameters and tensors assigned to parameter names itself: only other
        # values get here (a legacy weight_norm hook setting the computed weight)
        if self.base is not None:
            self.base.__set__(obj, value)
        else:
            obj.__dict__[self.name] = value

    def __delete__(self, obj: nn.Module) -> None:
        if self.base is not None:
            self.base.__delete__(obj)
        elif obj.__dict__.pop(self.name, None) is None:
            raise AttributeError(self.name)


def _is_sharded(value: Any) -> bool:
    """A sharded parameter (FSDP2's DTensor) reads as itself: FSDP2 reads and replaces its parameters through
    the attribute, and puts the gathered plain tensor there for each forward / backward, which reads quantized."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(value, dtensor.DTensor)


def is_quantized_attr(module: nn.Module, name: str) -> bool:
    """Whether reads of ``module.<name>`` give a quantized value."""
    attr = _find(type(module), name)
    return isinstance(attr, QuantizedWeight) and attr.quantizer(module) is not None


def latent(module: nn.Module, name: str) -> Any:
    """The float value behind ``module.<name>``: the latent weight a quantizer reads (the attribute itself where
    it is not quantized)."""
    attr = _find(type(module), name)
    if isinstance(attr, QuantizedWeight):
        return attr.latent(module)
    return getattr(module, name)


def set_quantizer(module: nn.Module, name: str, quantize: Callable[[Tensor], Tensor]) -> None:
    """Make reads of ``module.<name>`` return ``quantize(latent)``. The module's class must hold a
    `QuantizedWeight` for `name` (`holder_class`); `ternq.qat.functional.uninstall` undoes both."""
    if not isinstance(_find(type(module), name), QuantizedWeight):
        raise TypeError(f"{type(module).__name__} has no quantized attribute {name!r}: use holder_class first")
    # a new dict: a shallow clone's is never shared
    module.__dict__[QUANTIZERS] = {**module.__dict__.get(QUANTIZERS, {}), name: quantize}


def _find(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


_HOLDERS: dict[tuple[type, frozenset[str]], type] = {}


def holder_class(cls: type[nn.Module], names: frozenset[str] | set[str]) -> type[nn.Module]:
    """A subclass of `cls` whose attributes `names` are `QuantizedWeight`s (`cls` itself when they already are).

    It keeps `cls`'s name, so that reports, ``print(model)`` and type checks read as before; `float_class` gives
    `cls` back. Cached per class and names, so that modules of one class share one holder class.
    """
    missing = frozenset(n for n in names if not isinstance(_find(cls, n), QuantizedWeight))
    if not missing:
        return cls
    base_cls = float_class(cls)
    names = missing | frozenset(n for n in _holder_names(cls))
    key = (base_cls, names)
    if key not in _HOLDERS:
        namespace: dict[str, Any] = {n: QuantizedWeight(n, _find(base_cls, n)) for n in sorted(names)}
        namespace.update(__module__=base_cls.__module__, __qualname__=base_cls.__qualname__,
                         _ternq_float_class=base_cls)
        if issubclass(base_cls, nn.RNNBase):
            namespace["_flat_weights"] = _FLAT_WEIGHTS
        namespace["forward"] = _cached_forward(base_cls.forward)
        namespace["__reduce_ex__"] = _reduce_holder
        _HOLDERS[key] = type(base_cls.__name__, (base_cls,), namespace)
    return _HOLDERS[key]


def _reduce_holder(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """Pickle a holder as its float class and quantized names (a generated class has no importable name)."""
    cls = type(self)
    return _rebuild_holder, (float_class(cls), tuple(_holder_names(cls))), self.__getstate__()


def _rebuild_holder(float_cls: type[nn.Module], names: tuple[str, ...]) -> nn.Module:
    cls = holder_class(float_cls, set(names))
    return cls.__new__(cls)


def _holder_names(cls: type) -> list[str]:
    return [n for n in cls.__dict__ if isinstance(cls.__dict__[n], QuantizedWeight)] \
        if "_ternq_float_class" in cls.__dict__ else []


def float_class(cls: type[nn.Module]) -> type[nn.Module]:
    """The class a holder class was made from (`cls` itself for any other class)."""
    return cls.__dict__.get("_ternq_float_class", cls)


def _cached_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    """The holder's forward, computing each quantized weight once however often it reads it (a mixture of
    experts indexes its stacked weight once per expert)."""

    @functools.wraps(forward)
    def cached_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with cached():
            return forward(self, *args, **kwargs)

    return cached_forward


class _FlatWeights:
    """``_flat_weights`` of a recurrent holder: the weights as read now (quantized where they are), so that the
    RNN kernel computes with what ``rnn.weight_hh_l0`` returns. torch caches this list when the weights are set;
    the holder computes it on each read instead, and ignores torch's writes of it."""

    def __get__(self, obj: nn.RNNBase | None, cls: type | None = None) -> Any:
        if obj is None:
            return self
        return [getattr(obj, n) if hasattr(obj, n) else None for n in obj._flat_weights_names]

    def __set__(self, obj: nn.RNNBase, value: Any) -> None:
        pass


_FLAT_WEIGHTS = _FlatWeights()


def latent_parameter(root: nn.Module, path: str) -> nn.Parameter:
    """The Parameter at `path` under `root` (``"sub.weight"``), the latent one where reads are quantized:
    ``root.get_parameter`` reads the attribute, which gives the quantized value, not the Parameter."""
    holder_path, _, name = path.rpartition(".")
    holder = root.get_submodule(holder_path) if holder_path else root
    param = holder._parameters.get(name)
    if param is None:
        return root.get_parameter(path)  # raises AttributeError naming what is missing
    return param
