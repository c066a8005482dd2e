"""Exported BitTTS models: `export_model` writes one, `Synthesizer` loads one and speaks.

An exported model is a ternq packed safetensors file (`ternq.save_packed`) of the inference model: BitTTS
without discriminators and aligner, weight norm folded (`BitTTS.for_inference`). The file describes
itself through ternq user metadata (`ternq.read_metadata`), so nothing but the file is needed to synthesize:

    bittts.format      "bittts-model"
    bittts.version     "2" (version 1 files, such as the shipped models, hold the [quant] schema from before it
                       held ternq's config; they load through `bittts.config.upgrade_quant`)
    bittts.config      the BitTTSConfig as JSON (`config_to_dict`): rebuilds the float skeleton
    bittts.symbols     the symbol table as a JSON list (phoneme string -> ids)
    bittts.phonemizer  JSON: {"backend": "espeak-ng", "voice": ..., "normalizer": "bittts.data.text.normalize"}
    bittts.audio       JSON: {"sample_rate": 16000, "hop": 256, "n_mels": 80}
    bittts.training    JSON: {"step", "checkpoint", "seconds" (training wall time), "recipe_changes", "init" (the
                       warm start's source, `bittts.training.warmstart`, or null)} (informative)

A float preset (no `[quant.config]`) exports a file without packed layers (`allow_float=True`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import BitTTSConfig, config_from_dict
from ..data import text
from ..model.bittts import BitTTS
from .voice import PHONEMIZER_VOICE, SAMPLE_RATES, Synthesis, Voice

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "DEFAULT_MODEL", "FP32_MODEL",
           "shipped_model", "default_model", "read_model_metadata", "Synthesizer", "Synthesis"]

MODEL_FORMAT = "bittts-model"
MODEL_VERSION = 2  # 2: [quant] holds ternq's config (`QuantizationConfig`)
READ_VERSIONS = ("1", "2")
# the models shipped with the package (package data): the 1.58-bit one is used when a command gets no --model
DEFAULT_MODEL = "pretrained/bittts-ternary.safetensors"
FP32_MODEL = "pretrained/bittts-fp32.safetensors"


# ------------------------------------------------------------------------------------------------ loading


def shipped_model(name: str) -> Path:
    """Where package data `name` (e.g. `FP32_MODEL`) lives in this installation; it may not exist."""
    return Path(str(resources.files("bittts") / name))


def default_model() -> Path:
    """The model shipped with the package, or FileNotFoundError saying how to make one."""
    path = shipped_model(DEFAULT_MODEL)
    if not path.is_file():
        raise FileNotFoundError(
            "no --model given and no pretrained model is shipped with this installation "
            f"({DEFAULT_MODEL}). Train and export one: `bittts prepare --out data && "
            "bittts train --data data --out run --preset all && bittts export run -o model.safetensors`, "
            "then pass --model model.safetensors")
    return path


def read_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded bittts metadata of an exported model: config (BitTTSConfig), symbols, phonemizer, audio,
    training. Raises ValueError if the file is a ternq file but not a BitTTS model."""
    import ternq

    if not os.path.exists(path):  # anything else that is not a regular file: ternq.read_metadata says what it is
        raise FileNotFoundError(f"model file {os.fspath(path)!r} not found; export one with "
                                "`bittts export RUN_DIR -o MODEL.safetensors`")
    with ternq.open(path) as f:  # the header only (like ternq.read_metadata), with the tensors' shapes
        meta, shapes = f.metadata, f.shapes()
    if meta.get("bittts.format") != MODEL_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a BitTTS model (no bittts.format={MODEL_FORMAT!r} metadata); "
                         "export one with `bittts export RUN_DIR -o MODEL.safetensors`")
    if meta.get("bittts.version") not in READ_VERSIONS:
        raise ValueError(f"{os.fspath(path)}: BitTTS model version {meta.get('bittts.version')!r}; this bittts reads "
                         f"versions {' and '.join(READ_VERSIONS)}: upgrade bittts")
    try:
        info = {"config": config_from_dict(json.loads(meta["bittts.config"])),
                "symbols": json.loads(meta["bittts.symbols"]),
                "phonemizer": json.loads(meta["bittts.phonemizer"]),
                "audio": json.loads(meta["bittts.audio"]),
                "training": json.loads(meta.get("bittts.training", "{}"))}
        _check_model_metadata(info)
        _check_sizes_against_tensors(info["config"], shapes)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: invalid bittts metadata: {e}") from None
    return info


# Bounds of the architecture numbers an exported model may claim: far above any BitTTS preset (the paper's model
# uses 4 layers, 256 channels, kernels <= 16), far below what would take minutes or gigabytes just to build.
_SIZE_BOUNDS = {"layers": 64, "channels": 4096, "kernel": 127, "kernels": 127, "rates": 64, "dilations": 64,
                "components": 64, "n_symbols": 100_000, "n_mels": 512, "max_duration": 10_000}
_MAX_LIST = 16  # entries of a tuple field (upsampling stages, resblocks, dilations)


