"""Objective speech metrics: intelligibility (WER/CER of an offline recognizer) and mel-cepstral distortion.

* ``transcribe`` uses pocketsphinx (PyPI, bundled US-English acoustic model and language model, offline).
  Absolute WER therefore includes pocketsphinx's own errors; compare systems on the same sentences.
* ``wer``/``cer`` score the texts after ``bittts.data.text.normalize`` without punctuation, so "Dr. 5" and
  "doctor five" match; jiwer (PyPI) aligns the normalized texts and counts the edits.
* ``mcd_dtw``: mel cepstra c1..c24 (c0, the loudness, excluded) from the 80-band natural-log mel spectrum,
  with the cepstral scale of ``log|X(w)| = c0 + 2 sum_k c_k cos(k w)`` (orthonormal DCT-II divided by
  sqrt(2 * n_mels)) and the usual ``10 / ln 10 * sqrt(2 * sum_k (c_k - c'_k)^2)`` in dB, averaged along
  the DTW path after trimming leading/trailing silence. Values are comparable between systems measured
  here, not to numbers computed from SPTK/WORLD envelopes.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

from ..data import audio
from ..data.text import normalize
from ..extras import install_hint

AudioInput = str | os.PathLike[str] | torch.Tensor | np.ndarray

# ------------------------------------------------------------------------------------------------ WER/CER


def normalize_for_scoring(text: str) -> str:
    """Normalized words without punctuation, separated by single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[,.!?;:]", " ", normalize(text))).strip()


def _jiwer():  # -> the jiwer module (imported lazily: an `eval`-extra dependency)
    try:
        import jiwer
    except ImportError:
        raise ImportError("WER/CER need jiwer: " + install_hint("eval")) from None
    return jiwer


def edit_counts(ref: str, hyp: str, unit: str = "word") -> tuple[int, int]:
    """(edits, reference length) between two texts after `normalize_for_scoring`, in words or characters
    (spaces count as characters). jiwer aligns them (Levenshtein: substitutions, insertions and deletions all
    cost 1); the project's normalizer decides what counts as the same word, so "Dr. 5" and "doctor five" match."""
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    jiwer = _jiwer()
    r, h = normalize_for_scoring(ref), normalize_for_scoring(hyp)
    out = jiwer.process_words(r, h) if unit == "word" else jiwer.process_characters(r, h)
    return out.substitutions + out.deletions + out.insertions, out.substitutions + out.deletions + out.hits


def _rate(edits: int, ref_len: int) -> float:
    if ref_len == 0:  # an empty reference: any hypothesis word is an error, and counts as all of it
        return 0.0 if edits == 0 else 1.0
    return edits / ref_len


def wer(ref: str, hyp: str) -> float:
    """Word error rate: word edits / reference words (1.0 for an empty reference with a non-empty
    hypothesis). Can exceed 1 when the hypothesis has insertions."""
    return _rate(*edit_counts(ref, hyp, "word"))


