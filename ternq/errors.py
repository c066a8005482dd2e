"""Exception classes. Every error ternq raises on bad input derives from `TernqError`."""
from __future__ import annotations


class TernqError(Exception):
    """Base class of ternq's errors."""


class ConfigError(TernqError, ValueError):
    """A quantization config has an invalid field."""


class SelectorError(TernqError, ValueError):
    """An include/exclude rule is malformed or matches no layer."""


class ConversionError(TernqError):
    """quantize() could not convert the model; the model is left exactly as it was."""


class AlreadyQuantizedError(ConversionError):
    """quantize() was given a model that already holds ternq layers."""


class UnsupportedLayerError(ConversionError, TypeError):
    """A rule selected a layer type ternq does not know; register it with `ternq.register_layer`."""


class FormatError(TernqError, ValueError):
    """A packed file is malformed: truncated, corrupted, inconsistent or of an unknown version."""


class ChecksumError(FormatError):
    """A tensor's bytes do not match the checksum recorded in the file's metadata."""


class ArchitectureMismatchError(FormatError):
    """A packed file does not fit the float skeleton it is loaded into."""


class ExportError(TernqError, ValueError):
    """A model cannot be written in a foreign format (`ternq.export_gguf`); nothing was written."""
