"""`bittts train --data DATA_DIR --out RUN_DIR --preset {fp32,acoustic,all,4bit,tiny} [--steps N] [--resume]`

Also runs under torchrun for data-parallel training, e.g.
`torchrun --nproc_per_node 2 -m bittts.cli train --data DATA --out RUN --preset all`.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..config import PRESETS, apply_overrides, config_from_dict, load_config, load_preset
from . import output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DATA_DIR", help="prepared corpus (bittts prepare --out)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (checkpoint, logs, images)")
    parser.add_argument("--preset", choices=PRESETS,
                        help="model/quantization preset: fp32, acoustic (the paper's 70%% setting), all (83%%), "
                        "4bit, tiny (tests and smoke runs). With --resume it may be left out")
    parser.add_argument("--config", metavar="TOML", help="a full config file instead of --preset "
                        "(e.g. a run's config.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, e.g. --set train.batch_size=8 (repeatable)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (default: the preset's train.steps)")
    parser.add_argument("--resume", action="store_true", help="continue RUN_DIR/checkpoint.pt exactly")
    parser.add_argument("--init-from", metavar="MODEL", help="start a new run from a float model's weights: an "
                        "exported model (.safetensors), or a float run's checkpoint.pt or RUN_DIR (QAT from fp32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = CUDA when available (default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..training.checkpoints import CHECKPOINT_NAME, load_checkpoint
    from ..training.loop import train

    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if not os.path.isdir(args.data):
        raise ValueError(f"--data {args.data}: not a directory; prepare a corpus with `bittts prepare --out "
                         f"{args.data}`")
    output_dir(args.out, "--out")
    if args.config and args.preset:
        raise ValueError("give either --preset or --config, not both")
    if args.config:
        cfg = load_config(args.config)
    elif args.preset:
        cfg = load_preset(args.preset)
    elif args.resume and os.path.exists(os.path.join(args.out, CHECKPOINT_NAME)):
        cfg = config_from_dict(load_checkpoint(os.path.join(args.out, CHECKPOINT_NAME))["config"])
    else:
        raise ValueError(f"choose a model with --preset ({', '.join(PRESETS)}) or --config FILE")
    if args.set:
        cfg = apply_overrides(cfg, args.set)
    result = train(cfg, args.out, data_dir=args.data, steps=args.steps, resume=args.resume, device=args.device,
                   progress=not args.no_progress, init_from=args.init_from)
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["history"][-1] if result["history"] else {}
        summary = ", ".join(f"{k}={last[k]:.4f}" for k in ("loss_g", "loss_d", "mel") if k in last)
        print(f"trained to step {result['step']} ({result['steps_per_s']:.2f} steps/s"
              f"{', ' + summary if summary else ''}); checkpoint: {result['checkpoint']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker whose work is saved leaves without the interpreter's finalization: gloo's threads,
        # which DistributedDataParallel keeps alive in C++ after its wrappers are gone, can abort it there
        # ("terminate called without an active exception", SIGABRT, seen in CI after a finished run)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
