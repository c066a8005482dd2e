"""Size bounds of what `bittts` reads from users, in one place (the commands' help and the readers use them)."""
from __future__ import annotations

__all__ = ["MAX_SENTENCE_CHARS", "MAX_TEXT_BYTES", "MAX_DURATION_SCALE"]

MAX_SENTENCE_CHARS = 1000  # one utterance: its audio, and the memory to synthesize it, grow with its length
MAX_TEXT_BYTES = 10_000_000  # a sentence file (10 MB: ~100,000 sentences)
MAX_DURATION_SCALE = 10.0  # `--duration-scale`: > 1 speaks slower; the audio (and memory) of a sentence grows with it
