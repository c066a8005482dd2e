"""Audio: wav I/O (stdlib ``wave``), resampling, log-mel, pitch and energy — torch only, no torchaudio/librosa.

Frames follow HiFi-GAN: the signal is reflect-padded by ``(n_fft - hop) / 2`` on both sides and framed without
centering, so a signal of ``T * hop`` samples has exactly ``T`` frames, and pitch/energy/mel frames line up
with the vocoder's upsampling. The mel filter bank is librosa's default (Slaney mel scale, Slaney area
normalization); log-mel is the natural log of the *magnitude* mel spectrogram, clamped at 1e-5.
"""
from __future__ import annotations

import functools
import io
import math
import os
import wave

import numpy as np
import torch
import torch.nn.functional as F

from ternq.atomic import atomic_write

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 256
WIN = 1024
N_MELS = 80
FMIN = 0.0
FMAX = 8000.0
LOG_CLAMP = 1e-5

# ------------------------------------------------------------------------------------------------ wav io


def read_wav(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int]:
    """Read a PCM wav (8/16/24/32-bit, any channel count) as a mono float32 tensor in [-1, 1] and its rate."""
    try:
        with wave.open(os.fspath(path), "rb") as f:
            channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except wave.Error as e:
        raise ValueError(
            f"cannot read {os.fspath(path)!r} as PCM wav ({e}); convert it first, e.g. "
            "`sox in.wav -b 16 -e signed-integer out.wav`"
        ) from e
    if width == 1:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        data = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"{os.fspath(path)!r}: unsupported sample width {width} bytes")
    data = data.reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), rate


def write_wav(path: str | os.PathLike[str], wav: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono 16-bit PCM atomically (temp file + rename); values outside [-1, 1) are clipped."""
    data = wav.detach().cpu().numpy() if isinstance(wav, torch.Tensor) else np.asarray(wav)
    data = np.asarray(data, dtype=np.float64).reshape(-1)
    pcm = np.clip(np.round(data * 32768.0), -32768, 32767).astype("<i2")  # the inverse of read_wav's scaling
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    atomic_write(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------- resampling


@functools.lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, width_zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase Hann-windowed sinc kernels [new, 1, K] (the construction torchaudio uses)."""
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx[None, :]) * base
    t = t.clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return (sinc * window * base / orig).to(torch.float32)[:, None, :], width


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int, width_zeros: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling along the last axis; output length ``ceil(L * new_sr / orig_sr)``."""
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav
    g = math.gcd(int(orig_sr), int(new_sr))
    orig, new = int(orig_sr) // g, int(new_sr) // g
    kernel, width = _sinc_kernel(orig, new, width_zeros, rolloff)
    shape, length = wav.shape[:-1], wav.shape[-1]
    x = F.pad(wav.reshape(-1, 1, length).float(), (width, width + orig))
    y = F.conv1d(x, kernel.to(x.device), stride=orig).transpose(1, 2).reshape(x.shape[0], -1)
    target = math.ceil(new * length / orig)
    return y[:, :target].reshape(*shape, target)


# -------------------------------------------------------------------------------------------- mel scale


_F_SP = 200.0 / 3  # Slaney: linear 66.67 Hz per mel below 1 kHz ...
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0  # ... logarithmic above, 27 mels per factor 6.4


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, mel)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of ``hz_to_mel``."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * _F_SP
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, hz)


def mel_frequencies(n: int, fmin: float, fmax: float) -> np.ndarray:
    """``n`` frequencies (Hz) equally spaced on the mel scale from ``fmin`` to ``fmax``."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n))


@functools.lru_cache(maxsize=8)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_frequencies(n_mels + 2, fmin, fmax)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # Slaney norm: every triangle has unit area in Hz
    return torch.from_numpy(weights.astype(np.float32))


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float | None = FMAX) -> torch.Tensor:
    """Triangular mel filters [n_mels, n_fft // 2 + 1], equal to ``librosa.filters.mel`` defaults."""
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, sr={sample_rate}")
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"need n_mels >= 1 and n_fft >= 2, got n_mels={n_mels}, n_fft={n_fft}")
    return _filterbank(int(sample_rate), int(n_fft), int(n_mels), float(fmin), float(fmax)).clone()


