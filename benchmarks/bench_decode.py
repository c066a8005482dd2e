"""Greedy decode of a Llama: ternq's packed runtime against fp32 torch, torch dynamic int8 and llama.cpp TQ2_0 / TQ1_0.

One run prints, at 1 thread and at all threads: decode tokens/s (greedy, `--new` tokens after a `--prompt`-token
prompt, KV cache), prompt processing tokens/s (the prompt in one call), and the resident bits per weight of the
quantized matrices, for:

* ``fp32``: the float model (transformers ``LlamaForCausalLM``, random init from a ``LlamaConfig``);
* ``ternq <storage>``: the same model quantized by ``ternq.quantize`` (ternary, ``input_norm=None``: a config
  llama.cpp can represent; lm_head kept float, as BitNet b1.58 and the GGUF exporter keep it), packed, and loaded
  by ``ternq.load_packed(storage=...)``: ``int8`` (1 byte per weight), ``packed`` (2-bit rows, the decode GEMV
  reads them as stored) and ``auto`` (the default: ``ternq.runtime.picker.choose_storage``); the ternq rows
  must produce the same tokens (their integer kernels agree bit for bit), the table says so;
* ``torch dyn int8``: ``torch.ao.quantization.quantize_dynamic`` of the fp32 model's Linear layers;
* ``llama.cpp TQ2_0`` / ``TQ1_0``: the same ternary weights written by ``ternq.export_gguf`` and run by
  ``llama-cpp-python`` (its bundled llama.cpp CPU backend). Rows say "skipped (reason)" where the package or
  the exporter is missing.

The default model is the one of issue 18: hidden 2048, intermediate 5632, 4 layers, 16 heads (MHA), vocabulary
512 (~206 M parameters, almost all in the quantized matrices). Each figure is the best of `--rounds` runs. The
CPU's flags, the native build and the thread count are printed beside every figure: int8 / 2-bit kernel speed
depends on them. OpenMP settings are left as a user has them (``OMP_WAIT_POLICY`` is printed when set).

    python benchmarks/bench_decode.py                      # the table (several minutes)
    python benchmarks/bench_decode.py --quick              # smoke run: a small model, 8 tokens
    python benchmarks/bench_decode.py --threads 1          # one thread only
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

import ternq  # noqa: E402
from ternq import native  # noqa: E402
from ternq.runtime import is_packed, resident_bytes  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

TERNQ_STORAGES = ("int8", "packed", "auto")


# --- models ----------------------------------------------------------------------------------------------------


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, max_position_embeddings=max(256, 2 * (args.prompt +
                                                                                                args.new)))


def build(config: Any, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def quantized(model: nn.Module) -> nn.Module:
    """`model` quantized in place as llama.cpp can represent it (no input norm; lm_head float)."""
    return ternq.quantize(model, exclude=["lm_head"], config=ternq.TernaryConfig(input_norm=None))


# --- measuring -------------------------------------------------------------------------------------------------


@torch.inference_mode()
def torch_decode(model: nn.Module, prompt: torch.Tensor, new: int, rounds: int) -> dict[str, Any]:
    """Best-of-`rounds` prompt processing and greedy decode speeds (tokens/s) of a transformers causal LM."""
    import inspect

    from transformers import DynamicCache

    # transformers 5.x names the cache argument `cache` (`past_key_values` before, deprecated since)
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    best_pp = best_dec = 0.0
    tokens: list[int] = []
    for _ in range(rounds):
        cache = DynamicCache()
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **{key: cache})
        best_pp = max(best_pp, prompt.shape[1] / (time.perf_counter() - start))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(tok)]
        start = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
        best_dec = max(best_dec, new / (time.perf_counter() - start))
    return {"decode": best_dec, "prompt": best_pp, "tokens": tokens}


def quantized_bits(model: nn.Module) -> float:
    """Resident bits per weight of the quantized matrices (codes + scales; a packed layer's float bias excluded)."""
    total_bytes = total_weights = 0
    for m in model.modules():
        if is_packed(m):
            bias = getattr(m, "bias", None)
            total_bytes += resident_bytes(m) - (bias.numel() * bias.element_size() if bias is not None else 0)
            total_weights += m.weight.numel()
        elif type(m).__name__ == "Linear" and "quantized" in type(m).__module__:  # torch dynamic int8
            w = m.weight()
            total_bytes += w.numel() * w.element_size() + 8
            total_weights += w.numel()
    return 8 * total_bytes / max(total_weights, 1)


def fp32_bits(model: nn.Module) -> float:
    return 32.0


def llama_cpp_status() -> str | None:
    """None when llama.cpp rows can run, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp not importable ({exc}); install the bench extra: pip install -e '.[bench]'"
    if not hasattr(ternq, "export_gguf"):
        return "this ternq has no export_gguf"
    return None


def gguf_bits(path: Path) -> float:
    """Bits per weight of the TQ1_0 / TQ2_0 tensors in a GGUF file (their blocks: codes and fp16 scales)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    nbytes = weights = 0
    for t in reader.tensors:
        if t.tensor_type.name in ("TQ1_0", "TQ2_0"):
            nbytes += int(t.n_bytes)
            weights += int(t.n_elements)
    return 8 * nbytes / max(weights, 1)


def llama_cpp_decode(path: Path, prompt: list[int], new: int, threads: int, rounds: int) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new + 8, n_batch=len(prompt), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    best_pp = best_dec = 0.0
    try:
        for _ in range(rounds):
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            best_pp = max(best_pp, len(prompt) / (time.perf_counter() - start))
            llm.reset()
            stream = llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
            next(stream)  # the prompt, and the first token (as torch_decode: decode timing starts after it)
            start = time.perf_counter()
            for _ in range(new):
                next(stream)
            best_dec = max(best_dec, new / (time.perf_counter() - start))
    finally:
        llm.close()
    return {"decode": best_dec, "prompt": best_pp, "tokens": None}


# --- the table -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    config = llama_config(args)
    torch.manual_seed(1)
    prompt = torch.randint(3, args.vocab, (1, args.prompt))
    threads_list = [int(t) if t != "all" else (os.cpu_count() or 1) for t in args.threads.split(",")]
    rows: list[tuple[str, int, dict[str, Any] | str, float | None]] = []

    def measure(name: str, make: Callable[[], nn.Module], bits: Callable[[nn.Module], float]) -> None:
        model = make()
        b = bits(model)
        for threads in threads_list:
            torch.set_num_threads(threads)
            result = torch_decode(model, prompt, args.new, args.rounds)
            rows.append((name, threads, result, b))
            report(rows[-1])
        del model
        gc.collect()

    print(machine_line())
    print(f"ternq native: {native.status()} | 2-bit loop: {native.packed_isa()}")
    fp32 = build(config)  # measured first, then quantized in place (one random init of 206 M weights, not two)
    n_params = sum(p.numel() for p in fp32.parameters())
    print(f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads ({args.kv_heads} KV), vocab {args.vocab}: {n_params / 1e6:.1f} M parameters; "
          f"prompt {args.prompt} tokens, greedy decode {args.new} tokens, best of {args.rounds}")
    print(f"{'variant':22s} {'threads':>7s} {'decode tok/s':>13s} {'prompt tok/s':>13s} {'bits/weight':>12s}")

    if "fp32" in args.variants:
        measure("fp32", lambda: fp32, fp32_bits)
    if "dyn-int8" in args.variants:  # a quantized copy (quantize_dynamic is not in place by default)
        measure("torch dyn int8", lambda: torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear},
                                                                                 dtype=torch.qint8), quantized_bits)
    qat = quantized(fp32)
    packed = ternq.pack(qat)
    for storage in TERNQ_STORAGES:
        if f"ternq-{storage}" in args.variants:
            measure(f"ternq {storage}", lambda s=storage: ternq.load_packed(packed, build(config), storage=s),
                    quantized_bits)
    why = llama_cpp_status()
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("TQ2_0", "TQ1_0"):
            name = f"llama.cpp {qtype}"
            if f"llama-{qtype.lower()}" not in args.variants:
                continue
            if why is None:
                path = Path(tmp) / f"model-{qtype}.gguf"
                try:
                    ternq.export_gguf(qat, path, type=qtype, float_type="F32")  # type: ignore[attr-defined]
                    bits = gguf_bits(path)
                except Exception as exc:  # noqa: BLE001 - a row that says why, never a crashed table
                    for threads in threads_list:
                        rows.append((name, threads, f"skipped (export failed: {type(exc).__name__}: {exc})", None))
                        report(rows[-1])
                    continue
            for threads in threads_list:
                if why is not None:
                    rows.append((name, threads, f"skipped ({why})", None))
                else:
                    try:
                        rows.append((name, threads, llama_cpp_decode(path, prompt[0].tolist(), args.new, threads,
                                                                     args.rounds), bits))
                    except Exception as exc:  # noqa: BLE001
                        rows.append((name, threads, f"skipped ({type(exc).__name__}: {exc})", None))
                report(rows[-1])
    summary(rows)


