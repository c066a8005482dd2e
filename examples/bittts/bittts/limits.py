"""Size bounds of what `bittts` reads from users, in one place (the commands' help and the readers use them)."""
from __future__ import annotations

__all__ = ["MAX_SENTENCE_CHARS", "MAX_TEXT_BYTES", "MAX_DURATION_SCALE", "MAX_REQUEST_BYTES"]

MAX_SENTENCE_CHARS = 500  # one utterance (~26 s of speech, +0.5 GB peak RSS to synthesize; both grow with length)
MAX_TEXT_BYTES = 10_000_000  # a sentence file (10 MB: ~100,000 sentences)
MAX_DURATION_SCALE = 4.0  # `--duration-scale`: > 1 speaks slower; a sentence's audio and memory grow with it
MAX_REQUEST_BYTES = 10_000  # one `bittts serve` request body (~10 minutes of speech, about a minute of CPU)
