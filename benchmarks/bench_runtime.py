"""Packed ternary inference vs fp32 eager, PyTorch dynamic int8 quantization and torchao's int8 configs.

Prints, from one run on this machine: speed ratios (fp32 time / variant time, so 2.0x = twice as fast) at 1 thread
and at all threads (``--threads``; OpenMP's default settings, as users run it) on a Linear-heavy model (4 x Linear(1024), 1 / 16 / 64 / 256 tokens) and on BitTTS-shaped Conv1d stacks
(4 x Conv1d(C, C, 5), C = 192 / 256, 500 / 1000 frames; the same stacks again quantized with
``act_granularity="tensor"``, one activation scale per sample, which ternq runs as one int8 GEMM per conv) and
HiFi-GAN's ConvTranspose1d upsamplers; then resident weight memory and process peak RSS during inference (each variant in its own subprocess, so peaks do not mix), and the peak of loading a packed
file into a float skeleton when `ternq.load_packed` is available.

Variants: ``ternq`` = `ternq.runtime.packed_layer` with the paper config (ternary per-tensor weights, layer-normed
8-bit activations), int8 code storage, kernels picked by `ternq.runtime.picker` (no timing), native kernels where built
(`ternq.native.status()` is printed); ``ternq 2-bit`` = the same with 2-bit storage;
``ternq w-only`` = the weight-only kernel forced (the path for CPUs without fast int8); ``torch dyn int8`` =
``torch.ao.quantization.quantize_dynamic`` (what Pocket TTS uses; Linear only); ``torchao`` = torchao's
``Int8DynamicActivationInt8WeightConfig`` / ``Int8WeightOnlyConfig`` when torchao imports (Linear only);
``ort dyn int8`` = onnxruntime's ``quantize_dynamic`` of the fp32 model's ONNX export (MatMulInteger; Linear only),
its session at the table's thread count.
The variants compute different models (different quantizers), so this compares speed and memory only.

Times are the best of `--rounds` interleaved rounds (the variants take turns, so a burst of load on a shared
machine hits all of them), each round timing enough calls to last ~10 ms; at 1 thread the clock is the thread's
CPU time, at more threads wall time. A last table divides ternq's ratio at N threads by its 1-thread ratio.

    python benchmarks/bench_runtime.py                 # the full table (~3 min)
    python benchmarks/bench_runtime.py --quick         # smoke run
    python benchmarks/bench_runtime.py --emulate-avx2  # the same with oneDNN / ATen / MKL limited to AVX2 and
                                                       # ternq's native kernels built for haswell (no VNNI)
    python benchmarks/bench_runtime.py --load-only     # only the load_packed peak table
    python benchmarks/bench_runtime.py --threads 1,2,4,all  # speed tables at these thread counts
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

# OpenMP runs with its defaults (no OMP_WAIT_POLICY): what users get. On a machine shared with other busy
# processes, multi-thread times are then noisy (a spinning thread holds a core its partner waits for): run the
# thread tables on a quiet machine.
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

from ternq import TernaryConfig, native  # noqa: E402
from ternq.qat.layers import layer_spec, to_quant_module  # noqa: E402
from ternq.runtime import packed_layer  # noqa: E402
from ternq.runtime.packed_weight import PackedWeight  # noqa: E402

ALL_THREADS = torch.get_num_threads()  # torch's default: every core (or $OMP_NUM_THREADS)

warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

CONFIG = TernaryConfig()


# --- models ----------------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Linear(1024, 1024)] + ([nn.GELU()] if i < 3 else [])
    return nn.Sequential(*layers).eval()


def conv_stack(channels: int, config: TernaryConfig = CONFIG) -> Callable[[], nn.Module]:
    """4 x (Conv1d(C, C, 5), ReLU); `config` is what ternq quantizes it with (`bench_config`)."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Conv1d(channels, channels, 5, padding=2), nn.ReLU()]
        model = nn.Sequential(*layers).eval()
        model.bench_config = config
        return model
    return make


PER_SAMPLE = TernaryConfig(act_granularity="tensor")  # one activation scale per sample: Conv1d = one int8 GEMM


