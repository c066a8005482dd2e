"""The ``ternq`` command: look inside and check packed model files.

    ternq inspect model.safetensors [--json]   per-tensor encoding, shape, bytes, bits/weight, code shares, metadata
    ternq verify model.safetensors [--json]    re-decode everything, check metadata and checksums; exit 0 if intact

Both read files with the numpy reference decoder (`ternq.format.reader`), so they check exactly what the format
specifies (docs/format.md), independently of the torch loader.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from ._text import aligned_table, human_bytes, printable
from .errors import TernqError
from .format.reader import (
    DTYPES,
    LayerRecord,
    Manifest,
    Source,
    check_tensor,
    read_header,
    read_manifest,
)

__all__ = ["main", "inspect_file", "verify_file"]

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE = 0, 1, 2
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # the dtypes whose values may be non-finite


def _items(manifest: Manifest) -> list[LayerRecord | str]:
    """Packed layers, then float tensors, in file order."""
    return [*manifest.layers.values(), *(r.name for r in manifest.tensors.values() if r.role == "float")]


def _progress(items: list[Any], desc: str, show: bool) -> Iterator[Any]:
    return iter(tqdm(items, desc=desc, unit="tensor", disable=None if show else True, leave=False))


def inspect_file(path: str | os.PathLike[str] | bytes, *, progress: bool = False) -> dict[str, Any]:
    """Per-tensor description and totals of a packed file (what ``ternq inspect --json`` prints).

    Everything is decoded and checked on the way, as by `verify_file` (a damaged file raises FormatError), in the
    same bounded memory: code shares are counted chunk by chunk, whatever a tensor's size.
    """
    rows: list[dict[str, Any]] = []
    with Source(path) as source:
        manifest = read_manifest(read_header(source))
        for item in _progress(_items(manifest), "inspect", progress):
            if isinstance(item, LayerRecord):
                rows.append(_describe_layer(source, manifest, item))
            else:
                rows.append(_describe_float(source, manifest, item))
        file_bytes, name = source.size, source.name
    weights = sum(r["count"] for r in rows)
    packed = [r for r in rows if r["kind"] == "packed"]
    packed_count = sum(r["count"] for r in packed)
    packed_bytes = sum(r["bytes"] for r in packed)
    fp32 = 4 * weights
    return {
        "file": name,
        "format_version": manifest.version,
        "library": manifest.library,
        "metadata": manifest.metadata,
        "tensors": rows,
        "totals": {
            "file_bytes": file_bytes,
            "elements": weights,
            "fp32_bytes": fp32,
            "fp32_ratio": file_bytes / fp32 if fp32 else None,
            "packed_layers": len(packed),
            "packed_weights": packed_count,
            "packed_bytes": packed_bytes,
            "packed_bits_per_weight": 8 * packed_bytes / packed_count if packed_count else None,
        },
    }


def _describe_layer(source: Source, manifest: Manifest, layer: LayerRecord) -> dict[str, Any]:
    counts = [0, 0]  # negative, zero: counted chunk by chunk as the codes are checked (bounded memory)

    def count(codes: np.ndarray) -> None:
        counts[0] += int(np.count_nonzero(codes < 0))
        counts[1] += int(np.count_nonzero(codes == 0))

    check_tensor(source, manifest, layer.codes, count)
    check_tensor(source, manifest, layer.scale)
    codes_bytes, scale_bytes = manifest.header.tensors[layer.codes].nbytes, manifest.header.tensors[layer.scale].nbytes
    neg, zero = counts
    pos = layer.count - neg - zero
    return {
        "name": layer.key, "kind": "packed", "encoding": layer.encoding, "shape": list(layer.shape),
        "count": layer.count, "bytes": codes_bytes + scale_bytes, "codes_bytes": codes_bytes,
        "scale_bytes": scale_bytes, "bits_per_weight": 8 * (codes_bytes + scale_bytes) / layer.count,
        "codes_bits_per_weight": 8 * codes_bytes / layer.count,
        "share": {"-": neg / layer.count, "0": zero / layer.count, "+": pos / layer.count},
        "config": layer.config, "type": layer.type,
    }


def _describe_float(source: Source, manifest: Manifest, name: str) -> dict[str, Any]:
    record = manifest.tensors[name]
    finite = [True]

    def check_finite(values: np.ndarray) -> None:
        finite[0] = finite[0] and bool(np.isfinite(values).all())

    check_tensor(source, manifest, name, check_finite if record.dtype in FLOAT_DTYPES else None)
    count = math.prod(record.shape)
    nbytes = count * DTYPES[record.dtype][1]
    return {"name": name, "kind": "float", "encoding": record.dtype, "shape": list(record.shape), "count": count,
            "bytes": nbytes, "bits_per_weight": 8 * DTYPES[record.dtype][1], "share": None,
            "finite": finite[0] if record.dtype in FLOAT_DTYPES else None}


def verify_file(path: str | os.PathLike[str] | bytes, *, progress: bool = False) -> dict[str, Any]:
    """Re-decode everything and check it; raises FormatError (ChecksumError) naming what is wrong.

    Checks: the safetensors header (lengths, offsets, dtypes, contiguity); the manifest and its CRC32; that the
    manifest and header agree on every tensor; each layer's config, encoding, count, codes and scale shapes;
    the CRC32 of every tensor's bytes; every code byte (valid, within the config's range, zero padding); scales
    finite, positive and bounded. Memory stays bounded whatever the file's size (tensors are read in chunks).
    """
    with Source(path) as source:
        manifest = read_manifest(read_header(source))
        for name in _progress(list(manifest.tensors), "verify", progress):
            check_tensor(source, manifest, name)
        return {"file": source.name, "ok": True, "tensors": len(manifest.tensors), "packed_layers": len(manifest.layers),
                "bytes": source.size}


def _table(info: dict[str, Any]) -> str:
    header = ("name", "encoding", "shape", "bytes", "bits/w", "-1 / 0 / +1")
    body = []
    for r in info["tensors"]:
        share = r["share"]
        shares = "" if share is None else f"{share['-']:.1%} / {share['0']:.1%} / {share['+']:.1%}"
        body.append((printable(r["name"]), r["encoding"], "x".join(map(str, r["shape"])) or "()", f"{r['bytes']:,}",
                     f"{r['bits_per_weight']:.3f}" if r["kind"] == "packed" else f"{r['bits_per_weight']:.0f}",
                     shares))
    t = info["totals"]
    lines = [f"{printable(info['file'])}: ternq format {info['format_version']}, written by "
             f"{printable(info['library'])}",
             *aligned_table(header, body, right={3, 4})]
    if t["packed_weights"]:
        lines.append(f"{t['packed_layers']} packed layers: {t['packed_weights']:,} weights in "
                     f"{human_bytes(t['packed_bytes'])}, {t['packed_bits_per_weight']:.3f} bits/weight with scales "
                     f"(log2(3) = {math.log2(3):.3f})")
    ratio = f"{1 / t['fp32_ratio']:.2f}x smaller" if t["fp32_ratio"] else "n/a"
    lines.append(f"file {human_bytes(t['file_bytes'])} vs {human_bytes(t['fp32_bytes'])} as fp32 ({ratio})")
    for key, value in info["metadata"].items():
        shown = printable(value if len(value) <= 100 else value[:97]) + ("" if len(value) <= 100 else
                                                                         f"... ({len(value):,} chars)")
        lines.append(f"metadata {printable(key)}: {shown}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ternq", description="Inspect and verify ternq packed model files (safetensors with 1.58-bit / k-bit "
                                  "packed weights).")
    parser.add_argument("--version", action="version", version=f"ternq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="per-tensor encoding, shape, size, bits per weight and code shares",
                       description="Print, for every tensor of FILE: its encoding, shape, bytes, bits per weight "
                                   "and (packed layers) the share of negative / zero / positive codes, then totals "
                                   "against fp32. Reads and checksums every tensor.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    v = sub.add_parser("verify", help="re-decode everything and check all checksums; exit 0 only if intact",
                       description="Re-decode FILE completely: header, manifest and its CRC32, every tensor's "
                                   "CRC32, every packed byte and code range, scales, in bounded memory. Exit status "
                                   f"0 if the file is intact, {EXIT_INVALID} if it is corrupted, malformed or not a "
                                   f"regular file, {EXIT_UNREADABLE} if it cannot be read.")
    v.add_argument("file", metavar="FILE")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ternq`` console script; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):  # any text a file holds prints, whatever the terminal's encoding
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    show = not args.no_progress
    try:
        if args.command == "inspect":
            info = inspect_file(args.file, progress=show)
            print(json.dumps(info, indent=1) if args.json else _table(info))
            return EXIT_OK
        result = verify_file(args.file, progress=show)
    except (TernqError, OSError) as e:
        message = printable(str(e) if isinstance(e, TernqError) else f"cannot read {args.file}: "
                                                                      f"{e.strerror or e}")
        if args.command == "verify" and args.json:
            print(json.dumps({"file": args.file, "ok": False, "error": message, "error_type": type(e).__name__}))
        elif isinstance(e, TernqError):
            print(f"ternq {args.command}: {type(e).__name__}: {message}", file=sys.stderr)
        else:
            print(f"ternq {args.command}: {message}", file=sys.stderr)
        return EXIT_INVALID if isinstance(e, TernqError) else EXIT_UNREADABLE
    if args.json:
        print(json.dumps(result))
    else:
        print(f"OK: {printable(args.file)}: {result['tensors']} tensors ({result['packed_layers']} packed layers), "
              f"{result['bytes']:,} bytes; every checksum and code verified")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
