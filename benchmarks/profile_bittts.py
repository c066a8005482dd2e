"""Where BitTTS spends its time: each module kind's share of warm synthesis, ternary against fp32.

Forward hooks time every leaf module (acoustic Conv1d / norms, the vocoder's ConvTranspose1d upsamplers, its
resblock Conv1d by kernel size and width, the float layers left unquantized) over `bench_bittts`'s five
sentences; "glue" is what runs outside them (the activations between layers, residual adds, the length
regulator). One row per kind: ms per round for each model, and fp32 / ternary (where fp32 wins: below 1).
Hooks cost a few microseconds per call and make a fused activation run unfused, so the totals are a little
above `bench_bittts.py`'s; the ratios per row are what this is for.

    python benchmarks/profile_bittts.py [--rounds 3] [--threads 1|N|all]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402
from bench_bittts import SENTENCES, _models  # noqa: E402


def kind(name: str, module: nn.Module) -> str:
    """A row label: the model part and the layer type (Conv1d with its kernel size and width)."""
    from ternq.runtime import is_packed

    part = "vocoder resblock" if "resblocks" in name else name.split(".")[0]
    if isinstance(module, nn.ConvTranspose1d):
        label = f"ConvTranspose1d x{module.stride[0]} {module.in_channels}->{module.out_channels}"
    elif isinstance(module, nn.Conv1d):
        label = f"Conv1d k{module.kernel_size[0]} {module.in_channels}->{module.out_channels}"
    else:
        label = type(module).__name__
    return f"{part}: {label}" + ("" if is_packed(module) else " (float)")


def profile(path: str, rounds: int, clock) -> tuple[float, dict[str, float]]:
    """Best round time and the per-kind times of that model (ms per round, averaged over the rounds)."""
    from bittts.synthesis.synthesizer import Synthesizer

    syn = Synthesizer(path)
    ids = [syn.text_to_ids(s)[1] for s in SENTENCES]
    times: dict[str, float] = collections.defaultdict(float)
    started: dict[int, float] = {}
    handles = []
    for name, module in syn.model.named_modules():
        if next(module.children(), None) is not None:
            continue
        label = kind(name, module)
        handles.append(module.register_forward_pre_hook(lambda m, args: started.__setitem__(id(m), clock())))
        handles.append(module.register_forward_hook(
            lambda m, args, out, label=label: times.__setitem__(label, times[label] + clock() - started[id(m)])))
    for i in ids:  # warm-up
        syn.synthesize_ids(i)
    times.clear()
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        for i in ids:
            syn.synthesize_ids(i)
        best = min(best, clock() - start)
    for h in handles:
        h.remove()
    return best, {k: v / rounds for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="1", help="thread count ('all': torch's default)")
    args = parser.parse_args()
    if args.threads != "all":
        torch.set_num_threads(int(args.threads))
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    ternary_path, fp32_path = _models()
    results = {name: profile(path, args.rounds, clock) for name, path in (("ternary", ternary_path),
                                                                           ("fp32", fp32_path))}
    print(machine_line())
    print("\n| module kind | ternary ms | fp32 ms | fp32 / ternary |\n|---|---:|---:|---:|")
    (t_total, tern), (f_total, fp32) = results["ternary"], results["fp32"]
    for label in sorted(tern, key=lambda k: -tern[k]):
        t = tern[label]
        f = fp32.get(label if label.endswith(" (float)") else label + " (float)", 0.0)  # all float in fp32
        print(f"| {label} | {t * 1e3:.1f} | {f * 1e3:.1f} | {f / t if t else float('nan'):.2f} |")
    glue_t, glue_f = t_total - sum(tern.values()), f_total - sum(fp32.values())
    print(f"| glue (outside the leaf modules) | {glue_t * 1e3:.1f} | {glue_f * 1e3:.1f} | {glue_f / glue_t:.2f} |")
    print(f"| **total (best round)** | {t_total * 1e3:.1f} | {f_total * 1e3:.1f} | **{f_total / t_total:.2f}** |")


if __name__ == "__main__":
    main()
