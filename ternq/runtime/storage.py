"""Sub-byte storage of integer codes in memory (``storage="packed"``): 2 bits per ternary / int2 code, 4 bits up
to int4, planar within each row so that unpacking is a few whole-row shifts and rows stay separately addressable
(an Embedding gathers packed rows). The file format's 5-trits-per-byte encoding is `ternq.format.encoding`'s concern;
this is the runtime's in-memory layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import QuantConfig

__all__ = ["storage_bits", "pack_rows", "unpack_rows"]


def storage_bits(config: QuantConfig) -> int:
    """Bits per code in packed storage: 2 for codes in [-1, 1], 4 up to [-7, 7], else 8."""
    return 2 if config.qmax <= 1 else 4 if config.qmax <= 7 else 8


def pack_rows(codes: Tensor, bits: int) -> Tensor:
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


def unpack_rows(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_rows`: int8 codes with last dim `n` (sign-extended by a left then arithmetic right shift)."""
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
