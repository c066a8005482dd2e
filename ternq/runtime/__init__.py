"""Packed inference layers: ternary / k-bit weights kept as int8 codes (or 2/4-bit packed) plus scales.

`packed_layer` turns a float layer plus its integer codes and scales into an inference layer that never holds a
float copy of the weight and computes what the QAT layer computes in eval mode (input norm, absmax activation
quantization, ``codes * scale`` weight). The modules here are thin: they hold the codes in the layout their
kernels read, answer like the float layer (``.weight`` is a `ternq.runtime.packed_weight.PackedWeight` with the float
weight's dtype / shape / device, hooks, state_dict keys) and send each call to one kernel:

* `ternq.runtime.kernels`: the kernels, free functions (``int8_gemv`` / ``int8_tiled`` / ``int8_gemm`` /
  ``int8_gemm_t`` for Linear, ``int8_direct`` / ``int8_taps`` / ``int8_im2col`` for Conv1d, ``int8_direct`` /
  ``int8_taps`` for ConvTranspose1d, ``gather`` for Embedding), all starting from one activation quantizer and
  one convolution prelude;
* `ternq.runtime.picker`: which kernel, from the CPU's features and the call's geometry, never by timing, so the first
  call of a shape costs what a warm call costs; the decisions are recorded (`kernel_choices`);
* `ternq.runtime.native`: the C kernels behind the fast paths (input norm + absmax + round in one pass, the direct
  int8 convolution, the one-call GEMV, the GEMV on 2-bit rows read as stored, the tiled GEMM on AMX / VNNI), built once per machine, with an
  eager torch fallback;
* `ternq.runtime.storage`: the in-memory sub-byte layout of ``storage="packed"``.

``weight_only`` runs on any registered layer type: ``codes * scale`` dequantized for the call, in the input's
dtype, and the layer's own float op (for Conv2d and layers trained without activation quantization it is the
only kernel; a call that needs a gradient with respect to the input runs it too).

The options, ``storage`` ("auto", "int8" or "packed" sub-byte codes) and ``kernel`` (the picker's choice or a forced
one), are arguments of `ternq.load_packed` and `packed_layer`; docs/runtime.md describes them and the
environment variables that override them.

Tolerance. The weight codes are identical to the QAT layer's and int32 accumulation is exact. The eager
activation codes are the QAT layer's bit for bit; the native quantizer sums the norm's statistics in its own
order, so an activation code may differ by one step where the normalized value lies within float32 rounding of
a rounding boundary (`tests/test_runtime.py` allows at most one in a thousand, and no larger difference; on the
shipped BitTTS model the native and eager waveforms differ by 50 dB SNR). Beyond that, kernels differ from the
arithmetic on those codes only by float32 rounding: ``|y - y_ref| <= 1e-5 * (|x_q| @ |W_q|) + 1e-6``
elementwise (``x_q``, ``W_q`` the fake-quantized input and weight), relative to the magnitude of the terms
being summed. A NaN or Inf in a token gives it a non-finite activation scale, so the outputs reading it are
non-finite on every kernel, as in the QAT layer; an empty batch gives the QAT layer's empty output
(docs/runtime.md: limits, environment variables, the native kernel cache).

Packed layers are for inference: the int8 kernels do not propagate gradients to the input (the bias still
gets its gradient).
"""
from __future__ import annotations

from .functional import PackedFunctional, PackedWeightOnly
from .layers import (
    STORAGE_ENV,
    STORAGE_POLICIES,
    STORAGES,
    PackedConv1d,
    PackedConv2d,
    PackedConvTranspose1d,
    PackedEmbedding,
    PackedLayer,
    PackedLinear,
    is_packed,
    kernel_choices,
    leaky_relu_then,
    packed_layer,
    reset_kernel_choices,
    resident_bytes,
)
from .native import cpu_flags
from .picker import KERNEL_ENV, KERNEL_POLICIES

__all__ = [
    "KERNEL_ENV",
    "KERNEL_POLICIES",
    "STORAGE_ENV",
    "STORAGES",
    "STORAGE_POLICIES",
    "PackedLayer",
    "PackedLinear",
    "PackedConv1d",
    "PackedConv2d",
    "PackedConvTranspose1d",
    "PackedEmbedding",
    "PackedFunctional",
    "PackedWeightOnly",
    "packed_layer",
    "is_packed",
    "resident_bytes",
    "kernel_choices",
    "reset_kernel_choices",
    "leaky_relu_then",
    "cpu_flags",
]