# ----------------------------------------------------------------------------------------- spectrograms


def _frame_pad(wav: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """Pad [B, L] by (n_fft - hop) / 2 per side, reflecting when the signal is long enough."""
    left = (n_fft - hop) // 2
    right = n_fft - hop - left
    mode = "reflect" if wav.shape[-1] > max(left, right) else "constant"
    return F.pad(wav.unsqueeze(1), (left, right), mode=mode).squeeze(1)


def stft_magnitude(wav: torch.Tensor, n_fft: int = N_FFT, hop: int = HOP, win: int = WIN) -> torch.Tensor:
    """|STFT| [..., n_fft // 2 + 1, L // hop] with a periodic Hann window; differentiable."""
    if wav.shape[-1] < hop:
        raise ValueError(f"need at least hop={hop} samples, got a signal of {wav.shape[-1]}")
    shape = wav.shape[:-1]
    x = _frame_pad(wav.reshape(-1, wav.shape[-1]).float(), n_fft, hop)
    window = torch.hann_window(win, device=x.device, dtype=x.dtype)
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=win, window=window, center=False,
                      return_complex=True)
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    return mag.reshape(*shape, *mag.shape[-2:])


def log_mel(wav: torch.Tensor, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, hop: int = HOP,
            win: int = WIN, n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX) -> torch.Tensor:
    """Natural-log magnitude mel spectrogram [..., n_mels, L // hop]; differentiable (used by the vocoder loss)."""
    mag = stft_magnitude(wav, n_fft, hop, win)
    fb = _filterbank(int(sample_rate), int(n_fft), int(n_mels), float(fmin), float(fmax)).to(mag)
    return torch.log(torch.clamp(torch.matmul(fb, mag), min=LOG_CLAMP))


def energy(wav: torch.Tensor, n_fft: int = N_FFT, hop: int = HOP, win: int = WIN) -> torch.Tensor:
    """Frame energy [..., L // hop]: L2 norm of the magnitude spectrum (FastSpeech 2's definition)."""
    return torch.linalg.vector_norm(stft_magnitude(wav, n_fft, hop, win), dim=-2)


# ----------------------------------------------------------------------------------------------- pitch


