"""Where a decode step's time goes: ternq's packed Llama (bench_decode.py's model) split into its parts.

For each thread count, one greedy decode step (one token, KV cache) is timed as a whole and in parts:

* ``step``: the transformers forward of one token (what bench_decode.py's tokens/s is the inverse of);
* ``gemv native``: the native 2-bit GEMV calls alone, every quantized matrix once in the model's order
  (weights streamed from memory as in a step: 2 bits per weight), through the bound ctypes call;
* ``layer calls``: the same matrices through ``PackedLinear.__call__`` (picker, kernel dispatch, ctypes);
* ``rest``: step minus layer calls: transformers' Python, attention, RoPE, the KV cache, norms, lm_head (fp32);
  the model-independent overhead that no GEMV speed removes;
* ``free matrices``: the step with every quantized matrix replaced by a stand-in that returns zeros (no weight
  read): the floor of a step that transformers' forward runs, whatever the kernels do.

Then, per matrix shape (2048 -> 5632 and 5632 -> 2048 in issue 18's model): one GEMV alone (the native call, the
layers of that shape in turn as a step streams them) and one layer call, per call, with the GB/s of 2-bit weight
read, and each thread count's speed-up over the first; and the cost of one fork / join of the threads (a small
GEMV split into chunks, against the same call on one thread).

Wall-clock times (``--cpu-clock``: the process's CPU time, for development on a machine other processes load; at
1 thread only, as the spinning OpenMP workers count too).

    python benchmarks/profile_decode.py                   # issue 18's model, 1 and 2 threads
    python benchmarks/profile_decode.py --threads 1 --layers 2
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402
from bench_decode import add_model_args, build, llama_config, quantized  # noqa: E402

import ternq  # noqa: E402
from ternq.runtime import is_packed  # noqa: E402

warnings.filterwarnings("ignore")


CLOCK = time.perf_counter


def best(fn, reps: int, rounds: int = 5) -> float:
    """Best-of-`rounds` mean seconds of `reps` calls of fn."""
    fn()
    out = float("inf")
    for _ in range(rounds):
        start = CLOCK()
        for _ in range(reps):
            fn()
        out = min(out, (CLOCK() - start) / reps)
    return out


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cpu-clock", action="store_true",
                   help="time by the process's CPU time (development on a loaded machine; 1 thread only)")
    args = p.parse_args()
    global CLOCK
    if args.cpu_clock:
        CLOCK = time.process_time
    config = llama_config(args)
    model = ternq.load_packed(ternq.pack(quantized(build(config))), build(config))
    layers = [m for m in model.modules() if is_packed(m)]
    weights = sum(m.weight.numel() for m in layers)
    print(machine_line())
    print(f"{len(layers)} packed Linear layers, {weights / 1e6:.1f} M weights, storage "
          f"{sorted({m.storage for m in layers})}")
    torch.manual_seed(1)
    prompt = torch.randint(3, args.vocab, (1, args.prompt))
    counts = [int(t) for t in args.threads.split(",")]
    for threads in counts:
        measure(model, layers, prompt, threads, args)
    per_shape(layers, counts, args.reps)
    fork_join(counts)


def measure(model: torch.nn.Module, layers: list[torch.nn.Module], prompt: torch.Tensor, threads: int,
            args: argparse.Namespace) -> None:
    """Print one thread count's line: the step, its native GEMVs, its layer calls and the rest."""
    import inspect

    from transformers import DynamicCache

    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    torch.set_num_threads(threads)
    cache = DynamicCache()
    model(input_ids=prompt, use_cache=True, **{key: cache})
    tok = torch.tensor([[5]])
    length = args.prompt
    weights = sum(m.weight.numel() for m in layers)
    xs = [torch.randn(1, 1, m.in_features) for m in layers]

    def step() -> None:
        nonlocal length
        model(input_ids=tok, use_cache=True, **{key: cache})
        length += 1
        if length >= args.prompt + args.new:  # keep the cache near the bench's length
            cache.crop(args.prompt - length)
            length = args.prompt

    for m, x in zip(layers, xs):  # bind the GEMVs
        m(x)
    bound = [m.__dict__["_gemv"][3] for m in layers]

    def natives() -> None:
        for b, x in zip(bound, xs):
            b(x)

    def calls() -> None:
        for m, x in zip(layers, xs):
            m(x)

    t_step, t_native, t_calls = best(step, args.reps), best(natives, args.reps), best(calls, args.reps)
    with free_matrices(model, layers):
        t_free = best(step, args.reps)
    print(f"threads {threads}: step {t_step * 1e3:.3f} ms ({1 / t_step:.1f} tok/s) | gemv native "
          f"{t_native * 1e3:.3f} ms ({weights / 4 / t_native / 1e9:.1f} GB/s of 2-bit weights) | layer calls "
          f"{t_calls * 1e3:.3f} ms ({(t_calls - t_native) / len(layers) * 1e6:.1f} us/call over native) | rest "
          f"{(t_step - t_calls) * 1e3:.3f} ms | free matrices {t_free * 1e3:.3f} ms ({1 / t_free:.1f} tok/s)",
          flush=True)


