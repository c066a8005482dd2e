"""Datasets over a prepared corpus (``bittts prepare``), the batch collate, and the LJSpeech-layout importer.

Training code only ever sees the prepared layout; ``prepare_ljspeech`` converts a folder of real recordings
(``metadata.csv`` + ``wavs/``) into that same layout, so flite-built and recorded corpora train identically.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..machine import ensure_tools
from . import audio
from .corpus import Item, build_corpus

SPLITS = ("train", "val")


def normalize_pitch(f0: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """(log F0 - mean) / std on voiced frames (F0 > 0), 0 on unvoiced ones."""
    voiced = f0 > 0
    logf0 = torch.log(torch.where(voiced, f0, torch.ones_like(f0)))
    return torch.where(voiced, (logf0 - stats["mean"]) / stats["std"], torch.zeros_like(f0))


def normalize_energy(energy: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    """(energy - mean) / std."""
    return (energy - stats["mean"]) / stats["std"]


def load_meta(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a prepared corpus (written last, so it exists only for a complete corpus)."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a complete prepared corpus; run `bittts prepare --out {data_dir}`"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class TTSDataset(Dataset):
    """One split of a prepared corpus. Items are dicts: id, phoneme_ids [T_text], mel [80, T], pitch [T]
    and energy [T] (both normalized with the corpus statistics) and wav [T * hop]."""

    def __init__(self, data_dir: str | os.PathLike[str], split: str = "train", in_memory: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data_dir = Path(data_dir)
        self.meta = load_meta(data_dir)
        with open(self.data_dir / f"{split}.jsonl", encoding="utf-8") as f:
            self.entries: list[dict[str, Any]] = [json.loads(line) for line in f if line.strip()]
        self.in_memory = in_memory
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def lengths(self) -> list[int]:
        """Mel frames per item (for length-bucketing samplers) without loading any features."""
        return [int(e["n_frames"]) for e in self.entries]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            return self._cache[index]
        entry = self.entries[index]
        feats = torch.load(self.data_dir / "features" / f"{entry['id']}.pt", weights_only=True)
        item = {
            "id": entry["id"],
            "phoneme_ids": feats["phoneme_ids"],
            "mel": feats["mel"],
            "pitch": normalize_pitch(feats["pitch"], self.meta["pitch_stats"]),
            "energy": normalize_energy(feats["energy"], self.meta["energy_stats"]),
            "wav": feats["wav"],
        }
        if self.in_memory:
            self._cache[index] = item
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of ``TTSDataset`` items into the batch dict of the contract (zeros as padding)."""
    if not items:
        raise ValueError("collate() needs at least one item")
    bsz = len(items)
    text_lens = torch.tensor([len(it["phoneme_ids"]) for it in items], dtype=torch.long)
    mel_lens = torch.tensor([it["mel"].shape[1] for it in items], dtype=torch.long)
    n_mels = items[0]["mel"].shape[0]
    t_text, t_mel = int(text_lens.max()), int(mel_lens.max())
    wav_len = max(max(it["wav"].shape[-1] for it in items), t_mel * audio.HOP)
    batch = {
        "ids": [it["id"] for it in items],
        "phonemes": torch.zeros(bsz, t_text, dtype=torch.long),
        "phoneme_lengths": text_lens,
        "mel": torch.zeros(bsz, n_mels, t_mel),
        "mel_lengths": mel_lens,
        "pitch": torch.zeros(bsz, t_mel),
        "energy": torch.zeros(bsz, t_mel),
        "wav": torch.zeros(bsz, 1, wav_len),
    }
    for b, it in enumerate(items):
        n, t = int(text_lens[b]), int(mel_lens[b])
        batch["phonemes"][b, :n] = it["phoneme_ids"]
        batch["mel"][b, :, :t] = it["mel"]
        batch["pitch"][b, :t] = it["pitch"]
        batch["energy"][b, :t] = it["energy"]
        batch["wav"][b, 0, : it["wav"].shape[-1]] = it["wav"]
    return batch


# ------------------------------------------------------------------------------------------- LJSpeech

_SAFE_ID = re.compile(r"^[\w.\-]+$")


class LJSpeechDataset(Dataset):
    """A folder in the LJSpeech layout: ``metadata.csv`` (``id|text|normalized text``, no header, the third
    column optional) and ``wavs/<id>.wav`` at any sample rate. Items: id, text, wav (float, 16 kHz)."""

    def __init__(self, root: str | os.PathLike[str], limit: int | None = None) -> None:
        self.root = Path(root)
        meta = self.root / "metadata.csv"
        if not meta.exists():
            raise FileNotFoundError(f"{meta} not found: an LJSpeech-layout folder has metadata.csv and wavs/")
        self.entries: list[tuple[str, str, Path]] = []
        with open(meta, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("|")
                if len(fields) < 2 or not _SAFE_ID.match(fields[0]):
                    raise ValueError(f"{meta}:{number}: expected `id|text|normalized text` with a plain id, got {line!r}")
                text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
                self.entries.append((fields[0], text.strip(), self.root / "wavs" / f"{fields[0]}.wav"))
        if limit is not None:
            self.entries = self.entries[:limit]
        if not self.entries:
            raise ValueError(f"{meta} lists no utterances")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_id, text, path = self.entries[index]
        wav, rate = audio.read_wav(path)
        return {"id": item_id, "text": text, "wav": audio.resample(wav, rate, audio.SAMPLE_RATE)}


def prepare_ljspeech(root: str | os.PathLike[str], out_dir: str | os.PathLike[str], val_fraction: float = 0.05,
                     seed: int = 0, workers: int | None = None, limit: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Convert an LJSpeech-layout folder into the prepared layout (resampled to 16 kHz); returns meta."""
    ensure_tools({"espeak-ng": "espeak-ng"})
    dataset = LJSpeechDataset(root, limit=limit)
    missing = [str(p) for _, _, p in dataset.entries if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} wav file(s) listed in metadata.csv are missing, e.g. {missing[0]}")
    items = [Item(i, t, str(p)) for i, t, p in dataset.entries]
    root_abs = str(Path(root).resolve())
    return build_corpus(out_dir, items, source=f"ljspeech:{root_abs}", voice=Path(root_abs).name,
                        val_fraction=val_fraction, seed=seed, workers=workers, progress=progress,
                        config={"kind": "ljspeech", "root": root_abs})
