"""Weight and activation quantizers, with straight-through estimators for training.

Weights are viewed as rows: one row per output channel (`out_dim` says which weight dimension that is: 0 for
Linear / Conv, 1 for ConvTranspose and for layers that store a linear weight transposed), the remaining
dimensions flattened into the row. Scales are computed per tensor, per row ("channel") or per group of G
consecutive row elements ("group"), and returned in their *stored* shape: ``(1,)``, ``(rows,)`` or
``(rows, n_groups)``.

Ternary (BitNet b1.58, BitTTS):   beta = mean|W| + eps,          codes = clip(round(W / beta), -1, 1)
k-bit symmetric:                  s = max(max|W| / q, eps),  codes = clip(round(W / s), -q, q),  q = 2**(k-1) - 1

The ternary eps is added, as in the paper; the k-bit eps is only a floor, because an 8-bit scale of a typical
weight is ~1e-4 and an added 1e-5 would keep the codes from ever reaching +-q.

The fake-quantized weight used in training is ``codes * scale``. Its gradient reaches the latent float weight
through a straight-through estimator (STE): with ``ste="identity"`` (default, as BitNet) the gradient of the
rounding is taken as 1 *everywhere*, also for weights outside the clip range, so a saturated weight keeps
moving and can come back; with ``ste="clipped"`` the gradient is zero where ``|W / scale| > q + 1/2``, i.e. where
clipping (not rounding) decided the code.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..config import QuantConfig

__all__ = [
    "weight_scale",
    "quantize_weight",
    "dequantize_weight",
    "fake_quantize_weight",
    "normalize_input",
    "quantize_input",
    "activation_scale",
    "fake_quantize_activation",
    "register_activation_kernel",
]

#: ``kernel(x, out, outer, c, inner, bits, eps) -> bool``: `_fake_quantize` on x viewed as (outer, c, inner), float32
#: contiguous on the CPU, over c, written into out (which may be x), bits 2..16; False when it cannot run
ActivationKernel = Callable[[Tensor, Tensor, int, int, int, int, float], bool]
_ACTIVATION_KERNEL: list[ActivationKernel | None] = [None]


def register_activation_kernel(kernel: ActivationKernel | None) -> None:
    """Install the one-pass activation fake-quantizer the training forward runs where it can (None: remove it).

    Why a registry: the kernel is native code, built and bound by ``ternq.runtime.native``, a layer above this
    one, which registers it when it loads (``import ternq`` loads it). The kernel must return exactly the eager
    form's bits (`_fake_quantize`); it runs only on float32 contiguous CPU tensors outside autocast and graph
    recording (jit.trace, torch.compile, torch.export, a TorchDispatchMode), and the eager form everywhere else."""
    _ACTIVATION_KERNEL[0] = kernel


def _rows(w: Tensor, out_dim: int) -> Tensor:
    """(rows, fan_in) view of a weight whose output channels lie along `out_dim`."""
    if w.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor: a weight needs at least one dimension")
    if w.dim() == 1:
        return w.reshape(1, -1)
    return w.movedim(out_dim, 0).reshape(w.shape[out_dim], -1)


def _unrows(rows: Tensor, shape: torch.Size, out_dim: int) -> Tensor:
    """Inverse of `_rows`."""
    if len(shape) <= 1:
        return rows.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(out_dim))
    return rows.reshape(moved).movedim(0, out_dim)


def _grouped(rows: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Zero-pad rows to whole groups; return (rows, n_groups, G) and the count of real elements per group."""
    n, fan_in = rows.shape
    n_groups = math.ceil(fan_in / group_size)
    pad = n_groups * group_size - fan_in
    padded = F.pad(rows, (0, pad)).reshape(n, n_groups, group_size)
    counts = torch.full((n_groups,), float(group_size), dtype=rows.dtype, device=rows.device)
    counts[-1] = group_size - pad
    return padded, counts


def _stat(x: Tensor, config: QuantConfig, dims: tuple[int, ...], counts: Tensor | None = None) -> Tensor:
    """The scale over `dims`: mean|x| + eps (ternary) or max(max|x| / q, eps) (k-bit).

    `counts` corrects the mean for zero padding.
    """
    return config.scale_of(x.abs(), dims, counts)


