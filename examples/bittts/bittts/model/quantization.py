"""Which BitTTS layers ternq quantizes: the one place that turns `[quant]` into a `ternq.quantize` call.

The config itself is ternq's (`cfg.quant.config`, a `ternq.TernaryConfig` or `ternq.KBitConfig`); this module
only says where it applies: `scope` picks the parts, `ALWAYS_FLOAT` and `exclude` keep layers in float.
"""
from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from ..config import QuantizationConfig

__all__ = ["apply_quantization", "ALWAYS_FLOAT"]

# Never quantized: the alignment module is training-only (not used by `infer`, absent from the export form),
# and the pitch/energy embeddings are 1-input-channel convs, whose input a ternq input norm (normalizing over
# channels) would turn into zeros.
ALWAYS_FLOAT = ("acoustic.aligner.*", "acoustic.pitch_embed", "acoustic.energy_embed")

M = TypeVar("M", bound=nn.Module)


def apply_quantization(model: M, quant: QuantizationConfig) -> M:
    """Quantize a BitTTS model with ternq as `quant` says (in place; returns the model; a float config does
    nothing).

    scope "acoustic": every Linear/Conv of `model.acoustic`; scope "all": also `model.vocoder` except the layers
    feeding its output directly (ternq's graph-position selector `output_layers("vocoder")`: HiFi-GAN's
    conv_post). `ALWAYS_FLOAT` and `quant.exclude` stay float.
    """
    if quant.config is None:
        return model
    import ternq

    include: list[Any] = ["acoustic.*"]
    exclude: list[Any] = [*ALWAYS_FLOAT, *quant.exclude]
    if quant.scope == "all":
        include.append("vocoder.*")
        exclude.append(ternq.output_layers("vocoder"))
    return ternq.quantize(model, include=include, exclude=exclude, config=quant.config)
