"""`bittts prepare`: build a training corpus offline (a flite or Piper teacher voice, or an LJSpeech-layout folder)."""
from __future__ import annotations

import argparse
import os
import time

from . import max_threads, output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the prepared corpus to (resumable)")
    parser.add_argument("--sentences", type=int, default=3000, help="number of generated sentences (flite corpus; default 3000)")
    parser.add_argument("--voice", default="slt", help="teacher voice: a flite voice (16 kHz: slt, rms, awb, kal16) or piper-joe (Piper's "
                        "CC0 en_US-joe-medium, resampled to 16 kHz; needs the peer extra); default slt")
    parser.add_argument("--ljspeech", metavar="PATH", help="prepare recordings in the LJSpeech layout instead")
    parser.add_argument("--limit", type=int, help="with --ljspeech: use only the first N utterances")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of utterances held out (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence generator and the split (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and not 1 <= args.workers <= max_threads():
        raise ValueError(f"--workers {args.workers}: expected 1 to {max_threads()} (the CPUs of this machine)")
    if args.ljspeech and not os.path.isdir(args.ljspeech):
        raise ValueError(f"--ljspeech {args.ljspeech}: not a directory; give an LJSpeech-layout folder "
                         "(metadata.csv and wavs/)")
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction {args.val_fraction}: expected a share in [0, 1), e.g. 0.05")
    for option, value in (("--sentences", args.sentences), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    output_dir(args.out, "--out")
    start = time.perf_counter()
    if args.ljspeech:
        from ..data.dataset import prepare_ljspeech

        meta = prepare_ljspeech(args.ljspeech, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                workers=args.workers, limit=args.limit, progress=not args.quiet)
    else:
        from ..data.corpus import prepare_corpus

        meta = prepare_corpus(args.out, n_sentences=args.sentences, voice=args.voice,
                              val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                              progress=not args.quiet)
    splits = meta["splits"]
    print(f"prepared {splits['train']} train + {splits['val']} val utterances, {meta['hours']:.2f} h of audio, "
          f"in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0
