"""DNSMOS P.835 (`bittts.evaluation.dnsmos`): the same numbers as Microsoft's reference code (speechmos.dnsmos), the
same windows, and properties that hold for any audio."""
from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

pytest.importorskip("onnxruntime")
if importlib.util.find_spec("speechmos") is None:
    pytest.skip("speechmos not installed (pip install 'bittts[eval]')", allow_module_level=True)

from bittts.evaluation import dnsmos
from bittts.evaluation.dnsmos import DNSMOS, POLYNOMIALS, segments

WINDOW = int(dnsmos.INPUT_LENGTH * dnsmos.SAMPLE_RATE)


@pytest.fixture(scope="module")
def scorer():
    return DNSMOS()


@pytest.fixture(scope="module")
def personal():
    return DNSMOS(personalized=True)


def vowel(seconds: float) -> np.ndarray:
    """A deterministic voiced test signal: harmonics of a 120-160 Hz glide under a 3 Hz syllable envelope."""
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(120 + 40 * np.sin(2 * np.pi * 0.5 * t)) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 25) if k * 160 < 7000)
    return (x * 0.5 * (1 - np.cos(2 * np.pi * 3 * t)) * 0.15).astype(np.float32)


def hum(seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * 50 * np.arange(int(seconds * 16000)) / 16000).astype(np.float32)


# (signal, personalized) -> SIG, BAK, OVRL from speechmos 0.0.1.1's own `dnsmos.run(x, 16000, model_type=...)`
# (Microsoft's code, with librosa installed), onnxruntime 1.32
REFERENCE = {
    ("vowel3.3", False): (2.864702, 3.492444, 2.39793),  # shorter than a window: repeated to 13.2 s, 4 windows
    ("vowel3.3", True): (3.494312, 3.42777, 2.87534),
    ("vowel11.5", False): (2.437908, 2.920416, 1.988426),  # 11.5 s: 3 windows, one second apart
    ("vowel11.5", True): (3.382099, 3.166437, 2.643509),
    ("hum2", False): (0.904951, 0.633774, 1.002765),  # a loud 50 Hz hum: below 1; the reference does not clip
    ("hum2", True): (2.265632, 3.107532, 1.9851),
}
SIGNALS = {"vowel3.3": vowel(3.3), "vowel11.5": vowel(11.5), "hum2": hum(2.0)}


@pytest.mark.parametrize("name, personalized", list(REFERENCE))
def test_scores_equal_microsofts_reference(name, personalized, scorer, personal):
    got = (personal if personalized else scorer)(SIGNALS[name])
    assert [got["sig"], got["bak"], got["ovrl"]] == pytest.approx(REFERENCE[name, personalized], abs=2e-5)


def test_polynomials_are_speechmos_own():
    """The coefficients are the ones in the installed speechmos/dnsmos.py (read as text: it imports librosa)."""
    source = Path(next(iter(importlib.util.find_spec("speechmos").submodule_search_locations)), "dnsmos.py")
    found = [tuple(float(v) for v in body.split(",")) for body in
             re.findall(r"np\.poly1d\(\s*\[([^\]]*)\]", source.read_text())]
    # the reference's order: personalized ovr, sig, bak; then non-personalized ovr, sig, bak
    assert found == [POLYNOMIALS[p][k] for p in (True, False) for k in ("ovrl", "sig", "bak")]


def test_windows_are_the_references():
    x = np.arange(1, 2.47 * 16000 + 1, dtype=np.float32)  # 2.47 s: doubled twice to 9.88 s, one window
    (w,) = segments(x)
    assert w.shape == (WINDOW,) and (w[: x.size] == x).all() and (w[x.size: 2 * x.size] == x).all()
    x = np.arange(int(20.28 * 16000), dtype=np.float32)  # 20.28 s: windows start every second, 11 of them ...
    ws = segments(x)
    # ... but the reference computes a window's end as int((k + 9.01) * 16000), which float rounding puts one
    # sample short for k = 7..10 (16.01 * 16000 = 256159.99...), and it skips short windows: so do we
    assert [int(w[0]) for w in ws] == [16000 * k for k in range(7)] and ws.shape == (7, WINDOW)
    assert segments(np.ones(1, np.float32)).shape == (7, WINDOW)  # one sample, doubled to 2 ** 18 (16.4 s)


def test_bad_audio_is_refused(scorer):
    with pytest.raises(ValueError, match="empty"):
        scorer(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        scorer(np.full(100, 1.5, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        scorer(torch.tensor([0.0, float("nan")]))


def test_other_rates_are_resampled_to_16k(scorer):
    """Audio at another rate is rated as its 16 kHz resampling (close to the 16 kHz original)."""
    from bittts.data.audio import resample

    x = torch.from_numpy(vowel(3.3))
    at_22k = resample(x, 16000, 22050).clamp(-1, 1)
    a, b = scorer(x), scorer(at_22k, 22050)
    assert all(abs(a[k] - b[k]) < 0.1 for k in a)


# P.835 polynomials without personalization are downward parabolas: the scale's ceiling, whatever the network says
CEILING = max(c - b * b / (4 * a) for a, b, c in POLYNOMIALS[False].values())

short_audio = st.one_of(
    arrays(np.float32, st.integers(1, 4000), elements=st.floats(-1, 1, width=32)),
    st.builds(lambda f, a, n: (a * np.sin(2 * np.pi * f * np.arange(n) / 16000)).astype(np.float32),
              st.floats(20, 7900), st.floats(0, 1), st.integers(1600, 4 * 16000)),
)


@settings(deadline=None, max_examples=8)
@given(short_audio)
def test_scores_are_finite_below_the_ceiling_and_ignore_repetition(scorer, x):
    """Any clip gets finite scores no higher than the polynomials allow (< 5), and a clip shorter than half a
    window scores as itself played twice (the reference repeats short clips to fill a window)."""
    s = scorer(x)
    assert CEILING < 5
    assert all(math.isfinite(v) and v <= CEILING + 1e-9 for v in s.values())
    if 2 * x.size < WINDOW:
        assert scorer(np.concatenate([x, x])) == s


def test_missing_speechmos_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'bittts\[eval\]'"):
        dnsmos.model_path()
