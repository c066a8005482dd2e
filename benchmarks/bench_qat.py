"""Ternary QAT against its peers: the same tasks, seed, data order, optimizer and steps, one thread per run.

    python benchmarks/bench_qat.py                      # the whole suite (about an hour on one core)
    python benchmarks/bench_qat.py --tasks gpt --peers fp32,ternq,hf-bitnet
    python benchmarks/bench_qat.py --small              # tiny sizes, 20 steps: the smoke test's run

Tasks:
  gpt     a character-level GPT (4 layers, 4 heads, d=128, context 128, 0.83 M parameters), 1,500 AdamW steps on
          BitTTS' deterministic English sentence generator (bittts.data.sentences: 1 MB of text written by the
          project, no download); validation loss (nats per character) on held-out sentences
  cnn     a small CNN on scikit-learn's digits (8x8 images, 1,437 train / 360 validation), 3 seeds; accuracy
  bittts  BitTTS' `tiny` preset on a synthetic corpus (examples/bittts/tests/bittts_synthetic.py, or a prepared
          corpus with --bittts-data); mel L1 loss averaged over the last 20 steps

Peers: fp32; ternq (default), ternq input_norm=None, ternq 4-bit; transformers' BitNet (`AutoBitLinear`,
online quantization: Linear only); Brevitas (2-bit narrow-range = ternary per-tensor weights, 8-bit per-tensor
activations; Linear and Conv2d); a 20-line BitLinear after "The Era of 1-bit LLMs: Training Tips" (RMSNorm,
absmean ternary weights, 8-bit absmax per-token activations; Linear only). A peer whose package is missing, or
that does not apply to a task, is skipped with a line.

Each run is its own subprocess (one torch thread), so that its peak RSS is its own: the table shows the peak
RSS of the process and its growth during training (peak minus the RSS before the first step). Step time is the
median over the run's steps after the first 10 (which include torch.compile's warm-up where a peer uses it),
and its ratio to fp32 on the same task in the same invocation. Timings on a loaded machine are noise: rerun
in a quiet window. docs/benchmarks.md has the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

TASKS = ("gpt", "cnn", "bittts")
PEERS = ("fp32", "ternq", "ternq-layernorm", "ternq-nonorm", "ternq-4bit", "hf-bitnet", "brevitas", "bitlinear20")
RULES = {
    "fp32": "float",
    "ternq": "default: ternary absmean, 8-bit absmax per token, input LayerNorm unless the input comes straight "
             "from a norm layer",
    "ternq-nonorm": "input_norm=None everywhere",
    "ternq-layernorm": "input LayerNorm everywhere (the default before issue 19)",
    "ternq-4bit": "KBitConfig(bits=4)",
    "hf-bitnet": "AutoBitLinear(online_quant=True), Linear only",
    "brevitas": "ternary per-tensor weights, 8-bit per-tensor activations",
    "bitlinear20": "RMSNorm + absmean ternary + 8-bit per token, Linear only",
}


# --- tasks -----------------------------------------------------------------------------------------------------


def gpt_model(vocab: int, d: int = 128, layers: int = 4, heads: int = 4, ctx: int = 128):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        """Pre-norm transformer block, as nanoGPT's."""

        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.Sequential(*[Block() for _ in range(layers)])
            self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            return self.head(self.ln(self.blocks(x)))

    return GPT()


def cnn_model(width: int = 16):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * width, 64), nn.ReLU(), nn.Linear(64, 10))


def _text() -> str:
    try:
        from bittts.data.sentences import generate_sentences
    except ImportError as e:
        raise Skip(f"the char-GPT's text comes from bittts, which is not installed ({e})") from None

    return "\n".join(generate_sentences(20_000, seed=0))


