"""Text of any length to speech in bounded memory: split into sentences, speak them one at a time, and write the
audio as it comes (a WAV file, WAV on standard output, or a raw PCM stream).

The model's memory grows with the utterance (`bittts.limits.MAX_SENTENCE_CHARS`), so long text is never handed
to it whole: `split_sentences` cuts a text at line breaks and sentence ends (and, for a sentence longer than one
utterance, at a comma or a space), `read_sentences_stream` does the same on a byte stream as it arrives (so
`bittts synthesize` can speak standard input line by line, as Piper does), and `speak` yields 16-bit PCM one
sentence at a time. The writers below never hold more than one sentence's audio in memory.
"""
from __future__ import annotations

import codecs
import contextlib
import itertools
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ..atomic import atomic_open
from ..data.text import abbreviation_before
from ..limits import MAX_SENTENCE_CHARS, MAX_SENTENCE_SECONDS, MAX_TEXT_BYTES, LimitError

if TYPE_CHECKING:
    from .voice import Synthesis, Voice

__all__ = ["SENTENCE_PAUSE", "split_sentences", "read_sentences_stream", "check_sentence", "read_sentences", "pcm16", "speak", "count_phonemes",
           "wav_header", "write_wav_stream", "spooled_wav", "write_wav_to_stream"]

SENTENCE_PAUSE = 0.2  # seconds of silence between two sentences (Piper's default sentence_silence)
_READ_CHUNK = 1 << 16  # bytes read from a stream at a time
_MAX_CACHED_PHONEMES = 10_000  # sentences the phonemizer may remember while a long text is spoken
_MAX_WAV_DATA = 0xFFFFFFFF - 36  # a RIFF chunk size is 32 bits: ~37 hours of 16 kHz 16-bit mono

# a sentence end: terminal punctuation, closing quotes/brackets, then whitespace (or the end of the text)
_SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u2019\u201d)\]]*(?=\s|$)")
_SOFT_BREAK = re.compile(r"[,;:\u2013\u2014](?=\s)")


def _fit(piece: str, max_chars: int) -> Iterator[str]:
    """`piece` stripped, cut into parts of at most `max_chars` characters: after the last comma (semicolon, colon,
    dash) that keeps the part short enough, else at the last space, else (one giant word) anywhere. Walks an
    index instead of re-slicing the rest, so a huge piece costs linear time."""
    piece = piece.rstrip()
    start = len(piece) - len(piece.lstrip())
    while len(piece) - start > max_chars:
        window = piece[start:start + max_chars + 1]
        soft = [m.end() for m in _SOFT_BREAK.finditer(window) if m.end() <= max_chars]
        cut = soft[-1] if soft else max((i for i, c in enumerate(window) if c.isspace()), default=0)
        if cut <= 0:
            cut = max_chars
        yield window[:cut].rstrip()
        start += cut
        while piece[start].isspace():  # the piece is stripped at its end: a non-space follows
            start += 1
    if start < len(piece):
        yield piece[start:]


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> Iterator[str]:
    """The sentences of `text`, in order, stripped and non-empty, each at most `max_chars` characters.

    A line break always ends a sentence (a line is one utterance, as with `--text-file`); within a line a
    sentence ends at ``.``, ``!``, ``?`` or ``…`` followed by whitespace, except after an abbreviation the text
    normalizer expands ("Dr.", "e.g."). Only whitespace is dropped: the sentences hold every other character of
    `text` in its order."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    for line in text.splitlines():
        start = 0
        for m in _SENTENCE_END.finditer(line):
            if m.group() == "." and abbreviation_before(line, m.start()):
                continue
            yield from _fit(line[start:m.end()], max_chars)
            start = m.end()
        yield from _fit(line[start:], max_chars)


def read_sentences_stream(stream: BinaryIO, name: str = "standard input",
                          max_chars: int = MAX_SENTENCE_CHARS) -> Iterator[str]:
    """`split_sentences` over a UTF-8 byte stream, yielding each line's sentences as soon as the line is complete
    (an interactive pipe is spoken line by line). At most ~64 KB plus a few sentences are held, whatever the
    stream's length: a line longer than that is spoken sentence by sentence before its end arrives."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = getattr(stream, "read1", stream.read)  # read1: what is there now, without waiting for a full chunk
    pending = ""
    offset = 0
    while True:
        chunk = read(_READ_CHUNK)
        try:
            pending += decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} is not UTF-8 text (byte {offset + max(e.start, 0)}): give UTF-8 text") from None
        offset += len(chunk)
        if not chunk:
            yield from split_sentences(pending, max_chars)
            return
        cut = pending.rfind("\n") + 1
        if cut:
            yield from split_sentences(pending[:cut], max_chars)
            pending = pending[cut:]
        if len(pending) > 4 * max_chars:  # a long line: all but its last (perhaps unfinished) sentence
            *done, last = list(split_sentences(pending, max_chars)) or [""]
            yield from done
            pending = last