def _check_sizes_against_tensors(cfg: BitTTSConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """The config's depths and the embedding's size against the tensors the file holds (names of the float
    skeleton's state_dict, packed weights under their own key), so that a forged config is refused before its
    skeleton is built; `ternq.load_packed` then checks every tensor against the skeleton."""
    def blocks(prefix: str) -> int:
        return len({n[len(prefix):].split(".", 1)[0] for n in shapes if n.startswith(prefix)})

    stages = len(cfg.vocoder.upsample_rates)
    for field, claimed, prefix in (
            ("acoustic.enc_layers", cfg.acoustic.enc_layers, "acoustic.encoder.blocks."),
            ("acoustic.dec_layers", cfg.acoustic.dec_layers, "acoustic.decoder.blocks."),
            ("acoustic.variance_layers", cfg.acoustic.variance_layers, "acoustic.pitch_predictor.convs."),
            ("len(vocoder.upsample_rates)", stages, "vocoder.ups."),
            ("len(vocoder.resblock_kernels) x upsampling stages", len(cfg.vocoder.resblock_kernels) * stages,
             "vocoder.resblocks.")):
        if blocks(prefix) != claimed:
            raise ValueError(f"bittts.config says {field} = {claimed}, but the file holds {blocks(prefix)} "
                             f"({prefix}N): the config does not describe this model")
    embed = shapes.get("acoustic.embed.weight")
    if embed != (cfg.acoustic.n_symbols, cfg.acoustic.enc_channels):
        raise ValueError(f"bittts.config says acoustic.n_symbols x enc_channels = {cfg.acoustic.n_symbols} x "
                         f"{cfg.acoustic.enc_channels}, but the file's acoustic.embed.weight is "
                         f"{list(embed) if embed is not None else 'missing'}")


def _check_model_metadata(info: dict[str, Any]) -> None:
    """Ranges of everything an exported model's metadata claims, checked before anything is built: each size
    of the architecture (ValueError naming the field), the symbol table, the audio and phonemizer settings."""
    cfg: BitTTSConfig = info["config"]
    for section in ("acoustic", "vocoder"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            bound = next((b for key, b in _SIZE_BOUNDS.items() if f.name == key or f.name.endswith("_" + key)), None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section}.{f.name} = {value} is not a finite number")
            if bound is None:
                continue
            flat = [v for item in (value if isinstance(value, tuple) else (value,))
                    for v in (item if isinstance(item, tuple) else (item,))]
            if isinstance(value, tuple) and (not value or len(value) > _MAX_LIST or
                                             any(isinstance(v, tuple) and len(v) > _MAX_LIST for v in value)):
                raise ValueError(f"{section}.{f.name} has {len(value)} entries; expected 1 to {_MAX_LIST}")
            if any(not 1 <= v <= bound for v in flat):
                raise ValueError(f"{section}.{f.name} = {value} is outside 1..{bound}")
    symbols = info["symbols"]
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols) or \
            not 1 <= len(symbols) <= cfg.acoustic.n_symbols:
        raise ValueError(f"bittts.symbols must be a list of 1 to acoustic.n_symbols = {cfg.acoustic.n_symbols} "
                         "strings")
    audio_info = info["audio"]
    rate = audio_info.get("sample_rate") if isinstance(audio_info, dict) else None
    if type(rate) is not int or not SAMPLE_RATES[0] <= rate <= SAMPLE_RATES[1]:
        raise ValueError(f"bittts.audio sample_rate {rate!r} is not an integer in {SAMPLE_RATES[0]}.."
                         f"{SAMPLE_RATES[1]} Hz")
    if audio_info.get("hop") != cfg.vocoder.hop:
        raise ValueError(f"bittts.audio hop {audio_info.get('hop')!r} is not the vocoder's upsampling "
                         f"{cfg.vocoder.hop}")
    phonemizer = info["phonemizer"]
    voice = phonemizer.get("voice", PHONEMIZER_VOICE) if isinstance(phonemizer, dict) else None
    if not isinstance(voice, str) or not text.is_voice_name(voice):
        raise ValueError(f"bittts.phonemizer voice {voice!r:.60} is not an espeak-ng voice name")
    if not isinstance(info["training"], dict):
        raise ValueError("bittts.training must be a JSON object")


class Synthesizer(Voice):
    """An exported BitTTS model, loaded for synthesis on torch: text -> phonemes (espeak-ng) -> ids -> waveform."""

    runtime = "torch"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        import ternq

        self.path = Path(path) if path is not None else default_model()
        info = read_model_metadata(self.path)
        self.cfg: BitTTSConfig = info["config"]
        self.training: dict[str, Any] = info["training"]
        self.init_front_end(info["symbols"], info["phonemizer"], int(info["audio"]["sample_rate"]),
                            self.cfg.vocoder.hop)
        skeleton = BitTTS.for_inference(self.cfg, quantize=False, device="meta")
        self.model: BitTTS = ternq.load_packed(self.path, skeleton).eval()

    def threads(self) -> int:
        return torch.get_num_threads()

    def _run(self, ids: list[int], duration_scale: float, max_frames: int) -> Tensor:
        wav, lengths = self.model.infer(torch.tensor(ids, dtype=torch.long), duration_scale=duration_scale,
                                        return_lengths=True, max_frames=max_frames)
        return wav[0, 0, : int(lengths[0])].float().contiguous()
