"""Fuzzing the reader: mutated, truncated and extended files, and hostile but self-consistent metadata.

Invariants: reading a damaged file raises a ternq exception (never another exception, a hang or an oversized
allocation), and never returns weights that differ from the ones saved. The default budget runs a few thousand
cases in seconds; raise it for a long run (docs/format.md, "Fuzzing and hostile files")::

    TERNQ_FUZZ_EXAMPLES=20 python -m pytest tests/test_fuzz_format.py    # 20x the examples
"""
from __future__ import annotations

import json
import math
import os
import random
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import ternq
from ternq import KBitConfig, Rule, TernaryConfig, TernqError
from ternq.cli import verify_file
from ternq.numpy_format import (
    KEY_MANIFEST,
    KEY_MANIFEST_CRC,
    FormatError,
    Source,
    crc32_hex,
    load_numpy,
    read_header,
)

SCALE = max(1, int(os.environ.get("TERNQ_FUZZ_EXAMPLES", "1")))
FUZZ = settings(deadline=None, max_examples=400 * SCALE, suppress_health_check=[HealthCheck.too_slow])


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(7, 6)
        self.b = nn.Conv1d(6, 4, 3)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.b(self.a(x).transpose(1, 2)))


@cache
def original() -> tuple[bytes, ternq.PackedModel]:
    torch.manual_seed(0)
    model = ternq.quantize(Tiny(), include=[Rule("b", KBitConfig(bits=4, granularity="channel")), "a"],
                           config=TernaryConfig(granularity="group", group_size=4))
    packed = ternq.pack(model, float_dtype=torch.float16)
    return packed.to_bytes(), packed


@cache
def reference() -> dict[str, torch.Tensor]:
    return _content(ternq.load_packed(original()[0], Tiny()))


def _content(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.state_dict())
    for name in ("a", "b"):
        layer = getattr(model, name)
        out[name + ".codes"], out[name + ".scale"] = layer.codes, layer.scale
    return out


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def assert_rejected(data: bytes) -> None:
    """Both readers refuse a damaged file with a ternq exception."""
    with pytest.raises(TernqError):
        verify_file(data)
    with pytest.raises(TernqError):
        ternq.load_packed(data, Tiny())


def assert_rejected_or_intact(data: bytes) -> None:
    """A ternq exception, or (the change was harmless) exactly the saved weights."""
    try:
        loaded = ternq.load_packed(data, Tiny())
    except TernqError:
        return
    got = _content(loaded)
    assert got.keys() == reference().keys()
    for key, value in reference().items():
        assert torch.equal(got[key], value), key
    verify_file(data)


# --- raw bytes ---------------------------------------------------------------------------------------------------


def test_every_single_byte_change_is_detected():
    """Each byte of the file, in turn, replaced by another value: all of them are caught (2,000+ cases), but for
    a padding space after the JSON made another JSON whitespace byte, which changes nothing a reader sees
    (safetensors reads it, so ternq does: docs/format.md, section 6)."""
    data, _ = original()
    json_end = 8 + len(data[8:header_end(data)].rstrip(b" "))
    rng = random.Random(0)
    for pos in range(len(data)):
        for new in [(data[pos] + rng.randrange(1, 256)) % 256, *(b"\t\n\r" if json_end <= pos < header_end(data)
                                                                 else b"")]:
            damaged = bytearray(data)
            damaged[pos] = new
            if json_end <= pos < header_end(data) and new in b" \t\n\r":
                assert verify_file(bytes(damaged))["ok"]
                assert_rejected_or_intact(bytes(damaged))
                continue
            with pytest.raises(TernqError):
                verify_file(bytes(damaged))


def test_every_truncation_is_detected():
    data, _ = original()
    for size in range(len(data)):
        with pytest.raises(TernqError):
            verify_file(data[:size])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data, _ = original()
    out = bytearray(data)
    end = header_end(data)
    for _ in range(draw(st.integers(1, 6))):
        region = draw(st.sampled_from(["length", "header", "data", "anywhere"]))
        lo, hi = {"length": (0, 7), "header": (8, end - 1), "data": (end, len(data) - 1),
                  "anywhere": (0, len(data) - 1)}[region]
        pos = min(draw(st.integers(lo, hi)), len(out) - 1)
        kind = draw(st.sampled_from(["set", "bitflip", "insert", "delete"]))
        if kind == "set":
            out[pos] = draw(st.integers(0, 255))
        elif kind == "bitflip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            out[pos:pos] = bytes([draw(st.integers(0, 255))])
        elif len(out) > 1:
            del out[pos]
    result = bytes(out)
    assume(result != data)
    return result


@FUZZ
@given(damaged=mutated())
def test_mutated_files_are_rejected(damaged):
    """Rejected, or (whitespace in place of a padding space) read as the very same file."""
    assert_rejected_or_intact(damaged)


@FUZZ
@given(size=st.integers(0, 10_000), tail=st.binary(min_size=1, max_size=64), length=st.integers(0, 2**64 - 1))
def test_truncated_extended_and_relabelled_files(size, tail, length):
    data, _ = original()
    assume(size < len(data))
    assert_rejected(data[:size])
    assert_rejected(data + tail)
    assume(length != header_end(data) - 8)
    assert_rejected(length.to_bytes(8, "little") + data[8:])