def weight_scale(w: Tensor, config: QuantConfig, out_dim: int = 0) -> Tensor:
    """Scale(s) of `w` in stored shape: ``(1,)`` per tensor, ``(rows,)`` per channel, ``(rows, n_groups)`` per group."""
    w = w.detach().float()
    if config.granularity == "tensor":
        # one statistic of every element: reduced in the weight's own layout (a ConvTranspose weight's rows are a
        # permuted copy), the reduction `_WeightSTE` runs, so that training and packing get the same scale bits
        return _tensor_scale(w, config)
    rows = _rows(w, out_dim)
    if config.granularity == "channel":
        s = _stat(rows, config, (1,))
    else:
        grouped, counts = _grouped(rows, config.group_size)
        s = _stat(grouped, config, (2,), counts)
    return s


def _tensor_scale(w32: Tensor, config: QuantConfig) -> Tensor:
    """The per-tensor scale ``(1,)`` of float32 `w32`, over all its elements as they lie in memory."""
    if w32.dim() == 0:
        raise ValueError("cannot quantize a 0-d tensor: a weight needs at least one dimension")
    return config.scale_of(w32.abs(), tuple(range(w32.dim()))).reshape(1)


def _expand(scale: Tensor, rows_shape: torch.Size, config: QuantConfig) -> Tensor:
    """Scale broadcast to the (rows, fan_in) layout."""
    if config.granularity == "tensor":
        return scale.reshape(1, 1)
    if config.granularity == "channel":
        return scale.reshape(-1, 1)
    # a group longer than the row is the row: never repeat beyond it (a file may claim any group_size)
    return scale.repeat_interleave(max(1, min(config.group_size, rows_shape[1])), dim=1)[:, : rows_shape[1]]


def _codes(rows: Tensor, scale_rows: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(rows / scale_rows), -qmax, qmax)


def quantize_weight(w: Tensor, config: QuantConfig, out_dim: int = 0) -> tuple[Tensor, Tensor]:
    """Hard quantization: integer codes (int8, same shape as `w`) and float32 scales (stored shape)."""
    scale = weight_scale(w, config, out_dim)
    rows = _rows(w.detach().float(), out_dim)
    codes = _codes(rows, _expand(scale, rows.shape, config), config.qmax)
    return _unrows(codes, w.shape, out_dim).to(torch.int8), scale


def _in_layout(scale: Tensor, ndim: int, config: QuantConfig, out_dim: int) -> Tensor:
    """A per-tensor or per-channel scale shaped to broadcast over the weight's own layout (not the rows')."""
    shape = [1] * ndim
    if config.granularity == "channel" and ndim > 1:
        shape[out_dim] = -1
    return scale.reshape(shape)


