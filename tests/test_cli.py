"""The ``ternq`` command: help, inspect (table and JSON), verify exit codes on intact and corrupted files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import ternq
from ternq import KBitConfig, Rule
from ternq.cli import EXIT_INVALID, EXIT_OK, EXIT_UNREADABLE, main
from ternq.numpy_format import build_metadata, crc32_hex


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ternq.quantize(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.Linear(20, 2)),
                           include=[Rule("2", KBitConfig(bits=4, granularity="channel")), "*"], exclude=["3"])
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    ternq.save_packed(model, path)
    return model, path


def test_help(capsys):
    for argv in (["--help"], ["inspect", "--help"], ["verify", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"ternq {ternq.__version__}" in out
    assert "inspect" in out and "exit status 0 if the file is intact" in out.replace("\n", " ").lower()


def test_inspect_table(packed_file, capsys):
    _, path = packed_file
    assert main(["inspect", str(path), "--no-progress"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0].endswith(("weight",
                                                                                                      "bias"))}
    assert "trit5" in lines["0.weight"] and "30x40" in lines["0.weight"]
    assert "int4" in lines["2.weight"]
    assert " F32 " in lines["3.weight"] and lines["3.weight"].endswith(" 32")
    assert "bits/weight with scales (log2(3) = 1.585)" in out and "as fp32" in out


def test_inspect_json(packed_file, capsys):
    model, path = packed_file
    assert main(["inspect", str(path), "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in info["tensors"]}
    first = rows["0.weight"]
    assert first["encoding"] == "trit5" and first["shape"] == [30, 40] and first["count"] == 1200
    assert first["codes_bytes"] == 240 and first["scale_bytes"] == 4
    assert first["bits_per_weight"] == pytest.approx(8 * 244 / 1200)
    codes = model[0].weight_codes()[0]
    assert first["share"] == pytest.approx({"-": (codes == -1).float().mean().item(),
                                            "0": (codes == 0).float().mean().item(),
                                            "+": (codes == 1).float().mean().item()})
    assert rows["2.weight"]["scale_bytes"] == 4 * 20
    assert rows["3.weight"]["kind"] == "float" and rows["3.weight"]["bits_per_weight"] == 32
    totals = info["totals"]
    n_params = sum(p.numel() for p in model.parameters())
    assert totals["elements"] == n_params and totals["fp32_bytes"] == 4 * n_params
    assert totals["file_bytes"] == path.stat().st_size
    assert totals["packed_layers"] == 2


def test_verify_ok_and_json(packed_file, capsys):
    _, path = packed_file
    assert main(["verify", str(path)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("OK:")
    assert main(["verify", str(path), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_verify_fails_on_corrupted_variants(packed_file, tmp_path, capsys):
    """Header, payload, truncation, extension: exit 1 with the problem named, and --json says why."""
    _, path = packed_file
    data = path.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    variants = {
        "header byte": (end // 2, b"\x00"),
        "payload byte": (end + 3, None),
        "last byte": (len(data) - 1, None),
        "length prefix": (0, None),
    }
    for name, (pos, value) in variants.items():
        damaged = bytearray(data)
        damaged[pos] = value[0] if value else damaged[pos] ^ 0x10
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(bytes(damaged))
        assert main(["verify", str(bad)]) == EXIT_INVALID, name
        assert "Error" in capsys.readouterr().err
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-1])
    assert main(["verify", str(truncated), "--json"]) == EXIT_INVALID
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and "truncated" in result["error"]
    extended = tmp_path / "extended.safetensors"
    extended.write_bytes(data + b"\0")
    assert main(["verify", str(extended)]) == EXIT_INVALID
    assert main(["inspect", str(extended)]) == EXIT_INVALID


def test_missing_file(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == EXIT_UNREADABLE
    assert "cannot read" in capsys.readouterr().err


def test_process_exit_code(packed_file, tmp_path):
    """The real process (as the console script runs it) exits non-zero on a corrupted file."""
    _, path = packed_file
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(damaged))
    result = subprocess.run([sys.executable, "-m", "ternq.cli", "verify", str(bad)], capture_output=True, text=True)
    assert result.returncode == EXIT_INVALID and "ChecksumError" in result.stderr


def test_invalid_code_bytes_with_valid_checksums(packed_file, tmp_path, capsys):
    """A forged file (CRCs recomputed) holding a byte no trit5 encoder writes: both commands refuse it."""
    model, _ = packed_file
    packed = ternq.pack(model)
    codes = packed.tensors["0.weight.codes"].clone()
    codes[3] = 1  # one of the 13 unused byte values
    manifest = packed.manifest
    manifest["tensors"]["0.weight.codes"]["crc32"] = crc32_hex(codes.numpy())
    forged = tmp_path / "forged.safetensors"
    ternq.PackedModel({**packed.tensors, "0.weight.codes": codes}, build_metadata(manifest)).save(forged)
    for command in ("verify", "inspect"):
        assert main([command, str(forged)]) == EXIT_INVALID
        assert "no trit5 encoder writes" in capsys.readouterr().err
