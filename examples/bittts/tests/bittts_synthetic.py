"""A learnable synthetic TTS corpus for fast tests: every "phoneme" is a tone (its own frequency and loudness),
held for a random number of frames. Items and the on-disk layout follow the prepared-corpus contract."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from bittts.data import audio
from torch.utils.data import Dataset

N_SYMBOLS = 12  # ids 1..11 are tones, 0 is padding


def _tone(token: int) -> tuple[float, float]:
    """(frequency Hz, amplitude); token 1 is silence."""
    return (0.0, 0.0) if token == 1 else (110.0 + 35.0 * token, 0.15 + 0.03 * (token % 5))


def make_item(index: int, seed: int = 0, text_len: tuple[int, int] = (4, 8), dur: tuple[int, int] = (2, 6),
              fixed: tuple[int, int] | None = None) -> dict[str, Any]:
    """Raw features (pitch in Hz, energy unnormalized). `fixed` = (T_text, duration) for equal-length items."""
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    n = fixed[0] if fixed else int(torch.randint(text_len[0], text_len[1] + 1, (1,), generator=g))
    ids = torch.randint(1, N_SYMBOLS, (n,), generator=g)
    durs = (torch.full((n,), fixed[1]) if fixed
            else torch.randint(dur[0], dur[1] + 1, (n,), generator=g))
    f0 = torch.cat([torch.full((int(d) * audio.HOP,), _tone(int(t))[0]) for t, d in zip(ids, durs)])
    amp = torch.cat([torch.full((int(d) * audio.HOP,), _tone(int(t))[1]) for t, d in zip(ids, durs)])
    phase = 2 * math.pi * torch.cumsum(f0, 0) / audio.SAMPLE_RATE
    wav = (amp * torch.sin(phase)).float()
    frames = int(durs.sum())
    pitch = torch.cat([torch.full((int(d),), _tone(int(t))[0]) for t, d in zip(ids, durs)])
    return {"id": f"syn{index:05d}", "phoneme_ids": ids, "mel": audio.log_mel(wav)[:, :frames],
            "pitch": pitch, "energy": audio.energy(wav)[:frames], "wav": wav}


def stats(items: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    logf0 = torch.cat([it["pitch"][it["pitch"] > 0].log() for it in items])
    energy = torch.cat([it["energy"] for it in items])
    return ({"mean": float(logf0.mean()), "std": float(logf0.std()) + 1e-3},
            {"mean": float(energy.mean()), "std": float(energy.std()) + 1e-3})


class SyntheticTTS(Dataset):
    """In-memory dataset with TTSDataset's item format (pitch and energy normalized)."""

    def __init__(self, n: int, seed: int = 0, **kwargs: Any) -> None:
        raw = [make_item(i, seed, **kwargs) for i in range(n)]
        ps, es = stats(raw)
        self.items = []
        for it in raw:
            voiced = it["pitch"] > 0
            pitch = torch.where(voiced, (it["pitch"].clamp_min(1).log() - ps["mean"]) / ps["std"], torch.zeros(()))
            self.items.append({**it, "pitch": pitch, "energy": (it["energy"] - es["mean"]) / es["std"]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def write_corpus(root: str | Path, n_train: int, n_val: int = 1, seed: int = 0, **kwargs: Any) -> Path:
    """Write a prepared corpus (meta.json, train/val.jsonl, features/*.pt) that bittts.data.dataset.TTSDataset reads."""
    root = Path(root)
    (root / "features").mkdir(parents=True, exist_ok=True)
    raw = [make_item(i, seed, **kwargs) for i in range(n_train + n_val)]
    ps, es = stats(raw)
    for split, items in (("train", raw[:n_train]), ("val", raw[n_train:])):
        with open(root / f"{split}.jsonl", "w") as f:
            for it in items:
                torch.save({k: it[k] for k in ("phoneme_ids", "mel", "pitch", "energy", "wav")},
                           root / "features" / f"{it['id']}.pt")
                f.write(json.dumps({"id": it["id"], "text": "synthetic", "phonemes": "", "wav": "",
                                    "n_frames": int(it["mel"].shape[1])}) + "\n")
    meta = {"version": 1, "sample_rate": audio.SAMPLE_RATE, "hop": audio.HOP, "n_mels": audio.N_MELS,
            "symbols": ["<pad>"] + [f"t{i}" for i in range(1, N_SYMBOLS)], "source": "synthetic tones",
            "voice": "synthetic", "splits": {"train": n_train, "val": n_val}, "pitch_stats": ps, "energy_stats": es}
    (root / "meta.json").write_text(json.dumps(meta))
    return root