def pitch(wav: torch.Tensor, sample_rate: int = SAMPLE_RATE, hop: int = HOP, frame: int = WIN,
          fmin: float = 65.0, fmax: float = 600.0, threshold: float = 0.15, silence_db: float = -50.0) -> torch.Tensor:
    """F0 in Hz per frame [L // hop] by YIN (de Cheveigné & Kawahara 2002); 0 for unvoiced frames.

    A frame is voiced when the cumulative mean normalized difference dips below ``threshold`` between the
    ``fmax`` and ``fmin`` lags and its RMS is within ``silence_db`` of the loudest frame. The lag of the
    first such dip is refined by parabolic interpolation.
    """
    if wav.dim() != 1:
        raise ValueError(f"pitch() expects a 1-D signal, got shape {tuple(wav.shape)}")
    if wav.shape[-1] < hop:
        raise ValueError(f"need at least hop={hop} samples, got a signal of {wav.shape[-1]}")
    tau_min, tau_max = max(2, int(sample_rate / fmax)), int(math.ceil(sample_rate / fmin))
    if tau_max + 2 >= frame:
        raise ValueError(f"frame={frame} is too short for fmin={fmin} Hz at {sample_rate} Hz")
    x = _frame_pad(wav.double()[None], frame, hop)[0]
    frames = x.unfold(0, frame, hop)[: wav.shape[-1] // hop]  # [T, frame], aligned with the mel frames
    frames = frames - frames.mean(dim=1, keepdim=True)
    w = frame - tau_max  # integration window
    # difference function d(tau) = sum_j (x_j - x_{j+tau})^2 for j < w, via energies and an FFT correlation
    sq = torch.cumsum(F.pad(frames.pow(2), (1, 0)), dim=1)
    taus = torch.arange(tau_max + 1)
    e_shift = sq[:, taus + w] - sq[:, taus]
    spec_a = torch.fft.rfft(frames[:, :w], n=frame)
    spec_x = torch.fft.rfft(frames, n=frame)
    corr = torch.fft.irfft(spec_a.conj() * spec_x, n=frame)[:, : tau_max + 1]
    d = (sq[:, w:w + 1] + e_shift - 2 * corr).clamp(min=0)
    # cumulative mean normalized difference
    cum = torch.cumsum(d[:, 1:], dim=1)
    cmnd = torch.ones_like(d)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / cum.clamp(min=1e-12)
    # first local minimum below the threshold in [tau_min, tau_max - 1]
    inner = cmnd[:, tau_min:tau_max]
    is_min = (inner <= cmnd[:, tau_min - 1:tau_max - 1]) & (inner <= cmnd[:, tau_min + 1:tau_max + 1])
    ok = is_min & (inner < threshold)
    voiced = ok.any(dim=1)
    tau = ok.float().argmax(dim=1) + tau_min
    rows = torch.arange(frames.shape[0])
    a, b, c = cmnd[rows, tau - 1], cmnd[rows, tau], cmnd[rows, tau + 1]
    denom = a - 2 * b + c
    shift = torch.where(denom.abs() > 1e-12, 0.5 * (a - c) / denom.where(denom.abs() > 1e-12, torch.ones_like(denom)),
                        torch.zeros_like(denom)).clamp(-1, 1)
    f0 = sample_rate / (tau.double() + shift)
    rms = frames[:, (frame - hop) // 2:(frame + hop) // 2].pow(2).mean(dim=1).sqrt()
    loud = 20 * torch.log10(rms.clamp(min=1e-10) / rms.max().clamp(min=1e-10)) > silence_db
    voiced = voiced & loud & (rms > 1e-4)
    return torch.where(voiced, f0, torch.zeros_like(f0)).float()


# --------------------------------------------------------------------------------------- preprocessing


def trim_silence(wav: torch.Tensor, top_db: float = 40.0, margin_s: float = 0.05,
                 sample_rate: int = SAMPLE_RATE, hop: int = HOP) -> torch.Tensor:
    """Cut leading/trailing audio quieter than ``top_db`` below the loudest frame, keeping ``margin_s``."""
    if wav.numel() < 2 * hop:
        return wav
    frames = wav[: wav.shape[-1] // hop * hop].reshape(-1, hop)
    db = 10 * torch.log10(frames.pow(2).mean(dim=1).clamp(min=1e-12))
    loud = torch.nonzero(db > db.max() - top_db).flatten()
    margin = int(margin_s * sample_rate)
    start = max(0, int(loud[0]) * hop - margin)
    end = min(wav.shape[-1], (int(loud[-1]) + 1) * hop + margin)
    return wav[start:end]


def fit_to_hop(wav: torch.Tensor, hop: int = HOP) -> torch.Tensor:
    """Zero-pad the end to a whole number of hops (at least one), so mel frames * hop == samples."""
    frames = max(1, math.ceil(wav.shape[-1] / hop))
    return F.pad(wav, (0, frames * hop - wav.shape[-1]))


def extract_features(wav: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> dict[str, torch.Tensor]:
    """mel [80, T], pitch [T], energy [T] and the wav [T * hop] it was computed from (resampled to 16 kHz,
    silence trimmed, padded to whole hops)."""
    if wav.dim() != 1 or wav.numel() == 0:
        raise ValueError(f"extract_features() expects a non-empty 1-D signal, got shape {tuple(wav.shape)}")
    wav = resample(wav.float(), sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else wav.float()
    wav = fit_to_hop(trim_silence(wav).clamp(-1.0, 1.0))
    with torch.no_grad():
        mag = stft_magnitude(wav)
        mel = torch.log(torch.clamp(_filterbank(SAMPLE_RATE, N_FFT, N_MELS, FMIN, FMAX) @ mag, min=LOG_CLAMP))
        return {"mel": mel, "pitch": pitch(wav), "energy": torch.linalg.vector_norm(mag, dim=0), "wav": wav}
