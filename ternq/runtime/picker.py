"""Which kernel a packed layer runs: decided from the CPU's features and the call's geometry, never by timing.

Deciding without timing means a one-shot process pays nothing for autotuning: the first call of a shape runs
the kernel a warm call runs (CHANGELOG.md: what timing cost). The rules encode what docs/benchmarks.md measured:

* an integer kernel whenever the layer has one for this input: with the native quantizer and epilogues it beat
  ``weight_only`` (which rebuilds the float weight every call) on every measured shape, with and without VNNI;
* Linear, a few rows: ``int8_gemv`` (the native GEMV reads the weight once; 3-5x faster than ``torch._int_mm``
  at 1-2 rows with VNNI, about fp32's speed at 1 row without it); up to `GEMM_T_ROWS` rows ``int8_gemm_t``
  (the weight as the GEMM's left operand, which oneDNN does not re-layout per call); beyond, ``int8_gemm``;
* Linear, from `TILED_MIN_ROWS` rows, where the native build runs AMX tiles or AVX-512 VNNI: ``int8_tiled`` (one
  native call on a weight packed once into the GEMM's tiles; with AMX 1.6-2.6x ``int8_gemm_t`` at 16-256 rows and
  1.3x the GEMV at 4; the VNNI loop 1.0-1.7x the faster of ``int8_gemm`` / ``int8_gemm_t`` on oneDNN's VNNI
  kernels). Its portable loop (an AVX2-only or generic build) is slower than ``_int_mm``: not chosen there. On 2-bit
  rows it decodes the weight on every call (per thread, in cache): past the GEMV's rows only (at 4 rows the GEMV on
  the rows as stored is ~1.5x faster; at 16, 2-3x slower than the tiled GEMM, which is 1.5-3x ``int8_gemm_t``
  decoding tile by tile).

`choose` is a pure function of its arguments, so a test can pin each rule.

Storage (`choose_storage`, once per layer at load, for ``storage="auto"``): 2-bit rows (``"packed"``) for a
Linear whose codes fit 2 bits and whose weight has at least `PACKED_MIN_WEIGHTS` codes, where the build runs a SIMD
loop on them (`ternq.native.packed_isa`): decode is weight-bandwidth bound and the 2-bit GEMV reads a quarter of the
bytes, 3-7x faster than the int8 GEMV on 4-23 M codes (CHANGELOG.md, issue 18); below, the weight sits in cache and
the int8 GEMV, one multiply per code and no decoding, is as fast. Elsewhere int8, the layout every kernel reads.
"""
from __future__ import annotations

import os
from functools import cache

from . import native

__all__ = ["KERNEL_ENV", "KERNEL_POLICIES", "GEMM_T_ROWS", "PACKED_MIN_WEIGHTS", "TILED_MIN_ROWS", "gemv_rows", "choose",
           "pick", "choose_storage"]

KERNEL_ENV = "TERNQ_KERNEL"
WEIGHT_ONLY = "weight_only"
KERNEL_POLICIES = ("auto", WEIGHT_ONLY, "int8")  # what load_packed(kernel=) and $TERNQ_KERNEL accept
GEMM_T_ROWS = 64  # int8_gemm_t up to this many rows, int8_gemm beyond (1 thread, docs/benchmarks.md)
# int8_tiled from this many rows on, per `ternq.native.gemm_isa` loop (1024 x 1024, 1 thread): AMX ties the GEMV
# at 2 rows and is 1.3x faster at 4; the AVX-512 VNNI loop ties it at 4. Not the portable loop (slower than _int_mm).
TILED_MIN_ROWS = {"amx": 4, "avx512_vnni": 5}
PACKED_MIN_WEIGHTS = 1 << 20  # storage="auto": 2-bit rows from this many codes on (1024 x 1024: as fast as int8)


@cache
def _vnni(arch: str | None) -> bool:
    """`native.vnni`, once per value of $TERNQ_NATIVE_ARCH (it reads /proc/cpuinfo)."""
    return native.vnni()


