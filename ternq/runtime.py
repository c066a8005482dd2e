"""Packed inference layers: ternary / k-bit weights kept as int8 codes (or 2/4-bit packed) plus scales.

`packed_layer` turns a float layer plus its integer codes and scales into an inference layer that never holds a
float copy of the weight. It computes what the QAT layer computes in eval mode (input norm, per-token absmax
activation quantization, ``codes * scale`` weight) by one of several *kernels*:

``int8_gemm`` / ``int8_gemm_t`` (Linear), ``int8_taps`` (Conv1d, ConvTranspose1d)
    For layers trained with ``act_bits`` set. The normalized input is rounded to integer codes exactly as the
    QAT layer rounds it, multiplied with the weight codes by ``torch._int_mm`` (int8 x int8 -> int32, exact),
    and the int32 result is rescaled by the activation and weight scales. A convolution cannot fold the
    per-time-step activation scale out of its window sum, so ``int8_taps`` runs one GEMM of all k taps at once,
    ``(k*out, in) @ (in, T)``, scales every column by its time step's scale and sums the k shifted tap planes
    (overlap-adds them for the transposed conv). Per-group weight scales are accumulated group by group
    (Linear only; grouped-scale convolutions use ``weight_only``).
``int8_im2col`` (Conv1d trained with ``act_granularity="tensor"``)
    One activation scale per sample factors out of every window sum, so the convolution is a single int8 GEMM
    ``(out, in*k) @ (in*k, T)`` over the unfolded int8 input, rescaled once (2-3x faster than ``int8_taps``
    per layer; measured in docs/benchmarks.md). Per-sample Linear layers use the ``int8_gemm`` kernels and
    ConvTranspose1d ``int8_taps`` with the sample's scale broadcast over time.
``gather`` (Embedding)
    Gathers the code rows of the looked-up tokens and scales only those.
``weight_only``
    Any registered layer type: ``codes * scale`` is dequantized on the fly for each call, in the input's dtype,
    and the layer's own float op runs on it (for Conv2d and layers trained without activation quantization this
    is the only kernel). Nothing float is kept between calls, but every call rebuilds the float weight: at one
    token that takes several times as long as the float layer's own matrix-vector product (measured figures in
    docs/benchmarks.md). It is the path that is right everywhere (any device, autograd through the input).

Kernel choice. With ``kernel="auto"`` (default) `ternq.picker` chooses from the CPU's features and the call's
geometry, without timing anything, so the first call of a shape costs what a warm call costs; the choices are
recorded per process (`kernel_choices`, `reset_kernel_choices`). The int8 kernels keep their large
intermediates in per-thread scratch buffers (at most 16 MiB each) instead of allocating them in every call. Force
a kernel per layer (``packed_layer(..., kernel=...)`` or ``layer.kernel = "weight_only"``) or for the whole
process with the environment variable ``TERNQ_KERNEL`` = ``auto`` | ``weight_only`` | ``int8`` (the layer's
first integer kernel where it applies). A call that needs a gradient with respect to the input runs
``weight_only``.

Native kernels (`ternq.native`, float32 CPU inputs). Input norm + absmax + round + clamp run as one C pass per
layer instead of about ten eager ops, and the int32 results are rescaled (and, for convolutions, their taps
summed) in one pass; a Linear with at most a few rows runs a native GEMV (``int8_gemv``). Without a C compiler
(or with ``TERNQ_NATIVE=0``) the same kernels run in eager torch ops.

Storage (``storage=`` or ``TERNQ_STORAGE``). ``"int8"`` (default) keeps one int8 code per weight, already in the
layout its GEMM reads: 1/4 of the float32 weight, and the fastest. ``"packed"`` keeps ternary and int2 codes at
2 bits and int3/int4 codes at 4 bits per weight (1/16 or 1/8 of float32; wider codes stay int8) and unpacks them
to a transient int8 tensor in every call, about 0.1 ms per million weights on one core.

Tolerance. The weight codes are identical to the QAT layer's and int32 accumulation is exact. The eager
activation codes are the QAT layer's bit for bit; the native quantizer sums the norm's statistics in its own
order, so one activation code in a few thousand may differ by one step where the normalized value lies within
float32 rounding of a rounding boundary (`tests/test_runtime.py` bounds both). Beyond that, kernels differ
from the QAT layer only by float32 rounding: the order in which ``s_x * scale * sum(q * c)`` is rounded and
summed. `tests/test_runtime.py` checks every kernel
against the QAT layer with ``|y - y_qat| <= 1e-5 * (|x_q| @ |W_q|) + 1e-6`` elementwise (``x_q``, ``W_q`` the
fake-quantized input and weight), i.e. relative to the magnitude of the terms being summed.

Packed layers are for inference: the int8 kernels do not propagate gradients to the input (the bias still
gets its gradient).
"""
from __future__ import annotations

import copy
import math
import os
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import native, picker
from .config import QuantConfig
from .errors import ArchitectureMismatchError, FormatError
from .layers import LayerSpec, QuantMixin, _legacy_weight_hook, take_input
from .native import cpu_flags
from .packed_weight import PackedWeight
from .quantizers import _sample_dims, absmax, dequantize_weight, normalize_input, quantize_weight

__all__ = [
    "KERNEL_ENV",
    "STORAGE_ENV",
    "PackedLayer",
    "PackedLinear",
    "PackedConv1d",
    "PackedConv2d",
    "PackedConvTranspose1d",
    "PackedEmbedding",
    "packed_layer",
    "is_packed",
    "resident_bytes",
    "kernel_choices",
    "reset_kernel_choices",
    "cpu_flags",
]

