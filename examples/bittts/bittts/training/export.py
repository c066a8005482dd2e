"""Export: a training checkpoint -> the self-describing model file that `bittts.synthesis.synthesizer` reads,
and such a model file -> an ONNX voice that `bittts.synthesis.onnx_voice` reads without torch.

The files' formats (metadata keys, graph inputs and outputs, versions) are documented, and read, in
`bittts.synthesis.synthesizer` and `bittts.synthesis.onnx_voice`; this module is the one writer of both.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..config import BitTTSConfig, config_from_dict, config_to_dict
from ..data import audio, text
from ..model.acoustic import MDNDurationPredictor
from ..model.bittts import BitTTS
from ..synthesis import onnx_voice
from ..synthesis.synthesizer import MODEL_FORMAT, MODEL_VERSION, PHONEMIZER_VOICE, Synthesizer
from .checkpoints import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint

__all__ = ["export_model", "export_onnx_voice", "find_checkpoint", "VoiceGraph", "frame_tokens", "ONNX_OPSET"]

ONNX_OPSET = 18  # torch.export's exporter writes 18 and up (the length regulator needs 16: ScatterElements "add")


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


# ------------------------------------------------------------------------------------------------ ONNX


class VoiceGraph(nn.Module):
    """`BitTTS.infer` for one utterance as one traceable graph (`bittts.synthesis.onnx_voice` states its inputs
    and outputs): durations, pitch and energy as `AcousticModel.infer` predicts them ("mean" durations), the
    length regulator written with tensor ops only (its output length is data, not a Python int), the decoder
    and the vocoder on at most `max_frames` frames."""

    def __init__(self, model: BitTTS) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, duration_scale: Tensor, max_frames: Tensor) -> tuple[Tensor, Tensor]:
        ac = self.model.acoustic
        mask = torch.ones_like(ids, dtype=torch.float32).unsqueeze(1)  # one utterance: no padding
        h = ac.encoder(ac.enc_pos(ac.embed(ids).transpose(1, 2)), mask)
        log_d = MDNDurationPredictor.predict(ac.duration_predictor(h, mask), "mean")
        durations = torch.round(torch.exp(log_d) * duration_scale).clamp(1, ac.cfg.max_duration).long()[0]
        h = h + ac.pitch_embed(ac.pitch_predictor(h, mask)) + ac.energy_embed(ac.energy_predictor(h, mask))
        token, frames = frame_tokens(durations, max_frames)
        x = h.index_select(2, token)
        frame_mask = torch.ones_like(x[:, :1])
        x = ac.decoder(ac.dec_pos(ac.dec_in(x)) * frame_mask, frame_mask)
        return self.model.vocoder(x).reshape(-1), frames


def frame_tokens(durations: Tensor, max_frames: Tensor) -> tuple[Tensor, Tensor]:
    """The length regulator's gather index in ops a tracer records with a data-dependent length: for (T,)
    durations >= 1, the phoneme of each of the first min(sum, max_frames) frames (``np.repeat(arange(T),
    durations)[:max_frames]``), and the sum. Token of frame f = the runs ending at or before f: one count at each
    run's end, summed up (O(frames + T) memory, no (frames, T) comparison)."""
    ends = torch.cumsum(durations, 0)
    frames = ends[-1]
    n = torch.minimum(frames, max_frames)
    counts = torch.zeros_like(torch.arange(n + 1)).scatter_add(0, ends.clamp(max=n), torch.ones_like(ends))
    return torch.cumsum(counts, 0)[:-1], frames


def _export_graph(model: BitTTS, ids: list[int], out: str | os.PathLike[str]) -> bytes:
    """Write `VoiceGraph(model)` to `out` with `ternq.export_onnx` (the packed codes stay packed, decoded in the
    graph), traced on `ids` with dynamic text and audio lengths; returns the file's bytes.

    torch.export (``dynamo=True``): the frame count is data (the predicted durations), which it records as a
    dynamic size downstream of the length regulator; the phoneme count is bounded well above
    `bittts.limits.MAX_SENTENCE_PHONEMES`."""
    import ternq

    example = (torch.tensor([ids], dtype=torch.long), torch.tensor(1.0), torch.tensor(1_000_000))
    phonemes = torch.export.Dim("phonemes", min=1, max=4096)
    ternq.export_onnx(VoiceGraph(model), example, out, input_names=list(onnx_voice.INPUTS),
                      output_names=list(onnx_voice.OUTPUTS), opset_version=ONNX_OPSET,
                      dynamic_shapes=({1: phonemes}, None, None))
    return Path(out).read_bytes()


def _check_voice_paths(out: str | os.PathLike[str]) -> None:
    """Before the export: both files of the voice can be written as files. A voice is a pair read together (the
    JSON names the ONNX file's SHA-256), so a device or a FIFO is no place for it (``-o /dev/null`` would put
    ``/dev/null.json`` into /dev), and a sidecar name past the file system's limit would fail after the ONNX file
    was written, leaving a pair that does not match."""
    for path in (Path(out), onnx_voice.config_path(out)):
        if len(os.fsencode(path.name)) > 255:
            raise ValueError(f"{path}: the file name has {len(os.fsencode(path.name))} bytes, more than the 255 a "
                             "file system allows (an ONNX voice also writes VOICE.onnx.json): choose a shorter name")
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue  # a new file (or an error the write reports)
        if not stat.S_ISREG(mode):
            raise ValueError(f"{path}: is not a regular file; an ONNX voice is two files, VOICE.onnx and "
                             "VOICE.onnx.json beside it: give a file name, e.g. -o voice.onnx")


def export_onnx_voice(model: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the exported BitTTS model `model` (a packed safetensors file) as an ONNX voice: `out` (VOICE.onnx) and
    its JSON (`onnx_voice.config_path(out)`), both atomically. Returns a summary: path, config, bytes, source
    bytes."""
    _check_voice_paths(out)
    synth = Synthesizer(model)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    data = _export_graph(synth.model, synth.phonemes_to_ids("ðə bˈɜːtʃ kənˈuː slˈɪd."), out)
    config = {
        "format": onnx_voice.ONNX_FORMAT,
        "version": onnx_voice.ONNX_VERSION,
        "onnx": {"file": Path(out).name, "sha256": hashlib.sha256(data).hexdigest(), "opset": ONNX_OPSET},
        "audio": {"sample_rate": synth.sample_rate, "hop": synth.hop},
        "symbols": synth.symbols,
        "n_symbols": synth.cfg.acoustic.n_symbols,
        "phonemizer": {"backend": "espeak-ng", "voice": synth.phonemizer.voice,
                       "normalizer": "bittts.data.text.normalize"},
        "source": {"file": Path(model).name, "config": config_to_dict(synth.cfg), "training": synth.training},
    }
    atomic_write(onnx_voice.config_path(out), (json.dumps(config, ensure_ascii=False, indent=1) + "\n").encode())
    return {"path": os.fspath(out), "config": os.fspath(onnx_voice.config_path(out)), "bytes": len(data),
            "source_bytes": os.path.getsize(model)}
