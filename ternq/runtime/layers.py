"""The packed layer classes (`ternq.runtime` documents what they compute and their tolerance)."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..config import QuantConfig
from ..errors import ArchitectureMismatchError, FormatError
from ..qat.layers import LayerSpec, quantize_layer_input, take_input
from ..qat.quantizers import dequantize_weight, quantize_weight
from ..qat.surgery import drop_legacy_weight, legacy_weight_hook, shallow_clone
from . import kernels, native, picker
from .packed_weight import PackedWeight
from .picker import KERNEL_ENV, WEIGHT_ONLY
from .storage import pack_rows, storage_bits, unpack_rows

STORAGE_ENV = "TERNQ_STORAGE"
STORAGES = ("int8", "packed")  # what a layer holds
STORAGE_POLICIES = ("auto", *STORAGES)  # what load_packed(storage=) and $TERNQ_STORAGE accept

# ((layer class, geometry, storage), input bucket, dtype, device, threads) -> kernel name: a record of the
# picker's decisions (`kernel_choices`), not a cache (the picker decides without timing)
_CHOICES: dict[tuple[Any, ...], str] = {}
_GENERATION = [0]
_MEMO_SIZE = 32  # input shapes whose kernel choice a layer remembers


# the variables a kernel choice depends on (`PackedLayer._pick`), as os.environ's own mapping keys them
_OVERRIDES = (KERNEL_ENV, native.NATIVE_ENV, native.ARCH_ENV)
_RAW_ENV = getattr(os.environ, "_data", None)
_RAW_KEYS = (tuple(os.environ.encodekey(name) for name in _OVERRIDES)  # type: ignore[attr-defined]
             if _RAW_ENV is not None and hasattr(os.environ, "encodekey") else None)


def _overrides() -> tuple[Any, ...]:
    """The current values of `_OVERRIDES`, read on every call so that a change reaches the next one; from
    os.environ's undecoded mapping where CPython has it (~0.1 us: ``os.environ.get`` decodes each, ~1 us apiece,
    which was a third of a one-token layer call's overhead). Changes through ``os.environ`` (and monkeypatch) are
    seen either way; ``os.putenv`` is seen by neither."""
    if _RAW_KEYS is None:
        return tuple(os.environ.get(name) for name in _OVERRIDES)
    get = _RAW_ENV.get  # type: ignore[union-attr]
    return (get(_RAW_KEYS[0]), get(_RAW_KEYS[1]), get(_RAW_KEYS[2]))


#: a layer's bound native calls (`PackedLayer._bind`; ``_fast``: `PackedLinear.forward`'s one-token path over
#: ``_gemv``): they hold raw addresses into the layer's tensors, so a copy, a pickle or new codes drops them
_BINDINGS = ("_gemv", "_tiled", "_direct", "_fast")


def _where(codes: Tensor, scale: Tensor, bias: Tensor | None) -> tuple[int, int, int]:
    """The addresses of a layer's codes, scales and bias now. A bound native call holds them (or copies made from
    that memory), and a tensor can keep its object yet move: ``share_memory()`` frees the old memory, ``.data =``
    swaps it. A binding is current only while both the objects and these addresses are the same."""
    return codes.data_ptr(), scale.data_ptr(), 0 if bias is None else bias.data_ptr()


def kernel_choices() -> dict[tuple[Any, ...], str]:
    """A copy of the kernels picked so far (`ternq.runtime.picker`), keyed by layer geometry and input-shape bucket."""
    return dict(_CHOICES)


def reset_kernel_choices() -> None:
    """Forget the recorded choices, and every layer's memo of its last one."""
    _CHOICES.clear()
    _GENERATION[0] += 1  # invalidates every layer's memo of its last choice


# --- the packed layer ------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_KERNEL_ATTR = "_ternq_kernel"
_F = TypeVar("_F", bound=Callable[..., Tensor])


def register_kernel(name: str) -> Callable[[_F], _F]:
    """Registers a `PackedLayer` method as the kernel `name` of its class and subclasses (`kernel_impls`)."""
    def mark(method: _F) -> _F:
        setattr(method, _KERNEL_ATTR, name)
        return method
    return mark