class Run:
    """One task's model, data and loss, built the same way for every peer."""

    def __init__(self, task: str, small: bool, seed: int, bittts_data: str | None) -> None:
        import torch

        self.task, self.small, self.seed = task, small, seed
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)  # the data order: the same for every peer
        if task == "gpt":
            text = _text()[: 20_000 if small else None]
            chars = sorted(set(text))
            data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
            cut = int(0.9 * len(data))
            self.train_data, self.val_data = data[:cut], data[cut:]
            self.ctx, self.batch = (32, 4) if small else (128, 16)
            self.model = gpt_model(len(chars), d=32 if small else 128, layers=1 if small else 4,
                                   ctx=self.ctx)
            self.lr = 2e-3
        elif task == "cnn":
            try:
                from sklearn.datasets import load_digits
            except ImportError as e:
                raise Skip(f"scikit-learn is not installed ({e}): it holds the digits") from None

            x, y = load_digits(return_X_y=True)
            x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
            y = torch.tensor(y, dtype=torch.long)
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one split for all seeds
            x, y = x[perm], y[perm]
            self.x_train, self.y_train, self.x_val, self.y_val = x[360:], y[360:], x[:360], y[:360]
            self.batch = 64
            self.model = cnn_model(4 if small else 16)
            self.lr = 3e-3
        else:
            self.model = None  # BitTTS trains through its own loop (`bittts_loss`)
        self.bittts_data = bittts_data

    def loss(self, model) -> torch.Tensor:  # noqa: F821
        import torch
        import torch.nn.functional as F

        if self.task == "gpt":
            i = torch.randint(0, len(self.train_data) - self.ctx - 1, (self.batch,), generator=self.gen)
            seq = torch.stack([self.train_data[j: j + self.ctx + 1] for j in i.tolist()])
            return F.cross_entropy(model(seq[:, :-1]).flatten(0, 1), seq[:, 1:].flatten())
        i = torch.randint(0, len(self.x_train), (self.batch,), generator=self.gen)
        return F.cross_entropy(model(self.x_train[i]), self.y_train[i])

    def evaluate(self, model) -> float:
        import torch
        import torch.nn.functional as F

        model.eval()
        with torch.no_grad():
            if self.task == "gpt":
                n = (len(self.val_data) - 1) // self.ctx
                n = min(n, 8 if self.small else 64)
                seq = self.val_data[: n * self.ctx + 1]
                x = seq[:-1].reshape(n, self.ctx)
                y = seq[1:].reshape(n, self.ctx)
                out = sum(F.cross_entropy(model(x[k: k + 8]).flatten(0, 1), y[k: k + 8].flatten(),
                                          reduction="sum").item() for k in range(0, n, 8))
                return out / y.numel()
            return (model(self.x_val).argmax(-1) == self.y_val).float().mean().item() * 100


# --- peers -----------------------------------------------------------------------------------------------------


class Skip(Exception):
    """The peer does not run here: its package is missing, or it does not apply to the task."""


def _replace(model, make: Callable, types: tuple[type, ...]):
    """Replace every module of `types` by `make(module)` (weights copied), in place."""
    for name, child in list(model.named_children()):
        if type(child) in types:
            new = make(child)
            new.load_state_dict(child.state_dict(), strict=False)
            setattr(model, name, new)
        else:
            _replace(child, make, types)
    return model


