"""The ternq file format with numpy and the standard library alone: header validation, checksums, decoding.

A ternq file is a standard safetensors file (see docs/format.md for the byte-level specification). This module
is the reference reader. It imports neither torch nor the rest of ternq, so a device without torch can decode a
file by copying this one file (or loading it by path)::

    spec = importlib.util.spec_from_file_location("ternq_numpy_format", "reader.py")
    nf = sys.modules["ternq_numpy_format"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nf)
    state = nf.load_numpy("model.safetensors", dequantize=True)   # {name: np.ndarray}, a float state dict

Every rule of the format is checked here, once: `read_header` and `read_manifest` (the header), `check_tensor`
(a tensor's bytes, in bounded memory). The torch loader (`ternq.format.torch`), ``ternq verify`` / ``inspect`` and
`read_metadata` all run these functions, so every check guards every reader. Everything read from a file is distrusted: sizes are bounded by the file size before
anything is allocated, every field is type-checked, and every tensor's bytes are checked against its CRC32.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

try:  # inside the ternq package: its exception classes
    from ..errors import ChecksumError, FormatError
except ImportError:  # loaded on its own (a device without torch): equivalents with the same names

    class FormatError(ValueError):  # type: ignore[no-redef]
        """A packed file is malformed: truncated, corrupted, inconsistent or of an unknown version."""

    class ChecksumError(FormatError):  # type: ignore[no-redef]
        """A tensor's bytes do not match the checksum recorded in the file's metadata."""


__all__ = [
    "FORMAT_VERSION",
    "ENCODINGS",
    "Encoding",
    "Source",
    "TensorEntry",
    "Header",
    "LayerRecord",
    "TensorRecord",
    "Manifest",
    "read_header",
    "read_manifest",
    "build_metadata",
    "read_metadata",
    "read_bytes",
    "read_array",
    "check_tensor",
    "verify",
    "check_scale",
    "unpack_numpy",
    "decode_layer",
    "dequantize_numpy",
    "load_numpy",
    "PackedFile",
    "open_packed",
    "encoding_for_config",
    "expected_scale_shape",
    "check_config",
    "effective_group_size",
    "open_regular_file",
    "crc32_hex",
]

FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 2**20  # 16 MiB: ~120x the shipped BitTTS header (95 packed layers), ~10,000 packed layers
# Parse memory bound: Python objects cost 24-64 bytes each, so a header may hold at most one JSON value (counted
# by its "," and ":" separators) per MIN_BYTES_PER_VALUE bytes and one object / array per MIN_BYTES_PER_CONTAINER
# bytes; ternq's own headers have >= 8.8 and >= 37 (measured on small and shipped models). Headers up to
# PARSE_SLACK bytes are exempt (they cost little whatever they hold).
MIN_BYTES_PER_VALUE = 6
MIN_BYTES_PER_CONTAINER = 16
PARSE_SLACK = 1 << 16
MAX_GROUP_SIZE = 2**31  # a group longer than a row is one group per row; this bounds the integer itself
MAX_EPS = 1.0  # config eps: a floor of scales, ~1e-5 in practice
#: functional op -> (dimensions of its weight, the dim of its output channels); addmm / matmul: ``x @ W``
FUNCTIONAL_TYPES = {"F.linear": (2, 0), "F.conv1d": (3, 0), "F.conv2d": (4, 0), "F.addmm": (2, 1), "F.matmul": (2, 1)}
#: the type of a weight-only site: a parameter its readers compute with (RNN, attention, experts, matmul)
WEIGHT_TYPE = "weight"
MAX_DIMS = 32  # numpy's historical limit; no model weight comes near it
MAX_DIM_SIZE = 2**53
DECODE_CHUNK = 1 << 16  # bytes decoded per step: indices and output stay in cache

KEY_VERSION = "ternq.version"
KEY_MANIFEST = "ternq.manifest"
KEY_MANIFEST_CRC = "ternq.manifest_crc32"
RESERVED_PREFIX = "ternq."  # metadata keys of the format itself; user metadata may use any other key

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element). BF16 has no numpy type: its
# bytes are read as uint16 and widened to float32.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("?", 1), "U8": ("u1", 1), "I8": ("i1", 1), "I16": ("<i2", 2), "U16": ("<u2", 2),
    "F16": ("<f2", 2), "BF16": ("<u2", 2), "I32": ("<i4", 4), "U32": ("<u4", 4), "F32": ("<f4", 4),
    "I64": ("<i8", 8), "U64": ("<u8", 8), "F64": ("<f8", 8),
}

#: Every dtype the safetensors library (0.8) reads, with its size in bits. The header is checked against this
#: table, so that ternq accepts exactly the headers safetensors accepts; a ternq file stores only `DTYPES`
#: (`read_manifest` refuses the others by name).
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
U64_MAX = 2**64 - 1  # safetensors' offsets and dimensions are usize (64-bit)
MAX_JSON_DEPTH = 127  # serde_json's recursion limit (128) as safetensors meets it: 127 nested objects / arrays


# --- encodings --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How integer weight codes are laid out in bytes.

    Attributes:
        name: the name recorded in the manifest.
        per_byte: codes per byte; element i of the flattened weight lies in byte i // per_byte.
        dtype: safetensors dtype of the payload tensor.
        lo, hi: the range of codes the encoding can represent.
    """

    name: str
    per_byte: int
    dtype: str
    lo: int
    hi: int

    def packed_length(self, count: int) -> int:
        """Payload bytes for `count` codes: the tail is padded to a whole byte with code 0."""
        return -(-count // self.per_byte)


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("trit5", 5, "U8", -1, 1),  # 5 ternary codes per byte, scaled base 3 (see _trit5_tables)
        Encoding("int2", 4, "U8", -2, 1),  # 4 codes per byte, 2-bit fields holding code + 2, LSB first
        Encoding("int4", 2, "U8", -8, 7),  # 2 codes per byte, 4-bit fields holding code + 8, LSB first
        Encoding("int8", 1, "I8", -128, 127),  # one two's-complement int8 per code
    )
}

_INVALID = -128  # what the trit5 table yields for the 13 byte values no encoder writes


