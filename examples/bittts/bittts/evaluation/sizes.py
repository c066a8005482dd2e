"""The paper's size comparison, measured: fp32 / 4-bit / 1.58-bit x {acoustic only, all} x {without, with
weight indexing} for one architecture.

Every row is a real packed file: the architecture is built in its export form, quantized the way the matching
preset does it (`BitTTS.for_inference`: no weight norm, no aligner; `bittts.model.quantization`) and packed with
`ternq.pack`; the row's size is the length of that file's bytes (header included, user metadata excluded).

"With weight indexing" is the file as ternq writes it: 5 ternary weights per byte (the paper's weight
indexing), two 4-bit weights per byte. "Without" is the paper's baseline of one int8 per weight: the same file
with every packed code stored in a byte of its own (its size is the indexed file's minus the packed codes'
bytes plus one byte per packed weight; scales and float tensors are unchanged). Sizes are in MB = 10^6 bytes.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..config import BitTTSConfig, QuantizationConfig
from ..model.bittts import BitTTS

__all__ = ["SizeRow", "size_table", "format_size_table", "part_bytes", "file_sizes", "PARTS", "PRECISIONS"]

PARTS = ("acoustic", "vocoder")
PRECISIONS = ("fp32", "4-bit", "1.58-bit")

# (label, ternq config kind and bits (None: float), quant.scope)
_VARIANTS = (
    ("fp32", None, "acoustic"),
    ("4-bit", {"kind": "kbit", "bits": 4}, "acoustic"),
    ("4-bit", {"kind": "kbit", "bits": 4}, "all"),
    ("1.58-bit", {"kind": "ternary"}, "acoustic"),
    ("1.58-bit", {"kind": "ternary"}, "all"),
)


@dataclasses.dataclass
class SizeRow:
    """One row of the size table. `scope` is None for fp32, `indexing` None where it changes nothing (fp32)."""

    precision: str
    scope: str | None
    indexing: bool | None
    bytes: int
    parts: dict[str, int]  # bytes of the tensors of each part (PARTS), header excluded
    reduction: float  # 1 - bytes / fp32 bytes

    @property
    def mb(self) -> float:
        return self.bytes / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mb": self.mb}


def part_bytes(tensors: dict[str, int]) -> dict[str, int]:
    """Bytes per model part from {tensor name: bytes}, by name prefix ("acoustic." / "vocoder.")."""
    out = dict.fromkeys(PARTS, 0)
    for name, n in tensors.items():
        part = name.split(".", 1)[0]
        part = part if part in PARTS else "other"
        out[part] = out.get(part, 0) + n
    return out


def file_sizes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Bytes of a ternq file: total, header (with the metadata), and per part: all tensors, and the packed
    ones (codes + scales) among them. Read from the header alone."""
    import ternq

    with ternq.open(path) as f:
        stored = f.tensor_bytes()
        sizes = {name: n for name, (_, n) in stored.items()}
        packed = {name: n for name, (role, n) in stored.items() if role != "float"}
        weights = sum(math.prod(shape) for shape in f.shapes().values())
        return {"bytes": f.file_size, "header_bytes": f.header_size, "parts": part_bytes(sizes),
                "packed_parts": part_bytes(packed), "packed_layers": len(f.layers), "parameters": weights}


def _packed(cfg: BitTTSConfig, kind: dict[str, Any] | None, scope: str
            ) -> tuple[int, dict[str, int], dict[str, int]]:
    """(file bytes, tensor bytes per part, bytes one int8 per code would add per part) of `cfg`'s architecture
    quantized like a preset with ternq config `kind` (`cfg.quant.config` lends the other fields) and `scope`."""
    import ternq

    shared = {k: v for k, v in (cfg.quant.config.to_dict() if cfg.quant.config else {}).items()
              if k not in ("kind", "bits")}
    quant = QuantizationConfig(scope, cfg.quant.exclude, None if kind is None else {**shared, **kind})
    torch.manual_seed(0)  # sizes do not depend on the values; fixed anyway so reruns pack identical files
    model = BitTTS.for_inference(dataclasses.replace(cfg, quant=quant)).eval()
    packed = ternq.pack(model, allow_float=kind is None)
    parts = part_bytes({k: t.numel() * t.element_size() for k, t in packed.tensors.items()})
    unindexed_extra = part_bytes({layer["codes"]: layer["count"] - packed.tensors[layer["codes"]].numel()
                                  for layer in packed.manifest["layers"].values()})
    return len(packed.to_bytes()), parts, unindexed_extra


def size_table(cfg: BitTTSConfig, precisions: Sequence[str] = PRECISIONS) -> list[SizeRow]:
    """The size table for `cfg`'s architecture (its quant section only lends exclude and the ternq config's
    granularity, act_bits, ...).

    Rows: fp32, then 4-bit and 1.58-bit (those of `precisions`), each for scope acoustic and all, without and
    with weight indexing. fp32 is always measured: it is what the reductions are relative to.
    """
    if cfg.acoustic.n_symbols < 1:
        raise ValueError("size_table(): cfg.acoustic.n_symbols is 0; set it (e.g. len(bittts.data.text.SYMBOLS))")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"size_table(): unknown precision(s) {sorted(unknown)}; choose from {PRECISIONS}")
    rows: list[SizeRow] = []
    fp32 = 0
    for label, kind, scope in _VARIANTS:
        if label not in precisions and kind is not None:
            continue
        size, parts, extra = _packed(cfg, kind, scope)
        if kind is None:
            fp32 = size
            rows.append(SizeRow(label, None, None, size, parts, 0.0))
            continue
        unindexed = size + sum(extra.values())
        unindexed_parts = {k: parts.get(k, 0) + extra.get(k, 0) for k in parts}
        rows.append(SizeRow(label, scope, False, unindexed, unindexed_parts, 1 - unindexed / fp32))
        rows.append(SizeRow(label, scope, True, size, parts, 1 - size / fp32))
    return rows


def format_size_table(rows: list[SizeRow]) -> str:
    """A Markdown table of `size_table` rows (MB = 10^6 bytes; reduction relative to fp32)."""
    lines = ["| precision | quantized | weight indexing | size (MB) | acoustic (MB) | vocoder (MB) | reduction |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        scope = {None: "-", "acoustic": "acoustic only", "all": "all"}[r.scope]
        per_byte = "5" if r.precision == "1.58-bit" else "2"
        indexing = {None: "-", False: "without (int8 per weight)", True: f"with ({per_byte} per byte)"}[r.indexing]
        lines.append(f"| {r.precision} | {scope} | {indexing} | {r.mb:.2f} | {r.parts['acoustic'] / 1e6:.2f} | "
                     f"{r.parts['vocoder'] / 1e6:.2f} | {r.reduction:.1%} |")
    return "\n".join(lines)
