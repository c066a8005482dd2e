"""Bounds of what `bittts` reads from users and of the work one input may cause, in one place (the commands' help,
the readers, `bittts.synthesis.synthesizer`, `bittts.synthesis.long_text` and `bittts.synthesis.server` use them;
docs/bittts.md lists them).

Characters are not work: "777777777777777" is 15 characters and ~190 phonemes, "¼" says "one quarter". So text
is bounded in characters where it is read, and what it turns into is bounded again in phonemes (the acoustic
model's input) and in seconds of audio (the vocoder's output, which sets the time and memory of a synthesis).
"""
from __future__ import annotations

__all__ = ["LimitError", "MAX_SENTENCE_CHARS", "MAX_TEXT_BYTES", "MAX_DURATION_SCALE", "MAX_REQUEST_BYTES",
           "MAX_SENTENCE_PHONEMES", "MAX_SENTENCE_SECONDS", "MAX_REQUEST_PHONEMES", "MAX_REQUEST_SECONDS",
           "MAX_CONNECTIONS", "MAX_HEADER_BYTES", "READ_SECONDS", "REQUEST_SECONDS"]

# --- what is read
MAX_SENTENCE_CHARS = 500  # one utterance (~26 s of speech, +0.5 GB peak RSS to synthesize; both grow with length)
MAX_TEXT_BYTES = 10_000_000  # a sentence file (10 MB: ~100,000 sentences)
MAX_DURATION_SCALE = 4.0  # `--duration-scale`: > 1 speaks slower; a sentence's audio and memory grow with it
MAX_REQUEST_BYTES = 10_000  # one `bittts serve` request body (~10 minutes of speech, about a minute of CPU)

# --- the work one utterance may cause (every synthesis: the library, `bittts synthesize`, `bittts serve`)
MAX_SENTENCE_PHONEMES = 800  # 500 characters of English give ~525 (Harvard sentences: 1.04 per character)
MAX_SENTENCE_SECONDS = 150.0  # of audio: 500 characters at duration scale 4 give ~100 s (0.85 GB peak RSS)

# --- the work one `bittts serve` request may cause (and `bittts.synthesis.long_text.speak(max_phonemes=,
# max_seconds=)`)
MAX_REQUEST_PHONEMES = 12_000  # MAX_REQUEST_BYTES of English give ~10,400
MAX_REQUEST_SECONDS = 900.0  # of audio (a 29 MB WAV): MAX_REQUEST_BYTES of English give ~8 minutes at scale 1

# --- `bittts serve` connections
MAX_CONNECTIONS = 256  # open at once (also kept below the open-files limit); beyond it the slowest reader goes
MAX_HEADER_BYTES = 16_384  # the request line and headers of one request
READ_SECONDS = 30.0  # for the whole request to arrive (line, headers and body), not per read
REQUEST_SECONDS = 300.0  # for a whole request, from its first byte to the answer's last; then its work stops


class LimitError(ValueError):
    """Input beyond one of the bounds above; the message names the bound and what to do instead."""
