"""The packed layers' kernels, as free functions of (input, codes in their stored layout, scales, bias, config).

Every integer kernel starts from the same activation codes (`quantize_activations`: input norm, absmax scale,
round; one native pass where `ternq.native` is built, else eager torch ops that are the QAT layer's bit for
bit), and every convolution from the same prelude (`conv_plan`: padding, output length, the too-short error).
The packed modules in `ternq.runtime` only hold codes and pick a kernel (`ternq.runtime.picker`); the arithmetic lives
here, where it can be tested and benchmarked without a module around it.

Kernels (names as the layers list them):

``int8_gemv`` / ``int8_gemm`` / ``int8_gemm_t`` (Linear)
    A few rows: one native call (quantize, GEMV, rescale). More: ``torch._int_mm`` (int8 x int8 -> int32,
    exact) as ``x_q @ codes.T`` or ``(codes @ x_q.T).T`` (the weight as the left operand, which oneDNN does not
    re-layout per call), then one native rescale pass (or eager ops; per-group scales accumulate group by group).
``int8_tiled`` (Linear, native)
    Many rows: one native call (quantize, int8 GEMM on a copy of the codes packed once into the GEMM's tiles, or on
    the 2-bit rows decoded per thread into a cache-sized panel; AMX or AVX-512 VNNI where present, rescale in the
    store); the ``int8_gemm`` result bit for bit.
``int8_direct`` (Conv1d, ConvTranspose1d of dilation 1; native)
    The convolution accumulated tap by tap in registers, each tap's int32 sums scaled by the scales of the steps
    it read: no intermediate planes in memory; parallel over blocks of output channels and of time. A transposed
    convolution of stride u runs as u interleaved stride-1 convolutions (its phases).
``int8_taps`` (Conv1d, ConvTranspose1d)
    A convolution cannot fold per-step activation scales out of its window sum, so one GEMM of all k taps,
    ``(k*out, in) @ (in, T)``, then every column scaled by its step's scale and the k shifted tap planes summed
    (overlap-added for the transposed conv).
``int8_im2col`` (Conv1d, ``act_granularity="tensor"``)
    One scale per sample factors out of every window sum: one int8 GEMM ``(out, in*k) @ (in*k, T)`` over the
    unfolded input, rescaled once.
``gather`` (Embedding)
    The looked-up code rows, scaled.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import QuantConfig
from ..qat.quantizers import absmax, normalize_input, sample_dims
from . import native
from .storage import unpack_rows

__all__ = ["Conv1dGeometry", "conv_plan", "native_ok", "quantize_activations", "quantize_eager", "int_mm",
           "linear_gemv", "linear_gemv_bound", "linear_tiled_bound", "linear_int8", "int_mm_2bit",
           "conv1d_direct", "conv1d_direct_bound", "direct_weights", "conv1d_taps", "conv1d_im2col",
           "conv_transpose1d_direct", "conv_transpose1d_direct_bound", "conv_transpose1d_taps",
           "embedding_gather"]

_SCRATCH = threading.local()
_SCRATCH_MIN_BYTES = 128 << 10
_SCRATCH_MAX_BYTES = 16 << 20
_CHUNK_BYTES = 1 << 20
_IM2COL_BYTES = 4 << 20  # im2col's (in*k, T) int8 columns / (out, T) int32 products per chunk
_TILE_BYTES = 512 << 10  # int8 weight rows decoded from 2-bit rows per GEMM (int_mm_2bit): stays in L2


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
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


def int_mm(a: Tensor, b: Tensor, buffer: str | None = None) -> Tensor:
    """int8 x int8 -> int32 matrix product, into the thread's scratch `buffer` of that name if given (only valid
    until the next call using it). torch 2.13's CPU ``_int_mm`` returns garbage for K == 1: done by hand."""
    if a.shape[1] == 1:
        return a.to(torch.int32) * b.to(torch.int32)
    if buffer is None:
        return torch._int_mm(a, b)
    return torch._int_mm(a, b, out=scratch(buffer, (a.shape[0], b.shape[1]), torch.int32, a.device))