class _Free(torch.nn.Module):
    """A stand-in for a quantized matrix: zeros of its output shape, no weight read."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def free_matrices(model: torch.nn.Module, layers: list[torch.nn.Module]) -> Iterator[None]:
    """Every packed layer of `model` replaced by a `_Free` stand-in inside the block, put back after."""
    wanted = {id(m) for m in layers}
    swapped = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if id(child) in wanted]
    for parent, name, child in swapped:
        setattr(parent, name, _Free(child.out_features))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)

def per_shape(layers: list[torch.nn.Module], counts: list[int], reps: int) -> None:
    """Print one GEMV (the bound native call) and one layer call per matrix shape, at each thread count."""
    shapes: dict[tuple[int, int], list[torch.nn.Module]] = {}
    for m in layers:
        shapes.setdefault((m.in_features, m.out_features), []).append(m)
    for (k, n), group in shapes.items():
        x = torch.randn(1, 1, k)
        for m in group:
            m(x)
        bound = [m.__dict__["_gemv"][3] for m in group]
        first = None
        for threads in counts:
            torch.set_num_threads(threads)
            t_native = best(lambda x=x, bound=bound: [b(x) for b in bound], reps) / len(group)
            t_call = best(lambda x=x, group=group: [m(x) for m in group], reps) / len(group)
            first = first or t_native
            print(f"{k} -> {n} ({len(group)} layers), threads {threads}: gemv {t_native * 1e6:.1f} us "
                  f"({n * -(-k // 4) / t_native / 1e9:.1f} GB/s, {first / t_native:.2f}x threads {counts[0]}) | "
                  f"layer call {t_call * 1e6:.1f} us (+{(t_call - t_native) * 1e6:.1f})", flush=True)


def fork_join(counts: list[int]) -> None:
    """Print the cost of one fork / join: a one-token Linear(1024 -> 64) split into chunks, minus the same call
    on the calling thread alone (`tq_set_min_work`: the least work per chunk)."""
    from ternq.qat.layers import layer_spec
    from ternq.qat.quantizers import quantize_weight
    from ternq.runtime import packed_layer

    lib = ternq.native.library()
    if lib is None:
        return
    cfg = ternq.TernaryConfig(input_norm=None)
    lin = torch.nn.Linear(1024, 64, bias=False)
    codes, scale = quantize_weight(lin.weight.detach(), cfg, 0)
    layer = packed_layer(lin, codes, scale, cfg, layer_spec(lin), storage="packed", kernel="int8_gemv")
    x = torch.randn(1, 1, 1024)
    layer(x)
    call = layer.__dict__["_gemv"][3]
    for threads in counts:
        torch.set_num_threads(threads)
        serial = best(lambda: call(x), 2000)
        lib.tq_set_min_work(1)
        try:
            split = best(lambda: call(x), 2000)
        finally:
            lib.tq_set_min_work(1 << 18)  # the library's default
        print(f"threads {threads}: Linear(1024 -> 64) one token: {serial * 1e6:.2f} us on one thread, "
              f"{split * 1e6:.2f} us split in chunks (fork / join ~{(split - serial) * 1e6:.1f} us)", flush=True)


if __name__ == "__main__":
    main()
