"""Per-call cost of the packed layers, one layer at a time, and an A/B against another commit (issue 18).

For each case (one Linear(1024) at 16 / 64 / 256 rows in both storages, the Conv1d and ConvTranspose1d shapes of
bench_runtime.py, a grouped Conv1d on a batch, a tiny Conv1d whose call is all overhead) it prints the time of one
module call of fp32 and of ternq, their ratio, and, for the Linear, onnxruntime's dynamic int8 session on the same
layer (one MatMulInteger and its quantizer: the bare session, no model around it). Each thread count runs in its
own process; with ``--against REV`` the same cases also run on that commit's ``ternq`` (``git archive``), the two
trees' processes taking turns, best of `--rounds` per case, and the table gains old / new columns.

    python benchmarks/bench_callcost.py                        # this tree, 1 and 2 threads
    python benchmarks/bench_callcost.py --against main         # A/B: main vs this tree, in one run
    python benchmarks/bench_callcost.py --threads 1,2,4 --rounds 9

At 1 thread the clock is the thread's CPU time, at more threads wall time (OpenMP's defaults, as users run it).
The last column per tree is its ratio to fp32 at N threads over its 1-thread ratio (the goal: >= 1.00).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, constructor source, input shape, leaky ReLU slope before the layer or None)
CASES: list[tuple[str, str, tuple[int, ...], float | None]] = [
    ("Linear(1024) 16 rows", "nn.Linear(1024, 1024)", (16, 1024), None),
    ("Linear(1024) 64 rows", "nn.Linear(1024, 1024)", (64, 1024), None),
    ("Linear(1024) 256 rows", "nn.Linear(1024, 1024)", (256, 1024), None),
    ("Conv1d(192,k5) T500", "nn.Conv1d(192, 192, 5, padding=2)", (1, 192, 500), None),
    ("Conv1d(256,k5) T1000", "nn.Conv1d(256, 256, 5, padding=2)", (1, 256, 1000), None),
    ("Conv1d(256,k5,g4) B2 T300", "nn.Conv1d(256, 256, 5, padding=2, groups=4)", (2, 256, 300), None),
    ("Conv1d(16,k3) T16 (overhead)", "nn.Conv1d(16, 16, 3, padding=1)", (1, 16, 16), None),
    ("ConvT(512,k16,s8) T100", "nn.ConvTranspose1d(512, 256, 16, 8, padding=4)", (1, 512, 100), 0.1),
    ("ConvT(256,k16,s8) T800", "nn.ConvTranspose1d(256, 128, 16, 8, padding=4)", (1, 256, 800), 0.1),
    ("ConvT(128,k4,s2) T6400", "nn.ConvTranspose1d(128, 64, 4, 2, padding=1)", (1, 128, 6400), 0.1),
    ("ConvT(64,k4,s2) T12800", "nn.ConvTranspose1d(64, 32, 4, 2, padding=1)", (1, 64, 12800), 0.1),
]


def _time(fn: Callable[[], object], rounds: int, one_thread: bool) -> float:
    """Best-of-`rounds` microseconds per call, each round ~20 ms of calls."""
    clock = time.thread_time if one_thread else time.perf_counter
    for _ in range(3):
        fn()
    t = clock()
    fn()
    n = max(1, int(0.02 / max(clock() - t, 1e-7)))
    best = float("inf")
    for _ in range(rounds):
        t = clock()
        for _ in range(n):
            fn()
        best = min(best, (clock() - t) / n)
    return best * 1e6


def _ort_linear(layer, threads: int):  # noqa: ANN001, ANN202
    """onnxruntime's dynamic int8 session of one Linear, or None."""
    try:
        import onnxruntime as ort
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, int8 = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        torch.onnx.export(layer, (torch.randn(2, layer.in_features),), fp32, input_names=["x"], dynamo=False,
                          dynamic_axes={"x": {0: "rows"}})
        import logging
        logging.getLogger().setLevel(logging.ERROR)
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        return ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"])


