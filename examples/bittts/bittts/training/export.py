"""Export: a training checkpoint -> the self-describing model file that `bittts.synthesis.synthesizer` reads.

The file's format (its metadata keys and versions) is documented, and read, in `bittts.synthesis.synthesizer`;
this module is the one writer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import BitTTSConfig, config_from_dict, config_to_dict
from ..data import audio, text
from ..synthesis.synthesizer import MODEL_FORMAT, MODEL_VERSION, PHONEMIZER_VOICE
from .checkpoints import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint

__all__ = ["export_model", "find_checkpoint"]


def find_checkpoint(run_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint to export: `checkpoint` (a path, or a file name inside `run_dir`), else the latest in
    `run_dir`: `CHECKPOINT_NAME` (what `bittts train` writes and keeps current), or failing that the most
    recently modified ``*.pt``."""
    run = Path(run_dir)
    if checkpoint is not None:
        for candidate in (Path(checkpoint), run / checkpoint):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"checkpoint {os.fspath(checkpoint)!r} not found (neither as a path nor in {run})")
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist; train one with "
                                f"`bittts train --data DATA_DIR --out {run}`")
    if (run / CHECKPOINT_NAME).is_file():
        return run / CHECKPOINT_NAME
    found = sorted(run.glob("*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint (*.pt) in {run}; train one with "
                                f"`bittts train --data DATA_DIR --out {run}`")
    return found[-1]


def _symbols_of(ckpt: dict[str, Any], cfg: BitTTSConfig) -> list[str]:
    symbols = ckpt.get("symbols")
    if symbols is None:  # trained from an in-memory dataset: only the package's own table can be meant
        if cfg.acoustic.n_symbols != len(text.SYMBOLS):
            raise ValueError(f"the checkpoint has no symbol table and its {cfg.acoustic.n_symbols} symbols are not "
                             f"bittts.data.text.SYMBOLS ({len(text.SYMBOLS)}); it cannot be turned into a text model")
        symbols = list(text.SYMBOLS)
    if len(symbols) > cfg.acoustic.n_symbols:
        raise ValueError(f"the checkpoint's symbol table has {len(symbols)} entries but the model embeds only "
                         f"{cfg.acoustic.n_symbols}")
    return [str(s) for s in symbols]


def export_model(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the inference model of a training checkpoint as a self-describing ternq packed file (atomically).

    Returns a summary: path, bytes, packed layer count, step, config name.
    """
    import ternq

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    cfg = config_from_dict(ckpt["config"])
    symbols = _symbols_of(ckpt, cfg)
    model = model_from_checkpoint(ckpt, inference=True)
    step = int(ckpt.get("state", {}).get("step", 0))
    metadata = {
        "bittts.format": MODEL_FORMAT,
        "bittts.version": str(MODEL_VERSION),
        "bittts.config": json.dumps(config_to_dict(cfg), sort_keys=True),
        "bittts.symbols": json.dumps(symbols, ensure_ascii=False),
        "bittts.phonemizer": json.dumps({"backend": "espeak-ng", "voice": PHONEMIZER_VOICE,
                                         "normalizer": "bittts.data.text.normalize"}),
        "bittts.audio": json.dumps({"sample_rate": audio.SAMPLE_RATE, "hop": audio.HOP, "n_mels": audio.N_MELS}),
        "bittts.training": json.dumps({"step": step, "checkpoint": os.path.basename(os.fspath(checkpoint)),
                                       "seconds": round(float(ckpt.get("state", {}).get("seconds", 0.0)), 1),
                                       "recipe_changes": ckpt.get("recipe_changes", []),
                                       "init": ckpt.get("init")}),
    }
    packed = ternq.pack(model, metadata=metadata, allow_float=cfg.quant.config is None)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    packed.save(out)
    return {"path": os.fspath(out), "bytes": os.path.getsize(out), "packed_layers": len(packed.manifest["layers"]),
            "step": step, "preset": cfg.name, "quant": f"{cfg.quant.scheme}/{cfg.quant.scope}"}
