"""ternq: 1.58-bit (ternary) and k-bit quantization-aware training and packed inference for any PyTorch model.

The whole public API lives here, flat:

    model = ternq.quantize(model, include=..., exclude=..., config=ternq.TernaryConfig())
    print(ternq.report(model))
    ternq.save_packed(model, "model.safetensors")
    model = ternq.load_packed("model.safetensors", skeleton)
"""
# the documented submodule paths (ternq.uses.float_uses, ternq.weight_attr.latent, ternq.native.status, ...)
# are attributes of the package, as before the subpackages; each is the same module object as its new home
from . import atomic, native, numpy_format, runtime, uses, weight_attr  # noqa: F401
from .config import KBitConfig, QuantConfig, TernaryConfig
from .convert import dequantize, quantize
from .errors import (
    AlreadyQuantizedError,
    ArchitectureMismatchError,
    ChecksumError,
    ConfigError,
    ConversionError,
    ExportError,
    FormatError,
    SelectorError,
    TernqError,
    UnsupportedLayerError,
)
from .find.selectors import Rule, output_layers
from .format.gguf import export_gguf
from .format.reader import PackedFile
from .format.reader import open_packed as open  # noqa: A001, F401 (ternq.open, like safetensors.safe_open)
from .format.torch import PackedModel, load_packed, pack, read_metadata, save_packed
from .qat.layers import is_quantized, register_layer
from .report import Report, report
from .runtime.skeleton import skeleton

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "TernaryConfig",
    "KBitConfig",
    "register_layer",
    "quantize",
    "dequantize",
    "report",
    "Report",
    "Rule",
    "output_layers",
    "is_quantized",
    "pack",
    "save_packed",
    "load_packed",
    "skeleton",
    "read_metadata",
    "PackedModel",
    "export_gguf",
    "PackedFile",  # ternq.open(path) opens one; "open" is not in __all__, so `import *` keeps the builtin
    "TernqError",
    "ConfigError",
    "SelectorError",
    "ConversionError",
    "AlreadyQuantizedError",
    "UnsupportedLayerError",
    "FormatError",
    "ChecksumError",
    "ArchitectureMismatchError",
    "ExportError",
]
