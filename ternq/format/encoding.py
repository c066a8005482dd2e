"""Packing integer weight codes into bytes, in torch: the "weight indexing" of BitTTS and k-bit layouts.

Encodings (byte layouts in docs/format.md; the numpy decoder is `ternq.format.reader.unpack_numpy`):

* ``trit5``: 5 ternary codes per byte (3**5 = 243 <= 256), 1.6 bits per weight against log2(3) = 1.585.
  The five codes form a base-3 number v (first code most significant) stored scaled to the byte range,
  ``b = ceil(v * 256 / 243)``, so that trit k decodes with a multiply and a shift,
  ``((b * 3**k mod 256) * 3) >> 8``, where plain base 3 needs a division and a modulo per trit.
* ``int2`` / ``int4``: 4 or 2 k-bit codes per byte, fields holding ``code + 2**(k-1)``, first code in the
  least significant bits; ``int8``: one int8 per code.

Every code sequence is flattened in C order; the tail of the last byte is padded with code 0 and the true
count is kept by the caller (the file's manifest). Both directions work on any length.

Decoding is one table lookup per *pair* of bytes (a 65536-row table of 10, 8 or 4 codes), the byte checks
included: measured in benchmarks/bench_packing.py against torch ``index_select`` on a 256-row table and against
the arithmetic decoders (multiply-shift for this layout, division for plain base 3), it is the fastest on CPU,
so the torch functions run it on the tensors' memory (docs/benchmarks.md, "Packing"). The table hides the
arithmetic, but the scaled layout is kept because a decoder without tables (C, SIMD) needs it.
Encoding sums each byte's codes with one small float GEMV (exact for these integers), a chunk at a time.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import QuantConfig
from .reader import (
    ENCODINGS,
    TRIT5_ENCODE,
    Encoding,
    FormatError,
    encoding_for_config,
    unpack_numpy,
)

__all__ = ["pack_codes", "unpack_codes", "pack_ternary", "unpack_ternary", "encoding_for", "packed_length"]

_TRIT5_ENCODE = torch.from_numpy(TRIT5_ENCODE.copy())
# byte value before the trit5 scaling = sum_k code_k * weight_k + offset (the offset maps code 0 to digit 1 /
# field 2**(k-1) in every position)
_PACK_WEIGHTS = {
    "trit5": (torch.tensor([81.0, 27.0, 9.0, 3.0, 1.0]), 121.0),
    "int2": (torch.tensor([1.0, 4.0, 16.0, 64.0]), 2.0 * 85),
    "int4": (torch.tensor([1.0, 16.0]), 8.0 * 17),
}
_PACK_CHUNK = 1 << 16  # bytes encoded per step
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
    padded = torch.zeros(n_bytes * per_byte, dtype=torch.int8)  # code 0 pads the last byte
    padded[:n] = flat
    rows = padded.view(n_bytes, per_byte)
    weights, offset = _PACK_WEIGHTS[encoding]
    out = torch.empty(n_bytes, dtype=torch.uint8)
    for start in range(0, n_bytes, _PACK_CHUNK):
        # sum_k code_k * weight_k as one small float GEMV: exact (|value| < 2**24) and far faster than
        # integer ops on the strided columns of `rows`
        value = torch.mv(rows[start:start + _PACK_CHUNK].float(), weights).add_(offset)
        dst = out[start:start + _PACK_CHUNK]
        if encoding == "trit5":
            torch.index_select(_TRIT5_ENCODE, 0, value.int(), out=dst)
        else:
            dst.copy_(value)
    return out


def unpack_codes(packed: Tensor, encoding: str, count: int, *, qmax: int | None = None,
                 what: str = "packed codes") -> Tensor:
    """Decode `count` codes (int8, 1-D) from a payload made by `pack_codes`, checking every byte.

    Raises FormatError (naming `what`) when the payload has the wrong dtype or length, holds a byte no encoder
    writes, a code outside ``[-qmax, qmax]`` (default: the encoding's range) or non-zero padding.

    The work is done by `ternq.format.reader.unpack_numpy` on the tensor's memory (no copy either way): its
    byte-pair table lookup measured about twice as fast as torch's ``index_select`` on a 256-row table
    (benchmarks/bench_packing.py).
    """
    enc = _encoding(encoding)
    flat = packed.detach().reshape(-1).cpu()
    if flat.dtype != _TORCH_DTYPE[enc.dtype]:
        raise FormatError(f"{what}: payload dtype {flat.dtype} does not match encoding {encoding!r} ({enc.dtype})")
    return torch.from_numpy(unpack_numpy(flat.numpy(), encoding, count, qmax=qmax, what=what))


def pack_ternary(codes: Tensor) -> Tensor:
    """Pack ternary codes (values in {-1, 0, 1}, any shape) five per byte; see the module docstring."""
    return pack_codes(codes, "trit5")


def unpack_ternary(packed: Tensor, count: int) -> Tensor:
    """Inverse of `pack_ternary`: `count` int8 codes, 1-D."""
    return unpack_codes(packed, "trit5", count)