def upsamplers() -> nn.Module:
    """HiFi-GAN V1's upsampling ConvTranspose1d layers (512 channels, x8 x8 x2 x2)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for c_in, k, stride in [(512, 16, 8), (256, 16, 8), (128, 4, 2), (64, 4, 2)]:
        layers += [nn.ConvTranspose1d(c_in, c_in // 2, k, stride, padding=(k - stride) // 2), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers).eval()


# (label, model factory, input shape)
CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("MLP 4xLinear(1024)", mlp, (1, 1024)),
    ("MLP 4xLinear(1024)", mlp, (16, 1024)),
    ("MLP 4xLinear(1024)", mlp, (64, 1024)),
    ("MLP 4xLinear(1024)", mlp, (256, 1024)),
    ("Conv1d 4x(192,k5)", conv_stack(192), (1, 192, 500)),
    ("Conv1d 4x(192,k5)", conv_stack(192), (1, 192, 1000)),
    ("Conv1d 4x(256,k5)", conv_stack(256), (1, 256, 500)),
    ("Conv1d 4x(256,k5)", conv_stack(256), (1, 256, 1000)),
    ("Conv1d 4x(192,k5) per-sample act", conv_stack(192, PER_SAMPLE), (1, 192, 500)),
    ("Conv1d 4x(192,k5) per-sample act", conv_stack(192, PER_SAMPLE), (1, 192, 1000)),
    ("Conv1d 4x(256,k5) per-sample act", conv_stack(256, PER_SAMPLE), (1, 256, 500)),
    ("Conv1d 4x(256,k5) per-sample act", conv_stack(256, PER_SAMPLE), (1, 256, 1000)),
    ("ConvT1d HiFi-GAN ups", upsamplers, (1, 512, 100)),
]
MEMORY_CASES = [0, 7]  # one Linear model, one Conv1d model (resident weights do not depend on the input)


# --- variants --------------------------------------------------------------------------------------------------


_QUANTIZED = (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)


def to_qat(model: nn.Module) -> nn.Module:
    """Every Linear / Conv1d / ConvTranspose1d replaced by its QAT layer with the paper config."""
    for name, child in list(model.named_children()):
        if type(child) in _QUANTIZED:
            setattr(model, name, to_quant_module(child, getattr(model, "bench_config", CONFIG)))
    return model


def ternq_packed(model: nn.Module, storage: str = "int8", kernel: str | None = None) -> nn.Module:
    config = getattr(model, "bench_config", CONFIG)
    for name, child in list(model.named_children()):
        if type(child) in _QUANTIZED:
            qat = to_quant_module(child, config)
            with torch.no_grad():
                codes, scale = qat.weight_codes()
            setattr(model, name, packed_layer(child, codes, scale, config, layer_spec(child), storage=storage,
                                              kernel=kernel))
    return model


def torch_dynamic(model: nn.Module) -> nn.Module | None:
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        return None  # quantize_dynamic has no Conv1d
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


class _OrtModule(nn.Module):
    """An onnxruntime session behind a module's call: what a user deploying with onnxruntime runs."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input = session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.numpy()})[0])


def ort_dynamic(model: nn.Module) -> nn.Module | None:
    """onnxruntime's dynamic int8 quantization (MatMulInteger, int8 activations per call) of the fp32 model,
    at torch's current thread count. Linear only: its ConvInteger ran at 0.23x fp32 on the Conv1d stacks."""
    if not all(isinstance(m, (nn.Linear, nn.Sequential, nn.ReLU, nn.GELU)) for m in model.modules()):
        return None
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        features = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.randn(2, features),), fp32, input_names=["x"], dynamo=False,
                              dynamic_axes={"x": {0: "rows"}})
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"])
    return _OrtModule(session)


def ort_status() -> str:
    try:
        import onnxruntime
    except ImportError as e:
        return f"unavailable ({e})"
    return f"onnxruntime {onnxruntime.__version__}"


def _torchao(config_name: str) -> Callable[[nn.Module], nn.Module | None]:
    def convert(model: nn.Module) -> nn.Module | None:
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            return None  # torchao's int8 configs quantize Linear weights only
        import torchao.quantization as tq

        tq.quantize_(model, getattr(tq, config_name)())
        return model
    return convert