def report(row: tuple[str, int, dict[str, Any] | str, float | None]) -> None:
    name, threads, result, bits = row
    if isinstance(result, str):
        print(f"{name:22s} {threads:7d} {result}")
        return
    print(f"{name:22s} {threads:7d} {result['decode']:13.1f} {result['prompt']:13.1f} {bits:12.2f}", flush=True)


def summary(rows: list[tuple[str, int, dict[str, Any] | str, float | None]]) -> None:
    """Ratios within one thread count, and whether the ternq rows decoded the same tokens."""
    print(f"\nratios (same run, same thread count) | {machine_line()}")
    for threads in sorted({r[1] for r in rows}):
        got = {r[0]: r[2] for r in rows if r[1] == threads and isinstance(r[2], dict)}
        for base in ("fp32", "llama.cpp TQ2_0"):
            if base not in got:
                continue
            for name, result in got.items():
                if name != base:
                    print(f"  {threads} thread(s): {name} / {base}: decode {result['decode'] / got[base]['decode']:.2f}x"
                          f", prompt {result['prompt'] / got[base]['prompt']:.2f}x")
        ternq_tokens = {name: r["tokens"] for name, r in got.items() if name.startswith("ternq")}
        if len(ternq_tokens) > 1:
            same = len({tuple(t) for t in ternq_tokens.values()}) == 1
            print(f"  {threads} thread(s): ternq storages decode the same tokens: {'yes' if same else 'NO'}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The Llama's shape and the decode's length (also `profile_decode.py`'s: the same model)."""
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens (processed in one call)")
    p.add_argument("--new", type=int, default=64, help="tokens decoded greedily")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", default="1,all", help="comma-separated thread counts ('all': every core)")
    variants = ["fp32", "dyn-int8", *(f"ternq-{s}" for s in TERNQ_STORAGES), "llama-tq2_0", "llama-tq1_0"]
    p.add_argument("--variants", default=",".join(variants), help=f"comma-separated subset of {variants}")
    p.add_argument("--quick", action="store_true", help="smoke run: hidden 256, 2 layers, 8 tokens, 1 round")
    args = p.parse_args()
    args.variants = set(args.variants.split(","))
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 256, 512, 2, 4, 4
        args.prompt, args.new, args.rounds = 16, 8, 1
    run(args)


if __name__ == "__main__":
    main()
