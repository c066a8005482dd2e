"""`bittts prepare`: build a training corpus offline (flite voice, or an LJSpeech-layout folder)."""
from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the prepared corpus to (resumable)")
    parser.add_argument("--sentences", type=int, default=3000, help="number of generated sentences (flite corpus; default 3000)")
    parser.add_argument("--voice", default="slt", help="flite voice (16 kHz voices: slt, rms, awb, kal16; default slt)")
    parser.add_argument("--ljspeech", metavar="PATH", help="prepare recordings in the LJSpeech layout instead")
    parser.add_argument("--limit", type=int, help="with --ljspeech: use only the first N utterances")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of utterances held out (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence generator and the split (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.ljspeech:
        from bittts.data import prepare_ljspeech

        meta = prepare_ljspeech(args.ljspeech, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                workers=args.workers, limit=args.limit, progress=not args.quiet)
    else:
        from bittts.corpus import prepare_corpus

        meta = prepare_corpus(args.out, n_sentences=args.sentences, voice=args.voice,
                              val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                              progress=not args.quiet)
    splits = meta["splits"]
    print(f"prepared {splits['train']} train + {splits['val']} val utterances, {meta['hours']:.2f} h of audio, "
          f"in {time.perf_counter() - start:.1f} s -> {args.out}")
    return 0