def check_sentence(sentence: str, what: str) -> str:
    """`sentence` stripped, if it is non-empty and at most MAX_SENTENCE_CHARS long; ValueError otherwise."""
    text = sentence.strip()
    if not text:
        raise ValueError(f"{what} is empty: give a sentence to speak")
    if len(text) > MAX_SENTENCE_CHARS:
        raise ValueError(f"{what} has {len(text):,} characters, more than the {MAX_SENTENCE_CHARS:,} of one "
                         "utterance: split it into sentences (one per line with --text-file)")
    return text


def read_sentences(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Non-empty lines of a UTF-8 text file (the first `limit`), each checked by `check_sentence`.

    Reads at most MAX_TEXT_BYTES and one line of at most ~4 x MAX_SENTENCE_CHARS bytes at a time, so memory is
    bounded whatever the file is (a device such as /dev/zero, a huge or binary file)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ValueError(f"{name} is a directory: give a text file with one sentence per line")
    sentences: list[str] = []
    total, line_bytes = 0, 4 * MAX_SENTENCE_CHARS + 8  # UTF-8: at most 4 bytes per character, and the newline
    with open(name, "rb") as f:
        for number in itertools.count(1):
            raw = f.readline(line_bytes)
            if not raw:
                break
            total += len(raw)
            if total > MAX_TEXT_BYTES:
                raise ValueError(f"{name} is larger than {MAX_TEXT_BYTES:,} bytes: split it into smaller files")
            if len(raw) == line_bytes and not raw.endswith(b"\n"):
                raise ValueError(f"{name}: line {number} is longer than {MAX_SENTENCE_CHARS:,} characters (one "
                                 "utterance): split it into sentences")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}: line {number} is not UTF-8 text (byte {e.start}): give a text file") from None
            if line.strip():
                sentences.append(check_sentence(line, f"{name}: line {number}"))
                if limit is not None and len(sentences) == limit:
                    break
    if not sentences:
        raise ValueError(f"{name} has no non-empty line to synthesize")
    return sentences


def pcm16(wav: Any) -> bytes:
    """Little-endian 16-bit PCM of a float waveform in [-1, 1) (clipped; `bittts.data.audio.write_wav`'s scaling):
    a numpy array, or a CPU torch tensor (this module never imports torch)."""
    data = wav.detach().numpy() if hasattr(wav, "detach") else wav
    data = np.asarray(data, dtype=np.float64).reshape(-1)
    return np.clip(np.round(data * 32768.0), -32768, 32767).astype("<i2").tobytes()


def speak(synth: Voice, sentences: Iterable[str], duration_scale: float = 1.0,
          on_sentence: Callable[[str, Synthesis], None] | None = None, *, max_phonemes: int | None = None,
          max_seconds: float | None = None) -> Iterator[bytes]:
    """16-bit PCM of each sentence in turn (`synth` a `bittts.synthesis.voice.Voice`: the torch or the ONNX
    runtime), `SENTENCE_PAUSE` of silence before every sentence but the first. A sentence that gives no phonemes
    ("...") is skipped; ValueError if none of them could be spoken. `on_sentence(sentence, synthesis)` is told of each one.

    Each sentence is bounded by `Voice.synthesize_ids` (`bittts.limits.MAX_SENTENCE_PHONEMES` and
    `MAX_SENTENCE_SECONDS`); `max_phonemes` and `max_seconds` (e.g. `MAX_REQUEST_PHONEMES`, `MAX_REQUEST_SECONDS`)
    bound all of them together: `bittts.limits.LimitError` before the sentence that would pass either is
    synthesized (its audio is bounded through its predicted durations, before the vocoder runs)."""
    pause = bytes(2 * round(SENTENCE_PAUSE * synth.sample_rate))
    first, last_error = True, None
    phonemes_left = math.inf if max_phonemes is None else max_phonemes
    seconds_left = math.inf if max_seconds is None else max_seconds
    for sentence in sentences:
        phonemes, ids = synth.text_to_ids(sentence)
        if not ids:
            last_error = f"nothing to speak: the text gave no phonemes ({phonemes!r})"
            continue
        phonemes_left -= len(ids)
        if phonemes_left < 0:
            raise _too_many_phonemes(max_phonemes)
        seconds_left -= 0 if first else SENTENCE_PAUSE
        budget = min(seconds_left, MAX_SENTENCE_SECONDS)
        try:
            if budget >= MAX_SENTENCE_SECONDS:  # the sentence's own bound (its error says so)
                out = synth.synthesize_ids(ids, phonemes, duration_scale)
            else:
                out = synth.synthesize_ids(ids, phonemes, duration_scale, max_seconds=max(budget, 0.0))
        except LimitError:
            if budget >= MAX_SENTENCE_SECONDS:
                raise
            raise LimitError(f"the text gives more than {max_seconds:g} s of audio, the most one request speaks "
                             "(bittts.limits.MAX_REQUEST_SECONDS): send it in parts or lower the duration "
                             "scale") from None
        seconds_left -= out.duration
        if on_sentence is not None:
            on_sentence(sentence, out)
        yield (b"" if first else pause) + pcm16(out.wav)
        first = False
        cache = getattr(getattr(synth, "phonemizer", None), "cache", None)
        if isinstance(cache, dict) and len(cache) > _MAX_CACHED_PHONEMES:  # grows with the text, not bounded
            cache.clear()
    if first:
        raise ValueError(last_error or "nothing to speak: the text is empty")


