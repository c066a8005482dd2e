"""What every BitTTS runtime shares, torch-free: the text front end (espeak-ng phonemes -> the model's symbol
ids), the bounds of one utterance, and `Synthesis`, what speaking one gives.

Two runtimes subclass `Voice`: `bittts.synthesis.synthesizer.Synthesizer` (the packed safetensors file on torch
and ternq's kernels) and `bittts.synthesis.onnx_voice.OnnxSynthesizer` (an ONNX export on onnxruntime and numpy,
no torch). This module imports neither, so that the ONNX path never loads torch; `bittts.commands.load_voice`
picks one by the file's name.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from ..data import text
from ..limits import MAX_SENTENCE_PHONEMES, MAX_SENTENCE_SECONDS, LimitError

__all__ = ["PHONEMIZER_VOICE", "SAMPLE_RATES", "Synthesis", "Voice"]

PHONEMIZER_VOICE = "en-us"  # bittts.data.text.Phonemizer's default, the voice every corpus is prepared with
SAMPLE_RATES = (1_000, 192_000)  # the sample rates a model file may claim (Hz)


@dataclasses.dataclass
class Synthesis:
    """One synthesized utterance: the waveform (1-D float in [-1, 1]: a torch Tensor from `Synthesizer`, a numpy
    array from `OnnxSynthesizer`) and timings."""

    wav: Any
    sample_rate: int
    seconds: float  # wall time of the model (text front end excluded)
    phonemes: str

    @property
    def duration(self) -> float:
        return self.wav.shape[-1] / self.sample_rate

    @property
    def rtf(self) -> float:
        """Real-time factor: model seconds per second of audio (< 1 is faster than real time)."""
        return self.seconds / max(self.duration, 1e-9)


class Voice:
    """Text -> phonemes (espeak-ng) -> ids -> waveform, bounded. A subclass sets `symbols`, `sample_rate`, `hop`
    and `phonemizer` (`init_front_end`) and runs its model in `_run`."""

    runtime: str  # what runs the model: "torch", "onnxruntime"
    symbols: list[str]
    sample_rate: int
    hop: int
    phonemizer: text.Phonemizer

    def threads(self) -> int | None:
        """The CPU threads the model runs on (None: the runtime's default)."""
        raise NotImplementedError

    def init_front_end(self, symbols: list[str], phonemizer: dict[str, Any], sample_rate: int, hop: int) -> None:
        self.symbols, self.sample_rate, self.hop = symbols, sample_rate, hop
        self.phonemizer = text.Phonemizer(voice=phonemizer.get("voice", PHONEMIZER_VOICE))
        self._ids = {s: i for i, s in enumerate(symbols)}
        self._unk = self._ids.get(text.UNK)

    def phonemes_to_ids(self, phonemes: str) -> list[int]:
        """One id per character with the model's own symbol table; unknown characters become <unk> (or are
        dropped if the table has none)."""
        ids = [self._ids.get(c, self._unk) for c in phonemes]
        return [i for i in ids if i is not None]

    def text_to_ids(self, sentence: str) -> tuple[str, list[int]]:
        phonemes = self.phonemizer(sentence)
        return phonemes, self.phonemes_to_ids(phonemes)

    def synthesize(self, sentence: str, duration_scale: float = 1.0) -> Synthesis:
        """Speak one sentence. Raises ValueError if nothing in it can be spoken, `bittts.limits.LimitError` if it
        gives more than `MAX_SENTENCE_PHONEMES` phonemes or `MAX_SENTENCE_SECONDS` of audio."""
        phonemes, ids = self.text_to_ids(sentence)
        return self.synthesize_ids(ids, phonemes, duration_scale)

    def synthesize_ids(self, ids: Sequence[int], phonemes: str = "", duration_scale: float = 1.0,
                       max_seconds: float = MAX_SENTENCE_SECONDS) -> Synthesis:
        """Speak phoneme ids (`text_to_ids`); timed without the text front end. The work is bounded before it
        starts: at most `MAX_SENTENCE_PHONEMES` ids, and at most `max_seconds` (<= `MAX_SENTENCE_SECONDS`) of
        audio, checked on the predicted durations (`bittts.limits.LimitError`)."""
        if not ids:
            raise ValueError(f"nothing to speak: the text gave no phonemes ({phonemes!r})")
        if len(ids) > MAX_SENTENCE_PHONEMES:
            raise LimitError(f"a sentence gives {len(ids):,} phonemes, more than the {MAX_SENTENCE_PHONEMES:,} one "
                             "utterance may have (bittts.limits.MAX_SENTENCE_PHONEMES): split it into shorter "
                             "sentences (numbers and symbols are spoken as words, and their words count)")
        if not duration_scale > 0:
            raise ValueError(f"duration_scale must be > 0, got {duration_scale}")
        max_seconds = min(max_seconds, MAX_SENTENCE_SECONDS)
        start = time.perf_counter()
        try:
            wav = self._run(list(ids), duration_scale, self.frames(max_seconds))
        except LimitError:
            raise LimitError(f"a sentence would give more than {max_seconds:g} s of audio, the most one utterance "
                             "may have (bittts.limits.MAX_SENTENCE_SECONDS): split it into shorter sentences or "
                             "lower the duration scale") from None
        return Synthesis(wav, self.sample_rate, time.perf_counter() - start, phonemes)

    def _run(self, ids: list[int], duration_scale: float, max_frames: int) -> Any:
        """The model: the 1-D waveform of `ids`; `LimitError` if it would be more than `max_frames` frames long."""
        raise NotImplementedError

    def frames(self, seconds: float) -> int:
        """The model's frames (vocoder hops) in `seconds` of audio, rounded down."""
        return max(0, int(seconds * self.sample_rate) // self.hop)
