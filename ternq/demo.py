"""`make demo` for the library alone: quantize a small built-in model, train it, report, pack and reload it.

The model is a small 1-D convolutional network (the shape of a TTS decoder block) learning a fixed random
"teacher" convolution stack; everything runs on the CPU in well under a minute.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn
from tqdm import tqdm

import ternq


class ConvNet(nn.Module):
    """Conv1d stack with residual blocks and a Linear head: a miniature TTS decoder."""

    def __init__(self, channels: int = 64, blocks: int = 3) -> None:
        super().__init__()
        self.pre = nn.Conv1d(8, channels, 5, padding=2)
        self.blocks = nn.ModuleList(nn.Conv1d(channels, channels, 5, padding=2) for _ in range(blocks))
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        for conv in self.blocks:
            h = h + torch.relu(conv(h))
        return self.head(h.transpose(1, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ternq.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    teacher = ConvNet().eval()
    model = ConvNet()
    model = ternq.quantize(model, exclude=ternq.output_layers())  # ternary everywhere but the head
    print(ternq.report(model))

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    bar = tqdm(range(args.steps), desc="ternary QAT", unit="step")
    first = None
    for _ in bar:
        x = torch.randn(16, 8, 64)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        bar.set_postfix(loss=f"{loss.item():.4f}")
    print(f"loss: {first:.4f} -> {loss.item():.4f} after {args.steps} steps")

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "demo.safetensors")
        ternq.save_packed(model, path)
        packed = ternq.load_packed(path, ConvNet()).eval()
        x = torch.randn(4, 8, 64)
        with torch.no_grad():
            diff = (packed(x) - model(x)).abs().max().item()
            t0 = time.perf_counter()
            packed(x)
            dt = time.perf_counter() - t0
        fp32 = sum(p.numel() * 4 for p in ConvNet().parameters())
        size = os.path.getsize(path)
        print(f"packed file: {size} bytes vs {fp32} bytes of fp32 parameters ({100 * (1 - size / fp32):.1f}% smaller)")
        print(f"packed runtime vs QAT model: max |difference| = {diff:.2e}; one forward {1e3 * dt:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
