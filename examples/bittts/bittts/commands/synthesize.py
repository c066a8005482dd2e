"""`bittts synthesize [--model MODEL.safetensors] (--text TEXT | --text-file FILE) -o OUT`

`--text` writes one wav to OUT; `--text-file` speaks every non-empty line and writes OUT/0001.wav, ... Prints
each utterance's duration and real-time factor (model time / audio duration; espeak-ng phonemization excluded).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import INPUT_ERRORS as USER_ERRORS  # noqa: F401 - bittts.cli reports these as one line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL.safetensors",
                        help="exported model (bittts export); default: the shipped 1.58-bit model "
                             "(examples/bittts/pretrained/bittts-ternary.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the sentence to speak")
    source.add_argument("--text-file", metavar="FILE", help="speak every non-empty line of FILE, one wav each")
    parser.add_argument("-o", "--out", required=True, metavar="OUT.wav|OUT_DIR",
                        help="wav file (--text) or directory (--text-file)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--duration-scale", type=float, default=1.0, help="> 1 speaks slower (default 1.0)")



def run(args: argparse.Namespace) -> int:
    import torch

    from ..audio import write_wav
    from ..evaluation import read_sentences
    from ..inference import Synthesizer

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.duration_scale <= 0:
        raise SystemExit("--duration-scale must be > 0")
    if args.text is not None:
        if not args.text.strip():
            raise SystemExit("--text is empty")
        jobs = [(args.text, Path(args.out))]
    else:
        lines = read_sentences(args.text_file)
        os.makedirs(args.out, exist_ok=True)
        jobs = [(line, Path(args.out) / f"{i:04d}.wav") for i, line in enumerate(lines, 1)]
    synth = Synthesizer(args.model)
    total_audio = total_model = 0.0
    for sentence, path in jobs:
        out = synth.synthesize(sentence, duration_scale=args.duration_scale)
        write_wav(path, out.wav, out.sample_rate)
        total_audio += out.duration
        total_model += out.seconds
        threads = torch.get_num_threads()
        print(f"{path}: {out.duration:.2f} s of audio in {out.seconds:.3f} s (RTF {out.rtf:.3f}, "
              f"{threads} thread{'s' if threads != 1 else ''})")
    if len(jobs) > 1:
        print(f"{len(jobs)} utterances, {total_audio:.2f} s of audio, RTF {total_model / max(total_audio, 1e-9):.3f}")
    return 0
