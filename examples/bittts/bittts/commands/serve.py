"""`bittts serve [--model MODEL.safetensors] [--host 127.0.0.1] [--port 5000]`

An HTTP server that loads the model once and speaks: `POST /synthesize` with the text (plain UTF-8, or JSON
{"text": ..., "duration_scale": ...}) answers a WAV; `GET /health` answers JSON. See `bittts.synthesis.server` for the
bounds on a request (connections, size, total time, phonemes and seconds of audio, syntheses at once) and
`bittts.limits` for their values.
"""
from __future__ import annotations

import argparse

from ..limits import MAX_REQUEST_BYTES
from . import check_threads, load_voice, max_threads

DEFAULT_PORT = 5000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL.safetensors|VOICE.onnx",
                        help="exported model (bittts export), or an ONNX voice (bittts export --format onnx; "
                             "served with onnxruntime, without torch); default: the shipped 1.58-bit model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                             "interface, with no authentication)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one, printed at start)")
    parser.add_argument("--max-bytes", type=int, default=MAX_REQUEST_BYTES,
                        help=f"largest request body in bytes; larger ones get 413 (default and at most "
                             f"{MAX_REQUEST_BYTES:,})")
    parser.add_argument("--jobs", type=int, default=1,
                        help="syntheses that run at once; a request beyond them gets 503 at once (default 1)")
    parser.add_argument("--threads", type=int, help="CPU threads, 1 to the machine's CPU count: torch's, or "
                                                    "onnxruntime's intra-op threads for an ONNX voice (default: "
                                                    "the runtime's choice)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request to standard error")


def run(args: argparse.Namespace) -> int:
    from ..synthesis.server import SpeechServer

    check_threads(args.threads)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0 to 65535")
    if not 1 <= args.jobs <= max_threads():
        raise ValueError(f"--jobs {args.jobs}: expected 1 to {max_threads()} (the CPUs of this machine)")
    if not 1 <= args.max_bytes <= MAX_REQUEST_BYTES:
        raise ValueError(f"--max-bytes {args.max_bytes}: expected 1 to {MAX_REQUEST_BYTES:,}")
    synth = load_voice(args.model, args.threads)
    with SpeechServer((args.host, args.port), synth, max_bytes=args.max_bytes, jobs=args.jobs,
                      quiet=args.quiet) as server:
        print(f"bittts serve: {synth.path.name} on {server.url} (POST /synthesize, GET /health); Ctrl-C stops",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("bittts serve: stopped", flush=True)
    return 0