def torchao_status() -> str:
    try:
        import torchao  # noqa: F401
        import torchao.quantization as tq

        tq.Int8DynamicActivationInt8WeightConfig, tq.Int8WeightOnlyConfig  # noqa: B018
        return f"torchao {torchao.__version__}"
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"unavailable ({type(e).__name__}: {e})"


VARIANTS: dict[str, Callable[[nn.Module], nn.Module | None]] = {
    "fp32": lambda m: m,
    "ternq": lambda m: ternq_packed(m),
    "ternq 2-bit": lambda m: ternq_packed(m, storage="packed"),
    "ternq w-only": lambda m: ternq_packed(m, kernel="weight_only"),
    "torch dyn int8": torch_dynamic,
    "ort dyn int8": ort_dynamic,
    "torchao dyn-act int8": _torchao("Int8DynamicActivationInt8WeightConfig"),
    "torchao w-only int8": _torchao("Int8WeightOnlyConfig"),
}


def available_variants() -> list[str]:
    names = list(VARIANTS)
    if not torchao_status().startswith("torchao"):
        names = [n for n in names if not n.startswith("torchao")]
    if not ort_status().startswith("onnxruntime"):
        names = [n for n in names if not n.startswith("ort")]
    return names


# --- measuring -------------------------------------------------------------------------------------------------


def time_variants(models: dict[str, nn.Module], x: Tensor, rounds: int) -> dict[str, float]:
    """Best-of-`rounds` seconds per call, the variants taking turns within each round, each turn after one
    untimed call (so that no variant pays for the caches the previous one filled with its own weights).

    With one thread the clock is the thread's CPU time (all the work runs in the calling thread), which time
    slices given to other processes on a shared machine do not inflate; with more threads it is wall time.
    """
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.inference_mode():
        for m in models.values():  # warm-up (and ternq's kernel choice for this shape)
            m(x)
            m(x)
        start = time.perf_counter()
        models["fp32"](x)
        reps = max(1, int(0.01 / max(time.perf_counter() - start, 1e-6)))
        best = dict.fromkeys(models, float("inf"))
        for _ in range(rounds):
            for name, m in models.items():
                m(x)  # untimed: the previous variant's weights left the caches, this one's are brought back
                start = clock()
                for _ in range(reps):
                    m(x)
                best[name] = min(best[name], (clock() - start) / reps)
    return best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model keeps (parameters, buffers, state_dict entries, tensor-subclass parts),
    each storage once. For torch's dynamic quantization this counts the int8 weight in the state_dict; the
    fbgemm prepacked copy it computes with is opaque and about the same size."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
            return
        if not isinstance(value, Tensor) or isinstance(value, PackedWeight):
            return  # a packed layer's .weight holds no data (its codes are the layer's buffers, counted there)
        if type(value) not in (Tensor, nn.Parameter) and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            for n in names:
                visit(getattr(value, n))
            return
        if value.is_quantized:
            seen[value.data_ptr()] = value.numel() * value.element_size() + 8
            return
        storage = value.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        visit(t)
    for v in model.state_dict().values():
        visit(v)
    return sum(seen.values())


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _measured(procedure: Callable[[], Any]) -> dict[str, Any]:
    """RSS growth of `procedure` in this (fresh) process, after one untimed run of it.

    The first run loads code, oneDNN's JIT kernels and library workspaces; they stay, so the baseline is taken
    after it and the second run's growth is what the procedure itself holds (``resident``: after it returns,
    while its result is alive) and needs at its peak (``peak``, from VmHWM reset at the baseline).
    """
    procedure()
    gc.collect()
    base = _rss_kib("VmRSS")
    reset = _reset_peak()
    result = procedure()
    gc.collect()
    resident = _rss_kib("VmRSS") - base
    peak = _rss_kib("VmHWM") - base
    del result
    return {"resident_kib": resident, "peak_kib": peak, "peak_reset": reset}


def child_peak(case: int, path: str) -> dict[str, Any]:
    """Load a saved variant (torch.load, no conversion temporaries) and run three forwards."""
    torch.set_num_threads(1)
    _, _, shape = CASES[case]
    x = torch.randn(*shape)

    def procedure() -> nn.Module:
        model = torch.load(path, weights_only=False)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
        return model

    return _measured(procedure)