def count_phonemes(synth: Voice, sentences: Sequence[str], max_phonemes: int | None = None) -> int:
    """The phonemes `speak` will synthesize for `sentences`, all phonemized through one espeak-ng process (and
    cached, so `speak` does not phonemize them again); `bittts.limits.LimitError` past `max_phonemes`. A request
    is thus refused before any synthesis, not after the first `max_phonemes` worth of it."""
    batch = getattr(getattr(synth, "phonemizer", None), "batch", None)
    if callable(batch) and sentences:
        batch(list(sentences))
    total = sum(len(synth.text_to_ids(sentence)[1]) for sentence in sentences)
    if max_phonemes is not None and total > max_phonemes:
        raise _too_many_phonemes(max_phonemes)
    return total


def _too_many_phonemes(limit: int) -> LimitError:
    return LimitError(f"the text gives more than {limit:,} phonemes, the most one request speaks "
                      "(bittts.limits.MAX_REQUEST_PHONEMES): send it in parts")


def wav_header(sample_rate: int, data_bytes: int) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV holding `data_bytes` of samples."""
    if not 0 <= data_bytes <= _MAX_WAV_DATA:
        raise ValueError(f"{data_bytes:,} bytes of audio do not fit in one WAV file (at most {_MAX_WAV_DATA:,}): "
                         "split the text, or stream it with --output-raw")
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1,
                       sample_rate, 2 * sample_rate, 2, 16, b"data", data_bytes)


def _write_pcm(f: BinaryIO, chunks: Iterable[bytes]) -> int:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        wav_header(1, total)  # refuses audio past the WAV size limit before it is written
        f.write(chunk)
    return total


def write_wav_stream(path: str | os.PathLike[str], chunks: Iterable[bytes], sample_rate: int) -> int:
    """Write PCM chunks as a WAV file, atomically, one chunk in memory at a time. Returns the data bytes.

    A path that cannot seek (a FIFO, a terminal) is written through `write_wav_to_stream`, as standard output."""
    with atomic_open(path) as f:
        if not f.seekable():
            return write_wav_to_stream(f, chunks, sample_rate)
        f.write(wav_header(sample_rate, 0))
        total = _write_pcm(f, chunks)
        f.seek(0)
        f.write(wav_header(sample_rate, total))
    return total


@contextlib.contextmanager
def spooled_wav(chunks: Iterable[bytes], sample_rate: int) -> Iterator[tuple[BinaryIO, int]]:
    """The WAV of the PCM chunks in a temporary file, rewound, and its size in bytes: for a stream that cannot
    seek (standard output, an HTTP response), whose header states the length first. Memory holds one chunk."""
    with tempfile.TemporaryFile() as spool:
        spool.write(wav_header(sample_rate, 0))
        total = _write_pcm(spool, chunks)
        spool.seek(0)
        spool.write(wav_header(sample_rate, total))
        spool.seek(0)
        yield spool, len(wav_header(sample_rate, total)) + total


def write_wav_to_stream(out: BinaryIO, chunks: Iterable[bytes], sample_rate: int) -> int:
    """Write PCM chunks as one WAV to a stream that cannot seek (`spooled_wav`). Returns the data bytes."""
    with spooled_wav(chunks, sample_rate) as (wav, size):
        shutil.copyfileobj(wav, out)
    out.flush()
    return size - len(wav_header(sample_rate, 0))
