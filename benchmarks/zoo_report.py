"""The architecture zoo (tests/zoo_models.py) as one table: what quantize() did to every weight of each model.

For each architecture, in one run: report rows (candidate weights), how many are quantized, how many of those
weights only, how many kept float (and why), the float uses left (``ternq.uses.float_uses``: must be 0), the
largest difference between the dequantized and the weight-only QAT model, the share of packed-model outputs
within the runtime's tolerance of the QAT model, and the training loss over 6 steps. Prints a Markdown table
(docs/conversion.md shows it).

    python benchmarks/zoo_report.py
"""
from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zoo_models import ZOO, Arch, no_dropout, randn  # noqa: E402

import ternq  # noqa: E402
from ternq.uses import float_uses  # noqa: E402

WEIGHT_ONLY = ternq.TernaryConfig(act_bits=None, input_norm=None)


def build(arch: Arch, seed: int = 0) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(seed)
    return no_dropout(arch.make()), arch.inputs()


def row(arch: Arch) -> str:
    model, inputs = build(arch)
    ternq.quantize(model.eval(), example_inputs=inputs)
    report = ternq.report(model)
    quantized = [r for r in report.rows if r.decision != "float"]
    weights_only = [r for r in quantized if r.reason.startswith("weights only")]
    floats = Counter(r.rule if r.rule not in ("-", "") else r.reason.split(":")[0] for r in report.rows
                     if r.decision == "float")
    with torch.no_grad():
        bypass = len(float_uses(model, inputs))
        qat = arch.out(model, inputs)
        with tempfile.TemporaryDirectory() as tmp:
            ternq.save_packed(model, Path(tmp) / "m.safetensors")
            skeleton, _ = build(arch)
            packed = arch.out(ternq.load_packed(Path(tmp) / "m.safetensors", skeleton.eval()), inputs)
    within = ((packed - qat).abs() <= 1e-4 + 1e-4 * qat.abs()).float().mean().item()

    model, _ = build(arch)
    ternq.quantize(model.eval(), config=WEIGHT_ONLY, example_inputs=inputs)
    with torch.no_grad():
        wq = arch.out(model, inputs)
        ternq.dequantize(model)
        deq = (arch.out(model, inputs) - wq).abs().max().item()

    model, _ = build(arch)
    ternq.quantize(model.train(), example_inputs=inputs)
    with torch.no_grad():
        target = randn(*arch.out(model, inputs).shape, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(arch.out(model, inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    kept = ", ".join(f"{n} {why}" for why, n in floats.most_common()) or "-"
    return (f"| {arch.name} | {len(report.rows)} | {len(quantized)} | {len(weights_only)} | {kept} | {bypass} | "
            f"{deq:.1e} | {within:.1%} | {losses[0]:.3f} -> {losses[-1]:.3f} |")


def main() -> None:
    print("| model | weights | quantized | of which weights only | kept float (why) | float uses | "
          "dequantized - QAT | packed within tolerance | loss, 6 steps |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for arch in ZOO:
        print(row(arch), flush=True)


if __name__ == "__main__":
    main()