def dequantize_weight(codes: Tensor, scale: Tensor, config: QuantConfig, out_dim: int = 0,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """codes * scale, in the weight's layout: contiguous for per-tensor and per-channel scales, as the weight a
    QAT layer computes with (`fake_quantize_weight`), so that a convolution on either takes the same path."""
    if config.granularity != "group":
        w = codes.to(dtype, memory_format=torch.contiguous_format)
        return w * _in_layout(scale.to(dtype), codes.dim(), config, out_dim)  # not in place: w may be codes
    rows = _rows(codes.to(dtype), out_dim)
    return _unrows(rows * _expand(scale.to(dtype), rows.shape, config), codes.shape, out_dim)


def fake_quantize_weight(w: Tensor, config: QuantConfig, out_dim: int = 0) -> Tensor:
    """``codes * scale`` in w's dtype, differentiable with respect to `w` through the configured STE.

    Codes are computed in float32 whatever w's dtype, so training sees exactly the codes `quantize_weight`
    packs. One autograd node (`_WeightSTE`): the forward value is exactly ``codes * scale``, and the backward
    passes the gradient straight through (``ste="identity"``) or masked to the weights inside the clip range
    (``ste="clipped"``).
    """
    return _WeightSTE.apply(w, config, out_dim)


class _WeightSTE(torch.autograd.Function):
    """Scale, round, clip and rescale in one node, with the straight-through gradient as its backward.

    Written as ``wq + (w - w.detach())``, the same estimator costs three more autograd nodes and two more
    passes over the weight per read; this form's value is the same tensor and its gradient the same."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, config: QuantConfig, out_dim: int) -> Tensor:
        w32 = w.float()
        ctx.rows = config.granularity == "group"
        if ctx.rows:
            rows32 = _rows(w32, out_dim)
            scale = _expand(weight_scale(w, config, out_dim), rows32.shape, config)
        else:
            # one scale per tensor or per output channel broadcasts over the weight's own layout: the value is
            # computed where it is read, contiguous (a ConvTranspose weight's rows are a permuted copy, which
            # the convolution would copy back, forward and backward), each element from the same two numbers
            rows32 = w32
            if config.granularity == "tensor":  # `weight_scale`'s own reduction, without its reshapes
                scale = _tensor_scale(w32, config)
            else:
                scale = _in_layout(weight_scale(w, config, out_dim), w.dim(), config, out_dim)
        ratio = rows32 / scale  # a new tensor: rounded in place below
        ctx.clipped = config.ste == "clipped"
        if ctx.clipped:
            ctx.shape, ctx.out_dim = w.shape, out_dim
            ctx.save_for_backward(ratio.abs() <= config.qmax + 0.5)
        wq = ratio.round_().clamp_(-config.qmax, config.qmax).mul_(scale).to(w.dtype)
        return _unrows(wq, w.shape, out_dim) if ctx.rows else wq

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.clipped:
            (inside,) = ctx.saved_tensors
            grad = grad * (_unrows(inside, ctx.shape, ctx.out_dim) if ctx.rows else inside)
        return grad, None, None


def quantize_input(x: Tensor, config: QuantConfig, dim: int, batched_dims: int | None = None) -> Tensor:
    """A quantized layer's input as it computes with it: normalized (``config.input_norm``) and fake-quantized
    to ``config.act_bits`` over the features on `dim`. The one definition QAT layers, functional calls and the
    packed runtime's reference path share.

    `batched_dims`: a convolution's batched input rank; an input with one dim less is one unbatched sample,
    quantized exactly as the batch of one it stands for. Integer inputs (token ids) pass unchanged.
    """
    if not x.is_floating_point():
        return x
    if batched_dims is not None and x.dim() == batched_dims - 1:
        return quantize_input(x.unsqueeze(0), config, dim, batched_dims).squeeze(0)
    if config.input_norm is not None and x.requires_grad and torch.is_grad_enabled() and x.dim() >= 1 \
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() \
            and not torch.is_autocast_enabled(x.device.type):  # (autocast runs F.layer_norm in float32)
        act_dims = None if config.act_bits is None else _act_dims(x, dim, config.act_granularity)
        return _NormQuantize.apply(x, config.input_norm, dim, config.eps, config.act_bits, act_dims)
    x = normalize_input(x, config.input_norm, dim, config.eps)
    if config.act_bits is not None:
        x = fake_quantize_activation(x, config.act_bits, dim, config.eps, config.act_granularity)
    return x


def normalize_input(x: Tensor, kind: str | None, dim: int, eps: float = 1e-5) -> Tensor:
    """Parameter-free LayerNorm or RMSNorm over `dim` (the feature / channel dimension)."""
    if kind is None:
        return x
    if kind == "layernorm":
        if dim in (-1, x.dim() - 1):  # features innermost (Linear): torch's fused kernel, one op instead of seven
            return F.layer_norm(x, x.shape[-1:], eps=eps)
        # two-pass variance from the centered input: same value as x.var(unbiased=False), but x.var over a
        # non-innermost dim (channels of a (B, C, T) conv input) is ~10x slower than these two means
        centered = x - x.mean(dim=dim, keepdim=True)
        return centered * torch.rsqrt(centered.square().mean(dim=dim, keepdim=True) + eps)
    if kind == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(dim=dim, keepdim=True) + eps)
    raise ValueError(f"input_norm={kind!r}: expected 'layernorm', 'rmsnorm' or None")


def sample_dims(x: Tensor) -> tuple[int, ...]:
    """Dims one per-sample scale covers: all but the batch dim (3+ dims), or all of a 1-D / 2-D input."""
    return tuple(range(1, x.dim())) if x.dim() >= 3 else tuple(range(x.dim()))


def activation_scale(x: Tensor, bits: int, dim: int, eps: float = 1e-5, granularity: str = "token") -> Tensor:
    """Absmax scale (float units per integer step), broadcastable to `x`: per token along `dim` ("token"), or
    one per sample ("tensor": over every dim but the batch dim of a 3+-D input, over all of a 1-D / 2-D one)."""
    return absmax(x.detach(), _act_dims(x, dim, granularity)).clamp(min=eps) / (2 ** (bits - 1) - 1)


def _act_dims(x: Tensor, dim: int, granularity: str) -> tuple[int, ...]:
    if granularity == "token":
        return (dim,)
    if granularity == "tensor":
        return sample_dims(x)
    raise ValueError(f"act granularity={granularity!r}: expected 'token' or 'tensor'")


def absmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``x.abs().amax(dims, keepdim=True)``; zeros for an empty `x`, where amax refuses to reduce (no value to
    scale, but an empty batch must still run)."""
    n = x.numel()
    if type(n) is int and n > 0 and not torch.jit.is_tracing():  # known sizes, not empty: no per-dim checks
        return x.abs().amax(dim=dims, keepdim=True)
    reduced = {d % max(x.dim(), 1) for d in dims}
    if torch.jit.is_tracing():  # the TorchScript tracer: sizes may be 0-d tensors, numel an int
        empty = x.numel() == 0
    else:  # the reduced sizes only (an empty batch reduces fine); guard_or_false: no guard on a size that
        # torch.export knows as a symbol only (a length that is data, as a TTS model's frame count)
        empty = any(guard_or_false(x.shape[d] == 0) for d in reduced)
    if empty:
        return x.new_zeros([1 if d in reduced else n for d, n in enumerate(x.shape)])
    return x.abs().amax(dim=dims, keepdim=True)


def fake_quantize_activation(x: Tensor, bits: int, dim: int, eps: float = 1e-5, granularity: str = "token") -> Tensor:
    """Absmax quantization to signed `bits`, per token along `dim` (BitNet's activation quant) or per sample
    (``granularity="tensor"``), identity STE (one autograd node, `_ActivationSTE`)."""
    return _ActivationSTE.apply(x, bits, _act_dims(x, dim, granularity), eps)


class _ActivationSTE(torch.autograd.Function):
    """``clip(round(x / s)) * s`` in one node whose backward is the identity: the value of
    ``xq + (x - x.detach())`` without its three extra nodes and two extra passes over the activation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bits: int, dims: tuple[int, ...], eps: float) -> Tensor:
        return _fake_quantize(x, bits, dims, eps, inplace=False)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad, None, None, None


def _fake_quantize(x: Tensor, bits: int, dims: tuple[int, ...], eps: float, inplace: bool) -> Tensor:
    """``clip(round(x / s)) * s`` with the absmax scale over `dims`; `inplace` reuses x (a tensor of one's own)."""
    kernel = _ACTIVATION_KERNEL[0]
    if kernel is not None and x.dtype == torch.float32 and type(bits) is int and 2 <= bits <= 16:
        split = _native_split(x, dims)
        if split is not None:
            out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
            if kernel(x, out, *split, bits, eps):
                return out
    qmax = 2 ** (bits - 1) - 1
    if x.numel() >= 1 << 15:  # max|x| = max(max x, -min x) exactly, without materializing |x|
        s = torch.maximum(x.amax(dims, keepdim=True), x.amin(dims, keepdim=True).neg_())
    else:
        s = absmax(x, dims)
    s = s.clamp_(min=eps).div_(qmax)
    codes = (x.div_(s) if inplace else torch.div(x, s)).round_()
    if x.dtype != torch.float32:  # in float32 |x / s| <= qmax * (1 + 2**-23): rounding cannot leave the range
        codes.clamp_(-qmax - 1, qmax)
    return codes.mul_(s)


def _native_split(x: Tensor, dims: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(outer, c, inner) of a plain contiguous CPU tensor whose reduced `dims` are consecutive, the view the
    activation kernel reads; None where the eager form must run (a graph being recorded, autocast, a tensor
    subclass such as a fake tensor, an empty tensor, other dims). A TorchDispatchMode (make_fx's real-tensor
    tracing, FlopCounterMode) sees torch ops only: the kernel's ctypes call would pass it by."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or is_in_torch_dispatch_mode() \
            or torch.is_autocast_enabled("cpu") \
            or type(x) is not Tensor or x.device.type != "cpu" or not x.is_contiguous() or x.dim() == 0 \
            or x.numel() == 0:
        return None
    ds = sorted({d % x.dim() for d in dims})
    if not ds or ds[-1] - ds[0] != len(ds) - 1:
        return None
    shape = x.shape
    return math.prod(shape[: ds[0]]), math.prod(shape[ds[0]: ds[-1] + 1]), math.prod(shape[ds[-1] + 1:])


class _NormQuantize(torch.autograd.Function):
    """`normalize_input` then `fake_quantize_activation` in one node, for training: the same value, bit for bit;
    the backward is the norm's alone (the quantizer's straight-through gradient is the identity).

    Why: autograd's graph of the norm over a conv's channels is eight nodes whose backward costs ~8x its forward
    (issue 19: most of a conv stack's QAT overhead); LayerNorm over the features of a Linear input runs torch's
    kernel with a unit weight and zero bias, which computes ``(x - mean) * rstd`` exactly as without them but
    vectorized (torch's CPU kernel without them is a scalar loop, ~2x slower). Saves what the unfused graph
    saved (the input and the per-token statistics); with ``create_graph`` the backward runs the reference ops,
    so higher derivatives stay right.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str, dim: int, eps: float, bits: int | None,
                act_dims: tuple[int, ...] | None) -> Tensor:
        ctx.kind, ctx.dim, ctx.eps = kind, dim % x.dim(), eps
        ctx.native = kind == "layernorm" and ctx.dim == x.dim() - 1
        if ctx.native:
            n = x.shape[-1]
            unit = x.device.type == "cpu"  # the CPU kernel's vectorized path (see above); elsewhere F.layer_norm's call
            y, mean, rstd = torch.native_layer_norm(x, (n,), x.new_ones(n) if unit else None,
                                                    x.new_zeros(n) if unit else None, eps)
        elif kind == "layernorm":
            mean = x.mean(dim=dim, keepdim=True)
            centered = x - mean
            rstd = torch.rsqrt(centered.square().mean(dim=dim, keepdim=True) + eps)
            y = centered.mul_(rstd)
        elif kind == "rmsnorm":
            mean = None
            rstd = torch.rsqrt(x.pow(2).mean(dim=dim, keepdim=True) + eps)
            y = x * rstd
        else:
            raise ValueError(f"input_norm={kind!r}: expected 'layernorm', 'rmsnorm' or None")
        ctx.save_for_backward(x, mean, rstd)
        return y if bits is None or act_dims is None else _fake_quantize(y, bits, act_dims, eps, inplace=True)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd = ctx.saved_tensors
        none = (None,) * 5
        if torch.is_grad_enabled():  # create_graph: a gradient that is itself differentiable
            with torch.enable_grad():
                y = normalize_input(x, ctx.kind, ctx.dim, ctx.eps)
            return torch.autograd.grad(y, x, grad, create_graph=True)[0], *none
        if ctx.native:
            n = x.shape[-1]
            return torch.ops.aten.native_layer_norm_backward(
                grad, x, (n,), mean, rstd, None, None, [True, False, False])[0], *none
        # y = (x - mean) * r (RMSNorm: x * r): dx = r * (g - y * mean(g * y) - mean(g)), the last term for LayerNorm
        # only; computed as r * g - (x - mean) * r**3 * mean(g * (x - mean)) - r * mean(g), from the centered input
        # (no cancellation when |mean| >> std): two reductions and five passes, where autograd's graph takes ~15
        dim = ctx.dim
        centered = x if mean is None else x - mean
        c1 = (grad * centered).mean(dim=dim, keepdim=True).mul_(rstd.pow(3))
        gx = torch.mul(grad, rstd).addcmul_(centered, c1, value=-1)
        if mean is not None:
            gx.sub_(grad.mean(dim=dim, keepdim=True).mul_(rstd))
        return gx, *none
