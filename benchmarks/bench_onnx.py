"""ONNX export benchmark: file sizes (packed safetensors, ONNX, float32 weights) and onnxruntime's speed against
ternq's packed runtime on the same model and input, one thread each.

    python benchmarks/bench_onnx.py               # ~1 min on 2 cores; --repeats N, --frames N to change

Two small models: "vocoder", a BitTTS-vocoder-shaped conv stack (Conv1d, ConvTranspose1d upsamplers, a
residual conv block; ternary, layer-normed 8-bit activations), and "mlp", a token MLP (4 x Linear 512 -> 1536 ->
512). Prints the machine line and one markdown table; every figure is measured in this run, times are best of
--repeats. onnxruntime runs the float weights its session folded from the codes at load time
(docs/deploying.md), with the activation quantization as graph ops; ternq runs its int8 kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402
from bench_packing import best_time  # noqa: E402

import ternq  # noqa: E402
from ternq import native  # noqa: E402


class Vocoder(nn.Module):
    def __init__(self, mels: int = 80, width: int = 256) -> None:
        super().__init__()
        self.pre = nn.Conv1d(mels, width, 7, padding=3)
        self.ups = nn.ModuleList([nn.ConvTranspose1d(width, width // 2, 16, 8, padding=4),
                                  nn.ConvTranspose1d(width // 2, width // 4, 16, 8, padding=4)])
        self.res = nn.ModuleList([nn.Conv1d(width // 4, width // 4, 3, padding=d, dilation=d) for d in (1, 3, 5)])
        self.post = nn.Conv1d(width // 4, 1, 7, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        for up in self.ups:
            x = up(torch.nn.functional.leaky_relu(x, 0.1))
        for conv in self.res:
            x = x + conv(torch.nn.functional.leaky_relu(x, 0.1))
        return torch.tanh(self.post(x))


class MLP(nn.Module):
    def __init__(self, dim: int = 512, hidden: int = 1536, blocks: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                    for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--frames", type=int, default=200, help="vocoder input frames (mlp: tokens)")
    args = parser.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(1)
    print(machine_line())
    print(f"native kernels: {native.status()} | onnxruntime {ort.__version__}, 1 intra-op thread")
    print()
    print("| model | params | fp32 weights | packed .safetensors | .onnx | session start | onnxruntime | "
          "ternq runtime | onnxruntime / ternq |")
    print("|---|---|---|---|---|---|---|---|---|")
    models: dict[str, tuple[Callable[[], nn.Module], Tensor, dict[int, str]]] = {
        "vocoder": (Vocoder, torch.randn(1, 80, args.frames), {0: "batch", 2: "frames"}),
        "mlp": (MLP, torch.randn(1, args.frames, 512), {0: "batch", 1: "tokens"}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, x, axes) in models.items():
            torch.manual_seed(0)
            qat = ternq.quantize(make())
            packed_path, onnx_path = os.path.join(tmp, f"{name}.safetensors"), os.path.join(tmp, f"{name}.onnx")
            ternq.save_packed(qat, packed_path)
            torch.manual_seed(0)
            packed = ternq.load_packed(packed_path, make()).eval()
            ternq.export_onnx(packed, (x,), onnx_path, input_names=["x"], dynamic_axes={"x": axes})
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            t0 = time.perf_counter()
            session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
            start = time.perf_counter() - t0
            feed = {"x": x.numpy()}
            t_ort = best_time(lambda s=session, f=feed: s.run(None, f), args.repeats)
            with torch.no_grad():
                t_ternq = best_time(lambda m=packed, x=x: m(x), args.repeats)
                ref = packed(x)
            err = (torch.from_numpy(session.run(None, feed)[0]) - ref).abs().max() / ref.abs().max()
            params = sum(p.numel() for p in make().parameters())
            print(f"| {name} | {params / 1e6:.2f} M | {params * 4 / 1e6:.2f} MB | "
                  f"{os.path.getsize(packed_path) / 1e6:.3f} MB | {os.path.getsize(onnx_path) / 1e6:.3f} MB | "
                  f"{start * 1e3:.0f} ms | {t_ort * 1e3:.2f} ms | {t_ternq * 1e3:.2f} ms | {t_ort / t_ternq:.2f} |"
                  f"  <!-- max error / max |y|: {float(err):.1e} -->")


if __name__ == "__main__":
    main()