def recording_a_graph() -> bool:
    """Whether torch.jit.trace, torch.compile, torch.export or a TorchDispatchMode (make_fx's real-tensor tracing,
    FlopCounterMode) is recording this call: a graph records torch ops only, so a native kernel (a ctypes call:
    make_fx kept only its output's allocation) and the per-shape kernel choice would not be in it. Packed layers
    then run their reference path, torch ops on the same codes."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


class PackedLayer:
    """Inference forward of every packed layer; the float class provides the layer's other attributes.

    Like the QAT layers, ``PackedLinear`` *is* an ``nn.Linear`` (same bias, hooks and hyperparameters), minus the
    float weight: it holds ``ternq_codes`` (int8 codes in the kernel's layout, or packed bytes) and ``scale``
    (float32, the stored shape of `ternq.qat.quantizers.weight_scale`), both non-persistent buffers, so
    ``state_dict()`` carries only the float parameters left (bias); `ternq.pack` reads ``.codes`` / ``.scale``.
    """

    kernels: tuple[str, ...] = (WEIGHT_ONLY,)  # in preference order; subclasses add integer kernels
    #: kernel name -> its implementation (a method marked ``@register_kernel(name)`` on the class or a base): the registry
    #: `forward` dispatches through, checked against `kernels` when the class is made
    kernel_impls: ClassVar[dict[str, Callable[..., Tensor]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        impls: dict[str, Callable[..., Tensor]] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                name = getattr(attr, _KERNEL_ATTR, None)
                if name is not None:
                    impls[name] = attr
        missing = [name for name in cls.kernels if name not in impls]
        if missing and issubclass(cls, nn.Module):  # a concrete layer (not a mixin like _PackedConv1dBase)
            raise TypeError(f"{cls.__name__}.kernels names {missing} but no method is marked @register_kernel(...) for them")
        cls.kernel_impls = impls
    qconfig: QuantConfig
    spec: LayerSpec
    storage: str
    ternq_codes: Tensor
    scale: Tensor

    # -- construction -------------------------------------------------------------------------------------------

    def _init_packed(self, codes: Tensor, scale: Tensor, config: QuantConfig, spec: LayerSpec,
                     kernel: str | None, storage: str | None, float_dtype: torch.dtype = torch.float32) -> None:
        self.qconfig = config
        self.spec = spec
        self._weight_shape = tuple(codes.shape)
        storage = storage if storage is not None else os.environ.get(STORAGE_ENV, "auto").strip() or "auto"
        if storage not in STORAGE_POLICIES:
            raise ValueError(f"storage={storage!r}: expected one of {STORAGE_POLICIES} (or set {STORAGE_ENV})")
        if storage == "auto":
            storage = self._auto_storage(codes, config)
        self.storage = storage
        self._int8_layout = self._integer_kernel_possible()
        layout = (self._to_layout(codes) if self._int8_layout else codes).contiguous()
        self._layout_shape = tuple(layout.shape)
        self._bits = storage_bits(config) if storage == "packed" else 8
        ternq_codes = layout if self._bits == 8 else pack_rows(layout, self._bits)
        self.register_buffer("ternq_codes", ternq_codes, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("scale", scale.to(torch.float32).contiguous(), persistent=False)  # type: ignore[attr-defined]
        self.float_dtype = float_dtype  # the float weight's dtype: the output dtype of integer-index inputs
        self._forced: str | None = None
        self._policy: str | None = None  # "int8": an integer kernel wherever one fits (`picker.pick`)
        self._last: str | None = None
        if kernel == "int8":
            self._policy = kernel
        elif kernel is not None and kernel != "auto":
            self.kernel = kernel

    def _integer_kernel_possible(self) -> bool:
        """Whether an integer kernel can ever run for this layer (decides the stored layout)."""
        return len(self.kernels) > 1

    def _auto_storage(self, codes: Tensor, config: QuantConfig) -> str:
        """The storage for ``storage="auto"``: int8, the layout every kernel reads (`PackedLinear` overrides)."""
        return "int8"

    def _to_layout(self, codes: Tensor) -> Tensor:
        """Weight-shaped codes -> the layout the integer kernel reads (identity unless overridden)."""
        return codes

    def _from_layout(self, stored: Tensor) -> Tensor:
        """Inverse of `_to_layout`."""
        return stored

    # -- weights ------------------------------------------------------------------------------------------------

    def _layout_codes(self) -> Tensor:
        """int8 codes in the stored layout (a transient unpacked copy for packed storage)."""
        if self._bits == 8:
            return self.ternq_codes
        return unpack_rows(self.ternq_codes, self._bits, self._layout_shape[-1])

    @property
    def codes(self) -> Tensor:
        """int8 codes in the float weight's shape (what `ternq.pack` stores)."""
        stored = self._layout_codes()
        # contiguous like the float weight, so that weight_only's float weight has the QAT weight's strides
        return (self._from_layout(stored) if self._int8_layout else stored).contiguous()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``codes * scale`` in the weight's shape: a fresh tensor, not kept by the layer."""
        w = dequantize_weight(self.codes, self.scale, self.qconfig, self.spec.weight_out_dim)
        return w.to(dtype)

    def read_weight(self, latent: Tensor | None = None) -> Tensor:
        """What another module holding this layer's weight (a tie, `ternq.weight_attr`) reads: ``codes * scale``."""
        return self.dequantized_weight(self.float_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .half() / .to(dtype) cast the float parameters: the output dtype of integer-index inputs follows them
        self.float_dtype = fn(torch.empty(0, dtype=self.float_dtype)).dtype
        return super()._apply(fn, recurse)  # type: ignore[misc]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            spec = self.__dict__.get("spec")
            if spec is not None and name == spec.weight_name:
                return PackedWeight(self)  # the float weight's dtype / shape / device; dequantized on use
            raise

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        """The float layer's keys: the weight is there as a `PackedWeight` (no float data until used)."""
        destination[prefix + self.spec.weight_name] = PackedWeight(self)  # first, as the float layer has it
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """A float weight under the weight's key is quantized with the layer's config and replaces the codes (a
        float checkpoint loads into a packed model); a `PackedWeight` of the same config brings its codes and
        scales, one of another config (other codes: 4-bit codes do not fit 2-bit rows) is quantized as a float
        weight is."""
        key = prefix + self.spec.weight_name
        if key in state_dict:
            value = state_dict[key]
            packed = isinstance(value, PackedWeight)
            if packed and value.layer is self:
                pass
            elif tuple(value.shape) != self._weight_shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                                  f"shape in the packed layer is {self._weight_shape}")
            elif packed and (value.layer.qconfig, value.layer.spec.weight_out_dim) == (self.qconfig,
                                                                                      self.spec.weight_out_dim):
                self._set_codes(value.layer.codes, value.layer.scale)
            else:
                weight = value.dequantize() if packed else value
                self._set_codes(*quantize_weight(weight, self.qconfig, self.spec.weight_out_dim))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)

    def _set_codes(self, codes: Tensor, scale: Tensor) -> None:
        """Replace the stored codes and scales (same shapes), in this layer's layout and storage."""
        self._init_packed(codes.to(torch.int8), scale, self.qconfig, self.spec, self._forced or self._policy,
                          self.storage,
                          self.float_dtype)
        self.__dict__.pop("_memo", None)
        for slot in _BINDINGS:
            self.__dict__.pop(slot, None)

    def __getstate__(self) -> dict[str, Any]:
        """The layer without its bound native calls (`PackedLinear._k_int8_gemv`, `PackedLinear._k_int8_tiled`, the
        convolutions' `_direct_call`): they hold raw pointers into this layer's tensors, which a copy or an unpickled
        layer does not share (it binds its own)."""
        state = dict(super().__getstate__())  # type: ignore[misc]
        for slot in _BINDINGS:
            state.pop(slot, None)
        return state

    def _binding(self, slot: str) -> tuple[Any, ...] | None:
        """The bound native call kept in `slot`, ``(codes, scale, bias, call, addresses)``, while it is current: the
        layer's codes, scales and bias are the same objects at the same addresses (`_set_codes`, ``.to()`` and
        assignments replace them; ``share_memory()`` and ``.data =`` move them, `_where`). None: bind again."""
        bound = self.__dict__.get(slot)
        if (bound is not None and bound[0] is self._buffers["ternq_codes"] and bound[1] is self._buffers["scale"]
                and bound[2] is self._parameters.get("bias") and _where(bound[0], bound[1], bound[2]) == bound[4]):
            return bound
        return None

    def _bind(self, slot: str, make: Callable[[Tensor, Tensor, Tensor | None], Callable[..., Tensor] | None],
              keep: bool = True) -> Callable[..., Tensor] | None:
        """`slot`'s current bound call, else ``make(codes, scale, bias)``'s (None: it cannot bind), kept in `slot`
        when `keep`: no per-call lookups, copies, sums or checks while the binding is current (`_binding`)."""
        bound = self._binding(slot)
        if bound is not None:
            return bound[3]
        codes, scale, bias = self._buffers["ternq_codes"], self._buffers["scale"], self._parameters.get("bias")
        call = make(codes, scale, bias)
        if call is not None and keep:
            self.__dict__[slot] = (codes, scale, bias, call, _where(codes, scale, bias))
        return call

    # -- kernel selection ---------------------------------------------------------------------------------------

    @property
    def kernel(self) -> str:
        """The forced kernel, else the one the last call ran ("auto" before the first call)."""
        return self._forced or self._last or "auto"

    @kernel.setter
    def kernel(self, name: str) -> None:
        self.__dict__.pop("_fast", None)  # `PackedLinear.forward`'s one-token path runs the automatic choice only
        if name == "auto":
            self._forced = None
            return
        if name not in self._config_kernels():
            raise ValueError(f"kernel={name!r} does not exist for this {type(self).__name__}: expected 'auto' or "
                             f"one of {self._config_kernels()}")
        if name != WEIGHT_ONLY and not self._integer_kernel_possible():
            raise ValueError(f"kernel={name!r} cannot run this {type(self).__name__} ({self._why_no_integer()}); "
                             f"use {WEIGHT_ONLY!r}")
        self._forced = name

    def _why_no_integer(self) -> str:
        return f"granularity={self.qconfig.granularity!r}, act_bits={self.qconfig.act_bits}"

    def _config_kernels(self) -> tuple[str, ...]:
        """The kernels of this layer's class that fit its config (a subset of `kernels`)."""
        return self.kernels

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        """Kernels that can compute this call (subclasses narrow it by input); weight_only always can."""
        return self._config_kernels()

    def _geometry(self) -> tuple[Any, ...]:
        """What besides the input shape decides which kernel is faster."""
        cfg = self.qconfig
        return (self._layout_shape, cfg.granularity, cfg.group_size, cfg.act_bits, cfg.act_granularity)

    def _bucket(self, x: Tensor) -> tuple[int, ...]:
        return tuple(_pow2(d) for d in x.shape)

    def _pick(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The kernel for this call. The layer memoizes its automatic choices per input shape, dtype, device,
        thread count and $TERNQ_KERNEL (up to `_MEMO_SIZE` of them: a prompt's shape and the decode step's
        alternate): repeated shapes skip the lookup, which costs ~10 us per call with caches cold after a GEMM."""
        if self._forced is None and not (torch.is_grad_enabled() and x.requires_grad):
            # every override the picker reads is in the key: $TERNQ_NATIVE=0 set after a call must reach the
            # next one (a remembered native kernel would run without its library)
            key = (x.shape, x.dtype, x.device, torch.get_num_threads(), _overrides(), _GENERATION[0])
            memo = self.__dict__.get("_memo")
            if memo is None:
                memo = self.__dict__["_memo"] = {}
            choice = memo.get(key)
            if choice is None:
                choice = self._pick_uncached(x, args, kwargs)
                if len(memo) >= _MEMO_SIZE:
                    memo.clear()
                memo[key] = choice
            return choice
        return self._pick_uncached(x, args, kwargs)

    def _pick_uncached(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        applicable = self._applicable(x)
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        choice = picker.pick(applicable, rows, forced=self._forced, policy=self._policy, needs_grad=torch.is_grad_enabled() and
                             x.requires_grad, owner=f"{type(self).__name__} (input {tuple(x.shape)}, {x.dtype})",
                             two_bit=self._bits == 2)
        geometry = self.__dict__.get("_geometry_key")
        if geometry is None:
            geometry = self._geometry_key = (type(self).__name__, self._geometry(), self.storage)
        _CHOICES[(geometry, self._bucket(x), x.dtype, x.device.type, torch.get_num_threads())] = choice
        return choice

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x, args = take_input(self.spec, args, kwargs)
        if recording_a_graph():
            return self.kernel_impls[WEIGHT_ONLY](self, x, *args, **kwargs)
        name = self._pick(x, args, kwargs)
        self.__dict__["_last"] = name  # not nn.Module.__setattr__: ~8 us per call with caches cold
        return self.kernel_impls[name](self, x, *args, **kwargs)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The QAT layer's input normalization and activation fake-quantization (float)."""
        return quantize_layer_input(self, x, self.qconfig, self.spec)  # type: ignore[arg-type]

    def _native_ok(self, x: Tensor) -> bool:
        """Whether the native kernels can take this input (float32 on CPU, codes of at most 8 bits)."""
        return kernels.native_ok(x, self.qconfig, getattr(self, "bias", None))

    def _quantize_int8(self, x: Tensor, dim: int, pad: tuple[int, int] = (0, 0)) -> tuple[Tensor, Tensor]:
        """`ternq.runtime.kernels.quantize_activations` with this layer's config."""
        return kernels.quantize_activations(x, self.qconfig, dim, pad)

    def _quantize_eager(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """`ternq.runtime.kernels.quantize_eager` with this layer's config (the QAT layer's codes, bit for bit)."""
        return kernels.quantize_eager(x, self.qconfig, dim)

    @register_kernel("weight_only")
    def _k_weight_only(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        dtype = x.dtype if x.is_floating_point() else self.float_dtype
        w = self.dequantized_weight(dtype)
        return self.spec.forward(self, self.quantize_input(x), w, *args, **kwargs)

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        cfg = self.qconfig
        extra = ", act_granularity=tensor" if cfg.act_granularity == "tensor" else ""
        return (f"{base}, qconfig={cfg.name}/{cfg.granularity}, act_bits={cfg.act_bits}{extra}, "
                f"storage={self.storage}, kernel={self.kernel}")


class PackedLinear(PackedLayer, nn.Linear):
    """Packed nn.Linear; one ``torch._int_mm`` per call (per scale group for group scales), either
    ``int8_gemm``: ``x_q @ codes.T``, or ``int8_gemm_t``: ``(codes @ x_q.T).T``, with the weight as the GEMM's
    left operand, which oneDNN does not re-layout per call: about 2x faster for a few tokens, slower for many.
    ``int8_tiled`` (native): one call on a copy of the codes packed into the GEMM's tiles at the first call that runs
    it (int8 storage: about out x in bytes more), or on the 2-bit rows as stored (their row sums: 4 bytes per output
    channel more)."""

    kernels = ("int8_gemm", "int8_gemm_t", "int8_gemv", "int8_tiled", WEIGHT_ONLY)

    def _integer_kernel_possible(self) -> bool:
        return self.qconfig.act_bits is not None

    def _auto_storage(self, codes: Tensor, config: QuantConfig) -> str:
        """2-bit rows where the decode GEMV on them is the faster one (`ternq.runtime.picker.choose_storage`)."""
        linear = config.act_bits is not None and config.granularity != "group"  # where the 2-bit kernels run
        return picker.choose_storage(linear, storage_bits(config), codes.numel(), native.packed_isa())

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        if self.qconfig.act_bits is not None and x.is_floating_point():
            if self._native_ok(x) and self.qconfig.granularity != "group":
                # int8_tiled reads int8 codes (a tiled copy) or 2-bit rows as stored; 4-bit rows keep their memory
                return self.kernels if self._bits != 4 else ("int8_gemm", "int8_gemm_t", "int8_gemv", WEIGHT_ONLY)
            return ("int8_gemm", "int8_gemm_t", WEIGHT_ONLY)
        return (WEIGHT_ONLY,)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """`PackedLayer.forward`, with a one-token path: when a call's input has the shape, dtype and device for
        which the automatic choice was ``int8_gemv``, and nothing that choice or the bound call depends on changed
        (thread count, `_OVERRIDES`, `reset_kernel_choices`, the codes, scales and bias objects, a forced kernel, a
        gradient, a graph being recorded), the bound native call runs directly: a decode step makes one such call
        per matrix, and the picker's lookups cost about a third of it."""
        fast = self.__dict__.get("_fast")
        if fast is not None and len(args) == 1 and not kwargs:
            x = args[0]
            if (type(x) is Tensor and x.shape == fast[0] and x.dtype is torch.float32 and x.is_cpu
                    and fast[1] == (torch.get_num_threads(), _GENERATION[0], _overrides())
                    and not (x.requires_grad and torch.is_grad_enabled()) and not recording_a_graph()):
                bound = self._binding("_gemv")
                if bound is not None:
                    self.__dict__["_last"] = "int8_gemv"
                    return bound[3](x)
        y = super().forward(*args, **kwargs)
        if len(args) == 1 and not kwargs and self._last == "int8_gemv" and self._forced is None:
            self._remember_gemv(args[0])
        return y

    def _remember_gemv(self, x: Tensor) -> None:
        """Keep the call just made (automatic ``int8_gemv``, its binding current) for `forward`'s one-token path."""
        if (self._binding("_gemv") is None or type(x) is not Tensor or x.dtype is not torch.float32 or not x.is_cpu
                or (x.requires_grad and torch.is_grad_enabled()) or recording_a_graph()):
            return
        self.__dict__["_fast"] = (x.shape, (torch.get_num_threads(), _GENERATION[0], _overrides()))

    @register_kernel("int8_gemv")
    def _k_int8_gemv(self, x: Tensor) -> Tensor:
        # the bound call of `kernels.linear_gemv_bound`, kept while current (`_bind`)
        run = self._bind("_gemv", self._bind_gemv)
        if run is None:  # 4-bit rows the GEMV cannot read: unpacked per call, not kept (memory is its point)
            w = self._layout_codes()
            return kernels.linear_gemv(x, w, self._row_sums(w), self.scale, self.bias, self.qconfig)
        return run(x)

    def _bind_gemv(self, codes: Tensor, scale: Tensor, bias: Tensor | None) -> Callable[[Tensor], Tensor] | None:
        if self._bits == 8:
            return kernels.linear_gemv_bound(codes, self._row_sums(codes), scale, bias, self.qconfig)
        if self._bits == 2:  # 2-bit rows, read as stored: decoded in registers (ternq_packed.c), no row sums
            return kernels.linear_gemv_bound(codes, None, scale, bias, self.qconfig)
        return None

    @staticmethod
    def _row_sums(w: Tensor) -> Tensor | None:
        """Row sums of the codes (int32): the native GEMV multiplies x + 128 as unsigned bytes and subtracts
        128 * row sum (4 bytes per output row). None where the unsigned-byte path is not exact: without VNNI it
        multiplies pairs into int16, which needs |codes| <= 64 (ternary codes are)."""
        sums, wmax = native.row_sums(w)
        return sums if native.vnni() or wmax <= 64 else None

    def _bucket(self, x: Tensor) -> tuple[int, ...]:
        return (_pow2(x.numel() // max(x.shape[-1], 1)),)

    def _gemm_codes(self) -> Tensor:
        """The codes the GEMM kernels take: 2-bit rows as stored (decoded tile by tile where the native kernels
        run, `kernels.linear_int8`), else int8 codes."""
        return self.ternq_codes if self._bits == 2 else self._layout_codes()

    @register_kernel("int8_gemm")
    def _k_int8_gemm(self, x: Tensor) -> Tensor:
        return kernels.linear_int8(x, self._gemm_codes(), self.scale, self.bias, self.qconfig, weight_first=False)

    @register_kernel("int8_gemm_t")
    def _k_int8_gemm_t(self, x: Tensor) -> Tensor:
        return kernels.linear_int8(x, self._gemm_codes(), self.scale, self.bias, self.qconfig, weight_first=True)

    @register_kernel("int8_tiled")
    def _k_int8_tiled(self, x: Tensor) -> Tensor:
        # the bound call of `kernels.linear_tiled_bound` (it holds the tiled copy of the codes), kept while
        # current (`_bind`)
        return self._bind("_tiled", lambda codes, scale, bias: kernels.linear_tiled_bound(
            self._gemm_codes(), scale, bias, self.qconfig))(x)


class _PackedConv1dBase(PackedLayer):
    """Shared by Conv1d and ConvTranspose1d: codes stored as (groups, k, out/groups, in/groups) for `int8_taps`."""

    kernels = ("int8_taps", WEIGHT_ONLY)
    groups: int
    kernel_size: tuple[int, ...]

    def _integer_kernel_possible(self) -> bool:
        return self.qconfig.act_bits is not None and self.qconfig.granularity != "group"

    def _why_no_integer(self) -> str:
        if self.qconfig.act_bits is None:
            return "act_bits=None: the input stays float"
        return "per-group weight scales mix taps within a group"

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        # unbatched (C, T) inputs keep the QAT layer's own handling: weight_only
        if self._integer_kernel_possible() and x.is_floating_point() and x.dim() == 3:
            return self._config_kernels()
        return (WEIGHT_ONLY,)

    def _geometry(self) -> tuple[Any, ...]:
        conv = (self.stride, self.padding, self.dilation, self.groups)  # type: ignore[attr-defined]
        return (*super()._geometry(), conv)

    def _bucket(self, x: Tensor) -> tuple[int, ...]:
        return (x.shape[0], _pow2(x.shape[-1]))

    def _tap_major(self, stored: Tensor) -> Tensor:
        """int8 codes in the stored layout -> (groups, k, out/groups, in/groups)."""
        return stored

    def _after_leaky_relu(self, x: Tensor, negative_slope: float) -> Tensor:
        """``self(F.leaky_relu(x, negative_slope))`` (`leaky_relu_then`); where the call runs ``int8_direct``, the
        activation is applied inside the input quantization (the same codes bit for bit, no activation tensor).
        A layer with hooks (they see the activated input), a graph being recorded and an unbatched input get the
        plain call."""
        if (self._forward_pre_hooks or self._forward_hooks or _global_hooks() or recording_a_graph()
                or x.dim() != 3):
            return self(F.leaky_relu(x, negative_slope))
        name = self._pick(x, (), {})
        if name != "int8_direct":
            return self(F.leaky_relu(x, negative_slope))
        self.__dict__["_last"] = name
        return self.kernel_impls[name](self, x, slope=negative_slope)

    def _direct_call(self) -> Callable[..., Tensor]:
        """``int8_direct`` bound to this layer (`kernels.conv1d_direct_bound` / `conv_transpose1d_direct_bound`: the
        codes as the kernel reads them, scales, bias, geometry; one native call per forward), kept while current
        (`_bind`): no per-call copies, row sums or lookups. 2 / 4-bit storage is unpacked per call, not kept (memory
        is its point)."""
        return self._bind("_direct", self._bind_direct, keep=self._bits == 8)  # type: ignore[return-value]

    def _bind_direct(self, codes: Tensor, scale: Tensor, bias: Tensor | None) -> Callable[..., Tensor]:
        transposed = isinstance(self, nn.ConvTranspose1d)
        weights = kernels.direct_weights(self._tap_major(self._layout_codes()),
                                         self.stride[0] if transposed else None)  # type: ignore[attr-defined]
        bind = kernels.conv_transpose1d_direct_bound if transposed else kernels.conv1d_direct_bound
        return bind(weights, scale, bias, self.qconfig, self._conv_geometry())

    def _conv_geometry(self) -> kernels.Conv1dGeometry:
        """The layer's convolution hyperparameters as the kernels take them (made once per layer)."""
        geom = self.__dict__.get("_conv_geom")
        if geom is None:
            if isinstance(self, nn.ConvTranspose1d):
                padding = (self.padding[0], self.padding[0])
            else:
                left, right = self._reversed_padding_repeated_twice  # type: ignore[attr-defined]
                padding = (left, right)
            geom = self.__dict__["_conv_geom"] = kernels.Conv1dGeometry(
                type(self).__name__, self.kernel_size[0], self.stride[0], self.dilation[0],  # type: ignore[attr-defined]
                padding, self.padding_mode, self.groups)  # type: ignore[attr-defined]
        return geom


class PackedConv1d(_PackedConv1dBase, nn.Conv1d):
    """Packed nn.Conv1d. Per-token activation scales: ``int8_direct`` (native: the convolution accumulated tap
    by tap in registers, each tap's int32 sums scaled by the scales of the steps it read, no tap planes in
    memory) or ``int8_taps`` (one int8 GEMM of all taps, per-step scales, shifted tap sum); per-sample scales
    (``act_granularity="tensor"``): ``int8_im2col``, the convolution as one int8 GEMM ``(out, in*k) @ (in*k, T)``
    over the unfolded input, rescaled once by the sample's scale.

    Per-token codes are stored as (groups, k, out/groups, in/groups): the tap-major layout both kernels read."""

    kernels = ("int8_direct", "int8_taps", "int8_im2col", WEIGHT_ONLY)

    def _config_kernels(self) -> tuple[str, ...]:
        return ("int8_direct", "int8_im2col" if self._im2col() else "int8_taps", WEIGHT_ONLY)

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        kernels = super()._applicable(x)
        if "int8_direct" in kernels and not (self._native_ok(x) and self._zero_padded()):
            kernels = tuple(k for k in kernels if k != "int8_direct")
        return kernels

    def _zero_padded(self) -> bool:
        return self.padding_mode == "zeros" or not any(self._reversed_padding_repeated_twice)

    def _im2col(self) -> bool:
        return self.qconfig.act_granularity == "tensor"

    def _to_layout(self, codes: Tensor) -> Tensor:
        out_ch, in_g, k = codes.shape
        if self._im2col():  # (groups, out/groups, in/groups * k): the weight's own order, rows = im2col rows
            return codes.reshape(self.groups, out_ch // self.groups, in_g * k)
        return codes.view(self.groups, out_ch // self.groups, in_g, k).permute(0, 3, 1, 2)

    def _from_layout(self, stored: Tensor) -> Tensor:
        if self._im2col():
            groups, out_g, cols = stored.shape
            return stored.reshape(groups * out_g, -1, self.kernel_size[0])
        groups, k, out_g, in_g = stored.shape
        return stored.permute(0, 2, 3, 1).reshape(groups * out_g, in_g, k)

    def _tap_major(self, stored: Tensor) -> Tensor:
        if self._im2col():  # per-sample layout (groups, out, in * k): the tap-major order int8_direct reads
            groups, out_g, cols = stored.shape
            return stored.view(groups, out_g, -1, self.kernel_size[0]).permute(0, 3, 1, 2)
        return stored

    @register_kernel("int8_direct")
    def _k_int8_direct(self, x: Tensor, *, slope: float | None = None) -> Tensor:
        return self._direct_call()(x, slope)

    @register_kernel("int8_taps")
    def _k_int8_taps(self, x: Tensor) -> Tensor:
        return kernels.conv1d_taps(x, self._layout_codes(), self.scale, self.bias, self.qconfig,
                                   self._conv_geometry())

    @register_kernel("int8_im2col")
    def _k_int8_im2col(self, x: Tensor) -> Tensor:
        return kernels.conv1d_im2col(x, self._layout_codes(), self.scale, self.bias, self.qconfig,
                                     self._conv_geometry())


class PackedConvTranspose1d(_PackedConv1dBase, nn.ConvTranspose1d):
    """Packed nn.ConvTranspose1d: ``int8_direct`` (native, dilation 1: the upsampling by the stride u as u
    interleaved stride-1 convolutions of the input, tap by tap in registers) or ``int8_taps`` (one int8 GEMM of
    all taps, per-step scales, overlap-add)."""

    kernels = ("int8_direct", "int8_taps", WEIGHT_ONLY)

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        kernels = super()._applicable(x)
        if "int8_direct" in kernels and not (self._native_ok(x) and self.dilation[0] == 1 and self.stride[0] <= 64):
            kernels = tuple(k for k in kernels if k != "int8_direct")
        return kernels

    def _to_layout(self, codes: Tensor) -> Tensor:
        in_ch, out_g, k = codes.shape
        return codes.view(self.groups, in_ch // self.groups, out_g, k).permute(0, 3, 2, 1)

    def _from_layout(self, stored: Tensor) -> Tensor:
        groups, k, out_g, in_g = stored.shape
        return stored.permute(0, 3, 2, 1).reshape(groups * in_g, out_g, k)

    def _output_padding_of(self, x: Tensor, output_size: list[int] | None) -> int:
        return self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 1,
                                    self.dilation)[0]

    @register_kernel("int8_direct")
    def _k_int8_direct(self, x: Tensor, output_size: list[int] | None = None, *, slope: float | None = None) -> Tensor:
        return self._direct_call()(x, self._output_padding_of(x, output_size), slope)

    @register_kernel("int8_taps")
    def _k_int8_taps(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        return kernels.conv_transpose1d_taps(x, self._layout_codes(), self.scale, self.bias, self.qconfig,
                                             self._conv_geometry(), self._output_padding_of(x, output_size))


class PackedConv2d(PackedLayer, nn.Conv2d):
    """Packed nn.Conv2d: weight_only (BitTTS is 1-D; a per-pixel int8 formulation is not implemented)."""


class PackedEmbedding(PackedLayer, nn.Embedding):
    """Packed nn.Embedding; ``gather``: gathers the looked-up code rows and scales only those."""

    kernels = ("gather", WEIGHT_ONLY)

    def _integer_kernel_possible(self) -> bool:
        return True

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        return self.kernels if self.max_norm is None else (WEIGHT_ONLY,)  # max_norm renormalizes the table

    @register_kernel("gather")
    def _k_gather(self, x: Tensor) -> Tensor:
        return kernels.embedding_gather(x, self.ternq_codes, self._bits, self._layout_shape[-1], self.scale,
                                        self.qconfig, self.float_dtype)


_BUILTIN: dict[type[nn.Module], type[PackedLayer]] = {
    nn.Linear: PackedLinear,
    nn.Conv1d: PackedConv1d,
    nn.Conv2d: PackedConv2d,
    nn.ConvTranspose1d: PackedConvTranspose1d,
    nn.Embedding: PackedEmbedding,
}
_GENERIC: dict[type[nn.Module], type[PackedLayer]] = {}


def _packed_class(float_type: type[nn.Module]) -> type[PackedLayer]:
    """The packed class for a registered layer type (weight_only for types ternq has no kernels for)."""
    if float_type in _BUILTIN:
        return _BUILTIN[float_type]
    if float_type not in _GENERIC:
        _GENERIC[float_type] = type(f"Packed{float_type.__name__}", (PackedLayer, float_type),
                                    {"__module__": float_type.__module__})
    return _GENERIC[float_type]


def _global_hooks() -> bool:
    """Whether torch has global module hooks (``register_module_forward_hook``...) that a call must run."""
    m = nn.modules.module
    return bool(m._global_forward_pre_hooks or m._global_forward_hooks)


def leaky_relu_then(module: nn.Module, x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """``module(F.leaky_relu(x, negative_slope))``, the activation before a convolution (HiFi-GAN's pattern):
    a packed Conv1d / ConvTranspose1d running ``int8_direct`` applies it while quantizing its input, bit for bit
    the same, without the activation's own pass over memory; any other module gets the plain call."""
    if isinstance(module, _PackedConv1dBase):
        return module._after_leaky_relu(x, negative_slope)
    return module(F.leaky_relu(x, negative_slope))


def is_packed(module: nn.Module) -> bool:
    """True for a layer made by `packed_layer`."""
    return isinstance(module, PackedLayer)


def _weight_shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    """Shape of the float weight, without computing it where the stored tensors tell (legacy weight_norm's
    ``_v``, spectral_norm's ``_orig``: ``_v`` is spectral_norm's power-iteration vector, so ``_orig`` comes first)."""
    if isinstance(module, PackedLayer):
        return module._weight_shape
    if parametrize.is_parametrized(module, name):  # a parametrization may reshape: ask it (one transient weight)
        with torch.no_grad():
            return tuple(getattr(module, name).shape)
    hook = legacy_weight_hook(module, name)
    if hook is not None:
        for suffix in ("_orig", "_v"):
            t = getattr(module, name + suffix, None)
            if isinstance(t, Tensor):
                return tuple(t.shape)
    t = module._parameters.get(name, module._buffers.get(name, getattr(module, name, None)))
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _weight_dtype(module: nn.Module, name: str) -> torch.dtype:
    """dtype of the float weight without computing it (float32 when it cannot be told)."""
    if isinstance(module, PackedLayer):
        return module.float_dtype
    if parametrize.is_parametrized(module, name):
        originals = [t for t in module.parametrizations[name].parameters()]  # type: ignore[union-attr,index]
        return originals[0].dtype if originals else torch.float32
    hook = legacy_weight_hook(module, name)
    if hook is not None:
        for suffix in ("_v", "_orig"):
            t = getattr(module, name + suffix, None)
            if isinstance(t, Tensor):
                return t.dtype
    t = module._parameters.get(name, module._buffers.get(name, getattr(module, name, None)))
    return t.dtype if isinstance(t, Tensor) and t.is_floating_point() else torch.float32


def _strip_float_weight(layer: nn.Module, source: nn.Module, name: str) -> None:
    """Remove the float weight and whatever computes it (parametrizations, legacy weight_norm / spectral_norm)
    from `layer`, a shallow clone of `source`; other parametrized tensors become plain parameters."""
    if parametrize.is_parametrized(source):
        others = [n for n in source.parametrizations if n != name]  # type: ignore[union-attr]
        del layer._modules["parametrizations"]
        for other in others:
            layer.register_parameter(other, nn.Parameter(getattr(source, other).detach(), requires_grad=False))
    drop_legacy_weight(layer, source, name)
    layer.__dict__.pop(name, None)
    layer._parameters.pop(name, None)
    layer._buffers.pop(name, None)
    for attr, hooks in layer.__dict__.items():  # hooks bound to `source` (weight_norm's state-dict hook) would
        if attr.endswith("_hooks") and isinstance(hooks, dict):  # keep it, and its float weight, alive
            for hook_id, hook in list(hooks.items()):
                if _refers_to(hook, source):
                    del hooks[hook_id]


def _refers_to(hook: Any, obj: object) -> bool:
    """Whether a hook is a method of `obj` or a closure over it."""
    hook = getattr(hook, "func", hook)  # functools.partial
    if getattr(hook, "__self__", None) is obj:
        return True
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            if cell.cell_contents is obj:
                return True
        except ValueError:  # an empty cell
            continue
    return False


def packed_layer(float_module: nn.Module, codes: Tensor, scale: Tensor, config: QuantConfig, spec: LayerSpec,
                 *, kernel: str | None = None, storage: str | None = None) -> nn.Module:
    """An inference layer computing `float_module`'s QAT forward from integer codes, without a float weight.

    Args:
        float_module: the skeleton's layer (float or QAT); its bias, hyperparameters and hooks are reused, its
            float weight is not referenced by the result.
        codes: integer codes in the weight's shape, within [-qmax, qmax] of `config`.
        scale: float scales in their stored shape (see `ternq.qat.quantizers.weight_scale`).
        config: the layer's quantization config (granularity, act_bits, input_norm as trained).
        spec: the layer type's `LayerSpec` (`ternq.qat.layers.layer_spec(float_module)`).
        kernel: "auto" (default: the picker's choice per call), "int8" (an integer kernel wherever one
            applies), "weight_only", or a kernel of the layer's class (``PackedLinear.kernels`` ...).
        storage: "int8" (1 byte per weight: the fastest prefill), "packed" (2 / 4 bits per weight; a Linear's
            2-bit rows are computed on as stored: the fastest decode) or "auto" (chosen from the CPU and the
            layer's shape, `ternq.runtime.picker.choose_storage`); None: the environment's, else "auto"
            (docs/runtime.md).
    """
    if not isinstance(float_module, nn.Module):
        raise TypeError(f"packed_layer: float_module must be an nn.Module, got {type(float_module).__name__}")
    name = spec.weight_name
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise FormatError(f"packed_layer: codes must be an integer tensor (int8), got "
                          f"{codes.dtype if isinstance(codes, Tensor) else type(codes).__name__}")
    if not isinstance(scale, Tensor) or not scale.is_floating_point():
        raise FormatError("packed_layer: scale must be a float tensor")
    shape = _weight_shape(float_module, name)
    float_dtype = _weight_dtype(float_module, name)
    if shape is not None and tuple(codes.shape) != shape:
        raise ArchitectureMismatchError(f"packed_layer: codes of shape {tuple(codes.shape)} do not fit "
                                        f"{type(float_module).__name__}.{name} of shape {shape}")
    expected = config.scale_shape(tuple(codes.shape), spec.weight_out_dim)
    if tuple(scale.shape) != expected:
        raise FormatError(f"packed_layer: scale of shape {tuple(scale.shape)} for granularity "
                          f"{config.granularity!r} of a weight {tuple(codes.shape)}; expected {expected}")
    if codes.numel():
        low, high = torch.aminmax(codes)
        if int(low) < -config.qmax or int(high) > config.qmax:
            raise FormatError(f"packed_layer: codes in [{int(low)}, {int(high)}] exceed [-{config.qmax}, "
                              f"{config.qmax}] of {config.name}")
    if not torch.isfinite(scale).all():
        raise FormatError("packed_layer: scale holds non-finite values")
    for attr in ("ternq_codes", "scale", "codes"):
        if is_packed(float_module):
            break  # re-packing a packed layer: its own storage is replaced
        if attr in float_module._parameters or attr in float_module._buffers or attr in float_module._modules:
            raise ValueError(f"packed_layer: {type(float_module).__name__} already has a member {attr!r}, which "
                             "a packed layer needs for its own storage")
    cls = _packed_class(spec.float_type)
    layer = shallow_clone(float_module, cls)
    _strip_float_weight(layer, float_module, name)  # type: ignore[arg-type]
    for attr in ("ternq_codes", "scale"):
        layer._buffers.pop(attr, None)
    layer.__dict__.pop("_geometry_key", None)  # re-packing: the storage may change
    layer.__dict__.pop("_memo", None)
    for slot in _BINDINGS:
        layer.__dict__.pop(slot, None)
    layer.__dict__.pop("_conv_geom", None)
    layer.__dict__.pop("qconfig", None)
    layer._init_packed(codes.to(torch.int8), scale, config, spec, kernel, storage, float_dtype)
    return layer  # type: ignore[return-value]


def resident_bytes(module: nn.Module) -> int:
    """Bytes held by `module`'s parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