KERNEL_ENV = "TERNQ_KERNEL"
STORAGE_ENV = "TERNQ_STORAGE"
WEIGHT_ONLY = "weight_only"
_ENV_KERNELS = ("auto", WEIGHT_ONLY, "int8")
_STORAGES = ("int8", "packed")

# ((layer class, geometry, storage), input bucket, dtype, device, threads) -> kernel name: a record of the
# picker's decisions (`kernel_choices`), not a cache (the picker decides without timing)
_CHOICES: dict[tuple[Any, ...], str] = {}
_GENERATION = [0]


def kernel_choices() -> dict[tuple[Any, ...], str]:
    """A copy of the kernels picked so far (`ternq.picker`), keyed by layer geometry and input-shape bucket."""
    return dict(_CHOICES)


def reset_kernel_choices() -> None:
    """Forget the recorded choices, and every layer's memo of its last one."""
    _CHOICES.clear()
    _GENERATION[0] += 1  # invalidates every layer's memo of its last choice


# --- sub-byte storage ------------------------------------------------------------------------------------------


def _storage_bits(config: QuantConfig) -> int:
    """Bits per code in packed storage: 2 for codes in [-1, 1], 4 up to [-7, 7], else 8."""
    return 2 if config.qmax <= 1 else 4 if config.qmax <= 7 else 8


def _pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Pack the last dim of int8 `codes` into bytes of 8 // bits two's-complement fields.

    Planar within each row: field i of byte j holds element ``i * width + j``, so unpacking is a few whole-row
    shifts (no interleaving) and rows stay separately addressable (an Embedding gathers packed rows).
    """
    per = 8 // bits
    *lead, n = codes.shape
    width = -(-n // per)
    planes = F.pad(codes.reshape(-1, n), (0, width * per - n)).view(-1, per, width)
    out = torch.zeros(planes.shape[0], width, dtype=torch.uint8, device=codes.device)
    mask = (1 << bits) - 1
    for i in range(per):
        out |= (planes[:, i].view(torch.uint8) & mask) << (bits * i)
    return out.view(*lead, width)


def _unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `_pack_rows`: int8 codes with last dim `n` (sign-extended by a left then arithmetic right shift)."""
    per = 8 // bits
    *lead, width = packed.shape
    src = packed.reshape(-1, width).view(torch.int8)
    out = torch.empty(src.shape[0], per, width, dtype=torch.int8, device=packed.device)
    for i in range(per):
        plane = out[:, i]
        up = 8 - bits * (i + 1)
        if up:
            torch.bitwise_left_shift(src, up, out=plane)
            plane.bitwise_right_shift_(8 - bits)
        else:
            torch.bitwise_right_shift(src, 8 - bits, out=plane)
    flat = out.view(src.shape[0], per * width)
    if per * width != n:
        flat = flat[:, :n]
    return flat.reshape(*lead, n)


