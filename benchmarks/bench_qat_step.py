"""QAT training-step time against fp32: a GPT-2-like decoder and a HiFi-GAN-like conv stack.

    python benchmarks/bench_qat_step.py                # ~1 min on 2 cores; --threads N, --steps N
    python benchmarks/bench_qat_step.py --breakdown    # also the step with weights only and without the input norm
    python benchmarks/bench_qat_step.py --clock thread # thread CPU time: steadier on a loaded machine (1 thread)
    python benchmarks/bench_qat_step.py --torch-act    # also the QAT step with the torch activation quantizer
    PYTHONPATH=/path/to/other/ternq python benchmarks/bench_qat_step.py   # the same figures for another ternq

One AdamW step (forward, backward, optimizer) on a fixed batch, best of --repeats rounds of --steps steps, fp32
and ternq's default ternary QAT measured alternately in one run; prints the machine line and a markdown table of
milliseconds per step and the ratio to fp32. docs/benchmarks.md has the figures and the method.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import machine_line  # noqa: E402
from bench_qat import gpt_model  # noqa: E402  (the char-GPT of the peer comparison, one definition)

import ternq  # noqa: E402
from ternq import native  # noqa: E402

try:
    from ternq.qat.quantizers import register_activation_kernel
except ImportError:  # an older ternq (PYTHONPATH=<other ternq>): its activation quantizer is torch ops only
    register_activation_kernel = None


def _torch_act(on: bool) -> None:
    """Run the activation quantizer's torch form (on) or its native kernel (off), where this ternq has one."""
    if register_activation_kernel is not None:
        register_activation_kernel(None if on else native.fake_quantize)


def conv_net() -> nn.Module:
    """A HiFi-GAN-like stack: conv, two transposed-conv upsamplers with dilated convs, output conv."""
    layers: list[nn.Module] = [nn.Conv1d(80, 128, 7, padding=3)]
    ch = 128
    for _ in range(2):
        layers += [nn.LeakyReLU(0.1), nn.ConvTranspose1d(ch, ch // 2, 8, stride=4, padding=2)]
        ch //= 2
        layers += [nn.LeakyReLU(0.1), nn.Conv1d(ch, ch, 3, padding=3, dilation=3)]
    layers += [nn.LeakyReLU(0.1), nn.Conv1d(ch, 1, 7, padding=3), nn.Tanh()]
    return nn.Sequential(*layers)


def _task(name: str) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    if name == "char-GPT":
        idx = torch.randint(0, 65, (16, 128), generator=g)
        return lambda: gpt_model(65), lambda m: F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    mel, wav = torch.randn(4, 80, 32, generator=g), torch.randn(4, 1, 512, generator=g)
    return conv_net, lambda m: F.l1_loss(m(mel), wav)


def _step_ms(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], steps: int,
             clock: Callable[[], float] = time.perf_counter) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = clock()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()
    return (clock() - start) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; the best is reported (default 5)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time ternary weights alone (act_bits=None, input_norm=None) and with 8-bit "
                         "activations but no input norm (input_norm=None): where the QAT step's extra time goes")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall time (default), or this thread's CPU time, which time slices given to other processes "
                         "do not inflate (a loaded machine; --threads 1 only: other threads' work is not counted)")
    ap.add_argument("--torch-act", action="store_true",
                    help="also time the default QAT step with the activation quantizer's torch form instead of its "
                         "native one-pass kernel (csrc/ternq_act.c): what the kernel saves, in the same run")
    args = ap.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread counts the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"clock: {args.clock}")
    print(f"ternq from {os.path.dirname(ternq.__file__)}")
    print(f"native kernels: {native.status()}")
    configs: dict[str, ternq.QuantConfig | None] = {"qat": None}
    if args.breakdown:
        configs = {"weights only": ternq.TernaryConfig(act_bits=None, input_norm=None),
                   "+ activations": ternq.TernaryConfig(input_norm=None), "qat": None}
    if args.torch_act:
        configs["torch act"] = None
    columns = "".join(f" {'ternary QAT' if key == 'qat' else key} ms/step | / fp32 |" for key in configs)
    print(f"| model | fp32 ms/step |{columns}")
    print("|---|---:|" + "---:|---:|" * len(configs))
    for name in ("char-GPT", "conv stack"):
        make, loss_fn = _task(name)
        torch.manual_seed(0)
        models = {"fp32": make()}
        for key, config in configs.items():
            torch.manual_seed(0)
            models[key] = ternq.quantize(make(), config=config)
        best = dict.fromkeys(models, float("inf"))
        for _ in range(args.repeats):  # alternate, so that a busy moment costs all
            for key, model in models.items():
                _torch_act(key == "torch act")
                best[key] = min(best[key], _step_ms(model, loss_fn, args.steps, clock))
        _torch_act(False)
        cells = "".join(f" {best[key]:.1f} | {best[key] / best['fp32']:.2f}x |" for key in configs)
        print(f"| {name} | {best['fp32']:.1f} |{cells}")


if __name__ == "__main__":
    main()
