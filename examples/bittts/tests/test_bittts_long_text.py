"""Long text to speech in bounded memory (`bittts.synthesis.long_text`): sentence splitting never loses or reorders
text, a stream is spoken as it arrives, and the WAV writers produce valid files without holding the audio."""
from __future__ import annotations

import io
import os
import wave
from dataclasses import dataclass

import pytest
import torch
from bittts.synthesis.long_text import (
    SENTENCE_PAUSE,
    pcm16,
    read_sentences_stream,
    speak,
    split_sentences,
    wav_header,
    write_wav_stream,
    write_wav_to_stream,
)
from hypothesis import given, settings
from hypothesis import strategies as st

TEXT = st.lists(st.sampled_from(list("ab é,.;!?\n\r\t\"')…—ü") + ["Dr.", "e.g.", "\u2028"]),
                max_size=200).map("".join)


def _letters(text: str) -> str:
    return "".join(text.split())


@given(text=TEXT, max_chars=st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_split_keeps_every_character_in_order(text, max_chars):
    pieces = list(split_sentences(text, max_chars))
    assert _letters("".join(pieces)) == _letters(text)
    assert all(p and p == p.strip() and len(p) <= max_chars for p in pieces)


class _Trickle(io.RawIOBase):
    """A byte stream that hands out the given chunk sizes (a pipe that delivers bytes as they come)."""

    def __init__(self, data: bytes, sizes: list[int]) -> None:
        self.data, self.sizes, self.pos = data, sizes, 0

    def read1(self, n: int = -1) -> bytes:
        size = min(n, self.sizes.pop(0) if self.sizes else n)
        chunk = self.data[self.pos:self.pos + size]
        self.pos += len(chunk)
        return chunk


@given(text=TEXT, sizes=st.lists(st.integers(1, 7), max_size=100), max_chars=st.integers(1, 40))
@settings(max_examples=300, deadline=None)
def test_stream_keeps_every_character_in_order_whatever_the_chunks(text, sizes, max_chars):
    """Chunks split UTF-8 characters and lines anywhere; the sentences still hold the whole text in order."""
    pieces = list(read_sentences_stream(_Trickle(text.encode(), sizes), max_chars=max_chars))
    assert _letters("".join(pieces)) == _letters(text)
    assert all(p and p == p.strip() and len(p) <= max_chars for p in pieces)


def test_sentences_end_at_punctuation_and_lines_not_abbreviations():
    text = "Dr. Smith met Mrs. Jones, e.g. at noon. Really?! Yes…\n\"Quoted.\" Next line\nlast"
    assert list(split_sentences(text)) == ["Dr. Smith met Mrs. Jones, e.g. at noon.", "Really?!", "Yes…",
                                           "\"Quoted.\"", "Next line", "last"]
    long = "one, two three " * 10
    assert list(split_sentences(long, 20)) == ["one, two three one,"] + ["two three one,"] * 8 + ["two three"]
    assert list(split_sentences("alpha beta gamma delta epsilon", 12)) == ["alpha beta", "gamma delta", "epsilon"]
    assert list(split_sentences("x" * 25, 10)) == ["x" * 10, "x" * 10, "x" * 5]


def test_stream_speaks_a_line_before_the_rest_arrives_and_holds_little():
    """A long stream: the first sentence comes after the first chunk, and a line with no end is still spoken
    sentence by sentence (memory bounded by the chunk size, not the line)."""
    data = b"Hello there.\n" + b"word " * 400_000  # 2 MB, one endless line
    stream = _Trickle(data, [])
    sentences = read_sentences_stream(stream, max_chars=100)
    assert next(sentences) == "Hello there."
    assert stream.pos <= 1 << 16
    second = next(sentences)
    assert len(second) <= 100 and stream.pos <= 2 << 16
    assert sum(1 for _ in sentences) > 10_000


def test_stream_refuses_bytes_that_are_not_utf8():
    with pytest.raises(ValueError, match=r"stdin-name is not UTF-8 text \(byte 6\)"):
        list(read_sentences_stream(io.BytesIO(b"Hello \xff there."), "stdin-name"))


def _read(data: bytes) -> tuple[int, int, int, bytes]:
    with wave.open(io.BytesIO(data), "rb") as f:
        return f.getframerate(), f.getnchannels(), f.getsampwidth(), f.readframes(f.getnframes())


def test_wav_writers_give_valid_files_of_all_chunks(tmp_path):
    chunks = [pcm16(torch.linspace(-1, 1, n)) for n in (0, 5, 300)]
    out = io.BytesIO()
    assert write_wav_to_stream(out, iter(chunks), 22050) == 2 * 305
    assert _read(out.getvalue()) == (22050, 1, 2, b"".join(chunks))
    path = tmp_path / "a.wav"
    write_wav_stream(path, iter(chunks), 16000)
    assert _read(path.read_bytes()) == (16000, 1, 2, b"".join(chunks))
    assert pcm16(torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0])) == b"\x00\x80\x00\x80\x00\x00\x00\x40\xff\x7f"
    with pytest.raises(ValueError, match="do not fit in one WAV"):
        wav_header(16000, 1 << 32)


def test_wav_file_is_not_left_half_written(tmp_path):
    def failing():
        yield b"\x00\x00" * 10
        raise ValueError("synthesis failed")

    path = tmp_path / "a.wav"
    with pytest.raises(ValueError, match="synthesis failed"):
        write_wav_stream(path, failing(), 16000)
    assert os.listdir(tmp_path) == []


@dataclass
class _Out:
    wav: torch.Tensor
    seconds: float = 0.0
    duration: float = 0.0


class _FakeSynth:
    """Speaks each character as one sample; punctuation has no phonemes."""

    sample_rate = 100

    def text_to_ids(self, sentence: str) -> tuple[str, list[int]]:
        return sentence, [1 for c in sentence if c.isalpha()]

    def synthesize_ids(self, ids, phonemes, duration_scale):
        return _Out(torch.full((len(ids),), 0.5))


def test_speak_pauses_between_sentences_and_skips_what_has_no_phonemes():
    heard = []
    chunks = list(speak(_FakeSynth(), ["ab", "...", "cde"], on_sentence=lambda s, _: heard.append(s)))
    pause = int(SENTENCE_PAUSE * _FakeSynth.sample_rate)
    assert [len(c) for c in chunks] == [2 * 2, 2 * (pause + 3)] and heard == ["ab", "cde"]
    with pytest.raises(ValueError, match="nothing to speak"):
        list(speak(_FakeSynth(), ["...", "!"]))
    with pytest.raises(ValueError, match="the text is empty"):
        list(speak(_FakeSynth(), []))