# --- hostile metadata: consistent checksums, lying content ---------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON document (dict keys and list indices)."""
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _replace(obj: object, path: tuple, value: object) -> object:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: _replace(obj[head], rest, value)}
    copy = list(obj)  # type: ignore[arg-type]
    copy[head] = _replace(copy[head], rest, value)
    return copy


def _header_and_data(data: bytes) -> tuple[dict, bytes]:
    end = header_end(data)
    return json.loads(data[8:end]), data[end:]


def _file(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return len(raw).to_bytes(8, "little") + raw + payload


@FUZZ
@given(data=st.data())
def test_lying_manifest_with_valid_checksum(data):
    """A hostile writer edits any manifest field and recomputes the manifest CRC."""
    raw, packed = original()
    manifest = packed.manifest
    path = data.draw(st.sampled_from(_paths(manifest)), label="path")
    value = data.draw(JSON_VALUES, label="value")
    edited = _replace(manifest, path, value)
    assume(edited != manifest)
    header, payload = _header_and_data(raw)
    text = json.dumps(edited)  # NaN / Infinity allowed: Python's JSON reader accepts them
    header["__metadata__"] = {**packed.metadata, KEY_MANIFEST: text, KEY_MANIFEST_CRC: crc32_hex(text.encode())}
    assert_rejected_or_intact(_file(header, payload))


@FUZZ
@given(data=st.data())
def test_lying_tensor_table(data):
    """The safetensors tensor table (dtype, shape, offsets, names) edited anywhere, metadata kept."""
    raw, _ = original()
    header, payload = _header_and_data(raw)
    paths = [p for p in _paths(header) if p and p[0] != "__metadata__"]
    path = data.draw(st.sampled_from(paths), label="path")
    value = data.draw(JSON_VALUES | st.integers(0, len(payload)), label="value")
    edited = _replace(header, path, value)
    assume(edited != header)
    assert_rejected(_file(edited, payload))  # type: ignore[arg-type]


@settings(deadline=None, max_examples=100 * SCALE)
@given(data=st.data())
def test_swapped_and_renamed_tensors(data):
    """Tensors renamed or their byte ranges swapped: the CRCs name the culprit."""
    raw, _ = original()
    header, payload = _header_and_data(raw)
    names = sorted(k for k in header if k != "__metadata__")
    a, b = data.draw(st.permutations(names))[:2]
    if data.draw(st.booleans(), label="rename"):
        header[a + "x"] = header.pop(a)
    else:
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    assert_rejected_or_intact(_file(header, payload))


def test_numpy_reader_agrees_on_an_intact_file():
    raw, _ = original()
    arrays = load_numpy(raw)
    for name in ("a", "b"):
        assert (arrays[f"{name}.weight.codes"] == reference()[f"{name}.codes"].numpy()).all()


# --- the safetensors header: ternq reads exactly what safetensors reads ------------------------------------------

# the dtypes of safetensors 0.8 and their sizes in bits (its Dtype::bitsize), written out here rather than taken
# from ternq, which is what is tested
ST_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
           "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
           "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
ST_DTYPES = sorted(ST_BITS)
WHITESPACE = ["", " ", "\t", "\n", "\r\n", "\x0c"]  # form feed is not JSON whitespace


def _pick(draw: st.DrawFn, clean: bool, usual: object, others: list) -> object:
    """`usual`, or (in a file drawn not `clean`, one time in four) one of `others`."""
    if clean or draw(st.integers(0, 3)):
        return usual
    return draw(st.sampled_from(others))


def _number(draw: st.DrawFn, clean: bool, value: int) -> str:
    """`value` as a JSON literal, or spelled as something safetensors may not take for an unsigned integer."""
    return str(_pick(draw, clean, str(value), [f"-{value}", f"{value}.0", f"{value}e0", f"0{value}", f"+{value}",
                                               f"{value}E+0", str(value + 2**64), str(value - 2**63), f'"{value}"',
                                               "true", "null", "1e400", "1" + "0" * 400]))


def _json(value: object, ws: str) -> str:
    """Render a tree of lists, ("obj", [(raw key, value)]) and raw literals, with whitespace `ws` in objects."""
    if isinstance(value, tuple) and value[0] == "obj":
        return "{" + ",".join(f"{ws}{k}{ws}:{_json(v, ws)}" for k, v in value[1]) + ws + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json(v, ws) for v in value) + "]"
    return str(value)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def safetensors_headers(draw: st.DrawFn) -> bytes:
    """Whole files whose headers mix valid safetensors with every spelling the two parsers could disagree on:
    number forms, duplicate names and fields, unknown fields, the array form of a tensor, enum-map dtypes,
    sub-byte and unknown dtypes, 64-bit overflow, metadata values, nesting depth, whitespace, data length.
    About half the files are drawn `clean` (only valid choices), so both answers are well represented."""
    clean = draw(st.booleans())
    names = draw(st.lists(st.sampled_from(['"a"', '"b"', '"c"', '"\\u00e9"', '""', '"x\\u0000"', '"\\ud83d\\ude00"']),
                          max_size=3, unique=True))
    pairs: list[tuple[str, object]] = []
    offset = 0
    for name in names:
        name = str(_pick(draw, clean, name, ['"\\ud800"', '"\\udc00x"', "1", '"\\x"']))
        dtype = draw(st.sampled_from(ST_DTYPES))
        dtype = str(_pick(draw, clean, dtype, ["u8", "F8", "X", "f32"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        if not clean and draw(st.integers(0, 9)) == 0:  # dimensions that overflow 64 bits (or not) once multiplied
            shape = draw(st.sampled_from([[2**32, 2**32, 0], [0, 2**32, 2**32], [2**63, 2], [2**64 - 1, 0]]))
        count = math.prod(shape)
        bits = count * ST_BITS.get(dtype, 8)
        if clean and bits % 8:
            shape, count, bits = [*shape, 2], 2 * count, 2 * bits  # F4 / F6: a whole number of bytes
        end = offset + bits // 8 if count < 2**40 else offset
        fields: list[tuple[str, object]] = [
            ('"dtype"', _pick(draw, clean, json.dumps(dtype), [f'{{"{dtype}":null}}', f'{{"{dtype}":1}}', "1",
                                                               f'{{"{dtype}":null,"U8":null}}'])),
            ('"shape"', [_number(draw, clean, d) for d in shape]),
            ('"data_offsets"', [_number(draw, clean, offset), _number(draw, clean, end)]),
        ]
        fields = draw(st.permutations(fields))
        if draw(st.integers(0, 2)) == 0:  # an unknown field: ignored, if it is valid JSON within the depth limit
            extra = _pick(draw, clean, "1", ["-0", "1.5", "1e-400", "1" + "0" * 300, '{"k":1,"k":2}', _nested(124),
                                             _nested(125), _nested(126), '"\\ud800"', "1e400", "NaN", "[1,]"])
            fields.insert(draw(st.integers(0, len(fields))), ('"x"', extra))
        if not clean and draw(st.integers(0, 5)) == 0:
            fields.append(draw(st.sampled_from(fields)))  # a repeated field
        if draw(st.integers(0, 5)) == 0:  # serde's array form of a struct: the three fields in order
            values = [dict(fields).get(k) for k in ('"dtype"', '"shape"', '"data_offsets"')]
            pairs.append((name, values[:_pick(draw, clean, 3, [2])]))  # type: ignore[misc]
        else:
            pairs.append((name, ("obj", fields)))
        offset = end if clean or draw(st.integers(0, 9)) else offset + 1
    metadata = draw(st.sampled_from([None, "null", ("obj", []), ("obj", [('"k"', '"v"'), ('"\\u00e9"', '""')]),
                                     ("obj", [('"k"', '"v"'), ('"k"', '"w"')])]))
    metadata = _pick(draw, clean, metadata, [("obj", [('"k"', "1")]), "[]", '"text"', ("obj", [('"k"', "null")])])
    if metadata is not None:
        for _ in range(int(_pick(draw, clean, 1, [2]))):  # type: ignore[call-overload]
            pairs.insert(draw(st.integers(0, len(pairs))), ('"__metadata__"', metadata))
    if pairs and draw(st.integers(0, 5)) == 0:
        pairs.append(draw(st.sampled_from(pairs)))  # a repeated tensor name: the last entry counts
    ws = str(_pick(draw, clean, draw(st.sampled_from(WHITESPACE[:-1])), WHITESPACE[-1:]))
    header = _json(("obj", pairs), ws) + str(_pick(draw, clean, draw(st.sampled_from(["", "   "])), ["\x00", " x"]))
    raw = header.encode("utf-8")
    data_len = max(0, offset + int(_pick(draw, clean, 0, [-1, 1])))  # type: ignore[call-overload]
    return len(raw).to_bytes(8, "little") + raw + b"\x01" * data_len


def _safetensors_accepts(data: bytes, path: str) -> bool:
    from safetensors import SafetensorError, safe_open

    with open(path, "wb") as f:
        f.write(data)
    try:
        with safe_open(path, "np") as f:
            f.keys()
    except SafetensorError:
        return False
    return True


@settings(deadline=None, max_examples=600 * SCALE, suppress_health_check=[HealthCheck.too_slow])
@given(data=safetensors_headers())
def test_the_header_reader_accepts_exactly_what_safetensors_accepts(data, tmp_path_factory):
    """`read_header` (every ternq reader's first step) accepts a file iff safetensors.safe_open does: a file
    ternq reads opens in any safetensors reader, and ternq reads any safetensors file (then refuses what is not
    a ternq file by the manifest)."""
    path = str(tmp_path_factory.getbasetemp() / "header.safetensors")
    try:
        read_header(Source(data))
        ternq_accepts = True
    except FormatError:
        ternq_accepts = False
    event(f"safetensors accepts: {ternq_accepts}")
    assert ternq_accepts == _safetensors_accepts(data, path), data[8:header_end(data)]