def _trit5_tables() -> tuple[np.ndarray, np.ndarray]:
    """Encoder table (243,) uint8 and decoder table (256, 5) int8 of the "trit5" encoding.

    Five codes c0..c4 in {-1, 0, 1} form the base-3 number v = sum((c_k + 1) * 3**(4 - k)), 0 <= v <= 242,
    stored *scaled* to the byte range: b = ceil(v * 256 / 243). Trit k is then decoded with a multiply and a
    shift, no division: c_k = ((((b * 3**k) mod 256) * 3) >> 8) - 1 (see docs/format.md for why this layout).
    The decoder table is built from that formula and checked here against the digits of every v.
    """
    encode = np.zeros(243, np.uint8)
    decode = np.full((256, 5), _INVALID, np.int8)
    for v in range(243):
        b = (v * 256 + 242) // 243
        trits = [((((b * 3**k) & 0xFF) * 3) >> 8) - 1 for k in range(5)]
        digits = [(v // 3 ** (4 - k)) % 3 - 1 for k in range(5)]
        if trits != digits:  # pragma: no cover - a broken build of the tables, not bad input
            raise AssertionError(f"trit5 decode of byte {b} gives {trits}, expected {digits}")
        encode[v] = b
        decode[b] = trits
    return encode, decode


def _field_table(bits: int) -> np.ndarray:
    """Decoder table (256, 8 // bits) int8 of a k-bit field encoding: field j of byte b is code j."""
    per_byte, bias, mask = 8 // bits, 1 << (bits - 1), (1 << bits) - 1
    b = np.arange(256)[:, None]
    shifts = np.arange(per_byte)[None, :] * bits
    return (((b >> shifts) & mask) - bias).astype(np.int8)


TRIT5_ENCODE, TRIT5_DECODE = _trit5_tables()
DECODE_TABLES: dict[str, np.ndarray] = {"trit5": TRIT5_DECODE, "int2": _field_table(2), "int4": _field_table(4)}


@functools.cache
def _pair_table(encoding: str) -> np.ndarray:
    """Decoder table of byte pairs: row ``b0 | b1 << 8`` holds the codes of b0 then those of b1, as one item
    (int32 / int64 for 4 / 8 codes, a 10-byte void for trit5) so that `np.take` moves a row in one copy."""
    table = DECODE_TABLES[encoding]
    width = table.shape[1]
    pair = np.empty((256, 256, 2 * width), np.int8)  # [second byte, first byte]
    pair[:, :, :width] = table[None, :, :]
    pair[:, :, width:] = table[:, None, :]
    return pair.reshape(-1).view(np.dtype(f"i{2 * width}") if 2 * width in (4, 8) else np.dtype(f"V{2 * width}"))


def encoding_for_config(config: dict[str, Any]) -> str:
    """The encoding a layer of this config (``QuantConfig.to_dict()``) is stored in."""
    if config.get("kind") == "ternary":
        return "trit5"
    bits = config.get("bits")
    return "int2" if bits == 2 else "int4" if bits in (3, 4) else "int8"


def _qmax(config: dict[str, Any]) -> int:
    return 1 if config["kind"] == "ternary" else 2 ** (config["bits"] - 1) - 1


def unpack_numpy(packed: np.ndarray, encoding: str, count: int, *, qmax: int | None = None,
                 what: str = "packed codes") -> np.ndarray:
    """Decode `count` codes (int8, 1-D) from a payload, checking every byte.

    Raises FormatError when the payload has the wrong length, holds a byte no encoder writes, a code outside
    ``[-qmax, qmax]`` (default: the encoding's range) or non-zero padding after the last code.
    """
    enc = _encoding(encoding, what)
    flat = np.ascontiguousarray(packed).reshape(-1)
    if flat.dtype != np.dtype(DTYPES[enc.dtype][0]):
        raise FormatError(f"{what}: payload dtype {flat.dtype} does not match encoding {encoding!r} ({enc.dtype})")
    if flat.size != enc.packed_length(count):
        raise FormatError(f"{what}: {flat.size} payload elements cannot hold {count} codes in {encoding!r} "
                          f"(expected {enc.packed_length(count)})")
    lo, hi = (enc.lo, enc.hi) if qmax is None else (-qmax, qmax)
    if enc.per_byte == 1:
        out = flat.view(np.int8).copy()
        _check_range(out, lo, hi, what, enc)
        return out
    # two bytes per lookup: a 65536-row table of byte pairs halves numpy's per-index overhead (2x faster)
    width = 2 * enc.per_byte
    pairs = flat.size // 2
    codes = np.empty(flat.size * enc.per_byte, np.int8)
    table = _pair_table(encoding)
    out = codes[:pairs * width].view(table.dtype)
    index = flat[:2 * pairs].view("<u2")  # first byte in the low bits
    step = DECODE_CHUNK // 2
    for start in range(0, pairs, step):
        chunk = out[start:start + step]
        np.take(table, index[start:start + step], out=chunk)
        _check_range(chunk.view(np.int8), lo, hi, what, enc)
    if flat.size % 2:
        codes[-enc.per_byte:] = DECODE_TABLES[encoding][flat[-1]]
        _check_range(codes[-enc.per_byte:], lo, hi, what, enc)
    if codes[count:].any():
        raise FormatError(f"{what}: padding after the last of {count} codes is not zero")
    return codes[:count]


def _check_range(codes: np.ndarray, lo: int, hi: int, what: str, enc: Encoding) -> None:
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise FormatError(_range_message(int(codes[(codes < lo) | (codes > hi)][0]), lo, hi, what, enc))


def _range_message(bad: int, lo: int, hi: int, what: str, enc: Encoding) -> str:
    if bad == _INVALID and enc.name == "trit5":
        return f"{what}: holds a byte value that no trit5 encoder writes (one of the 13 unused values)"
    return f"{what}: code {bad} is outside the range [{lo}, {hi}] of its config"


def _encoding(name: object, what: str) -> Encoding:
    if not isinstance(name, str) or name not in ENCODINGS:
        raise FormatError(f"{what}: unknown encoding {name!r}; this ternq knows {sorted(ENCODINGS)}")
    return ENCODINGS[name]


# --- reading bytes ----------------------------------------------------------------------------------------------


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for reading if it is a regular file; FormatError naming what it is otherwise.

    Opened non-blocking first, so a named pipe without a writer cannot block the reader; then checked with
    fstat on the open descriptor (no race between the check and the open). A missing file raises
    FileNotFoundError, an unreadable one PermissionError, as `open` does.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except IsADirectoryError:  # some systems refuse to open a directory at all
        fd = -1
    mode = os.fstat(fd).st_mode if fd >= 0 else stat.S_IFDIR
    if not stat.S_ISREG(mode):
        if fd >= 0:
            os.close(fd)
        kind = next((k for test, k in _FILE_KINDS if test(mode)), "not a regular file")
        raise FormatError(f"{name} is {kind}, not a file: give the path of a .safetensors file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class Source:
    """Random access to the bytes of a file (path) or of an in-memory buffer; use as a context manager."""

    def __init__(self, src: str | os.PathLike[str] | bytes | bytearray | memoryview) -> None:
        self._file: BinaryIO | None = None
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._buf = memoryview(src).cast("B")
            self.name = "<bytes>"
            self.size = self._buf.nbytes
        else:
            self.name = os.fspath(src)
            self._file = open_regular_file(self.name)
            self.size = os.fstat(self._file.fileno()).st_size

    def readinto(self, offset: int, out: np.ndarray | memoryview) -> None:
        """Fill `out` (a writable contiguous buffer) with the bytes at `offset`."""
        view = memoryview(out).cast("B")
        n = view.nbytes
        if offset + n > self.size:
            raise FormatError(f"{self.name}: read of {n} bytes at {offset} runs past the end ({self.size} bytes)")
        if self._file is None:
            view[:] = self._buf[offset:offset + n]
            return
        self._file.seek(offset)
        done = 0
        while done < n:
            got = self._file.readinto(view[done:])
            if not got:
                raise FormatError(f"{self.name}: file ended after {offset + done} bytes while reading "
                                  f"(it shrank while being read?)")
            done += got

    def read(self, offset: int, n: int) -> bytes:
        out = bytearray(n)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def crc32_hex(data: Any) -> str:
    """CRC-32 (zlib, the one of PNG and gzip) of a buffer, as 8 lowercase hex digits."""
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


# --- the safetensors header -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the safetensors header; `begin`/`end` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in data order, the metadata, where the data starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    source_name: str


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number (writers never emit it)")


def _parse_json(text: str, what: str) -> Any:
    """Parse a header or manifest: strict JSON (no NaN / Infinity, no duplicate key), with parse memory bounded
    by a small multiple of `text`'s length (values and containers counted over the raw text, strings included,
    so never undercounted; see MIN_BYTES_PER_VALUE), and every string encodable as UTF-8 (no lone surrogate
    from a ``\\ud800`` escape)."""
    _check_density(text, what)
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply to be a ternq header") from None
    except ValueError as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    _check_strings(doc, what)
    return doc


def _check_density(text: str, what: str) -> None:
    """Parse memory bound: at most one JSON value per MIN_BYTES_PER_VALUE characters (beyond PARSE_SLACK)."""
    if len(text) > PARSE_SLACK:
        containers = text.count("{") + text.count("[")
        values = text.count(",") + text.count(":") + containers
        for count, kind, per in ((containers, "objects/arrays", MIN_BYTES_PER_CONTAINER),
                                 (values, "values", MIN_BYTES_PER_VALUE)):
            if count * per > len(text):
                raise FormatError(f"{what} holds {count:,} JSON {kind} in {len(text):,} characters (more than one "
                                  f"per {per}): not a header ternq writes (corrupted or hostile)")


def _check_strings(doc: Any, what: str) -> None:
    """Every key and string value of a parsed document must be valid Unicode text (encodable as UTF-8)."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: list[Any] = [item]
        elif isinstance(item, _Object):
            strings = [k for k, _ in item]
            stack.extend(v for _, v in item)
        elif isinstance(item, dict):
            strings = list(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            strings = []
            stack.extend(item)
        else:
            continue
        for text in strings:
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise FormatError(f"{what}: string {text[:40]!r} holds a lone surrogate "
                                      f"({text[e.start]!r}), which is not text: the header was forged") from None


def _is_dtype(value: object) -> bool:
    return isinstance(value, str) and value in DTYPES


def _nonneg_int(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise FormatError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise FormatError(f"{what} must be a list of at most {MAX_DIMS} dimensions, got {value!r:.80}")
    dims = tuple(_nonneg_int(d, what) for d in value)
    if any(d > MAX_DIM_SIZE for d in dims):
        raise FormatError(f"{what} has a dimension above {MAX_DIM_SIZE}: {list(dims)}")
    return dims


class _Object(list):  # type: ignore[type-arg]
    """A JSON object of the header as its (key, value) pairs, in order: what a duplicate key means depends on
    where it is (safetensors refuses a repeated field, keeps the last of repeated map keys)."""


def _header_int(text: str) -> int | float:
    """A JSON integer as serde_json reads it: ``-0`` and integers beyond 64 bits are floats (never an offset or
    a dimension); too large for a float is an error."""
    value = int(text)
    if value == 0 and text.startswith("-") or not -(2**63) <= value <= U64_MAX:
        return _header_float(text)
    return value


def _header_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]}... is out of range")
    return value


def _json_depth(doc: Any) -> int:
    depth, stack = 0, [(doc, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, list):  # arrays and _Object
            depth = max(depth, level)
            stack.extend((v[1] if isinstance(item, _Object) else v, level + 1) for v in item)
    return depth


def _parse_header_json(text: str, what: str) -> Any:
    """Parse a header exactly as safetensors' serde_json does (objects as `_Object`), within ternq's memory
    bounds."""
    _check_density(text, what)
    try:
        doc = json.loads(text, object_pairs_hook=_Object, parse_int=_header_int, parse_float=_header_float,
                         parse_constant=_no_constants)
    except RecursionError:
        raise FormatError(f"{what} is nested too deeply (over {MAX_JSON_DEPTH} levels, safetensors' limit)") from None
    except ValueError as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from None
    if _json_depth(doc) > MAX_JSON_DEPTH:
        raise FormatError(f"{what} is nested too deeply (over {MAX_JSON_DEPTH} levels, safetensors' limit)")
    _check_strings(doc, what)
    return doc


def _brief(value: object) -> str:
    """A short description of a parsed JSON value for an error message (never the repr of a huge container)."""
    if isinstance(value, _Object):
        return f"an object of {len(value)} fields" if len(value) > 4 else repr(dict(value))[:80]
    if isinstance(value, list):
        return f"an array of {len(value)} values" if len(value) > 4 else repr(value)[:80]
    return repr(value)[:80]


def _header_dtype(value: object, what: str) -> str:
    if isinstance(value, _Object) and len(value) == 1 and value[0][1] is None:
        value = value[0][0]  # serde's other spelling of an enum variant: {"F32": null}
    if not isinstance(value, str) or value not in SAFETENSORS_DTYPE_BITS:
        raise FormatError(f"{what}: unknown dtype {_brief(value)}; safetensors knows {sorted(SAFETENSORS_DTYPE_BITS)}")
    return value


def _usize(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise FormatError(f"{what} must be a non-negative integer (no sign, fraction or exponent) below 2**64, "
                          f"got {_brief(value)}")
    return value


def _tensor_fields(spec: object, what: str) -> tuple[object, object, object]:
    """(dtype, shape, data_offsets) of a header entry: an object with these fields (others ignored, as by
    safetensors) or, serde's other spelling of a struct, an array of exactly these three values."""
    if isinstance(spec, _Object):
        fields: dict[str, object] = {}
        for key, value in spec:
            if key in ("dtype", "shape", "data_offsets"):
                if key in fields:
                    raise FormatError(f"{what}: duplicate field {key!r}")
                fields[key] = value
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in fields]
        if missing:
            raise FormatError(f"{what}: missing field {missing[0]!r} (a tensor has dtype, shape, data_offsets)")
        return fields["dtype"], fields["shape"], fields["data_offsets"]
    if type(spec) is list and len(spec) == 3:
        return spec[0], spec[1], spec[2]
    raise FormatError(f"{what}: expected an object with dtype, shape and data_offsets, got {_brief(spec)}")


def _tensor_entry(spec: object, what: str) -> tuple[str, tuple[int, ...], int, int]:
    """dtype, shape, begin, end of a header entry, each of its type (every entry of a repeated name is)."""
    dtype_value, shape_value, offsets = _tensor_fields(spec, what)
    dtype = _header_dtype(dtype_value, what)
    if type(shape_value) is not list:
        raise FormatError(f"{what}: shape must be a list of dimensions, got {_brief(shape_value)}")
    shape = tuple(_usize(d, f"{what}: shape") for d in shape_value)
    if type(offsets) is not list or len(offsets) != 2:
        raise FormatError(f"{what}: data_offsets must be [begin, end], got {_brief(offsets)}")
    begin, end = (_usize(o, f"{what}: data_offsets") for o in offsets)
    return dtype, shape, begin, end


def read_header(source: Source) -> Header:
    """Read and validate the safetensors header; nothing is allocated beyond what the file's size allows.

    Accepts exactly the headers the safetensors library (0.8) accepts (docs/format.md, section 1), within two
    memory bounds of ternq's own (`MAX_HEADER_BYTES`, `MIN_BYTES_PER_VALUE`): the 8-byte little-endian length
    runs within the file; the header is UTF-8 JSON (no lone surrogate, at most 127 levels deep, no number too
    large for a float); ``__metadata__`` appears at most once and maps strings to strings (or is null); each
    tensor has a safetensors dtype, a shape of 64-bit dimensions, and 64-bit offsets whose span is exactly its
    byte count (no overflow); the tensors, sorted by offsets, tile the data section from its first byte to the
    file's last. Like safetensors, a tensor name given twice means its last entry, and unknown fields of a tensor
    are ignored. Numbers that are no plain non-negative integers (``-0``, ``1.0``, ``1e0``) are no offsets.
    """
    name = source.name
    if source.size < 8:
        raise FormatError(f"{name}: {source.size} bytes is too short for a safetensors file "
                          "(an 8-byte header length, then the header): truncated?")
    n = int.from_bytes(source.read(0, 8), "little")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit: "
                          "corrupted or not a safetensors file")
    if 8 + n > source.size:
        raise FormatError(f"{name}: header length {n} runs past the end of the {source.size}-byte file: "
                          "truncated or corrupted")
    raw = source.read(8, n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{name}: header is not UTF-8 (byte {8 + e.start}): corrupted") from None
    obj = _parse_header_json(text, f"{name}: header")
    if not isinstance(obj, _Object):
        raise FormatError(f"{name}: header must be a JSON object, got {type(obj).__name__}")
    metadata: dict[str, str] | None = None
    specs: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    seen_metadata = False
    for key, value in obj:
        if key != "__metadata__":
            specs[key] = _tensor_entry(value, f"{name}: tensor {key!r}")  # a repeated name: the last entry
            continue
        if seen_metadata:
            raise FormatError(f"{name}: __metadata__ appears twice")
        seen_metadata = True
        if value is not None and not (isinstance(value, _Object) and all(isinstance(v, str) for _, v in value)):
            raise FormatError(f"{name}: __metadata__ must map strings to strings")
        metadata = dict(value) if value is not None else None
    data_start, data_len = 8 + n, source.size - 8 - n
    entries = []
    for key, (dtype, shape, begin, end) in specs.items():
        what = f"{name}: tensor {key!r}"
        count = 1
        for d in shape:  # in safetensors' order, with its 64-bit overflow check
            count *= d
            if count > U64_MAX:
                raise FormatError(f"{what}: shape {list(shape)} has more than 2**64 elements")
        bits = count * SAFETENSORS_DTYPE_BITS[dtype]
        if bits > U64_MAX:
            raise FormatError(f"{what}: {count} elements of {dtype} need more than 2**64 bits: corrupted")
        if bits % 8:
            raise FormatError(f"{what}: {count} elements of {dtype} are not a whole number of bytes")
        if end < begin or end - begin != bits // 8:
            raise FormatError(f"{what}: data_offsets {[begin, end]} span {end - begin} bytes, but {dtype} of shape "
                              f"{list(shape)} needs {bits // 8}")
        entries.append(TensorEntry(key, dtype, shape, data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = data_start
    for e in entries:
        if e.begin != pos:
            gap = "overlaps the previous tensor" if e.begin < pos else f"leaves a gap of {e.begin - pos} bytes"
            raise FormatError(f"{name}: tensor {e.name!r} starts at data offset {e.begin - data_start}, which "
                              f"{gap}: safetensors data must be contiguous")
        pos = e.end
    if pos != source.size:
        state = "truncated" if pos > source.size else "followed by unexplained bytes"
        raise FormatError(f"{name}: the tensors need {pos - data_start} data bytes but the file holds {data_len}: "
                          f"{state}")
    return Header({e.name: e for e in entries}, dict(metadata or {}), data_start, source.size, name)


# --- the ternq manifest -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRecord:
    """The manifest's record of one tensor: role ("codes", "scale" or "float"), dtype, shape, CRC32."""

    name: str
    role: str
    dtype: str
    shape: tuple[int, ...]
    crc32: str
    orig_dtype: str | None = None


@dataclass(frozen=True)
class LayerRecord:
    """The manifest's record of one packed weight (see docs/format.md for each field).

    `key` is the weight's state_dict key in the float model, `module` the path of the layer holding it (for a
    functional ``F.linear`` call: the module whose parameter it is) and `weight` its attribute there.
    """

    key: str
    module: str
    type: str
    weight: str
    out_dim: int
    shape: tuple[int, ...]
    dtype: str
    config: dict[str, Any]
    encoding: str
    count: int
    codes: str
    scale: str
    rule: str | None = None
    readers: tuple[str, ...] = ()  # modules whose forward reads the weight itself (besides its layer)
    aliases: tuple[str, ...] = ()  # other state_dict keys of the same tensor (a tie), which read its codes too

    @property
    def qmax(self) -> int:
        return _qmax(self.config)


@dataclass(frozen=True)
class Manifest:
    """The validated ternq manifest, cross-checked against the safetensors header."""

    version: int
    library: str
    layers: dict[str, LayerRecord]
    tensors: dict[str, TensorRecord]
    selection: Any
    float_dtype: str | None
    header: Header
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # user metadata, each value CRC-checked
    owners: dict[str, str] = dataclasses.field(default_factory=dict)  # codes / scale tensor -> its layer's key
    tied: dict[str, str] = dataclasses.field(default_factory=dict)  # state_dict key -> float tensor stored for it


_LAYER_FIELDS = {"module", "type", "weight", "out_dim", "shape", "dtype", "config", "encoding", "count", "codes", "scale"}
_ROLES = ("codes", "scale", "float")
_GRANULARITIES = ("tensor", "channel", "group")


def expected_scale_shape(shape: tuple[int, ...], out_dim: int, config: dict[str, Any]) -> tuple[int, ...]:
    """Stored shape of the scales of a weight (see `ternq.qat.quantizers`): (1,), (rows,) or (rows, n_groups)."""
    rows = 1 if len(shape) <= 1 else shape[out_dim]
    fan_in = math.prod(shape) // rows if rows else 0
    if config["granularity"] == "tensor":
        return (1,)
    if config["granularity"] == "channel":
        return (rows,)
    return (rows, -(-fan_in // config["group_size"]))


_CONFIG_CHOICES: dict[str, tuple[Any, ...]] = {
    "kind": ("ternary", "kbit"),
    "granularity": _GRANULARITIES,
    "input_norm": (None, "layernorm", "rmsnorm"),
    "ste": ("identity", "clipped"),
    "act_granularity": ("token", "tensor"),
}
_CONFIG_FIELDS = {*_CONFIG_CHOICES, "bits", "group_size", "act_bits", "eps"}


def _int_in(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_config(config: object, what: str, error: type[Exception] | None = None) -> dict[str, Any]:
    """A config (``QuantConfig.to_dict()``): every field of a known type and in range, no unknown field.

    The one validation of a config: of a stored one (raising `FormatError`) and, through ``QuantConfig``, of
    one made in code (raising `error`, there `ConfigError`); the torch loader builds its QuantConfig from it.
    """
    if error is None:
        error = FormatError
    if not isinstance(config, dict):
        raise error(f"{what}: config must be an object, got {config!r:.80}")
    unknown = sorted(set(config) - _CONFIG_FIELDS) + (["bits"] if config.get("kind") == "ternary" and "bits" in
                                                       config else [])
    if unknown:
        raise error(f"{what}: config has unknown fields {unknown}")
    for key, choices in _CONFIG_CHOICES.items():
        value = config.get(key, "token" if key == "act_granularity" else None)
        if value not in choices or isinstance(value, bool):
            raise error(f"{what}: config {key} {value!r:.40} is not one of {choices}")
    if config["kind"] == "kbit" and not _int_in(config.get("bits"), 2, 8):
        raise error(f"{what}: config bits {config.get('bits')!r:.40} is not an integer in 2..8")
    if not _int_in(config.get("group_size"), 1, MAX_GROUP_SIZE):
        raise error(f"{what}: config group_size {config.get('group_size')!r:.40} is not an integer in "
                          f"1..{MAX_GROUP_SIZE}")
    act_bits = config.get("act_bits")
    if act_bits is not None and not _int_in(act_bits, 2, 8):
        raise error(f"{what}: config act_bits {act_bits!r:.40} is neither null nor an integer in 2..8")
    eps = config.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= MAX_EPS:  # (NaN and +-inf fail the comparison)
        raise error(f"{what}: config eps {eps!r:.40} is not a number in (0, {MAX_EPS}]")
    return config


def effective_group_size(layer: LayerRecord) -> int:
    """The group length that decoding uses: a group longer than a row (``group_size`` > fan_in) is the row
    itself, so nothing is ever sized by ``group_size`` beyond the weight's own row."""
    rows = 1 if len(layer.shape) <= 1 else layer.shape[layer.out_dim]
    return max(1, min(layer.config["group_size"], layer.count // max(rows, 1)))


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise FormatError(f"{what}: field {key!r} is missing or not of type "
                          f"{getattr(kind, '__name__', kind)}, got {value!r:.80}")
    return value


def read_manifest(header: Header) -> Manifest:
    """Validate the ternq metadata of a header and cross-check it against the tensors the header lists.

    Raises FormatError naming the tensor or layer at fault (ChecksumError when the manifest's own CRC32 does
    not match), or when the file is not a ternq file or was written by a newer format version.
    """
    name, meta = header.source_name, header.metadata
    if KEY_VERSION not in meta:
        raise FormatError(f"{name}: not a ternq file: its metadata has no {KEY_VERSION!r} (a plain safetensors "
                          "checkpoint? load it with safetensors / load_state_dict instead)")
    version_text = meta[KEY_VERSION]
    if not (version_text.isascii() and version_text.isdigit()) or len(version_text) > 6 or \
            version_text != str(int(version_text)):
        raise FormatError(f"{name}: format version {version_text!r} is not a decimal number as writers write it "
                          "(e.g. \"1\")")
    version = int(version_text)
    if version != FORMAT_VERSION:
        newer = "newer than" if version > FORMAT_VERSION else "not one of the versions"
        raise FormatError(f"{name}: ternq format version {version} is {newer} this reader supports "
                          f"({FORMAT_VERSION}); upgrade ternq to read it")
    for key in (KEY_MANIFEST, KEY_MANIFEST_CRC):
        if key not in meta:
            raise FormatError(f"{name}: metadata has no {key!r}")
    text = meta[KEY_MANIFEST]
    if crc32_hex(text.encode("utf-8")) != meta[KEY_MANIFEST_CRC]:
        raise ChecksumError(f"{name}: the manifest does not match its CRC32 {meta[KEY_MANIFEST_CRC]!r}: "
                            "the header is corrupted")
    doc = _parse_json(text, f"{name}: manifest")
    if not isinstance(doc, dict):
        raise FormatError(f"{name}: manifest must be a JSON object")
    if type(doc.get("format_version")) is not int or doc["format_version"] != version:
        raise FormatError(f"{name}: manifest format_version {doc.get('format_version')!r} contradicts "
                          f"{KEY_VERSION}={version}")
    library = _field(doc, "library", str, f"{name}: manifest")
    float_dtype = doc.get("float_dtype")
    if float_dtype is not None and not _is_dtype(float_dtype):
        raise FormatError(f"{name}: manifest float_dtype {float_dtype!r} is not a safetensors dtype")
    tensors = _read_tensor_records(_field(doc, "tensors", dict, f"{name}: manifest"), header)
    layers_doc = _field(doc, "layers", dict, f"{name}: manifest")
    layers = {key: _read_layer(key, spec, tensors, name) for key, spec in layers_doc.items()}
    used: dict[str, str] = {}
    for layer in layers.values():
        for t in (layer.codes, layer.scale):
            if t in used:
                raise FormatError(f"{name}: tensor {t!r} is claimed by layers {used[t]!r} and {layer.key!r}")
            used[t] = layer.key
    for t in tensors.values():
        if t.role != "float" and t.name not in used:
            raise FormatError(f"{name}: tensor {t.name!r} has role {t.role!r} but no layer uses it")
    metadata = _read_user_metadata(doc.get("metadata", {}), header)
    tied = _read_tied(doc.get("tied", {}), tensors, name)
    _check_aliases(layers, tensors, tied, name)
    return Manifest(version, library, layers, tensors, doc.get("selection"), float_dtype, header, metadata, used,
                    tied)


def _check_aliases(layers: dict[str, LayerRecord], tensors: dict[str, TensorRecord], tied: dict[str, str],
                   name: str) -> None:
    """A key is the alias of one packed weight at most, and nothing else: not a packed weight's key, not a tensor
    of the file, not a tied key (each would give one state_dict key two values)."""
    owner: dict[str, str] = {}
    for layer in layers.values():
        for alias in layer.aliases:
            other = owner.setdefault(alias, layer.key)
            clash = ("an alias of " + repr(other) if other != layer.key else
                     "a packed weight" if alias in layers else "a tensor of the file" if alias in tensors else
                     "a tied key" if alias in tied else None)
            if clash is not None:
                raise FormatError(f"{name}: layer {layer.key!r} lists alias {alias!r}, which is also {clash}")


def _read_tied(doc: object, tensors: dict[str, TensorRecord], name: str) -> dict[str, str]:
    """State_dict keys stored once under another key (tied weights): key -> the float tensor holding them."""
    if not isinstance(doc, dict):
        raise FormatError(f"{name}: manifest field 'tied' must be an object, got {type(doc).__name__}")
    for key, target in doc.items():
        if not isinstance(target, str) or target not in tensors or tensors[target].role != "float":
            raise FormatError(f"{name}: tied key {key!r} points to {target!r:.80}, which is not a float tensor of "
                              "the file")
        if key in tensors:
            raise FormatError(f"{name}: tied key {key!r} is also stored as a tensor of its own")
    return dict(doc)


def _read_user_metadata(doc: object, header: Header) -> dict[str, str]:
    """The user metadata the manifest lists (key -> CRC32 of the value), checked against ``__metadata__``."""
    name = header.source_name
    if not isinstance(doc, dict):
        raise FormatError(f"{name}: manifest metadata must be an object, got {doc!r:.80}")
    out = {}
    for key, crc in doc.items():
        what = f"{name}: metadata {key!r}"
        if not key or key.startswith(RESERVED_PREFIX):
            raise FormatError(f"{what}: user metadata keys must be non-empty and not start with {RESERVED_PREFIX!r}")
        if key not in header.metadata:
            raise FormatError(f"{what} is listed in the manifest but missing from __metadata__")
        value = header.metadata[key]
        if not isinstance(crc, str) or crc32_hex(value.encode("utf-8")) != crc:
            raise ChecksumError(f"{what}: the value does not match its CRC32 {crc!r:.20}: the header is corrupted")
        out[key] = value
    return out


def _read_tensor_records(doc: dict[str, Any], header: Header) -> dict[str, TensorRecord]:
    name = header.source_name
    missing = sorted(set(doc) - set(header.tensors))
    extra = sorted(set(header.tensors) - set(doc))
    if missing:
        raise FormatError(f"{name}: tensor {missing[0]!r} is listed in the manifest but missing from the file"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise FormatError(f"{name}: tensor {extra[0]!r} is in the file but not in the manifest"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    records = {}
    for key, spec in doc.items():
        what = f"{name}: tensor {key!r}"
        if not isinstance(spec, dict):
            raise FormatError(f"{what}: manifest entry must be an object")
        role = spec.get("role")
        if role not in _ROLES:
            raise FormatError(f"{what}: role {role!r} is not one of {_ROLES}")
        dtype = _field(spec, "dtype", str, what)
        if not _is_dtype(header.tensors[key].dtype):
            raise FormatError(f"{what}: dtype {header.tensors[key].dtype} is valid safetensors, but no ternq file "
                              f"stores it (ternq stores {sorted(DTYPES)})")
        shape = _shape(spec.get("shape"), f"{what}: manifest shape")
        crc = _field(spec, "crc32", str, what)
        if len(crc) != 8 or any(c not in "0123456789abcdef" for c in crc):
            raise FormatError(f"{what}: crc32 {crc!r} is not 8 lowercase hex digits")
        entry = header.tensors[key]
        if (dtype, shape) != (entry.dtype, entry.shape):
            raise FormatError(f"{what}: the header says {entry.dtype} {list(entry.shape)}, the manifest "
                              f"{dtype} {list(shape)}")
        orig = spec.get("orig_dtype")
        if role == "float" and not _is_dtype(orig):
            raise FormatError(f"{what}: orig_dtype {orig!r} is not a safetensors dtype")
        records[key] = TensorRecord(key, role, dtype, shape, crc, orig if role == "float" else None)
    return records


def _read_layer(key: str, spec: object, tensors: dict[str, TensorRecord], name: str) -> LayerRecord:
    what = f"{name}: layer {key!r}"
    if not isinstance(spec, dict) or not _LAYER_FIELDS <= set(spec):
        missing = sorted(_LAYER_FIELDS - set(spec)) if isinstance(spec, dict) else sorted(_LAYER_FIELDS)
        raise FormatError(f"{what}: manifest entry lacks {missing}")
    for field in ("module", "type", "weight"):
        if not isinstance(spec[field], str) or (field != "module" and not spec[field]):
            raise FormatError(f"{what}: field {field!r} must be a string, got {spec[field]!r:.80}")
    if key != (f"{spec['module']}.{spec['weight']}" if spec["module"] else spec["weight"]):
        raise FormatError(f"{what}: key is not module {spec['module']!r} + '.' + weight {spec['weight']!r}")
    shape = _shape(spec["shape"], f"{what}: shape")
    if not shape:
        raise FormatError(f"{what}: a packed weight needs at least one dimension")
    out_dim = _nonneg_int(spec["out_dim"], f"{what}: out_dim")
    if out_dim >= max(len(shape), 1):
        raise FormatError(f"{what}: out_dim {out_dim} is not a dimension of shape {list(shape)}")
    layer_type = spec["type"]
    if layer_type.startswith("F."):
        if layer_type not in FUNCTIONAL_TYPES:
            raise FormatError(f"{what}: unknown functional op {layer_type!r}; this reader knows "
                              f"{sorted(FUNCTIONAL_TYPES)}")
        dims, outputs = FUNCTIONAL_TYPES[layer_type]
        if len(shape) != dims or out_dim != outputs:
            raise FormatError(f"{what}: a {layer_type} weight has {dims} dimensions with outputs on dim {outputs}, "
                              f"but the file says shape {list(shape)}, out_dim {out_dim}")
    elif layer_type == WEIGHT_TYPE and len(shape) < 2:
        raise FormatError(f"{what}: a weight-only site needs a weight of 2+ dimensions, got shape {list(shape)}")
    config = check_config(spec["config"], what)
    encoding = _encoding(spec["encoding"], what)
    expected = encoding_for_config(config)
    if encoding.name != expected:
        raise FormatError(f"{what}: encoding {encoding.name!r} does not match its config, which is stored as "
                          f"{expected!r}")
    count = _nonneg_int(spec["count"], f"{what}: count")
    if count == 0:
        raise FormatError(f"{what}: a packed weight must have at least one element")
    if count != math.prod(shape):
        raise FormatError(f"{what}: count {count} is not the element count {math.prod(shape)} of shape "
                          f"{list(shape)}")
    dtype = spec["dtype"]
    if dtype not in ("F32", "F16", "BF16", "F64"):
        raise FormatError(f"{what}: weight dtype {dtype!r} is not a float dtype")
    codes, scale = spec["codes"], spec["scale"]
    for role, t in (("codes", codes), ("scale", scale)):
        if not isinstance(t, str) or t not in tensors:
            raise FormatError(f"{what}: its {role} tensor {t!r:.80} is not in the file")
        if tensors[t].role != role:
            raise FormatError(f"{what}: tensor {t!r} has role {tensors[t].role!r}, expected {role!r}")
    c = tensors[codes]
    if c.dtype != encoding.dtype or c.shape != (encoding.packed_length(count),):
        raise FormatError(f"{what}: codes tensor {codes!r} is {c.dtype} {list(c.shape)}, but {count} codes in "
                          f"{encoding.name!r} need {encoding.dtype} [{encoding.packed_length(count)}]")
    s = tensors[scale]
    s_shape = expected_scale_shape(shape, out_dim, config)
    if s.dtype != "F32" or s.shape != s_shape:
        raise FormatError(f"{what}: scale tensor {scale!r} is {s.dtype} {list(s.shape)}, expected F32 "
                          f"{list(s_shape)} for granularity {config['granularity']!r}")
    rule = spec.get("rule")
    readers = spec.get("readers", [])
    if not isinstance(readers, list) or not all(isinstance(r, str) for r in readers):
        raise FormatError(f"{what}: field 'readers' must be a list of module names, got {readers!r:.80}")
    if any(r and not key.startswith(r + ".") for r in readers):
        raise FormatError(f"{what}: a reader in {readers!r:.80} does not hold the weight {key!r}")
    aliases = spec.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases) \
            or len(set(aliases)) != len(aliases) or key in aliases:
        raise FormatError(f"{what}: field 'aliases' must be a list of distinct state_dict keys other than the "
                          f"weight's own, got {aliases!r:.80}")
    return LayerRecord(key, spec["module"], spec["type"], spec["weight"], out_dim, shape, dtype, config, encoding.name, count,
                       codes, scale, rule if isinstance(rule, str) else None, tuple(readers), tuple(aliases))


def build_metadata(manifest: dict[str, Any], user: dict[str, str] | None = None) -> dict[str, str]:
    """The safetensors ``__metadata__`` for a manifest: version, manifest JSON, the manifest's CRC32, and the
    `user` metadata as keys of their own (the manifest's ``metadata`` field then lists each value's CRC32)."""
    user = dict(user or {})
    for key, value in user.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
        for text in (key, value):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"metadata {key!r}: {text[max(0, e.start - 10):e.start + 10]!r} holds a lone "
                                 "surrogate, which is not text and cannot be stored as UTF-8") from None
        if not key or key.startswith(RESERVED_PREFIX):
            raise ValueError(f"metadata key {key!r}: keys must be non-empty and must not start with "
                             f"{RESERVED_PREFIX!r} (reserved for the format); prefix your own, e.g. 'myapp.config'")
    if user:
        manifest = {**manifest, "metadata": {k: crc32_hex(v.encode("utf-8")) for k, v in user.items()}}
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return {KEY_VERSION: str(FORMAT_VERSION), KEY_MANIFEST: text, KEY_MANIFEST_CRC: crc32_hex(text.encode()), **user}


def read_metadata(src: str | os.PathLike[str] | bytes) -> dict[str, str]:
    """The user metadata of a ternq file (`ternq.pack(..., metadata=...)`), validated and CRC-checked; reads
    only the header."""
    with Source(src) as source:
        return read_manifest(read_header(source)).metadata


# --- decoding with numpy ----------------------------------------------------------------------------------------


READ_CHUNK = 1 << 20  # bytes per read of `check_tensor`: a multiple of every element size and of 2 (byte pairs)


def _crc_matches(source: Source, name: str, record: TensorRecord, crc: int) -> None:
    if f"{crc & 0xFFFFFFFF:08x}" != record.crc32:
        raise ChecksumError(f"{source.name}: tensor {name!r}: bytes do not match CRC32 {record.crc32}: "
                            "the payload is corrupted")


def read_bytes(source: Source, manifest: Manifest, name: str) -> np.ndarray:
    """One tensor's bytes (uint8, 1-D), after checking their CRC32: what every decoder starts from."""
    entry = manifest.header.tensors[name]
    raw = np.empty(entry.nbytes, np.uint8)
    source.readinto(entry.begin, raw)
    _crc_matches(source, name, manifest.tensors[name], zlib.crc32(raw))
    return raw


def _as_array(raw: np.ndarray, dtype: str) -> np.ndarray:
    arr = raw.view(np.dtype(DTYPES[dtype][0]))
    if dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def read_array(source: Source, manifest: Manifest, name: str) -> np.ndarray:
    """One tensor as a numpy array in its shape (BF16 widened to float32), after checking its CRC32."""
    entry = manifest.header.tensors[name]
    return _as_array(read_bytes(source, manifest, name), entry.dtype).reshape(entry.shape)


def check_tensor(source: Source, manifest: Manifest, name: str,
                 visit: Callable[[np.ndarray], None] | None = None) -> None:
    """Everything the format says about one tensor's bytes, in bounded memory (READ_CHUNK at a time): its CRC32,
    and for a layer's codes every byte and code (`unpack_numpy`'s checks), for its scales `check_scale`.
    A file that passes `check_tensor` for every tensor decodes without error (`decode_layer`).

    `visit`, if given, sees the values chunk by chunk, in order, as they are checked: a packed weight's codes
    (int8), scales (float32), a float tensor's values (as `read_array` gives them); so a tool can compute over a
    tensor of any size in the same bounded memory (``ternq inspect``'s code shares). The CRC32 is checked last:
    what `visit` saw counts only if `check_tensor` returns."""
    entry, record = manifest.header.tensors[name], manifest.tensors[name]
    layer = manifest.layers[manifest.owners[name]] if record.role != "float" else None
    what = f"{source.name}: layer {layer.key!r}" if layer is not None else ""
    enc = ENCODINGS[layer.encoding] if layer is not None else None
    buf = np.empty(min(READ_CHUNK, entry.nbytes), np.uint8)
    crc, done = 0, 0
    while done < entry.nbytes:
        chunk = buf[:min(READ_CHUNK, entry.nbytes - done)]
        source.readinto(entry.begin + done, chunk)
        crc = zlib.crc32(chunk, crc)
        if layer is not None and enc is not None and record.role == "codes":
            count = min(chunk.size * enc.per_byte, layer.count - done * enc.per_byte)
            values = unpack_numpy(chunk.view(np.dtype(DTYPES[enc.dtype][0])), enc.name, count, qmax=layer.qmax,
                                  what=f"{what}: codes")
        else:
            values = _as_array(chunk, entry.dtype)
            if layer is not None:
                check_scale(values, what, layer.qmax)
        if visit is not None:
            visit(values)
        done += chunk.size
    _crc_matches(source, name, record, crc)


def verify(source: Source, manifest: Manifest) -> None:
    """`check_tensor` for every tensor of the file: after it, every read and decode of the file succeeds (unless
    the file is modified in place meanwhile, which the CRC32 checks of the reads catch)."""
    for name in manifest.tensors:
        check_tensor(source, manifest, name)


def decode_layer(source: Source, manifest: Manifest, layer: LayerRecord) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int8, in the weight's shape) and scales (float32, stored shape) of a packed layer, all checked."""
    what = f"{source.name}: layer {layer.key!r}"
    packed = read_array(source, manifest, layer.codes)
    codes = unpack_numpy(packed, layer.encoding, layer.count, qmax=layer.qmax, what=f"{what}: codes")
    scale = read_array(source, manifest, layer.scale)
    check_scale(scale, what, layer.qmax)
    return codes.reshape(layer.shape), scale


_F32_MAX = float(np.finfo(np.float32).max)


def check_scale(scale: Any, what: str, qmax: int = 1) -> None:
    """Scales must be finite and positive (the quantizers floor them at eps > 0), and small enough that
    ``qmax * scale`` stays a finite float32 (dequantized weights are never infinite)."""
    arr = np.asarray(scale)
    if arr.size and not (np.isfinite(arr).all() and (arr > 0).all() and float(arr.max()) * qmax <= _F32_MAX):
        raise FormatError(f"{what}: scales must be finite, positive and at most {_F32_MAX / qmax:.3g} "
                          f"(float32 max / qmax {qmax})")


def dequantize_numpy(codes: np.ndarray, scale: np.ndarray, layer: LayerRecord) -> np.ndarray:
    """``codes * scale`` in float32, in the weight's layout (numpy twin of `ternq.qat.quantizers.dequantize_weight`)."""
    shape = codes.shape
    rows_first = codes if len(shape) <= 1 else np.moveaxis(codes, layer.out_dim, 0)
    moved = rows_first.shape
    rows = rows_first.reshape(1 if len(shape) <= 1 else shape[layer.out_dim], -1).astype(np.float32)
    granularity = layer.config["granularity"]
    if granularity == "tensor":
        s = scale.reshape(1, 1)
    elif granularity == "channel":
        s = scale.reshape(-1, 1)
    else:
        s = np.repeat(scale, effective_group_size(layer), axis=1)[:, : rows.shape[1]]
    out = (rows * s).reshape(moved)
    return out if len(shape) <= 1 else np.moveaxis(out, 0, layer.out_dim)


def load_numpy(src: str | os.PathLike[str] | bytes, *, dequantize: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a ternq file as numpy arrays, checksums and codes verified.

    With ``dequantize=False``: the file's float tensors, plus ``<weight key>.codes`` (int8, the weight's shape)
    and ``<weight key>.scale`` (float32) for each packed layer. With ``dequantize=True``: a float32 state dict
    of the model, each packed weight replaced by ``codes * scale`` under its own key (e.g. ``fc1.weight``).
    """
    with Source(src) as source:
        manifest = read_manifest(read_header(source))
        out: dict[str, np.ndarray] = {}
        for layer in manifest.layers.values():
            codes, scale = decode_layer(source, manifest, layer)
            if dequantize:
                out[layer.key] = dequantize_numpy(codes, scale, layer)
            else:
                out[layer.key + ".codes"] = codes
                out[layer.key + ".scale"] = scale
        for record in manifest.tensors.values():
            if record.role == "float":
                out[record.name] = read_array(source, manifest, record.name)
        for key, target in manifest.tied.items():  # a tied weight is stored once, under its first key
            out[key] = out[target]
        return out


class PackedFile:
    """A ternq file opened for reading (`ternq.open`): header and manifest validated, tensors read on demand.

    Torch-free, like the rest of this module: what a tool needs to look into a file without loading a model
    (its metadata, the shapes of its weights, one tensor) without reaching into the reader's internals::

        with ternq.open("model.safetensors") as f:
            f.metadata["myapp.config"]; f.shapes()["fc1.weight"]; f.read("fc1.weight")
    """

    def __init__(self, src: str | os.PathLike[str] | bytes) -> None:
        self._source = Source(src)
        try:
            self.manifest = read_manifest(read_header(self._source))
        except BaseException:
            self._source.close()
            raise

    @property
    def metadata(self) -> dict[str, str]:
        """The user metadata stored with the model (`ternq.save_packed(..., metadata=...)`), each CRC-checked."""
        return dict(self.manifest.metadata)

    @property
    def layers(self) -> dict[str, LayerRecord]:
        """The packed weights, by state_dict key: shape, config, encoding, the layer holding it."""
        return dict(self.manifest.layers)

    @property
    def file_size(self) -> int:
        return self.manifest.header.file_size

    @property
    def header_size(self) -> int:
        """Bytes before the tensor data: the length prefix and the JSON header with the metadata."""
        return self.manifest.header.data_start

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state_dict key the file restores (float tensors, packed and tied weights) and its shape."""
        out = {r.name: r.shape for r in self.manifest.tensors.values() if r.role == "float"}
        out.update({key: layer.shape for key, layer in self.manifest.layers.items()})
        out.update({key: out[target] for key, target in self.manifest.tied.items()})
        return out

    def tensor_bytes(self) -> dict[str, tuple[str, int]]:
        """Each stored tensor's role ("float", "codes", "scale") and size in bytes."""
        return {name: (self.manifest.tensors[name].role, entry.nbytes)
                for name, entry in self.manifest.header.tensors.items()}

    def read(self, key: str) -> np.ndarray:
        """The values of state_dict key `key`: a float tensor as stored (BF16 widened to float32), a packed weight
        as ``codes * scale`` in float32; CRC32, codes and scales checked."""
        key = self.manifest.tied.get(key, key)
        if key in self.manifest.layers:
            layer = self.manifest.layers[key]
            return dequantize_numpy(*decode_layer(self._source, self.manifest, layer), layer)
        record = self.manifest.tensors.get(key)
        if record is None or record.role != "float":
            raise KeyError(f"{self._source.name} has no tensor {key!r}; its keys are listed by shapes()")
        return read_array(self._source, self.manifest, key)

    def verify(self) -> None:
        """Check every tensor's bytes (CRC32, codes, scales) in bounded memory; raises FormatError."""
        verify(self._source, self.manifest)

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_packed(src: str | os.PathLike[str] | bytes) -> PackedFile:
    """Open a ternq file for reading (exported as ``ternq.open``); use it as a context manager."""
    return PackedFile(src)