def worker(threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """Times of this process's `ternq` (whichever tree PYTHONPATH gives) on every case."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ternq import TernaryConfig
    from ternq.qat.layers import layer_spec, to_quant_module
    from ternq.runtime import leaky_relu_then, packed_layer

    torch.set_num_threads(threads)
    one = threads == 1
    config = TernaryConfig()
    results: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for label, source, shape, slope in CASES:
            torch.manual_seed(0)
            layer = eval(source, {"nn": nn}).eval()  # noqa: S307 - the constructors above
            qat = to_quant_module(layer, config)
            with torch.no_grad():
                codes, scale = qat.weight_codes()
            x = torch.randn(shape)
            act = (lambda v: v) if slope is None else (lambda v, a=slope: F.leaky_relu(v, a))
            row: dict[str, float] = {}
            storages = ("auto", "int8") if isinstance(layer, nn.Linear) else ("auto",)
            for storage in storages:
                packed = packed_layer(layer, codes, scale, config, layer_spec(layer), storage=storage)
                if slope is None:
                    call = packed
                else:  # the vocoder's call: the activation inside the input quantization where the kernel can
                    call = functools.partial(leaky_relu_then, packed, negative_slope=slope)
                row[f"ternq {storage}"] = _time(functools.partial(call, x), rounds, one)
            row["fp32"] = _time(lambda f=layer, a=act, v=x: f(a(v)), rounds, one)
            if isinstance(layer, nn.Linear):
                session = _ort_linear(layer, threads)
                if session is not None:
                    row["ort int8"] = _time(functools.partial(session.run, None, {"x": x.numpy()}), rounds, one)
            results[label] = row
    return results


def _run_tree(tree: Path, threads: int, rounds: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, __file__, "--worker", str(threads), "--rounds", str(rounds)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _best(a: dict[str, dict[str, float]] | None, b: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    if a is None:
        return b
    return {case: {k: min(v, a[case].get(k, v)) for k, v in row.items()} for case, row in b.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=2, help="processes per tree and thread count, alternating")
    parser.add_argument("--against", help="a git revision whose ternq is the A of an A/B")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.rounds)))
        return
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line

    from ternq import native
    print(machine_line())
    print(f"ternq native: {native.status()}; tiled GEMM: {native.gemm_isa()}")
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"new": ROOT}
        if args.against:
            old = Path(tmp) / "old"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.against, "ternq"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            trees = {"old": old, "new": ROOT}
            print(f"A/B: old = {args.against} ({subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', args.against], capture_output=True, text=True).stdout.strip()}), new = this tree")
        table: dict[int, dict[str, dict[str, dict[str, float]]]] = {}
        for n in threads:
            table[n] = {name: None for name in trees}  # type: ignore[misc]
            for _ in range(args.turns):
                for name, tree in trees.items():
                    table[n][name] = _best(table[n][name], _run_tree(tree, n, args.rounds))
    for n in threads:
        print(f"\n{n} thread(s): microseconds per call (ratio = fp32 / ternq)")
        for case in table[n]["new"]:
            cells = []
            for name in trees:
                row = table[n][name][case]
                fp32 = row["fp32"]
                for key in (k for k in row if k.startswith("ternq")):
                    ratio = fp32 / row[key]
                    base = table[threads[0]][name][case]
                    scaling = ratio / (base["fp32"] / base[key])
                    cells.append(f"{name} {key.split()[1]:4s} {row[key]:9.1f} ({ratio:4.2f}x, N/1 {scaling:4.2f})")
            extra = f"  ort int8 {table[n]['new'][case]['ort int8']:8.1f}" if "ort int8" in table[n]["new"][case] else ""
            print(f"  {case:30s} fp32 {table[n]['new'][case]['fp32']:9.1f}  " + "  ".join(cells) + extra)
            if "old" in trees:
                for key in (k for k in table[n]["new"][case] if k.startswith("ternq")):
                    speedup = table[n]["old"][case][key] / table[n]["new"][case][key]
                    print(f"  {'':30s} {key}: new is {speedup:4.2f}x old")


if __name__ == "__main__":
    main()
