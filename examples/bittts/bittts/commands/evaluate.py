"""`bittts evaluate --model MODEL.safetensors --sentences FILE --out REPORT_DIR [--reference-voice slt] [--limit N]`

Writes REPORT_DIR/report.md and report.json (size per part and the paper's size table, WER/CER, MCD against
flite, real-time factor at 1 and 2 threads) and the synthesized and reference wavs; prints the size table.
"""
from __future__ import annotations

import argparse

from . import check_threads, output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL.safetensors",
                        help="exported model (bittts export); default: the shipped 1.58-bit model "
                             "(examples/bittts/pretrained/bittts-ternary.safetensors)")
    parser.add_argument("--sentences", required=True, metavar="FILE", help="text file, one sentence per line")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="directory for the report and wavs")
    parser.add_argument("--reference-voice", default="slt",
                        help="flite voice of the references for MCD and the reference WER (default: slt, the "
                             "voice `bittts prepare` trains on)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N sentences")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                        help="thread counts to measure the real-time factor at (default: 1 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_model, read_sentences, write_report

    check_threads(args.threads)
    sentences = read_sentences(args.sentences, args.limit)
    output_dir(args.out, "--out")
    report = evaluate_model(args.model, sentences, args.out, reference_voice=args.reference_voice,
                            threads=args.threads, progress=not args.quiet)
    json_path, md_path = write_report(report, args.out)
    m = report["model"]
    print(f"model {m['path']}: {m['bytes']:,} bytes ({m['bytes'] / 1e6:.3f} MB): "
          + ", ".join(f"{p} {n / 1e6:.3f} MB" for p, n in m["parts"].items()))
    print(report["size_table_markdown"])
    print(f"{report['sentences']} sentences: WER {report['wer']:.1%} (flite reference {report['reference_wer']:.1%}), "
          f"CER {report['cer']:.1%} (reference {report['reference_cer']:.1%}), MCD {report['mcd_db']:.2f} dB, "
          + ", ".join(f"RTF {r:.3f} at {n} thread{'s' if n != '1' else ''}" for n, r in report["rtf"].items()))
    print(f"report: {md_path} and {json_path}")
    return 0