def bitlinear20():
    """BitLinear as "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (Microsoft, 2024) gives it."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def activation_quant(x: torch.Tensor) -> torch.Tensor:
        scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
        return (x * scale).round().clamp_(-128, 127) / scale

    def weight_quant(w: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
        return (w * scale).round().clamp_(-1, 1) / scale

    class BitLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm without weight
            x_quant = x_norm + (activation_quant(x_norm) - x_norm).detach()
            w_quant = self.weight + (weight_quant(self.weight) - self.weight).detach()
            return F.linear(x_quant, w_quant, self.bias)

    return BitLinear


def convert(model, peer: str, task: str):
    """`model` as `peer` trains it (the same weights)."""
    from torch import nn

    import ternq

    if peer == "fp32":
        return model
    if peer.startswith("ternq"):
        config = {"ternq": None, "ternq-nonorm": ternq.TernaryConfig(input_norm=None),
                  "ternq-layernorm": ternq.TernaryConfig(input_norm="layernorm"),
                  "ternq-4bit": ternq.KBitConfig(bits=4)}[peer]
        model = ternq.quantize(model, config=config)
        if peer == "ternq-layernorm":  # the default before issue 19: an input norm also right after a norm layer
            for m in model.modules():  # (not on a 1-feature input, which it normalizes to zeros: the rule then too)
                features = getattr(m, "in_features", getattr(m, "in_channels", None))
                if ternq.is_quantized(m) and m.qconfig.act_bits is not None and features != 1:
                    m.qconfig = dataclasses.replace(m.qconfig, input_norm="layernorm")
        return model
    if peer == "hf-bitnet":
        try:
            from transformers.integrations.bitnet import AutoBitLinear
        except ImportError as e:
            raise Skip(f"transformers' BitNet is not installed ({e})") from None
        return _replace(model, lambda m: AutoBitLinear(m.in_features, m.out_features, m.bias is not None,
                                                       online_quant=True), (nn.Linear,))
    if peer == "brevitas":
        try:
            import brevitas.nn as qnn
            from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
        except ImportError as e:
            raise Skip(f"Brevitas is not installed ({e})") from None
        kw = dict(weight_quant=Int8WeightPerTensorFloat, weight_bit_width=2, input_quant=Int8ActPerTensorFloat)

        def make(m):
            if isinstance(m, nn.Linear):
                return qnn.QuantLinear(m.in_features, m.out_features, m.bias is not None, **kw)
            return qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                   bias=m.bias is not None, **kw)

        return _replace(model, make, (nn.Linear, nn.Conv2d))
    if peer == "bitlinear20":
        cls = bitlinear20()
        return _replace(model, lambda m: cls(m.in_features, m.out_features, m.bias is not None), (nn.Linear,))
    raise ValueError(f"unknown peer {peer!r}: expected one of {', '.join(PEERS)}")


# --- one run (a subprocess) ------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(task: str, peer: str, steps: int, seed: int, small: bool, bittts_data: str | None) -> dict:
    """Train `peer` on `task`; returns the figure, the median step time and the memory."""
    import torch

    torch.set_num_threads(1)
    if task == "bittts":
        return _run_bittts(peer, steps, seed, small, bittts_data)
    run = Run(task, small, seed, bittts_data)
    model = convert(run.model, peer, task)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.1 if task == "gpt" else 0.01)
    warm = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warm)) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    before = _rss_mb()
    times = []
    model.train()
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = run.loss(model)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
    if not math.isfinite(loss.item()):
        return {"value": float("nan"), "ms": float("nan"), "peak": _peak_mb(), "grow": _peak_mb() - before}
    value = run.evaluate(model)
    timed = times[10:] if len(times) > 20 else times
    return {"value": value, "ms": statistics.median(timed) * 1e3, "peak": _peak_mb(), "grow": _peak_mb() - before}


def _run_bittts(peer: str, steps: int, seed: int, small: bool, data_dir: str | None) -> dict:

    try:
        from bittts.config import load_preset
        from bittts.training.loop import train
    except ImportError as e:
        raise Skip(f"bittts is not installed ({e})") from None
    import ternq

    configs = {"fp32": None, "ternq": ternq.TernaryConfig(), "ternq-nonorm": ternq.TernaryConfig(input_norm=None),
               "ternq-layernorm": ternq.TernaryConfig(input_norm="layernorm"),
               "ternq-4bit": ternq.KBitConfig(bits=4)}
    if peer not in configs:
        raise Skip("BitTTS builds its QAT with ternq's configs; the other peers are not wired into its model")
    cfg = load_preset("tiny")
    cfg.quant.config = configs[peer]
    cfg.train.seed += seed  # `train` seeds itself from its config: seed 0 is the preset's own run
    cfg.train.log_every, cfg.train.image_every, cfg.train.ckpt_every = 1, 0, 0
    dataset = None
    if data_dir is None:
        sys.path.insert(0, str(ROOT / "examples" / "bittts" / "tests"))
        from bittts_synthetic import N_SYMBOLS, SyntheticTTS

        cfg.acoustic.n_symbols = N_SYMBOLS
        dataset = SyntheticTTS(4 if small else 16, seed=seed)
    import tempfile

    before = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train(cfg, out, data_dir=data_dir, dataset=dataset, steps=steps, progress=False,
                       device="cpu", log=lambda msg: None)
        elapsed = time.perf_counter() - start
    mel = [h["mel"] for h in result["history"]][-20:]
    return {"value": sum(mel) / len(mel), "ms": elapsed / steps * 1e3, "peak": _peak_mb(),
            "grow": _peak_mb() - before}


# --- the suite -------------------------------------------------------------------------------------------------


def _child(task: str, peer: str, args: argparse.Namespace, seed: int) -> dict | str:
    cmd = [sys.executable, __file__, "--child", task, peer, "--seed", str(seed), "--steps", str(args.steps_of[task])]
    if args.small:
        cmd.append("--small")
    if args.bittts_data:
        cmd += ["--bittts-data", args.bittts_data]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(RULES)}")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: gpt 1500, cnn 600, bittts 200)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per run (default: cnn 3, others 1)")
    ap.add_argument("--small", action="store_true", help="tiny models and data (the smoke test)")
    ap.add_argument("--bittts-data", default=None, help="a prepared BitTTS corpus (default: a synthetic one)")
    ap.add_argument("--child", nargs=2, metavar=("TASK", "PEER"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        task, peer = args.child
        try:
            result: dict | str = run_one(task, peer, args.steps, args.seed, args.small, args.bittts_data)
        except Skip as e:
            result = f"skipped: {e}"
        print(json.dumps(result))
        return
    tasks, peers = args.tasks.split(","), args.peers.split(",")
    for name in tasks + peers:
        if name not in TASKS and name not in RULES:
            ap.error(f"unknown task or peer {name!r}")
    default_steps = {"gpt": 1500, "cnn": 600, "bittts": 200}
    args.steps_of = {t: args.steps or default_steps[t] for t in TASKS}
    from _machine import machine_line

    print(machine_line())
    print("one torch thread per run; each run is a subprocess")
    metric = {"gpt": "val loss", "cnn": "val accuracy %", "bittts": "mel L1 (last 20 steps)"}
    for task in tasks:
        n_seeds = args.seeds or (3 if task == "cnn" else 1)
        print(f"\n### {task}: {args.steps_of[task]} steps, {n_seeds} seed(s)\n")
        print(f"| peer | rule | {metric[task]} | ms/step | vs fp32 | peak RSS MB | RSS growth in training MB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        fp32_ms = None
        for peer in peers:
            results = [_child(task, peer, args, seed) for seed in range(n_seeds)]
            bad = next((r for r in results if isinstance(r, str)), None)
            if bad is not None:
                print(f"| {peer} | {RULES[peer]} | {bad} | | | | |")
                continue
            value = statistics.mean(r["value"] for r in results)  # type: ignore[index]
            ms = statistics.mean(r["ms"] for r in results)  # type: ignore[index]
            if peer == "fp32":
                fp32_ms = ms
            ratio = f"{ms / fp32_ms:.2f}x" if fp32_ms else "n/a"
            digits = 2 if task == "cnn" else 4
            spread = (f" ± {statistics.stdev(r['value'] for r in results):.{digits}f}"  # type: ignore[index]
                      if n_seeds > 1 else "")
            fmt = f"{value:.{digits}f}{spread}"
            peak = max(r["peak"] for r in results)  # type: ignore[index]
            grow = max(r["grow"] for r in results)  # type: ignore[index]
            print(f"| {peer} | {RULES[peer]} | {fmt} | {ms:.1f} | {ratio} | {peak:.0f} | {grow:.0f} |", flush=True)


if __name__ == "__main__":
    main()
