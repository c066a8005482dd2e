"""Warm starts: begin a training run from a trained float model instead of random weights.

QAT from a float checkpoint is the usual way to spend less compute per quantized model: `bittts train --init-from
bittts-fp32.safetensors --preset all` loads the float weights into the model *before* ternq quantizes it, so the
ternary latent weights start where the float training ended. The source may be an exported model (weight norm
folded, no aligner, no mel head) or a run's `checkpoint.pt`. What an export lacks is rebuilt: weight norm from the
folded weights (torch's weight_norm parametrization takes a plain weight through its right inverse), and the
training-only alignment module by `warm_up_aligner`, which fits a fresh aligner to the frozen encoder before the
first joint step, so the decoder never sees a random alignment. Only weights carry over: the discriminators,
optimizer moments and learning-rate schedule start fresh, as in any new run (step 0).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import BitTTSConfig, config_diff, config_from_dict
from ..model.alignment import forward_sum_loss
from ..model.bittts import TRAINING_ONLY, BitTTS
from .checkpoints import CHECKPOINT_NAME, load_checkpoint

__all__ = ["read_init_weights", "load_init_weights", "warm_up_aligner"]

# config fields that may differ between the source and the new run: they change no parameter shape
_FREE = {"acoustic": ("dropout", "variance_dropout"), "vocoder": ("weight_norm",)}
# a weight-normed layer's state_dict entries (torch's weight_norm parametrization): g and v
_WN_G, _WN_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


def read_init_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Float weights to start from: {"state": name -> tensor, "config", "symbols", "source" (what to record)}.

    `path` is an exported float model (.safetensors) or a float run's checkpoint.pt / run directory.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path}: no such file; give an exported float model (e.g. "
                                "pretrained/bittts-fp32.safetensors) or a float run's checkpoint.pt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix == ".safetensors":
        from ..synthesis.synthesizer import Synthesizer

        synth = Synthesizer(path)
        cfg, symbols = synth.cfg, synth.symbols
        state = {k: v.detach().clone() for k, v in synth.model.state_dict().items()}
        step, seconds = int(synth.training.get("step", 0)), float(synth.training.get("seconds", 0.0))
    else:
        ckpt = load_checkpoint(path)
        cfg, symbols, state = config_from_dict(ckpt["config"]), ckpt.get("symbols"), ckpt["model"]
        step, seconds = int(ckpt["state"]["step"]), float(ckpt["state"].get("seconds", 0.0))
    if cfg.quant.config is not None:
        raise ValueError(f"--init-from {path}: a {cfg.quant.scheme} model; warm starts begin from float weights "
                         "(the fp32 preset), which ternq then quantizes")
    return {"state": state, "config": cfg, "symbols": symbols,
            "source": {"file": path.name, "sha256": digest, "step": step, "seconds": round(seconds, 1),
                       "preset": cfg.name}}


def _check_compatible(cfg: BitTTSConfig, source: BitTTSConfig, symbols: list[str] | None,
                      source_symbols: list[str] | None) -> None:
    diff = config_diff(source, cfg, ("acoustic", "vocoder"), ignore=_FREE)
    if diff:
        raise ValueError("--init-from: the source model has another architecture (source vs this run: "
                         + "; ".join(diff) + "); warm-start from a model trained with the same [acoustic] and [vocoder] sections")
    if symbols is not None and source_symbols is not None and list(symbols) != list(source_symbols):
        raise ValueError("--init-from: the source model was trained with another phoneme symbol table than this "
                         "corpus; its embeddings would mean other phonemes. Use the corpus it was trained on")


def load_init_weights(model: BitTTS, init: dict[str, Any], symbols: list[str] | None = None) -> list[str]:
    """Copy `read_init_weights`' float weights into a float, not yet quantized `model` (in place).

    Returns the parameter names left at their initial values: only training-only parts (the aligner and mel
    head) may be missing, anything else is an architecture mismatch and an error.
    """
    _check_compatible(model.cfg, init["config"], symbols, init["symbols"])
    own = model.state_dict()
    done: set[str] = set()
    with torch.no_grad():
        for name, value in _fold_weight_norm(init["state"], own).items():
            if name in own:
                if own[name].shape != value.shape:
                    raise ValueError(f"--init-from: {name} has shape {tuple(value.shape)} in the source, "
                                     f"{tuple(own[name].shape)} here")
                own[name].copy_(value)
                done.add(name)
                continue
            owner, _, leaf = name.rpartition(".")
            folded = f"{owner}.parametrizations.{leaf}"
            if f"{folded}.original0" in own:  # weight norm folded at export: g, v from the plain weight
                setattr(model.get_submodule(owner), leaf, value.to(own[f"{folded}.original1"].dtype))
                done.update((f"{folded}.original0", f"{folded}.original1"))
                continue
            if name.startswith(TRAINING_ONLY):  # a training-only part this run has not (mel_head: lambda_mel_aux 0)
                continue
            raise ValueError(f"--init-from: the source has {name}, which this model lacks")
    missing = [k for k in own if k not in done]
    unexpected = [k for k in missing if not k.startswith(TRAINING_ONLY)]  # those a warm start rebuilds
    if unexpected:
        raise ValueError(f"--init-from: the source lacks {len(unexpected)} weights of this model "
                         f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    return missing


def _fold_weight_norm(state: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with each weight-normed layer that is plain in `own` (a checkpoint trained with
    vocoder.weight_norm, a run without it) folded into its plain weight, as `bittts export` folds it."""
    out = dict(state)
    for g_name in [k for k in state if k.endswith(_WN_G)]:
        owner = g_name[: -len(_WN_G)]
        if f"{owner}.weight" in own and f"{owner}{_WN_V}" in out:
            g, v = out.pop(g_name), out.pop(f"{owner}{_WN_V}")
            out[f"{owner}.weight"] = torch._weight_norm(v, g, 0)  # what weight_norm(dim=0) computes
    return out


def warm_up_aligner(model: BitTTS, batches: Iterator[dict[str, Any]], steps: int, cfg: BitTTSConfig,
                    device: torch.device, progress: bool = True) -> list[float]:
    """Train only the alignment module (forward-sum loss) on the frozen encoder for `steps` batches.

    Why: the aligner's hard paths pick which frames each phoneme's features are expanded to; a random aligner in
    a joint step would feed the warm-started decoder scrambled inputs and undo what it learned. Returns the loss
    of every step.
    """
    from tqdm import tqdm

    acoustic = model.acoustic
    params = list(acoustic.aligner.parameters())
    t = cfg.train
    opt = torch.optim.AdamW(params, t.lr, betas=t.betas, eps=t.adam_eps, weight_decay=t.weight_decay)
    losses = []
    for _ in tqdm(range(steps), disable=not progress, desc="aligner warm-up", unit="step", dynamic_ncols=True):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in next(batches).items()}
        with torch.no_grad():
            h, mask = acoustic.encode(batch["phonemes"], batch["phoneme_lengths"])
        log_p_attn = acoustic.align(h, mask.squeeze(1).bool(), batch["phoneme_lengths"], batch["mel"],
                                    batch["mel_lengths"])
        loss = forward_sum_loss(log_p_attn, batch["phoneme_lengths"], batch["mel_lengths"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        opt.step()
        losses.append(float(loss.detach()))
    return losses
