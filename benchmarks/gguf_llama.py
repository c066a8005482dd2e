"""A random ternary Llama as both a ternq packed file and GGUF files (TQ2_0, TQ1_0) for llama.cpp, with sizes.

The same weights in both formats, for comparing llama.cpp's TQ kernels with ternq's packed runtime (decode speed
is measured elsewhere: this script only writes the files and prints their sizes).

    python benchmarks/gguf_llama.py --hidden 2048 --intermediate 5632 --layers 4 --out /tmp/llama-2048
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ternq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="directory for model.safetensors and model-TQ*.gguf")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    # llama.cpp has no per-layer input norm: quantize without one; lm_head stays float (as BitNet b1.58 keeps it)
    model = ternq.quantize(model, exclude=["lm_head"], config=ternq.TernaryConfig(input_norm=None))
    args.out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(args.out)  # the skeleton for ternq.load_packed
    ternq.save_packed(model, args.out / "model.safetensors", float_dtype=torch.float16)
    sizes = {"ternq packed (F16 floats)": args.out / "model.safetensors"}
    for qtype in ("TQ2_0", "TQ1_0"):
        start = time.perf_counter()
        ternq.export_gguf(model, args.out / f"model-{qtype}.gguf", type=qtype, float_type="F16")
        print(f"export {qtype}: {time.perf_counter() - start:.1f} s")
        sizes[f"GGUF {qtype} (F16 floats)"] = args.out / f"model-{qtype}.gguf"
    for what, path in sizes.items():
        print(f"{what:28s} {os.path.getsize(path) / 2**20:9.2f} MiB  {path}")


if __name__ == "__main__":
    main()
