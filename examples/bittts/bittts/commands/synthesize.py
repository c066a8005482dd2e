"""`bittts synthesize [--model MODEL.safetensors] [--text TEXT | --text-file FILE] (-o OUT | -o - | --output-raw)`

The text (`--text`, or standard input when neither `--text` nor `--text-file` is given) is split into sentences
(`bittts.synthesis.long_text.split_sentences`) and spoken one sentence at a time, so memory stays bounded whatever
its length: `-o OUT.wav` writes one WAV file, `-o -` one WAV to standard output, and `--output-raw` streams raw
16-bit little-endian mono PCM at the model's sample rate to standard output, flushed after each sentence (as Piper's
`--output-raw` does; standard input is then spoken line by line as it arrives). `--text-file FILE -o OUT_DIR` speaks
every non-empty line of FILE into OUT_DIR/0001.wav, ...; with `-o -` or `--output-raw` the file is read like
standard input. Prints each output's duration and real-time factor (model time / audio duration; espeak-ng
phonemization excluded), on standard error when standard output carries the audio.

`--model VOICE.onnx` speaks an ONNX voice (`bittts export --format onnx`) with onnxruntime and numpy only: this
command then never imports torch."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..limits import MAX_DURATION_SCALE, MAX_SENTENCE_CHARS, MAX_TEXT_BYTES
from . import check_threads, load_voice, wav_dir, wav_output

if TYPE_CHECKING:
    from ..synthesis.voice import Voice

STDOUT = "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL.safetensors|VOICE.onnx",
                        help="exported model (bittts export), or an ONNX voice (bittts export --format onnx: "
                             "VOICE.onnx with VOICE.onnx.json beside it, spoken with onnxruntime, without torch); "
                             "default: the shipped 1.58-bit model "
                             "(examples/bittts/pretrained/bittts-ternary.safetensors)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to speak, of any length: it is split into sentences "
                                       "(default: read the text from standard input)")
    source.add_argument("--text-file", metavar="FILE",
                        help="speak every non-empty line of FILE, one wav each in the -o directory (UTF-8, at most "
                             f"{MAX_SENTENCE_CHARS:,} characters a line and {MAX_TEXT_BYTES // 10**6} MB); with -o "
                             "OUT.wav, -o - or --output-raw, FILE is spoken like standard input, into one output")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument("-o", "--out", metavar="OUT.wav|OUT_DIR|-",
                        help="wav file (named .wav, or with no extension), '-' for a wav on standard output, "
                             "or the directory of --text-file's wavs")
    output.add_argument("--output-raw", action="store_true",
                        help="stream raw 16-bit little-endian mono PCM at the model's sample rate (16 kHz) to "
                             "standard output, flushed after each sentence (e.g. | aplay -r 16000 -f S16_LE -c 1)")
    parser.add_argument("--threads", type=int, help="CPU threads, 1 to the machine's CPU count: torch's, or "
                                                    "onnxruntime's intra-op threads for an ONNX voice (default: "
                                                    "the runtime's choice)")
    parser.add_argument("--duration-scale", type=float, default=1.0,
                        help=f"> 1 speaks slower, at most {MAX_DURATION_SCALE:g} (default 1.0)")


def _stdout() -> BinaryIO:
    """Standard output for audio bytes; refused when it is a terminal (binary noise, not what anyone wants)."""
    if sys.stdout.isatty():
        raise ValueError("standard output is a terminal: redirect the audio to a file (> out.wav) or a player "
                         "(| aplay), or give -o OUT.wav")
    return sys.stdout.buffer


def _sentences(args: argparse.Namespace) -> Iterator[str]:
    """The sentences to speak, read lazily (standard input is read as the model speaks)."""
    from ..synthesis.long_text import read_sentences_stream, split_sentences

    if args.text is not None:
        yield from split_sentences(args.text)
    elif args.text_file is not None:
        with open(args.text_file, "rb") as f:
            yield from read_sentences_stream(f, args.text_file)
    else:
        if sys.stdin is None:
            raise ValueError("no --text or --text-file, and there is no standard input to read the text from")
        if sys.stdin.isatty():
            print("reading text from standard input (end it with Ctrl-D)", file=sys.stderr)
        yield from read_sentences_stream(sys.stdin.buffer)


def run(args: argparse.Namespace) -> int:
    check_threads(args.threads)
    if not 0 < args.duration_scale <= MAX_DURATION_SCALE:
        raise ValueError(f"--duration-scale {args.duration_scale}: expected a number in (0, {MAX_DURATION_SCALE}]")
    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty: give a sentence to speak")
    streamed = args.output_raw or args.out == STDOUT
    one_wav = args.out is not None and Path(args.out).suffix.lower() in (".wav", ".wave")
    if args.text_file is not None and not (streamed or one_wav):
        return _per_line(args)
    out = _stdout() if streamed else wav_output(args.out)
    log = sys.stderr if streamed else sys.stdout

    from ..synthesis.long_text import speak, write_wav_stream, write_wav_to_stream
    from ..synthesis.voice import Synthesis

    synth = load_voice(args.model, args.threads)
    totals = {"sentences": 0, "audio": 0.0, "model": 0.0}

    def count(_sentence: str, synthesis: Synthesis) -> None:
        totals["sentences"] += 1
        totals["audio"] += synthesis.duration
        totals["model"] += synthesis.seconds

    chunks = speak(synth, _sentences(args), args.duration_scale, on_sentence=count)
    try:
        if args.output_raw:
            for chunk in chunks:
                out.write(chunk)
                out.flush()
        elif args.out == STDOUT:
            write_wav_to_stream(out, chunks, synth.sample_rate)
        else:
            write_wav_stream(out, chunks, synth.sample_rate)
    except BrokenPipeError:  # the reader went away (| head): no second error when Python flushes at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise ValueError("standard output was closed by its reader before the audio was written") from None
    where = "raw PCM" if args.output_raw else "standard output" if args.out == STDOUT else str(out)
    n = totals["sentences"]
    print(f"{where}: {totals['audio']:.2f} s of audio in {totals['model']:.3f} s (RTF "
          f"{totals['model'] / max(totals['audio'], 1e-9):.3f}, {_threads(synth)}), {n} sentence{'s' if n != 1 else ''}",
          file=log)
    return 0


def _threads(synth: Voice) -> str:
    threads = synth.threads()
    count = "default threads" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"
    return f"{synth.runtime}, {count}"


def _per_line(args: argparse.Namespace) -> int:
    """`--text-file FILE -o OUT_DIR`: one wav per non-empty line."""
    from ..synthesis.long_text import pcm16, read_sentences, write_wav_stream

    lines = read_sentences(args.text_file)
    out_dir = wav_dir(args.out)
    synth = load_voice(args.model, args.threads)
    total_audio = total_model = 0.0
    for i, sentence in enumerate(lines, 1):
        path = out_dir / f"{i:04d}.wav"
        out = synth.synthesize(sentence, duration_scale=args.duration_scale)
        write_wav_stream(path, [pcm16(out.wav)], out.sample_rate)
        total_audio += out.duration
        total_model += out.seconds
        print(f"{path}: {out.duration:.2f} s of audio in {out.seconds:.3f} s (RTF {out.rtf:.3f}, {_threads(synth)})")
    if len(lines) > 1:
        print(f"{len(lines)} utterances, {total_audio:.2f} s of audio, RTF {total_model / max(total_audio, 1e-9):.3f}")
    return 0
