"""Audio features: mel scale and filter bank (librosa's Slaney formulas), STFT framing, pitch, resampling, wav io."""
from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch
from bittts.data import audio
from bittts.data.audio import (
    HOP,
    N_MELS,
    SAMPLE_RATE,
    extract_features,
    fit_to_hop,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
    pitch,
    read_wav,
    resample,
    trim_silence,
    write_wav,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def sine(freq: float, seconds: float = 0.5, rate: int = SAMPLE_RATE, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


def slaney_mel(f: float) -> float:
    """Closed form of the Slaney mel scale, written out independently of the module."""
    return f * 3 / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)


def test_mel_scale_known_values():
    # values from librosa's documentation: hz_to_mel(60) == 0.9, mel_to_hz(3) == 200
    assert hz_to_mel(60) == pytest.approx(0.9)
    assert mel_to_hz(3) == pytest.approx(200.0)
    assert hz_to_mel(1000) == pytest.approx(15.0)
    assert hz_to_mel(6400) == pytest.approx(42.0)  # 27 mels per factor 6.4 above 1 kHz
    assert hz_to_mel(8000) == pytest.approx(45.2456, abs=1e-4)


@settings(deadline=None, max_examples=200)
@given(st.floats(min_value=0, max_value=24000, allow_nan=False))
def test_mel_scale_matches_closed_form_and_inverts(f):
    assert float(hz_to_mel(f)) == pytest.approx(slaney_mel(f), rel=1e-9, abs=1e-9)
    assert float(mel_to_hz(hz_to_mel(f))) == pytest.approx(f, rel=1e-9, abs=1e-6)
    assert float(hz_to_mel(f + 1)) > float(hz_to_mel(f))


@settings(deadline=None, max_examples=30)
@given(rate=st.sampled_from([8000, 16000, 22050, 24000]), n_fft=st.sampled_from([256, 512, 1024]),
       n_mels=st.integers(min_value=4, max_value=80), fmax_frac=st.floats(min_value=0.5, max_value=1.0),
       data=st.data())
def test_filterbank_matches_slaney_triangles(rate, n_fft, n_mels, fmax_frac, data):
    fmax = rate / 2 * fmax_frac
    fb = mel_filterbank(rate, n_fft, n_mels, 0.0, fmax).double().numpy()
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    assert (fb >= 0).all()
    mel_lo, mel_hi = slaney_mel(0.0), slaney_mel(fmax)
    edges_mel = [mel_lo + (mel_hi - mel_lo) * i / (n_mels + 1) for i in range(n_mels + 2)]
    edges = [1000 * 6.4 ** ((m - 15) / 27) if m >= 15 else m * 200 / 3 for m in edges_mel]
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    for _ in range(20):  # spot-check single weights against the formula
        i = data.draw(st.integers(0, n_mels - 1))
        k = data.draw(st.integers(0, n_fft // 2))
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        up, down = (freqs[k] - lo) / (mid - lo), (hi - freqs[k]) / (hi - mid)
        expected = max(0.0, min(up, down)) * 2 / (hi - lo)
        assert fb[i, k] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # every row is zero outside its triangle, and its largest weight sits at the bin nearest its center
    for i in range(n_mels):
        outside = (freqs <= edges[i]) | (freqs >= edges[i + 2])
        assert (fb[i, outside] == 0).all()
        if fb[i].max() > 0:
            nearest = np.argsort(np.abs(freqs - edges[i + 1]))[:2]
            assert fb[i].argmax() in nearest


def test_filterbank_rejects_bad_ranges():
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(16000, 1024, 80, 0.0, 9000.0)
    with pytest.raises(ValueError, match="n_mels"):
        mel_filterbank(16000, 1024, 0, 0.0, 8000.0)


def test_slaney_normalization_gives_unit_area_for_wide_filters():
    fb = mel_filterbank().double()
    bin_hz = SAMPLE_RATE / audio.N_FFT
    area = fb.sum(dim=1) * bin_hz  # a Riemann sum: close to 1 once a triangle spans many FFT bins
    assert torch.allclose(area, torch.ones(N_MELS, dtype=torch.float64), atol=0.05)
    assert torch.allclose(area[30:], torch.ones(N_MELS - 30, dtype=torch.float64), atol=0.02)


@settings(deadline=None, max_examples=15)
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=HOP - 1))
def test_log_mel_frames_and_clamp(frames, extra):
    wav = torch.randn(frames * HOP + extra) * 0.1
    mel = log_mel(wav)
    assert mel.shape == (N_MELS, frames)
    assert mel.min() >= math.log(1e-5) - 1e-6
    silent = log_mel(torch.zeros(frames * HOP))
    assert torch.allclose(silent, torch.full_like(silent, math.log(1e-5)))


def test_log_mel_is_batched_and_differentiable():
    wav = (torch.randn(3, 10 * HOP) * 0.1).requires_grad_()
    mel = log_mel(wav)
    assert mel.shape == (3, N_MELS, 10)
    assert torch.allclose(mel[1], log_mel(wav[1].detach()), atol=1e-5)
    mel.mean().backward()
    assert wav.grad is not None and torch.isfinite(wav.grad).all()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 6000.0])