def _align16(n: int) -> int:
    """GEMM widths are rounded up to 16 columns: oneDNN's int8 GEMM is 2-3x slower on other widths."""
    return -(-n // 16) * 16


def _chunk(rows: int) -> int:
    """Time steps per tap GEMM: keeps the (rows, chunk) int32/float intermediates near 1 MiB (L2-resident)
    and bounds the extra memory of long inputs."""
    return max(64, (_CHUNK_BYTES // (4 * rows)) // 16 * 16)


# --- activations -----------------------------------------------------------------------------------------------


def native_ok(x: Tensor, cfg: QuantConfig, bias: Tensor | None = None) -> bool:
    """Whether the native kernels can take this call (float32 CPU input and bias, codes of at most 8 bits)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and int(cfg.act_bits or 0) <= 8
            and x.numel() > 0 and (bias is None or bias.dtype == torch.float32) and native.available())


def quantize_activations(x: Tensor, cfg: QuantConfig, dim: int,
                         pad: tuple[int, int] = (0, 0)) -> tuple[Tensor, Tensor]:
    """Integer activation codes (int8) and scales (per token, or per sample for ``act_granularity="tensor"``,
    broadcastable to `x`): the values the QAT layer rounds to. Channel-major inputs (``dim=1``) can be
    zero-padded in time by `pad` (left, right): the codes and per-step scales come back padded.

    One native pass (norm, absmax, round) where available; else `quantize_eager`."""
    if native_ok(x, cfg):
        x = x.contiguous()
        bits = int(cfg.act_bits)  # type: ignore[arg-type]
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
            native.quantize_channels(x, cfg.input_norm, cfg.eps, bits, per_sample, q, s.view(b, -1), pad[0])
            return q, s
        if dim in (-1, x.dim() - 1) and pad == (0, 0):
            n = x.shape[-1]
            rows = x.reshape(-1, n)
            q = torch.empty(rows.shape, dtype=torch.int8)
            s = torch.empty(rows.shape[0], dtype=torch.float32)
            native.quantize_rows(rows, cfg.input_norm, cfg.eps, bits, _rows_per_scale(x, cfg), q, s)
            return q.view(x.shape), s.view(*x.shape[:-1], 1)  # per sample: equal scales within a sample
    q, s = quantize_eager(x, cfg, dim)
    if pad != (0, 0):
        if s.shape[-1] != 1 or q.shape[-1] == 1:  # per step: pad the scales with the codes
            s = F.pad(s.expand(*s.shape[:-1], q.shape[-1]), pad)
        q = F.pad(q, pad)
    return q, s


def _rows_per_scale(x: Tensor, cfg: QuantConfig) -> int:
    """Rows of ``x.reshape(-1, features)`` that share a scale: 1 per token; per sample, all rows of x[b] (3+-D
    inputs) or of the whole input."""
    rows = x.numel() // max(x.shape[-1], 1)
    if cfg.act_granularity == "token":
        return 1
    return max(1, rows // max(x.shape[0], 1) if x.dim() >= 3 else rows)  # an empty batch: no rows


def quantize_eager(x: Tensor, cfg: QuantConfig, dim: int) -> tuple[Tensor, Tensor]:
    """`quantize_activations` in eager torch ops: exactly the QAT layer's normalization and rounding."""
    bits = int(cfg.act_bits)  # type: ignore[arg-type]
    x = normalize_input(x, cfg.input_norm, dim, cfg.eps)
    dims = (dim,) if cfg.act_granularity == "token" else sample_dims(x)
    # = activation_scale(x, bits, dim, eps, granularity); for large inputs without materializing |x|:
    # max|x| = max(amax, -amin) exactly (fewer ops win for small ones)
    if x.numel() >= 1 << 15:
        s = torch.maximum(x.amax(dims, keepdim=True), x.amin(dims, keepdim=True).neg_())
    else:
        s = absmax(x, dims)
    s = s.clamp_(min=cfg.eps).div_(2 ** (bits - 1) - 1)
    t = torch.div(x, s, out=scratch("act", tuple(x.shape), x.dtype, x.device)).round_()
    if x.dtype != torch.float32:  # in float32 |x / s| <= qmax * (1 + 2**-23): rounding cannot leave the range
        t.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return t.to(torch.int8), s.to(torch.float32)


# --- Linear ----------------------------------------------------------------------------------------------------


def linear_gemv(x: Tensor, w: Tensor, wsum: Tensor | None, scale: Tensor, bias: Tensor | None,
                cfg: QuantConfig) -> Tensor:
    """``int8_gemv``: one native call (quantize the rows, GEMV, rescale); w (out, in) int8 codes, or their
    2-bit rows (uint8, `ternq.runtime.storage.pack_rows`) read as stored; wsum the codes' row sums."""
    return linear_gemv_bound(w.contiguous(), wsum, scale, bias, cfg)(x)


def linear_gemv_bound(w: Tensor, wsum: Tensor | None, scale: Tensor, bias: Tensor | None,
                      cfg: QuantConfig) -> Callable[[Tensor], Tensor]:
    """`linear_gemv` with the layer's codes, sums, scales, bias and config bound once (a layer keeps it while
    they stay the same objects): per token, the native call itself (it takes any rank), nothing in between."""
    return _per_scale(native.linear_rows_bound(cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                               w, wsum, scale, cfg.granularity == "channel", bias), cfg)


def linear_tiled_bound(w: Tensor, scale: Tensor, bias: Tensor | None, cfg: QuantConfig) -> Callable[[Tensor], Tensor]:
    """``int8_tiled``: one native call (quantize the rows, int8 GEMM, rescale) on the codes w (out, in) int8, packed
    here once into the GEMM's tiles (a copy of about out x in bytes, which the returned function holds), or on their
    2-bit rows (uint8, `ternq.runtime.storage.pack_rows`) read as stored (`ternq.native.linear_gemm_bound`). Equal
    to ``int8_gemm`` bit for bit, without its per-call operand packing or weight decoding."""
    return _per_scale(native.linear_gemm_bound(cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                               w, scale, cfg.granularity == "channel", bias), cfg)


def _per_scale(call: Callable[..., Tensor], cfg: QuantConfig) -> Callable[[Tensor], Tensor]:
    """A bound native Linear ``call(x, rows_per_sample=1)`` as a function of x: per token the native call itself
    (it takes any rank), nothing in between; per sample, with the rows each scale covers."""
    if cfg.act_granularity == "token":
        return call

    def per_sample(x: Tensor) -> Tensor:
        return call(x, _rows_per_scale(x, cfg))

    per_sample.keep = call.keep  # type: ignore[attr-defined]  # what the native call holds
    return per_sample


def linear_int8(x: Tensor, w: Tensor, scale: Tensor, bias: Tensor | None, cfg: QuantConfig,
                weight_first: bool) -> Tensor:
    """``int8_gemm`` (``x_q @ w.T``) / ``int8_gemm_t`` (``(w @ x_q.T).T``); w (out, in) int8 codes, or their 2-bit
    rows (uint8, `ternq.runtime.storage.pack_rows`): decoded tile by tile into a cache-sized buffer that the GEMM
    reads (`int_mm_2bit`) where the native kernels run, else unpacked whole."""
    n_in = x.shape[-1]
    q, s = quantize_activations(x, cfg, -1)
    a = q.reshape(-1, n_in)
    native_path = cfg.granularity != "group" and native_ok(x, cfg, bias)
    if w.dtype == torch.uint8 and not (native_path and n_in > 1):
        w = unpack_rows(w, 2, n_in)
    if native_path:
        if w.dtype == torch.uint8:
            acc = int_mm_2bit(w, a, weight_first)
        else:
            acc = int_mm(w, a.t(), "linear") if weight_first else int_mm(a, w.t(), "linear")
        y = native.linear_epilogue(acc, weight_first, s.reshape(-1), scale, cfg.granularity == "channel", bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    s = s.expand(*x.shape[:-1], 1).reshape(-1, 1)  # per-sample scales: one per row too

    def product(lo: int, hi: int) -> Tensor:
        """float32 (tokens, out) = a[:, lo:hi] @ w[:, lo:hi].T, exact."""
        if not weight_first:
            return int_mm(a[:, lo:hi], w[:, lo:hi].t(), "linear").to(torch.float32)
        r = int_mm(w[:, lo:hi], a[:, lo:hi].t(), "linear")  # (out, tokens)
        if r.shape[1] == 1:
            return r.view(1, -1).to(torch.float32)
        return torch.empty(r.shape[1], r.shape[0], dtype=torch.float32, device=r.device).copy_(r.t())

    if cfg.granularity == "group":
        size = cfg.group_size
        y = product(0, size).mul_(scale[:, 0])
        for g in range(1, scale.shape[1]):
            y.add_(product(g * size, (g + 1) * size).mul_(scale[:, g]))
        factor = s
    else:
        y = product(0, n_in)
        if cfg.granularity == "tensor":
            factor = s * scale
        else:
            y.mul_(scale)
            factor = s
    y = y.mul_(factor) if bias is None else torch.addcmul(bias, y, factor)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def int_mm_2bit(w2: Tensor, a: Tensor, weight_first: bool) -> Tensor:
    """int32 ``w @ a.T`` (N, M) if `weight_first`, else ``a @ w.T`` (M, N), of the codes a (M, K) int8 (K > 1) and
    the weight as 2-bit rows w2 (N, ceil(K / 4)): `_TILE_BYTES` of weight rows at a time decoded into a scratch
    tile (`native.unpack_2bit`), multiplied while it is in cache; exact, the int8 GEMM's result. The int8 codes
    are never all in memory: the layer stays at 2 bits per weight."""
    n, (m, k) = w2.shape[0], a.shape
    rows = max(16, min(n, _TILE_BYTES // k))
    tile = scratch("tile", (rows, k), torch.int8, a.device)
    acc = scratch("linear", (n, m) if weight_first else (m, n), torch.int32, a.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        t = tile[: r1 - r0]
        native.unpack_2bit(w2, k, r0, r1, t)
        if weight_first:  # rows r0:r1 of a contiguous (N, M): a contiguous out
            torch._int_mm(t, a.t(), out=acc[r0:r1])
        else:
            acc[:, r0:r1] = torch._int_mm(a, t.t(), out=scratch("tile_acc", (m, r1 - r0), torch.int32, a.device))
    return acc


# --- Conv1d / ConvTranspose1d ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conv1dGeometry:
    """What a 1-D convolution's kernels need to know of the layer besides its codes."""

    owner: str  # the layer's class name, for error messages
    kernel_size: int
    stride: int
    dilation: int
    padding: tuple[int, int]  # (left, right) for Conv1d; (padding, padding) for ConvTranspose1d
    padding_mode: str
    groups: int


@dataclass(frozen=True)
class ConvPlan:
    span: int  # dilation * (k - 1)
    t_pad: int  # input steps after padding
    t_out: int


def conv_plan(geom: Conv1dGeometry, t_in: int, batch: int = 1) -> ConvPlan:
    """The shared prelude of every Conv1d kernel: padded length and output length, or the error of an input
    shorter than the kernel's reach, or of length 0 in a non-empty batch (torch's Conv1d refuses it too)."""
    if t_in == 0 and batch:
        raise RuntimeError(f"{geom.owner}: input of length 0 (torch's Conv1d refuses it too)")
    span = geom.dilation * (geom.kernel_size - 1)
    t_pad = t_in + geom.padding[0] + geom.padding[1]
    t_out = (t_pad - span - 1) // geom.stride + 1
    if t_out < 1:
        raise RuntimeError(f"{geom.owner}: input of length {t_in} is shorter than the kernel's reach {span + 1} "
                           "after padding")
    return ConvPlan(span, t_pad, t_out)


def _mode_pad(geom: Conv1dGeometry, *planes: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
    """Non-zero padding modes (reflect, replicate, circular) applied to codes and scales alike (they are per
    step), by index; returns the planes and the zero padding still to apply."""
    left, right = geom.padding
    if geom.padding_mode == "zeros" or not (left or right):
        return list(planes), (left, right)
    t = planes[0].shape[-1]
    index = torch.arange(t, dtype=torch.float32, device=planes[0].device).view(1, 1, -1)
    index = F.pad(index, (left, right), mode=geom.padding_mode).view(-1).long()
    return [p.index_select(2, index) for p in planes], (0, 0)


def _tap_gemm(weight: Tensor, q: Tensor, s: Tensor) -> Tensor:
    """(k, out_g, T) float: ``s[t] * sum_c codes[tap, o, c] * q[c, t]`` for every tap; T a multiple of 16."""
    k, out_g, in_g = weight.shape
    r = int_mm(weight.reshape(k * out_g, in_g), q, "taps")
    taps = scratch("taps_float", tuple(r.shape), torch.float32, r.device).copy_(r)
    return taps.mul_(s).view(k, out_g, q.shape[-1])


def _scale_and_bias(y: Tensor, scale: Tensor, bias: Tensor | None, cfg: QuantConfig) -> Tensor:
    if cfg.granularity == "channel":
        n = scale.shape[0]  # the out channels of one group (ConvTranspose1d) or of all groups (Conv1d)
        y.view(y.shape[0], y.shape[1] // n, n, y.shape[-1]).mul_(scale.view(1, 1, n, 1))  # -1: not for 0 batch
    if bias is not None:
        y.add_(bias.view(1, -1, 1))
    return y


def conv1d_direct(x: Tensor, weights: list[native.ConvWeights], scale: Tensor, bias: Tensor | None,
                  cfg: QuantConfig, geom: Conv1dGeometry, slope: float | None = None) -> Tensor:
    """``int8_direct`` (native, zero padding): `weights` one `native.ConvWeights` per group, of the codes
    (k, out/groups, in/groups) (made once per layer: `direct_weights`); `slope`: the layer's input is
    ``F.leaky_relu(x, slope)``, applied inside the input quantization. A layer binds it once
    (`conv1d_direct_bound`)."""
    return conv1d_direct_bound(weights, scale, bias, cfg, geom)(x, slope)


def conv1d_direct_bound(weights: list[native.ConvWeights], scale: Tensor, bias: Tensor | None, cfg: QuantConfig,
                        geom: Conv1dGeometry) -> Callable[..., Tensor]:
    """`conv1d_direct` with the layer's codes, scales, bias, config and geometry bound once: ``call(x, slope=None)``
    is the output length and one native call (quantize, then every sample and group in one parallel region,
    `native.conv_direct_bound`)."""
    k = geom.kernel_size
    if k != weights[0].wg.shape[0]:
        raise ValueError(f"{geom.owner}: int8_direct got {weights[0].wg.shape[0]} taps for kernel size {k}")
    run = native.conv_direct_bound(weights, False, cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                   cfg.act_granularity == "tensor", geom.dilation, geom.stride, scale,
                                   cfg.granularity == "channel", bias)
    left, right = geom.padding

    def call(x: Tensor, slope: float | None = None) -> Tensor:
        plan = conv_plan(geom, x.shape[-1], x.shape[0])
        return run(x, left, right, plan.t_out, slope)

    call.keep = run.keep  # type: ignore[attr-defined]
    return call


def direct_weights(weight: Tensor, upsample: int | None = None) -> list[native.ConvWeights]:
    """One `native.ConvWeights` per group of the codes (groups, k, out/groups, in/groups) of a Conv1d, or of a
    ConvTranspose1d of stride `upsample` (taps reordered into `native.transpose_phases`): what `conv1d_direct` /
    `conv_transpose1d_direct` read, made once per layer (no per-call copies or row sums)."""
    if upsample is not None:
        weight = weight[:, native.transpose_phases(weight.shape[1], upsample)]
    return [native.conv_weights(w) for w in weight]


def conv_transpose1d_direct(x: Tensor, weights: list[native.ConvWeights], scale: Tensor, bias: Tensor | None,
                            cfg: QuantConfig, geom: Conv1dGeometry, output_padding: int,
                            slope: float | None = None) -> Tensor:
    """``int8_direct`` for ConvTranspose1d (native, dilation 1): `weights` one `native.ConvWeights` per group of
    the codes (k, out/groups, in/groups) with the taps in `native.transpose_phases` order. The upsampling as
    `stride` interleaved stride-1 convolutions of the input (the same loops as Conv1d's ``int8_direct``): no
    tap planes, no overlap-add. `slope`: as for `conv1d_direct`. A layer binds it once
    (`conv_transpose1d_direct_bound`)."""
    return conv_transpose1d_direct_bound(weights, scale, bias, cfg, geom)(x, output_padding, slope)


def conv_transpose1d_direct_bound(weights: list[native.ConvWeights], scale: Tensor, bias: Tensor | None,
                                  cfg: QuantConfig, geom: Conv1dGeometry) -> Callable[..., Tensor]:
    """`conv_transpose1d_direct` bound once: ``call(x, output_padding, slope=None)`` is the output length, the
    input's padding and one native call (`native.conv_direct_bound`); per channel, the scales of one group's
    outputs serve every group (the weight's dim 1)."""
    k, stride, pad = geom.kernel_size, geom.stride, geom.padding[0]
    run = native.conv_direct_bound(weights, True, cfg.input_norm, cfg.eps, int(cfg.act_bits),  # type: ignore[arg-type]
                                   cfg.act_granularity == "tensor", stride, pad, scale, cfg.granularity == "channel",
                                   bias)
    reach = geom.dilation * (k - 1) + 1

    def call(x: Tensor, output_padding: int, slope: float | None = None) -> Tensor:
        t_in = x.shape[-1]
        if t_in == 0 and x.shape[0]:
            raise RuntimeError(f"{geom.owner}: input of length 0 (torch's ConvTranspose1d refuses it too)")
        t_out = (t_in - 1) * stride - 2 * pad + reach + output_padding
        if t_out < 0:  # output length 0 gives an empty output, as torch does (except, on CPU, for a batch of one)
            raise RuntimeError(f"{geom.owner}: output length {t_out} < 0 for input length {t_in}")
        left, right = native.conv_transpose_padding(k, stride, pad, t_in, t_out)
        return run(x, left, right, t_out, slope)

    call.keep = run.keep  # type: ignore[attr-defined]
    return call


def conv1d_taps(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, cfg: QuantConfig,
                geom: Conv1dGeometry) -> Tensor:
    """``int8_taps``: one int8 GEMM of all taps per chunk of steps, per-step scales, shifted tap sum (native
    tap sum where available); weight (groups, k, out/groups, in/groups) int8 codes."""
    plan = conv_plan(geom, x.shape[-1], x.shape[0])
    groups, k, out_g, in_g = weight.shape
    stride, dilation, span = geom.stride, geom.dilation, plan.span
    chunk = _chunk(k * out_g) // stride or 1
    y = torch.empty(x.shape[0], groups * out_g, plan.t_out, dtype=torch.float32, device=x.device)
    if native_ok(x, cfg, bias) and (geom.padding_mode == "zeros" or not any(geom.padding)):
        left, right = geom.padding
        q, s = quantize_activations(x, cfg, 1, (left, right + 16))  # zero columns: 16-aligned chunk widths
        if s.shape[-1] != q.shape[-1]:  # one scale per sample: the tap sum reads one per step
            s = s.expand(-1, -1, q.shape[-1]).contiguous()
        per_channel = cfg.granularity == "channel"
        for g in range(groups):
            w = weight[g].reshape(k * out_g, in_g)
            rows = slice(g * out_g, (g + 1) * out_g)
            wscale = scale[rows] if per_channel else scale
            b_g = None if bias is None else bias[rows]
            for b in range(x.shape[0]):
                for t0 in range(0, plan.t_out, chunk):
                    n = min(chunk, plan.t_out - t0)
                    start, width = t0 * stride, _align16((n - 1) * stride + span + 1)
                    acc = int_mm(w, q[b, g * in_g:(g + 1) * in_g, start:start + width], "taps")
                    native.tap_sum(acc, k, s[b, 0, start:], n, stride, dilation, wscale, per_channel, b_g,
                                   y[b, rows, t0:])
        return y
    q, s = quantize_activations(x, cfg, 1)  # (B, C, T) int8, (B, 1, T) or per sample (B, 1, 1)
    s = s.expand(-1, -1, q.shape[-1])
    if cfg.granularity == "tensor":
        s = s * scale
    (q, s), (left, right) = _mode_pad(geom, q, s)
    # zero columns on the right let every chunk read a 16-aligned width
    q, s = F.pad(q, (left, right + 16)), F.pad(s, (left, right + 16))
    for b in range(x.shape[0]):
        for g in range(groups):
            rows_q = q[b, g * in_g:(g + 1) * in_g]
            for t0 in range(0, plan.t_out, chunk):
                n = min(chunk, plan.t_out - t0)
                start, width = t0 * stride, _align16((n - 1) * stride + span + 1)
                taps = _tap_gemm(weight[g], rows_q[:, start:start + width], s[b, :, start:start + width])
                shifted = taps.as_strided((k, out_g, n), (out_g * width + dilation, width, stride))
                torch.sum(shifted, 0, out=y[b, g * out_g:(g + 1) * out_g, t0:t0 + n])
    return _scale_and_bias(y, scale, bias, cfg).to(x.dtype)


def conv1d_im2col(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, cfg: QuantConfig,
                  geom: Conv1dGeometry) -> Tensor:
    """``int8_im2col`` (one activation scale per sample): weight (groups, out/groups, in/groups * k) codes."""
    plan = conv_plan(geom, x.shape[-1], x.shape[0])
    q, s = quantize_activations(x, cfg, 1)  # (B, C, T) int8, (B, 1, 1)
    (q,), (left, right) = _mode_pad(geom, q)
    k, dilation, stride, span, t_out = geom.kernel_size, geom.dilation, geom.stride, plan.span, plan.t_out
    groups, out_g, cols = weight.shape
    in_g = cols // k
    chunk = max(64, (_IM2COL_BYTES // max(4 * out_g, cols)) // 16 * 16)
    # zero columns on the right let every chunk read a 16-aligned width of output steps
    reach = (_align16(t_out) - 1) * stride + span + 1
    q = F.pad(q, (left, right + max(0, reach - plan.t_pad)))
    factor = s.reshape(-1, 1, 1) * (scale.view(1, -1, 1) if cfg.granularity == "channel" else scale.view(1, 1, 1))
    bias_col = None if bias is None else bias.view(-1, 1)
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
                col = scratch("im2col", (in_g, k, width), torch.int8, x.device)
                col.copy_(unfolded.transpose(1, 2))
                r = int_mm(weight[g], col.view(in_g * k, width), "im2col_out")[:, :n]
                # convert, then scale and add in place: 2.4x faster than one mixed-dtype addcmul here
                dst = y[b, rows, t0:t0 + n].copy_(r).mul_(f)
                if bias_col is not None:
                    dst.add_(bias_col[rows])
    return y.to(x.dtype)


def conv_transpose1d_taps(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, cfg: QuantConfig,
                          geom: Conv1dGeometry, output_padding: int) -> Tensor:
    """``int8_taps`` for ConvTranspose1d: one int8 GEMM of all taps, per-step scales, overlap-add (native where
    available); weight (groups, k, out/groups, in/groups) int8 codes."""
    use_native = native_ok(x, cfg, bias)
    q, s = quantize_activations(x, cfg, 1, (0, 16))  # 16-aligned chunk widths; (B, 1, T + 16) or (B, 1, 1)
    s = s.expand(-1, -1, q.shape[-1])
    if cfg.granularity == "tensor":
        s = s * scale
    elif use_native:
        s = s.contiguous()
    t_in = q.shape[-1] - 16
    if t_in == 0 and x.shape[0]:
        raise RuntimeError(f"{geom.owner}: input of length 0 (torch's ConvTranspose1d refuses it too)")
    k, dilation, stride, pad = geom.kernel_size, geom.dilation, geom.stride, geom.padding[0]
    t_full = (t_in - 1) * stride + dilation * (k - 1) + 1
    t_out = t_full - 2 * pad + output_padding
    if t_out < 0:  # output length 0 gives an empty output, as torch does (except, on CPU, for a batch of one)
        raise RuntimeError(f"{geom.owner}: output length {t_out} < 0 for input length {t_in}")
    groups, _, out_g, in_g = weight.shape
    chunk = _chunk(k * out_g)
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
                    acc = int_mm(weight[g].reshape(k * out_g, in_g), rows[:, t0:t0 + width], "taps")
                    native.tap_scatter(acc, k, s[b, 0, t0:], n, stride, dilation, full, t0 * stride)
                    continue
                taps = _tap_gemm(weight[g], rows[:, t0:t0 + width], s[b, :, t0:t0 + width])
                reach = stride * (n - 1) + 1
                for j in range(k):
                    begin = t0 * stride + j * dilation
                    full[:, begin:begin + reach:stride].add_(taps[j, :, :n])
            y[b, g * out_g:(g + 1) * out_g] = full[:, pad:pad + t_out]
    return _scale_and_bias(y, scale, bias, cfg).to(x.dtype)


# --- Embedding -------------------------------------------------------------------------------------------------


def embedding_gather(ids: Tensor, stored: Tensor, bits: int, width: int, scale: Tensor, cfg: QuantConfig,
                     dtype: torch.dtype) -> Tensor:
    """``gather``: the looked-up rows of the stored codes (packed rows unpacked after the gather), scaled."""
    packed_rows = F.embedding(ids, stored)
    rows = packed_rows if bits == 8 else unpack_rows(packed_rows, bits, width)
    out = rows.to(torch.float32)
    if cfg.granularity == "tensor":
        out.mul_(scale)
    elif cfg.granularity == "channel":
        out.mul_(scale[ids].unsqueeze(-1))
    else:
        expanded = scale[ids].repeat_interleave(cfg.group_size, dim=-1)[..., :out.shape[-1]]
        out.mul_(expanded)
    return out.to(dtype)
