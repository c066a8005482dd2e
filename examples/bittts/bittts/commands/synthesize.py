"""`bittts synthesize [--model MODEL.safetensors] (--text TEXT | --text-file FILE) -o OUT`

`--text` writes one wav to OUT; `--text-file` speaks every non-empty line and writes OUT/0001.wav, ... Prints
each utterance's duration and real-time factor (model time / audio duration; espeak-ng phonemization excluded).
"""
from __future__ import annotations

import argparse

from ..limits import MAX_DURATION_SCALE, MAX_SENTENCE_CHARS, MAX_TEXT_BYTES
from . import check_threads, output_dir, output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL.safetensors",
                        help="exported model (bittts export); default: the shipped 1.58-bit model "
                             "(examples/bittts/pretrained/bittts-ternary.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the sentence to speak")
    source.add_argument("--text-file", metavar="FILE",
                        help="speak every non-empty line of FILE, one wav each (UTF-8, at most "
                             f"{MAX_SENTENCE_CHARS:,} characters a line and {MAX_TEXT_BYTES // 10**6} MB)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT.wav|OUT_DIR",
                        help="wav file (--text) or directory (--text-file)")
    parser.add_argument("--threads", type=int, help="torch CPU threads, 1 to the machine's CPU count (default: "
                                                    "torch's choice)")
    parser.add_argument("--duration-scale", type=float, default=1.0,
                        help=f"> 1 speaks slower, at most {MAX_DURATION_SCALE:g} (default 1.0)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..audio import write_wav
    from ..evaluation import check_sentence, read_sentences
    from ..inference import Synthesizer

    check_threads(args.threads)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not 0 < args.duration_scale <= MAX_DURATION_SCALE:
        raise ValueError(f"--duration-scale {args.duration_scale}: expected a number in (0, {MAX_DURATION_SCALE}]")
    if args.text is not None:
        jobs = [(check_sentence(args.text, "--text"), output_file(args.out))]
    else:
        lines = read_sentences(args.text_file)
        out_dir = output_dir(args.out)
        jobs = [(line, out_dir / f"{i:04d}.wav") for i, line in enumerate(lines, 1)]
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
