"""`bittts export SOURCE -o OUT [--format safetensors|onnx] [--checkpoint CKPT]`: the inference model as a ternq
packed file, or as an ONNX voice (VOICE.onnx + VOICE.onnx.json) that speaks without torch."""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..extras import require
from . import output_file

FORMATS = ("safetensors", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR|MODEL.safetensors",
                        help="training run directory (bittts train --out), or, for --format onnx, also an exported "
                             "model (bittts export, or a shipped one: examples/bittts/pretrained/*.safetensors)")
    parser.add_argument("-o", "--out", required=True, metavar="MODEL.safetensors|VOICE.onnx",
                        help="file to write; an ONNX voice also writes its JSON beside it (VOICE.onnx.json)")
    parser.add_argument("--format", choices=FORMATS,
                        help="safetensors: the ternq packed file (bittts synthesize on torch); onnx: an ONNX voice "
                             "that `bittts synthesize --model VOICE.onnx` speaks with onnxruntime and numpy only "
                             "(default: onnx when -o ends in .onnx, else safetensors)")
    parser.add_argument("--checkpoint", metavar="CKPT",
                        help="checkpoint to export: a path or a file name in RUN_DIR (default: the latest, "
                             "RUN_DIR/checkpoint.pt)")


def run(args: argparse.Namespace) -> int:
    from ..training.export import export_model, export_onnx_voice, find_checkpoint

    fmt = args.format or ("onnx" if args.out.lower().endswith(".onnx") else "safetensors")
    output_file(args.out, example="voice.onnx" if fmt == "onnx" else "model.safetensors")
    if fmt == "onnx":
        require("onnx", "bittts export --format onnx")
    source_is_model = Path(args.source).is_file()
    if source_is_model and fmt == "safetensors":
        raise ValueError(f"{args.source} is a file: export reads a training run directory (RUN_DIR); to turn an "
                         "exported model into an ONNX voice, give --format onnx")
    if source_is_model and args.checkpoint is not None:
        raise ValueError("--checkpoint picks a checkpoint of a RUN_DIR; the source is a model file")
    if fmt == "safetensors":
        checkpoint = find_checkpoint(args.source, args.checkpoint)
        info = export_model(checkpoint, args.out)
        print(f"exported {checkpoint} (step {info['step']}, preset {info['preset']}, quant {info['quant']}): "
              f"{info['packed_layers']} packed layers, {info['bytes']:,} bytes ({info['bytes'] / 1e6:.2f} MB) "
              f"-> {info['path']}")
        return 0
    if source_is_model:
        source, info = args.source, export_onnx_voice(args.source, args.out)
    else:  # a run: its packed model first, so that the voice computes what the packed model computes
        checkpoint = find_checkpoint(args.source, args.checkpoint)
        with tempfile.TemporaryDirectory() as tmp:
            model = os.path.join(tmp, Path(args.out).stem + ".safetensors")
            export_model(checkpoint, model)
            source, info = checkpoint, export_onnx_voice(model, args.out)
    print(f"exported {source} as an ONNX voice: {info['bytes']:,} bytes ({info['bytes'] / 1e6:.2f} MB; the packed "
          f"model: {info['source_bytes'] / 1e6:.2f} MB) -> {info['path']} + {info['config']}")
    return 0
