"""`bittts export RUN_DIR -o MODEL.safetensors [--checkpoint CKPT]`: the inference model as a ternq packed file."""
from __future__ import annotations

import argparse

from . import output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (bittts train --out)")
    parser.add_argument("-o", "--out", required=True, metavar="MODEL.safetensors", help="file to write")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="checkpoint to export: a path or a file name in RUN_DIR (default: the latest, "
                             "RUN_DIR/checkpoint.pt)")


def run(args: argparse.Namespace) -> int:
    from ..training.export import export_model, find_checkpoint

    output_file(args.out, example="model.safetensors")
    checkpoint = find_checkpoint(args.run_dir, args.checkpoint)
    info = export_model(checkpoint, args.out)
    print(f"exported {checkpoint} (step {info['step']}, preset {info['preset']}, quant {info['quant']}): "
          f"{info['packed_layers']} packed layers, {info['bytes']:,} bytes ({info['bytes'] / 1e6:.2f} MB) "
          f"-> {info['path']}")
    return 0