# --- the packed layer ------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class PackedLayer:
    """Inference forward of every packed layer; the float class provides the layer's other attributes.

    Like the QAT layers, ``PackedLinear`` *is* an ``nn.Linear`` (same bias, hooks and hyperparameters), minus the
    float weight: it holds ``qweight`` (int8 codes in the kernel's layout, or packed bytes) and ``scale``
    (float32, the stored shape of `ternq.quantizers.weight_scale`), both non-persistent buffers, so
    ``state_dict()`` carries only the float parameters left (bias); `ternq.pack` reads ``.codes`` / ``.scale``.
    """

    kernels: tuple[str, ...] = (WEIGHT_ONLY,)  # in preference order; subclasses add integer kernels
    qconfig: QuantConfig
    spec: LayerSpec
    storage: str
    qweight: Tensor
    scale: Tensor

    # -- construction -------------------------------------------------------------------------------------------

    def _init_packed(self, codes: Tensor, scale: Tensor, config: QuantConfig, spec: LayerSpec,
                     kernel: str | None, storage: str | None, float_dtype: torch.dtype = torch.float32) -> None:
        self.qconfig = config
        self.spec = spec
        self._ternq_spec = spec  # what QuantMixin.quantize_input reads
        self._weight_shape = tuple(codes.shape)
        storage = storage if storage is not None else os.environ.get(STORAGE_ENV, "int8").strip() or "int8"
        if storage not in _STORAGES:
            raise ValueError(f"storage={storage!r}: expected one of {_STORAGES} (or set {STORAGE_ENV})")
        self.storage = storage
        self._int8_layout = self._integer_kernel_possible()
        layout = (self._to_layout(codes) if self._int8_layout else codes).contiguous()
        self._layout_shape = tuple(layout.shape)
        self._bits = _storage_bits(config) if storage == "packed" else 8
        qweight = layout if self._bits == 8 else _pack_rows(layout, self._bits)
        self.register_buffer("qweight", qweight, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("scale", scale.to(torch.float32).contiguous(), persistent=False)  # type: ignore[attr-defined]
        self.float_dtype = float_dtype  # the float weight's dtype: the output dtype of integer-index inputs
        self._forced: str | None = None
        self._last: str | None = None
        if kernel is not None and kernel != "auto":
            self.kernel = kernel

    def _integer_kernel_possible(self) -> bool:
        """Whether an integer kernel can ever run for this layer (decides the stored layout)."""
        return len(self.kernels) > 1

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
            return self.qweight
        return _unpack_rows(self.qweight, self._bits, self._layout_shape[-1])

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
        float checkpoint loads into a packed model); a `PackedWeight` brings its codes and scales."""
        key = prefix + self.spec.weight_name
        if key in state_dict:
            value = state_dict[key]
            if isinstance(value, PackedWeight):
                if value.layer is not self:
                    self._set_codes(value.layer.codes, value.layer.scale)
            elif tuple(value.shape) != self._weight_shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, the "
                                  f"shape in the packed layer is {self._weight_shape}")
            else:
                self._set_codes(*quantize_weight(value, self.qconfig, self.spec.weight_out_dim))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict,  # type: ignore[misc]
                                      missing_keys, unexpected_keys, error_msgs)

    def _set_codes(self, codes: Tensor, scale: Tensor) -> None:
        """Replace the stored codes and scales (same shapes), in this layer's layout and storage."""
        self._init_packed(codes.to(torch.int8), scale, self.qconfig, self.spec, self._forced, self.storage,
                          self.float_dtype)
        self.__dict__.pop("_memo", None)

    # -- kernel selection ---------------------------------------------------------------------------------------

    @property
    def kernel(self) -> str:
        """The forced kernel, else the one the last call ran ("auto" before the first call)."""
        return self._forced or self._last or "auto"

    @kernel.setter
    def kernel(self, name: str) -> None:
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
        """The kernel for this call. The layer memoizes its last automatic choice per input shape, dtype, device,
        thread count and $TERNQ_KERNEL: repeated calls of one shape (decoding token by token) skip the lookup,
        which costs ~10 us per call with caches cold after a GEMM."""
        if self._forced is None and not (torch.is_grad_enabled() and x.requires_grad):
            key = (x.shape, x.dtype, x.device, torch.get_num_threads(), os.environ.get(KERNEL_ENV), _GENERATION[0])
            memo = self.__dict__.get("_memo")
            if memo is not None and memo[0] == key:
                return memo[1]
            choice = self._pick_uncached(x, args, kwargs)
            self.__dict__["_memo"] = (key, choice)
            return choice
        return self._pick_uncached(x, args, kwargs)

    def _pick_uncached(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        applicable = self._applicable(x)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self._forced is not None:
            if self._forced not in applicable:
                raise ValueError(f"{type(self).__name__}.kernel={self._forced!r} cannot compute this input "
                                 f"(shape {tuple(x.shape)}, {x.dtype}); applicable: {applicable}")
            if needs_grad and self._forced != WEIGHT_ONLY:
                raise RuntimeError(f"kernel {self._forced!r} is inference-only and gives no gradient to the "
                                   f"input: run under torch.no_grad() or use kernel={WEIGHT_ONLY!r}")
            return self._forced
        env = os.environ.get(KERNEL_ENV, "auto").strip() or "auto"
        if env not in _ENV_KERNELS:
            raise ValueError(f"{KERNEL_ENV}={env!r}: expected one of {_ENV_KERNELS}")
        if env == WEIGHT_ONLY or needs_grad:
            return WEIGHT_ONLY
        fast = [k for k in applicable if k != WEIGHT_ONLY]
        if env == "int8" and fast:
            return fast[0]
        geometry = self.__dict__.get("_geometry_key")
        if geometry is None:
            geometry = self._geometry_key = (type(self).__name__, self._geometry(), self.storage)
        rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
        choice = picker.choose(applicable, rows)
        _CHOICES[(geometry, self._bucket(x), x.dtype, x.device.type, torch.get_num_threads())] = choice
        return choice

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        x, args = take_input(self.spec, args, kwargs)
        name = self._pick(x, args, kwargs)
        self.__dict__["_last"] = name  # not nn.Module.__setattr__: ~8 us per call with caches cold
        return getattr(self, "_k_" + name)(x, *args, **kwargs)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The QAT layer's input normalization and activation fake-quantization (float)."""
        return QuantMixin.quantize_input(self, x)  # type: ignore[arg-type]

    def _native_ok(self, x: Tensor) -> bool:
        """Whether the native kernels can take this input (float32 on CPU, codes of at most 8 bits)."""
        bias = getattr(self, "bias", None)
        return (x.dtype == torch.float32 and x.device.type == "cpu" and int(self.qconfig.act_bits or 0) <= 8
                and x.numel() > 0 and (bias is None or bias.dtype == torch.float32)
                and native.available())

    def _quantize_int8(self, x: Tensor, dim: int, pad: tuple[int, int] = (0, 0)) -> tuple[Tensor, Tensor]:
        """Integer activation codes (int8) and scales (per token, or per sample for ``act_granularity="tensor"``,
        broadcastable to `x`): the values the QAT layer rounds to. Channel-major inputs (``dim=1``) can be
        zero-padded in time by `pad` (left, right): the codes and per-step scales come back padded.

        One native pass (norm, absmax, round) where available; else eager torch, bit for bit the QAT values."""
        cfg = self.qconfig
        if self._native_ok(x):
            x = x.contiguous()
            per_sample = cfg.act_granularity == "tensor"
            if dim == 1 and x.dim() == 3:
                b, c, t = x.shape
                width = pad[0] + t + pad[1]
                q = torch.empty(b, c, width, dtype=torch.int8)
                s = torch.empty(b, 1, width if not per_sample else 1, dtype=torch.float32)
                if pad[0] or pad[1]:
                    q[:, :, :pad[0]] = 0
                    q[:, :, pad[0] + t:] = 0
                    if not per_sample:
                        s[:, :, :pad[0]] = 0
                        s[:, :, pad[0] + t:] = 0
                native.quantize_channels(x, cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                         per_sample, q, s.view(b, -1), pad[0])
                return q, s
            if dim in (-1, x.dim() - 1) and pad == (0, 0):
                n = x.shape[-1]
                rows = x.reshape(-1, n)
                q = torch.empty(rows.shape, dtype=torch.int8)
                s = torch.empty(rows.shape[0], dtype=torch.float32)
                # rows per scale: 1 per token; per sample, all rows of x[b] (3+-D) or of the whole input
                per = 1 if not per_sample else rows.shape[0] // x.shape[0] if x.dim() >= 3 else rows.shape[0]
                native.quantize_rows(rows, cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                     per, q, s)
                return q.view(x.shape), s.view(*x.shape[:-1], 1)  # per sample: equal scales within a sample
        q, s = self._quantize_eager(x, dim)
        if pad != (0, 0):
            if s.shape[-1] != 1 or q.shape[-1] == 1:  # per step: pad the scales with the codes
                s = F.pad(s.expand(*s.shape[:-1], q.shape[-1]), pad)
            q = F.pad(q, pad)
        return q, s

    def _quantize_eager(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """`_quantize_int8` in eager torch ops: exactly the QAT layer's normalization and rounding."""
        cfg = self.qconfig
        bits = int(cfg.act_bits)  # type: ignore[arg-type]
        x = normalize_input(x, cfg.input_norm, dim, cfg.eps)
        dims = (dim,) if cfg.act_granularity == "token" else _sample_dims(x)
        # = activation_scale(x, bits, dim, eps, granularity); for large inputs without materializing |x|:
        # max|x| = max(amax, -amin) exactly (fewer ops win for small ones)
        if x.numel() >= 1 << 15:
            s = torch.maximum(x.amax(dims, keepdim=True), x.amin(dims, keepdim=True).neg_())
        else:
            s = absmax(x, dims)
        s = s.clamp_(min=cfg.eps).div_(2 ** (bits - 1) - 1)
        t = torch.div(x, s, out=_scratch("act", tuple(x.shape), x.dtype, x.device)).round_()
        if x.dtype != torch.float32:  # in float32 |x / s| <= qmax * (1 + 2**-23): rounding cannot leave the range
            t.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return t.to(torch.int8), s.to(torch.float32)

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


def _int_mm(a: Tensor, b: Tensor, scratch: str | None = None) -> Tensor:
    """int8 x int8 -> int32 matrix product, into the thread's `scratch` buffer of that name if given (only valid
    until the next call using it). torch 2.13's CPU ``_int_mm`` returns garbage for K == 1: done by hand."""
    if a.shape[1] == 1:
        return a.to(torch.int32) * b.to(torch.int32)
    if scratch is None:
        return torch._int_mm(a, b)
    return torch._int_mm(a, b, out=_scratch(scratch, (a.shape[0], b.shape[1]), torch.int32, a.device))


_SCRATCH = threading.local()
_SCRATCH_MIN_BYTES = 128 << 10
_SCRATCH_MAX_BYTES = 16 << 20


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A per-thread buffer reused across calls for a kernel's intermediates.

    Fresh multi-megabyte temporaries in every call cost page faults (glibc returns them to the OS and maps them
    again), which made the Conv1d kernel up to 40% slower; a buffer of at most 16 MiB per name and thread stays
    allocated instead. Larger requests get a plain tensor.
    """
    numel = math.prod(shape)
    if not _SCRATCH_MIN_BYTES <= numel * dtype.itemsize <= _SCRATCH_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)  # small ones come from malloc's free lists
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    buf = pool.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buf = pool[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


class PackedLinear(PackedLayer, nn.Linear):
    """Packed nn.Linear; one ``torch._int_mm`` per call (per scale group for group scales), either
    ``int8_gemm``: ``x_q @ codes.T``, or ``int8_gemm_t``: ``(codes @ x_q.T).T``, with the weight as the GEMM's
    left operand, which oneDNN does not re-layout per call: about 2x faster for a few tokens, slower for many."""

    kernels = ("int8_gemm", "int8_gemm_t", "int8_gemv", WEIGHT_ONLY)

    def _integer_kernel_possible(self) -> bool:
        return self.qconfig.act_bits is not None

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        if self.qconfig.act_bits is not None and x.is_floating_point():
            if self._native_ok(x) and self.qconfig.granularity != "group":
                return self.kernels
            return ("int8_gemm", "int8_gemm_t", WEIGHT_ONLY)
        return (WEIGHT_ONLY,)

    def _k_int8_gemv(self, x: Tensor) -> Tensor:
        """One native call: quantize the rows, GEMV, rescale (the picker sends only a few rows here)."""
        cfg = self.qconfig
        n_in = x.shape[-1]
        rows = x.reshape(-1, n_in).contiguous()
        w = self._layout_codes()
        if self._bits != 8:
            w = w.contiguous()
        per = 1 if cfg.act_granularity == "token" else rows.shape[0] // x.shape[0] if x.dim() >= 3 else rows.shape[0]
        y = native.linear_rows(rows, cfg.input_norm, cfg.eps, int(cfg.act_bits), max(per, 1),  # type: ignore[arg-type]
                               w, self._wsum(w), self.scale, cfg.granularity == "channel", self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _wsum(self, w: Tensor) -> Tensor | None:
        """Row sums of the codes (int32), cached beside them: the native GEMV multiplies x + 128 as unsigned
        bytes and subtracts 128 * row sum (4 bytes per output row)."""
        key = (self.qweight.data_ptr(), self.qweight._version)
        cached = self.__dict__.get("_wsum_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_wsum_cache"] = (key, w.sum(1, dtype=torch.int32))
        return cached[1]

    def _bucket(self, x: Tensor) -> tuple[int, ...]:
        return (_pow2(x.numel() // max(x.shape[-1], 1)),)

    def _k_int8_gemm(self, x: Tensor) -> Tensor:
        return self._int8_linear(x, weight_first=False)

    def _k_int8_gemm_t(self, x: Tensor) -> Tensor:
        return self._int8_linear(x, weight_first=True)

    def _int8_linear(self, x: Tensor, weight_first: bool) -> Tensor:
        n_in = x.shape[-1]
        if self.qconfig.granularity != "group" and self._native_ok(x):
            q, s = self._quantize_int8(x, -1)
            a = q.view(-1, n_in)
            w = self._layout_codes()
            if weight_first:
                acc = _int_mm(w, a.t(), "linear")
            else:
                acc = _int_mm(a, w.t(), "linear")
            y = native.linear_epilogue(acc, weight_first, s.view(-1), self.scale,
                                       self.qconfig.granularity == "channel", self.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        q, s = self._quantize_int8(x, -1)
        a = q.reshape(-1, n_in)
        s = s.expand(*x.shape[:-1], 1).reshape(-1, 1)  # per-sample scales: one per row too
        w = self._layout_codes()  # (out, in)

        def product(lo: int, hi: int) -> Tensor:
            """float32 (tokens, out) = a[:, lo:hi] @ w[:, lo:hi].T, exact."""
            if not weight_first:
                return _int_mm(a[:, lo:hi], w[:, lo:hi].t(), "linear").to(torch.float32)
            r = _int_mm(w[:, lo:hi], a[:, lo:hi].t(), "linear")  # (out, tokens)
            if r.shape[1] == 1:
                return r.view(1, -1).to(torch.float32)
            return torch.empty(r.shape[1], r.shape[0], dtype=torch.float32, device=r.device).copy_(r.t())

        cfg = self.qconfig
        if cfg.granularity == "group":
            size = cfg.group_size
            y = product(0, size).mul_(self.scale[:, 0])
            for g in range(1, self.scale.shape[1]):
                y.add_(product(g * size, (g + 1) * size).mul_(self.scale[:, g]))
            factor = s
        else:
            y = product(0, n_in)
            if cfg.granularity == "tensor":
                factor = s * self.scale
            else:
                y.mul_(self.scale)
                factor = s
        y = y.mul_(factor) if self.bias is None else torch.addcmul(self.bias, y, factor)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


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

    def _tap_gemm(self, weight: Tensor, q: Tensor, s: Tensor) -> Tensor:
        """(k, out_g, T) float: ``s[t] * sum_c codes[tap, o, c] * q[c, t]`` for every tap; T a multiple of 16."""
        k, out_g, in_g = weight.shape
        r = _int_mm(weight.reshape(k * out_g, in_g), q, "taps")
        taps = _scratch("taps_float", tuple(r.shape), torch.float32, r.device).copy_(r)
        return taps.mul_(s).view(k, out_g, q.shape[-1])

    @staticmethod
    def _chunk(rows: int) -> int:
        """Time steps per GEMM: keeps the (rows, chunk) int32/float intermediates near 1 MiB (L2-resident)
        and bounds the extra memory of long inputs."""
        return max(64, (_CHUNK_BYTES // (4 * rows)) // 16 * 16)

    def _scale_and_bias(self, y: Tensor) -> Tensor:
        if self.qconfig.granularity == "channel":
            n = self.scale.shape[0]
            y.view(y.shape[0], -1, n, y.shape[-1]).mul_(self.scale.view(1, 1, n, 1))
        if self.bias is not None:  # type: ignore[attr-defined]
            y.add_(self.bias.view(1, -1, 1))  # type: ignore[attr-defined]
        return y


def _align16(n: int) -> int:
    """GEMM widths are rounded up to 16 columns: oneDNN's int8 GEMM is 2-3x slower on other widths."""
    return -(-n // 16) * 16


_CHUNK_BYTES = 1 << 20
_IM2COL_BYTES = 4 << 20  # im2col's (in*k, T) int8 columns / (out, T) int32 products per chunk


class PackedConv1d(_PackedConv1dBase, nn.Conv1d):
    """Packed nn.Conv1d. Per-token activation scales: ``int8_direct`` (native: the convolution accumulated tap
    by tap in registers, each tap's int32 sums scaled by the scales of the steps it read, no tap planes in
    memory) or ``int8_taps`` (one int8 GEMM of all taps, per-step scales, shifted tap sum); per-sample scales
    (``act_granularity="tensor"``): ``int8_im2col``, the convolution as one int8 GEMM ``(out, in*k) @ (in*k, T)``
    over the unfolded input, rescaled once by the sample's scale.

    Per-token codes are stored as (groups, k, out/groups, in/groups): the tap-major layout both kernels read."""

    kernels = ("int8_direct", "int8_taps", "int8_im2col", WEIGHT_ONLY)

    def _config_kernels(self) -> tuple[str, ...]:
        return ("int8_im2col", WEIGHT_ONLY) if self._im2col() else ("int8_direct", "int8_taps", WEIGHT_ONLY)

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

    def _k_int8_direct(self, x: Tensor) -> Tensor:
        cfg = self.qconfig
        left, right = self._reversed_padding_repeated_twice
        k, dilation, stride = self.kernel_size[0], self.dilation[0], self.stride[0]
        span = dilation * (k - 1)
        t_out = (x.shape[-1] + left + right - span - 1) // stride + 1
        if t_out < 1:
            raise RuntimeError(f"{type(self).__name__}: input of length {x.shape[-1]} is shorter than the "
                               f"kernel's reach {span + 1} after padding")
        in_g, out_g = self.in_channels // self.groups, self.out_channels // self.groups
        xg, s = native.quantize_grouped(x, cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                        cfg.act_granularity == "tensor", in_g, left, right)
        weight = self._layout_codes()
        per_channel = cfg.granularity == "channel"
        y = torch.empty(x.shape[0], self.out_channels, t_out, dtype=torch.float32)
        for g in range(self.groups):
            rows = slice(g * out_g, (g + 1) * out_g)
            wscale = self.scale[rows] if per_channel else self.scale
            bias = None if self.bias is None else self.bias[rows]
            w = weight[g].contiguous()
            for b in range(x.shape[0]):
                native.conv1d_grouped(xg[b, g], w, k, dilation, stride, t_out, s[b], wscale, per_channel, bias,
                                      y[b, rows])
        return y

    def _k_int8_im2col(self, x: Tensor) -> Tensor:
        q, s = self._quantize_int8(x, 1)  # (B, C, T) int8, (B, 1, 1)
        left, right = self._reversed_padding_repeated_twice
        if self.padding_mode != "zeros" and (left or right):
            index = torch.arange(q.shape[-1], dtype=torch.float32, device=q.device).view(1, 1, -1)
            index = F.pad(index, (left, right), mode=self.padding_mode).view(-1).long()
            q = q.index_select(2, index)
            left = right = 0
        k, dilation, stride = self.kernel_size[0], self.dilation[0], self.stride[0]
        span = dilation * (k - 1)
        t_pad = q.shape[-1] + left + right
        t_out = (t_pad - span - 1) // stride + 1
        if t_out < 1:
            raise RuntimeError(f"{type(self).__name__}: input of length {x.shape[-1]} is shorter than the "
                               f"kernel's reach {span + 1} after padding")
        weight = self._layout_codes()
        groups, out_g, cols = weight.shape
        in_g = cols // k
        chunk = max(64, (_IM2COL_BYTES // max(4 * out_g, cols)) // 16 * 16)
        # zero columns on the right let every chunk read a 16-aligned width of output steps
        reach = (_align16(t_out) - 1) * stride + span + 1
        q = F.pad(q, (left, right + max(0, reach - t_pad)))
        factor = s.reshape(-1, 1, 1) * (self.scale.view(1, -1, 1) if self.qconfig.granularity == "channel"
                                        else self.scale.view(1, 1, 1))
        bias = None if self.bias is None else self.bias.view(-1, 1)
        y = torch.empty(x.shape[0], groups * out_g, t_out, dtype=torch.float32, device=x.device)
        for b in range(x.shape[0]):
            for g in range(groups):
                rows = slice(g * out_g, (g + 1) * out_g)
                f = factor[b, rows] if factor.shape[1] > 1 else factor[b]
                for t0 in range(0, t_out, chunk):
                    n = min(chunk, t_out - t0)
                    width = _align16(n)
                    start = t0 * stride
                    window = q[b, g * in_g:(g + 1) * in_g, start:start + (width - 1) * stride + span + 1]
                    unfolded = window.unfold(1, span + 1, stride)[:, :, ::dilation]  # (in_g, width, k)
                    col = _scratch("im2col", (in_g, k, width), torch.int8, x.device)
                    col.copy_(unfolded.transpose(1, 2))
                    r = _int_mm(weight[g], col.view(in_g * k, width), "im2col_out")[:, :n]
                    # convert, then scale and add in place: 2.4x faster than one mixed-dtype addcmul here
                    dst = y[b, rows, t0:t0 + n].copy_(r).mul_(f)
                    if bias is not None:
                        dst.add_(bias[rows])
        return y.to(x.dtype)

    def _k_int8_taps(self, x: Tensor) -> Tensor:
        if self._native_ok(x) and (self.padding_mode == "zeros" or not any(self._reversed_padding_repeated_twice)):
            return self._native_taps(x)
        q, s = self._quantize_int8(x, 1)  # (B, C, T) int8, (B, 1, T) or per sample (B, 1, 1)
        s = s.expand(-1, -1, q.shape[-1])
        if self.qconfig.granularity == "tensor":
            s = s * self.scale
        left, right = self._reversed_padding_repeated_twice
        t_pad = q.shape[-1] + left + right
        if self.padding_mode != "zeros" and (left or right):
            index = torch.arange(q.shape[-1], dtype=torch.float32, device=q.device).view(1, 1, -1)
            index = F.pad(index, (left, right), mode=self.padding_mode).view(-1).long()
            q, s = q.index_select(2, index), s.index_select(2, index)
            left = right = 0
        # zero columns on the right let every chunk read a 16-aligned width
        q, s = F.pad(q, (left, right + 16)), F.pad(s, (left, right + 16))
        k, dilation, stride = self.kernel_size[0], self.dilation[0], self.stride[0]
        span = dilation * (k - 1)
        t_out = (t_pad - span - 1) // stride + 1
        if t_out < 1:
            raise RuntimeError(f"{type(self).__name__}: input of length {x.shape[-1]} is shorter than the "
                               f"kernel's reach {span + 1} after padding")
        weight = self._layout_codes()
        groups, _, out_g, in_g = weight.shape
        chunk = self._chunk(k * out_g) // stride or 1
        y = torch.empty(x.shape[0], groups * out_g, t_out, dtype=torch.float32, device=x.device)
        for b in range(x.shape[0]):
            for g in range(groups):
                rows = q[b, g * in_g:(g + 1) * in_g]
                for t0 in range(0, t_out, chunk):
                    n = min(chunk, t_out - t0)
                    start, width = t0 * stride, _align16((n - 1) * stride + span + 1)
                    taps = self._tap_gemm(weight[g], rows[:, start:start + width], s[b, :, start:start + width])
                    shifted = taps.as_strided((k, out_g, n), (out_g * width + dilation, width, stride))
                    torch.sum(shifted, 0, out=y[b, g * out_g:(g + 1) * out_g, t0:t0 + n])
        return self._scale_and_bias(y).to(x.dtype)


    def _native_taps(self, x: Tensor) -> Tensor:
        """`int8_taps` with the native quantizer (codes written straight into the zero-padded buffer) and the
        native tap sum (int32 taps -> scaled, summed, rescaled output in one pass)."""
        left, right = self._reversed_padding_repeated_twice
        k, dilation, stride = self.kernel_size[0], self.dilation[0], self.stride[0]
        span = dilation * (k - 1)
        t_pad = x.shape[-1] + left + right
        t_out = (t_pad - span - 1) // stride + 1
        if t_out < 1:
            raise RuntimeError(f"{type(self).__name__}: input of length {x.shape[-1]} is shorter than the "
                               f"kernel's reach {span + 1} after padding")
        q, s = self._quantize_int8(x, 1, (left, right + 16))  # zero columns: 16-aligned chunk widths
        if s.shape[-1] != q.shape[-1]:  # one scale per sample: the tap sum reads one per step
            s = s.expand(-1, -1, q.shape[-1]).contiguous()
        weight = self._layout_codes()
        groups, _, out_g, in_g = weight.shape
        per_channel = self.qconfig.granularity == "channel"
        chunk = self._chunk(k * out_g) // stride or 1
        y = torch.empty(x.shape[0], groups * out_g, t_out, dtype=torch.float32)
        for g in range(groups):
            w = weight[g].reshape(k * out_g, in_g)
            rows = slice(g * out_g, (g + 1) * out_g)
            wscale = self.scale[rows] if per_channel else self.scale
            bias = None if self.bias is None else self.bias[rows]
            for b in range(x.shape[0]):
                for t0 in range(0, t_out, chunk):
                    n = min(chunk, t_out - t0)
                    start, width = t0 * stride, _align16((n - 1) * stride + span + 1)
                    acc = _int_mm(w, q[b, g * in_g:(g + 1) * in_g, start:start + width], "taps")
                    native.tap_sum(acc, k, s[b, 0, start:], n, stride, dilation, wscale, per_channel, bias,
                                   y[b, rows, t0:])
        return y


class PackedConvTranspose1d(_PackedConv1dBase, nn.ConvTranspose1d):
    """Packed nn.ConvTranspose1d; ``int8_taps``: one int8 GEMM of all taps, per-step scales, overlap-add."""

    def _to_layout(self, codes: Tensor) -> Tensor:
        in_ch, out_g, k = codes.shape
        return codes.view(self.groups, in_ch // self.groups, out_g, k).permute(0, 3, 2, 1)

    def _from_layout(self, stored: Tensor) -> Tensor:
        groups, k, out_g, in_g = stored.shape
        return stored.permute(0, 3, 2, 1).reshape(groups * in_g, out_g, k)

    def _k_int8_taps(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 1,
                                              self.dilation)
        use_native = self._native_ok(x)
        q, s = self._quantize_int8(x, 1, (0, 16))  # 16-aligned chunk widths; (B, 1, T + 16) or per sample (B, 1, 1)
        s = s.expand(-1, -1, q.shape[-1])
        if self.qconfig.granularity == "tensor":
            s = s * self.scale
        elif use_native:
            s = s.contiguous()
        t_in = q.shape[-1] - 16
        k, dilation, stride, pad = self.kernel_size[0], self.dilation[0], self.stride[0], self.padding[0]
        t_full = (t_in - 1) * stride + dilation * (k - 1) + 1
        t_out = t_full - 2 * pad + output_padding[0]
        if t_out < 1:
            raise RuntimeError(f"{type(self).__name__}: output length {t_out} < 1 for input length {t_in}")
        weight = self._layout_codes()
        groups, _, out_g, in_g = weight.shape
        chunk = self._chunk(k * out_g)
        y = torch.empty(x.shape[0], groups * out_g, t_out, dtype=torch.float32, device=x.device)
        full = torch.empty(out_g, max(t_full, pad + t_out), dtype=torch.float32, device=x.device)
        for b in range(x.shape[0]):
            for g in range(groups):
                rows = q[b, g * in_g:(g + 1) * in_g]
                full.zero_()
                for t0 in range(0, t_in, chunk):
                    n = min(chunk, t_in - t0)
                    width = _align16(n)
                    if use_native:  # scale and overlap-add the int32 taps in one pass
                        acc = _int_mm(weight[g].reshape(k * out_g, in_g), rows[:, t0:t0 + width], "taps")
                        native.tap_scatter(acc, k, s[b, 0, t0:], n, stride, dilation, full, t0 * stride)
                        continue
                    taps = self._tap_gemm(weight[g], rows[:, t0:t0 + width], s[b, :, t0:t0 + width])
                    reach = stride * (n - 1) + 1
                    for j in range(k):
                        begin = t0 * stride + j * dilation
                        full[:, begin:begin + reach:stride].add_(taps[j, :, :n])
                y[b, g * out_g:(g + 1) * out_g] = full[:, pad:pad + t_out]
        return self._scale_and_bias(y).to(x.dtype)


class PackedConv2d(PackedLayer, nn.Conv2d):
    """Packed nn.Conv2d: weight_only (BitTTS is 1-D; a per-pixel int8 formulation is not implemented)."""


class PackedEmbedding(PackedLayer, nn.Embedding):
    """Packed nn.Embedding; ``gather``: gathers the looked-up code rows and scales only those."""

    kernels = ("gather", WEIGHT_ONLY)

    def _integer_kernel_possible(self) -> bool:
        return True

    def _applicable(self, x: Tensor) -> tuple[str, ...]:
        return self.kernels if self.max_norm is None else (WEIGHT_ONLY,)  # max_norm renormalizes the table

    def _k_gather(self, x: Tensor) -> Tensor:
        packed_rows = F.embedding(x, self.qweight)
        rows = packed_rows if self._bits == 8 else _unpack_rows(packed_rows, self._bits, self._layout_shape[-1])
        out = rows.to(torch.float32)
        cfg = self.qconfig
        if cfg.granularity == "tensor":
            out.mul_(self.scale)
        elif cfg.granularity == "channel":
            out.mul_(self.scale[x].unsqueeze(-1))
        else:
            expanded = self.scale[x].repeat_interleave(cfg.group_size, dim=-1)[..., :out.shape[-1]]
            out.mul_(expanded)
        return out.to(self.float_dtype)


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


def is_packed(module: nn.Module) -> bool:
    """True for a layer made by `packed_layer`."""
    return isinstance(module, PackedLayer)


def _weight_shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    """Shape of the float weight without computing it (a parametrization would allocate it)."""
    if isinstance(module, PackedLayer):
        return module._weight_shape
    if parametrize.is_parametrized(module, name):
        originals = [t for t in module.parametrizations[name].parameters()]  # type: ignore[union-attr,index]
        return tuple(max(originals, key=lambda t: t.numel()).shape) if originals else None
    hook = _legacy_weight_hook(module, name)
    if hook is not None:
        for suffix in ("_v", "_orig"):
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
    hook = _legacy_weight_hook(module, name)
    if hook is not None:
        for suffix in ("_v", "_orig"):
            t = getattr(module, name + suffix, None)
            if isinstance(t, Tensor):
                return t.dtype
    t = module._parameters.get(name, module._buffers.get(name, getattr(module, name, None)))
    return t.dtype if isinstance(t, Tensor) and t.is_floating_point() else torch.float32


def _expected_scale_shape(shape: tuple[int, ...], config: QuantConfig, out_dim: int) -> tuple[int, ...]:
    rows = 1 if len(shape) <= 1 else shape[out_dim]
    fan_in = math.prod(shape) // max(rows, 1)
    if config.granularity == "tensor":
        return (1,)
    if config.granularity == "channel":
        return (rows,)
    return (rows, -(-fan_in // config.group_size))


def _strip_float_weight(layer: nn.Module, source: nn.Module, name: str) -> None:
    """Remove the float weight and whatever computes it (parametrizations, legacy weight_norm / spectral_norm)
    from `layer`, a shallow clone of `source`; other parametrized tensors become plain parameters."""
    if parametrize.is_parametrized(source):
        others = [n for n in source.parametrizations if n != name]  # type: ignore[union-attr]
        del layer._modules["parametrizations"]
        for other in others:
            layer.register_parameter(other, nn.Parameter(getattr(source, other).detach(), requires_grad=False))
    hook = _legacy_weight_hook(source, name)
    if hook is not None:
        for hook_id, h in list(layer._forward_pre_hooks.items()):
            if h is hook:
                del layer._forward_pre_hooks[hook_id]
        for suffix in ("_g", "_v", "_orig", "_u"):
            layer._parameters.pop(name + suffix, None)
            layer._buffers.pop(name + suffix, None)
        layer._state_dict_hooks.clear()
        layer._load_state_dict_pre_hooks.clear()
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
        scale: float scales in their stored shape (see `ternq.quantizers.weight_scale`).
        config: the layer's quantization config (granularity, act_bits, input_norm as trained).
        spec: the layer type's `LayerSpec` (`ternq.layers.layer_spec(float_module)`).
        kernel: "auto" (default: fastest measured per input shape), "weight_only", or a kernel of the layer's
            class (``PackedLinear.kernels`` ...).
        storage: "int8" (default; fastest) or "packed" (2 / 4 bits per weight, unpacked per call);
            defaults to ``$TERNQ_STORAGE``.
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
    expected = _expected_scale_shape(tuple(codes.shape), config, spec.weight_out_dim)
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
    for attr in ("qweight", "scale", "codes"):
        if is_packed(float_module):
            break  # re-packing a packed layer: its own storage is replaced
        if attr in float_module._parameters or attr in float_module._buffers or attr in float_module._modules:
            raise ValueError(f"packed_layer: {type(float_module).__name__} already has a member {attr!r}, which "
                             "a packed layer needs for its own storage")
    cls = _packed_class(spec.float_type)
    layer = cls.__new__(cls)
    # copies of the float module's dicts, of their own type: hook dicts are OrderedDicts, which
    # register_forward_hook's RemovableHandle references weakly (a plain dict copy broke every hook registration)
    layer.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in float_module.__dict__.items()})
    _strip_float_weight(layer, float_module, name)  # type: ignore[arg-type]
    for attr in ("qweight", "scale"):
        layer._buffers.pop(attr, None)
    layer.__dict__.pop("_geometry_key", None)  # re-packing: the storage may change
    layer.__dict__.pop("_memo", None)
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
