"""Codecs: byte layouts pinned by hand-computed vectors, exhaustive trit5 tables, round trips of any length."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ternq import FormatError, KBitConfig, TernaryConfig
from ternq.format.encoding import (
    encoding_for,
    pack_codes,
    pack_ternary,
    packed_length,
    unpack_codes,
    unpack_ternary,
)
from ternq.numpy_format import ENCODINGS, TRIT5_DECODE, TRIT5_ENCODE, unpack_numpy

RANGES = {name: (e.lo, e.hi) for name, e in ENCODINGS.items()}


def codes_of(encoding: str, n: int, seed: int = 0) -> torch.Tensor:
    lo, hi = RANGES[encoding]
    return torch.randint(lo, hi + 1, (n,), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


# --- the byte layouts, from the specification in docs/format.md ------------------------------------------------


def test_trit5_hand_computed_bytes():
    # codes (1, 0, -1, 0, 1) -> digits (2, 1, 0, 1, 2) -> v = 2*81 + 1*27 + 0*9 + 1*3 + 2 = 194
    # b = ceil(194 * 256 / 243) = ceil(204.37...) = 205
    assert pack_ternary(torch.tensor([1, 0, -1, 0, 1])).tolist() == [205]
    # all -1: v = 0 -> b = 0; all +1: v = 242 -> b = ceil(254.94...) = 255; all 0: v = 121 -> b = 128
    assert pack_ternary(torch.tensor([-1] * 5 + [1] * 5 + [0] * 5)).tolist() == [0, 255, 128]
    # a tail of two codes (1, -1) is padded with three zeros: digits (2, 0, 1, 1, 1) -> v = 162 + 9 + 3 + 1 = 175
    # -> b = ceil(175 * 256 / 243) = ceil(184.36...) = 185
    assert pack_ternary(torch.tensor([1, -1])).tolist() == [185]


def test_kbit_hand_computed_bytes():
    # int2: fields code + 2, first code in the low bits: (1, 0, -1, -2) -> 3 | 2 << 2 | 1 << 4 | 0 << 6 = 27
    assert pack_codes(torch.tensor([1, 0, -1, -2]), "int2").tolist() == [27]
    # padding is code 0 (field 2): (1,) -> 3 | 2 << 2 | 2 << 4 | 2 << 6 = 171
    assert pack_codes(torch.tensor([1]), "int2").tolist() == [171]
    # int4: fields code + 8: (7, -8) -> 15 | 0 << 4 = 15; (-1, 1) -> 7 | 9 << 4 = 151; (3,) -> 11 | 8 << 4 = 139
    assert pack_codes(torch.tensor([7, -8, -1, 1, 3]), "int4").tolist() == [15, 151, 139]
    # int8: the codes themselves
    assert pack_codes(torch.tensor([-128, 0, 127]), "int8").tolist() == [-128, 0, 127]


def test_trit5_tables_exhaustive():
    """Every base-3 value encodes to a distinct byte that decodes back by the documented multiply-shift formula;
    the 13 bytes no encoder writes are rejected."""
    assert len(set(TRIT5_ENCODE.tolist())) == 243
    for v in range(243):
        b = int(TRIT5_ENCODE[v])
        assert b == math.ceil(v * 256 / 243)
        digits = [(v // 3 ** (4 - k)) % 3 for k in range(5)]
        assert [((((b * 3**k) % 256) * 3) >> 8) for k in range(5)] == digits
        assert (TRIT5_DECODE[b] + 1).tolist() == digits
    unused = sorted(set(range(256)) - set(TRIT5_ENCODE.tolist()))
    assert len(unused) == 13
    for b in range(256):
        payload = torch.tensor([b], dtype=torch.uint8)
        if b in unused:
            with pytest.raises(FormatError, match="no trit5 encoder writes"):
                unpack_ternary(payload, 5)
            with pytest.raises(FormatError, match="no trit5 encoder writes"):
                unpack_numpy(payload.numpy(), "trit5", 5)
        else:
            assert pack_ternary(unpack_ternary(payload, 5)).tolist() == [b]


# --- round trips ---------------------------------------------------------------------------------------------


@settings(deadline=None, max_examples=150)
@given(encoding=st.sampled_from(sorted(ENCODINGS)), n=st.integers(0, 700), seed=st.integers(0, 2**16))
def test_round_trip_any_length(encoding, n, seed):
    codes = codes_of(encoding, n, seed)
    packed = pack_codes(codes, encoding)
    assert packed.shape == (packed_length(n, encoding),) == (math.ceil(n / ENCODINGS[encoding].per_byte),)
    assert torch.equal(unpack_codes(packed, encoding, n), codes)
    assert np.array_equal(unpack_numpy(packed.numpy(), encoding, n), codes.numpy())


def test_round_trip_large_and_multidimensional():
    codes = codes_of("trit5", 3 * 1 << 18, 1).reshape(3, 512, -1)  # several decode chunks
    packed = pack_ternary(codes)
    assert torch.equal(unpack_ternary(packed, codes.numel()).reshape(codes.shape), codes)
    assert 8 * packed.numel() / codes.numel() <= 1.6 + 8 / codes.numel()


def test_bits_per_weight():
    n = 1024 * 1024
    assert 8 * packed_length(n, "trit5") / n == pytest.approx(1.6, abs=1e-5)
    assert 8 * packed_length(n, "int2") / n == 2
    assert 8 * packed_length(n, "int4") / n == 4


def test_encoding_for_configs():
    assert encoding_for(TernaryConfig()) == "trit5"
    assert [encoding_for(KBitConfig(bits=b)) for b in range(2, 9)] == ["int2", "int4", "int4"] + ["int8"] * 4


# --- bad input ------------------------------------------------------------------------------------------------


def test_pack_rejects_codes_outside_the_encoding():
    with pytest.raises(ValueError, match=r"\[-1, 2\].*trit5"):
        pack_ternary(torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match="int4"):
        pack_codes(torch.tensor([-9]), "int4")
    with pytest.raises(ValueError, match="integer tensor"):
        pack_ternary(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown encoding"):
        pack_codes(torch.tensor([0]), "trit3")


def test_unpack_rejects_bad_payloads():
    packed = pack_ternary(torch.tensor([1, 0, -1, 1, 1, 0, 1]))
    with pytest.raises(FormatError, match="cannot hold 11 codes"):
        unpack_ternary(packed, 11)
    with pytest.raises(FormatError, match="dtype"):
        unpack_codes(packed.to(torch.int8), "trit5", 7)
    with pytest.raises(FormatError, match="padding"):  # 6 codes claimed, the 7th (a 1) is in the padding
        unpack_ternary(packed, 6)
    with pytest.raises(FormatError, match="padding"):
        unpack_numpy(packed.numpy(), "trit5", 6)
    wide = pack_codes(torch.tensor([5, -3]), "int4")
    with pytest.raises(FormatError, match="code 5 is outside the range \\[-3, 3\\]"):
        unpack_codes(wide, "int4", 2, qmax=3, what="layer 'x'")
    with pytest.raises(FormatError, match="code 5 is outside"):
        unpack_numpy(wide.numpy(), "int4", 2, qmax=3)
    with pytest.raises(FormatError, match="-128"):
        unpack_codes(torch.tensor([-128], dtype=torch.int8), "int8", 1, qmax=127)
