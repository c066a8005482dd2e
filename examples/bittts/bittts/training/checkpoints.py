"""Training checkpoints: the file `bittts train` writes (`RUN_DIR/checkpoint.pt`) and the model it holds.

A checkpoint is a torch.save'd dict: "format" (`CHECKPOINT_FORMAT`), "version", "config" (`config_to_dict`),
"state" (`bittts.training.loop.TrainState`), "model" and "discriminators" (state dicts), the optimizers' and
schedulers' states, "rng" (every process's random states), "symbols", "world_size", "recipe_changes" and "init"
(the warm start's source, or None). `bittts.training.loop` writes it; everything else reads it through this module.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..config import config_from_dict
from ..model.bittts import TRAINING_ONLY, BitTTS, build_model

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "load_checkpoint", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "bittts-checkpoint"
CHECKPOINT_NAME = "checkpoint.pt"  # in a run directory: the latest checkpoint, kept current by `bittts train`


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint (`RUN_DIR/checkpoint.pt`) and check its format."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `bittts train --out RUN_DIR`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load of foreign bytes fails with UnpicklingError, IndexError, KeyError, ...
        raise ValueError(f"{path} is not a BitTTS training checkpoint (torch.load cannot read it: "
                         f"{type(e).__name__}); give a checkpoint.pt that `bittts train` wrote") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a BitTTS training checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: str | os.PathLike | dict[str, Any], map_location: str | torch.device = "cpu", *,
                          inference: bool = False) -> BitTTS:
    """Rebuild a checkpoint's model with its weights, in eval mode: as trained (quantized, weight-normed, with
    the aligner), or with `inference` in the export form (`BitTTS.for_inference`), the weight norm folded into
    plain weights and the training-only parts left behind."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location)
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    if inference:
        model.remove_weight_norm()
        trained, model = model, BitTTS.for_inference(cfg)
        model.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith(TRAINING_ONLY)})
    return model.to(map_location).eval()