def cer(ref: str, hyp: str) -> float:
    """Character error rate over the normalized texts (spaces count as characters)."""
    return _rate(*edit_counts(ref, hyp, "char"))


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Corpus-level WER and CER: total edits over total reference length (long sentences weigh more, as in
    jiwer's own corpus WER)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    we = wn = ce = cn = 0
    for ref, hyp in zip(refs, hyps):
        e, n = edit_counts(ref, hyp, "word")
        we, wn = we + e, wn + n
        e, n = edit_counts(ref, hyp, "char")
        ce, cn = ce + e, cn + n
    return {"wer": we / max(wn, 1), "cer": ce / max(cn, 1)}


# -------------------------------------------------------------------------------------------- recognizer


def _load(wav: AudioInput, sample_rate: int) -> torch.Tensor:
    """Any audio input -> mono float tensor at 16 kHz."""
    if isinstance(wav, (str, os.PathLike)):
        wav, sample_rate = audio.read_wav(wav)
    elif isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    elif not isinstance(wav, torch.Tensor):
        raise TypeError(f"expected a wav path, tensor or numpy array, got {type(wav).__name__}")
    wav = wav.detach().float().cpu().reshape(-1)
    return audio.resample(wav, sample_rate, audio.SAMPLE_RATE)


def _decoder():  # -> a new pocketsphinx.Decoder (imported lazily)
    try:
        from pocketsphinx import Decoder
    except ImportError as e:
        raise ImportError("transcribe() needs pocketsphinx: " + install_hint("eval")) from e
    return Decoder(samprate=audio.SAMPLE_RATE, loglevel="FATAL")


def transcribe(wav: AudioInput, sample_rate: int = audio.SAMPLE_RATE) -> str:
    """Recognize speech with pocketsphinx's bundled US-English model; returns lower-case words.

    Every call uses a fresh decoder (~0.5 s to load): a reused one carries state (its running cepstral mean,
    and more that resetting the mean does not clear) from one utterance into the next, so the same audio could
    get another transcript depending on what was decoded before."""
    x = _load(wav, sample_rate)
    pcm = (x.clamp(-1, 1) * 32767).round().to(torch.int16).numpy().tobytes()
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return "" if hyp is None else " ".join(w for w in hyp.hypstr.lower().split() if not w.startswith("<"))


# ------------------------------------------------------------------------------------------------- MCD

_MCD_SCALE = 10.0 / math.log(10.0) * math.sqrt(2.0)


def mel_cepstrum(wav: AudioInput, sample_rate: int = audio.SAMPLE_RATE, n_ceps: int = 24,
                 trim: bool = True) -> np.ndarray:
    """Mel cepstra c1..c``n_ceps`` per frame [T, n_ceps] (see the module docstring for the scale)."""
    if not 1 <= n_ceps < audio.N_MELS:
        raise ValueError(f"n_ceps must be in [1, {audio.N_MELS - 1}], got {n_ceps}")
    x = _load(wav, sample_rate)
    if trim:
        x = audio.trim_silence(x, margin_s=0.0)
    x = audio.fit_to_hop(x)
    logmel = audio.log_mel(x).double().numpy()  # [n_mels, T]
    n = logmel.shape[0]
    k = np.arange(n_ceps + 1)[:, None]
    basis = np.cos(np.pi * k * (np.arange(n)[None, :] + 0.5) / n) * np.sqrt(2.0 / n)
    basis[0] /= np.sqrt(2.0)
    ceps = (basis @ logmel) / np.sqrt(2.0 * n)
    return ceps[1:].T


def dtw(cost: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
    """Minimum-cost monotonic alignment of a cost matrix [N, M] with steps (1,0), (0,1), (1,1).

    Returns (total cost along the path, path from (0, 0) to (N-1, M-1)). Computed one anti-diagonal at a
    time, so the Python loop runs N + M times, not N * M.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or 0 in cost.shape:
        raise ValueError(f"dtw() needs a non-empty 2-D cost matrix, got shape {cost.shape}")
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for d in range(2, n + m + 1):  # cells (i, j) in 1-based acc with i + j == d
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        best = np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
        acc[i, j] = cost[i - 1, j - 1] + best
    path = [(n - 1, m - 1)]
    i, j = n, m
    while (i, j) != (1, 1):
        steps = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
        i, j = min(steps, key=lambda s: acc[s])
        path.append((i - 1, j - 1))
    return float(acc[n, m]), path[::-1]


def mcd_dtw(wav_ref: AudioInput, wav_syn: AudioInput, sample_rate: int = audio.SAMPLE_RATE,
            n_ceps: int = 24) -> float:
    """Mel-cepstral distortion in dB between a reference and a synthesized utterance, DTW-aligned."""
    a = mel_cepstrum(wav_ref, sample_rate, n_ceps)
    b = mel_cepstrum(wav_syn, sample_rate, n_ceps)
    dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    total, path = dtw(dist)
    return _MCD_SCALE * total / len(path)
