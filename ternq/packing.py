"""Packing integer weight codes into bytes, in torch: the "weight indexing" of BitTTS and k-bit layouts.

Encodings (byte layouts in docs/format.md; the numpy decoder is `ternq.numpy_format.unpack_numpy`):

* ``trit5``: 5 ternary codes per byte (3**5 = 243 <= 256), 1.6 bits per weight against log2(3) = 1.585.
  The five codes form a base-3 number v (first code most significant) stored scaled to the byte range,
  ``b = ceil(v * 256 / 243)``, so that trit k decodes with a multiply and a shift,
  ``((b * 3**k mod 256) * 3) >> 8``, where plain base 3 needs a division and a modulo per trit.
* ``int2`` / ``int4``: 4 or 2 k-bit codes per byte, fields holding ``code + 2**(k-1)``, first code in the
  least significant bits; ``int8``: one int8 per code.

Every code sequence is flattened in C order; the tail of the last byte is padded with code 0 and the true
count is kept by the caller (the file's manifest). Both directions work on any length.

Decoding uses one table lookup per byte (byte -> 5, 4 or 2 int8 codes) with ``index_select`` on int32 indices,
a chunk at a time so the indices and output stay in cache. benchmarks/bench_packing.py measures it against the
arithmetic decoders; the table wins in torch and numpy alike (docs/benchmarks.md, "Packing"). The table hides
the arithmetic, but the scaled layout is kept because a decoder without tables (C, SIMD) needs it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import QuantConfig
from .numpy_format import (
    DECODE_CHUNK,
    DECODE_TABLES,
    ENCODINGS,
    TRIT5_ENCODE,
    Encoding,
    FormatError,
    _range_message,
    encoding_for_config,
)

__all__ = ["pack_codes", "unpack_codes", "pack_ternary", "unpack_ternary", "encoding_for", "packed_length"]

_DECODE = {name: torch.from_numpy(table.copy()) for name, table in DECODE_TABLES.items()}
_TRIT5_ENCODE = torch.from_numpy(TRIT5_ENCODE.copy())
_TRIT5_WEIGHTS = (81, 27, 9, 3, 1)
_TORCH_DTYPE = {"U8": torch.uint8, "I8": torch.int8}


def _encoding(encoding: str) -> Encoding:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}: expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[encoding]


def encoding_for(config: QuantConfig) -> str:
    """The encoding layers of `config` are stored in: trit5 (ternary), int2, int4 (3-4 bits) or int8 (5-8)."""
    return encoding_for_config(config.to_dict())


def packed_length(count: int, encoding: str) -> int:
    """Payload elements (bytes) holding `count` codes."""
    return _encoding(encoding).packed_length(count)


def pack_codes(codes: Tensor, encoding: str) -> Tensor:
    """Pack integer codes of any shape (flattened in C order) into a 1-D payload: uint8, int8 for "int8".

    Raises ValueError when a code does not fit the encoding (e.g. 2 in trit5) or the codes are not integers.
    """
    enc = _encoding(encoding)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1).cpu()
    n = flat.numel()
    if n:
        lo, hi = (int(v) for v in torch.aminmax(flat))
        if lo < enc.lo or hi > enc.hi:
            raise ValueError(f"codes span [{lo}, {hi}], outside the range [{enc.lo}, {enc.hi}] of {encoding!r}")
    if enc.per_byte == 1:
        return flat.to(torch.int8, copy=True).contiguous()
    per_byte, n_bytes = enc.per_byte, enc.packed_length(n)
    bias = 1 if encoding == "trit5" else -enc.lo  # the field value of code 0, also the padding
    fields = torch.full((n_bytes * per_byte,), bias, dtype=torch.uint8)
    fields[:n] = (flat.to(torch.int16) + bias).to(torch.uint8)
    fields = fields.view(n_bytes, per_byte)
    out = torch.empty(n_bytes, dtype=torch.uint8)
    bits = 8 // per_byte
    for start in range(0, n_bytes, DECODE_CHUNK):
        f = fields[start:start + DECODE_CHUNK]
        if encoding == "trit5":
            v = f[:, 0] * _TRIT5_WEIGHTS[0]  # uint8 arithmetic: v <= 242 never overflows
            for k in range(1, 5):
                v += f[:, k] * _TRIT5_WEIGHTS[k]
            torch.index_select(_TRIT5_ENCODE, 0, v.int(), out=out[start:start + DECODE_CHUNK])
        else:
            v = f[:, 0].clone()
            for k in range(1, per_byte):
                v |= f[:, k] << (bits * k)
            out[start:start + DECODE_CHUNK] = v
    return out


def unpack_codes(packed: Tensor, encoding: str, count: int, *, qmax: int | None = None,
                 what: str = "packed codes") -> Tensor:
    """Decode `count` codes (int8, 1-D) from a payload made by `pack_codes`, checking every byte.

    Raises FormatError (naming `what`) when the payload has the wrong dtype or length, holds a byte no encoder
    writes, a code outside ``[-qmax, qmax]`` (default: the encoding's range) or non-zero padding.
    """
    enc = _encoding(encoding)
    flat = packed.reshape(-1).cpu()
    if flat.dtype != _TORCH_DTYPE[enc.dtype]:
        raise FormatError(f"{what}: payload dtype {flat.dtype} does not match encoding {encoding!r} ({enc.dtype})")
    if flat.numel() != enc.packed_length(count):
        raise FormatError(f"{what}: {flat.numel()} payload elements cannot hold {count} codes in {encoding!r} "
                          f"(expected {enc.packed_length(count)})")
    lo, hi = (enc.lo, enc.hi) if qmax is None else (-qmax, qmax)
    if enc.per_byte == 1:
        out = flat.clone()
        _check_range(out, lo, hi, what, enc)
        return out
    table = _DECODE[encoding]
    out = torch.empty(flat.numel(), enc.per_byte, dtype=torch.int8)
    for start in range(0, flat.numel(), DECODE_CHUNK):
        chunk = out[start:start + DECODE_CHUNK]
        torch.index_select(table, 0, flat[start:start + DECODE_CHUNK].int(), out=chunk)
        _check_range(chunk, lo, hi, what, enc)
    codes = out.view(-1)
    if codes[count:].any():
        raise FormatError(f"{what}: padding after the last of {count} codes is not zero")
    return codes[:count]


def _check_range(codes: Tensor, lo: int, hi: int, what: str, enc: Encoding) -> None:
    if codes.numel():
        cmin, cmax = (int(v) for v in torch.aminmax(codes))
        if cmin < lo or cmax > hi:
            raise FormatError(_range_message(cmin if cmin < lo else cmax, lo, hi, what, enc))


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes (values in {-1, 0, 1}, any shape) five per byte; see the module docstring."""
    return pack_codes(codes, "trit5")


def unpack_ternary(packed: Tensor, count: int) -> Tensor:
    """Inverse of `pack_ternary`: `count` int8 codes, 1-D."""
    return unpack_codes(packed, "trit5", count)