def child_load(case: int, path: str, meta: bool) -> dict[str, Any]:
    """Build the float skeleton, `ternq.load_packed` into it, run one forward."""
    import ternq

    torch.set_num_threads(1)
    _, make, shape = CASES[case]
    x = torch.randn(*shape)

    def procedure() -> nn.Module:
        if meta:
            with torch.device("meta"):
                skeleton = make()
        else:
            skeleton = make()
        model = ternq.load_packed(path, skeleton)
        with torch.inference_mode():
            model(x)
        return model

    return _measured(procedure)


def child_fp32(case: int) -> dict[str, Any]:
    """Build the fp32 model, run one forward."""
    torch.set_num_threads(1)
    _, make, shape = CASES[case]
    x = torch.randn(*shape)

    def procedure() -> nn.Module:
        model = make()
        with torch.inference_mode():
            model(x)
        return model

    return _measured(procedure)


def run_child(*args: str) -> dict[str, Any] | str:
    # fixed mmap threshold: freed tensors go back to the OS at once, so RSS follows live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------------------------


def speed_table(threads: int, rounds: int, names: list[str], ratios: dict[tuple[str, int], float] | None = None
                ) -> list[str]:
    """The speed table at `threads` threads; `ratios` collects ternq's ratio per (row, threads)."""
    torch.set_num_threads(threads)
    head = "| model | input | fp32 ms | " + " | ".join(n for n in names if n != "fp32") + " | ternq kernels |"
    lines = [f"**{threads} thread{'s' if threads > 1 else ''}** (native kernels: {native.num_threads()}) — "
             f"{machine_line()}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for label, make, shape in CASES:
        models: dict[str, nn.Module] = {}
        for name in names:
            model = VARIANTS[name](make())
            if model is not None:
                models[name] = model
        x = torch.randn(*shape)
        best = time_variants(models, x, rounds)
        kernels = sorted({m.kernel for m in models["ternq"].modules() if hasattr(m, "kernel")})
        cells = [f"{best['fp32'] / best[n]:.2f}x" if n in best else "n/a" for n in names if n != "fp32"]
        if ratios is not None and "ternq" in best:
            ratios[(f"{label} {'x'.join(map(str, shape))}", threads)] = best["fp32"] / best["ternq"]
        lines.append(f"| {label} | {'x'.join(map(str, shape))} | {best['fp32'] * 1e3:.2f} | "
                     + " | ".join(cells) + f" | {', '.join(kernels)} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def threads_table(ratios: dict[tuple[str, int], float], threads_list: list[int]) -> list[str]:
    """ternq's speed ratio to fp32 at each thread count against its 1-thread ratio (issue 18's goal: at N threads
    at least the 1-thread ratio, on every row)."""
    rows = list(dict.fromkeys(label for label, _ in ratios))
    more = [t for t in threads_list if t > 1]
    lines = ["ternq's ratio to fp32 at N threads / its ratio at 1 thread (>= 1.00 meets the goal):", "",
             "| row | 1 thread | " + " | ".join(f"{t} threads" for t in more) + " |",
             "|" + "---|" * (2 + len(more))]
    for row in rows:
        one = ratios.get((row, 1))
        cells = [f"{ratios[(row, t)] / one:.2f}" if one and (row, t) in ratios else "n/a" for t in more]
        lines.append(f"| {row} | {one:.2f}x | " + " | ".join(cells) + " |" if one else f"| {row} | n/a |")
    return lines


def memory_table(names: list[str]) -> list[str]:
    head = "| model | variant | weights MB | weights / fp32 | resident RSS MB | peak RSS MB |"
    lines = [head, "|---|---|---|---|---|---|"]
    for case in MEMORY_CASES:
        label, make, shape = CASES[case]
        fp32_bytes = weight_bytes(make())
        for name in names:
            model = VARIANTS[name](make())
            if model is None:
                continue
            nbytes = weight_bytes(model)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.pt")
                try:
                    torch.save(model, path)
                except Exception as e:  # noqa: BLE001 - e.g. torchao's tensor subclasses do not pickle
                    child = f"n/a (torch.save: {type(e).__name__})"
                else:
                    child = run_child("peak", str(case), path)
            if isinstance(child, str):
                rss = peak = child
            else:
                rss = f"{child['resident_kib'] / 1024:.1f}"
                peak = f"{child['peak_kib'] / 1024:.1f}" + ("" if child["peak_reset"] else " (incl. build)")
            lines.append(f"| {label} {'x'.join(map(str, shape))} | {name} | {nbytes / 2**20:.2f} | "
                         f"{nbytes / fp32_bytes:.4f} | {rss} | {peak} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def load_table() -> list[str]:
    """Peak RSS of skeleton + load_packed + one forward vs the fp32 model's own build + forward."""
    try:
        import ternq

        ternq.save_packed, ternq.load_packed  # noqa: B018
    except AttributeError:
        return ["`ternq.save_packed` / `ternq.load_packed` are not available in this checkout: load peak not "
                "measured."]
    lines = ["| model | fp32: build + forward | skeleton + load_packed + forward | meta skeleton + load_packed + "
             "forward |",
             "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for case in MEMORY_CASES:
            label, make, shape = CASES[case]
            path = os.path.join(tmp, f"case{case}.safetensors")
            try:
                ternq.save_packed(to_qat(make()), path)
            except Exception as e:  # noqa: BLE001 - reported in the table
                lines.append(f"| {label} | save_packed failed: {type(e).__name__}: {e} | | |")
                continue
            cells = []
            for child in (run_child("fp32", str(case)), run_child("load", str(case), path, "0"),
                          run_child("load", str(case), path, "1")):
                cells.append(child if isinstance(child, str) else f"{child['peak_kib'] / 1024:.1f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory subprocesses")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="re-run with oneDNN, ATen and MKL limited to AVX2 (an older CPU without VNNI/AMX)")
    parser.add_argument("--load-only", action="store_true", help="only the load_packed peak table")
    parser.add_argument("--one-thread", action="store_true", help="only the 1-thread speed table")
    parser.add_argument("--threads", default="1,all",
                        help="thread counts of the speed tables, comma-separated ('all': torch's default, "
                             f"{ALL_THREADS} here)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "peak":
            result = child_peak(int(rest[0]), rest[1])  # torchao / torch.ao classes unpickle on import
        elif kind == "load":
            result = child_load(int(rest[0]), rest[1], rest[2] == "1")
        else:
            result = child_fp32(int(rest[0]))
        print(json.dumps(result))
        return
    if args.emulate_avx2 and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                   TERNQ_NATIVE_ARCH="haswell")
        argv = [a for a in sys.argv[1:] if a != "--emulate-avx2"]
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv, "--emulate-avx2"], env)
    if args.load_only:
        torch.set_num_threads(1)
        print("\n".join([machine_line(), "", *load_table()]))
        return
    rounds = 3 if args.quick else args.rounds
    names = available_variants()
    out = [f"# bench_runtime — {time.strftime('%Y-%m-%d %H:%M')}", "",
           "Speed: fp32 time / variant time (higher is faster), best of "
           f"{rounds} interleaved rounds (1 thread: thread CPU time; more threads: wall time). "
           f"torchao: {torchao_status()}. {ort_status()}. ternq native kernels: {native.status()} "
           f"(TERNQ_NATIVE_ARCH={os.environ.get('TERNQ_NATIVE_ARCH', 'native')}).", ""]
    threads_list = [1] if args.one_thread else sorted({1, *(ALL_THREADS if t == "all" else int(t)
                                                           for t in args.threads.split(","))})
    ratios: dict[tuple[str, int], float] = {}
    for threads in threads_list:
        out += speed_table(threads, rounds, names, ratios) + [""]
    if len(threads_list) > 1:
        out += threads_table(ratios, threads_list) + [""]
    if not args.quick and not args.emulate_avx2:
        torch.set_num_threads(1)
        out += ["Memory, 1 thread. weights: bytes of every tensor the model keeps. RSS: a fresh subprocess per "
                "variant loads the saved model (torch.load) and runs 3 forwards, twice; growth of the second run "
                "over the first (libraries, JIT kernels and workspaces excluded): resident after it, peak during "
                "it.", ""] + memory_table(names) + [""]
        out += ["Loading a packed file into a float skeleton: peak RSS growth (MB) of build + load + one forward, "
                "measured like the memory table:", ""]
        out += load_table() + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
