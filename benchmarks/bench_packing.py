"""Packing benchmark: bits per weight, file sizes against fp32, pack / unpack throughput in torch and numpy.

    python benchmarks/bench_packing.py            # ~1 min on 2 cores; --codes N to change the throughput size

Prints the machine line and one markdown table, every figure measured in this run. Throughput is in MB/s of
int8 codes (the decoder's output, one byte per weight; for packing, its input), best of --repeats runs.

The decoder comparison behind ternq's choices (docs/format.md, "Why this encoding"):
* "pair table": the shipped decoder (`ternq.numpy_format.unpack_numpy`, which `ternq.format.encoding.unpack_codes` runs
  on torch tensors): one lookup per byte pair into a 65536-row table, byte-range and padding checks included;
* "index_select table": torch's gather on a 256 x 5 table, one row per byte, with the same checks;
* "multiply-shift": arithmetic decode of the scaled encoding ternq stores, trit k = ((b * 3**k mod 256) * 3) >> 8;
* "div/mod": arithmetic decode of plain base 3 (byte = v), trit k = (b // 3**(4-k)) % 3, the alternative layout.
The two arithmetic decoders exist here only, to measure that comparison.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

import ternq  # noqa: E402
from ternq import KBitConfig, Rule, TernaryConfig  # noqa: E402
from ternq.cli import verify_file  # noqa: E402
from ternq.format.encoding import pack_codes, unpack_codes  # noqa: E402
from ternq.numpy_format import TRIT5_DECODE, TRIT5_ENCODE, unpack_numpy  # noqa: E402

LOG2_3 = math.log2(3)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# --- alternative decoders (for the comparison only) ---------------------------------------------------------------

CHUNK = 1 << 16
TABLE = torch.from_numpy(TRIT5_DECODE.copy())


def torch_index_select(packed: torch.Tensor, count: int) -> torch.Tensor:
    out = torch.empty(packed.numel(), 5, dtype=torch.int8)
    for s in range(0, packed.numel(), CHUNK):
        dst = out[s:s + CHUNK]
        torch.index_select(TABLE, 0, packed[s:s + CHUNK].int(), out=dst)
        lo, _ = torch.aminmax(dst)
        if lo < -1:
            raise ValueError("invalid byte")
    if out.view(-1)[count:].any():
        raise ValueError("padding")
    return out.view(-1)[:count]


def torch_multiply_shift(packed: torch.Tensor, count: int) -> torch.Tensor:
    out = torch.empty(packed.numel(), 5, dtype=torch.int8)
    for s in range(0, packed.numel(), CHUNK):
        q = packed[s:s + CHUNK].to(torch.int16)
        dst = out[s:s + CHUNK]
        for k in range(5):
            qk = (q * 3**k) & 0xFF if k else q
            dst[:, k] = ((qk * 3) >> 8) - 1
    return out.view(-1)[:count]


def torch_div_mod(packed: torch.Tensor, count: int) -> torch.Tensor:
    out = torch.empty(packed.numel(), 5, dtype=torch.int8)
    for s in range(0, packed.numel(), CHUNK):
        q = packed[s:s + CHUNK]
        dst = out[s:s + CHUNK]
        for k in range(5):
            dst[:, k] = (torch.div(q, 3 ** (4 - k), rounding_mode="floor") % 3).to(torch.int8) - 1
    return out.view(-1)[:count]


def numpy_multiply_shift(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty((packed.size, 5), np.int8)
    for s in range(0, packed.size, CHUNK):
        q = packed[s:s + CHUNK].astype(np.uint16)
        dst = out[s:s + CHUNK]
        for k in range(5):
            qk = (q * 3**k) & 0xFF if k else q
            dst[:, k] = ((qk * 3) >> 8).astype(np.int8) - 1
    return out.reshape(-1)[:count]


def numpy_div_mod(packed: np.ndarray, count: int) -> np.ndarray:
    out = np.empty((packed.size, 5), np.int8)
    for s in range(0, packed.size, CHUNK):
        q = packed[s:s + CHUNK]
        dst = out[s:s + CHUNK]
        for k in range(5):
            dst[:, k] = ((q // 3 ** (4 - k)) % 3).astype(np.int8) - 1
    return out.reshape(-1)[:count]


# --- models for the size rows -------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """A TTS-decoder-shaped model with biases, norms and a float output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv1d(80, 256, 7, padding=3)
        self.blocks = nn.ModuleList(nn.Conv1d(256, 256, 5, padding=2) for _ in range(6))
        self.norms = nn.ModuleList(nn.LayerNorm(256) for _ in range(6))
        self.post = nn.Conv1d(256, 80, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        for conv, norm in zip(self.blocks, self.norms):
            h = h + norm(torch.relu(conv(h)).transpose(1, 2)).transpose(1, 2)
        return self.post(h)


def fp32_bytes(model: nn.Module) -> int:
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


def file_size(model: nn.Module, **kwargs: object) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.safetensors")
        ternq.save_packed(model, path, **kwargs)  # type: ignore[arg-type]
        return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=16_000_000, help="codes per throughput measurement")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[tuple[str, str, str]] = []

    def row(what: str, value: str, ratio: str = "") -> None:
        rows.append((what, value, ratio))

    # bits per weight of packed tensors
    for shape in ((1024, 1024), (4096, 4096), (1000, 999), (256, 80, 7)):
        n = math.prod(shape)
        codes = torch.randint(-1, 2, shape, dtype=torch.int8)
        bits = 8 * pack_codes(codes, "trit5").numel() / n
        row(f"ternary {'x'.join(map(str, shape))}: bits/weight, codes", f"{bits:.4f}",
            f"{bits / LOG2_3:.4f} x log2(3); {32 / bits:.1f}x smaller than fp32")
    n = 1024 * 1024
    for name, config in (("per tensor", TernaryConfig()), ("per channel", TernaryConfig(granularity="channel")),
                         ("per group of 128", TernaryConfig(granularity="group"))):
        scale_numel = {"tensor": 1, "channel": 1024, "group": 1024 * 8}[config.granularity]
        bits = 8 * (pack_codes(torch.zeros(n, dtype=torch.int8), "trit5").numel() + 4 * scale_numel) / n
        row(f"ternary 1024x1024 + float32 scales {name}: bits/weight", f"{bits:.4f}",
            f"{bits / LOG2_3:.4f} x log2(3)")
    for enc, bits_cfg in (("int2", 2), ("int4", 4)):
        codes = torch.zeros(n, dtype=torch.int8)
        bits = 8 * pack_codes(codes, enc).numel() / n
        row(f"{enc} (KBitConfig(bits={bits_cfg})) 1024x1024: bits/weight, codes", f"{bits:.4f}",
            f"{32 / bits:.1f}x smaller than fp32")

    # whole files against fp32
    mlp = ternq.quantize(nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4))))
    size = file_size(mlp)
    row("file: 4 x Linear(1024) ternary, fp32 biases", f"{size:,} B", f"{size / fp32_bytes(mlp):.4f} of fp32 "
        f"({fp32_bytes(mlp) / size:.1f}x smaller)")
    net = ternq.quantize(ConvNet(), exclude=[ternq.output_layers()])
    size = file_size(net)
    row("file: Conv1d net (7 ternary, float LayerNorms, biases, float output conv)", f"{size:,} B",
        f"{size / fp32_bytes(net):.4f} of fp32 ({fp32_bytes(net) / size:.1f}x smaller)")
    size = file_size(net, float_dtype=torch.float16)
    row("  same, float tensors stored as float16", f"{size:,} B",
        f"{size / fp32_bytes(net):.4f} of fp32 ({fp32_bytes(net) / size:.1f}x smaller)")
    net4 = ternq.quantize(ConvNet(), include=[Rule("blocks.*", KBitConfig(bits=4, granularity="channel")), "*"],
                          exclude=[ternq.output_layers()])
    size = file_size(net4)
    row("  same net, int4 per-channel blocks", f"{size:,} B",
        f"{size / fp32_bytes(net4):.4f} of fp32 ({fp32_bytes(net4) / size:.1f}x smaller)")

    # throughput
    count = args.codes
    mb = count / 1e6
    codes = torch.randint(-1, 2, (count,), dtype=torch.int8)
    packed = pack_codes(codes, "trit5")
    plain = torch.from_numpy(np.searchsorted(TRIT5_ENCODE, packed.numpy()).astype(np.uint8))  # byte = v
    packed_np, plain_np = packed.numpy(), plain.numpy()
    assert torch.equal(torch_index_select(packed, count), codes)
    assert torch.equal(torch_multiply_shift(packed, count), codes)
    assert torch.equal(torch_div_mod(plain, count), codes)
    assert np.array_equal(numpy_multiply_shift(packed_np, count), codes.numpy())
    assert np.array_equal(numpy_div_mod(plain_np, count), codes.numpy())
    assert np.array_equal(unpack_numpy(packed_np, "trit5", count), codes.numpy())
    # decoders compared on one thread (the cleanest measure of work per byte; the shipped decoder is
    # single-threaded numpy anyway), then torch's own gather and the packer with all threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = best_time(lambda: unpack_codes(packed, "trit5", count), args.repeats)
    row("unpack trit5, pair table (torch API)", f"{mb / base:,.0f} MB/s", "1 (shipped)")
    t = best_time(lambda: torch_index_select(packed, count), args.repeats)
    row("unpack trit5, index_select table (torch, 1 thread)", f"{mb / t:,.0f} MB/s", f"{base / t:.2f} x pair table")
    t_ms = best_time(lambda: torch_multiply_shift(packed, count), args.repeats)
    row("unpack trit5, multiply-shift (torch, 1 thread)", f"{mb / t_ms:,.0f} MB/s", f"{base / t_ms:.2f} x pair table")
    t = best_time(lambda: torch_div_mod(plain, count), args.repeats)
    row("unpack plain base 3, div/mod (torch, 1 thread)", f"{mb / t:,.0f} MB/s",
        f"{base / t:.2f} x pair table; {t_ms / t:.2f} x multiply-shift")
    for enc, lo, hi in (("int2", -1, 1), ("int4", -7, 7)):
        k = torch.randint(lo, hi + 1, (count,), dtype=torch.int8)
        p = pack_codes(k, enc)
        t = best_time(lambda p=p, enc=enc: unpack_codes(p, enc, count), args.repeats)
        row(f"unpack {enc}, pair table (torch API)", f"{mb / t:,.0f} MB/s", "")
        t = best_time(lambda k=k, enc=enc: pack_codes(k, enc), args.repeats)
        row(f"pack {enc} (torch, 1 thread)", f"{mb / t:,.0f} MB/s", "")
    t = best_time(lambda: pack_codes(codes, "trit5"), args.repeats)
    row("pack trit5 (torch, 1 thread)", f"{mb / t:,.0f} MB/s", "")
    torch.set_num_threads(threads)
    if threads > 1:
        t = best_time(lambda: torch_index_select(packed, count), args.repeats)
        row(f"unpack trit5, index_select table (torch, {threads} threads)", f"{mb / t:,.0f} MB/s",
            f"{base / t:.2f} x pair table")
        t = best_time(lambda: pack_codes(codes, "trit5"), args.repeats)
        row(f"pack trit5 (torch, {threads} threads)", f"{mb / t:,.0f} MB/s", "")
    base = best_time(lambda: unpack_numpy(packed_np, "trit5", count), args.repeats)
    row("unpack trit5, pair table (numpy)", f"{mb / base:,.0f} MB/s", "1 (shipped)")
    t = best_time(lambda: numpy_multiply_shift(packed_np, count), args.repeats)
    row("unpack trit5, multiply-shift (numpy)", f"{mb / t:,.0f} MB/s", f"{base / t:.2f} x pair table")
    t_ms = t
    t = best_time(lambda: numpy_div_mod(plain_np, count), args.repeats)
    row("unpack plain base 3, div/mod (numpy)", f"{mb / t:,.0f} MB/s",
        f"{base / t:.2f} x pair table; {t_ms / t:.2f} x multiply-shift")

    # whole-file operations on the MLP
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mlp.safetensors")
        t = best_time(lambda: ternq.save_packed(mlp, path), 3)
        row("save_packed 4 x Linear(1024) (quantize + pack + write)", f"{1e3 * t:.0f} ms", "")
        t = best_time(lambda: ternq.load_packed(path, nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))), 3)
        row("load_packed 4 x Linear(1024) (incl. building the skeleton)", f"{1e3 * t:.0f} ms", "")
        t = best_time(lambda: verify_file(path), 3)
        row("ternq verify 4 x Linear(1024)", f"{1e3 * t:.0f} ms", "")

    print(machine_line())
    print(f"throughput: {count:,} codes per call, best of {args.repeats}")
    print()
    widths = [max(len(r[i]) for r in [("measurement", "value", "ratio"), *rows]) for i in range(3)]
    print(f"| {'measurement'.ljust(widths[0])} | {'value'.rjust(widths[1])} | {'ratio'.ljust(widths[2])} |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 1)}:|{'-' * (widths[2] + 2)}|")
    for what, value, ratio in rows:
        print(f"| {what.ljust(widths[0])} | {value.rjust(widths[1])} | {ratio.ljust(widths[2])} |")


if __name__ == "__main__":
    main()
