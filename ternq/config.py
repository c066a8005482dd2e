"""Quantization configs: small frozen dataclasses, like torchao's configs.

A config says *how* a layer is quantized; selectors (see `ternq.find.selectors`) say *which* layers. The default,
`TernaryConfig()`, is the BitTTS / BitNet b1.58 recipe: per-tensor absmean ternary weights, inputs layer-normed
and quantized to 8 bits per token (per time step for convolutions).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .errors import ConfigError
from .format.reader import check_config, expected_scale_shape

if TYPE_CHECKING:
    from torch import Tensor

Granularity = Literal["tensor", "channel", "group"]
InputNorm = Literal["layernorm", "rmsnorm"]
STEMode = Literal["identity", "clipped"]
ActGranularity = Literal["token", "tensor"]



@dataclass(frozen=True)
class QuantConfig:
    """Settings shared by every weight quantizer.

    Attributes:
        granularity: one scale per tensor ("tensor", the paper's choice), per output channel ("channel"),
            or per group of `group_size` consecutive input weights of one output channel ("group").
        group_size: group length G when granularity is "group"; the last group of a row may be shorter.
        act_bits: quantize layer inputs to this many bits with per-token absmax scaling (8 in BitNet / BitTTS),
            or None to keep activations in float ("weight-only" QAT).
        input_norm: normalize the layer input before activation quantization, as BitNet's BitLinear does
            ("layernorm", "rmsnorm", parameter-free so float checkpoints still load) or None. `ternq.quantize`
            leaves it out where the input is normalized already (the output of a LayerNorm / RMSNorm over the
            layer's features) or has one feature.
        ste: straight-through estimator. "identity" passes the gradient to every latent weight (BitNet);
            "clipped" zeroes it for weights beyond the clip range, so saturated weights stop drifting.
        eps: keeps scales positive, so an all-zero weight never divides by zero: added to the ternary
            absmean (beta = mean|W| + eps, as the paper), a floor for k-bit scales (max(max|W| / q, eps)).
            Also the epsilon of the input norm and the floor of activation scales.
        act_granularity: what one activation scale covers. "token" (BitNet, default): one absmax scale per
            token / time step. "tensor": one scale per sample, over all its features and time steps (per item
            of the batch dim for inputs of 3+ dims; a 2-D or 1-D input is one sample). Per-token scales cannot
            be factored out of a convolution window, which costs the packed runtime one partial sum per tap;
            with one scale per sample a packed Conv1d is a single int8 GEMM (see docs/quantizers.md).
    """

    granularity: Granularity = "tensor"
    group_size: int = 128
    act_bits: int | None = 8
    input_norm: InputNorm | None = "layernorm"
    ste: STEMode = "identity"
    eps: float = 1e-5
    act_granularity: ActGranularity = "token"

    def __post_init__(self) -> None:
        # one validation for configs made in code and configs read from files: the format's (its limits are
        # the format's: what a file can store is what a config may say)
        check_config(self.to_dict(), type(self).__name__, ConfigError)

    def scale_shape(self, shape: tuple[int, ...], out_dim: int) -> tuple[int, ...]:
        """Shape of the scales of a weight of `shape`: (1,), (rows,) or (rows, n_groups) (the format's rule)."""
        return expected_scale_shape(shape, out_dim, {"granularity": self.granularity, "group_size": self.group_size})

    @property
    def name(self) -> str:
        """Short label used in reports and file metadata, e.g. "ternary" or "int4"."""
        raise NotImplementedError

    @property
    def bits_per_weight(self) -> float:
        """Storage cost of one packed weight (scales not included)."""
        raise NotImplementedError

    @property
    def qmax(self) -> int:
        """Largest integer code; codes lie in [-qmax, qmax]."""
        raise NotImplementedError

    #: the config's kind in file metadata ("ternary" / "kbit")
    kind: ClassVar[str] = ""

    def scale_of(self, magnitudes: Tensor, dims: tuple[int, ...], counts: Tensor | None = None) -> Tensor:
        """The weight scale of `magnitudes` (``|W|``) over `dims`; `counts` corrects a mean for zero padding."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the kind, for file metadata."""
        return {"kind": self.kind, **asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> QuantConfig:
        """Inverse of `to_dict`; unknown keys are an error rather than silently dropped, missing ones take their
        defaults (files written before a field existed, e.g. ``act_granularity``, load as they were trained)."""
        data = dict(data)
        kind = data.pop("kind", None)
        cls: type[QuantConfig]
        if kind == "ternary":
            cls = TernaryConfig
        elif kind == "kbit":
            cls = KBitConfig
        else:
            raise ConfigError(f"unknown quantization config kind {kind!r}: expected 'ternary' or 'kbit'")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class TernaryConfig(QuantConfig):
    """1.58-bit weights: W_q = clip(round(W / beta), -1, 1) with beta = mean|W| + eps (BitNet b1.58 absmean)."""

    kind: ClassVar[str] = "ternary"

    def scale_of(self, magnitudes: Tensor, dims: tuple[int, ...], counts: Tensor | None = None) -> Tensor:
        """beta = mean|W| + eps."""
        mean = magnitudes.mean(dim=dims) if counts is None else magnitudes.sum(dim=dims) / counts
        return mean + self.eps

    @property
    def name(self) -> str:
        return "ternary"

    @property
    def bits_per_weight(self) -> float:
        return 8 / 5  # 5 trits per byte (3**5 = 243 <= 256)

    @property
    def qmax(self) -> int:
        return 1


@dataclass(frozen=True)
class KBitConfig(QuantConfig):
    """k-bit symmetric weights: W_q = clip(round(W / s), -q, q), s = max(max|W| / q, eps), q = 2**(k-1) - 1."""

    bits: int = 4

    kind: ClassVar[str] = "kbit"

    def scale_of(self, magnitudes: Tensor, dims: tuple[int, ...], counts: Tensor | None = None) -> Tensor:
        """s = max(max|W| / q, eps)."""
        return (magnitudes.amax(dim=dims) / self.qmax).clamp(min=self.eps)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def bits_per_weight(self) -> float:
        return 2.0 if self.bits == 2 else 4.0 if self.bits <= 4 else 8.0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1
