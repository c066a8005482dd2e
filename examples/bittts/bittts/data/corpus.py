"""Build a prepared training corpus: text -> phonemes (espeak-ng) -> audio (a teacher voice or wav files) -> features.

``prepare_corpus`` synthesizes the generated sentences of ``bittts.data.sentences`` with a teacher voice, fully
offline: a flite voice (deterministic) or Piper's joe (``bittts.data.piper``, sampled); ``build_corpus`` is the shared pipeline that ``bittts.data.dataset.prepare_ljspeech``
also uses for recorded speech. The layout it writes is described in the package README / contract:
``meta.json``, ``train.jsonl``, ``val.jsonl``, ``wavs/<id>.wav`` and ``features/<id>.pt``.

The build is resumable: an utterance whose ``features/<id>.pt`` exists is not synthesized again (every file
is written atomically, so an existing file is a complete one), and ``meta.json`` is written last, so its
presence means the corpus is complete. ``prepare.json`` records what the features depend on, and a rerun
with different settings into the same directory is refused instead of mixing two corpora.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ternq.atomic import atomic_write

from ..atomic import atomic_torch_save
from ..machine import ensure_tools
from . import audio, text
from .piper import VOICE as PIPER_VOICE
from .piper import synthesize_piper
from .sentences import generate_sentences

FEATURE_VERSION = 1
META_VERSION = 1
PIPER_SOURCE = "piper:joe"  # an Item's audio when Piper's joe voice speaks it


@dataclass(frozen=True)
class Item:
    """One utterance to prepare; ``audio`` is ``"flite:<voice>"``, ``"piper:joe"`` or the path of a wav file."""

    id: str
    text: str
    audio: str


# ------------------------------------------------------------------------------------------------ flite


def flite_voices() -> list[str]:
    """Voices compiled into the installed flite (``flite -lv``)."""
    exe = shutil.which("flite")
    if exe is None:
        raise RuntimeError("flite is not installed; run `sudo apt-get install -y flite` (or `bittts prepare` as root)")
    out = subprocess.run([exe, "-lv"], capture_output=True, text=True, check=True).stdout
    return out.split(":", 1)[-1].split()


def synthesize_flite(sentence: str, voice: str = "slt") -> tuple[torch.Tensor, int]:
    """Speak ``sentence`` with flite; returns (float waveform, sample rate). Deterministic for a given flite."""
    with tempfile.TemporaryDirectory(prefix="bittts-flite-") as tmp:
        path = os.path.join(tmp, "out.wav")
        run_flite(sentence, voice, path)
        return audio.read_wav(path)


def run_flite(sentence: str, voice: str, path: str) -> None:
    """The flite process alone: speak ``sentence`` into the WAV file ``path`` (what `bittts evaluate` times)."""
    exe = shutil.which("flite")
    if exe is None:
        raise RuntimeError("flite is not installed; run `sudo apt-get install -y flite` (or `bittts prepare` as root)")
    result = subprocess.run([exe, "-voice", voice, "-t", sentence, "-o", path], capture_output=True, text=True)
    if result.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"flite failed on {sentence!r} with voice {voice!r}: {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------------- helpers


def _write_text_atomic(path: Path, content: str) -> None:
    atomic_write(path, content.encode("utf-8"))


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core does the parallelism


def _process(job: tuple[str, str, str, list[int], str]) -> tuple[str, int]:
    """Synthesize or load one utterance, compute its features, write ``wavs/<id>.wav`` and ``features/<id>.pt``."""
    item_id, spoken, source, phoneme_ids, out_dir = job
    if source.startswith("flite:"):
        wav, rate = synthesize_flite(spoken, source.split(":", 1)[1])
    elif source == PIPER_SOURCE:
        wav, rate = synthesize_piper(spoken)
    else:
        if not os.path.exists(source):
            raise FileNotFoundError(f"audio file for {item_id!r} not found: {source}")
        wav, rate = audio.read_wav(source)
    if wav.numel() == 0:
        raise ValueError(f"audio for {item_id!r} is empty ({source})")
    feats = audio.extract_features(wav, rate)
    audio.write_wav(os.path.join(out_dir, "wavs", f"{item_id}.wav"), feats["wav"])
    feats["phoneme_ids"] = torch.tensor(phoneme_ids, dtype=torch.long)
    atomic_torch_save(feats, os.path.join(out_dir, "features", f"{item_id}.pt"))
    return item_id, int(feats["mel"].shape[1])


def split_ids(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split; at least one validation item when ``val_fraction > 0``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 or len(ids) < 2 else max(1, round(len(ids) * val_fraction))
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    val = set(shuffled[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


class _Moments:
    """Streaming mean/std/min/max in float64."""

    def __init__(self) -> None:
        self.n, self.total, self.total_sq = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, x: torch.Tensor) -> None:
        if x.numel():
            x = x.double()
            self.n += x.numel()
            self.total += float(x.sum())
            self.total_sq += float(x.pow(2).sum())
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    def stats(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no frames to compute statistics from (all training utterances unvoiced or empty?)")
        mean = self.total / self.n
        std = max(math.sqrt(max(self.total_sq / self.n - mean * mean, 0.0)), 1e-5)
        # min/max of the *normalized* values, e.g. for pitch/energy quantization bins
        return {"mean": mean, "std": std, "min": (self.lo - mean) / std, "max": (self.hi - mean) / std}


def _check_config(out: Path, config: dict[str, Any]) -> None:
    path = out / "prepare.json"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != config:
            raise ValueError(
                f"{out} was prepared with {old}, not {config}; use another --out directory or delete {out}"
            )
    else:
        _write_text_atomic(path, json.dumps(config, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- pipeline


def build_corpus(out_dir: str | os.PathLike[str], items: Sequence[Item], *, source: str, voice: str,
                 config: dict[str, Any], val_fraction: float = 0.05, seed: int = 0, workers: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Phonemize, synthesize/load and featurize ``items`` into ``out_dir``; returns the meta dict it wrote."""
    if not items:
        raise ValueError("no utterances to prepare")
    if len({it.id for it in items}) != len(items):
        raise ValueError("utterance ids must be unique")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    for sub in ("wavs", "features"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _check_config(out, {"feature_version": FEATURE_VERSION, "symbols": len(text.SYMBOLS), **config})
    workers = max(1, workers or os.cpu_count() or 1)
    (out / "meta.json").unlink(missing_ok=True)  # "meta.json exists" must keep meaning "this build is complete"

    phonemizer = text.Phonemizer(cache_path=out / "phonemes.json")
    normalized = [text.normalize(it.text) for it in items]
    phonemes = phonemizer.batch(normalized, workers=workers)
    phonemizer.save()
    keep = [i for i, p in enumerate(phonemes) if p]
    skipped = [items[i].id for i in range(len(items)) if not phonemes[i]]
    if skipped:
        print(f"skipping {len(skipped)} utterance(s) with no speakable text: {', '.join(skipped[:10])}")
    jobs = [(items[i].id, normalized[i], items[i].audio, text.phonemes_to_ids(phonemes[i]), str(out))
            for i in keep if not (out / "features" / f"{items[i].id}.pt").exists()]
    if len(jobs) < len(keep):
        print(f"resuming: {len(keep) - len(jobs)} of {len(keep)} utterances already prepared")

    bar = tqdm(total=len(jobs), desc="featurizing" if os.path.exists(items[0].audio) else "synthesizing",
               unit="utt", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            _process(job)
            bar.update()
    else:
        # fork on Linux: workers start in milliseconds instead of re-importing torch (seconds each), and,
        # as with torch's DataLoader workers, they only run single-threaded torch ops
        context = get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = {pool.submit(_process, job): job[0] for job in jobs}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise RuntimeError(f"preparing {futures[fut]!r} failed: {fut.exception()}") \
                            from fut.exception()
                    bar.update()
    bar.close()

    ids = [items[i].id for i in keep]
    train_ids, val_ids = split_ids(ids, val_fraction, seed)
    train_set = set(train_ids)
    pitch_m, energy_m = _Moments(), _Moments()
    frames: dict[str, int] = {}
    for item_id in tqdm(ids, desc="statistics", unit="utt", disable=not progress):
        feats = torch.load(out / "features" / f"{item_id}.pt", weights_only=True)
        frames[item_id] = int(feats["mel"].shape[1])
        if item_id in train_set:
            f0 = feats["pitch"]
            pitch_m.add(torch.log(f0[f0 > 0]))
            energy_m.add(feats["energy"])

    by_id = {items[i].id: (items[i], normalized[i], phonemes[i]) for i in keep}
    for name, split in (("train", train_ids), ("val", val_ids)):
        lines = []
        for item_id in split:
            item, norm, phon = by_id[item_id]
            lines.append(json.dumps({"id": item_id, "text": item.text, "phonemes": phon, "wav": f"wavs/{item_id}.wav",
                                     "normalized": norm, "n_frames": frames[item_id]}, ensure_ascii=False))
        _write_text_atomic(out / f"{name}.jsonl", "".join(line + "\n" for line in lines))

    seconds = sum(frames.values()) * audio.HOP / audio.SAMPLE_RATE
    meta = {
        "version": META_VERSION, "sample_rate": audio.SAMPLE_RATE, "hop": audio.HOP, "n_mels": audio.N_MELS,
        "n_fft": audio.N_FFT, "win": audio.WIN, "fmin": audio.FMIN, "fmax": audio.FMAX,
        "symbols": text.SYMBOLS, "source": source, "voice": voice,
        "splits": {"train": len(train_ids), "val": len(val_ids)},
        "pitch_stats": pitch_m.stats(), "energy_stats": energy_m.stats(),
        "hours": seconds / 3600, "phonemizer": text.espeak_version(), "seed": seed,
    }
    _write_text_atomic(out / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return meta


def prepare_corpus(out_dir: str | os.PathLike[str], n_sentences: int = 3000, voice: str = "slt",
                   val_fraction: float = 0.05, seed: int = 0, workers: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Generate ``n_sentences`` sentences, speak them with ``voice`` (a flite voice, or ``"piper-joe"``: Piper's
    en_US-joe-medium from the `peer` extra, resampled from 22.05 to 16 kHz) and build the corpus in ``out_dir``."""
    if n_sentences < 1:
        raise ValueError(f"--sentences must be >= 1, got {n_sentences}")
    ensure_tools()
    if voice == PIPER_VOICE:
        from ..extras import require

        require("peer", f"--voice {PIPER_VOICE}")  # here, before any work, not in the first worker
        audio_source, kind = PIPER_SOURCE, "piper"
    else:
        voices = flite_voices()
        if voice not in voices:
            raise ValueError(f"no voice {voice!r}: flite has {', '.join(voices)}; or {PIPER_VOICE} (Piper)")
        audio_source, kind = f"flite:{voice}", "flite"
    sentences = generate_sentences(n_sentences, seed)
    items = [Item(f"s{i + 1:05d}", s, audio_source) for i, s in enumerate(sentences)]
    source = f"bittts.sentences generator (seed {seed}), {kind} voice {voice}"
    return build_corpus(out_dir, items, source=source, voice=voice, val_fraction=val_fraction, seed=seed,
                        workers=workers, progress=progress,
                        config={"kind": kind, "voice": voice, "sentence_seed": seed})