def test_sine_peaks_in_the_right_mel_band(freq):
    mel = log_mel(sine(freq))
    band = int(mel[:, 5:-5].mean(dim=1).argmax())
    edges = audio.mel_frequencies(N_MELS + 2, 0.0, 8000.0)
    assert edges[band] < freq < edges[band + 2]


@settings(deadline=None, max_examples=25)
@given(st.floats(min_value=70.0, max_value=550.0), st.floats(min_value=0.05, max_value=0.9))
def test_pitch_of_a_sine(freq, amp):
    f0 = pitch(sine(freq, amp=amp))
    inner = f0[3:-3]
    assert (inner > 0).all()
    assert torch.allclose(inner, torch.full_like(inner, freq), rtol=0.01)


def test_pitch_unvoiced_for_silence_and_noise():
    assert (pitch(torch.zeros(20 * HOP)) == 0).all()
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32)) * 0.3
    assert (pitch(noise) > 0).float().mean() < 0.1
    assert pitch(torch.randn(7 * HOP + 5)).shape == (7,)


def test_energy_scales_with_amplitude():
    x = sine(440.0)
    e1, e2 = audio.energy(x), audio.energy(2 * x)
    assert e1.shape == (x.numel() // HOP,)
    assert torch.allclose(e2[2:-2], 2 * e1[2:-2], rtol=1e-3)


@settings(deadline=None, max_examples=20)
@given(st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000]),
       st.sampled_from([8000, 16000, 22050]), st.floats(min_value=100.0, max_value=1500.0))
def test_resample_preserves_a_low_sine(orig, new, freq):
    x = sine(freq, seconds=0.2, rate=orig)
    y = resample(x, orig, new)
    assert y.shape[-1] == math.ceil(x.shape[-1] * new / orig)
    ref = sine(freq, seconds=0.2, rate=new)[: y.shape[-1]]
    n = y.shape[-1]
    assert torch.allclose(y[n // 8: -n // 8], ref[n // 8: -n // 8], atol=0.01)


@settings(deadline=None, max_examples=30)
@given(st.integers(min_value=64, max_value=22050 * 3), st.floats(min_value=0.1, max_value=0.9))
def test_resample_22050_to_16k_keeps_duration_and_timing(length, where):
    """Piper's 22.05 kHz audio at 16 kHz (how `bittts evaluate` scores it): the same duration to within one
    output sample, and a click stays where it was (no delay from the filter)."""
    x = torch.zeros(length)
    at = int(where * (length - 1))
    x[at] = 1.0
    y = resample(x, 22050, 16000)
    assert abs(y.numel() / 16000 - length / 22050) < 1 / 16000
    assert abs(int(y.abs().argmax()) / 16000 - at / 22050) <= 1 / 16000


def test_resample_removes_content_above_the_new_nyquist():
    x = sine(7000.0, seconds=0.2, rate=22050)
    y = resample(x, 22050, 8000)
    assert y[200:-200].abs().max() < 0.01
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, 16000)


def test_wav_roundtrip_is_atomic_and_exact_to_16_bits(tmp_path):
    x = torch.rand(1234) * 1.999 - 1
    path = tmp_path / "a.wav"
    write_wav(path, x)
    y, rate = read_wav(path)
    assert rate == SAMPLE_RATE and y.shape == x.shape
    assert (y - x).abs().max() <= 0.5 / 32768 + 1e-7
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_widths_and_stereo(tmp_path, width):
    values = np.array([0.0, 0.5, -0.5, 0.25], dtype=np.float64)
    scale = 2 ** (8 * width - 1)
    ints = np.round(values * (scale - 1)).astype(np.int64)
    stereo = np.stack([ints, ints], axis=1).reshape(-1)  # both channels equal -> mono is the same signal
    if width == 1:
        raw = (stereo + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in stereo)
    path = tmp_path / "w.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(width)
        f.setframerate(22050)
        f.writeframes(raw)
    y, rate = read_wav(path)
    assert rate == 22050
    assert np.allclose(y.numpy(), values, atol=2 / scale)


def test_read_wav_rejects_non_pcm(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(ValueError, match="sox"):
        read_wav(bad)


def test_trim_fit_and_extract_features_shapes():
    x = torch.cat([torch.zeros(8000), sine(200.0, seconds=1.0), torch.zeros(8000)])
    trimmed = trim_silence(x)
    assert 16000 <= trimmed.numel() <= 16000 + 2 * (800 + HOP)
    assert fit_to_hop(torch.ones(HOP + 1)).numel() == 2 * HOP
    feats = extract_features(resample(x, SAMPLE_RATE, 22050), 22050)
    t = feats["mel"].shape[1]
    assert feats["mel"].shape == (N_MELS, t)
    assert feats["pitch"].shape == feats["energy"].shape == (t,)
    assert feats["wav"].shape == (t * HOP,)
    voiced = feats["pitch"][feats["pitch"] > 0][2:-2]  # the frames at the onsets straddle silence
    assert voiced.numel() > t // 2 and torch.allclose(voiced, torch.full_like(voiced, 200.0), rtol=0.02)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        extract_features(torch.zeros(0))
