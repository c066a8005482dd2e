"""`bittts demo [--model MODEL.safetensors] [--text TEXT] [-o demo.wav]` (what `make demo` runs)

Speaks one sentence with the shipped 1.58-bit model (or `--model`), writes the wav and prints what a newcomer
wants to know: the model file's size (and how much smaller it is than the shipped fp32 model), the real-time
factor on one CPU thread with the instruction set it ran on, the shipped fp32 model's real-time factor on the
same sentence, and what pocketsphinx hears in the audio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import wav_output

DEMO_TEXT = "The quick brown fox jumps over the lazy dog."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL.safetensors",
                        help="exported model; default: the shipped pretrained/bittts-ternary.safetensors")
    parser.add_argument("--text", default=DEMO_TEXT, help=f"the sentence (default: {DEMO_TEXT!r})")
    parser.add_argument("-o", "--out", default="demo.wav", metavar="OUT.wav", help="wav to write (default demo.wav)")
    parser.add_argument("--no-asr", action="store_true", help="skip the pocketsphinx transcript")


def run(args: argparse.Namespace) -> int:
    from ..data.audio import write_wav
    from ..evaluation.evaluate import check_sentence, fastest_pass
    from ..machine import cpu_description
    from ..synthesis.synthesizer import FP32_MODEL, Synthesizer, shipped_model

    check_sentence(args.text, "--text")
    wav_output(args.out)
    synth = Synthesizer(args.model)
    size = synth.path.stat().st_size
    line = f"model {synth.path.name}: {size / 1e6:.2f} MB ({synth.cfg.quant.scheme}/{synth.cfg.quant.scope})"
    fp32 = shipped_model(FP32_MODEL)
    if fp32.is_file() and fp32.resolve() != synth.path.resolve():
        base = fp32.stat().st_size
        line += f", {1 - size / base:.1%} smaller than the fp32 model ({base / 1e6:.2f} MB)"
    print(line)

    _, ids = synth.text_to_ids(args.text)
    (result,) = fastest_pass(synth, [ids], threads=1)
    write_wav(Path(args.out), result.wav, result.sample_rate)
    print(f"wrote {args.out}: {args.text!r}, {result.duration:.2f} s of audio in {result.seconds:.3f} s on 1 thread "
          f"= real-time factor {result.rtf:.3f} ({1 / max(result.rtf, 1e-9):.0f}x faster than real time; "
          f"{cpu_description()})")
    if fp32.is_file() and fp32.resolve() != synth.path.resolve():  # the same sentence through the fp32 model
        (base_run,) = fastest_pass(Synthesizer(fp32), [ids], threads=1)
        print(f"fp32 model {fp32.name}: real-time factor {base_run.rtf:.3f} on the same sentence and thread; "
              f"{synth.path.name} is {base_run.seconds / max(result.seconds, 1e-9):.2f}x as fast")
    if not args.no_asr:
        try:
            from ..evaluation.metrics import transcribe, wer
        except ImportError:  # pragma: no cover - the eval extra is missing
            print("pocketsphinx is not installed (pip install 'bittts[eval]'): no transcript")
            return 0
        heard = transcribe(result.wav, result.sample_rate)
        print(f"pocketsphinx hears: {heard!r} (WER {wer(args.text, heard):.0%})")
    return 0

