"""`bittts` command line: one subcommand per module in `bittts.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in bittts.commands that defines `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "prepare": "Build a training corpus offline (flite voice + espeak-ng phonemes + features).",
    "train": "Train a BitTTS model (JETS + HiFi-GAN, optionally with ternq QAT).",
    "export": "Export a training run's inference model as a ternq packed safetensors file.",
    "synthesize": "Synthesize speech from text with an exported model.",
    "evaluate": "Measure size, intelligibility (WER/CER), MCD and real-time factor of a model.",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (the others may need heavy or missing dependencies)."""
    parser = argparse.ArgumentParser(prog="bittts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"bittts.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
