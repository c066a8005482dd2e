"""Metrics: edit distance / WER / CER properties, DTW against brute force, MCD, pocketsphinx transcription."""
from __future__ import annotations

import itertools
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from bittts.data.audio import resample
from bittts.evaluation import metrics
from bittts.evaluation.metrics import (
    cer,
    dtw,
    edit_counts,
    error_rates,
    mcd_dtw,
    mel_cepstrum,
    transcribe,
    wer,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

words = st.lists(st.sampled_from("the a cat dog sat on mat big red 5 Dr. ran".split()), max_size=10)


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("flaw", "lawn", 2), ("same", "same", 0)])
def test_character_edits_known_values(a, b, d):
    assert edit_counts(a, b, "char") == (d, len(a))


def test_word_edits_count_substitutions_insertions_and_deletions():
    assert edit_counts("the cat sat", "a cat sat down") == (2, 3)  # the -> a, + down
    assert edit_counts("the cat sat", "cat") == (2, 3)
    assert edit_counts("", "hello there") == (2, 0)
    with pytest.raises(ValueError, match="unit"):
        edit_counts("a", "b", "phone")


def _lev(a: list[str], b: list[str]) -> int:
    """Textbook Levenshtein distance, the oracle for jiwer's alignment."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@settings(deadline=None, max_examples=150)
@given(words, words, words)
def test_word_edits_are_the_levenshtein_metric_on_normalized_words(a, b, c):
    a, b, c = (" ".join(x) for x in (a, b, c))
    na, nb = (metrics.normalize_for_scoring(x).split() for x in (a, b))
    d = edit_counts(a, b)[0]
    assert d == _lev(na, nb) and edit_counts(a, b)[1] == len(na)
    assert edit_counts(a, a)[0] == 0
    assert d == edit_counts(b, a)[0]  # the distance is symmetric; the rate is not (it divides by the reference)
    assert abs(len(na) - len(nb)) <= d <= max(len(na), len(nb))
    assert edit_counts(a, c)[0] <= d + edit_counts(b, c)[0]


@settings(deadline=None, max_examples=150)
@given(words, words)
def test_wer_and_cer_bounds(ref_words, hyp_words):
    ref, hyp = " ".join(ref_words), " ".join(hyp_words)
    assert wer(ref, ref) == 0 and cer(ref, ref) == 0
    n_ref = len(metrics.normalize_for_scoring(ref).split())
    n_hyp = len(metrics.normalize_for_scoring(hyp).split())
    w = wer(ref, hyp)
    assert w >= 0
    if n_ref:
        assert w <= max(n_ref, n_hyp) / n_ref
        assert cer(ref, hyp) <= max(len(metrics.normalize_for_scoring(ref)),
                                    len(metrics.normalize_for_scoring(hyp))) / len(metrics.normalize_for_scoring(ref))
    else:
        assert w == (1.0 if n_hyp else 0.0)


@settings(deadline=None, max_examples=100)
@given(words, st.lists(st.sampled_from([",", ".", "!", "?", ";", ":", ""]), min_size=10, max_size=10), st.booleans())
def test_texts_that_normalize_alike_score_zero(ref_words, marks, upper):
    """Case and punctuation are not errors: a hypothesis that normalizes to the reference's words has WER and
    CER 0."""
    ref = " ".join(ref_words)
    hyp = " ".join(w + m for w, m in zip(ref_words, marks))
    hyp = hyp.upper() if upper else hyp
    assume(metrics.normalize_for_scoring(ref) == metrics.normalize_for_scoring(hyp))  # not "DR.," for "Dr."
    assert wer(ref, hyp) == 0 and cer(ref, hyp) == 0 and error_rates([ref], [hyp]) == {"wer": 0, "cer": 0}


def test_wer_scores_normalized_text():
    assert wer("Dr. Smith has 5 cats!", "doctor smith has five cats") == 0
    assert wer("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert wer("the cat sat", "a cat") == pytest.approx(2 / 3)
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    rates = error_rates(["one two three four", "five six"], ["one two three four", "five"])
    assert rates["wer"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="hypotheses"):
        error_rates(["a"], [])


def _brute_force_dtw(cost: np.ndarray) -> float:
    n, m = cost.shape
    best = math.inf

    def walk(i: int, j: int, total: float) -> None:
        nonlocal best
        total += cost[i, j]
        if (i, j) == (n - 1, m - 1):
            best = min(best, total)
            return
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            if i + di < n and j + dj < m:
                walk(i + di, j + dj, total)

    walk(0, 0, 0.0)
    return best


@settings(deadline=None, max_examples=80)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=st.floats(0, 10)))
def test_dtw_matches_brute_force(cost):
    total, path = dtw(cost)
    assert total == pytest.approx(_brute_force_dtw(cost))
    assert path[0] == (0, 0) and path[-1] == (cost.shape[0] - 1, cost.shape[1] - 1)
    for (i0, j0), (i1, j1) in itertools.pairwise(path):
        assert (i1 - i0, j1 - j0) in {(1, 0), (0, 1), (1, 1)}
    assert sum(cost[i, j] for i, j in path) == pytest.approx(total)


def test_dtw_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        dtw(np.zeros((0, 3)))


def _voice(seconds: float = 0.6, f0: float = 140.0, formant: float = 700.0, seed: int = 0) -> torch.Tensor:
    """A crude vowel: harmonics of f0 shaped by one resonance, with a little noise."""
    t = torch.arange(int(seconds * 16000), dtype=torch.float64) / 16000
    wav = sum(math.exp(-((k * f0 - formant) / 400) ** 2) * torch.sin(2 * math.pi * k * f0 * t) for k in range(1, 30))
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal(t.numel())) * 0.01
    return (0.3 * wav / wav.abs().max() + noise).float()


def test_mcd_zero_for_identical_and_ordered_by_difference():
    x = _voice()
    assert mcd_dtw(x, x) == 0.0
    slower = resample(x, 16000, 13000)  # same spectrum envelope shifted a little, different length
    other = _voice(formant=2200.0, seed=1)
    near, far = mcd_dtw(x, _voice(seed=2)), mcd_dtw(x, other)
    assert 0 < near < far
    assert mcd_dtw(other, x) == pytest.approx(far, rel=1e-9)  # symmetric
    assert mcd_dtw(x, slower) < far
    assert mel_cepstrum(x).shape[1] == 24
    with pytest.raises(ValueError, match="n_ceps"):
        mel_cepstrum(x, n_ceps=0)


needs_tools = pytest.mark.skipif(shutil.which("flite") is None, reason="flite not installed (apt-get install flite)")


@needs_tools
def test_transcribe_flite_speech():
    pytest.importorskip("pocketsphinx", reason="pocketsphinx not installed (pip install 'bittts[eval]')")
    from bittts.data.corpus import synthesize_flite

    sentence = "the weather is nice today"
    wav, rate = synthesize_flite(sentence)
    hyp = transcribe(wav.numpy(), rate)
    assert wer(sentence, hyp) <= 0.4, hyp
    # digital silence must not crash; pocketsphinx may still hallucinate a filler word on it
    assert len(transcribe(torch.zeros(16000)).split()) <= 1


@needs_tools
def test_transcript_does_not_depend_on_what_was_decoded_before():
    pytest.importorskip("pocketsphinx", reason="pocketsphinx not installed (pip install 'bittts[eval]')")
    from bittts.data.corpus import synthesize_flite

    wav, rate = synthesize_flite("the birch canoe slid on the smooth planks")
    first = transcribe(wav, rate)
    noise = torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.5
    transcribe(noise)
    transcribe(noise * 0.01)
    assert transcribe(wav, rate) == first == transcribe(wav, rate)


def test_transcribe_without_pocketsphinx_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    with pytest.raises(ImportError, match="pip install"):
        transcribe(torch.zeros(1600))