def gemv_rows(vnni: bool | None = None) -> int:
    """The most rows for which the native GEMV beats the int8 GEMM: 4 with VNNI, else 1."""
    return 4 if (_vnni(os.environ.get(native.ARCH_ENV)) if vnni is None else vnni) else 1


def choose(applicable: tuple[str, ...], rows: int, vnni: bool | None = None, tiled: str | None = None,
           two_bit: bool = False) -> str:
    """The kernel for a call from the kernels that can compute it (`applicable`, in the layer's preference
    order, ``weight_only`` last), its row count (tokens for a Linear; unused by the other layers), the tiled
    GEMM's loop in this build (`tiled`, `ternq.native.gemm_isa`) and whether the weight is 2-bit rows (`two_bit`:
    the tiled GEMM decodes them on every call, which the GEMV, reading them as stored, beats up to `gemv_rows`)."""
    integer = [k for k in applicable if k != WEIGHT_ONLY]
    if not integer:
        return WEIGHT_ONLY
    if "int8_tiled" in integer and tiled in TILED_MIN_ROWS:
        least = max(TILED_MIN_ROWS[tiled], gemv_rows(vnni) + 1) if two_bit else TILED_MIN_ROWS[tiled]
        if rows >= least:
            return "int8_tiled"
    if "int8_gemv" in integer and rows <= gemv_rows(vnni):
        return "int8_gemv"
    integer = [k for k in integer if k != "int8_tiled"]
    if "int8_gemm_t" in integer and "int8_gemm" in integer:
        return "int8_gemm_t" if rows <= GEMM_T_ROWS else "int8_gemm"
    return integer[0]


def pick(applicable: tuple[str, ...], rows: int, *, forced: str | None = None, policy: str | None = None,
         needs_grad: bool = False, owner: str = "packed layer", two_bit: bool = False) -> str:
    """The kernel a call runs: the layer's forced kernel (checked against what can compute this call), else
    ``weight_only`` where the input needs a gradient or the policy is "weight_only", else the first integer
    kernel for the policy "int8", else `choose`. The policy is the layer's (``kernel="int8"``), else
    ``$TERNQ_KERNEL``, else "auto"."""
    if forced is not None:
        if forced not in applicable:
            raise ValueError(f"{owner}: kernel={forced!r} cannot compute this input; applicable: {applicable}")
        if needs_grad and forced != WEIGHT_ONLY:
            raise RuntimeError(f"kernel {forced!r} is inference-only and gives no gradient to the input: run under "
                               f"torch.no_grad() or use kernel={WEIGHT_ONLY!r}")
        return forced
    env = policy if policy is not None else os.environ.get(KERNEL_ENV, "auto").strip() or "auto"
    if env not in KERNEL_POLICIES:
        raise ValueError(f"{KERNEL_ENV}={env!r}: expected one of {KERNEL_POLICIES}")
    if env == WEIGHT_ONLY or needs_grad:
        return WEIGHT_ONLY
    integer = [k for k in applicable if k != WEIGHT_ONLY]
    if env == "int8" and integer:
        return integer[0]
    return choose(applicable, rows, tiled=native.gemm_isa() if "int8_tiled" in applicable else None, two_bit=two_bit)


def choose_storage(linear: bool, bits: int, weights: int, isa: str | None) -> str:
    """The storage of a layer with ``storage="auto"``: "packed" (2-bit rows) for a Linear (`linear`) whose codes fit
    `bits` = 2 with at least `PACKED_MIN_WEIGHTS` codes (`weights`) where the native build's loop on 2-bit rows
    (`isa`, `ternq.native.packed_isa`) is SIMD; else "int8"."""
    if linear and bits == 2 and weights >= PACKED_MIN_WEIGHTS and isa not in (None, "portable"):
        return "packed"
    return "int8"
