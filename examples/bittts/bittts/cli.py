"""`bittts` command line: one subcommand per module in `bittts.commands`."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from .commands import INPUT_ERRORS

# subcommand -> module in bittts.commands that defines `add_arguments(parser)` and `run(args) -> int`; the
# exception types of `bittts.commands.INPUT_ERRORS` are reported as one line (`describe`), not a traceback
COMMANDS = {
    "prepare": "Build a training corpus offline (flite voice + espeak-ng phonemes + features).",
    "train": "Train a BitTTS model (JETS + HiFi-GAN, optionally with ternq QAT).",
    "export": "Export a training run's inference model as a ternq packed safetensors file, or a model as an ONNX "
              "voice that speaks without torch (--format onnx).",
    "synthesize": "Synthesize speech from text with an exported model.",
    "serve": "Serve speech over HTTP: POST text to /synthesize, get a WAV (the model loaded once).",
    "evaluate": "Score models and reference systems (flite, Piper): size, WER/CER, DNSMOS, MCD, real-time factor.",
    "demo": "Speak one sentence with the shipped 1.58-bit model; print its size, speed and transcript.",
}


DESCRIPTION = """\
BitTTS: a compact English text-to-speech system (JETS acoustic model + HiFi-GAN vocoder) trained with 1.58-bit
(ternary) quantization-aware training and stored with 5 ternary weights per byte. Everything runs offline on a
CPU: flite speaks the training corpus, espeak-ng gives the phonemes, pocketsphinx scores intelligibility and
DNSMOS naturalness."""

EPILOG = """\
typical pipeline:
  bittts prepare --out data --sentences 3000          # corpus: text -> flite audio -> phonemes + features
  bittts train --data data --out run --preset all     # JETS + HiFi-GAN with 1.58-bit QAT
  bittts export run -o bittts.safetensors             # the inference model as a ternq packed file
  bittts synthesize --model bittts.safetensors --text "Hello there." -o hello.wav
  bittts export bittts.safetensors -o bittts.onnx     # an ONNX voice (+ bittts.onnx.json): no torch needed
  bittts synthesize --model bittts.onnx --text "Hello there." -o hello.wav   # onnxruntime + numpy only
  echo "Hello there." | bittts synthesize --output-raw | aplay -r 16000 -f S16_LE -c 1
  bittts serve --port 5000                            # POST text to http://127.0.0.1:5000/synthesize
  bittts evaluate --model bittts.safetensors --system flite piper --out report  # one table, same metrics

`bittts COMMAND --help` lists a command's options."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (the others may need heavy or missing dependencies)."""
    parser = argparse.ArgumentParser(prog="bittts", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"bittts.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run, _user_errors=INPUT_ERRORS)
    return parser


def describe(error: BaseException) -> str:
    """One line for a bad-input exception: an OSError as "PATH: reason", anything else its message, with
    newlines and runs of spaces collapsed (torch's and subprocess' messages span lines)."""
    if isinstance(error, OSError) and error.filename is not None:
        text = f"{os.fsdecode(error.filename)}: {error.strerror or error}"
    elif isinstance(error, subprocess.CalledProcessError):
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        text = f"{os.path.basename(str(error.cmd[0]))} failed (exit {error.returncode}): {stderr.strip()}"
    else:
        text = str(error) or type(error).__name__
    text = " ".join(text.split())  # one line; a control character (a terminal escape from a file) shown escaped
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except args._user_errors as e:
        raise SystemExit(f"bittts {args.command}: {describe(e)}") from e
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback
        print(f"bittts {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
